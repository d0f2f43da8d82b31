//! A host provider with fault injection and a mapper that refuses what QEMU refuses.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::core::{MapError, Mapper};
use crate::host::{Export, ExportKind, HeapProvider, HostBuffer, MemfdProvider, ProviderError};

/// Faults to inject into a [`FakeProvider`] (each counter: that many next calls fail) and
/// what it counts.
#[derive(Debug, Default)]
pub struct Faults {
    /// Allocations that fail with ENOMEM.
    pub nomem: AtomicU32,
    /// Allocations that fail with EIO (what a dma-heap provider reports when mapping the
    /// new dma-buf on the host fails).
    pub io: AtomicU32,
    /// Zeroings that fail.
    pub zero_fails: AtomicU32,
    /// `DMA_BUF_IOCTL_SYNC`s that fail.
    pub sync_fails: AtomicU32,
    /// Successful allocations.
    pub allocations: AtomicU64,
    /// Calls of [`HostBuffer::zero`].
    pub zeroings: AtomicU64,
    /// Calls of [`HostBuffer::sync`].
    pub syncs: AtomicU64,
    /// Host buffers alive.
    pub live: AtomicI64,
    /// Exports that fail with EIO.
    pub export_fails: AtomicU32,
    /// Make every export a pollable stand-in for a dma-buf (a pipe's read end: what the
    /// release watch needs of a dma-buf, without /dev/udmabuf), even of a range of an arena.
    /// It maps nothing: only for tests of the lifetime bookkeeping.
    pub fake_dmabuf_exports: std::sync::atomic::AtomicBool,
    /// Calls of [`HostBuffer::export`].
    pub exports: AtomicU64,
}

fn take(c: &AtomicU32) -> bool {
    c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

/// memfd buffers (memfds named `dmaheap-<name>`), failing on demand.
#[derive(Debug)]
pub struct FakeProvider {
    name: String,
    faults: Arc<Faults>,
}

impl FakeProvider {
    /// A provider whose faults are `faults`.
    pub fn new(name: &str, faults: Arc<Faults>) -> Self {
        Self {
            name: name.into(),
            faults,
        }
    }
}

impl HeapProvider for FakeProvider {
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>, ProviderError> {
        if take(&self.faults.nomem) {
            return Err(ProviderError::NoMemory(io::Error::from_raw_os_error(
                libc::ENOMEM,
            )));
        }
        if take(&self.faults.io) {
            return Err(ProviderError::Io {
                what: "injected",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        let inner = MemfdProvider::new(&self.name).allocate(len)?;
        self.faults.allocations.fetch_add(1, Ordering::SeqCst);
        self.faults.live.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(CountedBuffer {
            inner,
            faults: self.faults.clone(),
        }))
    }

    fn describe(&self) -> String {
        "fake".into()
    }
}

/// A buffer of a [`FakeProvider`].
#[derive(Debug)]
pub struct CountedBuffer {
    inner: Box<dyn HostBuffer>,
    faults: Arc<Faults>,
}

impl Drop for CountedBuffer {
    fn drop(&mut self) {
        self.faults.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HostBuffer for CountedBuffer {
    fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn zero(&self, offset: u64, len: u64) -> Result<(), ProviderError> {
        self.faults.zeroings.fetch_add(1, Ordering::SeqCst);
        if take(&self.faults.zero_fails) {
            return Err(ProviderError::Io {
                what: "injected mmap for zeroing",
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.inner.zero(offset, len)
    }
    fn sync(&self, flags: u64) -> Result<(), ProviderError> {
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        if take(&self.faults.sync_fails) {
            return Err(ProviderError::Io {
                what: "injected DMA_BUF_IOCTL_SYNC",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.inner.sync(flags)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError> {
        self.inner.write_at(offset, data)
    }
    fn export(&self, offset: u64, len: u64) -> Result<Option<Export>, ProviderError> {
        self.faults.exports.fetch_add(1, Ordering::SeqCst);
        if take(&self.faults.export_fails) {
            return Err(ProviderError::Io {
                what: "injected export",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        if self.faults.fake_dmabuf_exports.load(Ordering::SeqCst) {
            crate::host::check_range(offset, len, self.size())?;
            let (r, w) = nix::unistd::pipe().map_err(|e| ProviderError::io("pipe", e))?;
            drop(w);
            return Ok(Some(Export {
                file: std::fs::File::from(r),
                kind: ExportKind::DmaBuf,
            }));
        }
        self.inner.export(offset, len)
    }
}

/// A mapper that behaves like QEMU 11.1: a map that overlaps a live mapping or leaves the
/// window, and an unmap of no mapping, are refused; the device must never ask for one, so
/// these panic (a test or fuzz failure). It can be told to refuse maps, to refuse unmaps
/// (as QEMU does for a mapping it no longer has: the mapping goes), or that the ring
/// stopped (every request is [`MapError::NotRunning`]).
#[derive(Debug, Default)]
pub struct FakeMapper {
    /// Window size, if maps are to be checked against it.
    pub window: Option<u64>,
    /// Live mappings: offset -> length.
    pub mapped: BTreeMap<u64, u64>,
    /// Successful maps.
    pub maps: u64,
    /// Successful unmaps.
    pub unmaps: u64,
    /// Maps to refuse (`u32::MAX`: all).
    pub refuse_maps: u32,
    /// Unmaps to refuse after dropping the mapping (`u32::MAX`: all).
    pub refuse_unmaps: u32,
    /// The ring stopped.
    pub stopped: bool,
    /// UUIDs registered (SHARED_OBJECT_ADD) and not withdrawn, as QEMU's table holds them.
    pub shared: std::collections::BTreeSet<[u8; 16]>,
    /// The front end has no shared-object table (SHARED_OBJECT not negotiated).
    pub no_shared_objects: bool,
    /// SHARED_OBJECT_ADDs to refuse (`u32::MAX`: all).
    pub refuse_shares: u32,
    /// Successful SHARED_OBJECT_ADDs and _REMOVEs.
    pub shares: u64,
    /// Successful SHARED_OBJECT_REMOVEs.
    pub unshares: u64,
}

fn take_count(c: &mut u32) -> bool {
    match *c {
        0 => false,
        u32::MAX => true,
        _ => {
            *c -= 1;
            true
        }
    }
}

impl FakeMapper {
    /// A mapper checking maps against a window of `size` bytes.
    pub fn with_window(size: u64) -> Self {
        Self {
            window: Some(size),
            ..Self::default()
        }
    }

    /// Whether exactly `[off, off + len)` is mapped.
    pub fn has(&self, off: u64, len: u64) -> bool {
        self.mapped.get(&off) == Some(&len)
    }

    /// Whether `[off, off + len)` is covered by live mappings.
    pub fn covers(&self, off: u64, len: u64) -> bool {
        let Some(end) = off.checked_add(len) else {
            return false;
        };
        let mut pos = off;
        while pos < end {
            match self
                .mapped
                .range(..=pos)
                .next_back()
                .filter(|(&o, &l)| pos < o + l)
            {
                Some((&o, &l)) => pos = o + l,
                None => return false,
            }
        }
        true
    }
}

impl Mapper for FakeMapper {
    fn map(
        &mut self,
        _fd: BorrowedFd<'_>,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
    ) -> Result<(), MapError> {
        if self.stopped {
            return Err(MapError::NotRunning);
        }
        if take_count(&mut self.refuse_maps) {
            return Err(MapError::Refused(io::Error::other("injected refusal")));
        }
        let end = shm_offset.checked_add(len);
        assert!(
            len != 0 && fd_offset == 0 && end.is_some_and(|e| self.window.is_none_or(|w| e <= w)),
            "map {shm_offset:#x}+{len:#x} outside the window"
        );
        if let Some((&o, &l)) = self
            .mapped
            .range(..shm_offset + len)
            .next_back()
            .filter(|(&o, &l)| o + l > shm_offset)
        {
            panic!("map {shm_offset:#x}+{len:#x} overlaps {o:#x}+{l:#x}");
        }
        self.mapped.insert(shm_offset, len);
        self.maps += 1;
        Ok(())
    }

    fn share(&mut self, uuid: &[u8; 16]) -> Result<(), MapError> {
        if self.stopped {
            return Err(MapError::NotRunning);
        }
        if self.no_shared_objects {
            return Err(MapError::Unsupported);
        }
        if take_count(&mut self.refuse_shares) {
            return Err(MapError::Refused(io::Error::other("injected refusal")));
        }
        assert!(self.shared.insert(*uuid), "UUID {uuid:02x?} added twice");
        self.shares += 1;
        Ok(())
    }

    fn unshare(&mut self, uuid: &[u8; 16]) -> Result<(), MapError> {
        if self.stopped {
            return Err(MapError::NotRunning);
        }
        assert!(
            !self.no_shared_objects && self.shared.remove(uuid),
            "REMOVE of UUID {uuid:02x?}, which is not registered"
        );
        self.unshares += 1;
        Ok(())
    }

    fn unmap(&mut self, shm_offset: u64, len: u64) -> Result<(), MapError> {
        if self.stopped {
            return Err(MapError::NotRunning);
        }
        assert!(
            self.has(shm_offset, len),
            "unmap {shm_offset:#x}+{len:#x} of no mapping"
        );
        self.mapped.remove(&shm_offset);
        if take_count(&mut self.refuse_unmaps) {
            return Err(MapError::Refused(io::Error::other(
                "injected: no such mapping",
            )));
        }
        self.unmaps += 1;
        Ok(())
    }
}
