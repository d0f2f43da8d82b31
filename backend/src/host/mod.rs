//! Host heaps: where host buffers come from, one file per provider.
//!
//! * [`dma_heap`]: a real `/dev/dma_heap/<name>` (`DMA_HEAP_IOCTL_ALLOC`).
//! * [`memfd`]: plain memfd buffers for hosts without dma-heaps.
//! * [`udmabuf`]: a memfd turned into a real dma-buf through `/dev/udmabuf`.
//! * [`ioctl`]: the ioctls these issue (the seccomp filter allows exactly these).
//!
//! The device core only sees the [`HeapProvider`] and [`HostBuffer`] traits, so tests can
//! substitute fakes ([`crate::testing`]).

pub mod dma_heap;
#[cfg(test)]
mod export_tests;
pub mod ioctl;
pub mod memfd;
pub mod udmabuf;

pub use dma_heap::{DmaBuf, DmaHeapProvider};
pub use memfd::{MemfdBuffer, MemfdProvider};
pub use udmabuf::{Udmabuf, UdmabufProvider};

/// What an importer gets for a buffer shared by UUID: an fd that maps exactly the buffer.
#[derive(Debug)]
pub struct Export {
    /// The fd handed to the front end (`GET_SHARED_OBJECT`).
    pub file: File,
    /// What kind of file it is.
    pub kind: ExportKind,
}

/// The kind of an [`Export`]: whether the daemon can see when it is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// A dma-buf: it can be polled, so a private epoll instance sees its last close.
    DmaBuf,
    /// A sealed memfd: no poll, so its release cannot be seen.
    Memfd,
}

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::{lseek, Whence};

/// Errors of host buffer providers.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The host is out of memory for this heap.
    #[error("host heap out of memory")]
    NoMemory(#[source] io::Error),
    /// Opening the heap device failed.
    #[error("cannot open {path}")]
    Open {
        /// The device path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Any other host failure.
    #[error("{what} failed")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An access outside the buffer.
    #[error("range {offset}+{len} outside a buffer of {size} bytes")]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Buffer size.
        size: u64,
    },
}

impl ProviderError {
    pub(crate) fn io(what: &'static str, source: impl Into<io::Error>) -> Self {
        let source = source.into();
        if source.raw_os_error() == Some(libc::ENOMEM) {
            return Self::NoMemory(source);
        }
        Self::Io { what, source }
    }
}

pub(crate) type Result<T> = std::result::Result<T, ProviderError>;

/// A source of host buffers (one per exported heap).
pub trait HeapProvider: Send + Sync + Debug {
    /// Allocates a zeroed host buffer of exactly `len` bytes (a multiple of the page size).
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>>;
    /// Short description for logs and stats (`memfd`, `dma-heap:system`, ...).
    fn describe(&self) -> String;
    /// Whether a `HostBuffer::sync` of this provider's buffers can do anything (a dma-buf
    /// can have host importers; plain memory cannot).
    fn has_sync(&self) -> bool {
        true
    }
}

/// One host allocation: an fd that can be mapped into the guest window.
pub trait HostBuffer: Send + Sync + Debug {
    /// The fd to send with `SHMEM_MAP`.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Zeroes `[offset, offset + len)` (and may return the memory to the host).
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    /// `DMA_BUF_IOCTL_SYNC` with the given dma-buf sync flags; no-op for plain memory.
    fn sync(&self, flags: u64) -> Result<()>;
    /// Copies bytes out of the buffer.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Copies bytes into the buffer.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// An fd for an importer that maps exactly `[offset, offset + len)` of this buffer and
    /// nothing else (offset 0 in the fd is `offset` here). `Ok(None)`: this provider cannot
    /// export that range alone (e.g. a range of a dma-heap dma-buf).
    fn export(&self, offset: u64, len: u64) -> Result<Option<Export>> {
        let _ = (offset, len);
        Ok(None)
    }
}

/// A new fd of `file` (the same open file), close-on-exec.
pub(crate) fn dup_file(fd: BorrowedFd<'_>) -> Result<File> {
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|e| ProviderError::io("dup", e))
}

/// A udmabuf (a dma-buf) over `[offset, offset + len)` of `memfd` (which must be sealed
/// against shrinking and not against writes), made through the open `/dev/udmabuf` `dev`.
pub(crate) fn udmabuf_over(dev: &File, memfd: &File, offset: u64, len: u64) -> Result<File> {
    let memfd_raw = u32::try_from(memfd.as_raw_fd()).map_err(|_| ProviderError::Io {
        what: "UDMABUF_CREATE",
        source: io::Error::other("negative fd"),
    })?;
    let create = ioctl::UdmabufCreate {
        memfd: memfd_raw,
        flags: ioctl::UDMABUF_FLAGS_CLOEXEC,
        offset,
        size: len,
    };
    // SAFETY: `dev` is an open /dev/udmabuf fd and `create` a live `struct udmabuf_create`
    // the kernel only reads.
    let raw = unsafe { ioctl::udmabuf_create(dev.as_raw_fd(), &create) }
        .map_err(|e| ProviderError::io("UDMABUF_CREATE", e))?;
    // SAFETY: the ioctl returned a new dma-buf fd that nobody else owns.
    Ok(File::from(unsafe {
        std::os::fd::OwnedFd::from_raw_fd(raw)
    }))
}

pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ProviderError::OutOfRange { offset, len, size }),
    }
}

pub(crate) fn to_off(v: u64) -> Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| ProviderError::OutOfRange {
        offset: v,
        len: 0,
        size: i64::MAX as u64,
    })
}

/// Creates a sealed-size memfd of `len` bytes.
pub(crate) fn new_memfd(name: &str, len: u64, extra_seals: SealFlag) -> Result<File> {
    let fd = memfd_create(
        format!("dmaheap-{name}").as_str(),
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| ProviderError::io("memfd_create", e))?;
    let file = File::from(fd);
    file.set_len(len)
        .map_err(|e| ProviderError::io("ftruncate", e))?;
    fcntl(&file, FcntlArg::F_ADD_SEALS(extra_seals))
        .map_err(|e| ProviderError::io("F_ADD_SEALS", e))?;
    Ok(file)
}

pub(crate) fn write_zeroes_pwrite(file: &File, offset: u64, len: u64) -> Result<()> {
    const CHUNK: usize = 64 * 1024;
    let zeroes = [0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).unwrap_or(CHUNK).min(CHUNK);
        file.write_all_at(&zeroes[..n], offset + done)
            .map_err(|e| ProviderError::io("pwrite", e))?;
        done += n as u64;
    }
    Ok(())
}

/// The first offset in `[pos, end)` of a memfd (or any file with `SEEK_DATA`) that is not
/// a hole; `None` if the whole range reads as zeroes without a page behind it.
pub(crate) fn next_data(file: &File, pos: u64, end: u64) -> Result<Option<u64>> {
    if pos >= end {
        return Ok(None);
    }
    match lseek(file.as_fd(), to_off(pos)?, Whence::SeekData) {
        Ok(at) if (at as u64) < end => Ok(Some(at as u64)),
        Ok(_) | Err(Errno::ENXIO) => Ok(None), // only a hole up to `end`
        Err(e) => Err(ProviderError::io("lseek(SEEK_DATA)", e)),
    }
}

/// Zeroes `[offset, offset + len)` of a memfd by writing zeroes over its data only
/// (`SEEK_DATA`/`SEEK_HOLE`): a hole already reads as zeroes, and writing it would
/// allocate its pages.
pub(crate) fn write_zeroes_resident(file: &File, offset: u64, len: u64) -> Result<()> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    while let Some(data) = next_data(file, pos, end)? {
        let hole = lseek(file.as_fd(), to_off(data)?, Whence::SeekHole)
            .map_err(|e| ProviderError::io("lseek(SEEK_HOLE)", e))? as u64;
        let stop = hole.min(end);
        write_zeroes_pwrite(file, data, stop - data)?;
        pos = stop;
    }
    Ok(())
}

/// Bounds-checked `pread` of a buffer's backing file of `size` bytes.
pub(crate) fn file_read_at(file: &File, size: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
    check_range(offset, buf.len() as u64, size)?;
    file.read_exact_at(buf, offset)
        .map_err(|e| ProviderError::io("pread", e))
}

/// Bounds-checked `pwrite` to a buffer's backing file of `size` bytes.
pub(crate) fn file_write_at(file: &File, size: u64, offset: u64, data: &[u8]) -> Result<()> {
    check_range(offset, data.len() as u64, size)?;
    file.write_all_at(data, offset)
        .map_err(|e| ProviderError::io("pwrite", e))
}
/// `DMA_BUF_IOCTL_SYNC` on a dma-buf.
pub(crate) fn dma_buf_sync(fd: BorrowedFd<'_>, flags: u64) -> Result<()> {
    let arg = ioctl::DmaBufSync { flags };
    // SAFETY: `fd` is a valid open fd and `arg` is a live `struct dma_buf_sync` that the
    // kernel only reads.
    unsafe { ioctl::dma_buf_sync(fd.as_raw_fd(), &arg) }
        .map(|_| ())
        .map_err(|e| ProviderError::io("DMA_BUF_IOCTL_SYNC", e))
}

/// Allocates, writes, reads, syncs and zeroes a buffer of `p` (the provider tests).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn exercise(p: &dyn HeapProvider) {
    let b = p.allocate(64 * 1024).unwrap();
    assert_eq!(b.size(), 64 * 1024);
    let mut buf = vec![0xffu8; 4096];
    b.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "new buffer is zeroed");
    b.write_at(8192, &[1, 2, 3, 4]).unwrap();
    let mut four = [0u8; 4];
    b.read_at(8192, &mut four).unwrap();
    assert_eq!(four, [1, 2, 3, 4]);
    b.sync(1).unwrap();
    b.sync(1 | 4).unwrap();
    b.zero(8192, 4096).unwrap();
    b.read_at(8192, &mut four).unwrap();
    assert_eq!(four, [0; 4]);
    assert!(b.read_at(64 * 1024 - 2, &mut four).is_err());
    assert!(b.zero(u64::MAX, 2).is_err());
}
