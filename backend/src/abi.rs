//! Rust mirror of the wire ABI in `spec/virtio_dmaheap.h`.
//!
//! Every structure is `#[repr(C)]`, made of little-endian fields only and has no padding;
//! `tests/abi_layout.rs` compares each size, field offset and constant with the C header.

use vm_memory::{ByteValued, Le32, Le64};

/// Device ID of virtio-dmaheap.
pub const VIRTIO_ID_DMAHEAP: u32 = 37;

/// Feature bit: the device accepts `VIRTIO_DMAHEAP_REQ_SYNC`.
pub const VIRTIO_DMAHEAP_F_SYNC: u32 = 0;
/// Feature bit: the device accepts `VIRTIO_DMAHEAP_REQ_ASSIGN_UUID`: buffers get UUIDs for
/// other devices.
pub const VIRTIO_DMAHEAP_F_UUID: u32 = 1;
/// Feature bit: buffers belong to a driver session (`SESSION_OPEN`, `SESSION_CLOSE`,
/// `RESERVE`, `UNRESERVE`).
pub const VIRTIO_DMAHEAP_F_SESSION: u32 = 2;
/// Feature: HEAP_INFO marks heaps whose SYNC does nothing on the host.
pub const VIRTIO_DMAHEAP_F_NO_SYNC: u32 = 3;
/// Feature: the device accepts `VIRTIO_DMAHEAP_REQ_ALLOC_BATCH`.
pub const VIRTIO_DMAHEAP_F_BATCH: u32 = 4;
/// Feature: SESSION_OPEN states the driver's page size
/// ([`SessionOpenPageReq`]); the session's buffers and reservations are aligned to it.
/// Needs `VIRTIO_DMAHEAP_F_SESSION`.
pub const VIRTIO_DMAHEAP_F_PAGE_SIZE: u32 = 5;
/// Feature: HEAP_INFO also states the window range that holds the heap's buffers
/// ([`HeapInfoRangeResp`]); heaps with different cache attributes get disjoint ranges.
pub const VIRTIO_DMAHEAP_F_HEAP_RANGE: u32 = 6;

/// Shared memory region id of the buffer window.
pub const VIRTIO_DMAHEAP_SHM_BUFFERS: u32 = 0;

/// Configuration-space magic ("DHAP" as little-endian bytes).
pub const VIRTIO_DMAHEAP_MAGIC: u32 = 0x5041_4844;
/// Configuration-space version.
pub const VIRTIO_DMAHEAP_VERSION: u32 = 1;
/// Smallest unit of the buffer window.
pub const VIRTIO_DMAHEAP_PAGE_SIZE: u32 = 4096;
/// Largest page size a driver may state with `VIRTIO_DMAHEAP_F_PAGE_SIZE`.
pub const VIRTIO_DMAHEAP_PAGE_SIZE_MAX: u32 = 65536;
/// Alignment of a heap range (`VIRTIO_DMAHEAP_F_HEAP_RANGE`) that is not the whole window.
pub const VIRTIO_DMAHEAP_RANGE_ALIGN: u64 = 0x20_0000;

/// Request type: describe one heap.
pub const VIRTIO_DMAHEAP_REQ_HEAP_INFO: u32 = 1;
/// Request type: allocate a buffer.
pub const VIRTIO_DMAHEAP_REQ_ALLOC: u32 = 2;
/// Request type: free a buffer.
pub const VIRTIO_DMAHEAP_REQ_FREE: u32 = 3;
/// Request type: bracket CPU access (needs `VIRTIO_DMAHEAP_F_SYNC`).
pub const VIRTIO_DMAHEAP_REQ_SYNC: u32 = 4;
/// Request type: give a buffer a UUID (needs `VIRTIO_DMAHEAP_F_UUID`).
pub const VIRTIO_DMAHEAP_REQ_ASSIGN_UUID: u32 = 5;
/// Request type: open or resume a session (needs `VIRTIO_DMAHEAP_F_SESSION`).
pub const VIRTIO_DMAHEAP_REQ_SESSION_OPEN: u32 = 6;
/// Request type: close or suspend the session (needs `VIRTIO_DMAHEAP_F_SESSION`).
pub const VIRTIO_DMAHEAP_REQ_SESSION_CLOSE: u32 = 7;
/// Request type: keep a window range out of allocations (needs `VIRTIO_DMAHEAP_F_SESSION`).
pub const VIRTIO_DMAHEAP_REQ_RESERVE: u32 = 8;
/// Request type: give a reserved range back (needs `VIRTIO_DMAHEAP_F_SESSION`).
pub const VIRTIO_DMAHEAP_REQ_UNRESERVE: u32 = 9;
/// Request type: several buffers of one heap and size (needs `VIRTIO_DMAHEAP_F_BATCH`).
pub const VIRTIO_DMAHEAP_REQ_ALLOC_BATCH: u32 = 10;
/// Most buffers one ALLOC_BATCH asks for.
pub const VIRTIO_DMAHEAP_BATCH_MAX: u32 = 16;

/// Status: success.
pub const VIRTIO_DMAHEAP_S_OK: u32 = 0;
/// Status: host-side failure (EIO).
pub const VIRTIO_DMAHEAP_S_IOERR: u32 = 1;
/// Status: malformed request or argument (EINVAL).
pub const VIRTIO_DMAHEAP_S_INVAL: u32 = 2;
/// Status: heap id out of range (ENODEV).
pub const VIRTIO_DMAHEAP_S_NO_HEAP: u32 = 3;
/// Status: unknown or freed buffer id (ENOENT).
pub const VIRTIO_DMAHEAP_S_NO_BUFFER: u32 = 4;
/// Status: the host heap is out of memory (ENOMEM).
pub const VIRTIO_DMAHEAP_S_NOMEM: u32 = 5;
/// Status: a per-VM or per-heap quota is reached (ENOMEM).
pub const VIRTIO_DMAHEAP_S_QUOTA: u32 = 6;
/// Status: no free range in the buffer window (ENOMEM).
pub const VIRTIO_DMAHEAP_S_WINDOW_FULL: u32 = 7;
/// Status: request type not offered (EOPNOTSUPP).
pub const VIRTIO_DMAHEAP_S_UNSUPP: u32 = 8;
/// Status: length above the heap's max_size (EINVAL).
pub const VIRTIO_DMAHEAP_S_TOO_BIG: u32 = 9;
/// Status: no open session, or not the session named (ENODEV).
pub const VIRTIO_DMAHEAP_S_NO_SESSION: u32 = 10;

/// SESSION_CLOSE flag: keep the buffers for a resume.
pub const VIRTIO_DMAHEAP_CLOSE_SUSPEND: u32 = 1 << 0;
/// Every SESSION_CLOSE flag this version defines.
pub const VIRTIO_DMAHEAP_CLOSE_VALID_MASK: u32 = VIRTIO_DMAHEAP_CLOSE_SUSPEND;

/// Heap flag: host-physically contiguous buffers.
pub const VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS: u32 = 1 << 0;
/// Heap flag: SYNC on this heap's buffers does nothing on the host.
pub const VIRTIO_DMAHEAP_HEAP_F_NO_SYNC: u32 = 1 << 1;
/// Every heap flag this version defines.
pub const VIRTIO_DMAHEAP_HEAP_F_VALID_MASK: u32 =
    VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS | VIRTIO_DMAHEAP_HEAP_F_NO_SYNC;

/// Cache attribute: cached.
pub const VIRTIO_DMAHEAP_CACHE_CACHED: u32 = 0;
/// Cache attribute: uncached.
pub const VIRTIO_DMAHEAP_CACHE_UNCACHED: u32 = 1;
/// Cache attribute: write-combined.
pub const VIRTIO_DMAHEAP_CACHE_WC: u32 = 2;

/// Length of a heap name, NUL terminator included.
pub const VIRTIO_DMAHEAP_NAME_LEN: usize = 32;

/// SYNC flag: CPU reads.
pub const VIRTIO_DMAHEAP_SYNC_READ: u32 = 1 << 0;
/// SYNC flag: CPU writes.
pub const VIRTIO_DMAHEAP_SYNC_WRITE: u32 = 1 << 1;
/// SYNC flag: end of CPU access (clear: start).
pub const VIRTIO_DMAHEAP_SYNC_END: u32 = 1 << 2;
/// Every SYNC flag this version defines.
pub const VIRTIO_DMAHEAP_SYNC_VALID_MASK: u32 =
    VIRTIO_DMAHEAP_SYNC_READ | VIRTIO_DMAHEAP_SYNC_WRITE | VIRTIO_DMAHEAP_SYNC_END;

/// `struct virtio_dmaheap_config`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `VIRTIO_DMAHEAP_MAGIC`.
    pub magic: Le32,
    /// `VIRTIO_DMAHEAP_VERSION`.
    pub version: Le32,
    /// Heap ids are `0 .. num_heaps - 1`.
    pub num_heaps: Le32,
    /// Live buffers the device allows; 0: not stated.
    pub max_buffers: Le32,
}

/// `struct virtio_dmaheap_req_hdr`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReqHdr {
    /// `VIRTIO_DMAHEAP_REQ_*`.
    pub type_: Le32,
    /// 0.
    pub reserved: Le32,
}

/// `struct virtio_dmaheap_resp_hdr`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RespHdr {
    /// `VIRTIO_DMAHEAP_S_*`.
    pub status: Le32,
    /// 0.
    pub reserved: Le32,
}

/// `struct virtio_dmaheap_heap_info_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapInfoReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_HEAP_INFO`.
    pub hdr: ReqHdr,
    /// Heap to describe.
    pub heap_id: Le32,
    /// 0.
    pub reserved: Le32,
}

/// `struct virtio_dmaheap_heap_info`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapInfo {
    /// NUL-terminated, NUL-padded name.
    pub name: [u8; VIRTIO_DMAHEAP_NAME_LEN],
    /// `VIRTIO_DMAHEAP_HEAP_F_*`.
    pub flags: Le32,
    /// `VIRTIO_DMAHEAP_CACHE_*`.
    pub cache: Le32,
    /// Power of two, at least `VIRTIO_DMAHEAP_PAGE_SIZE`.
    pub min_align: Le64,
    /// Largest buffer in bytes.
    pub max_size: Le64,
    /// Bytes the guest may hold from this heap; 0: unknown.
    pub capacity: Le64,
}

/// `struct virtio_dmaheap_heap_info_resp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapInfoResp {
    /// Response header.
    pub hdr: RespHdr,
    /// The heap's properties.
    pub info: HeapInfo,
}

/// `struct virtio_dmaheap_heap_range`: the window range every buffer of a heap lies in.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapRange {
    /// Start in the window.
    pub offset: Le64,
    /// Length in bytes.
    pub len: Le64,
}

/// `struct virtio_dmaheap_heap_info_range_resp`: HEAP_INFO's answer with
/// `VIRTIO_DMAHEAP_F_HEAP_RANGE`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapInfoRangeResp {
    /// Response header.
    pub hdr: RespHdr,
    /// The heap's properties.
    pub info: HeapInfo,
    /// The heap range.
    pub range: HeapRange,
}

/// `struct virtio_dmaheap_alloc_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_ALLOC`.
    pub hdr: ReqHdr,
    /// Heap to allocate from.
    pub heap_id: Le32,
    /// No flags defined: 0.
    pub flags: Le32,
    /// Bytes, > 0, multiple of `VIRTIO_DMAHEAP_PAGE_SIZE`.
    pub len: Le64,
}

/// `struct virtio_dmaheap_alloc_resp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocResp {
    /// Response header.
    pub hdr: RespHdr,
    /// Never 0; never reused while the device is live.
    pub buffer_id: Le64,
    /// Offset in the buffer window.
    pub offset: Le64,
    /// Bytes usable at `offset`.
    pub len: Le64,
}

/// `struct virtio_dmaheap_alloc_batch_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocBatchReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_ALLOC_BATCH`.
    pub hdr: ReqHdr,
    /// Heap to allocate from.
    pub heap_id: Le32,
    /// Buffers wanted, 1 ..= `VIRTIO_DMAHEAP_BATCH_MAX`.
    pub count: Le32,
    /// Bytes of each buffer, as in ALLOC.
    pub len: Le64,
}

/// `struct virtio_dmaheap_buffer`: one buffer of an ALLOC_BATCH answer.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchBuffer {
    /// As in `AllocResp`.
    pub buffer_id: Le64,
    /// Offset in the buffer window.
    pub offset: Le64,
    /// Bytes usable at `offset`.
    pub len: Le64,
}

/// `struct virtio_dmaheap_alloc_batch_resp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocBatchResp {
    /// Response header.
    pub hdr: RespHdr,
    /// Buffers allocated.
    pub count: Le32,
    /// 0.
    pub reserved: Le32,
    /// The first `count` are used, the rest 0.
    pub buffers: [BatchBuffer; VIRTIO_DMAHEAP_BATCH_MAX as usize],
}

/// `struct virtio_dmaheap_free_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FreeReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_FREE`.
    pub hdr: ReqHdr,
    /// Buffer to release.
    pub buffer_id: Le64,
}

/// `struct virtio_dmaheap_sync_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_SYNC`.
    pub hdr: ReqHdr,
    /// Buffer to synchronise.
    pub buffer_id: Le64,
    /// `VIRTIO_DMAHEAP_SYNC_*`.
    pub flags: Le32,
    /// 0.
    pub reserved: Le32,
}

/// `struct virtio_dmaheap_assign_uuid_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignUuidReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_ASSIGN_UUID`.
    pub hdr: ReqHdr,
    /// Buffer to name.
    pub buffer_id: Le64,
}

/// `struct virtio_dmaheap_assign_uuid_resp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignUuidResp {
    /// Response header.
    pub hdr: RespHdr,
    /// The UUID.
    pub uuid: [u8; 16],
}

/// `struct virtio_dmaheap_session_open_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOpenReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_SESSION_OPEN`.
    pub hdr: ReqHdr,
    /// 0: a new session; else the suspended session to resume.
    pub resume_id: Le64,
}

/// `struct virtio_dmaheap_session_open_page_req`: SESSION_OPEN with
/// `VIRTIO_DMAHEAP_F_PAGE_SIZE` negotiated.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOpenPageReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_SESSION_OPEN`.
    pub hdr: ReqHdr,
    /// As in [`SessionOpenReq`].
    pub resume_id: Le64,
    /// The driver's page size: a power of two from `VIRTIO_DMAHEAP_PAGE_SIZE` to
    /// `VIRTIO_DMAHEAP_PAGE_SIZE_MAX`.
    pub page_size: Le32,
    /// 0.
    pub reserved: Le32,
}

/// `struct virtio_dmaheap_session_open_resp`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOpenResp {
    /// Response header.
    pub hdr: RespHdr,
    /// Never 0.
    pub session_id: Le64,
}

/// `struct virtio_dmaheap_session_close_req`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionCloseReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_SESSION_CLOSE`.
    pub hdr: ReqHdr,
    /// `VIRTIO_DMAHEAP_CLOSE_*`.
    pub flags: Le32,
    /// 0.
    pub reserved: Le32,
}

/// `struct virtio_dmaheap_reserve_req` (RESERVE and UNRESERVE).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReserveReq {
    /// Header, type `VIRTIO_DMAHEAP_REQ_RESERVE` or `VIRTIO_DMAHEAP_REQ_UNRESERVE`.
    pub hdr: ReqHdr,
    /// Start of the range in the window.
    pub offset: Le64,
    /// Length of the range.
    pub len: Le64,
}

macro_rules! byte_valued {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is #[repr(C)], made only of u8 arrays and little-endian
            // integers (any bit pattern is valid) and has no padding: tests/abi_layout.rs
            // checks its size against the C header, whose structs are checked with -Wpadded.
            unsafe impl ByteValued for $t {}
        )*
    };
}

byte_valued!(
    Config,
    ReqHdr,
    RespHdr,
    HeapInfoReq,
    HeapInfo,
    HeapInfoResp,
    HeapRange,
    HeapInfoRangeResp,
    AllocReq,
    AllocResp,
    AllocBatchReq,
    BatchBuffer,
    AllocBatchResp,
    FreeReq,
    SyncReq,
    AssignUuidReq,
    AssignUuidResp,
    SessionOpenReq,
    SessionOpenPageReq,
    SessionOpenResp,
    SessionCloseReq,
    ReserveReq,
);

/// Largest request structure the device accepts.
pub const MAX_REQ_SIZE: usize = {
    let sizes = [
        std::mem::size_of::<HeapInfoReq>(),
        std::mem::size_of::<AllocReq>(),
        std::mem::size_of::<AllocBatchReq>(),
        std::mem::size_of::<FreeReq>(),
        std::mem::size_of::<SyncReq>(),
        std::mem::size_of::<AssignUuidReq>(),
        std::mem::size_of::<SessionOpenReq>(),
        std::mem::size_of::<SessionOpenPageReq>(),
        std::mem::size_of::<SessionCloseReq>(),
        std::mem::size_of::<ReserveReq>(),
    ];
    let mut max = 0;
    let mut i = 0;
    while i < sizes.len() {
        if sizes[i] > max {
            max = sizes[i];
        }
        i += 1;
    }
    max
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn sizes() {
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<HeapInfo>(), 64);
        assert_eq!(size_of::<HeapInfoResp>(), 72);
        assert_eq!(size_of::<HeapRange>(), 16);
        assert_eq!(size_of::<HeapInfoRangeResp>(), 88);
        assert_eq!(size_of::<AllocReq>(), 24);
        assert_eq!(size_of::<AllocResp>(), 32);
        assert_eq!(size_of::<AllocBatchReq>(), 24);
        assert_eq!(size_of::<AllocBatchResp>(), 400);
        assert_eq!(size_of::<SessionOpenReq>(), 16);
        assert_eq!(size_of::<SessionOpenPageReq>(), 24);
        assert_eq!(MAX_REQ_SIZE, 24);
    }
}
