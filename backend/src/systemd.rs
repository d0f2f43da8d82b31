//! Socket activation the systemd way (`sd_listen_fds(3)`): a service manager that bound
//! and listens on the vhost-user socket passes it as fd 3 and says so in the environment
//! (`LISTEN_PID` = our pid, `LISTEN_FDS` = 1, optionally `LISTEN_FDNAMES`). The daemon then
//! uses fd 3 exactly as it would `--socket-fd 3`.
//!
//! [`take_from_env`] reads and unsets the variables (so that nothing started later sees a
//! stale `LISTEN_PID`); [`check_listening`] makes sure the fd is what the protocol
//! promises: a listening `AF_UNIX` stream socket (not, e.g., a connection handed over by a
//! socket unit with `Accept=yes`).

use std::os::fd::{BorrowedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// The first passed fd (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The environment variables of the protocol.
pub const VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// A socket passed by the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// Its fd (always [`LISTEN_FDS_START`]).
    pub fd: RawFd,
    /// Its name from `LISTEN_FDNAMES` (`FileDescriptorName=` of the socket unit), if any.
    pub name: Option<String>,
}

/// Errors in the activation environment or the passed socket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    /// `LISTEN_PID` is not a pid.
    #[error("LISTEN_PID={0:?} is not a process id")]
    Pid(String),
    /// `LISTEN_FDS` missing or not a number although `LISTEN_PID` names us.
    #[error("LISTEN_PID names this process but LISTEN_FDS={0:?} is not a number of fds")]
    Count(String),
    /// Not exactly one fd.
    #[error(
        "LISTEN_FDS={0}: the daemon takes exactly one socket from the service manager (the \
         vhost-user socket; one ListenStream= in the .socket unit)"
    )]
    NotOne(u32),
    /// Passed fd not usable.
    #[error("fd {fd} passed by the service manager (LISTEN_FDS) {why}")]
    Socket {
        /// The fd.
        fd: RawFd,
        /// What is wrong with it.
        why: &'static str,
        /// The failed call, if one failed.
        #[source]
        source: Option<nix::Error>,
    },
}

/// Interprets the protocol's variables for a process with pid `our_pid`. `Ok(None)`: no
/// socket is meant for us (no `LISTEN_PID`, or another process's: e.g. a parent that was
/// itself activated and did not clean up).
pub fn parse(
    our_pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
) -> Result<Option<Activation>, ActivationError> {
    let Some(pid) = listen_pid else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::Pid(pid.to_owned()))?;
    if pid != our_pid {
        return Ok(None);
    }
    let count_str = listen_fds.unwrap_or_default();
    let count: u32 = count_str
        .trim()
        .parse()
        .map_err(|_| ActivationError::Count(count_str.to_owned()))?;
    if count != 1 {
        return Err(ActivationError::NotOne(count));
    }
    // One name per fd, colon-separated; "unknown" when the unit set none.
    let name = names
        .and_then(|n| n.split(':').next())
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    Ok(Some(Activation {
        fd: LISTEN_FDS_START,
        name,
    }))
}

/// Reads the activation variables and removes them from the environment (whether or not
/// they were meant for us, as `sd_listen_fds(1)` does). Call while the process has one
/// thread: changing the environment is not thread-safe.
pub fn take_from_env() -> Result<Option<Activation>, ActivationError> {
    let [pid, fds, names] = VARS.map(|v| std::env::var(v).ok());
    for v in VARS {
        std::env::remove_var(v);
    }
    parse(
        std::process::id(),
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
    )
}

/// Checks that `fd` is a listening `AF_UNIX` stream socket and marks it close-on-exec (the
/// service manager passes it inheritable).
pub fn check_listening(fd: RawFd) -> Result<(), ActivationError> {
    let bad = |why, source| ActivationError::Socket { fd, why, source };
    // SAFETY: only borrowed for the checks below; an fd that is not open makes them fail
    // with EBADF, which is reported.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let ty = getsockopt(&borrowed, sockopt::SockType)
        .map_err(|e| bad("is not a socket (or not open)", Some(e)))?;
    if ty != SockType::Stream {
        return Err(bad(
            "is not a stream socket (ListenStream= is needed)",
            None,
        ));
    }
    let addr: SockaddrStorage =
        getsockname(fd).map_err(|e| bad("has no address (getsockname failed)", Some(e)))?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(bad(
            "is not a Unix socket (ListenStream= needs a path, vhost-user passes fds)",
            None,
        ));
    }
    let listening = getsockopt(&borrowed, sockopt::AcceptConn)
        .map_err(|e| bad("cannot be queried (SO_ACCEPTCONN)", Some(e)))?;
    if !listening {
        return Err(bad(
            "is not listening (a connection: the .socket unit needs Accept=no)",
            None,
        ));
    }
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| bad("cannot be made close-on-exec", Some(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

    #[test]
    fn not_for_us() {
        assert_eq!(parse(100, None, None, None), Ok(None));
        assert_eq!(parse(100, None, Some("1"), None), Ok(None));
        assert_eq!(parse(100, Some("99"), Some("1"), None), Ok(None));
    }

    #[test]
    fn one_socket() {
        let a = parse(100, Some("100"), Some("1"), None).unwrap().unwrap();
        assert_eq!(a, Activation { fd: 3, name: None });
        let a = parse(7, Some("7"), Some("1"), Some("vm1:extra"))
            .unwrap()
            .unwrap();
        assert_eq!(a.name.as_deref(), Some("vm1"));
        assert_eq!(
            parse(7, Some("7"), Some("1"), Some(""))
                .unwrap()
                .unwrap()
                .name,
            None
        );
    }

    #[test]
    fn bad_environment() {
        assert_eq!(
            parse(7, Some("seven"), Some("1"), None),
            Err(ActivationError::Pid("seven".into()))
        );
        assert_eq!(
            parse(7, Some("7"), None, None),
            Err(ActivationError::Count(String::new()))
        );
        assert_eq!(
            parse(7, Some("7"), Some("x"), None),
            Err(ActivationError::Count("x".into()))
        );
        for n in ["0", "2"] {
            let e = parse(7, Some("7"), Some(n), None).unwrap_err();
            assert!(e.to_string().contains("exactly one socket"), "{e}");
        }
    }

    /// Runs in a child process started by `take_from_env_unsets_the_variables` (does
    /// nothing in a normal test run): the environment is the process's own there.
    #[test]
    fn take_from_env_child() {
        let Ok(want) = std::env::var("DMAHEAP_SYSTEMD_PROBE") else {
            return;
        };
        // The parent cannot know our pid before the fork: it says which case to expect.
        if want == "ours" {
            std::env::set_var("LISTEN_PID", std::process::id().to_string());
        }
        let got = take_from_env().unwrap();
        for v in VARS {
            assert_eq!(std::env::var_os(v), None, "{v} still set");
        }
        match want.as_str() {
            "ours" => assert_eq!(got.unwrap().name.as_deref(), Some("vm1")),
            _ => assert_eq!(got, None),
        }
    }

    #[test]
    fn take_from_env_unsets_the_variables() {
        for (probe, pid) in [("ours", "0"), ("other", "1")] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "systemd::tests::take_from_env_child"])
                .args(["--test-threads=1", "--nocapture"])
                .env("DMAHEAP_SYSTEMD_PROBE", probe)
                .env("LISTEN_PID", pid)
                .env("LISTEN_FDS", "1")
                .env("LISTEN_FDNAMES", "vm1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{probe}: {:?}\n{text}", out.status);
            assert!(
                text.contains("1 passed"),
                "{probe}: child ran no test:\n{text}"
            );
        }
    }

    #[test]
    fn checks_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("l")).unwrap();
        check_listening(l.as_raw_fd()).unwrap();
        let cloexec = nix::fcntl::fcntl(&l, FcntlArg::F_GETFD).unwrap();
        assert_ne!(cloexec & libc::FD_CLOEXEC, 0);

        let c = UnixStream::connect(dir.path().join("l")).unwrap();
        let e = check_listening(c.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("Accept=no"), "{e}");

        let d = UnixDatagram::unbound().unwrap();
        let e = check_listening(d.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a stream socket"), "{e}");

        let t = nix::sys::socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let e = check_listening(t.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a Unix socket"), "{e}");

        let f = std::fs::File::open("/dev/null").unwrap();
        let e = check_listening(f.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
