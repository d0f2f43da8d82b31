//! Containment of the daemon after start-up: an optional drop to an unprivileged user, a
//! Landlock ruleset that takes the file system away ([`crate::landlock`]) and a seccomp-bpf
//! allowlist (seccompiler) on every thread.
//!
//! It comes in two steps, because Landlock (before its TSYNC flag, ABI 8) restricts only
//! the calling thread and the threads it starts later, while seccomp's TSYNC reaches every
//! thread:
//!
//! 1. [`restrict`] runs on the main thread after the last start-up open (heaps opened,
//!    vhost-user, control and export sockets bound, `/proc/self/fd` and fdinfo opened)
//!    and before any other thread starts: it switches the user (`--user`; the user
//!    database is read here, before Landlock) and enforces the Landlock ruleset (on every
//!    thread at once with TSYNC; otherwise it refuses to run if another thread exists).
//! 2. [`Restricted::install_filter`] runs once the helper threads (signals, control,
//!    export socket) run, before the first front end is accepted: it installs the seccomp
//!    filter with `SECCOMP_FILTER_FLAG_TSYNC`, so the threads that already exist get it
//!    too.
//!
//! From then on the daemon needs no new files, sockets or privileges: it only allocates
//! host buffers from the heap fds it already holds (memfd_create and ioctls on open fds),
//! serves the sockets it already has, and spawns threads (vhost-user-backend starts a
//! handler thread and one vring worker per connection, from the main thread; they inherit
//! the ruleset and the filter).
//!
//! The allowlist was derived by tracing the daemon (`strace -f`) through the integration
//! tests (`cargo test -p vhost-user-dmaheap`) and a QEMU guest, then checked with
//! `--seccomp=log` (every syscall outside the list shows up in the kernel log as an audit
//! record `type=1326 ... syscall=N`). See SECURITY.md.

use std::fmt;
use std::path::{Path, PathBuf};

use log::{info, warn};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the system call filter does with a call outside the allowlist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the daemon (default).
    #[default]
    On,
    /// Allow the call and log it to the kernel log (audit record `type=1326`).
    Log,
    /// No filter.
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// Containment settings (from `--seccomp` and `--user`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// System call filter mode.
    pub seccomp: SeccompMode,
    /// User (name or numeric uid) to switch to; `None`: keep the current one.
    pub user: Option<String>,
    /// An `O_PATH` fd of `/proc/self/fd` opened before the filter: `openat(fd, "N",
    /// O_RDWR | O_CLOEXEC)` on it stays allowed (the export of a shared memfd buffer is a
    /// reopened file, whose last close inotify reports; see `core::export`).
    pub reopen_dir: Option<i32>,
    /// Files the daemon removes at exit (its sockets): Landlock lets it remove files
    /// beneath their directories, and nothing else.
    pub removable: Vec<PathBuf>,
}

/// Sandbox errors.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `--user` names no user.
    #[error("no such user {0:?}")]
    NoUser(String),
    /// Looking the user up failed.
    #[error("cannot look up user {0:?}")]
    Lookup(String, #[source] nix::Error),
    /// setgroups/setgid/setuid failed.
    #[error("cannot switch to user {user:?} ({what})")]
    Switch {
        /// The user.
        user: String,
        /// The call that failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// After the switch, root could be regained.
    #[error("switched to user {0:?} but could regain root")]
    Regain(String),
    /// Building the filter failed.
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// Installing the filter failed.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    /// Building or enforcing the Landlock ruleset failed (a kernel without Landlock is not
    /// an error).
    #[error("Landlock")]
    Landlock(#[source] crate::landlock::LandlockError),
}

/// Step 1 of the containment (see the module documentation): drops privileges (if asked)
/// and enforces the Landlock ruleset, whatever the seccomp mode (it costs nothing: no
/// file is opened by name after start-up). Call once, on the main thread, after the last
/// start-up open and before starting any other thread. On a kernel without Landlock it
/// logs a warning and carries on.
pub fn restrict(cfg: &Sandbox) -> Result<Restricted, SandboxError> {
    // Built first: its rules open the socket directories, maybe as root.
    let dirs: Vec<&Path> = cfg
        .removable
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        })
        .collect();
    let ruleset = match crate::landlock::Ruleset::new(&dirs) {
        Ok(r) => Some(r),
        Err(e) if e.is_unsupported() => {
            let why = std::error::Error::source(&e).map(ToString::to_string);
            warn!(
                "{e} ({}): file access is not confined beyond the seccomp filter \
                 (see SECURITY.md)",
                why.unwrap_or_default()
            );
            None
        }
        Err(e) => return Err(SandboxError::Landlock(e)),
    };
    if let Some(user) = &cfg.user {
        drop_privileges(user)?;
    }
    if let Some(ruleset) = ruleset {
        let enforced = ruleset.restrict_self().map_err(SandboxError::Landlock)?;
        info!(
            "Landlock ruleset enforced (ABI {}, {}): no file system access",
            enforced.abi,
            if enforced.all_threads {
                "all threads"
            } else {
                "before any other thread started"
            }
        );
    }
    Ok(Restricted {
        seccomp: cfg.seccomp,
        reopen_dir: cfg.reopen_dir,
    })
}

/// Proof that [`restrict`] ran; step 2 is [`Restricted::install_filter`].
#[derive(Debug)]
#[must_use = "the seccomp filter is installed by install_filter"]
pub struct Restricted {
    seccomp: SeccompMode,
    reopen_dir: Option<i32>,
}

impl Restricted {
    /// Step 2 of the containment: installs the system call filter (unless off) on every
    /// thread. Call once, before the first front end is accepted.
    pub fn install_filter(self) -> Result<(), SandboxError> {
        if self.seccomp == SeccompMode::Off {
            warn!("seccomp filter disabled (--seccomp=off)");
            return Ok(());
        }
        for prog in filters_with(self.seccomp, self.reopen_dir)? {
            seccompiler::apply_filter_all_threads(&prog).map_err(SandboxError::Install)?;
        }
        info!(
            "seccomp filter installed on all threads ({} mode)",
            self.seccomp
        );
        Ok(())
    }
}

fn drop_privileges(user: &str) -> Result<(), SandboxError> {
    use nix::unistd::{setgid, setgroups, setuid, Uid, User};
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| SandboxError::Lookup(user.to_string(), e))?
    .ok_or_else(|| SandboxError::NoUser(user.to_string()))?;
    let err = |what| {
        move |source| SandboxError::Switch {
            user: user.to_string(),
            what,
            source,
        }
    };
    // Order matters: groups and gid while still privileged, uid last. glibc applies each
    // change to every thread of the process.
    setgroups(&[found.gid]).map_err(err("setgroups"))?;
    setgid(found.gid).map_err(err("setgid"))?;
    setuid(found.uid).map_err(err("setuid"))?;
    if !found.uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
        return Err(SandboxError::Regain(user.to_string()));
    }
    info!(
        "running as user {} (uid {}, gid {})",
        found.name, found.uid, found.gid
    );
    Ok(())
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
    #[cfg(target_arch = "riscv64")]
    {
        TargetArch::riscv64
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(SandboxError::Build)
}

fn cond32(arg: u8, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(SandboxError::Build)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conds).map_err(SandboxError::Build)
}

/// System calls allowed without conditions after start-up, with the reason.
fn plain_syscalls() -> Vec<(i64, &'static str)> {
    let mut v = vec![
        // Memory: heap, thread stacks, guest memory table, host maps of dma-bufs.
        (libc::SYS_brk, "allocator"),
        (
            libc::SYS_mmap,
            "allocator, guest memory regions, dma-buf host maps",
        ),
        (libc::SYS_munmap, "allocator, guest memory regions"),
        (libc::SYS_mremap, "allocator"),
        (libc::SYS_mprotect, "thread stack guards"),
        (libc::SYS_madvise, "allocator, thread exit"),
        // Threads and synchronisation.
        (libc::SYS_futex, "locks"),
        (libc::SYS_set_robust_list, "thread start"),
        (libc::SYS_rseq, "thread start"),
        (libc::SYS_sched_getaffinity, "thread start (glibc)"),
        (libc::SYS_sched_yield, "locks"),
        (
            libc::SYS_sigaltstack,
            "thread start/exit (Rust stack overflow handler)",
        ),
        (libc::SYS_rt_sigprocmask, "thread start, abort"),
        (libc::SYS_rt_sigaction, "Rust runtime per thread"),
        (libc::SYS_rt_sigreturn, "signal delivery"),
        (libc::SYS_rt_sigtimedwait, "signal thread"),
        (libc::SYS_restart_syscall, "interrupted sleeps"),
        (libc::SYS_gettid, "logging, abort"),
        (libc::SYS_getpid, "abort"),
        (libc::SYS_exit, "thread exit"),
        (libc::SYS_exit_group, "process exit"),
        (libc::SYS_nanosleep, "sleeps"),
        (libc::SYS_clock_nanosleep, "sleeps"),
        (libc::SYS_clock_gettime, "time (vDSO fallback)"),
        (libc::SYS_getrandom, "HashMap keys"),
        // Files and fds already open; memfd host buffers.
        (libc::SYS_read, "sockets, eventfds"),
        (libc::SYS_readv, "sockets"),
        (libc::SYS_write, "log, sockets, eventfds"),
        (libc::SYS_writev, "log, sockets"),
        (libc::SYS_pread64, "control peek (memfd)"),
        (libc::SYS_pwrite64, "zeroing and control poke (memfd)"),
        (libc::SYS_lseek, "files"),
        (libc::SYS_close, "fds"),
        (libc::SYS_dup, "fds"),
        (libc::SYS_newfstatat, "std File metadata"),
        (libc::SYS_fstat, "std File metadata"),
        (libc::SYS_statx, "std File metadata"),
        (libc::SYS_memfd_create, "memfd and udmabuf providers"),
        (libc::SYS_ftruncate, "memfd size"),
        (libc::SYS_fallocate, "memfd zeroing (punch hole)"),
        (libc::SYS_eventfd2, "vhost-user-backend per connection"),
        (
            libc::SYS_inotify_add_watch,
            "watching shared memfd buffers for their last close",
        ),
        (libc::SYS_inotify_rm_watch, "released shared memfd buffers"),
        (libc::SYS_epoll_create1, "vhost-user-backend per connection"),
        (libc::SYS_epoll_ctl, "vhost-user-backend event loop"),
        (libc::SYS_epoll_pwait, "vhost-user-backend event loop"),
        (
            libc::SYS_timerfd_settime,
            "the vring worker's timer (created before)",
        ),
        (libc::SYS_timerfd_gettime, "the vring worker's timer"),
        (libc::SYS_ppoll, "poll"),
        // Sockets already bound: accept and talk, never create, bind or connect.
        (libc::SYS_accept4, "vhost-user and control sockets"),
        (libc::SYS_accept, "vhost-user and control sockets"),
        (libc::SYS_recvmsg, "vhost-user messages with fds"),
        (libc::SYS_sendmsg, "vhost-user messages with fds"),
        (libc::SYS_recvfrom, "sockets"),
        (libc::SYS_sendto, "sockets"),
        (libc::SYS_shutdown, "disconnect"),
        (libc::SYS_getsockopt, "socket checks"),
        (libc::SYS_setsockopt, "control socket timeouts"),
        (libc::SYS_getsockname, "sockets"),
        (libc::SYS_getpeername, "sockets"),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        (libc::SYS_epoll_wait, "vhost-user-backend event loop"),
        (libc::SYS_poll, "poll"),
        (
            libc::SYS_unlink,
            "signal thread removes its sockets at exit",
        ),
    ]);
    v.push((
        libc::SYS_unlinkat,
        "signal thread removes its sockets at exit",
    ));
    v
}

/// Builds the BPF programs, in installation order. Mode `on`: a filter that makes `clone3`
/// fail with ENOSYS (its flags live in memory a filter cannot read; glibc then falls back to
/// `clone`, whose flags the allowlist checks for `CLONE_THREAD`), one that makes file opens
/// fail with EACCES, and the allowlist (anything else kills the process). Mode `log`: the
/// allowlist only, logging instead of killing.
pub fn filters(mode: SeccompMode) -> Result<Vec<BpfProgram>, SandboxError> {
    filters_with(mode, None)
}

/// [`filters`], with `openat(reopen_dir, _, O_RDWR | O_CLOEXEC)` allowed if `reopen_dir`
/// is set (see [`Sandbox::reopen_dir`]).
pub fn filters_with(
    mode: SeccompMode,
    reopen_dir: Option<i32>,
) -> Result<Vec<BpfProgram>, SandboxError> {
    use std::collections::BTreeMap;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _why) in plain_syscalls() {
        rules.insert(nr, Vec::new());
    }
    // Threads only: no fork, no new processes.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    // Allowed here so that the errno filters decide: the kernel runs every filter and takes
    // the strictest answer (KILL > ERRNO > LOG > ALLOW), so in mode `on` clone3 gets ENOSYS
    // and opens EACCES (see below) instead of a kill.
    for nr in errno_syscalls().iter().flat_map(|(nrs, _)| nrs.iter()) {
        rules.insert(*nr, Vec::new());
    }
    // ioctl: the heap and dma-buf requests and a few harmless fd ones.
    let mut ioctl_rules = Vec::new();
    for req in crate::host::ioctl::ALL {
        ioctl_rules.push(rule(vec![cond32(1, req)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    // fcntl: fd flags, dup for cloning fds, memfd seals.
    let mut fcntl_rules = Vec::new();
    for cmd in [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
        libc::F_ADD_SEALS,
        libc::F_GET_SEALS,
    ] {
        fcntl_rules.push(rule(vec![cond32(1, cmd as u64)?])?);
    }
    rules.insert(libc::SYS_fcntl, fcntl_rules);
    // prctl: thread names only.
    rules.insert(
        libc::SYS_prctl,
        vec![rule(vec![cond32(0, libc::PR_SET_NAME as u64)?])?],
    );
    // getrlimit-style prlimit64 on ourselves (glibc reads RLIMIT_STACK), never a set.
    rules.insert(
        libc::SYS_prlimit64,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, 0)?,
            cond(2, SeccompCmpOp::Eq, 0)?,
        ])?],
    );
    // Signals to our own process only (abort on panic).
    let pid = u64::from(std::process::id());
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, pid)?])?],
    );

    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let allow: BpfProgram = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch())
        .and_then(TryInto::try_into)
        .map_err(SandboxError::Build)?;
    if mode == SeccompMode::Log {
        // Diagnosis: everything outside the list is allowed and logged, nothing fails.
        return Ok(vec![allow]);
    }
    // Installed first: seccompiler calls prctl(NO_NEW_PRIVS) and seccomp() for each program,
    // which the allowlist (installed last) does not allow. The kernel runs every filter and
    // takes the strictest answer, so these errno answers win over the allowlist's Allow.
    let mut progs = errno_syscalls()
        .into_iter()
        .map(|(nrs, errno)| errno_filter(&nrs, errno, reopen_dir))
        .collect::<Result<Vec<_>, _>>()?;
    progs.push(allow);
    Ok(progs)
}

/// System calls that fail with an errno in mode `on` instead of being run or killing us.
fn errno_syscalls() -> Vec<(Vec<i64>, i32)> {
    // Opening files fails: glibc's malloc opens /proc/sys/vm/overcommit_memory once, the
    // first time it trims a thread's arena, and copes with a failure.
    let mut opens = vec![libc::SYS_openat, libc::SYS_openat2];
    #[cfg(target_arch = "x86_64")]
    opens.push(libc::SYS_open);
    vec![
        (vec![libc::SYS_clone3], libc::ENOSYS),
        (opens, libc::EACCES),
    ]
}

/// A filter that answers `errno` to `syscalls` and allows everything else; with
/// `reopen_dir`, `openat(reopen_dir, _, O_RDWR | O_CLOEXEC)` is let through (any other
/// dirfd or flags still fail).
fn errno_filter(
    syscalls: &[i64],
    errno: i32,
    reopen_dir: Option<i32>,
) -> Result<BpfProgram, SandboxError> {
    let mut rules = std::collections::BTreeMap::new();
    for &nr in syscalls {
        let r = match reopen_dir {
            Some(dir) if nr == libc::SYS_openat && dir >= 0 => {
                let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
                // Fails unless both match: dirfd != dir, or flags != O_RDWR|O_CLOEXEC.
                vec![
                    rule(vec![SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Ne,
                        dir as u64,
                    )
                    .map_err(SandboxError::Build)?])?,
                    rule(vec![SeccompCondition::new(
                        2,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Ne,
                        flags,
                    )
                    .map_err(SandboxError::Build)?])?,
                ]
            }
            _ => Vec::new(),
        };
        rules.insert(nr, r);
    }
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch(),
    )
    .and_then(TryInto::try_into)
    .map_err(SandboxError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_every_mode() {
        assert_eq!(filters(SeccompMode::On).unwrap().len(), 3);
        assert_eq!(filters(SeccompMode::Log).unwrap().len(), 1);
        for mode in [SeccompMode::On, SeccompMode::Log] {
            assert!(filters(mode).unwrap().iter().all(|p| !p.is_empty()));
        }
    }

    #[test]
    fn dangerous_syscalls_are_not_plainly_allowed() {
        let allowed: Vec<i64> = plain_syscalls().into_iter().map(|(n, _)| n).collect();
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_kill,
            libc::SYS_process_vm_writev,
        ] {
            assert!(!allowed.contains(&nr), "syscall {nr} must not be allowed");
        }
    }

    /// The probe of `filters_behave_as_intended`, in a forked single-threaded child:
    /// containment as the daemon does it (Landlock, then the `on` filters), then probes.
    fn probe(kind: &str) {
        use crate::landlock::tests::{landlock_abi, openat_errno, via_proc_root};
        // Created before the containment, as the daemon does.
        let timer = crate::vhost::WorkerTimer::new().unwrap();
        let mut watch = crate::core::export::ReleaseWatch::new().unwrap();
        let memfd = std::fs::File::from(
            nix::sys::memfd::memfd_create("probe", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
        );
        let secret = tempfile::NamedTempFile::new().unwrap();
        let escape = via_proc_root(secret.path());
        let flags = libc::O_RDWR | libc::O_CLOEXEC;
        // The hole Landlock closes: seccomp lets this through (dirfd and flags match).
        assert_eq!(openat_errno(watch.reopen_dir(), &escape, flags), None);
        let landlock = landlock_abi().is_some();
        let sandbox = Sandbox {
            seccomp: SeccompMode::On,
            reopen_dir: Some(watch.reopen_dir()),
            ..Sandbox::default()
        };
        restrict(&sandbox).unwrap().install_filter().unwrap();
        // Reopening a memfd through the /proc/self/fd dirfd works, and inotify watches the
        // reopened file; nothing else opens.
        let reopened = watch.reopen(&memfd).unwrap();
        watch.watch_close(&reopened).unwrap();
        if landlock {
            assert_eq!(
                openat_errno(watch.reopen_dir(), &escape, flags),
                Some(libc::EACCES),
                "../root/PATH through the reopen dirfd must fail under Landlock"
            );
        } else {
            println!("no Landlock: ../root/PATH through the reopen dirfd still opens");
        }
        let name =
            std::ffi::CString::new(std::os::fd::AsRawFd::as_raw_fd(&memfd).to_string()).unwrap();
        // SAFETY: plain openat with a NUL-terminated name; the result is only compared.
        let ro = unsafe { libc::openat(watch.reopen_dir(), name.as_ptr(), libc::O_RDONLY) };
        assert_eq!(ro, -1, "openat with other flags must fail");
        // SAFETY: as above, with another dirfd (AT_FDCWD).
        let cwd = unsafe {
            libc::openat(
                libc::AT_FDCWD,
                c"/dev/null".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC,
            )
        };
        assert_eq!(cwd, -1, "openat from another dirfd must fail");
        // The vring worker arms and reads its timerfd under the filter.
        timer.arm(std::time::Instant::now());
        let start = std::time::Instant::now();
        while !timer.consume() {
            assert!(start.elapsed().as_secs() < 10, "timer never fired");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Opening a file fails with EACCES instead of killing the process.
        let e = std::fs::File::open("/dev/null").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        // Threads still start (clone3 -> ENOSYS, glibc falls back to clone), and get the
        // ruleset.
        let path = secret.path().to_path_buf();
        let in_thread = std::thread::spawn(move || std::fs::File::open(path).is_err())
            .join()
            .unwrap();
        assert!(in_thread);
        if kind == "socket" {
            // Not on the list: the process is killed with SIGSYS.
            // SAFETY: plain syscall; the result is irrelevant (we expect not to return).
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            unreachable!("socket() returned under the filter");
        }
        println!("probe {kind}: done");
    }

    /// Runs in a process started by `filters_behave_as_intended` (does nothing in a normal
    /// test run): the probe in a forked child (Landlock needs a single-threaded process
    /// when the kernel lacks TSYNC); exits like it.
    #[test]
    fn probe_child() {
        let Ok(kind) = std::env::var("DMAHEAP_SANDBOX_PROBE") else {
            return;
        };
        let status = crate::landlock::tests::in_forked_child(|| probe(&kind));
        if libc::WIFSIGNALED(status) {
            // SAFETY: restores the default action of the child's fatal signal and raises it,
            // so that this process ends the same way.
            unsafe {
                libc::signal(libc::WTERMSIG(status), libc::SIG_DFL);
                libc::raise(libc::WTERMSIG(status));
            }
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "wait status {status:#x}"
        );
    }

    #[test]
    fn filters_behave_as_intended() {
        use std::os::unix::process::ExitStatusExt;
        let run = |probe: &str| {
            crate::landlock::tests::rerun(
                "sandbox::tests::probe_child",
                "DMAHEAP_SANDBOX_PROBE",
                probe,
            )
        };
        let ok = run("open");
        let stdout = String::from_utf8_lossy(&ok.stdout);
        assert!(
            ok.status.success() && stdout.contains("probe open: done"),
            "{:?}: {stdout}{}",
            ok.status,
            String::from_utf8_lossy(&ok.stderr)
        );
        let killed = run("socket");
        assert_eq!(
            killed.status.signal(),
            Some(libc::SIGSYS),
            "{:?}",
            killed.status
        );
    }

    #[test]
    fn mode_names() {
        use clap::ValueEnum;
        assert_eq!(SeccompMode::from_str("log", true), Ok(SeccompMode::Log));
        assert_eq!(SeccompMode::default(), SeccompMode::On);
        assert_eq!(SeccompMode::Off.to_string(), "off");
    }
}
