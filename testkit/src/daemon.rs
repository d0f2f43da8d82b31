//! The daemon under test as a child process, and clients of its control socket.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long to wait for anything the daemon should do at once.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A test still holding its daemon after this long is hung (e.g. in a vhost-user call
/// that never returns): the watchdog kills the daemon, which fails the blocked call.
pub const WATCHDOG: Duration = Duration::from_secs(120);

/// Path of the daemon binary: `$DMAHEAP_DAEMON_BIN`, else the one cargo built next to the
/// running test or bench (`target/<profile>/deps/<test>` -> `target/<profile>/`; cargo
/// builds a package's binaries for its integration tests and benches).
pub fn daemon_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("DMAHEAP_DAEMON_BIN") {
            return p;
        }
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in target/<profile>/deps");
        dir.join("vhost-user-dmaheap")
            .to_string_lossy()
            .into_owned()
    })
}

/// The fd number the listening vhost-user socket gets in the child.
const CHILD_SOCKET_FD: RawFd = 3;

/// Options for [`Daemon::spawn`].
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    args: Vec<String>,
    control_debug: bool,
    gated_stderr: bool,
    log_level: Option<String>,
}

impl DaemonBuilder {
    /// Adds daemon arguments (e.g. `["--heap", "a=memfd"]`).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|s| s.as_ref().to_owned()));
        self
    }

    /// Starts the daemon without `--control-debug`.
    pub fn no_control_debug(mut self) -> Self {
        self.control_debug = false;
        self
    }

    /// RUST_LOG for the daemon (default: $RUST_LOG, else debug).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.to_owned());
        self
    }

    /// Sends the daemon's stderr through a pipe the test can stop draining
    /// ([`Daemon::block_stderr`]): the daemon's next log line then blocks the thread that
    /// writes it, which holds that thread at a known point.
    pub fn gated_stderr(mut self) -> Self {
        self.gated_stderr = true;
        self
    }

    /// Starts the daemon on a pre-bound listening socket handed over with `--socket-fd`
    /// (no start-up race: connecting succeeds as soon as the socket exists, which is
    /// before the child runs).
    pub fn spawn(self) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("dmaheap-it-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("vhost-user.sock");
        let control = dir.path().join("control.sock");
        let stderr_path = dir.path().join("daemon.stderr");
        let listener = UnixListener::bind(&socket).unwrap();
        let listen_fd = listener.as_raw_fd();

        let mut args = vec![
            "--socket-fd".to_owned(),
            CHILD_SOCKET_FD.to_string(),
            "--control-socket".to_owned(),
            control.display().to_string(),
        ];
        if self.control_debug {
            args.push("--control-debug".to_owned());
        }
        args.extend(self.args);

        let (stderr_target, gate) = if self.gated_stderr {
            let (gate, child_end) = StderrGate::new(File::create(&stderr_path).unwrap());
            (Stdio::from(child_end), Some(gate))
        } else {
            (Stdio::from(File::create(&stderr_path).unwrap()), None)
        };
        let mut cmd = Command::new(daemon_bin());
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("daemon.stdout")).unwrap())
            .stderr(stderr_target)
            .env(
                "RUST_LOG",
                self.log_level
                    .clone()
                    .or_else(|| std::env::var("RUST_LOG").ok())
                    .unwrap_or_else(|| "debug".to_owned()),
            );
        // SAFETY: the closure runs in the forked child before exec and only calls dup2 and
        // fcntl, which are async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if listen_fd == CHILD_SOCKET_FD {
                    let flags = libc::fcntl(listen_fd, libc::F_GETFD);
                    if flags < 0
                        || libc::fcntl(listen_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(listen_fd, CHILD_SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // The child holds its own copy now.
        drop(listener);
        let reaped = Arc::new(Mutex::new(false));
        let pid = child.id() as libc::pid_t;
        spawn_killer(
            pid,
            Arc::clone(&reaped),
            Arc::new(AtomicBool::new(false)),
            WATCHDOG,
            format!("watchdog: test still running after {WATCHDOG:?}"),
        );
        eprintln!(
            "daemon pid {}: {} {}",
            child.id(),
            daemon_bin(),
            args.join(" ")
        );
        Daemon {
            child: Some(child),
            reaped,
            gate,
            socket,
            control,
            stderr_path,
            dir,
        }
    }
}

/// A running daemon. Killed on drop; its stderr is printed if the test is failing.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// Set (under the lock) before the child is reaped; see the watchdog.
    reaped: Arc<Mutex<bool>>,
    gate: Option<StderrGate>,
    socket: PathBuf,
    control: PathBuf,
    stderr_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            args: Vec::new(),
            control_debug: true,
            gated_stderr: false,
            log_level: None,
        }
    }

    /// Starts the daemon with these extra arguments (and `--control-debug`).
    pub fn spawn<I, S>(args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder().args(args).spawn()
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn control_path(&self) -> &Path {
        &self.control
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Stops draining the daemon's stderr and fills the pipe: the next log line the daemon
    /// writes blocks its thread until [`Daemon::unblock_stderr`]. Needs `gated_stderr`.
    pub fn block_stderr(&self) {
        self.gate.as_ref().expect("not gated_stderr").block();
    }

    /// Drains the daemon's stderr again.
    pub fn unblock_stderr(&self) {
        self.gate.as_ref().expect("not gated_stderr").unblock();
    }

    /// Kills the daemon if the returned guard is still alive after `timeout`: for calls that
    /// would block forever if the daemon deadlocks (vhost-user calls have no timeout).
    pub fn kill_if_stuck(&self, what: &str, timeout: Duration) -> StuckGuard {
        let cancel = Arc::new(AtomicBool::new(false));
        spawn_killer(
            self.pid() as libc::pid_t,
            Arc::clone(&self.reaped),
            Arc::clone(&cancel),
            timeout,
            format!("{what}: still blocked after {timeout:?} (daemon deadlocked?)"),
        );
        StuckGuard(cancel)
    }

    /// True if the daemon process has ended (without reaping it).
    pub fn has_exited(&self) -> bool {
        let Some(child) = self.child.as_ref() else {
            return true;
        };
        // SAFETY: siginfo_t is plain data; waitid with WNOWAIT only inspects our own child
        // and leaves it to be reaped by Child::wait later.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            rc == 0 && info.si_pid() != 0
        }
    }

    /// Panics (with the daemon's stderr) if the daemon has exited.
    pub fn assert_alive(&mut self) {
        let child = self.child.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("daemon exited unexpectedly: {status}");
        }
    }

    /// Waits until the daemon is up (its control socket answers `stats`): from then on
    /// its signal handling is in place.
    pub fn wait_ready(&self) {
        let _ = self.stats();
    }

    /// Waits (with a deadline) until the daemon is either up (true) or has exited (false).
    pub fn up_or_exited(&self) -> bool {
        let start = Instant::now();
        loop {
            if UnixStream::connect(&self.control).is_ok() {
                return true;
            }
            if self.has_exited() {
                return false;
            }
            assert!(start.elapsed() < DEADLINE, "daemon neither up nor exited");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reaps the daemon (which must have exited or be about to) and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let mut reaped = self.reaped.lock().unwrap();
        *reaped = true;
        child.wait().unwrap()
    }

    /// Sends SIGTERM (once the daemon is ready) and waits, with a deadline, for the exit
    /// status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.wait_ready();
        let mut child = self.child.take().unwrap();
        let mut reaped = self.reaped.lock().unwrap();
        *reaped = true;
        // SAFETY: kill() on our own child's pid, which has not been reaped yet.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit within {DEADLINE:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one command line to the control socket and returns the whole reply.
    /// Retries connecting until the deadline: the daemon creates the socket at start-up.
    pub fn control(&self, command: &str) -> String {
        let start = Instant::now();
        let mut stream = loop {
            match UnixStream::connect(&self.control) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < DEADLINE => {
                    assert!(
                        !self.has_exited(),
                        "daemon exited; control socket {}: {e}",
                        self.control.display()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!(
                    "cannot connect to control socket {}: {e}",
                    self.control.display()
                ),
            }
        };
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .unwrap_or_else(|e| panic!("control {command:?}: reading reply: {e}"));
        reply
    }

    /// The `stats` control command, parsed.
    pub fn stats(&self) -> Stats {
        let reply = self.control("stats");
        Stats::parse(&reply)
    }

    /// Polls `stats` until `pred` holds or the deadline passes; returns the last stats.
    pub fn wait_stats(&self, what: &str, pred: impl Fn(&Stats) -> bool) -> Stats {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "stats never reached {what}; last stats: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `peek ID OFF LEN`: the host buffer's bytes.
    pub fn peek(&self, id: u64, off: u64, len: u64) -> Vec<u8> {
        let reply = self.control(&format!("peek {id} {off} {len}"));
        let hex: String = reply.chars().filter(|c| !c.is_whitespace()).collect();
        decode_hex(&hex).unwrap_or_else(|| panic!("peek {id} {off} {len}: reply {reply:?}"))
    }

    /// `poke ID OFF HEX`: writes bytes into the host buffer.
    pub fn poke(&self, id: u64, off: u64, bytes: &[u8]) {
        let reply = self.control(&format!("poke {id} {off} {}", encode_hex(bytes)));
        assert!(
            !reply.trim_start().starts_with("error"),
            "poke {id} {off}: reply {reply:?}"
        );
    }

    /// Runs the daemon binary as a client (`stats ...`, `ctl ...`).
    pub fn run_client(&self, args: &[&str]) -> Output {
        Command::new(daemon_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        *reaped = true;
        if let Some(mut child) = self.child.take() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_none() {
                let _ = child.kill();
            }
            let status = child.wait();
            if let Some(gate) = self.gate.take() {
                gate.finish();
            }
            if std::thread::panicking() {
                eprintln!(
                    "---- daemon (pid {}) {}; stderr ----\n{}---- end of daemon stderr ----",
                    child.id(),
                    match exited {
                        Some(s) if s.signal() == Some(libc::SIGSYS) => format!(
                            "had exited by itself: {s} (seccomp: a system call outside the \
                             allowlist)"
                        ),
                        Some(s) => format!("had exited by itself: {s}"),
                        None => format!("killed by the test ({status:?})"),
                    },
                    self.stderr()
                );
            }
        } else if std::thread::panicking() {
            eprintln!(
                "---- daemon stderr ----\n{}---- end of daemon stderr ----",
                self.stderr()
            );
        }
    }
}

pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Per-heap (or total) counters of the `stats` command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: u64,
    pub buffers: u64,
    pub mappings: u64,
    /// Live buffers with a UUID.
    pub exported: u64,
    /// Buffers freed by the guest but held for importers (counted in `buffers`).
    pub retained_buffers: u64,
    /// Their bytes (counted in `bytes`).
    pub retained_bytes: u64,
}

/// The parsed reply of `stats`.
#[derive(Debug, Clone)]
pub struct Stats {
    pub heaps: std::collections::BTreeMap<String, Counters>,
    pub total: Counters,
    /// `open`, `suspended`, `closed` or `implicit`.
    pub session: String,
    pub reserved_bytes: u64,
    pub raw: String,
}

impl Stats {
    /// Parses the JSON reply: heap name -> {bytes, buffers, mappings}, plus totals.
    pub fn parse(reply: &str) -> Stats {
        let v: serde_json::Value = serde_json::from_str(reply)
            .unwrap_or_else(|e| panic!("stats reply is not JSON ({e}): {reply:?}"));
        let counters = |c: &serde_json::Value| -> Option<Counters> {
            Some(Counters {
                bytes: c.get("bytes")?.as_u64()?,
                buffers: c.get("buffers")?.as_u64()?,
                mappings: c.get("mappings")?.as_u64()?,
                exported: c.get("exported")?.as_u64()?,
                retained_buffers: c.get("retained_buffers")?.as_u64()?,
                retained_bytes: c.get("retained_bytes")?.as_u64()?,
            })
        };
        let heaps_v = v
            .get("heaps")
            .unwrap_or_else(|| panic!("stats reply has no \"heaps\": {reply}"));
        let mut heaps = std::collections::BTreeMap::new();
        match heaps_v {
            serde_json::Value::Object(m) => {
                for (name, c) in m {
                    let c = counters(c)
                        .unwrap_or_else(|| panic!("stats: bad counters for {name}: {reply}"));
                    heaps.insert(name.clone(), c);
                }
            }
            serde_json::Value::Array(a) => {
                for h in a {
                    let name = h
                        .get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or_else(|| panic!("stats: heap without a name: {reply}"));
                    let c = counters(h)
                        .unwrap_or_else(|| panic!("stats: bad counters for {name}: {reply}"));
                    heaps.insert(name.to_owned(), c);
                }
            }
            _ => panic!("stats: unexpected \"heaps\": {reply}"),
        }
        let total = v
            .get("total")
            .or_else(|| v.get("totals"))
            .and_then(counters)
            .unwrap_or_else(|| panic!("stats reply has no totals: {reply}"));
        let session = v
            .get("session")
            .and_then(|s| s.as_str())
            .unwrap_or_else(|| panic!("stats reply has no session: {reply}"))
            .to_owned();
        let reserved_bytes = v
            .get("reserved_bytes")
            .and_then(|s| s.as_u64())
            .unwrap_or_else(|| panic!("stats reply has no reserved_bytes: {reply}"));
        Stats {
            heaps,
            total,
            session,
            reserved_bytes,
            raw: reply.to_owned(),
        }
    }

    pub fn heap(&self, name: &str) -> Counters {
        *self
            .heaps
            .get(name)
            .unwrap_or_else(|| panic!("stats has no heap {name:?}: {}", self.raw))
    }
}

/// The daemon's stderr pipe and the thread that copies it to the log file.
#[derive(Debug)]
struct StderrGate {
    read_end: Arc<std::os::fd::OwnedFd>,
    /// A writing end of our own (a separate open file description, non-blocking) to fill
    /// the pipe with.
    filler: File,
    state: Arc<Mutex<GateState>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct GateState {
    blocked: bool,
    /// The copier saw `blocked` and stopped reading.
    idle: bool,
    /// Filler bytes at the head of the pipe, not to be copied to the log.
    skip: usize,
    stop: bool,
}

impl StderrGate {
    /// Returns the gate and the pipe end for the child's stderr.
    fn new(mut log: File) -> (StderrGate, std::os::fd::OwnedFd) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array; checked below.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read_end, write_end) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // SAFETY: fcntl on a descriptor we own; a small pipe is quick to fill.
        unsafe {
            libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 4096);
        }
        let filler = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", fds[1]))
            .unwrap();
        let read_end = Arc::new(read_end);
        let state = Arc::new(Mutex::new(GateState::default()));
        let (r, st) = (Arc::clone(&read_end), Arc::clone(&state));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                {
                    let mut g = st.lock().unwrap();
                    if g.stop {
                        return;
                    }
                    g.idle = g.blocked;
                    if g.blocked {
                        drop(g);
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                }
                let mut pfd = libc::pollfd {
                    fd: r.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, 10) };
                if n <= 0 {
                    continue;
                }
                // SAFETY: reads into a buffer we own, of its length.
                let got = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if got <= 0 {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let mut data = &buf[..got as usize];
                let mut g = st.lock().unwrap();
                if g.skip > 0 {
                    let n = g.skip.min(data.len());
                    g.skip -= n;
                    data = &data[n..];
                    if g.skip == 0 {
                        let _ = log.write_all(b"[test: the daemon's stderr was stopped here]\n");
                    }
                }
                drop(g);
                let _ = log.write_all(data);
            }
        });
        (
            StderrGate {
                read_end,
                filler,
                state,
                thread: Some(thread),
            },
            write_end,
        )
    }

    fn block(&self) {
        self.state.lock().unwrap().blocked = true;
        let start = Instant::now();
        while !self.state.lock().unwrap().idle {
            assert!(start.elapsed() < DEADLINE, "stderr copier did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Fill the pipe to the last byte.
        let mut filler = &self.filler;
        let mut filled = 0;
        let chunk = [b'.'; 512];
        while let Ok(n @ 1..) = filler.write(&chunk) {
            filled += n;
        }
        while let Ok(n @ 1..) = filler.write(b".") {
            filled += n;
        }
        self.state.lock().unwrap().skip += filled;
    }

    fn unblock(&self) {
        let mut g = self.state.lock().unwrap();
        g.blocked = false;
        g.idle = false;
    }

    /// Copies what is left and stops the copier.
    fn finish(mut self) {
        self.unblock();
        // Give the copier a moment to drain the pipe, then stop it.
        std::thread::sleep(Duration::from_millis(30));
        self.state.lock().unwrap().stop = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = &self.read_end;
    }
}

/// See [`Daemon::kill_if_stuck`]; dropping it cancels the kill.
#[derive(Debug)]
pub struct StuckGuard(Arc<AtomicBool>);

impl Drop for StuckGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// After `timeout`, unless cancelled or reaped, SIGKILLs the daemon.
fn spawn_killer(
    pid: libc::pid_t,
    reaped: Arc<Mutex<bool>>,
    cancel: Arc<AtomicBool>,
    timeout: Duration,
    msg: String,
) {
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if cancel.load(Ordering::SeqCst) || *reaped.lock().unwrap_or_else(|e| e.into_inner()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let reaped = reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped && !cancel.load(Ordering::SeqCst) {
            eprintln!("{msg}: killing daemon {pid}");
            // SAFETY: kill() of our child, which cannot have been reaped (and its pid
            // reused) while we hold the lock that Daemon::drop takes before reaping.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    });
}
