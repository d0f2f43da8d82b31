//! memfd-backed buffers, for hosts without dma-heaps (no dma-buf, no sync needed).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use nix::fcntl::{fallocate, FallocateFlags, SealFlag};

use super::{
    check_range, dup_file, file_read_at, file_write_at, new_memfd, next_data, to_off, udmabuf_over,
    write_zeroes_resident, Export, ExportKind, HeapProvider, HostBuffer, ProviderError, Result,
};

/// Largest freed range zeroed by writing zeroes over its resident pages rather than by
/// punching a hole. Writing keeps the pages, so the next user does not fault them in
/// again, but it costs every FREE the range's resident size whether or not the buffer was
/// written: at 8 MiB a recycled ALLOC + FREE of an untouched buffer took 1.4 ms instead of
/// 0.1 ms (bench/README.md).
pub const ZERO_BY_WRITE_MAX: u64 = 256 << 10;

/// Plain memfd buffers.
#[derive(Debug)]
pub struct MemfdProvider {
    name: String,
    /// `/dev/udmabuf`, if the host has one: exports of a range of a memfd (an arena's
    /// buffer) are udmabufs over that range.
    udmabuf: Option<Arc<File>>,
}

impl MemfdProvider {
    /// A provider naming its memfds after `name`; ranges of its memfds cannot be exported.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            udmabuf: None,
        }
    }

    /// A provider that exports ranges of its memfds as udmabufs through `udmabuf` (an open
    /// `/dev/udmabuf`, see [`super::udmabuf::open_udmabuf_dev`]).
    pub fn with_udmabuf(name: &str, udmabuf: Option<Arc<File>>) -> Self {
        Self {
            name: name.to_string(),
            udmabuf,
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
        Ok(Box::new(MemfdBuffer {
            file,
            size: len,
            udmabuf: self.udmabuf.clone(),
        }))
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
    udmabuf: Option<Arc<File>>,
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
        // An arena's range is reused soon: writing zeroes keeps its pages, so the next user
        // does not fault them in again (and no hole punch has to unmap them everywhere).
        // Pages never touched stay holes: nothing is written there.
        if len <= ZERO_BY_WRITE_MAX {
            return write_zeroes_resident(&self.file, offset, len);
        }
        // Punching a hole zeroes the range in every mapping and gives the pages back. A
        // range that is a hole already (never touched) needs no punch, whose unmapping
        // walks every mapping of the range.
        let Some(data) = next_data(&self.file, offset, offset + len)? else {
            return Ok(());
        };
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            to_off(data)?,
            to_off(offset + len - data)?,
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

    /// The whole buffer: its own memfd (sealed against growing and shrinking); a range: a
    /// udmabuf over it where `/dev/udmabuf` exists, else nothing.
    fn export(&self, offset: u64, len: u64) -> Result<Option<Export>> {
        check_range(offset, len, self.size)?;
        if offset == 0 && len == self.size {
            return Ok(Some(Export {
                file: dup_file(self.file.as_fd())?,
                kind: ExportKind::Memfd,
            }));
        }
        let Some(dev) = &self.udmabuf else {
            return Ok(None);
        };
        Ok(Some(Export {
            file: udmabuf_over(dev, &self.file, offset, len)?,
            kind: ExportKind::DmaBuf,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_provider() {
        super::super::exercise(&MemfdProvider::new("test"));
    }

    /// An arena range is zeroed by writing over its touched pages only: the bytes read
    /// zero, the pages the guest touched stay resident, the untouched ones stay holes.
    #[test]
    fn zeroes_touched_pages_by_writing_and_leaves_holes_alone() {
        const LEN: u64 = ZERO_BY_WRITE_MAX;
        let b = MemfdProvider::new("test").allocate(LEN).unwrap();
        // Touched: the first page, 16 KiB in the middle, the last page.
        for (at, len) in [(0, 4096), (LEN / 2, 16 << 10), (LEN - 4096, 4096)] {
            b.write_at(at, &vec![0xa5; len]).unwrap();
        }
        let blocks = |b: &dyn HostBuffer| nix::sys::stat::fstat(b.fd()).unwrap().st_blocks;
        let before = blocks(&*b);
        b.zero(0, LEN).unwrap();
        assert_eq!(blocks(&*b), before, "zeroing allocated or freed pages");
        let mut all = vec![1u8; LEN as usize];
        b.read_at(0, &mut all).unwrap();
        assert!(all.iter().all(|&x| x == 0), "not zeroed");
        // Above the limit a hole is punched: the pages go back.
        let big = MemfdProvider::new("test")
            .allocate(2 * ZERO_BY_WRITE_MAX)
            .unwrap();
        big.write_at(0, &vec![0xa5; 64 << 10]).unwrap();
        big.zero(0, 2 * ZERO_BY_WRITE_MAX).unwrap();
        assert_eq!(blocks(&*big), 0, "a large range keeps its pages");
        // Its first touched page far inside the range: punched from there, to the end.
        let len = 2 * ZERO_BY_WRITE_MAX;
        big.write_at(len - 8192, &[0xa5; 8192]).unwrap();
        big.zero(4096, len - 4096).unwrap();
        assert_eq!(blocks(&*big), 0, "the touched tail kept its pages");
        let mut tail = [1u8; 8192];
        big.read_at(len - 8192, &mut tail).unwrap();
        assert!(
            tail.iter().all(|&x| x == 0),
            "the touched tail is not zeroed"
        );
    }

    #[test]
    fn exports_the_whole_memfd_and_no_range_without_udmabuf() {
        use std::os::unix::fs::FileExt;
        let b = MemfdProvider::new("test").allocate(64 * 1024).unwrap();
        b.write_at(4096, b"whole").unwrap();
        let e = b.export(0, 64 * 1024).unwrap().unwrap();
        assert_eq!(e.kind, ExportKind::Memfd);
        assert_eq!(e.file.metadata().unwrap().len(), 64 * 1024);
        let mut got = [0u8; 5];
        e.file.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(&got, b"whole");
        e.file.write_all_at(b"back", 8192).unwrap();
        let mut back = [0u8; 4];
        b.read_at(8192, &mut back).unwrap();
        assert_eq!(&back, b"back");
        assert!(e.file.set_len(128 * 1024).is_err(), "the size is sealed");
        assert!(b.export(4096, 4096).unwrap().is_none());
        assert!(b.export(60 * 1024, 8192).is_err());
    }

    /// Where /dev/udmabuf exists: a range is exported as a udmabuf of exactly that range.
    #[test]
    fn exports_a_range_as_udmabuf_where_available() {
        let Some(dev) = super::super::udmabuf::open_udmabuf_dev() else {
            eprintln!("skipped: no /dev/udmabuf");
            return;
        };
        // udmabuf takes page-aligned ranges of the kernel's page size (16 KiB on some arm64).
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096);
        let b = MemfdProvider::with_udmabuf("test", Some(dev))
            .allocate(16 * page)
            .unwrap();
        let e = b.export(2 * page, page).unwrap().unwrap();
        assert_eq!(e.kind, ExportKind::DmaBuf);
        use std::io::{Seek, SeekFrom};
        let mut f = e.file;
        assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), page);
    }
}
