//! The request queue's wire format: a request's bytes decoded into a typed [`Request`],
//! answers encoded into response bytes, and the one place ([`status`]) where the device
//! core's [`RequestError`]s become status codes.
//!
//! Shapes of an answer (spec 6.3): a request rejected before its type is known to be
//! served (too short, unknown or unnegotiated type, wrong sizes, no session) gets a bare
//! `resp_hdr`, and nothing at all if the writable part cannot hold one; a request the core
//! served gets the full response of its type, with the other fields zero on an error.

use std::fmt;
use std::mem::size_of;

use vm_memory::ByteValued;

use crate::abi::*;
use crate::core::{HeapRange as Range, RequestError};

/// What becomes of a request's descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Write these bytes into the writable part (nothing if empty: used length 0) and
    /// return the chain.
    Answer(Vec<u8>),
    /// The ring stopped while the request needed the front end and nothing of it took
    /// effect that a second attempt would repeat: keep the chain and serve it again,
    /// unchanged, once the ring runs again (a paused VM resumed).
    Retry,
}

/// The device-specific features the driver negotiated that change what is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `VIRTIO_DMAHEAP_F_SYNC`.
    pub sync: bool,
    /// `VIRTIO_DMAHEAP_F_SESSION`.
    pub session: bool,
    /// `VIRTIO_DMAHEAP_F_NO_SYNC`: HEAP_INFO may say a heap needs no SYNC.
    pub no_sync: bool,
    /// `VIRTIO_DMAHEAP_F_BATCH`: ALLOC_BATCH.
    pub batch: bool,
    /// `VIRTIO_DMAHEAP_F_UUID`: ASSIGN_UUID.
    pub uuid: bool,
    /// `VIRTIO_DMAHEAP_F_PAGE_SIZE` (with `VIRTIO_DMAHEAP_F_SESSION`): SESSION_OPEN states
    /// the driver's page size.
    pub page_size: bool,
    /// `VIRTIO_DMAHEAP_F_HEAP_RANGE`: HEAP_INFO states the heap's range
    /// ([`HeapInfoRangeResp`]).
    pub heap_range: bool,
}

impl Features {
    /// The device-specific feature bits the device always offers (`VIRTIO_DMAHEAP_F_UUID`
    /// too unless the operator turned it off, see [`crate::core::Device::device_features`]).
    pub const OFFERED: u64 = (1 << VIRTIO_DMAHEAP_F_SYNC)
        | (1 << VIRTIO_DMAHEAP_F_SESSION)
        | (1 << VIRTIO_DMAHEAP_F_NO_SYNC)
        | (1 << VIRTIO_DMAHEAP_F_BATCH)
        | (1 << VIRTIO_DMAHEAP_F_PAGE_SIZE)
        | (1 << VIRTIO_DMAHEAP_F_HEAP_RANGE);

    /// From the feature bits the driver accepted.
    pub fn from_bits(bits: u64) -> Self {
        let has = |bit: u32| bits & (1 << bit) != 0;
        Self {
            sync: has(VIRTIO_DMAHEAP_F_SYNC),
            session: has(VIRTIO_DMAHEAP_F_SESSION),
            no_sync: has(VIRTIO_DMAHEAP_F_NO_SYNC),
            batch: has(VIRTIO_DMAHEAP_F_BATCH),
            uuid: has(VIRTIO_DMAHEAP_F_UUID),
            // Meaningless without sessions (spec 3.2): treated as not negotiated.
            page_size: has(VIRTIO_DMAHEAP_F_PAGE_SIZE) && has(VIRTIO_DMAHEAP_F_SESSION),
            heap_range: has(VIRTIO_DMAHEAP_F_HEAP_RANGE),
        }
    }
}

/// A request the device serves, with its fields in native byte order. Fields are not
/// checked beyond the header: their meaning is the core's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `VIRTIO_DMAHEAP_REQ_HEAP_INFO`.
    HeapInfo {
        /// Heap id.
        heap_id: u32,
        /// Must be 0.
        reserved: u32,
    },
    /// `VIRTIO_DMAHEAP_REQ_ALLOC`.
    Alloc {
        /// Heap id.
        heap_id: u32,
        /// Must be 0.
        flags: u32,
        /// Length in bytes.
        len: u64,
    },
    /// `VIRTIO_DMAHEAP_REQ_ALLOC_BATCH` (with `VIRTIO_DMAHEAP_F_BATCH`).
    AllocBatch {
        /// Heap id.
        heap_id: u32,
        /// Buffers wanted.
        count: u32,
        /// Length in bytes of each.
        len: u64,
    },
    /// `VIRTIO_DMAHEAP_REQ_FREE`.
    Free {
        /// Buffer id.
        buffer_id: u64,
    },
    /// `VIRTIO_DMAHEAP_REQ_SYNC` (with `VIRTIO_DMAHEAP_F_SYNC`).
    Sync {
        /// Buffer id.
        buffer_id: u64,
        /// `VIRTIO_DMAHEAP_SYNC_*`.
        flags: u32,
        /// Must be 0.
        reserved: u32,
    },
    /// `VIRTIO_DMAHEAP_REQ_ASSIGN_UUID` (with `VIRTIO_DMAHEAP_F_UUID`).
    AssignUuid {
        /// Buffer id.
        buffer_id: u64,
    },
    /// `VIRTIO_DMAHEAP_REQ_SESSION_OPEN` (with `VIRTIO_DMAHEAP_F_SESSION`).
    SessionOpen {
        /// 0: a new session; else the suspended session to resume.
        resume_id: u64,
        /// The driver's page size (`VIRTIO_DMAHEAP_PAGE_SIZE` without
        /// `VIRTIO_DMAHEAP_F_PAGE_SIZE`).
        page_size: u32,
        /// Must be 0.
        reserved: u32,
    },
    /// `VIRTIO_DMAHEAP_REQ_SESSION_CLOSE` (with `VIRTIO_DMAHEAP_F_SESSION`).
    SessionClose {
        /// `VIRTIO_DMAHEAP_CLOSE_*`.
        flags: u32,
        /// Must be 0.
        reserved: u32,
    },
    /// `VIRTIO_DMAHEAP_REQ_RESERVE` (with `VIRTIO_DMAHEAP_F_SESSION`).
    Reserve {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `VIRTIO_DMAHEAP_REQ_UNRESERVE` (with `VIRTIO_DMAHEAP_F_SESSION`).
    Unreserve {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

impl Request {
    /// Whether the request needs an open session (with `VIRTIO_DMAHEAP_F_SESSION`).
    pub fn needs_session(&self) -> bool {
        !matches!(self, Self::HeapInfo { .. } | Self::SessionOpen { .. })
    }
}

/// What the core answers to a request it served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// HEAP_INFO.
    HeapInfo {
        /// The heap's properties.
        info: HeapInfo,
        /// The heap's range of the window (sent with `VIRTIO_DMAHEAP_F_HEAP_RANGE`).
        range: Range,
    },
    /// ALLOC.
    Alloc {
        /// Buffer id.
        buffer_id: u64,
        /// Window offset.
        offset: u64,
        /// Length (rounded up to the heap's alignment).
        len: u64,
    },
    /// ALLOC_BATCH: each buffer's (id, window offset, length), at most [`BATCH_MAX`].
    AllocBatch(Vec<(u64, u64, u64)>),
    /// ASSIGN_UUID.
    Uuid {
        /// The buffer's UUID.
        uuid: [u8; 16],
    },
    /// SESSION_OPEN.
    SessionOpened {
        /// The session id.
        session_id: u64,
    },
    /// A request whose response is only a header.
    Done,
}

/// Most buffers of one ALLOC_BATCH.
pub const BATCH_MAX: usize = VIRTIO_DMAHEAP_BATCH_MAX as usize;

/// Why a request was not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Not even a request header.
    TooShort {
        /// Readable bytes.
        readable: usize,
    },
    /// A type this device does not serve with the features negotiated.
    Unsupported {
        /// The type.
        ty: u32,
    },
    /// Wrong request size, too small a writable part, or a reserved header field set.
    Malformed {
        /// The type.
        ty: u32,
        /// Readable bytes.
        readable: usize,
        /// Writable bytes.
        writable: usize,
        /// The header's reserved field.
        reserved: u32,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShort { readable } => write!(f, "request of {readable} bytes: too short"),
            Self::Unsupported { ty } => write!(f, "request type {ty}: not supported"),
            Self::Malformed {
                ty,
                readable,
                writable,
                reserved,
            } => write!(
                f,
                "request type {ty}: malformed ({readable} readable bytes, {writable} writable, \
                 reserved {reserved})"
            ),
        }
    }
}

impl DecodeError {
    /// The status the driver is answered.
    pub fn status(self) -> u32 {
        match self {
            Self::Unsupported { .. } => VIRTIO_DMAHEAP_S_UNSUPP,
            Self::TooShort { .. } | Self::Malformed { .. } => VIRTIO_DMAHEAP_S_INVAL,
        }
    }
}

/// The one mapping from the core's errors to status codes; `None` for
/// [`RequestError::Retry`], which is never sent.
pub fn status(e: RequestError) -> Option<u32> {
    Some(match e {
        RequestError::Inval => VIRTIO_DMAHEAP_S_INVAL,
        RequestError::IoErr => VIRTIO_DMAHEAP_S_IOERR,
        RequestError::NoHeap => VIRTIO_DMAHEAP_S_NO_HEAP,
        RequestError::NoBuffer => VIRTIO_DMAHEAP_S_NO_BUFFER,
        RequestError::NoMem => VIRTIO_DMAHEAP_S_NOMEM,
        RequestError::Quota => VIRTIO_DMAHEAP_S_QUOTA,
        RequestError::WindowFull => VIRTIO_DMAHEAP_S_WINDOW_FULL,
        RequestError::TooBig => VIRTIO_DMAHEAP_S_TOO_BIG,
        RequestError::NoSession => VIRTIO_DMAHEAP_S_NO_SESSION,
        RequestError::Unsupp => VIRTIO_DMAHEAP_S_UNSUPP,
        RequestError::Retry => return None,
    })
}

fn parse<T: ByteValued + Default>(req: &[u8]) -> Option<T> {
    if req.len() != size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(req);
    Some(v)
}

/// Request and response sizes of a type served with `features`.
fn sizes_of(ty: u32, features: Features) -> Option<(usize, usize)> {
    let hdr = size_of::<RespHdr>();
    Some(match ty {
        VIRTIO_DMAHEAP_REQ_HEAP_INFO if features.heap_range => {
            (size_of::<HeapInfoReq>(), size_of::<HeapInfoRangeResp>())
        }
        VIRTIO_DMAHEAP_REQ_HEAP_INFO => (size_of::<HeapInfoReq>(), size_of::<HeapInfoResp>()),
        VIRTIO_DMAHEAP_REQ_ALLOC => (size_of::<AllocReq>(), size_of::<AllocResp>()),
        VIRTIO_DMAHEAP_REQ_ALLOC_BATCH if features.batch => {
            (size_of::<AllocBatchReq>(), size_of::<AllocBatchResp>())
        }
        VIRTIO_DMAHEAP_REQ_FREE => (size_of::<FreeReq>(), hdr),
        VIRTIO_DMAHEAP_REQ_SYNC if features.sync => (size_of::<SyncReq>(), hdr),
        VIRTIO_DMAHEAP_REQ_ASSIGN_UUID if features.uuid => {
            (size_of::<AssignUuidReq>(), size_of::<AssignUuidResp>())
        }
        VIRTIO_DMAHEAP_REQ_SESSION_OPEN if features.page_size => (
            size_of::<SessionOpenPageReq>(),
            size_of::<SessionOpenResp>(),
        ),
        VIRTIO_DMAHEAP_REQ_SESSION_OPEN if features.session => {
            (size_of::<SessionOpenReq>(), size_of::<SessionOpenResp>())
        }
        VIRTIO_DMAHEAP_REQ_SESSION_CLOSE if features.session => (size_of::<SessionCloseReq>(), hdr),
        VIRTIO_DMAHEAP_REQ_RESERVE | VIRTIO_DMAHEAP_REQ_UNRESERVE if features.session => {
            (size_of::<ReserveReq>(), hdr)
        }
        _ => return None,
    })
}

/// Decodes the device-readable part of a chain, given the size of its writable part.
pub fn decode(req: &[u8], writable: usize, features: Features) -> Result<Request, DecodeError> {
    let hdr = req
        .get(..size_of::<ReqHdr>())
        .and_then(parse::<ReqHdr>)
        .ok_or(DecodeError::TooShort {
            readable: req.len(),
        })?;
    let ty = hdr.type_.to_native();
    let (req_size, resp_size) = sizes_of(ty, features).ok_or(DecodeError::Unsupported { ty })?;
    let reserved = hdr.reserved.to_native();
    let malformed = DecodeError::Malformed {
        ty,
        readable: req.len(),
        writable,
        reserved,
    };
    if reserved != 0 || req.len() != req_size || writable < resp_size {
        return Err(malformed);
    }
    // The sizes match, so every parse below succeeds.
    let r = match ty {
        VIRTIO_DMAHEAP_REQ_HEAP_INFO => parse::<HeapInfoReq>(req).map(|r| Request::HeapInfo {
            heap_id: r.heap_id.to_native(),
            reserved: r.reserved.to_native(),
        }),
        VIRTIO_DMAHEAP_REQ_ALLOC => parse::<AllocReq>(req).map(|r| Request::Alloc {
            heap_id: r.heap_id.to_native(),
            flags: r.flags.to_native(),
            len: r.len.to_native(),
        }),
        VIRTIO_DMAHEAP_REQ_ALLOC_BATCH => {
            parse::<AllocBatchReq>(req).map(|r| Request::AllocBatch {
                heap_id: r.heap_id.to_native(),
                count: r.count.to_native(),
                len: r.len.to_native(),
            })
        }
        VIRTIO_DMAHEAP_REQ_FREE => parse::<FreeReq>(req).map(|r| Request::Free {
            buffer_id: r.buffer_id.to_native(),
        }),
        VIRTIO_DMAHEAP_REQ_SYNC => parse::<SyncReq>(req).map(|r| Request::Sync {
            buffer_id: r.buffer_id.to_native(),
            flags: r.flags.to_native(),
            reserved: r.reserved.to_native(),
        }),
        VIRTIO_DMAHEAP_REQ_ASSIGN_UUID => {
            parse::<AssignUuidReq>(req).map(|r| Request::AssignUuid {
                buffer_id: r.buffer_id.to_native(),
            })
        }
        VIRTIO_DMAHEAP_REQ_SESSION_OPEN if features.page_size => parse::<SessionOpenPageReq>(req)
            .map(|r| Request::SessionOpen {
                resume_id: r.resume_id.to_native(),
                page_size: r.page_size.to_native(),
                reserved: r.reserved.to_native(),
            }),
        VIRTIO_DMAHEAP_REQ_SESSION_OPEN => {
            parse::<SessionOpenReq>(req).map(|r| Request::SessionOpen {
                resume_id: r.resume_id.to_native(),
                page_size: VIRTIO_DMAHEAP_PAGE_SIZE,
                reserved: 0,
            })
        }
        VIRTIO_DMAHEAP_REQ_SESSION_CLOSE => {
            parse::<SessionCloseReq>(req).map(|r| Request::SessionClose {
                flags: r.flags.to_native(),
                reserved: r.reserved.to_native(),
            })
        }
        VIRTIO_DMAHEAP_REQ_RESERVE => parse::<ReserveReq>(req).map(|r| Request::Reserve {
            offset: r.offset.to_native(),
            len: r.len.to_native(),
        }),
        _ => parse::<ReserveReq>(req).map(|r| Request::Unreserve {
            offset: r.offset.to_native(),
            len: r.len.to_native(),
        }),
    };
    r.ok_or(malformed)
}

fn resp_hdr(status: u32) -> RespHdr {
    RespHdr {
        status: status.into(),
        reserved: 0.into(),
    }
}

/// A bare `resp_hdr` of `status`, or nothing if the writable part cannot hold one.
pub fn header_only(status: u32, writable: usize) -> Vec<u8> {
    if writable >= size_of::<RespHdr>() {
        resp_hdr(status).as_slice().to_vec()
    } else {
        Vec::new()
    }
}

/// The response to a request the core served: the full response of the request's type
/// with the `features` negotiated.
pub fn encode(req: &Request, outcome: Result<Answer, RequestError>, features: Features) -> Reply {
    let (status, answer) = match outcome {
        Ok(a) => (VIRTIO_DMAHEAP_S_OK, Some(a)),
        Err(e) => match status(e) {
            Some(s) => (s, None),
            None => return Reply::Retry,
        },
    };
    let hdr = resp_hdr(status);
    let bytes = match req {
        Request::HeapInfo { .. } => {
            let mut r = HeapInfoRangeResp {
                hdr,
                ..Default::default()
            };
            if let Some(Answer::HeapInfo { info, range }) = answer {
                r.info = info;
                r.range = HeapRange {
                    offset: range.offset.into(),
                    len: range.len.into(),
                };
            }
            let bytes = r.as_slice();
            // Without the feature the response is the first part only (spec 6.3).
            let n = if features.heap_range {
                bytes.len()
            } else {
                size_of::<HeapInfoResp>()
            };
            bytes[..n].to_vec()
        }
        Request::Alloc { .. } => {
            let mut r = AllocResp {
                hdr,
                ..Default::default()
            };
            if let Some(Answer::Alloc {
                buffer_id,
                offset,
                len,
            }) = answer
            {
                r.buffer_id = buffer_id.into();
                r.offset = offset.into();
                r.len = len.into();
            }
            r.as_slice().to_vec()
        }
        Request::AllocBatch { .. } => {
            let mut r = AllocBatchResp {
                hdr,
                ..Default::default()
            };
            if let Some(Answer::AllocBatch(buffers)) = answer {
                let n = buffers.len().min(BATCH_MAX);
                r.count = u32::try_from(n).unwrap_or(0).into();
                for (out, &(id, offset, len)) in r.buffers.iter_mut().zip(&buffers[..n]) {
                    out.buffer_id = id.into();
                    out.offset = offset.into();
                    out.len = len.into();
                }
            }
            r.as_slice().to_vec()
        }
        Request::AssignUuid { .. } => {
            let mut r = AssignUuidResp {
                hdr,
                ..Default::default()
            };
            if let Some(Answer::Uuid { uuid }) = answer {
                r.uuid = uuid;
            }
            r.as_slice().to_vec()
        }
        Request::SessionOpen { .. } => {
            let mut r = SessionOpenResp {
                hdr,
                ..Default::default()
            };
            if let Some(Answer::SessionOpened { session_id }) = answer {
                r.session_id = session_id.into();
            }
            r.as_slice().to_vec()
        }
        _ => hdr.as_slice().to_vec(),
    };
    Reply::Answer(bytes)
}

/// The heap name as the fixed, NUL-terminated field of `struct virtio_dmaheap_heap_info`.
pub fn heap_name_bytes(name: &str) -> [u8; VIRTIO_DMAHEAP_NAME_LEN] {
    let mut out = [0u8; VIRTIO_DMAHEAP_NAME_LEN];
    let bytes = name.as_bytes();
    let n = bytes.len().min(VIRTIO_DMAHEAP_NAME_LEN - 1);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

#[cfg(test)]
mod tests;
