//! Seeing when the last copy of an export is closed, so that a retained buffer
//! ([`super::export`]) can be released.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Sees when exports are closed everywhere, so that retained buffers can be released.
///
/// * A dma-buf is registered in a private epoll instance: an epoll item does not hold its
///   file, and leaves the instance when the file's last reference goes; the items are read
///   back through `/proc/self/fdinfo/<epfd>`, opened at creation (the sandbox forbids
///   opening files later).
/// * A memfd cannot be polled. Its export is a reopened file (`/proc/self/fd/N`: a struct
///   file of its own; the `memfd_create` file itself sends no notifications), whose last
///   close inotify reports as `IN_CLOSE_WRITE`. The watch pins the inode: it is removed
///   as soon as the buffer is released or forgotten.
#[derive(Debug)]
pub struct ReleaseWatch {
    epoll: OwnedFd,
    fdinfo: File,
    next_token: u64,
    inotify: OwnedFd,
    /// `/proc/self/fd`, `O_PATH`: reopening a memfd is `openat(this, "N", O_RDWR)`.
    proc_fd: OwnedFd,
}

/// How a retained buffer is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// A dma-buf: its [`ReleaseWatch`] epoll token.
    Epoll(u64),
    /// A reopened memfd: its inotify watch descriptor.
    Inotify(i32),
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl ReleaseWatch {
    /// A new, empty watch.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let raw = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` is a new fd nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        let fdinfo = File::open(format!("/proc/self/fdinfo/{raw}"))?;
        // SAFETY: plain system call; the result is checked.
        let raw = check(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        // SAFETY: `raw` is a new fd nobody else owns.
        let inotify = unsafe { OwnedFd::from_raw_fd(raw) };
        let proc_fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open("/proc/self/fd")?;
        Ok(Self {
            epoll,
            fdinfo,
            next_token: 1,
            inotify,
            proc_fd: proc_fd.into(),
        })
    }

    /// The `/proc/self/fd` fd the sandbox must let `openat` use.
    pub fn reopen_dir(&self) -> i32 {
        self.proc_fd.as_raw_fd()
    }

    /// A new open file of `file` (a memfd), read-write.
    pub fn reopen(&self, file: &File) -> io::Result<File> {
        let name = std::ffi::CString::new(file.as_raw_fd().to_string())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `proc_fd` is an open directory fd and `name` a NUL-terminated string.
        let raw = check(unsafe {
            libc::openat(
                self.proc_fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `raw` is a new fd nobody else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Watches `file` (a reopened memfd) for its last close.
    pub fn watch_close(&mut self, file: &File) -> io::Result<i32> {
        let path = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the inotify fd is open and `path` a NUL-terminated string.
        check(unsafe {
            libc::inotify_add_watch(
                self.inotify.as_raw_fd(),
                path.as_ptr(),
                libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE,
            )
        })
    }

    /// Removes an inotify watch (lets the inode go).
    pub fn unwatch(&mut self, wd: i32) {
        // SAFETY: plain system call on our inotify fd; an unknown wd only fails.
        let _ = unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
    }

    /// Watch descriptors whose file was closed (or whose inode went) since the last call.
    pub fn closed(&mut self) -> io::Result<HashSet<i32>> {
        let mut out = HashSet::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
            let n =
                unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(out),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            let n = n as usize;
            if n == 0 {
                return Ok(out);
            }
            let mut at = 0;
            let head = std::mem::size_of::<libc::inotify_event>();
            while at + head <= n {
                let word = |i: usize| {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(&buf[at + i..at + i + 4]);
                    b
                };
                let wd = i32::from_ne_bytes(word(0));
                let mask = u32::from_ne_bytes(word(4));
                let len = u32::from_ne_bytes(word(12)) as usize;
                if mask & (libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE | libc::IN_IGNORED) != 0 {
                    out.insert(wd);
                }
                at += head + len;
            }
        }
    }

    /// Registers `file`; returns the token under which [`ReleaseWatch::alive`] lists it.
    pub fn watch(&mut self, file: &File) -> io::Result<u64> {
        let token = self.next_token;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open; `ev` is a live epoll_event the kernel only reads.
        check(unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                file.as_fd().as_raw_fd(),
                &mut ev,
            )
        })?;
        self.next_token += 1;
        Ok(token)
    }

    /// Tokens of the registered files that are still open somewhere.
    pub fn alive(&self) -> io::Result<HashSet<u64>> {
        let mut text = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = self.fdinfo.read_at(&mut chunk, text.len() as u64)?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
        }
        Ok(parse_epoll_fdinfo(&String::from_utf8_lossy(&text)))
    }
}

/// The `data:` values of the `tfd:` lines of an epoll instance's fdinfo.
pub fn parse_epoll_fdinfo(text: &str) -> HashSet<u64> {
    text.lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "data:")?;
            u64::from_str_radix(words.next()?, 16).ok()
        })
        .collect()
}
