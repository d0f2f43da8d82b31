//! The virtio-dmaheap wire format, written out again from `spec/virtio_dmaheap.h`.
//!
//! The tests deliberately do not use the daemon's own `abi.rs`: encoding the requests
//! independently from the header is what makes them a check of the ABI.

/// `VIRTIO_DMAHEAP_MAGIC`.
pub const MAGIC: u32 = 0x5041_4844;
/// `VIRTIO_DMAHEAP_VERSION`.
pub const VERSION: u32 = 1;
/// `VIRTIO_DMAHEAP_PAGE_SIZE`.
pub const PAGE_SIZE: u64 = 4096;
/// Size of `struct virtio_dmaheap_config`.
pub const CONFIG_SIZE: usize = 16;

/// Feature bits.
pub const F_SYNC: u64 = 1 << 0;
pub const F_UUID: u64 = 1 << 1;

/// Request types.
pub const REQ_HEAP_INFO: u32 = 1;
pub const REQ_ALLOC: u32 = 2;
pub const REQ_FREE: u32 = 3;
pub const REQ_SYNC: u32 = 4;
pub const REQ_ASSIGN_UUID: u32 = 5;

/// Status codes.
pub const S_OK: u32 = 0;
pub const S_IOERR: u32 = 1;
pub const S_INVAL: u32 = 2;
pub const S_NO_HEAP: u32 = 3;
pub const S_NO_BUFFER: u32 = 4;
pub const S_NOMEM: u32 = 5;
pub const S_QUOTA: u32 = 6;
pub const S_WINDOW_FULL: u32 = 7;
pub const S_UNSUPP: u32 = 8;
pub const S_TOO_BIG: u32 = 9;

/// `virtio_dmaheap_heap_info.flags`.
pub const HEAP_F_CONTIGUOUS: u32 = 1 << 0;
/// `virtio_dmaheap_heap_info.cache`.
pub const CACHE_CACHED: u32 = 0;
pub const CACHE_UNCACHED: u32 = 1;
pub const CACHE_WC: u32 = 2;
pub const NAME_LEN: usize = 32;

/// SYNC flags.
pub const SYNC_READ: u32 = 1 << 0;
pub const SYNC_WRITE: u32 = 1 << 1;
pub const SYNC_END: u32 = 1 << 2;

/// Struct sizes from the header.
pub const RESP_HDR_SIZE: usize = 8;
pub const HEAP_INFO_REQ_SIZE: usize = 16;
pub const HEAP_INFO_RESP_SIZE: usize = 72;
pub const ALLOC_REQ_SIZE: usize = 24;
pub const ALLOC_RESP_SIZE: usize = 32;
pub const FREE_REQ_SIZE: usize = 16;
pub const SYNC_REQ_SIZE: usize = 24;
pub const ASSIGN_UUID_REQ_SIZE: usize = 16;
pub const ASSIGN_UUID_RESP_SIZE: usize = 24;

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
        other => return format!("unknown status {other}"),
    };
    format!("{name} ({status})")
}

/// Little-endian request builder.
#[derive(Debug, Default, Clone)]
pub struct Req(pub Vec<u8>);

impl Req {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

pub fn req_hdr(ty: u32, reserved: u32) -> Req {
    Req::new().u32(ty).u32(reserved)
}

pub fn heap_info_req(heap_id: u32) -> Vec<u8> {
    req_hdr(REQ_HEAP_INFO, 0).u32(heap_id).u32(0).build()
}

pub fn alloc_req(heap_id: u32, flags: u32, len: u64) -> Vec<u8> {
    req_hdr(REQ_ALLOC, 0)
        .u32(heap_id)
        .u32(flags)
        .u64(len)
        .build()
}

pub fn free_req(buffer_id: u64) -> Vec<u8> {
    req_hdr(REQ_FREE, 0).u64(buffer_id).build()
}

pub fn sync_req(buffer_id: u64, flags: u32) -> Vec<u8> {
    req_hdr(REQ_SYNC, 0)
        .u64(buffer_id)
        .u32(flags)
        .u32(0)
        .build()
}

pub fn assign_uuid_req(buffer_id: u64) -> Vec<u8> {
    req_hdr(REQ_ASSIGN_UUID, 0).u64(buffer_id).build()
}

pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

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
}

impl HeapInfo {
    /// Parses the `info` part of a heap_info_resp (the bytes after the resp_hdr).
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
