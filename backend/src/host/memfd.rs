//! memfd-backed buffers, for hosts without dma-heaps (no dma-buf, no sync needed).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use nix::fcntl::{fallocate, FallocateFlags, SealFlag};

use super::{
    check_range, file_read_at, file_write_at, new_memfd, to_off, write_zeroes_pwrite, HeapProvider,
    HostBuffer, ProviderError, Result,
};

/// Largest freed range zeroed by writing zeroes rather than by punching a hole.
pub const ZERO_BY_WRITE_MAX: u64 = 256 << 10;

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

    fn has_sync(&self) -> bool {
        false
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
        // A small range is reused soon: writing zeroes keeps its pages, so the next user
        // does not fault them in again (and no hole punch has to unmap them everywhere).
        if len <= ZERO_BY_WRITE_MAX {
            return write_zeroes_pwrite(&self.file, offset, len);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_provider() {
        super::super::exercise(&MemfdProvider::new("test"));
    }
}
