//! systemd socket activation: the real daemon binary started the way a service manager
//! starts it (the listening socket on fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = the daemon's own
//! pid, known only after fork) serves a vhost-user front end on that socket, and refuses a
//! passed fd that is not a listening Unix stream socket with a clear error.
#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dmaheap_testkit as common;

use common::daemon::daemon_bin;
use common::*;

/// Whose pid `LISTEN_PID` names.
#[derive(Clone, Copy, PartialEq)]
enum ListenPid {
    /// The daemon's (set after fork, as systemd does).
    Daemon,
    /// Another process's (pid 1): the variables are not meant for the daemon.
    Other,
}

/// Pointers for execve, prepared before fork and used only in the forked child.
struct ExecPtrs {
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` buffer (32 bytes), also the second-to-last `envp` entry.
    pid_var: *mut u8,
}

// SAFETY: `pre_exec` wants a Send + Sync closure; the pointers are only dereferenced in the
// forked child, which has one thread and its own copy of the memory they point to.
unsafe impl Send for ExecPtrs {}
// SAFETY: as above.
unsafe impl Sync for ExecPtrs {}

/// A daemon started with `fd3` as its fd 3 and the activation variables.
struct Activated {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Activated {
    /// Starts the daemon binary with `args`, `fd3` on fd 3, `LISTEN_FDS=listen_fds` and
    /// `LISTEN_FDNAMES=vm1`.
    fn spawn(dir: &Path, fd3: RawFd, listen_fds: &str, pid: ListenPid, args: &[&str]) -> Self {
        let stderr = dir.join("daemon.stderr");
        // Everything exec needs is prepared before fork: the hook below may only make
        // async-signal-safe calls (no allocation), so it writes the pid into a buffer that
        // is already in envp and calls execve itself (Command would exec with its own
        // copy of the environment, made before the fork).
        let bin = CString::new(daemon_bin()).unwrap();
        let mut argv: Vec<CString> = vec![bin.clone()];
        argv.extend(args.iter().map(|a| CString::new(*a).unwrap()));
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| !k.as_bytes().starts_with(b"LISTEN_") && k.as_bytes() != b"RUST_LOG")
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).unwrap()
            })
            .collect();
        env.push(CString::new(format!("LISTEN_FDS={listen_fds}")).unwrap());
        env.push(CString::new("LISTEN_FDNAMES=vm1").unwrap());
        env.push(CString::new("RUST_LOG=debug").unwrap());
        // "LISTEN_PID=" + up to 20 digits + NUL, filled in the child.
        let mut pid_var = Box::new([0u8; 32]);
        pid_var[..11].copy_from_slice(b"LISTEN_PID=");
        let pid_ptr = pid_var.as_mut_ptr();
        let ptrs = ExecPtrs {
            argv: argv
                .iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect(),
            envp: env
                .iter()
                .map(|e| e.as_ptr())
                .chain([pid_ptr as *const libc::c_char, std::ptr::null()])
                .collect(),
            pid_var: pid_ptr,
        };
        let mut cmd = Command::new(daemon_bin());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap());
        // SAFETY: the hook runs in the forked child before exec. It calls only getpid,
        // dup2, fcntl and execve (async-signal-safe) and writes into pid_var, a buffer of
        // this process that the child has its own copy of; the argv/envp pointer arrays and
        // the strings they point to live (in the child's copy) until execve.
        unsafe {
            cmd.pre_exec(move || {
                // The whole struct (Send + Sync), not its fields (edition 2021 captures).
                let ptrs = &ptrs;
                let mut pid = match pid {
                    ListenPid::Daemon => libc::getpid() as u64,
                    ListenPid::Other => 1,
                };
                let mut digits = [0u8; 20];
                let mut n = 0;
                loop {
                    digits[n] = b'0' + (pid % 10) as u8;
                    n += 1;
                    pid /= 10;
                    if pid == 0 {
                        break;
                    }
                }
                let buf = ptrs.pid_var;
                for i in 0..n {
                    *buf.add(11 + i) = digits[n - 1 - i];
                }
                *buf.add(11 + n) = 0;
                if fd3 == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd3, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::execve(ptrs.argv[0], ptrs.argv.as_ptr(), ptrs.envp.as_ptr());
                Err(std::io::Error::last_os_error())
            });
        }
        let child = cmd.spawn().unwrap();
        // The child's copies are the ones that count.
        drop((argv, env, pid_var, bin));
        eprintln!(
            "daemon pid {} (fd 3 from our fd {fd3}, LISTEN_FDS={listen_fds}): {args:?}",
            child.id()
        );
        Self {
            child: Some(child),
            stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (with a deadline) for the daemon to exit by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon still running after {DEADLINE:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then [`Activated::wait_exit`].
    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill() on our own child, not yet reaped.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        self.wait_exit()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon stderr ---\n{}", self.stderr());
        }
    }
}

/// Control-socket request with retries until the daemon has created the socket.
fn control(path: &Path, line: &str, daemon: &mut Activated) -> String {
    let start = Instant::now();
    loop {
        match vhost_user_dmaheap::control::request(path, line, DEADLINE) {
            Ok(r) => return r,
            Err(e) => {
                if let Some(st) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("daemon exited ({st}); stderr:\n{}", daemon.stderr());
                }
                assert!(start.elapsed() < DEADLINE, "control socket: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn serve_one_front_end(socket: &Path) {
    let stream = UnixStream::connect(socket).unwrap();
    let mut fe = FrontEnd::handshake_stream(stream);
    fe.start_queue();
    assert_eq!(fe.shm_sizes, vec![64 << 20], "GET_SHMEM_CONFIG");
    assert_eq!(fe.heap_info(0).unwrap().name, "vm1heap");
    let b = fe.alloc_ok(0, 8192);
    fe.write_buffer(&b, 4096, b"socket-activated");
    assert_eq!(fe.read_buffer(&b, 4096, 16), b"socket-activated");
    fe.free_ok(b.id);
    fe.disconnect();
}

#[test]
fn a_socket_passed_the_systemd_way_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.sock");
    let ctl = dir.path().join("vm1.ctl");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut d = Activated::spawn(
        dir.path(),
        listener.as_raw_fd(),
        "1",
        ListenPid::Daemon,
        &[
            "--heap",
            "vm1heap=memfd",
            "--shm-size",
            "64M",
            "--control-socket",
            ctl.to_str().unwrap(),
        ],
    );
    // The child has its copy; as under systemd, only the daemon holds the socket now.
    drop(listener);
    let stats = Stats::parse(&control(&ctl, "stats", &mut d));
    assert_eq!(stats.heap("vm1heap").buffers, 0);

    serve_one_front_end(&sock);
    // The socket keeps listening: the next front end (a restarted VM) is served too.
    serve_one_front_end(&sock);
    let err = d.stderr();
    assert!(
        err.contains("using the socket passed by the service manager (fd 3, name \"vm1\")"),
        "log does not say the activated socket was used:\n{err}"
    );
    let stats = Stats::parse(&control(&ctl, "stats", &mut d));
    assert_eq!(stats.total.buffers, 0, "{stats:?}");

    let st = d.terminate();
    assert!(st.success(), "exit after SIGTERM: {st}\n{}", d.stderr());
    // The socket file belongs to the service manager: the daemon leaves it in place.
    assert!(
        sock.exists(),
        "the daemon removed the activated socket's file"
    );
    assert!(!ctl.exists(), "control socket left behind");
}

/// Starts the daemon with `fd3` and checks that it exits with status 1 and says `want`.
fn refused(what: &str, fd3: RawFd, listen_fds: &str, pid: ListenPid, args: &[&str], want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut base = vec!["--heap", "a=memfd", "--shm-size", "64M"];
    base.extend_from_slice(args);
    let mut d = Activated::spawn(dir.path(), fd3, listen_fds, pid, &base);
    let st = d.wait_exit();
    let err = d.stderr();
    eprintln!("{what}: {st}; stderr:\n{err}");
    assert_eq!(
        st.code(),
        Some(1),
        "{what}: exit status {st} ({:?})",
        st.signal()
    );
    assert!(err.contains(want), "{what}: stderr lacks {want:?}:\n{err}");
}

#[test]
fn a_passed_fd_that_is_no_listening_unix_socket_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let null = File::open("/dev/null").unwrap();
    refused(
        "/dev/null on fd 3",
        null.as_raw_fd(),
        "1",
        ListenPid::Daemon,
        &[],
        "fd 3 passed by the service manager (LISTEN_FDS) is not a socket",
    );

    // What a socket unit with Accept=yes passes: a connection, not a listener.
    let l = UnixListener::bind(dir.path().join("l")).unwrap();
    let conn = UnixStream::connect(dir.path().join("l")).unwrap();
    refused(
        "a connected socket on fd 3",
        conn.as_raw_fd(),
        "1",
        ListenPid::Daemon,
        &[],
        "is not listening (a connection: the .socket unit needs Accept=no)",
    );
    drop(l);

    let l = UnixListener::bind(dir.path().join("l2")).unwrap();
    refused(
        "LISTEN_FDS=2",
        l.as_raw_fd(),
        "2",
        ListenPid::Daemon,
        &[],
        "LISTEN_FDS=2: the daemon takes exactly one socket",
    );
    refused(
        "activation and --socket-path",
        l.as_raw_fd(),
        "1",
        ListenPid::Daemon,
        &["--socket-path", dir.path().join("other").to_str().unwrap()],
        "the service manager passed a socket",
    );
    // Variables for another process are ignored: then a socket option is needed.
    refused(
        "LISTEN_PID of another process",
        l.as_raw_fd(),
        "1",
        ListenPid::Other,
        &[],
        "exactly one of --socket-path and --socket-fd is required",
    );
}
