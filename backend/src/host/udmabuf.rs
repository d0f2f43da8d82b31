//! memfd buffers exported as dma-bufs through `/dev/udmabuf`.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::SealFlag;

use super::ioctl::DMA_BUF_SYNC_END;
use super::{
    check_range, dma_buf_sync, dup_file, file_read_at, file_write_at, new_memfd, udmabuf_over,
    write_zeroes_pwrite, Export, ExportKind, HeapProvider, HostBuffer, ProviderError, Result,
};

/// memfd buffers exported as dma-bufs through `/dev/udmabuf`.
#[derive(Debug)]
pub struct UdmabufProvider {
    name: String,
    dev: Arc<File>,
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
            dev: Arc::new(dev),
        })
    }
}

/// Opens `/dev/udmabuf` if this host has one (for exports of memfd ranges).
pub fn open_udmabuf_dev() -> Option<Arc<File>> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/udmabuf")
        .ok()
        .map(Arc::new)
}

/// A udmabuf: the memfd (for zeroing with pwrite, never with hole punching, which would
/// detach the pages the dma-buf pins) and the dma-buf fd (mapped into the guest).
#[derive(Debug)]
pub struct Udmabuf {
    memfd: File,
    dmabuf: File,
    size: u64,
    dev: Arc<File>,
}

impl HeapProvider for UdmabufProvider {
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>> {
        let memfd = new_memfd(&self.name, len, SealFlag::F_SEAL_SHRINK)?;
        let dmabuf = udmabuf_over(&self.dev, &memfd, 0, len)?;
        Ok(Box::new(Udmabuf {
            memfd,
            dmabuf,
            size: len,
            dev: self.dev.clone(),
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

    fn export(&self, offset: u64, len: u64) -> Result<Option<Export>> {
        check_range(offset, len, self.size)?;
        let file = if offset == 0 && len == self.size {
            dup_file(self.dmabuf.as_fd())?
        } else {
            udmabuf_over(&self.dev, &self.memfd, offset, len)?
        };
        Ok(Some(Export {
            file,
            kind: ExportKind::DmaBuf,
        }))
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
