//! The virtio-dmaheap wire format as the test front end sees it: the header's constants,
//! the request encoders, and parsers of the responses.

use std::mem::size_of;

use vhost_user_dmaheap::abi;
// The constants come from the daemon's mirror of the header, which tests/abi_layout.rs
// checks field by field against spec/virtio_dmaheap.h: one source of truth, no unchecked
// copy. The requests themselves are still encoded by hand below.
pub use vhost_user_dmaheap::abi::{
    VIRTIO_DMAHEAP_CACHE_CACHED as CACHE_CACHED, VIRTIO_DMAHEAP_CACHE_UNCACHED as CACHE_UNCACHED,
    VIRTIO_DMAHEAP_CACHE_WC as CACHE_WC, VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS as HEAP_F_CONTIGUOUS,
    VIRTIO_DMAHEAP_MAGIC as MAGIC, VIRTIO_DMAHEAP_NAME_LEN as NAME_LEN,
    VIRTIO_DMAHEAP_REQ_ALLOC as REQ_ALLOC, VIRTIO_DMAHEAP_REQ_ASSIGN_UUID as REQ_ASSIGN_UUID,
    VIRTIO_DMAHEAP_REQ_FREE as REQ_FREE, VIRTIO_DMAHEAP_REQ_HEAP_INFO as REQ_HEAP_INFO,
    VIRTIO_DMAHEAP_REQ_SYNC as REQ_SYNC, VIRTIO_DMAHEAP_SYNC_END as SYNC_END,
    VIRTIO_DMAHEAP_SYNC_READ as SYNC_READ, VIRTIO_DMAHEAP_SYNC_WRITE as SYNC_WRITE,
    VIRTIO_DMAHEAP_S_INVAL as S_INVAL, VIRTIO_DMAHEAP_S_IOERR as S_IOERR,
    VIRTIO_DMAHEAP_S_NOMEM as S_NOMEM, VIRTIO_DMAHEAP_S_NO_BUFFER as S_NO_BUFFER,
    VIRTIO_DMAHEAP_S_NO_HEAP as S_NO_HEAP, VIRTIO_DMAHEAP_S_OK as S_OK,
    VIRTIO_DMAHEAP_S_QUOTA as S_QUOTA, VIRTIO_DMAHEAP_S_TOO_BIG as S_TOO_BIG,
    VIRTIO_DMAHEAP_S_UNSUPP as S_UNSUPP, VIRTIO_DMAHEAP_S_WINDOW_FULL as S_WINDOW_FULL,
    VIRTIO_DMAHEAP_VERSION as VERSION,
};
pub use vhost_user_dmaheap::abi::{
    VIRTIO_DMAHEAP_CLOSE_SUSPEND as CLOSE_SUSPEND, VIRTIO_DMAHEAP_REQ_RESERVE as REQ_RESERVE,
    VIRTIO_DMAHEAP_REQ_SESSION_CLOSE as REQ_SESSION_CLOSE,
    VIRTIO_DMAHEAP_REQ_SESSION_OPEN as REQ_SESSION_OPEN,
    VIRTIO_DMAHEAP_REQ_UNRESERVE as REQ_UNRESERVE, VIRTIO_DMAHEAP_S_NO_SESSION as S_NO_SESSION,
};

/// `VIRTIO_DMAHEAP_PAGE_SIZE`.
pub const PAGE_SIZE: u64 = abi::VIRTIO_DMAHEAP_PAGE_SIZE as u64;
/// Size of `struct virtio_dmaheap_config`.
pub const CONFIG_SIZE: usize = size_of::<abi::Config>();

/// Feature bits, as masks.
pub const F_SYNC: u64 = 1 << abi::VIRTIO_DMAHEAP_F_SYNC;
pub const F_UUID: u64 = 1 << abi::VIRTIO_DMAHEAP_F_UUID;
pub const F_SESSION: u64 = 1 << abi::VIRTIO_DMAHEAP_F_SESSION;
pub const F_NO_SYNC: u64 = 1 << abi::VIRTIO_DMAHEAP_F_NO_SYNC;
pub const F_BATCH: u64 = 1 << abi::VIRTIO_DMAHEAP_F_BATCH;
pub const F_PAGE_SIZE: u64 = 1 << abi::VIRTIO_DMAHEAP_F_PAGE_SIZE;
pub const F_HEAP_RANGE: u64 = 1 << abi::VIRTIO_DMAHEAP_F_HEAP_RANGE;

/// `VIRTIO_DMAHEAP_RANGE_ALIGN`.
pub const RANGE_ALIGN: u64 = abi::VIRTIO_DMAHEAP_RANGE_ALIGN;

/// Struct sizes from the header.
pub const RESP_HDR_SIZE: usize = size_of::<abi::RespHdr>();
pub const HEAP_INFO_REQ_SIZE: usize = size_of::<abi::HeapInfoReq>();
pub const HEAP_INFO_RESP_SIZE: usize = size_of::<abi::HeapInfoResp>();
pub const HEAP_INFO_RANGE_RESP_SIZE: usize = size_of::<abi::HeapInfoRangeResp>();
pub const ALLOC_REQ_SIZE: usize = size_of::<abi::AllocReq>();
pub const ALLOC_RESP_SIZE: usize = size_of::<abi::AllocResp>();
pub const FREE_REQ_SIZE: usize = size_of::<abi::FreeReq>();
pub const SYNC_REQ_SIZE: usize = size_of::<abi::SyncReq>();
pub const ASSIGN_UUID_REQ_SIZE: usize = size_of::<abi::AssignUuidReq>();
pub const ASSIGN_UUID_RESP_SIZE: usize = size_of::<abi::AssignUuidResp>();
pub const SESSION_OPEN_RESP_SIZE: usize = size_of::<abi::SessionOpenResp>();
pub const ALLOC_BATCH_RESP_SIZE: usize = size_of::<abi::AllocBatchResp>();

/// Name of a status code, for messages.
pub fn status_name(status: u32) -> String {
    let name = match status {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_INVAL => "INVAL",
        S_NO_HEAP => "NO_HEAP",
        S_NO_BUFFER => "NO_BUFFER",
        S_NOMEM => "NOMEM",
        S_QUOTA => "QUOTA",
        S_WINDOW_FULL => "WINDOW_FULL",
        S_UNSUPP => "UNSUPP",
        S_TOO_BIG => "TOO_BIG",
        S_NO_SESSION => "NO_SESSION",
        other => return format!("unknown status {other}"),
    };
    format!("{name} ({status})")
}

// The request encoders are the daemon's shared test ones (written byte by byte from the
// header's constants), also used by its unit tests and the fuzz targets.
pub use vhost_user_dmaheap::testing::{
    alloc_batch_req, alloc_req, assign_uuid_req, free_req, heap_info_req, le32, le64, req_hdr,
    reserve_req, session_close_req, session_open_page_req, session_open_req, sync_req, Req,
};

/// `struct virtio_dmaheap_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub magic: u32,
    pub version: u32,
    pub num_heaps: u32,
    pub max_buffers: u32,
}

impl Config {
    pub fn parse(b: &[u8]) -> Self {
        assert_eq!(b.len(), CONFIG_SIZE, "config space bytes: {b:02x?}");
        Self {
            magic: le32(b, 0),
            version: le32(b, 4),
            num_heaps: le32(b, 8),
            max_buffers: le32(b, 12),
        }
    }
}

/// `struct virtio_dmaheap_heap_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapInfo {
    pub name: String,
    /// The 32 name bytes as sent (to check NUL termination and padding).
    pub raw_name: Vec<u8>,
    pub flags: u32,
    pub cache: u32,
    pub min_align: u64,
    pub max_size: u64,
    pub capacity: u64,
    /// The heap range (offset, len), when `VIRTIO_DMAHEAP_F_HEAP_RANGE` was negotiated.
    pub range: Option<(u64, u64)>,
}

impl HeapInfo {
    /// Parses the `info` part of a heap_info_resp (the bytes after the resp_hdr), and the
    /// `range` after it if the bytes go on (heap_info_range_resp).
    pub fn parse(b: &[u8]) -> Self {
        let raw_name = b[..NAME_LEN].to_vec();
        let end = raw_name.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
        Self {
            name: String::from_utf8_lossy(&raw_name[..end]).into_owned(),
            raw_name,
            flags: le32(b, 32),
            cache: le32(b, 36),
            min_align: le64(b, 40),
            max_size: le64(b, 48),
            capacity: le64(b, 56),
            range: (b.len() >= 80).then(|| (le64(b, 64), le64(b, 72))),
        }
    }

    pub fn contiguous(&self) -> bool {
        self.flags & HEAP_F_CONTIGUOUS != 0
    }
}

/// A successful ALLOC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub id: u64,
    pub offset: u64,
    pub len: u64,
}
