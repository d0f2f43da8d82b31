//! A host dma-heap, `/dev/dma_heap/<name>`: real dma-bufs (`DMA_HEAP_IOCTL_ALLOC`),
//! mapped once in the daemon for zeroing and debug access.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BS;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory, VolatileSlice};

use super::ioctl::{self, DmaHeapAllocationData};
use super::{
    check_range, dma_buf_sync, dup_file, Export, ExportKind, HeapProvider, HostBuffer,
    ProviderError, Result,
};

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
        // Through the CPU mapping of exactly this range, with no DMA_BUF_IOCTL_SYNC: that
        // has no range and would cover the whole buffer (an arena of up to 64 MiB), and
        // the only other users of a freed range are CPU mappings (the VMM's, the guest's),
        // which see these stores (spec 6.6, "What SYNC reaches").
        self.map.zero(offset, len)
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

    /// The whole dma-buf only: a heap's dma-buf cannot be cut into ranges.
    fn export(&self, offset: u64, len: u64) -> Result<Option<Export>> {
        check_range(offset, len, self.size)?;
        if offset != 0 || len != self.size {
            return Ok(None);
        }
        Ok(Some(Export {
            file: dup_file(self.fd.as_fd())?,
            kind: ExportKind::DmaBuf,
        }))
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
        unsafe { ioctl::dma_heap_alloc(self.dev.as_raw_fd(), &mut data) }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
        super::super::exercise(&p);
    }

    #[test]
    fn missing_heap_is_an_open_error() {
        let e = DmaHeapProvider::open("no-such-heap-here").unwrap_err();
        assert!(matches!(e, ProviderError::Open { .. }));
    }
}
