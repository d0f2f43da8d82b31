//! Shared harness of the fuzz targets: a device core with two small heaps over the
//! daemon's shared fakes (`vhost_user_dmaheap::testing`: the fault-injecting memfd
//! provider, the mapper that refuses what QEMU refuses, the request encoders), and the
//! wire constants (from the header-checked abi.rs).
#![allow(dead_code)]

use std::sync::Arc;

use vhost_user_dmaheap::core::{CacheMode, Device, HeapParams, Limits};
#[allow(unused_imports)]
pub use vhost_user_dmaheap::testing::{
    alloc_batch_req, alloc_req, assign_uuid_req, device_with, free_req, heap_info_req, le32, le64,
    reserve_req, serve_with_retry, session_close_req, session_open_req, sync_req, FakeMapper,
    Faults,
};

pub const PAGE: u64 = 4096;

// From the daemon's mirror of spec/virtio_dmaheap.h, which tests/abi_layout.rs checks
// against the header: no unchecked copy of the wire constants. (Each target compiles this
// module on its own and uses part of it, hence the allows.)
#[allow(unused_imports)]
pub use vhost_user_dmaheap::abi::{
    VIRTIO_DMAHEAP_CLOSE_SUSPEND as CLOSE_SUSPEND, VIRTIO_DMAHEAP_F_BATCH as F_BATCH,
    VIRTIO_DMAHEAP_F_HEAP_RANGE as F_HEAP_RANGE, VIRTIO_DMAHEAP_F_PAGE_SIZE as F_PAGE_SIZE,
    VIRTIO_DMAHEAP_F_SESSION as F_SESSION, VIRTIO_DMAHEAP_F_SYNC as F_SYNC,
    VIRTIO_DMAHEAP_F_UUID as F_UUID, VIRTIO_DMAHEAP_REQ_ASSIGN_UUID as REQ_ASSIGN_UUID,
    VIRTIO_DMAHEAP_REQ_RESERVE as REQ_RESERVE,
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
pub const HEAP_INFO_RANGE_RESP: usize =
    std::mem::size_of::<vhost_user_dmaheap::abi::HeapInfoRangeResp>();
pub const ALLOC_RESP: usize = std::mem::size_of::<vhost_user_dmaheap::abi::AllocResp>();
pub const ALLOC_BATCH_RESP: usize = std::mem::size_of::<vhost_user_dmaheap::abi::AllocBatchResp>();
pub const ASSIGN_UUID_RESP: usize = std::mem::size_of::<vhost_user_dmaheap::abi::AssignUuidResp>();
pub const SESSION_OPEN_RESP: usize =
    std::mem::size_of::<vhost_user_dmaheap::abi::SessionOpenResp>();

/// Window of the fuzzed device (small, so that quotas and WINDOW_FULL are reached).
pub const SHM_SIZE: u64 = 64 << 20;
pub const MAX_MAPPINGS: usize = 8;
pub const MAX_BUFFERS: u64 = 64;
pub const MAX_BYTES: u64 = 48 << 20;

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

/// The heap range (offset, len) of heap `h`, as the spec's layout gives it (written out
/// here rather than taken from the device): the cached heap first, then the wc heap, each
/// half of the window.
pub fn heap_range(h: usize) -> (u64, u64) {
    let half = SHM_SIZE / 2;
    match heap_params()[h].cache {
        CacheMode::Cached => (0, half),
        _ => (half, half),
    }
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
    device_with(heap_params(), limits())
}

/// A mapper that checks maps against the fuzzed window.
pub fn mapper() -> FakeMapper {
    FakeMapper::with_window(SHM_SIZE)
}

/// Handles a request like the vring worker does (a retry once the ring runs again).
pub fn serve(
    dev: &mut Device,
    req: &[u8],
    writable: usize,
    mapper: &mut FakeMapper,
) -> (Vec<u8>, bool) {
    serve_with_retry(dev, req, writable, mapper)
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
