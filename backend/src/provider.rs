//! Heap providers: where host buffers come from.
//!
//! * [`DmaHeapProvider`]: a real `/dev/dma_heap/<name>` (`DMA_HEAP_IOCTL_ALLOC`).
//! * [`MemfdProvider`]: plain memfd buffers for hosts without dma-heaps.
//! * [`UdmabufProvider`]: a memfd turned into a real dma-buf through `/dev/udmabuf`.
//!
//! The device core only sees the [`HeapProvider`] and [`HostBuffer`] traits, so tests can
//! substitute fakes.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::bitmap::BS;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory, VolatileSlice};

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
    fn io(what: &'static str, source: impl Into<io::Error>) -> Self {
        let source = source.into();
        if source.raw_os_error() == Some(libc::ENOMEM) {
            return Self::NoMemory(source);
        }
        Self::Io { what, source }
    }
}

type Result<T> = std::result::Result<T, ProviderError>;

/// A source of host buffers (one per exported heap).
pub trait HeapProvider: Send + Sync + Debug {
    /// Allocates a zeroed host buffer of exactly `len` bytes (a multiple of the page size).
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>>;
    /// Short description for logs and stats (`memfd`, `dma-heap:system`, ...).
    fn describe(&self) -> String;
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
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ProviderError::OutOfRange { offset, len, size }),
    }
}

fn to_off(v: u64) -> Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| ProviderError::OutOfRange {
        offset: v,
        len: 0,
        size: i64::MAX as u64,
    })
}

/// Creates a sealed-size memfd of `len` bytes.
fn new_memfd(name: &str, len: u64, extra_seals: SealFlag) -> Result<File> {
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

fn write_zeroes_pwrite(file: &File, offset: u64, len: u64) -> Result<()> {
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

/// memfd-backed buffers (no dma-buf, no sync needed).
#[derive(Debug)]
pub struct MemfdProvider {
    name: String,
}

impl MemfdProvider {
    /// A provider naming its memfds after `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }
}

impl HeapProvider for MemfdProvider {
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>> {
        let file = new_memfd(
            &self.name,
            len,
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
        )?;
        Ok(Box::new(MemfdBuffer { file, size: len }))
    }

    fn describe(&self) -> String {
        "memfd".to_string()
    }
}

/// A memfd buffer.
#[derive(Debug)]
pub struct MemfdBuffer {
    file: File,
    size: u64,
}

impl HostBuffer for MemfdBuffer {
    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        // Punching a hole zeroes the range in every mapping and gives the pages back.
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            to_off(offset)?,
            to_off(len)?,
        )
        .map_err(|e| ProviderError::io("fallocate(PUNCH_HOLE)", e))
    }

    fn sync(&self, _flags: u64) -> Result<()> {
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        file_read_at(&self.file, self.size, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        file_write_at(&self.file, self.size, offset, data)
    }
}

/// Bounds-checked `pread` of a buffer's backing file of `size` bytes.
fn file_read_at(file: &File, size: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
    check_range(offset, buf.len() as u64, size)?;
    file.read_exact_at(buf, offset)
        .map_err(|e| ProviderError::io("pread", e))
}

/// Bounds-checked `pwrite` to a buffer's backing file of `size` bytes.
fn file_write_at(file: &File, size: u64, offset: u64, data: &[u8]) -> Result<()> {
    check_range(offset, data.len() as u64, size)?;
    file.write_all_at(data, offset)
        .map_err(|e| ProviderError::io("pwrite", e))
}

/// `struct dma_heap_allocation_data` from `<linux/dma-heap.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct DmaHeapAllocationData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

/// `struct dma_buf_sync` from `<linux/dma-buf.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct DmaBufSync {
    flags: u64,
}

/// `struct udmabuf_create` from `<linux/udmabuf.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct UdmabufCreate {
    memfd: u32,
    flags: u32,
    offset: u64,
    size: u64,
}

const UDMABUF_FLAGS_CLOEXEC: u32 = 0x01;

nix::ioctl_readwrite!(dma_heap_ioctl_alloc, b'H', 0, DmaHeapAllocationData);
nix::ioctl_write_ptr!(dma_buf_ioctl_sync, b'b', 0, DmaBufSync);
nix::ioctl_write_ptr!(udmabuf_ioctl_create, b'u', 0x42, UdmabufCreate);

/// A host mapping of a dma-buf, for zeroing and debug access.
#[derive(Debug)]
struct HostMap {
    region: MmapRegion<()>,
}

impl HostMap {
    fn new(fd: BorrowedFd<'_>, size: u64) -> Result<Self> {
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(|e| ProviderError::io("dup", e))?,
        );
        let size = usize::try_from(size).map_err(|_| ProviderError::OutOfRange {
            offset: 0,
            len: size,
            size: usize::MAX as u64,
        })?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(|e| {
            ProviderError::Io {
                what: "mmap dma-buf",
                source: io::Error::other(e),
            }
        })?;
        Ok(Self { region })
    }

    fn slice(&self, offset: u64, len: usize) -> Result<VolatileSlice<'_, BS<'_, ()>>> {
        let size = self.region.len() as u64;
        check_range(offset, len as u64, size)?;
        self.region
            .get_slice(offset as usize, len)
            .map_err(|_| ProviderError::OutOfRange {
                offset,
                len: len as u64,
                size,
            })
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.region.len() as u64)?;
        const CHUNK: usize = 64 * 1024;
        let zeroes = [0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).unwrap_or(CHUNK).min(CHUNK);
            self.slice(offset + done, n)?.copy_from(&zeroes[..n]);
            done += n as u64;
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.slice(offset, buf.len())?.copy_to(buf);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.slice(offset, data.len())?.copy_from(data);
        Ok(())
    }
}

fn dma_buf_sync(fd: BorrowedFd<'_>, flags: u64) -> Result<()> {
    let arg = DmaBufSync { flags };
    // SAFETY: `fd` is a valid open fd and `arg` is a live `struct dma_buf_sync` that the
    // kernel only reads.
    unsafe { dma_buf_ioctl_sync(fd.as_raw_fd(), &arg) }
        .map(|_| ())
        .map_err(|e| ProviderError::io("DMA_BUF_IOCTL_SYNC", e))
}

/// A real dma-buf (from a dma-heap), mapped once in the daemon for zeroing.
#[derive(Debug)]
pub struct DmaBuf {
    fd: OwnedFd,
    size: u64,
    map: HostMap,
}

impl HostBuffer for DmaBuf {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        const START_WRITE: u64 = 2;
        const END_WRITE: u64 = 2 | 4;
        dma_buf_sync(self.fd.as_fd(), START_WRITE)?;
        let res = self.map.zero(offset, len);
        dma_buf_sync(self.fd.as_fd(), END_WRITE)?;
        res
    }

    fn sync(&self, flags: u64) -> Result<()> {
        dma_buf_sync(self.fd.as_fd(), flags)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.map.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.map.write_at(offset, data)
    }
}

/// A host dma-heap, `/dev/dma_heap/<name>`.
#[derive(Debug)]
pub struct DmaHeapProvider {
    path: PathBuf,
    dev: File,
}

impl DmaHeapProvider {
    /// Opens the host heap `/dev/dma_heap/<host_name>`.
    pub fn open(host_name: &str) -> Result<Self> {
        Self::open_path(&Path::new("/dev/dma_heap").join(host_name))
    }

    /// Opens a dma-heap device node by path.
    pub fn open_path(path: &Path) -> Result<Self> {
        let dev =
            OpenOptions::new()
                .read(true)
                .open(path)
                .map_err(|source| ProviderError::Open {
                    path: path.to_path_buf(),
                    source,
                })?;
        Ok(Self {
            path: path.to_path_buf(),
            dev,
        })
    }
}

impl HeapProvider for DmaHeapProvider {
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>> {
        let mut data = DmaHeapAllocationData {
            len,
            fd: 0,
            fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
            heap_flags: 0,
        };
        // SAFETY: `self.dev` is an open dma-heap fd and `data` is a live
        // `struct dma_heap_allocation_data` the kernel reads and writes.
        unsafe { dma_heap_ioctl_alloc(self.dev.as_raw_fd(), &mut data) }
            .map_err(|e| ProviderError::io("DMA_HEAP_IOCTL_ALLOC", e))?;
        let raw = i32::try_from(data.fd).map_err(|_| ProviderError::Io {
            what: "DMA_HEAP_IOCTL_ALLOC",
            source: io::Error::other("kernel returned an invalid fd"),
        })?;
        // SAFETY: the ioctl succeeded, so `raw` is a new dma-buf fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let map = HostMap::new(fd.as_fd(), len)?;
        Ok(Box::new(DmaBuf { fd, size: len, map }))
    }

    fn describe(&self) -> String {
        format!("dma-heap:{}", self.path.display())
    }
}

/// memfd buffers exported as dma-bufs through `/dev/udmabuf`.
#[derive(Debug)]
pub struct UdmabufProvider {
    name: String,
    dev: File,
}

impl UdmabufProvider {
    /// Opens `/dev/udmabuf`.
    pub fn open(name: &str) -> Result<Self> {
        let path = Path::new("/dev/udmabuf");
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| ProviderError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            name: name.to_string(),
            dev,
        })
    }
}

/// A udmabuf: the memfd (for zeroing with pwrite, never with hole punching, which would
/// detach the pages the dma-buf pins) and the dma-buf fd (mapped into the guest).
#[derive(Debug)]
pub struct Udmabuf {
    memfd: File,
    dmabuf: OwnedFd,
    size: u64,
}

impl HeapProvider for UdmabufProvider {
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>> {
        let memfd = new_memfd(&self.name, len, SealFlag::F_SEAL_SHRINK)?;
        let memfd_raw = u32::try_from(memfd.as_raw_fd()).map_err(|_| ProviderError::Io {
            what: "UDMABUF_CREATE",
            source: io::Error::other("negative fd"),
        })?;
        let create = UdmabufCreate {
            memfd: memfd_raw,
            flags: UDMABUF_FLAGS_CLOEXEC,
            offset: 0,
            size: len,
        };
        // SAFETY: `self.dev` is an open /dev/udmabuf fd and `create` a live
        // `struct udmabuf_create` the kernel only reads.
        let raw = unsafe { udmabuf_ioctl_create(self.dev.as_raw_fd(), &create) }
            .map_err(|e| ProviderError::io("UDMABUF_CREATE", e))?;
        // SAFETY: the ioctl returned a new dma-buf fd that nobody else owns.
        let dmabuf = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Box::new(Udmabuf {
            memfd,
            dmabuf,
            size: len,
        }))
    }

    fn describe(&self) -> String {
        "udmabuf".to_string()
    }
}

impl HostBuffer for Udmabuf {
    fn fd(&self) -> BorrowedFd<'_> {
        self.dmabuf.as_fd()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        write_zeroes_pwrite(&self.memfd, offset, len)
    }

    fn sync(&self, flags: u64) -> Result<()> {
        dma_buf_sync(self.dmabuf.as_fd(), flags)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        file_read_at(&self.memfd, self.size, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        file_write_at(&self.memfd, self.size, offset, data)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn exercise(p: &dyn HeapProvider) {
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

    #[test]
    fn memfd_provider() {
        exercise(&MemfdProvider::new("test"));
    }

    fn require_real() -> bool {
        std::env::var("DMAHEAP_REQUIRE_REAL_HEAP").is_ok_and(|v| v == "1")
    }

    /// Runs against the real /dev/dma_heap/system where it exists (e.g. inside a guest);
    /// with DMAHEAP_REQUIRE_REAL_HEAP=1 its absence fails instead of skipping.
    #[test]
    fn dma_heap_system_provider() {
        let path = Path::new("/dev/dma_heap/system");
        if !path.exists() {
            assert!(
                !require_real(),
                "DMAHEAP_REQUIRE_REAL_HEAP=1 but /dev/dma_heap/system is missing"
            );
            eprintln!("skipped: no /dev/dma_heap/system");
            return;
        }
        let p = DmaHeapProvider::open("system").unwrap();
        exercise(&p);
    }

    /// Runs where /dev/udmabuf exists; with DMAHEAP_REQUIRE_UDMABUF=1 its absence fails.
    #[test]
    fn udmabuf_provider() {
        match UdmabufProvider::open("test") {
            Ok(p) => exercise(&p),
            Err(e) => {
                assert!(
                    std::env::var("DMAHEAP_REQUIRE_UDMABUF").as_deref() != Ok("1"),
                    "DMAHEAP_REQUIRE_UDMABUF=1 but /dev/udmabuf is unusable: {e}"
                );
                eprintln!("skipped: {e}");
            }
        }
    }

    #[test]
    fn missing_heap_is_an_open_error() {
        let e = DmaHeapProvider::open("no-such-heap-here").unwrap_err();
        assert!(matches!(e, ProviderError::Open { .. }));
    }
}
