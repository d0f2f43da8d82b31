//! Shared harness of the fuzz targets: a device core with two small heaps over a
//! fault-injecting memfd provider, a fake mapper that checks what QEMU checks, and the wire
//! constants (from the header-checked abi.rs).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vhost_user_dmaheap::device::{
    CacheMode, Device, Heap, HeapParams, Limits, MapError, Mapper, Reply,
};
use vhost_user_dmaheap::provider::{HeapProvider, HostBuffer, MemfdProvider, ProviderError};

pub const PAGE: u64 = 4096;

// From the daemon's mirror of spec/virtio_dmaheap.h, which tests/abi_layout.rs checks
// against the header: no unchecked copy of the wire constants. (Each target compiles this
// module on its own and uses part of it, hence the allows.)
#[allow(unused_imports)]
pub use vhost_user_dmaheap::abi::{
    VIRTIO_DMAHEAP_CLOSE_SUSPEND as CLOSE_SUSPEND, VIRTIO_DMAHEAP_F_SESSION as F_SESSION,
    VIRTIO_DMAHEAP_F_SYNC as F_SYNC, VIRTIO_DMAHEAP_REQ_RESERVE as REQ_RESERVE,
    VIRTIO_DMAHEAP_REQ_SESSION_CLOSE as REQ_SESSION_CLOSE,
    VIRTIO_DMAHEAP_REQ_SESSION_OPEN as REQ_SESSION_OPEN,
    VIRTIO_DMAHEAP_REQ_UNRESERVE as REQ_UNRESERVE, VIRTIO_DMAHEAP_S_NO_SESSION as S_NO_SESSION,
};
#[allow(unused_imports)]
pub use vhost_user_dmaheap::abi::{
    VIRTIO_DMAHEAP_REQ_ALLOC as REQ_ALLOC, VIRTIO_DMAHEAP_REQ_FREE as REQ_FREE,
    VIRTIO_DMAHEAP_REQ_HEAP_INFO as REQ_HEAP_INFO, VIRTIO_DMAHEAP_REQ_SYNC as REQ_SYNC,
    VIRTIO_DMAHEAP_S_INVAL as S_INVAL, VIRTIO_DMAHEAP_S_IOERR as S_IOERR,
    VIRTIO_DMAHEAP_S_NOMEM as S_NOMEM, VIRTIO_DMAHEAP_S_NO_BUFFER as S_NO_BUFFER,
    VIRTIO_DMAHEAP_S_NO_HEAP as S_NO_HEAP, VIRTIO_DMAHEAP_S_OK as S_OK,
    VIRTIO_DMAHEAP_S_QUOTA as S_QUOTA, VIRTIO_DMAHEAP_S_TOO_BIG as S_TOO_BIG,
    VIRTIO_DMAHEAP_S_UNSUPP as S_UNSUPP, VIRTIO_DMAHEAP_S_WINDOW_FULL as S_WINDOW_FULL,
};

pub const RESP_HDR: usize = std::mem::size_of::<vhost_user_dmaheap::abi::RespHdr>();
pub const HEAP_INFO_RESP: usize = std::mem::size_of::<vhost_user_dmaheap::abi::HeapInfoResp>();
pub const ALLOC_RESP: usize = std::mem::size_of::<vhost_user_dmaheap::abi::AllocResp>();
pub const SESSION_OPEN_RESP: usize =
    std::mem::size_of::<vhost_user_dmaheap::abi::SessionOpenResp>();

/// Window of the fuzzed device (small, so that quotas and WINDOW_FULL are reached).
pub const SHM_SIZE: u64 = 64 << 20;
pub const MAX_MAPPINGS: usize = 8;
pub const MAX_BUFFERS: u64 = 64;
pub const MAX_BYTES: u64 = 48 << 20;

/// memfd provider that fails on demand (ENOMEM or EIO).
#[derive(Debug, Default)]
pub struct Faults {
    pub nomem: AtomicU32,
    pub io: AtomicU32,
    pub allocations: AtomicU64,
}

#[derive(Debug)]
pub struct FaultProvider(pub Arc<Faults>);

impl HeapProvider for FaultProvider {
    fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>, ProviderError> {
        let take = |c: &AtomicU32| {
            c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok()
        };
        if take(&self.0.nomem) {
            return Err(ProviderError::NoMemory(io::Error::from(
                io::ErrorKind::OutOfMemory,
            )));
        }
        if take(&self.0.io) {
            return Err(ProviderError::Io {
                what: "injected",
                source: io::Error::other("injected failure"),
            });
        }
        self.0.allocations.fetch_add(1, Ordering::SeqCst);
        MemfdProvider::new("fuzz").allocate(len)
    }

    fn describe(&self) -> String {
        "fuzz".into()
    }
}

/// A mapper that behaves like QEMU: refuses overlaps and out-of-window ranges, and can
/// be told to refuse maps, to refuse unmaps (as QEMU does for a mapping it no longer has:
/// the mapping goes), or that the ring stopped (every request is `NotRunning`).
#[derive(Debug, Default)]
pub struct FakeMapper {
    /// Live mappings: offset -> len.
    pub mapped: BTreeMap<u64, u64>,
    pub fail_maps: u32,
    pub fail_unmaps: u32,
    pub stopped: bool,
    /// Protocol violations seen (the device asked for something QEMU rejects).
    pub violations: Vec<String>,
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
        if self.fail_maps > 0 {
            self.fail_maps -= 1;
            return Err(MapError::Refused(io::Error::other("injected refusal")));
        }
        let end = shm_offset.checked_add(len);
        if len == 0 || end.is_none_or(|e| e > SHM_SIZE) || fd_offset != 0 {
            self.violations
                .push(format!("map {shm_offset:#x}+{len:#x} outside the window"));
            return Err(MapError::Refused(io::Error::other("out of range")));
        }
        if let Some((&o, &l)) = self
            .mapped
            .range(..shm_offset + len)
            .next_back()
            .filter(|(&o, &l)| o + l > shm_offset)
        {
            self.violations.push(format!(
                "map {shm_offset:#x}+{len:#x} overlaps {o:#x}+{l:#x}"
            ));
            return Err(MapError::Refused(io::Error::other("overlap")));
        }
        self.mapped.insert(shm_offset, len);
        Ok(())
    }

    fn unmap(&mut self, shm_offset: u64, len: u64) -> Result<(), MapError> {
        if self.stopped {
            return Err(MapError::NotRunning);
        }
        if self.fail_unmaps > 0 && self.mapped.get(&shm_offset) == Some(&len) {
            self.fail_unmaps -= 1;
            self.mapped.remove(&shm_offset);
            return Err(MapError::Refused(io::Error::other(
                "injected: no such mapping",
            )));
        }
        if self.mapped.get(&shm_offset) != Some(&len) {
            self.violations
                .push(format!("unmap {shm_offset:#x}+{len:#x} of no mapping"));
            return Err(MapError::Refused(io::Error::other("no such mapping")));
        }
        self.mapped.remove(&shm_offset);
        Ok(())
    }
}

impl FakeMapper {
    /// True if [off, off+len) is covered by live mappings.
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

pub fn heap_params() -> Vec<HeapParams> {
    vec![
        HeapParams {
            name: "system".into(),
            contiguous: false,
            cache: CacheMode::Cached,
            min_align: PAGE,
            max_size: 16 << 20,
            max_bytes: None,
            arena_size: 4 << 20,
        },
        HeapParams {
            name: "quota".into(),
            contiguous: true,
            cache: CacheMode::WriteCombined,
            min_align: 64 << 10,
            max_size: 8 << 20,
            max_bytes: Some(16 << 20),
            arena_size: 2 << 20,
        },
    ]
}

pub fn limits() -> Limits {
    Limits {
        shm_size: SHM_SIZE,
        max_mappings: MAX_MAPPINGS,
        max_buffers: MAX_BUFFERS,
        max_bytes: MAX_BYTES,
    }
}

/// A fresh device over the fault-injecting provider.
pub fn device() -> (Device, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let heaps = heap_params()
        .into_iter()
        .map(|params| Heap {
            params,
            provider: Box::new(FaultProvider(faults.clone())),
        })
        .collect();
    (
        Device::new(heaps, limits(), Arc::new(AtomicU64::new(1))),
        faults,
    )
}

pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

pub fn hdr(ty: u32, reserved: u32) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend_from_slice(&reserved.to_le_bytes());
    v
}

pub fn heap_info_req(heap: u32) -> Vec<u8> {
    let mut v = hdr(REQ_HEAP_INFO, 0);
    v.extend_from_slice(&heap.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

pub fn alloc_req(heap: u32, flags: u32, len: u64) -> Vec<u8> {
    let mut v = hdr(REQ_ALLOC, 0);
    v.extend_from_slice(&heap.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v
}

pub fn free_req(id: u64) -> Vec<u8> {
    let mut v = hdr(REQ_FREE, 0);
    v.extend_from_slice(&id.to_le_bytes());
    v
}

pub fn sync_req(id: u64, flags: u32) -> Vec<u8> {
    let mut v = hdr(REQ_SYNC, 0);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// Handles a request like the vring worker does: a request that asks for a retry (the
/// ring stopped) is served again once the ring runs (`mapper.stopped` cleared). Returns
/// the answer and whether a retry happened; a retry must have changed nothing visible.
pub fn serve(
    dev: &mut Device,
    req: &[u8],
    writable: usize,
    mapper: &mut FakeMapper,
) -> (Vec<u8>, bool) {
    match dev.handle(req, writable, mapper) {
        Reply::Answer(a) => (a, false),
        Reply::Retry => {
            assert!(mapper.stopped, "a retry while the ring runs");
            mapper.stopped = false;
            match dev.handle(req, writable, mapper) {
                Reply::Answer(a) => (a, true),
                Reply::Retry => panic!("a retry with the ring running"),
            }
        }
    }
}

pub fn session_open_req(resume: u64) -> Vec<u8> {
    let mut v = hdr(REQ_SESSION_OPEN, 0);
    v.extend_from_slice(&resume.to_le_bytes());
    v
}

pub fn session_close_req(flags: u32) -> Vec<u8> {
    let mut v = hdr(REQ_SESSION_CLOSE, 0);
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

pub fn reserve_req(ty: u32, off: u64, len: u64) -> Vec<u8> {
    let mut v = hdr(ty, 0);
    v.extend_from_slice(&off.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// Checks what holds for every response, whatever the request: returns the status, or
/// None when nothing was written.
pub fn check_response(resp: &[u8], writable: usize) -> Option<u32> {
    assert!(
        resp.len() <= writable,
        "response of {} bytes for {writable} writable",
        resp.len()
    );
    if writable < RESP_HDR {
        assert!(
            resp.is_empty(),
            "wrote into a writable part below a resp_hdr"
        );
        return None;
    }
    assert!(
        resp.len() >= RESP_HDR,
        "no resp_hdr in {writable} writable bytes"
    );
    let status = le32(resp, 0);
    assert!(status <= S_NO_SESSION, "undefined status {status}");
    assert_eq!(le32(resp, 4), 0, "resp_hdr.reserved not 0");
    Some(status)
}
