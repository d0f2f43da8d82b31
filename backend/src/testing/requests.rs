//! Requests encoded byte by byte (little-endian), from the constants of the
//! header-checked [`crate::abi`] but not with its structs: an independent check of the
//! decoder. One set of encoders for unit tests, integration tests, fuzzing and benches.

use std::mem::size_of;

use crate::abi::{self, *};

/// Size of `struct virtio_dmaheap_resp_hdr`.
pub const RESP_HDR_SIZE: usize = size_of::<abi::RespHdr>();
/// Size of the HEAP_INFO response.
pub const HEAP_INFO_RESP_SIZE: usize = size_of::<abi::HeapInfoResp>();
/// Size of the HEAP_INFO response with `VIRTIO_DMAHEAP_F_HEAP_RANGE`.
pub const HEAP_INFO_RANGE_RESP_SIZE: usize = size_of::<abi::HeapInfoRangeResp>();
/// Size of the ALLOC response.
pub const ALLOC_RESP_SIZE: usize = size_of::<abi::AllocResp>();
/// Size of the ALLOC_BATCH response.
pub const ALLOC_BATCH_RESP_SIZE: usize = size_of::<abi::AllocBatchResp>();
/// Size of the ASSIGN_UUID response.
pub const ASSIGN_UUID_RESP_SIZE: usize = size_of::<abi::AssignUuidResp>();
/// Size of the SESSION_OPEN response.
pub const SESSION_OPEN_RESP_SIZE: usize = size_of::<abi::SessionOpenResp>();

/// Little-endian request builder.
#[derive(Debug, Default, Clone)]
pub struct Req(pub Vec<u8>);

impl Req {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a `__le32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `__le64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// The bytes.
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

/// A request header.
pub fn req_hdr(ty: u32, reserved: u32) -> Req {
    Req::new().u32(ty).u32(reserved)
}

/// HEAP_INFO.
pub fn heap_info_req(heap_id: u32) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_HEAP_INFO, 0)
        .u32(heap_id)
        .u32(0)
        .build()
}

/// ALLOC_BATCH.
pub fn alloc_batch_req(heap_id: u32, count: u32, len: u64) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_ALLOC_BATCH, 0)
        .u32(heap_id)
        .u32(count)
        .u64(len)
        .build()
}

/// ALLOC.
pub fn alloc_req(heap_id: u32, flags: u32, len: u64) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_ALLOC, 0)
        .u32(heap_id)
        .u32(flags)
        .u64(len)
        .build()
}

/// FREE.
pub fn free_req(buffer_id: u64) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_FREE, 0).u64(buffer_id).build()
}

/// SYNC.
pub fn sync_req(buffer_id: u64, flags: u32) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_SYNC, 0)
        .u64(buffer_id)
        .u32(flags)
        .u32(0)
        .build()
}

/// ASSIGN_UUID (never offered).
pub fn assign_uuid_req(buffer_id: u64) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_ASSIGN_UUID, 0)
        .u64(buffer_id)
        .build()
}

/// SESSION_OPEN.
pub fn session_open_req(resume_id: u64) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN, 0)
        .u64(resume_id)
        .build()
}

/// SESSION_OPEN with `VIRTIO_DMAHEAP_F_PAGE_SIZE`: the driver's page size too.
pub fn session_open_page_req(resume_id: u64, page_size: u32) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN, 0)
        .u64(resume_id)
        .u32(page_size)
        .u32(0)
        .build()
}

/// SESSION_CLOSE.
pub fn session_close_req(flags: u32) -> Vec<u8> {
    req_hdr(VIRTIO_DMAHEAP_REQ_SESSION_CLOSE, 0)
        .u32(flags)
        .u32(0)
        .build()
}

/// RESERVE or UNRESERVE (`ty`).
pub fn reserve_req(ty: u32, offset: u64, len: u64) -> Vec<u8> {
    req_hdr(ty, 0).u64(offset).u64(len).build()
}

/// The `__le32` at `off`.
pub fn le32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

/// The `__le64` at `off`.
pub fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// The status of a response (which must hold a header).
pub fn status_of(resp: &[u8]) -> u32 {
    le32(resp, 0)
}
