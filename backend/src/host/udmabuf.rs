//! memfd buffers exported as dma-bufs through `/dev/udmabuf`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::SealFlag;

use super::ioctl::{self, UdmabufCreate, DMA_BUF_SYNC_END, UDMABUF_FLAGS_CLOEXEC};
use super::{
    check_range, dma_buf_sync, file_read_at, file_write_at, new_memfd, write_zeroes_pwrite,
    HeapProvider, HostBuffer, ProviderError, Result,
};

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
        let raw = unsafe { ioctl::udmabuf_create(self.dev.as_raw_fd(), &create) }
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
        match dma_buf_sync(self.dmabuf.as_fd(), flags) {
            // udmabuf refuses an end of CPU access before any start (it has no sg table
            // yet); nothing began, so nothing is left to end. Spec 6.6.2 item 3: starts
            // and ends need not pair up.
            Err(ProviderError::Io { source, .. })
                if flags & DMA_BUF_SYNC_END != 0 && source.raw_os_error() == Some(libc::EINVAL) =>
            {
                Ok(())
            }
            r => r,
        }
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
    use super::*;

    /// Runs where /dev/udmabuf exists; with DMAHEAP_REQUIRE_UDMABUF=1 its absence fails.
    #[test]
    fn udmabuf_provider() {
        match UdmabufProvider::open("test") {
            Ok(p) => super::super::exercise(&p),
            Err(e) => {
                assert!(
                    std::env::var("DMAHEAP_REQUIRE_UDMABUF").as_deref() != Ok("1"),
                    "DMAHEAP_REQUIRE_UDMABUF=1 but /dev/udmabuf is unusable: {e}"
                );
                eprintln!("skipped: {e}");
            }
        }
    }
}
