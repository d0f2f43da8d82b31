// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Thin wrappers over the dma-heap and dma-buf user ABI (linux/dma-heap.h, linux/dma-buf.h).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// `struct dma_heap_allocation_data`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct AllocationData {
    pub len: u64,
    pub fd: u32,
    pub fd_flags: u32,
    pub heap_flags: u64,
}

const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `DMA_HEAP_IOCTL_ALLOC = _IOWR('H', 0, struct dma_heap_allocation_data)`.
pub const DMA_HEAP_IOCTL_ALLOC: u64 = ioc(
    IOC_READ | IOC_WRITE,
    b'H',
    0,
    std::mem::size_of::<AllocationData>(),
);
/// `DMA_BUF_IOCTL_SYNC = _IOW('b', 0, struct dma_buf_sync)`.
pub const DMA_BUF_IOCTL_SYNC: u64 = ioc(IOC_WRITE, b'b', 0, 8);
/// `DMA_BUF_SET_NAME = _IOW('b', 1, const char *)` (the 64-bit `_B` form).
pub const DMA_BUF_SET_NAME: u64 = ioc(IOC_WRITE, b'b', 1, 8);

pub const SYNC_READ: u64 = 1;
pub const SYNC_WRITE: u64 = 2;
pub const SYNC_RW: u64 = 3;
pub const SYNC_START: u64 = 0;
pub const SYNC_END: u64 = 4;

/// The guest's page size (sysconf(_SC_PAGESIZE)): 4 KiB on x86, 4 or 16 KiB on arm64. The
/// dma-heap core and every heap round a length up to it, so a dma-buf is whole pages.
pub fn page() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n)
            .ok()
            .filter(|n| n.is_power_of_two())
            .unwrap_or_else(|| panic!("sysconf(_SC_PAGESIZE) = {n}"))
    })
}

/// `len` rounded up to whole pages: the size the kernel's system heap gives a request.
pub fn page_round(len: usize) -> usize {
    len.next_multiple_of(page())
}

/// The errno of the last failed call.
pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Name of an errno value, for messages.
pub fn errname(e: i32) -> String {
    let name = match e {
        0 => "success",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EMEDIUMTYPE => "EMEDIUMTYPE",
        libc::EINTR => "EINTR",
        libc::EILSEQ => "EILSEQ",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// An open `/dev/dma_heap/NAME`.
#[derive(Debug)]
pub struct Heap {
    pub name: String,
    file: File,
}

impl Heap {
    /// Open the heap the way Android's libdmabufheap does: `O_RDONLY | O_CLOEXEC`.
    pub fn open(name: &str) -> io::Result<Heap> {
        let path = CString::new(format!("/dev/dma_heap/{name}"))?;
        // SAFETY: `path` is a valid NUL-terminated string; open has no other preconditions.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Heap {
            name: name.to_string(),
            // SAFETY: `fd` was just returned by open and is owned by nobody else.
            file: unsafe { File::from_raw_fd(fd) },
        })
    }

    /// `DMA_HEAP_IOCTL_ALLOC` with explicit flags; `Err(errno)` on failure.
    pub fn alloc_raw(&self, len: u64, fd_flags: u32, heap_flags: u64) -> Result<Buf, i32> {
        self.alloc_raw_data(AllocationData {
            len,
            fd: 0,
            fd_flags,
            heap_flags,
        })
    }

    /// `DMA_HEAP_IOCTL_ALLOC` with every field of the request given.
    pub fn alloc_raw_data(&self, mut data: AllocationData) -> Result<Buf, i32> {
        // SAFETY: the heap fd is open; `data` is a properly laid out
        // `dma_heap_allocation_data` that outlives the call.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                DMA_HEAP_IOCTL_ALLOC as _,
                &mut data as *mut AllocationData,
            )
        };
        if rc < 0 {
            return Err(errno());
        }
        // SAFETY: on success the kernel installed a new fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(data.fd as RawFd) };
        Ok(Buf {
            fd,
            len: data.len as usize,
        })
    }

    /// Allocate like Android: `O_RDWR | O_CLOEXEC`, heap_flags 0.
    pub fn alloc(&self, len: usize) -> Result<Buf, String> {
        self.alloc_raw(len as u64, (libc::O_RDWR | libc::O_CLOEXEC) as u32, 0)
            .map_err(|e| format!("alloc {len} from {}: {}", self.name, errname(e)))
    }
}

/// A dma-buf fd with the length we asked for.
#[derive(Debug)]
pub struct Buf {
    pub fd: OwnedFd,
    pub len: usize,
}

impl Buf {
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Size of the dma-buf as the kernel reports it (lseek to the end).
    pub fn size(&self) -> Result<usize, String> {
        // SAFETY: plain lseek on an fd we own.
        let end = unsafe { libc::lseek(self.raw(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(format!("lseek: {}", errname(errno())));
        }
        Ok(end as usize)
    }

    /// A shared read-write mapping of the whole buffer: the length asked for, rounded up
    /// to whole pages as the dma-buf's size is.
    pub fn mmap(&self) -> Result<Map, String> {
        let len = page_round(self.len);
        Map::new(
            self.raw(),
            len,
            0,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| format!("mmap {len} bytes: {}", errname(e)))
    }

    pub fn sync(&self, flags: u64) -> Result<(), i32> {
        // SAFETY: `flags` is a `struct dma_buf_sync { __u64 flags; }` that outlives the call.
        let rc = unsafe { libc::ioctl(self.raw(), DMA_BUF_IOCTL_SYNC as _, &flags as *const u64) };
        if rc < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    pub fn set_name(&self, name: &[u8]) -> Result<(), i32> {
        let mut bytes = name.to_vec();
        bytes.push(0);
        // SAFETY: DMA_BUF_SET_NAME reads a NUL-terminated string from the pointer; `bytes`
        // is NUL-terminated and outlives the call.
        let rc = unsafe { libc::ioctl(self.raw(), DMA_BUF_SET_NAME as _, bytes.as_ptr()) };
        if rc < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    /// `name:` from /proc/self/fdinfo/FD.
    pub fn fdinfo(&self) -> Result<String, String> {
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.raw()))
            .map_err(|e| format!("fdinfo: {e}"))
    }
}

/// A mapping, unmapped on drop.
#[derive(Debug)]
pub struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; tests synchronise access themselves.
unsafe impl Send for Map {}

impl Map {
    pub fn new(fd: RawFd, len: usize, off: i64, prot: i32, flags: i32) -> Result<Map, i32> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); it does not alias any
        // Rust object.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        Ok(Map {
            ptr: NonNull::new(p as *mut u8).ok_or(libc::EFAULT)?,
            len,
        })
    }

    /// How many of the mapping's pages have a page table entry now (/proc/self/pagemap).
    pub fn present_pages(&self) -> Result<usize, String> {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
        let pages = self.len.div_ceil(page());
        let mut raw = vec![0u8; pages * 8];
        let at = (self.ptr.as_ptr() as usize / page() * 8) as u64;
        f.read_exact_at(&mut raw, at)
            .map_err(|e| format!("read /proc/self/pagemap: {e}"))?;
        Ok(raw
            .chunks_exact(8)
            .filter(|e| e[7] & 0x80 != 0) // bit 63: present
            .count())
    }

    /// MADV_DONTNEED: drop the page table entries (the buffer keeps its bytes).
    pub fn dontneed(&self) -> Result<(), String> {
        // SAFETY: exactly the live mapping; no Rust reference points into it now.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr() as *mut libc::c_void,
                self.len,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(format!("madvise(MADV_DONTNEED): {}", errname(errno())));
        }
        Ok(())
    }

    /// Volatile read: the host may write the buffer behind our back.
    pub fn read(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= self.len);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds of the live mapping (asserted above).
            *b = unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off + i)) };
        }
    }

    pub fn read_vec(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read(off, &mut v);
        v
    }

    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: in bounds of the live, writable mapping (asserted above); the
        // source is a distinct Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// The start of the mapping, for raw accesses (e.g. unaligned ones).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The whole mapping as a slice, for bulk checks of memory nobody else writes now.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live and `len` bytes long for the lifetime of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Fill the whole mapping with a pattern derived from `seed`.
    pub fn fill(&self, seed: u64) {
        // SAFETY: the mapping is live, writable and `len` bytes long; no other Rust
        // reference to it exists while this slice lives.
        let s = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) };
        for (i, chunk) in s.chunks_mut(8).enumerate() {
            let v = pattern(seed, i as u64).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Check the pattern written by `fill`; the first mismatching offset on error.
    pub fn check(&self, seed: u64) -> Result<(), usize> {
        for (i, chunk) in self.as_slice().chunks(8).enumerate() {
            let v = pattern(seed, i as u64).to_le_bytes();
            if chunk != &v[..chunk.len()] {
                return Err(i * 8);
            }
        }
        Ok(())
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap returned; no references outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

pub fn pattern(seed: u64, i: u64) -> u64 {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// Forks a child that runs `f` and leaves with its return value as exit status, running no
/// destructors. `f` must only make system calls: other threads may hold locks. The pid.
pub fn fork_child(f: impl FnOnce() -> i32) -> Result<libc::pid_t, String> {
    // SAFETY: the child runs `f`, which only makes system calls, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errname(errno())));
    }
    if pid == 0 {
        let rc = f();
        // SAFETY: leaving the child at once, running no destructors or atexit handlers.
        unsafe { libc::_exit(rc) };
    }
    Ok(pid)
}

/// Waits for our child `pid`: its exit status, or 128 + the signal that killed it.
pub fn wait_child(pid: libc::pid_t) -> Result<i32, String> {
    let mut status = 0;
    // SAFETY: waiting for our own child, into a live int.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(format!("waitpid: {}", errname(errno())));
    }
    Ok(if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    })
}

/// Random bytes from the kernel.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: writes at most `n - got` bytes into the tail of `v`.
        let r = unsafe { libc::getrandom(v[got..].as_mut_ptr() as *mut libc::c_void, n - got, 0) };
        if r <= 0 {
            break;
        }
        got += r as usize;
    }
    v
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.split_whitespace().collect();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Raise RLIMIT_NOFILE to at least `n`; returns the new soft limit.
pub fn raise_nofile(n: u64) -> Result<u64, String> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: passes a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
        return Err(format!("setrlimit(NOFILE, {n}): {}", errname(errno())));
    }
    Ok(n)
}
