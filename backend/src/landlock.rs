//! A Landlock ruleset that takes away the file system after start-up.
//!
//! The ruleset handles every file system access right of the running kernel's Landlock ABI
//! (as far as this code knows them: ABI 1 to 11) and grants none of them, except
//! `LANDLOCK_ACCESS_FS_REMOVE_FILE` beneath the directories of the sockets the daemon
//! removes at exit. It closes the hole the seccomp filter leaves for shared memfd buffers
//! (`openat(<O_PATH fd of /proc/self/fd>, "N", O_RDWR | O_CLOEXEC)`, see
//! `core::release_watch`): seccomp cannot check the name, so `"../root/PATH"` would open any
//! file the daemon's user may write. Landlock checks the file that is finally opened: a
//! memfd lives on the kernel's internal shmem mount (`SB_NOUSER`), which Landlock never
//! restricts, so reopening it keeps working, while any file on a real file system is denied
//! (EACCES). Files opened before (heaps, `/dev/udmabuf`, `/proc/self/fdinfo/N`) keep
//! working: Landlock checks rights when a file is opened, not when it is used.
//!
//! Landlock restricts the calling thread and the threads it creates from then on. With
//! `LANDLOCK_RESTRICT_SELF_TSYNC` (Landlock ABI 8: kernels after 6.18) the ruleset is
//! applied to every thread of the process at once. Without it, [`Ruleset::restrict_self`]
//! refuses to run while the process has more than one thread, so the caller must apply it
//! before it starts any thread: the daemon does so on its main thread after the last
//! start-up open and before it spawns its helper threads (see `daemon::run`). Every thread
//! of the daemon then descends from a restricted main thread. This ordering is checked at
//! run time rather than assumed, and is simpler than applying the ruleset at the start of
//! each thread.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

// From <linux/landlock.h> (libc has the system call numbers only).
const CREATE_RULESET_VERSION: libc::c_uint = 1 << 0;
const RESTRICT_SELF_TSYNC: libc::c_uint = 1 << 3;
const RULE_PATH_BENEATH: libc::c_int = 1;

/// `LANDLOCK_ACCESS_FS_REMOVE_FILE`: unlink a file (not a directory) in a directory.
pub const ACCESS_FS_REMOVE_FILE: u64 = 1 << 5;
const ACCESS_FS_REFER: u64 = 1 << 13;
const ACCESS_FS_TRUNCATE: u64 = 1 << 14;
const ACCESS_FS_IOCTL_DEV: u64 = 1 << 15;
const ACCESS_FS_RESOLVE_UNIX: u64 = 1 << 16;

/// The first Landlock ABI with `LANDLOCK_RESTRICT_SELF_TSYNC`.
pub const ABI_TSYNC: u32 = 8;

/// `struct landlock_ruleset_attr`, up to its first member: the kernel accepts any size from
/// there on (later members are network rights and scopes, which this ruleset leaves alone).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's header too).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Landlock errors.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The kernel has no Landlock (not built: ENOSYS; disabled at boot: EOPNOTSUPP), or a
    /// system call filter of the caller denies it (EPERM, e.g. an older systemd's
    /// `SystemCallFilter=@system-service`).
    #[error("the kernel has no Landlock, or a system call filter hides it")]
    Unsupported(#[source] io::Error),
    /// Querying the ABI or creating the ruleset failed otherwise.
    #[error("cannot create a Landlock ruleset")]
    Create(#[source] io::Error),
    /// A directory of a rule could not be opened.
    #[error("cannot open {path:?} for a Landlock rule")]
    OpenDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Adding a rule failed.
    #[error("cannot add a Landlock rule for {path:?}")]
    AddRule {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Counting the process's threads failed.
    #[error("cannot count the threads of this process")]
    CountThreads(#[source] io::Error),
    /// Other threads run already and the kernel cannot restrict them (no TSYNC).
    #[error(
        "{count} threads run already, and Landlock ABI {abi} cannot restrict the others \
         (LANDLOCK_RESTRICT_SELF_TSYNC needs ABI {ABI_TSYNC}): apply the ruleset before \
         starting threads"
    )]
    Threads {
        /// Threads of the process.
        count: usize,
        /// The kernel's Landlock ABI.
        abi: u32,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    /// `landlock_restrict_self` failed.
    #[error("cannot enforce the Landlock ruleset")]
    Restrict(#[source] io::Error),
}

impl LandlockError {
    /// Whether the kernel simply has no Landlock (best effort: carry on without it).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Unsupported(_))
    }
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The running kernel's Landlock ABI version.
pub fn abi_version() -> Result<u32, LandlockError> {
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION the attribute pointer must be NULL and
    // its size 0; the kernel reads nothing and returns a number.
    let r = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    });
    match r {
        Ok(v) => {
            u32::try_from(v).map_err(|_| LandlockError::Create(io::ErrorKind::InvalidData.into()))
        }
        // EPERM never comes from Landlock itself for this query: from a seccomp filter.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
            ) =>
        {
            Err(LandlockError::Unsupported(e))
        }
        Err(e) => Err(LandlockError::Create(e)),
    }
}

/// Every file system access right Landlock ABI `abi` has (that this code knows).
pub fn handled_fs(abi: u32) -> u64 {
    // ABI 1: EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE, MAKE_CHAR,
    // MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM.
    let mut access = (1 << 13) - 1;
    if abi >= 2 {
        access |= ACCESS_FS_REFER;
    }
    if abi >= 3 {
        access |= ACCESS_FS_TRUNCATE;
    }
    if abi >= 5 {
        access |= ACCESS_FS_IOCTL_DEV;
    }
    if abi >= 9 {
        access |= ACCESS_FS_RESOLVE_UNIX;
    }
    access
}

/// How a ruleset was enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enforced {
    /// The kernel's Landlock ABI.
    pub abi: u32,
    /// Applied to every thread of the process at once (TSYNC); otherwise to the calling
    /// thread, then the only one, and the threads it starts later.
    pub all_threads: bool,
}

/// A ruleset built but not yet enforced: build it while the files its rules name can still
/// be opened, enforce it with [`Ruleset::restrict_self`].
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    abi: u32,
}

impl Ruleset {
    /// A ruleset that denies every file system access, except removing files beneath
    /// `removable_dirs`. [`LandlockError::Unsupported`] if the kernel has no Landlock.
    pub fn new(removable_dirs: &[&Path]) -> Result<Self, LandlockError> {
        let abi = abi_version()?;
        let attr = RulesetAttr {
            handled_access_fs: handled_fs(abi),
        };
        // SAFETY: `attr` is a live struct of the size passed; the kernel only reads it.
        let raw = check(unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0 as libc::c_uint,
            )
        })
        .map_err(LandlockError::Create)?;
        let raw = i32::try_from(raw)
            .map_err(|_| LandlockError::Create(io::ErrorKind::InvalidData.into()))?;
        // SAFETY: `raw` is a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ruleset = Self { fd, abi };
        for dir in removable_dirs {
            ruleset.allow_beneath(dir, ACCESS_FS_REMOVE_FILE)?;
        }
        Ok(ruleset)
    }

    fn allow_beneath(&self, dir: &Path, access: u64) -> Result<(), LandlockError> {
        let err = |source| LandlockError::AddRule {
            path: dir.to_path_buf(),
            source,
        };
        let parent = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(|source| LandlockError::OpenDir {
                path: dir.to_path_buf(),
                source,
            })?;
        let attr = PathBeneathAttr {
            allowed_access: access,
            parent_fd: parent.as_raw_fd(),
        };
        // SAFETY: both fds are open and `attr` is a live struct of the layout the kernel
        // expects for LANDLOCK_RULE_PATH_BENEATH; the kernel only reads it.
        check(unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0 as libc::c_uint,
            )
        })
        .map(|_| ())
        .map_err(err)
    }

    /// The kernel's Landlock ABI version.
    pub fn abi(&self) -> u32 {
        self.abi
    }

    /// Enforces the ruleset, for good: on every thread with TSYNC (ABI 8 and later),
    /// otherwise on the calling thread, which must then be the only thread of the process
    /// ([`LandlockError::Threads`] if not; nothing is enforced then). Sets `no_new_privs`
    /// (on the threads that get the ruleset), which Landlock requires.
    pub fn restrict_self(self) -> Result<Enforced, LandlockError> {
        let all_threads = self.abi >= ABI_TSYNC;
        if !all_threads {
            let count = std::fs::read_dir("/proc/self/task")
                .map_err(LandlockError::CountThreads)?
                .count();
            if count != 1 {
                return Err(LandlockError::Threads {
                    count,
                    abi: self.abi,
                });
            }
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(LandlockError::NoNewPrivs(io::Error::last_os_error()));
        }
        let flags = if all_threads { RESTRICT_SELF_TSYNC } else { 0 };
        // SAFETY: plain system call on our open ruleset fd.
        check(unsafe {
            libc::syscall(libc::SYS_landlock_restrict_self, self.fd.as_raw_fd(), flags)
        })
        .map_err(LandlockError::Restrict)?;
        Ok(Enforced {
            abi: self.abi,
            all_threads,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::ffi::CString;
    use std::io::{Read, Seek, Write};

    /// Runs `f` in a forked child process, which has one thread (the caller's): Landlock
    /// cannot be undone, and without TSYNC it needs a single-threaded process. Returns the
    /// child's wait status. Call it only in a process of its own (a re-executed test: see
    /// [`rerun`]), where no other thread holds a lock the child could need.
    pub(crate) fn in_forked_child(f: impl FnOnce()) -> libc::c_int {
        // SAFETY: the child runs `f` and then _exits; the test process it is forked from
        // runs one test only (`rerun`), so no other thread holds a lock `f` needs.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 101 }) };
        }
        let mut status = 0;
        // SAFETY: `status` is a live c_int; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid, "waitpid: {}", io::Error::last_os_error());
        status
    }

    /// Re-runs test `name` of this test binary in a process of its own, with `env` set
    /// to `value`; returns its output.
    pub(crate) fn rerun(name: &str, env: &str, value: &str) -> std::process::Output {
        let exe = std::env::current_exe().unwrap();
        std::process::Command::new(exe)
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(env, value)
            .output()
            .unwrap()
    }

    /// The kernel's Landlock ABI, or `None` (printing why) when it has no Landlock.
    pub(crate) fn landlock_abi() -> Option<u32> {
        match abi_version() {
            Ok(abi) => Some(abi),
            Err(e) if e.is_unsupported() => {
                println!("skipped: {e} ({:?})", std::error::Error::source(&e));
                None
            }
            Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
        }
    }

    fn errno_of(r: libc::c_int) -> Option<i32> {
        if r >= 0 {
            // SAFETY: `r` is an fd this test just opened and owns.
            unsafe { libc::close(r) };
            None
        } else {
            io::Error::last_os_error().raw_os_error()
        }
    }

    /// `openat(dir, name, flags)`; `None` if it opened, else the errno.
    pub(crate) fn openat_errno(dir: i32, name: &str, flags: libc::c_int) -> Option<i32> {
        let name = CString::new(name).unwrap();
        // SAFETY: plain openat with a NUL-terminated name; a new fd is closed at once.
        errno_of(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC) })
    }

    fn open_errno(path: &Path, flags: libc::c_int) -> Option<i32> {
        openat_errno(libc::AT_FDCWD, path.to_str().unwrap(), flags)
    }

    fn memfd(data: &[u8]) -> std::fs::File {
        let mut f = std::fs::File::from(
            nix::sys::memfd::memfd_create("landlock-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap(),
        );
        f.write_all(data).unwrap();
        f
    }

    fn proc_fd_dir() -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open("/proc/self/fd")
            .unwrap()
    }

    /// `../root/PATH` relative to `/proc/self/fd`: the escape the seccomp filter cannot see.
    pub(crate) fn via_proc_root(path: &Path) -> String {
        format!("../root{}", path.display())
    }

    #[test]
    fn handled_rights_grow_with_the_abi() {
        assert_eq!(handled_fs(1), 0x1fff);
        assert_eq!(handled_fs(2), 0x3fff);
        assert_eq!(handled_fs(3), 0x7fff);
        assert_eq!(handled_fs(4), 0x7fff);
        assert_eq!(handled_fs(5), 0xffff);
        assert_eq!(handled_fs(8), 0xffff);
        assert_eq!(handled_fs(9), 0x1ffff);
        assert_eq!(handled_fs(11), 0x1ffff);
        assert_eq!(
            handled_fs(12),
            handled_fs(11),
            "unknown rights are not claimed"
        );
        assert!(handled_fs(1) & ACCESS_FS_REMOVE_FILE != 0);
    }

    /// The memfd reopen of the release watch works under the ruleset; real files do not
    /// open, by any path; files opened before stay usable; only files beneath the removable
    /// directory can be removed.
    fn probe_files() {
        let Some(abi) = landlock_abi() else { return };
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let removable = dir.path().join("sockets");
        std::fs::create_dir(&removable).unwrap();
        std::fs::write(removable.join("sock"), b"").unwrap();
        let keep = dir.path().join("keep");
        std::fs::write(&keep, b"").unwrap();
        let procfd = proc_fd_dir();
        let procfd = procfd.as_raw_fd();
        let escape = via_proc_root(&secret);
        // Without Landlock the escape opens the file: what the ruleset must stop.
        assert_eq!(openat_errno(procfd, &escape, libc::O_RDWR), None);
        let mut before = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&secret)
            .unwrap();
        let memfd_before = memfd(b"before");

        let ruleset = Ruleset::new(&[removable.as_path()]).unwrap();
        assert_eq!(ruleset.abi(), abi);
        let enforced = ruleset.restrict_self().unwrap();
        assert_eq!(enforced.abi, abi);
        println!("enforced: {enforced:?}");

        // Memfds, made before and after, reopen read-write; the bytes are shared.
        for mut m in [memfd_before, memfd(b"after!")] {
            let name = m.as_raw_fd().to_string();
            let flags = libc::O_RDWR | libc::O_CLOEXEC;
            let c = CString::new(name).unwrap();
            // SAFETY: plain openat with a NUL-terminated name; the fd is owned below.
            let raw = unsafe { libc::openat(procfd, c.as_ptr(), flags) };
            assert!(raw >= 0, "memfd reopen: {}", io::Error::last_os_error());
            // SAFETY: `raw` is a new fd nobody else owns.
            let mut again = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
            again.write_all(b"shared").unwrap();
            let mut back = String::new();
            m.rewind().unwrap();
            m.read_to_string(&mut back).unwrap();
            assert_eq!(back, "shared");
            // The release watch watches the reopened file through /proc/self/fd/N.
            // SAFETY: plain system call; the fd is closed at once.
            let ino = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
            assert!(ino >= 0);
            let path = CString::new(format!("/proc/self/fd/{}", again.as_raw_fd())).unwrap();
            // SAFETY: open inotify fd and a NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(ino, path.as_ptr(), libc::IN_CLOSE_WRITE) };
            assert!(wd >= 0, "inotify_add_watch: {}", io::Error::last_os_error());
            // SAFETY: our inotify fd.
            unsafe { libc::close(ino) };
        }
        // The escape and every plain open of a real file fail with EACCES.
        for flags in [libc::O_RDWR, libc::O_RDONLY, libc::O_WRONLY] {
            assert_eq!(openat_errno(procfd, &escape, flags), Some(libc::EACCES));
            assert_eq!(open_errno(&secret, flags), Some(libc::EACCES));
        }
        assert_eq!(
            open_errno(Path::new("/dev/null"), libc::O_RDWR),
            Some(libc::EACCES)
        );
        assert_eq!(open_errno(dir.path(), libc::O_RDONLY), Some(libc::EACCES));
        let new = dir.path().join("new");
        assert_eq!(
            open_errno(&new, libc::O_RDWR | libc::O_CREAT),
            Some(libc::EACCES)
        );
        let e = std::fs::create_dir(dir.path().join("d")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        // A file opened before stays readable and writable.
        before.write_all(b"S").unwrap();
        let mut text = String::new();
        before.rewind().unwrap();
        before.read_to_string(&mut text).unwrap();
        assert_eq!(text, "Secret");
        // Files beneath the removable directory can be removed, others cannot.
        std::fs::remove_file(removable.join("sock")).unwrap();
        let e = std::fs::remove_file(&keep).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        assert!(keep.exists());
    }

    /// A thread that runs before the ruleset is enforced: with TSYNC it is restricted too;
    /// without, `restrict_self` refuses (so the daemon cannot forget such a thread).
    fn probe_earlier_thread() {
        let Some(abi) = landlock_abi() else { return };
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_path_buf();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let earlier = std::thread::spawn(move || {
            wait.recv().unwrap();
            open_errno(&path, libc::O_RDWR)
        });
        let ruleset = Ruleset::new(&[]).unwrap();
        match ruleset.restrict_self() {
            Ok(enforced) => {
                assert!(enforced.all_threads, "{enforced:?} with two threads");
                assert!(abi >= ABI_TSYNC);
                go.send(()).unwrap();
                assert_eq!(earlier.join().unwrap(), Some(libc::EACCES));
                println!("TSYNC: the earlier thread is restricted");
            }
            Err(LandlockError::Threads { count, abi: a }) => {
                assert!(abi < ABI_TSYNC, "ABI {abi} has TSYNC");
                assert_eq!((count, a), (2, abi));
                // Nothing was enforced.
                assert_eq!(open_errno(file.path(), libc::O_RDWR), None);
                go.send(()).unwrap();
                assert_eq!(earlier.join().unwrap(), None);
                println!("no TSYNC (ABI {abi}): refused with another thread running");
            }
            Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
        }
    }

    /// A thread started after the ruleset is restricted.
    fn probe_later_thread() {
        if landlock_abi().is_none() {
            return;
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_path_buf();
        Ruleset::new(&[]).unwrap().restrict_self().unwrap();
        let later = std::thread::spawn(move || open_errno(&path, libc::O_RDWR));
        assert_eq!(later.join().unwrap(), Some(libc::EACCES));
    }

    /// A kernel without Landlock (ENOSYS) or a filter that hides it (EPERM), made with a
    /// seccomp filter: unsupported, which the sandbox only warns about.
    fn probe_unavailable(errno: i32) {
        use seccompiler::{SeccompAction, SeccompFilter};
        let rules = [(libc::SYS_landlock_create_ruleset, Vec::new())].into();
        let arch = std::env::consts::ARCH.try_into().unwrap();
        let prog: seccompiler::BpfProgram = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .unwrap()
        .try_into()
        .unwrap();
        seccompiler::apply_filter(&prog).unwrap();
        assert!(abi_version().unwrap_err().is_unsupported());
        assert!(Ruleset::new(&[]).unwrap_err().is_unsupported());
        crate::sandbox::restrict(&crate::sandbox::Sandbox {
            seccomp: crate::sandbox::SeccompMode::Off,
            ..Default::default()
        })
        .unwrap()
        .install_filter()
        .unwrap();
        // Nothing was enforced.
        let file = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(open_errno(file.path(), libc::O_RDWR), None);
    }

    /// Runs in a process started by `ruleset_behaves_as_intended` (does nothing in a normal
    /// test run): each probe in a forked child of its own.
    #[test]
    fn probe_child() {
        if std::env::var("DMAHEAP_LANDLOCK_PROBE").is_err() {
            return;
        }
        for (name, probe) in [
            ("files", probe_files as fn()),
            ("earlier thread", probe_earlier_thread),
            ("later thread", probe_later_thread),
            ("no Landlock", || probe_unavailable(libc::ENOSYS)),
            ("hidden by a filter", || probe_unavailable(libc::EPERM)),
        ] {
            let status = in_forked_child(probe);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "probe {name}: wait status {status:#x}"
            );
        }
    }

    #[test]
    fn ruleset_behaves_as_intended() {
        let out = rerun(
            "landlock::tests::probe_child",
            "DMAHEAP_LANDLOCK_PROBE",
            "1",
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
        assert!(stdout.contains("1 passed"), "{stdout}");
        if stdout.contains("skipped:") {
            eprintln!("{stdout}");
        } else {
            assert!(stdout.contains("enforced: Enforced"), "{stdout}");
        }
    }
}
