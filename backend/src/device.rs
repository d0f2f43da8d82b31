//! Transport-free device core: parses requests, manages buffers, arenas, the buffer window,
//! quotas and the driver's session ([`session`]). It knows nothing of vhost; mappings into
//! the shared memory window are asked for through the [`Mapper`] trait, which the
//! vhost-user layer implements with the back-end request channel (and tests implement with
//! a fake).

mod session;

pub use session::SessionState;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use vm_memory::ByteValued;

use crate::abi::*;
use crate::provider::{HeapProvider, HostBuffer, ProviderError};
use crate::range::RangeAllocator;

/// Smallest arena, and alignment of every mapping in the window (guests map the window
/// with 2 MiB granularity).
pub const ARENA_MIN: u64 = 2 << 20;
const PAGE: u64 = VIRTIO_DMAHEAP_PAGE_SIZE as u64;

/// How long a heap with no live buffer keeps its emptied arenas mapped after the last
/// ALLOC or FREE, before [`Device::release_idle`] unmaps them.
///
/// Keeping the emptied arena as a spare makes the next ALLOC of an alloc/free loop cheap
/// (no new host allocation, no SHMEM_MAP, no memory-table update in every back end of the
/// VM). Releasing it soon after the heap went idle keeps the window empty when a guest
/// frees everything and then resets the device (driver unbind/bind): QEMU 11.1 crashes
/// when the device is re-initialised after a reset that happened while mappings were
/// live. A guest that resets within this delay after its last FREE still hits that, so
/// the delay is kept short: long enough to span the gap between the requests of a busy
/// allocator, short against anything a human or a script does before an unbind.
pub const SPARE_IDLE_DELAY: Duration = Duration::from_millis(100);

/// Most mappings of freed large buffers a heap keeps (zeroed) for the next large ALLOC.
///
/// Every `SHMEM_MAP` or `SHMEM_UNMAP` that QEMU 11.1.3 reads after the VM began to pause
/// crashes it (spec A.5), and the guest's requests submitted just before a pause are
/// served while QEMU is stopping its vCPUs. So the common paths must not map at all:
/// small buffers come from arenas, and a guest that frees and allocates large buffers of
/// the same size (frame buffers) reuses these. They go at the idle delay like spare
/// arenas, and first when the window or the mapping cap is short.
pub const MAX_LARGE_SPARES: usize = 4;

/// Errors of the device core (shown to operators; guests only see status codes).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Unknown buffer id (control socket).
    #[error("no buffer {0}")]
    NoBuffer(u64),
    /// Range outside the buffer (control socket).
    #[error("range {offset}+{len} outside buffer {id} of {size} bytes")]
    OutOfRange {
        /// Buffer id.
        id: u64,
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Buffer length.
        size: u64,
    },
    /// Host buffer access failed.
    #[error("host buffer access failed")]
    Provider(#[source] ProviderError),
}

/// Errors a [`Mapper`] reports.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The device is not running (not started, or stopped since the request arrived).
    #[error("device not running")]
    NotRunning,
    /// No back-end request channel.
    #[error("no back-end request channel")]
    NoChannel,
    /// The front end refused the request or the channel failed.
    #[error("front end refused the request")]
    Refused(#[source] io::Error),
}

/// What becomes of a request's descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Write these bytes into the writable part (nothing if empty: used length 0) and
    /// return the chain.
    Answer(Vec<u8>),
    /// The ring stopped while the request needed the front end ([`MapError::NotRunning`])
    /// and nothing of it took effect that a second attempt would repeat: keep the chain and
    /// serve it again, unchanged, once the ring runs again (a paused VM resumed).
    Retry,
}

/// Maps host buffers into the shared memory window (region `VIRTIO_DMAHEAP_SHM_BUFFERS`).
pub trait Mapper {
    /// Maps `len` bytes of `fd` from `fd_offset` at `shm_offset` in the window, writable.
    fn map(
        &mut self,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
    ) -> Result<(), MapError>;
    /// Unmaps `[shm_offset, shm_offset + len)`.
    fn unmap(&mut self, shm_offset: u64, len: u64) -> Result<(), MapError>;
}

/// How the guest must map a heap's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Cached.
    Cached,
    /// Uncached.
    Uncached,
    /// Write-combined.
    WriteCombined,
}

impl CacheMode {
    fn abi(self) -> u32 {
        match self {
            Self::Cached => VIRTIO_DMAHEAP_CACHE_CACHED,
            Self::Uncached => VIRTIO_DMAHEAP_CACHE_UNCACHED,
            Self::WriteCombined => VIRTIO_DMAHEAP_CACHE_WC,
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cached => "cached",
            Self::Uncached => "uncached",
            Self::WriteCombined => "wc",
        })
    }
}

/// Properties of one exported heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapParams {
    /// Name the guest sees (at most 31 bytes).
    pub name: String,
    /// Buffers are host-physically contiguous.
    pub contiguous: bool,
    /// Cache attribute.
    pub cache: CacheMode,
    /// Alignment and granularity of buffers (power of two, >= 4096).
    pub min_align: u64,
    /// Largest buffer.
    pub max_size: u64,
    /// Per-heap quota in bytes.
    pub max_bytes: Option<u64>,
    /// Largest arena (host allocation shared by small buffers), multiple of 2 MiB.
    pub arena_size: u64,
}

impl HeapParams {
    /// Buffers up to this size are sub-allocated in arenas.
    pub fn small_limit(&self) -> u64 {
        (self.arena_size / 8).max(self.min_align)
    }
}

/// An exported heap: properties and provider.
#[derive(Debug)]
pub struct Heap {
    /// Properties.
    pub params: HeapParams,
    /// Where host buffers come from.
    pub provider: Box<dyn HeapProvider>,
}

/// Per-VM limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Size of the buffer window (power of two).
    pub shm_size: u64,
    /// Live mappings in the window.
    pub max_mappings: usize,
    /// Live buffers.
    pub max_buffers: u64,
    /// Bytes held by live buffers.
    pub max_bytes: u64,
}

#[derive(Debug)]
struct Arena {
    alloc: RangeAllocator,
}

#[derive(Debug)]
struct MappingRec {
    heap: usize,
    len: u64,
    buf: Box<dyn HostBuffer>,
    /// Some: an arena; None: a mapping of its own.
    arena: Option<Arena>,
    /// In the front end's window now (false while the session is suspended).
    mapped: bool,
}

#[derive(Debug, Clone, Copy)]
struct BufferRec {
    heap: usize,
    /// Window offset of the mapping that holds it.
    mapping: u64,
    /// Offset inside that mapping.
    off: u64,
    len: u64,
}

#[derive(Debug, Default, Clone)]
struct HeapCounters {
    bytes: u64,
    buffers: u64,
    arena_bytes: u64,
    spare: Option<u64>,
    /// Window offsets of zeroed mappings of freed large buffers, oldest first.
    large_spares: Vec<u64>,
}

/// Counters of one heap, as shown by `stats`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes held by live buffers.
    pub bytes: u64,
    /// Live buffers.
    pub buffers: u64,
    /// Live mappings in the window (arenas and own mappings).
    pub mappings: u64,
    /// Live arenas.
    pub arenas: u64,
    /// Host bytes held (all mappings).
    pub host_bytes: u64,
}

/// Snapshot of the device counters.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Per heap name.
    pub heaps: BTreeMap<String, HeapStats>,
    /// Sums over all heaps.
    pub total: HeapStats,
    /// The limits in force.
    pub limits: LimitStats,
    /// The driver's session: `open`, `suspended`, `closed`, or `implicit` (a driver without
    /// `VIRTIO_DMAHEAP_F_SESSION`, or none yet).
    #[serde(default)]
    pub session: String,
    /// Bytes of the window the driver reserved (RESERVE).
    #[serde(default)]
    pub reserved_bytes: u64,
}

/// Limits, as shown by `stats`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitStats {
    /// Window size.
    pub shm_size: u64,
    /// Mapping cap.
    pub max_mappings: u64,
    /// Buffer cap.
    pub max_buffers: u64,
    /// Byte cap.
    pub max_bytes: u64,
}

/// One live buffer, as listed by the debug `buffers` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferInfo {
    /// Buffer id.
    pub id: u64,
    /// Heap name.
    pub heap: String,
    /// Offset in the window.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

struct RateLimit {
    window_start: Instant,
    count: u32,
    suppressed: u64,
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("count", &self.count)
            .finish()
    }
}

impl RateLimit {
    const PER_SECOND: u32 = 10;

    fn new() -> Self {
        Self {
            window_start: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }

    fn warn(&mut self, args: fmt::Arguments<'_>) {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!("{} guest request warnings suppressed", self.suppressed);
            }
            self.window_start = now;
            self.count = 0;
            self.suppressed = 0;
        }
        if self.count < Self::PER_SECOND {
            self.count += 1;
            warn!("{args}");
        } else {
            self.suppressed += 1;
        }
    }
}

/// The device: heaps, live buffers and mappings of one VM.
#[derive(Debug)]
pub struct Device {
    heaps: Vec<Heap>,
    counters: Vec<HeapCounters>,
    limits: Limits,
    window: RangeAllocator,
    mappings: BTreeMap<u64, MappingRec>,
    buffers: HashMap<u64, BufferRec>,
    bytes: u64,
    next_id: Arc<AtomicU64>,
    sync_acked: bool,
    ratelimit: RateLimit,
    /// Time of the last ALLOC or FREE; `None` once [`Device::release_idle`] made its
    /// attempt for the current idle period (and after a reset).
    last_activity: Option<Instant>,
    spare_idle_delay: Duration,
    /// The driver negotiated `VIRTIO_DMAHEAP_F_SESSION`.
    session_acked: bool,
    session: SessionState,
    /// Window ranges the driver reserved (RESERVE): start -> length.
    reservations: BTreeMap<u64, u64>,
    /// Keys for unpredictable session ids.
    id_keys: RandomState,
    sessions_opened: u64,
}

type Status = u32;

/// Internal status of a request that must be served again once the ring runs
/// ([`Reply::Retry`]); never sent to the driver.
const RETRY: Status = u32::MAX;

/// Largest number of reserved window ranges per session.
pub const MAX_RESERVATIONS: usize = 1024;

fn resp_hdr(status: Status) -> RespHdr {
    RespHdr {
        status: status.into(),
        reserved: 0.into(),
    }
}

/// Response that holds only a header, or nothing if the writable part is too small.
fn hdr_only(status: Status, writable: usize) -> Vec<u8> {
    if writable >= std::mem::size_of::<RespHdr>() {
        resp_hdr(status).as_slice().to_vec()
    } else {
        Vec::new()
    }
}

/// A reply holding only the response header of `status`, or [`Reply::Retry`].
fn status_reply(status: Status) -> Reply {
    if status == RETRY {
        Reply::Retry
    } else {
        Reply::Answer(resp_hdr(status).as_slice().to_vec())
    }
}

/// A buffer-id counter that starts at an unpredictable value below 2^62, so that ids of
/// different daemon processes serving the same VM do not collide (spec A.3).
pub fn unpredictable_id_start() -> u64 {
    (RandomState::new().hash_one(0xd1a7_u16) & ((1 << 62) - 1)).max(1)
}

/// Copies `req` into a `T` if it has exactly `T`'s size.
fn parse<T: ByteValued + Default>(req: &[u8]) -> Option<T> {
    if req.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(req);
    Some(v)
}

fn heap_name_bytes(name: &str) -> [u8; VIRTIO_DMAHEAP_NAME_LEN] {
    let mut out = [0u8; VIRTIO_DMAHEAP_NAME_LEN];
    let bytes = name.as_bytes();
    let n = bytes.len().min(VIRTIO_DMAHEAP_NAME_LEN - 1);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

impl Device {
    /// A device serving `heaps` within `limits`. Buffer ids come from `next_id`, which the
    /// caller keeps for the daemon's lifetime so that ids are never reused.
    pub fn new(heaps: Vec<Heap>, limits: Limits, next_id: Arc<AtomicU64>) -> Self {
        let counters = vec![HeapCounters::default(); heaps.len()];
        Self {
            window: RangeAllocator::new(limits.shm_size),
            heaps,
            counters,
            limits,
            mappings: BTreeMap::new(),
            buffers: HashMap::new(),
            bytes: 0,
            next_id,
            sync_acked: true,
            ratelimit: RateLimit::new(),
            last_activity: None,
            spare_idle_delay: SPARE_IDLE_DELAY,
            session_acked: false,
            session: SessionState::Open(0),
            reservations: BTreeMap::new(),
            id_keys: RandomState::new(),
            sessions_opened: 0,
        }
    }

    /// Changes how long idle heaps keep their emptied arenas (default
    /// [`SPARE_IDLE_DELAY`]).
    pub fn set_spare_idle_delay(&mut self, delay: Duration) {
        self.spare_idle_delay = delay;
    }

    /// When [`Device::release_idle`] should run next: the idle delay after the last ALLOC
    /// or FREE, if some heap without live buffers still holds arenas. `None`: nothing to
    /// release (or the attempt for this idle period was made already).
    pub fn idle_deadline(&self) -> Option<Instant> {
        let last = self.last_activity?;
        self.counters
            .iter()
            .any(|c| (c.buffers == 0 && c.arena_bytes > 0) || !c.large_spares.is_empty())
            .then(|| last.checked_add(self.spare_idle_delay))
            .flatten()
    }

    /// Unmaps and releases the (empty) arenas of every heap that has no live buffer, if the
    /// idle deadline has passed at `now`. Returns the number of mappings released.
    ///
    /// Must be called only where a [`Mapper`] may send requests (the vring worker of a
    /// running device). One attempt per idle period: an arena whose unmap fails stays (and
    /// stays usable); the next ALLOC or FREE starts a new period.
    pub fn release_idle(&mut self, now: Instant, mapper: &mut dyn Mapper) -> usize {
        if self.idle_deadline().is_none_or(|d| now < d) {
            return 0;
        }
        self.last_activity = None;
        let mut idle: Vec<u64> = self
            .mappings
            .iter()
            .filter(|(_, m)| {
                m.arena.is_some()
                    && m.mapped
                    && self.counters.get(m.heap).is_some_and(|c| c.buffers == 0)
            })
            .map(|(&woff, _)| woff)
            .collect();
        for c in &mut self.counters {
            idle.append(&mut c.large_spares);
        }
        let mut released = 0;
        for &woff in &idle {
            if self.release_mapping(woff, mapper).is_ok() {
                released += 1;
            }
        }
        for c in &mut self.counters {
            if c.spare.is_some_and(|w| !self.mappings.contains_key(&w)) {
                c.spare = None;
            }
        }
        // A large spare whose unmap the stop prevented stays in the window: keep it a spare.
        for woff in idle {
            if let Some(m) = self.mappings.get(&woff) {
                if m.arena.is_none() {
                    self.counters[m.heap].large_spares.push(woff);
                }
            }
        }
        if released > 0 {
            debug!("idle: released {released} spare mapping(s)");
        }
        released
    }

    /// Logs a warning about a guest's request, rate-limited (a guest must not be able to
    /// flood the host log).
    pub fn guest_warn(&mut self, args: fmt::Arguments<'_>) {
        self.ratelimit.warn(args);
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The virtio feature bits the device offers (device-specific bits only).
    pub fn device_features() -> u64 {
        (1 << VIRTIO_DMAHEAP_F_SYNC) | (1 << VIRTIO_DMAHEAP_F_SESSION)
    }

    /// Records the features the driver accepted.
    pub fn set_acked_features(&mut self, features: u64) {
        self.sync_acked = features & (1 << VIRTIO_DMAHEAP_F_SYNC) != 0;
        self.session_acked = features & (1 << VIRTIO_DMAHEAP_F_SESSION) != 0;
    }

    /// The configuration space.
    pub fn config(&self) -> Config {
        Config {
            magic: VIRTIO_DMAHEAP_MAGIC.into(),
            version: VIRTIO_DMAHEAP_VERSION.into(),
            num_heaps: u32::try_from(self.heaps.len()).unwrap_or(u32::MAX).into(),
            max_buffers: u32::try_from(self.limits.max_buffers).unwrap_or(0).into(),
        }
    }

    /// Request and response sizes of a request type this device serves with the features
    /// negotiated; `None` for an unknown or unoffered type.
    fn sizes_of(&self, ty: u32) -> Option<(usize, usize)> {
        use std::mem::size_of;
        let hdr = size_of::<RespHdr>();
        Some(match ty {
            VIRTIO_DMAHEAP_REQ_HEAP_INFO => (size_of::<HeapInfoReq>(), size_of::<HeapInfoResp>()),
            VIRTIO_DMAHEAP_REQ_ALLOC => (size_of::<AllocReq>(), size_of::<AllocResp>()),
            VIRTIO_DMAHEAP_REQ_FREE => (size_of::<FreeReq>(), hdr),
            VIRTIO_DMAHEAP_REQ_SYNC if self.sync_acked => (size_of::<SyncReq>(), hdr),
            VIRTIO_DMAHEAP_REQ_SESSION_OPEN if self.session_acked => {
                (size_of::<SessionOpenReq>(), size_of::<SessionOpenResp>())
            }
            VIRTIO_DMAHEAP_REQ_SESSION_CLOSE if self.session_acked => {
                (size_of::<SessionCloseReq>(), hdr)
            }
            VIRTIO_DMAHEAP_REQ_RESERVE | VIRTIO_DMAHEAP_REQ_UNRESERVE if self.session_acked => {
                (size_of::<ReserveReq>(), hdr)
            }
            _ => return None,
        })
    }

    /// Handles one request. `req` is the device-readable part of the chain, `writable` the
    /// size of the device-writable part. An answer never holds more than `writable` bytes
    /// (it is empty if not even a response header fits).
    pub fn handle(&mut self, req: &[u8], writable: usize, mapper: &mut dyn Mapper) -> Reply {
        let Some(hdr) = req
            .get(..std::mem::size_of::<ReqHdr>())
            .and_then(parse::<ReqHdr>)
        else {
            self.ratelimit
                .warn(format_args!("request of {} bytes: too short", req.len()));
            return Reply::Answer(hdr_only(VIRTIO_DMAHEAP_S_INVAL, writable));
        };
        let ty = hdr.type_.to_native();
        let Some((req_size, resp_size)) = self.sizes_of(ty) else {
            self.ratelimit
                .warn(format_args!("request type {ty}: not supported"));
            return Reply::Answer(hdr_only(VIRTIO_DMAHEAP_S_UNSUPP, writable));
        };
        if hdr.reserved.to_native() != 0 || req.len() != req_size || writable < resp_size {
            self.ratelimit.warn(format_args!(
                "request type {ty}: malformed ({} readable bytes, {} writable, reserved {})",
                req.len(),
                writable,
                hdr.reserved.to_native()
            ));
            return Reply::Answer(hdr_only(VIRTIO_DMAHEAP_S_INVAL, writable));
        }
        if ty != VIRTIO_DMAHEAP_REQ_HEAP_INFO
            && ty != VIRTIO_DMAHEAP_REQ_SESSION_OPEN
            && !self.session_ok()
        {
            return Reply::Answer(hdr_only(VIRTIO_DMAHEAP_S_NO_SESSION, writable));
        }
        match ty {
            VIRTIO_DMAHEAP_REQ_HEAP_INFO => Reply::Answer(self.heap_info(req).as_slice().to_vec()),
            VIRTIO_DMAHEAP_REQ_ALLOC => self.alloc_req(req, mapper),
            VIRTIO_DMAHEAP_REQ_FREE => status_reply(self.free_req(req, mapper)),
            VIRTIO_DMAHEAP_REQ_SYNC => status_reply(self.sync_req(req)),
            VIRTIO_DMAHEAP_REQ_SESSION_OPEN => self.session_open_req(req, mapper),
            VIRTIO_DMAHEAP_REQ_SESSION_CLOSE => status_reply(self.session_close_req(req, mapper)),
            VIRTIO_DMAHEAP_REQ_RESERVE => status_reply(self.reserve_req(req)),
            _ => status_reply(self.unreserve_req(req)),
        }
    }

    fn heap_info(&mut self, req: &[u8]) -> HeapInfoResp {
        let mut resp = HeapInfoResp {
            hdr: resp_hdr(VIRTIO_DMAHEAP_S_INVAL),
            ..Default::default()
        };
        let Some(r) = parse::<HeapInfoReq>(req) else {
            return resp;
        };
        if r.reserved.to_native() != 0 {
            return resp;
        }
        let id = r.heap_id.to_native();
        let Some(heap) = usize::try_from(id).ok().and_then(|i| self.heaps.get(i)) else {
            resp.hdr = resp_hdr(VIRTIO_DMAHEAP_S_NO_HEAP);
            return resp;
        };
        let p = &heap.params;
        let global = self.limits.max_bytes.min(self.limits.shm_size);
        resp.hdr = resp_hdr(VIRTIO_DMAHEAP_S_OK);
        resp.info = HeapInfo {
            name: heap_name_bytes(&p.name),
            flags: if p.contiguous {
                VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS
            } else {
                0
            }
            .into(),
            cache: p.cache.abi().into(),
            min_align: p.min_align.into(),
            max_size: p.max_size.into(),
            capacity: p.max_bytes.map_or(global, |b| b.min(global)).into(),
        };
        resp
    }

    fn alloc_req(&mut self, req: &[u8], mapper: &mut dyn Mapper) -> Reply {
        let mut resp = AllocResp {
            hdr: resp_hdr(VIRTIO_DMAHEAP_S_INVAL),
            ..Default::default()
        };
        let Some(r) = parse::<AllocReq>(req) else {
            return Reply::Answer(resp.as_slice().to_vec());
        };
        match self.alloc(
            r.heap_id.to_native(),
            r.flags.to_native(),
            r.len.to_native(),
            mapper,
        ) {
            Ok((id, offset, len)) => {
                resp.hdr = resp_hdr(VIRTIO_DMAHEAP_S_OK);
                resp.buffer_id = id.into();
                resp.offset = offset.into();
                resp.len = len.into();
            }
            Err(RETRY) => return Reply::Retry,
            Err(status) => resp.hdr = resp_hdr(status),
        }
        Reply::Answer(resp.as_slice().to_vec())
    }

    fn free_req(&mut self, req: &[u8], mapper: &mut dyn Mapper) -> Status {
        match parse::<FreeReq>(req) {
            Some(r) => self.free(r.buffer_id.to_native(), mapper),
            None => VIRTIO_DMAHEAP_S_INVAL,
        }
    }

    fn sync_req(&mut self, req: &[u8]) -> Status {
        let Some(r) = parse::<SyncReq>(req) else {
            return VIRTIO_DMAHEAP_S_INVAL;
        };
        let flags = r.flags.to_native();
        if r.reserved.to_native() != 0
            || flags & !VIRTIO_DMAHEAP_SYNC_VALID_MASK != 0
            || flags & (VIRTIO_DMAHEAP_SYNC_READ | VIRTIO_DMAHEAP_SYNC_WRITE) == 0
        {
            return VIRTIO_DMAHEAP_S_INVAL;
        }
        let id = r.buffer_id.to_native();
        let Some(rec) = self.buffers.get(&id) else {
            return VIRTIO_DMAHEAP_S_NO_BUFFER;
        };
        let Some(m) = self.mappings.get(&rec.mapping) else {
            return VIRTIO_DMAHEAP_S_IOERR;
        };
        // The dma-buf sync flags have the same values as the virtio ones.
        match m.buf.sync(u64::from(flags)) {
            Ok(()) => VIRTIO_DMAHEAP_S_OK,
            Err(e) => {
                warn!("sync of buffer {id}: {e}");
                VIRTIO_DMAHEAP_S_IOERR
            }
        }
    }

    /// Mapping records: in the window, or kept for a suspended session (which needs them
    /// back in the window when it resumes).
    fn live_mappings(&self) -> usize {
        self.mappings.len()
    }

    /// Allocates a buffer; returns (id, window offset, length) or an error status.
    pub fn alloc(
        &mut self,
        heap_id: u32,
        flags: u32,
        len: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<(u64, u64, u64), Status> {
        let heap = usize::try_from(heap_id)
            .ok()
            .filter(|&h| h < self.heaps.len())
            .ok_or(VIRTIO_DMAHEAP_S_NO_HEAP)?;
        self.last_activity = Some(Instant::now());
        if flags != 0 || len == 0 || !len.is_multiple_of(PAGE) {
            return Err(VIRTIO_DMAHEAP_S_INVAL);
        }
        let params = self.heaps[heap].params.clone();
        if len > params.max_size {
            return Err(VIRTIO_DMAHEAP_S_TOO_BIG);
        }
        let rlen = len
            .checked_next_multiple_of(params.min_align)
            .ok_or(VIRTIO_DMAHEAP_S_TOO_BIG)?;
        if self.buffers.len() as u64 >= self.limits.max_buffers {
            return Err(VIRTIO_DMAHEAP_S_QUOTA);
        }
        if self
            .bytes
            .checked_add(rlen)
            .is_none_or(|b| b > self.limits.max_bytes)
        {
            return Err(VIRTIO_DMAHEAP_S_QUOTA);
        }
        if let Some(max) = params.max_bytes {
            if self.counters[heap]
                .bytes
                .checked_add(rlen)
                .is_none_or(|b| b > max)
            {
                return Err(VIRTIO_DMAHEAP_S_QUOTA);
            }
        }

        let (mapping, off) = if rlen <= params.small_limit() {
            self.alloc_in_arena(heap, rlen, &params, mapper)?
        } else if let Some(woff) = self.take_large_spare(heap, rlen) {
            (woff, 0)
        } else {
            (self.new_mapping(heap, rlen, false, mapper)?, 0)
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.buffers.insert(
            id,
            BufferRec {
                heap,
                mapping,
                off,
                len: rlen,
            },
        );
        self.bytes += rlen;
        self.counters[heap].bytes += rlen;
        self.counters[heap].buffers += 1;
        Ok((id, mapping + off, rlen))
    }

    fn alloc_in_arena(
        &mut self,
        heap: usize,
        rlen: u64,
        params: &HeapParams,
        mapper: &mut dyn Mapper,
    ) -> Result<(u64, u64), Status> {
        let spare = self.counters[heap].spare;
        // Existing arenas, the spare last.
        let mut found = None;
        for (&woff, m) in self.mappings.iter_mut() {
            if m.heap != heap || Some(woff) == spare {
                continue;
            }
            if let Some(arena) = m.arena.as_mut() {
                if let Some(off) = arena.alloc.alloc(rlen, params.min_align) {
                    found = Some((woff, off));
                    break;
                }
            }
        }
        if found.is_none() {
            if let Some(woff) = spare {
                if let Some(arena) = self.mappings.get_mut(&woff).and_then(|m| m.arena.as_mut()) {
                    if let Some(off) = arena.alloc.alloc(rlen, params.min_align) {
                        self.counters[heap].spare = None;
                        found = Some((woff, off));
                    }
                }
            }
        }
        if let Some(f) = found {
            return Ok(f);
        }
        // A new arena: double the heap's arena bytes, within [ARENA_MIN, arena_size].
        let want = self.counters[heap]
            .arena_bytes
            .clamp(ARENA_MIN, params.arena_size.max(ARENA_MIN));
        let floor = rlen.next_multiple_of(ARENA_MIN);
        let mut size = want.max(floor);
        let woff = loop {
            match self.new_mapping(heap, size, true, mapper) {
                Ok(w) => break w,
                Err(VIRTIO_DMAHEAP_S_WINDOW_FULL) if size / 2 >= floor => size /= 2,
                Err(s) => return Err(s),
            }
        };
        let arena = self
            .mappings
            .get_mut(&woff)
            .and_then(|m| m.arena.as_mut())
            .ok_or(VIRTIO_DMAHEAP_S_IOERR)?;
        let off = arena
            .alloc
            .alloc(rlen, params.min_align)
            .ok_or(VIRTIO_DMAHEAP_S_IOERR)?;
        Ok((woff, off))
    }

    /// A zeroed mapping of a freed large buffer that fits `rlen` without wasting more than
    /// half of it (the smallest such), taken off the heap's spares.
    fn take_large_spare(&mut self, heap: usize, rlen: u64) -> Option<u64> {
        let mappings = &self.mappings;
        let spares = &mut self.counters[heap].large_spares;
        let (i, _) = spares
            .iter()
            .enumerate()
            .filter_map(|(i, w)| mappings.get(w).map(|m| (i, m.len)))
            .filter(|&(_, len)| len >= rlen && len / 2 <= rlen)
            .min_by_key(|&(_, len)| len)?;
        Some(spares.remove(i))
    }

    /// Keeps the mapping of a freed large buffer, zeroed, for the next large ALLOC of the
    /// heap. False if the heap keeps enough spares already or zeroing failed.
    fn keep_large_spare(&mut self, heap: usize, woff: u64) -> bool {
        if self.counters[heap].large_spares.len() >= MAX_LARGE_SPARES {
            return false;
        }
        let Some(m) = self.mappings.get(&woff) else {
            return false;
        };
        if let Err(e) = m.buf.zero(0, m.len) {
            error!("mapping {woff:#x}: zeroing failed, not reused: {e}");
            return false;
        }
        self.counters[heap].large_spares.push(woff);
        true
    }

    /// Unmaps and releases one spare mapping (any heap; large spares first). Returns true
    /// if one was released; [`RETRY`] if the ring stopped.
    fn evict_spare(&mut self, mapper: &mut dyn Mapper) -> Result<bool, Status> {
        for heap in 0..self.counters.len() {
            if let Some(&woff) = self.counters[heap].large_spares.first() {
                if self.release_mapping(woff, mapper).is_err() {
                    return Err(RETRY);
                }
                self.counters[heap].large_spares.remove(0);
                return Ok(true);
            }
        }
        for heap in 0..self.counters.len() {
            if let Some(woff) = self.counters[heap].spare {
                if self.release_mapping(woff, mapper).is_err() {
                    return Err(RETRY);
                }
                self.counters[heap].spare = None;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Unmaps the mapping at `woff` (if it is in the window) and releases its window range
    /// and host buffer. Fails only with [`MapError::NotRunning`]: the mapping is still in
    /// the window then, and its record stays. A refused unmap means the front end no
    /// longer has the mapping (QEMU refuses an unmap only for a mapping it does not have,
    /// e.g. after it dropped the window at a reset): it is released all the same.
    fn release_mapping(&mut self, woff: u64, mapper: &mut dyn Mapper) -> Result<(), MapError> {
        let Some(m) = self.mappings.get(&woff) else {
            return Ok(());
        };
        let (len, heap, is_arena, mapped) = (m.len, m.heap, m.arena.is_some(), m.mapped);
        if mapped {
            match mapper.unmap(woff, len) {
                Ok(()) => {}
                Err(MapError::NotRunning) => return Err(MapError::NotRunning),
                Err(e) => self.ratelimit.warn(format_args!(
                    "unmap of window range {woff:#x}+{len:#x} refused ({e}): the front end \
                     no longer has it"
                )),
            }
        }
        self.forget_mapping(woff);
        if is_arena {
            self.counters[heap].arena_bytes -= len;
        }
        Ok(())
    }

    /// Drops the record of the mapping at `woff` (already out of the window) and gives its
    /// window range back.
    fn forget_mapping(&mut self, woff: u64) {
        if let Some(m) = self.mappings.remove(&woff) {
            self.window.free(woff, m.len);
        }
    }

    fn new_mapping(
        &mut self,
        heap: usize,
        size: u64,
        arena: bool,
        mapper: &mut dyn Mapper,
    ) -> Result<u64, Status> {
        // The mapping cap is a limit of the window (spec 6.2: WINDOW_FULL).
        if self.live_mappings() >= self.limits.max_mappings && !self.evict_spare(mapper)? {
            return Err(VIRTIO_DMAHEAP_S_WINDOW_FULL);
        }
        let align = ARENA_MIN.max(self.heaps[heap].params.min_align);
        let woff = match self.window.alloc(size, align) {
            Some(w) => w,
            None => {
                if !self.evict_spare(mapper)? {
                    return Err(VIRTIO_DMAHEAP_S_WINDOW_FULL);
                }
                self.window
                    .alloc(size, align)
                    .ok_or(VIRTIO_DMAHEAP_S_WINDOW_FULL)?
            }
        };
        let buf = match self.heaps[heap].provider.allocate(size) {
            Ok(b) => b,
            Err(e) => {
                self.window.free(woff, size);
                let name = self.heaps[heap].params.name.clone();
                self.ratelimit.warn(format_args!(
                    "heap {name}: host allocation of {size} bytes failed: {e}"
                ));
                return Err(match e {
                    ProviderError::NoMemory(_) => VIRTIO_DMAHEAP_S_NOMEM,
                    _ => VIRTIO_DMAHEAP_S_IOERR,
                });
            }
        };
        if let Err(e) = mapper.map(buf.fd(), 0, woff, size) {
            self.window.free(woff, size);
            if matches!(e, MapError::NotRunning) {
                return Err(RETRY);
            }
            self.ratelimit.warn(format_args!(
                "map of {size} bytes at window offset {woff:#x} failed: {e}"
            ));
            return Err(VIRTIO_DMAHEAP_S_IOERR);
        }
        if arena {
            self.counters[heap].arena_bytes += size;
        }
        self.mappings.insert(
            woff,
            MappingRec {
                heap,
                len: size,
                buf,
                arena: arena.then(|| Arena {
                    alloc: RangeAllocator::new(size),
                }),
                mapped: true,
            },
        );
        Ok(woff)
    }

    /// A large buffer's mapping that could not be unmapped (the ring stopped) stays in the
    /// window: zero it and use it as an arena for small buffers (its range is never mapped
    /// over).
    fn adopt_as_arena(&mut self, woff: u64) {
        let Some(m) = self.mappings.get_mut(&woff) else {
            return;
        };
        if let Err(e) = m.buf.zero(0, m.len) {
            error!("stuck mapping {woff:#x}: zeroing failed, range not reused: {e}");
            return;
        }
        m.arena = Some(Arena {
            alloc: RangeAllocator::new(m.len),
        });
        self.counters[m.heap].arena_bytes += m.len;
    }

    /// Frees a buffer; returns a status.
    pub fn free(&mut self, id: u64, mapper: &mut dyn Mapper) -> Status {
        let Some(rec) = self.buffers.remove(&id) else {
            return VIRTIO_DMAHEAP_S_NO_BUFFER;
        };
        self.last_activity = Some(Instant::now());
        self.bytes -= rec.len;
        self.counters[rec.heap].bytes -= rec.len;
        self.counters[rec.heap].buffers -= 1;
        let Some(m) = self.mappings.get_mut(&rec.mapping) else {
            error!("buffer {id}: mapping {:#x} missing", rec.mapping);
            return VIRTIO_DMAHEAP_S_OK;
        };
        let Some(arena) = m.arena.as_mut() else {
            if self.keep_large_spare(rec.heap, rec.mapping) {
                return VIRTIO_DMAHEAP_S_OK;
            }
            // The ring stopped: the mapping stays in the window; reuse it for small buffers.
            if self.release_mapping(rec.mapping, mapper).is_err() {
                self.adopt_as_arena(rec.mapping);
            }
            return VIRTIO_DMAHEAP_S_OK;
        };
        let heap = rec.heap;
        // The last buffer of the arena, and the heap has a spare already: give the arena
        // back. Its memory goes with it, so the range needs no zeroing if the unmap works.
        if arena.alloc.used() == rec.len
            && self.counters[heap].spare.is_some_and(|s| s != rec.mapping)
            && self.release_mapping(rec.mapping, mapper).is_ok()
        {
            return VIRTIO_DMAHEAP_S_OK;
        }
        let Some(m) = self.mappings.get_mut(&rec.mapping) else {
            return VIRTIO_DMAHEAP_S_OK;
        };
        let Some(arena) = m.arena.as_mut() else {
            return VIRTIO_DMAHEAP_S_OK;
        };
        // Zero now, so the range is clean when handed out again.
        if let Err(e) = m.buf.zero(rec.off, rec.len) {
            error!("buffer {id}: zeroing failed, range not reused: {e}");
            return VIRTIO_DMAHEAP_S_OK;
        }
        arena.alloc.free(rec.off, rec.len);
        if arena.alloc.is_empty() && self.counters[heap].spare.is_none() {
            // Keep one empty arena mapped for recycling, also when the heap becomes idle:
            // the next ALLOC then needs no SHMEM_MAP. Idle heaps give their arenas back
            // after SPARE_IDLE_DELAY (release_idle, called by the vring worker).
            self.counters[heap].spare = Some(rec.mapping);
        }
        VIRTIO_DMAHEAP_S_OK
    }

    /// Counters per heap and in total.
    pub fn stats(&self) -> Stats {
        let mut per: Vec<HeapStats> = self
            .counters
            .iter()
            .map(|c| HeapStats {
                bytes: c.bytes,
                buffers: c.buffers,
                ..Default::default()
            })
            .collect();
        for m in self.mappings.values() {
            if let Some(s) = per.get_mut(m.heap) {
                s.mappings += u64::from(m.mapped);
                s.host_bytes += m.len;
                if m.arena.is_some() {
                    s.arenas += 1;
                }
            }
        }
        let mut stats = Stats {
            session: self.session.name().into(),
            reserved_bytes: self.reservations.values().sum(),
            limits: LimitStats {
                shm_size: self.limits.shm_size,
                max_mappings: self.limits.max_mappings as u64,
                max_buffers: self.limits.max_buffers,
                max_bytes: self.limits.max_bytes,
            },
            ..Default::default()
        };
        for (heap, s) in self.heaps.iter().zip(per) {
            stats.total.bytes += s.bytes;
            stats.total.buffers += s.buffers;
            stats.total.mappings += s.mappings;
            stats.total.arenas += s.arenas;
            stats.total.host_bytes += s.host_bytes;
            stats.heaps.insert(heap.params.name.clone(), s);
        }
        stats
    }

    /// Every live buffer, by id.
    pub fn buffers(&self) -> Vec<BufferInfo> {
        let mut v: Vec<BufferInfo> = self
            .buffers
            .iter()
            .map(|(&id, r)| BufferInfo {
                id,
                heap: self
                    .heaps
                    .get(r.heap)
                    .map(|h| h.params.name.clone())
                    .unwrap_or_default(),
                offset: r.mapping + r.off,
                len: r.len,
            })
            .collect();
        v.sort_by_key(|b| b.id);
        v
    }

    fn host_range(
        &self,
        id: u64,
        offset: u64,
        len: u64,
    ) -> Result<(&dyn HostBuffer, u64), DeviceError> {
        let rec = self.buffers.get(&id).ok_or(DeviceError::NoBuffer(id))?;
        if offset.checked_add(len).is_none_or(|e| e > rec.len) {
            return Err(DeviceError::OutOfRange {
                id,
                offset,
                len,
                size: rec.len,
            });
        }
        let m = self
            .mappings
            .get(&rec.mapping)
            .ok_or(DeviceError::NoBuffer(id))?;
        Ok((m.buf.as_ref(), rec.off + offset))
    }

    /// Reads bytes of a live buffer from the host side.
    pub fn peek(&self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        let (buf, at) = self.host_range(id, offset, len as u64)?;
        let mut out = vec![0u8; len];
        buf.read_at(at, &mut out).map_err(DeviceError::Provider)?;
        Ok(out)
    }

    /// Writes bytes into a live buffer from the host side.
    pub fn poke(&self, id: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let (buf, at) = self.host_range(id, offset, data.len() as u64)?;
        buf.write_at(at, data).map_err(DeviceError::Provider)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::provider::MemfdProvider;
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicU32;

    /// memfd provider that fails on demand.
    #[derive(Debug, Default)]
    pub struct FakeProvider {
        pub fail_nomem: AtomicU32,
        pub fail_io: AtomicU32,
        pub allocations: AtomicU64,
        /// Calls of `HostBuffer::zero` on its buffers.
        pub zeroings: Arc<AtomicU64>,
    }

    /// A memfd buffer that counts its zeroings.
    #[derive(Debug)]
    struct CountedBuffer(Box<dyn HostBuffer>, Arc<AtomicU64>);

    impl HostBuffer for CountedBuffer {
        fn fd(&self) -> BorrowedFd<'_> {
            self.0.fd()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn zero(&self, offset: u64, len: u64) -> Result<(), ProviderError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.zero(offset, len)
        }
        fn sync(&self, flags: u64) -> Result<(), ProviderError> {
            self.0.sync(flags)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProviderError> {
            self.0.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ProviderError> {
            self.0.write_at(offset, data)
        }
    }

    impl HeapProvider for Arc<FakeProvider> {
        fn allocate(&self, len: u64) -> Result<Box<dyn HostBuffer>, ProviderError> {
            if self.fail_nomem.load(Ordering::SeqCst) > 0 {
                self.fail_nomem.fetch_sub(1, Ordering::SeqCst);
                return Err(ProviderError::NoMemory(io::Error::from_raw_os_error(
                    libc::ENOMEM,
                )));
            }
            if self.fail_io.load(Ordering::SeqCst) > 0 {
                self.fail_io.fetch_sub(1, Ordering::SeqCst);
                return Err(ProviderError::Io {
                    what: "fake",
                    source: io::Error::from_raw_os_error(libc::EIO),
                });
            }
            self.allocations.fetch_add(1, Ordering::SeqCst);
            let buf = MemfdProvider::new("fake").allocate(len)?;
            Ok(Box::new(CountedBuffer(buf, self.zeroings.clone())))
        }

        fn describe(&self) -> String {
            "fake".into()
        }
    }

    /// Records mappings; refuses overlaps (like QEMU) and can fail on demand.
    #[derive(Debug, Default)]
    pub struct FakeMapper {
        pub mapped: BTreeSet<(u64, u64)>,
        pub maps: u64,
        pub unmaps: u64,
        pub fail_map: bool,
    }

    impl Mapper for FakeMapper {
        fn map(
            &mut self,
            _fd: BorrowedFd<'_>,
            _o: u64,
            off: u64,
            len: u64,
        ) -> Result<(), MapError> {
            if self.fail_map {
                return Err(MapError::Refused(io::Error::other("fake refusal")));
            }
            for &(s, l) in &self.mapped {
                assert!(off + len <= s || s + l <= off, "overlapping map");
            }
            self.mapped.insert((off, len));
            self.maps += 1;
            Ok(())
        }

        fn unmap(&mut self, off: u64, len: u64) -> Result<(), MapError> {
            assert!(self.mapped.remove(&(off, len)), "unmap of unmapped range");
            self.unmaps += 1;
            Ok(())
        }
    }

    pub fn params(name: &str) -> HeapParams {
        HeapParams {
            name: name.into(),
            contiguous: false,
            cache: CacheMode::Cached,
            min_align: 4096,
            max_size: 64 << 20,
            max_bytes: None,
            arena_size: 8 << 20,
        }
    }

    pub fn limits() -> Limits {
        Limits {
            shm_size: 1 << 30,
            max_mappings: 128,
            max_buffers: 1 << 20,
            max_bytes: 1 << 30,
        }
    }

    pub(crate) fn device_with(
        heaps: Vec<HeapParams>,
        limits: Limits,
    ) -> (Device, Arc<FakeProvider>) {
        let p = Arc::new(FakeProvider::default());
        let heaps = heaps
            .into_iter()
            .map(|params| Heap {
                params,
                provider: Box::new(p.clone()),
            })
            .collect();
        (Device::new(heaps, limits, Arc::new(AtomicU64::new(1))), p)
    }

    pub(crate) fn device() -> (Device, Arc<FakeProvider>) {
        device_with(vec![params("system")], limits())
    }

    impl Device {
        /// [`Device::handle`] for requests that must be answered.
        pub fn answer(&mut self, req: &[u8], writable: usize, m: &mut dyn Mapper) -> Vec<u8> {
            match self.handle(req, writable, m) {
                Reply::Answer(a) => a,
                Reply::Retry => panic!("request asked for a retry"),
            }
        }
    }

    pub(crate) fn req<T: ByteValued>(v: T) -> Vec<u8> {
        v.as_slice().to_vec()
    }

    pub(crate) fn hdr(ty: u32) -> ReqHdr {
        ReqHdr {
            type_: ty.into(),
            reserved: 0.into(),
        }
    }

    pub(crate) fn alloc_bytes(heap: u32, len: u64) -> Vec<u8> {
        req(AllocReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_ALLOC),
            heap_id: heap.into(),
            flags: 0.into(),
            len: len.into(),
        })
    }

    pub(crate) fn free_bytes(id: u64) -> Vec<u8> {
        req(FreeReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_FREE),
            buffer_id: id.into(),
        })
    }

    fn sync_bytes(id: u64, flags: u32) -> Vec<u8> {
        req(SyncReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_SYNC),
            buffer_id: id.into(),
            flags: flags.into(),
            reserved: 0.into(),
        })
    }

    pub(crate) fn status_of(resp: &[u8]) -> u32 {
        parse::<RespHdr>(&resp[..8]).unwrap().status.to_native()
    }

    /// ALLOC through `handle`; returns (status, id, offset, len).
    pub(crate) fn alloc(
        d: &mut Device,
        m: &mut FakeMapper,
        heap: u32,
        len: u64,
    ) -> (u32, u64, u64, u64) {
        let mut resp = d.answer(&alloc_bytes(heap, len), 32, m);
        // A failure may be answered with the header only.
        resp.resize(std::mem::size_of::<AllocResp>(), 0);
        let r = parse::<AllocResp>(&resp).unwrap();
        (
            r.hdr.status.to_native(),
            r.buffer_id.to_native(),
            r.offset.to_native(),
            r.len.to_native(),
        )
    }

    pub(crate) fn free(d: &mut Device, m: &mut FakeMapper, id: u64) -> u32 {
        status_of(&d.answer(&free_bytes(id), 8, m))
    }

    #[test]
    fn config_space() {
        let (d, _) = device_with(vec![params("a"), params("b")], limits());
        let c = d.config();
        assert_eq!(c.magic.to_native(), VIRTIO_DMAHEAP_MAGIC);
        assert_eq!(c.version.to_native(), 1);
        assert_eq!(c.num_heaps.to_native(), 2);
        assert_eq!(c.max_buffers.to_native(), 1 << 20);
    }

    #[test]
    fn heap_info() {
        let mut p = params("linux,cma");
        p.contiguous = true;
        p.cache = CacheMode::WriteCombined;
        p.max_bytes = Some(32 << 20);
        let (mut d, _) = device_with(vec![params("system"), p], limits());
        let mut m = FakeMapper::default();
        let info = |d: &mut Device, m: &mut FakeMapper, id: u32, reserved: u32| {
            let r = req(HeapInfoReq {
                hdr: hdr(VIRTIO_DMAHEAP_REQ_HEAP_INFO),
                heap_id: id.into(),
                reserved: reserved.into(),
            });
            parse::<HeapInfoResp>(&d.answer(&r, 72, m)).unwrap()
        };
        let r = info(&mut d, &mut m, 1, 0);
        assert_eq!(r.hdr.status.to_native(), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(&r.info.name[..10], b"linux,cma\0");
        assert_eq!(r.info.flags.to_native(), VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS);
        assert_eq!(r.info.cache.to_native(), VIRTIO_DMAHEAP_CACHE_WC);
        assert_eq!(r.info.min_align.to_native(), 4096);
        assert_eq!(r.info.max_size.to_native(), 64 << 20);
        assert_eq!(r.info.capacity.to_native(), 32 << 20);
        let r = info(&mut d, &mut m, 0, 0);
        assert_eq!(r.info.capacity.to_native(), 1 << 30);
        assert_eq!(r.info.flags.to_native(), 0);
        assert_eq!(
            info(&mut d, &mut m, 2, 0).hdr.status.to_native(),
            VIRTIO_DMAHEAP_S_NO_HEAP
        );
        assert_eq!(
            info(&mut d, &mut m, u32::MAX, 0).hdr.status.to_native(),
            VIRTIO_DMAHEAP_S_NO_HEAP
        );
        assert_eq!(
            info(&mut d, &mut m, 0, 1).hdr.status.to_native(),
            VIRTIO_DMAHEAP_S_INVAL
        );
    }

    #[test]
    fn small_buffers_share_an_arena() {
        let (mut d, p) = device();
        let mut m = FakeMapper::default();
        let a = alloc(&mut d, &mut m, 0, 64 << 10);
        let b = alloc(&mut d, &mut m, 0, 4096);
        let c = alloc(&mut d, &mut m, 0, 8192);
        for r in [a, b, c] {
            assert_eq!(r.0, VIRTIO_DMAHEAP_S_OK);
            assert_eq!(r.2 % 4096, 0);
        }
        assert_eq!((a.1, b.1, c.1), (1, 2, 3));
        assert_eq!((a.3, b.3, c.3), (64 << 10, 4096, 8192));
        assert_eq!(m.maps, 1, "one arena mapping");
        assert_eq!(p.allocations.load(Ordering::SeqCst), 1);
        assert_eq!(b.2, a.2 + (64 << 10));
        let s = d.stats();
        assert_eq!(s.heaps["system"].buffers, 3);
        assert_eq!(s.heaps["system"].bytes, (64 << 10) + 4096 + 8192);
        assert_eq!(s.heaps["system"].mappings, 1);
        assert_eq!(s.total.arenas, 1);
    }

    #[test]
    fn a_big_buffer_gets_a_mapping_of_its_own_kept_as_a_spare_until_idle() {
        let (mut d, p) = device();
        let mut m = FakeMapper::default();
        let small_limit = params("x").small_limit();
        let (st, id, off, len) = alloc(&mut d, &mut m, 0, small_limit + 4096);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(len, small_limit + 4096);
        assert_eq!(off % ARENA_MIN, 0);
        assert!(m.mapped.contains(&(off, len)));
        d.poke(id, len - 8, b"old data").unwrap();
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_NO_BUFFER);
        // Kept (zeroed) for the next large buffer: no SHMEM_UNMAP, no SHMEM_MAP.
        assert_eq!((m.maps, m.unmaps, m.mapped.len()), (1, 0, 1));
        let s = d.stats().total;
        assert_eq!((s.buffers, s.bytes, s.mappings), (0, 0, 1));
        let allocations = p.allocations.load(Ordering::SeqCst);
        let (st, id2, off2, _) = alloc(&mut d, &mut m, 0, small_limit + 4096);
        assert_eq!((st, off2, m.maps), (VIRTIO_DMAHEAP_S_OK, off, 1));
        assert_eq!(p.allocations.load(Ordering::SeqCst), allocations);
        assert_eq!(d.peek(id2, len - 8, 8).unwrap(), [0; 8], "not zeroed");
        // A buffer that would waste more than half of it gets a mapping of its own.
        assert_eq!(free(&mut d, &mut m, id2), VIRTIO_DMAHEAP_S_OK);
        let big = alloc(&mut d, &mut m, 0, 2 * (small_limit + 8192));
        let small = alloc(&mut d, &mut m, 0, small_limit / 2 + 4096);
        assert_eq!(
            (big.0, small.0, m.maps),
            (VIRTIO_DMAHEAP_S_OK, VIRTIO_DMAHEAP_S_OK, 3)
        );
        assert_ne!(big.2, off);
        for id in [big.1, small.1] {
            assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        }
        // At the idle deadline everything goes.
        let deadline = d.idle_deadline().expect("spares to release");
        assert_eq!(d.release_idle(deadline, &mut m), 3);
        assert!(m.mapped.is_empty());
        assert_eq!(d.stats().total, HeapStats::default());
    }

    #[test]
    fn large_spares_are_bounded_and_go_first_when_the_window_is_short() {
        let mut l = limits();
        l.shm_size = 128 << 20;
        l.max_bytes = 128 << 20;
        let (mut d, _) = device_with(vec![params("a")], l);
        let mut m = FakeMapper::default();
        let ids: Vec<u64> = (0..MAX_LARGE_SPARES + 2)
            .map(|_| alloc(&mut d, &mut m, 0, 16 << 20).1)
            .collect();
        for id in ids {
            assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        }
        assert_eq!(m.mapped.len(), MAX_LARGE_SPARES, "bounded");
        // A buffer that needs the whole window: the spares make room.
        let (st, _, off, _) = alloc(&mut d, &mut m, 0, 64 << 20);
        assert_eq!((st, off % (64 << 20)), (VIRTIO_DMAHEAP_S_OK, 0));
    }

    #[test]
    fn freed_range_is_zeroed_before_reuse() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        let keep = alloc(&mut d, &mut m, 0, 4096);
        let (_, id, off, _) = alloc(&mut d, &mut m, 0, 8192);
        d.poke(id, 100, b"secret").unwrap();
        assert_eq!(d.peek(id, 100, 6).unwrap(), b"secret");
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        let (st, id2, off2, _) = alloc(&mut d, &mut m, 0, 8192);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(off2, off, "range reused");
        assert!(id2 > id);
        assert_eq!(d.peek(id2, 0, 8192).unwrap(), vec![0u8; 8192]);
        assert!(d.peek(id, 0, 1).is_err());
        assert!(d.peek(id2, 8190, 4).is_err());
        assert!(d.peek(keep.1, u64::MAX, 2).is_err());
    }

    #[test]
    fn ids_are_never_reused_even_across_a_disconnect() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        let mut last = 0;
        for _ in 0..10 {
            let (st, id, _, _) = alloc(&mut d, &mut m, 0, 4096);
            assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
            assert!(id > last && id != 0);
            last = id;
            assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        }
        d.disconnect();
        let mut m = FakeMapper::default();
        let (_, id, _, _) = alloc(&mut d, &mut m, 0, 4096);
        assert!(id > last);
    }

    #[test]
    fn a_disconnect_drops_everything_without_unmapping() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        let (_, id, _, _) = alloc(&mut d, &mut m, 0, 4096);
        alloc(&mut d, &mut m, 0, 32 << 20);
        assert_eq!(m.maps, 2);
        d.disconnect();
        assert_eq!(m.unmaps, 0);
        assert_eq!(d.stats().total, HeapStats::default());
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_NO_BUFFER);
        // The window is free again (the front end dropped its mappings too).
        let mut m = FakeMapper::default();
        let (st, _, off, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!((st, off), (VIRTIO_DMAHEAP_S_OK, 0));
    }

    #[test]
    fn invalid_alloc_arguments() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        assert_eq!(alloc(&mut d, &mut m, 0, 0).0, VIRTIO_DMAHEAP_S_INVAL);
        assert_eq!(alloc(&mut d, &mut m, 0, 4097).0, VIRTIO_DMAHEAP_S_INVAL);
        assert_eq!(alloc(&mut d, &mut m, 1, 4096).0, VIRTIO_DMAHEAP_S_NO_HEAP);
        assert_eq!(
            alloc(&mut d, &mut m, 0, (64 << 20) + 4096).0,
            VIRTIO_DMAHEAP_S_TOO_BIG
        );
        assert_eq!(alloc(&mut d, &mut m, 0, !4095).0, VIRTIO_DMAHEAP_S_TOO_BIG);
        let mut r = AllocReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_ALLOC),
            heap_id: 0.into(),
            flags: 1.into(),
            len: 4096.into(),
        };
        assert_eq!(
            status_of(&d.answer(&req(r), 32, &mut m)),
            VIRTIO_DMAHEAP_S_INVAL
        );
        r.flags = 0.into();
        r.hdr.reserved = 1.into();
        assert_eq!(
            status_of(&d.answer(&req(r), 32, &mut m)),
            VIRTIO_DMAHEAP_S_INVAL
        );
        assert_eq!(m.maps, 0);
        assert_eq!(d.stats().total.buffers, 0);
    }

    #[test]
    fn min_align_rounds_and_aligns() {
        let mut p = params("big-align");
        p.min_align = 64 << 10;
        let (mut d, _) = device_with(vec![p], limits());
        let mut m = FakeMapper::default();
        let a = alloc(&mut d, &mut m, 0, 4096);
        let b = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(a.3, 64 << 10);
        assert_eq!(b.2 % (64 << 10), 0);
        assert_ne!(a.2, b.2);
    }

    #[test]
    fn quotas() {
        let mut l = limits();
        l.max_buffers = 3;
        l.max_bytes = 1 << 20;
        let mut hp = params("capped");
        hp.max_bytes = Some(64 << 10);
        let (mut d, _) = device_with(vec![params("a"), hp], l);
        let mut m = FakeMapper::default();
        assert_eq!(alloc(&mut d, &mut m, 1, 64 << 10).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            alloc(&mut d, &mut m, 1, 4096).0,
            VIRTIO_DMAHEAP_S_QUOTA,
            "per heap"
        );
        assert_eq!(
            alloc(&mut d, &mut m, 0, 1 << 20).0,
            VIRTIO_DMAHEAP_S_QUOTA,
            "bytes"
        );
        assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            alloc(&mut d, &mut m, 0, 4096).0,
            VIRTIO_DMAHEAP_S_QUOTA,
            "buffers"
        );
        assert_eq!(free(&mut d, &mut m, 1), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(alloc(&mut d, &mut m, 1, 4096).0, VIRTIO_DMAHEAP_S_OK);
    }

    #[test]
    fn mapping_cap() {
        let mut l = limits();
        l.max_mappings = 2;
        let (mut d, _) = device_with(vec![params("a")], l);
        let mut m = FakeMapper::default();
        let big = 4 << 20;
        let a = alloc(&mut d, &mut m, 0, big);
        let b = alloc(&mut d, &mut m, 0, big);
        assert_eq!((a.0, b.0), (VIRTIO_DMAHEAP_S_OK, VIRTIO_DMAHEAP_S_OK));
        // The cap is a limit of the window (spec 6.2): WINDOW_FULL, not QUOTA.
        assert_eq!(
            alloc(&mut d, &mut m, 0, big).0,
            VIRTIO_DMAHEAP_S_WINDOW_FULL
        );
        assert_eq!(
            alloc(&mut d, &mut m, 0, 4096).0,
            VIRTIO_DMAHEAP_S_WINDOW_FULL,
            "arena needs a mapping"
        );
        assert_eq!(free(&mut d, &mut m, a.1), VIRTIO_DMAHEAP_S_OK);
        let s = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(s.0, VIRTIO_DMAHEAP_S_OK);
        // The arena becomes an empty spare (b is still live); a big buffer evicts it.
        assert_eq!(free(&mut d, &mut m, s.1), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(d.stats().total.mappings, 2);
        assert_eq!(alloc(&mut d, &mut m, 0, big).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(d.stats().total.arenas, 0);
        assert_eq!(m.mapped.len(), 2);
    }

    #[test]
    fn window_full() {
        let mut l = limits();
        l.shm_size = 8 << 20;
        l.max_bytes = 8 << 20;
        let (mut d, _) = device_with(vec![params("a")], l);
        let mut m = FakeMapper::default();
        let a = alloc(&mut d, &mut m, 0, 4 << 20);
        assert_eq!(a.0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(alloc(&mut d, &mut m, 0, 4 << 20).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(alloc(&mut d, &mut m, 0, 4 << 20).0, VIRTIO_DMAHEAP_S_QUOTA);
        assert_eq!(free(&mut d, &mut m, a.1), VIRTIO_DMAHEAP_S_OK);
        // 2 MiB arena fits in the freed 4 MiB; a 6 MiB buffer does not.
        let mut l = limits();
        l.shm_size = 8 << 20;
        let (mut d, _) = device_with(vec![params("a")], l);
        let mut m = FakeMapper::default();
        assert_eq!(alloc(&mut d, &mut m, 0, 6 << 20).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            alloc(&mut d, &mut m, 0, 4 << 20).0,
            VIRTIO_DMAHEAP_S_WINDOW_FULL
        );
        assert_eq!(
            alloc(&mut d, &mut m, 0, 4096).0,
            VIRTIO_DMAHEAP_S_OK,
            "2 MiB arena fits"
        );
        assert_eq!(alloc(&mut d, &mut m, 0, 1 << 20).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            alloc(&mut d, &mut m, 0, 1 << 20).0,
            VIRTIO_DMAHEAP_S_WINDOW_FULL
        );
    }

    #[test]
    fn provider_and_map_failures() {
        let (mut d, p) = device();
        let mut m = FakeMapper::default();
        p.fail_nomem.store(1, Ordering::SeqCst);
        assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_NOMEM);
        p.fail_io.store(1, Ordering::SeqCst);
        assert_eq!(alloc(&mut d, &mut m, 0, 32 << 20).0, VIRTIO_DMAHEAP_S_IOERR);
        m.fail_map = true;
        assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_IOERR);
        m.fail_map = false;
        assert_eq!(d.stats().total, HeapStats::default());
        // Nothing leaked: the window starts at 0 again.
        let (st, id, off, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!((st, off), (VIRTIO_DMAHEAP_S_OK, 0));
        assert_eq!(id, 1, "failed allocations consume no id");
    }

    #[test]
    fn spare_arena_kept_and_released() {
        let (mut d, _) = device_with(vec![params("a")], limits());
        let mut m = FakeMapper::default();
        // Fill the first 2 MiB arena, then a second one.
        let mut ids = Vec::new();
        for _ in 0..(4 << 20) / (64 << 10) {
            let r = alloc(&mut d, &mut m, 0, 64 << 10);
            assert_eq!(r.0, VIRTIO_DMAHEAP_S_OK);
            ids.push(r.1);
        }
        assert_eq!(d.stats().total.arenas, 2);
        for id in ids {
            assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        }
        // The heap is idle: one emptied arena stays as the spare until the idle deadline.
        let s = d.stats();
        assert_eq!((s.total.arenas, s.total.buffers), (1, 0));
        assert_eq!(m.unmaps, 1);
        let deadline = d.idle_deadline().expect("idle spare");
        assert_eq!(d.release_idle(deadline, &mut m), 1);
        assert_eq!(d.stats().total.arenas, 0);
        assert_eq!(m.unmaps, 2);
        assert!(m.mapped.is_empty());
        // While the heap is in use, one emptied arena stays mapped as a spare.
        let keep = alloc(&mut d, &mut m, 0, 64 << 10);
        let mut ids = Vec::new();
        for _ in 0..(4 << 20) / (64 << 10) {
            ids.push(alloc(&mut d, &mut m, 0, 64 << 10).1);
        }
        let arenas = d.stats().total.arenas;
        assert_eq!(arenas, 3);
        for id in ids {
            assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        }
        assert_eq!(d.stats().total.arenas, 2, "keeper's arena and one spare");
        let maps = m.maps;
        for _ in 0..(4 << 20) / (64 << 10) - 1 {
            assert_eq!(alloc(&mut d, &mut m, 0, 64 << 10).0, VIRTIO_DMAHEAP_S_OK);
        }
        assert_eq!(m.maps, maps, "spare reused without a new mapping");
        assert_eq!(free(&mut d, &mut m, keep.1), VIRTIO_DMAHEAP_S_OK);
    }

    #[test]
    fn a_large_mapping_the_stop_kept_in_the_window_turns_into_an_arena() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        // Enough large spares already: the next freed one would be unmapped.
        let spares: Vec<u64> = (0..MAX_LARGE_SPARES)
            .map(|_| alloc(&mut d, &mut m, 0, 16 << 20).1)
            .collect();
        let (_, id, off, len) = alloc(&mut d, &mut m, 0, 32 << 20);
        for s in spares {
            assert_eq!(free(&mut d, &mut m, s), VIRTIO_DMAHEAP_S_OK);
        }
        let maps = m.maps;
        d.poke(id, 0, b"old data").unwrap();
        struct Refuse<'a>(&'a mut FakeMapper);
        impl Mapper for Refuse<'_> {
            fn map(&mut self, fd: BorrowedFd<'_>, o: u64, s: u64, l: u64) -> Result<(), MapError> {
                self.0.map(fd, o, s, l)
            }
            fn unmap(&mut self, _: u64, _: u64) -> Result<(), MapError> {
                Err(MapError::NotRunning)
            }
        }
        assert_eq!(
            status_of(&d.answer(&free_bytes(id), 8, &mut Refuse(&mut m))),
            VIRTIO_DMAHEAP_S_OK
        );
        // Still mapped: never mapped over, reused for small buffers, zeroed.
        assert!(m.mapped.contains(&(off, len)));
        let (st, id2, off2, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!((st, off2), (VIRTIO_DMAHEAP_S_OK, off));
        assert_eq!(d.peek(id2, 0, 8).unwrap(), [0; 8]);
        assert_eq!(m.maps, maps);
        // Once empty again it is the idle spare, and goes at the idle deadline.
        assert_eq!(free(&mut d, &mut m, id2), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(m.mapped.len(), 1 + MAX_LARGE_SPARES);
        let deadline = d.idle_deadline().expect("idle spare");
        assert_eq!(d.release_idle(deadline, &mut m), 1 + MAX_LARGE_SPARES);
        assert!(m.mapped.is_empty());
    }

    #[test]
    fn sync_requests() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        let (_, id, _, _) = alloc(&mut d, &mut m, 0, 4096);
        let s = |d: &mut Device, m: &mut FakeMapper, id, f| {
            status_of(&d.answer(&sync_bytes(id, f), 8, m))
        };
        assert_eq!(
            s(&mut d, &mut m, id, VIRTIO_DMAHEAP_SYNC_READ),
            VIRTIO_DMAHEAP_S_OK
        );
        assert_eq!(
            s(
                &mut d,
                &mut m,
                id,
                VIRTIO_DMAHEAP_SYNC_WRITE | VIRTIO_DMAHEAP_SYNC_END
            ),
            VIRTIO_DMAHEAP_S_OK
        );
        assert_eq!(
            s(&mut d, &mut m, id, VIRTIO_DMAHEAP_SYNC_END),
            VIRTIO_DMAHEAP_S_INVAL
        );
        assert_eq!(s(&mut d, &mut m, id, 8 | 1), VIRTIO_DMAHEAP_S_INVAL);
        assert_eq!(s(&mut d, &mut m, id + 1, 1), VIRTIO_DMAHEAP_S_NO_BUFFER);
        d.set_acked_features(0);
        assert_eq!(s(&mut d, &mut m, id, 1), VIRTIO_DMAHEAP_S_UNSUPP);
    }

    #[test]
    fn malformed_requests() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        // Too short for a header.
        assert_eq!(
            status_of(&d.answer(&[1, 0, 0], 8, &mut m)),
            VIRTIO_DMAHEAP_S_INVAL
        );
        assert!(d.answer(&[], 4, &mut m).is_empty(), "nothing fits");
        // Unknown and unoffered types.
        for ty in [0, 5, 6, u32::MAX] {
            let r = req(AssignUuidReq {
                hdr: hdr(ty),
                buffer_id: 1.into(),
            });
            assert_eq!(
                status_of(&d.answer(&r, 24, &mut m)),
                VIRTIO_DMAHEAP_S_UNSUPP
            );
        }
        // Truncated and oversized requests.
        let a = alloc_bytes(0, 4096);
        assert_eq!(
            status_of(&d.answer(&a[..20], 32, &mut m)),
            VIRTIO_DMAHEAP_S_INVAL
        );
        let mut long = a.clone();
        long.push(0);
        assert_eq!(
            status_of(&d.answer(&long, 32, &mut m)),
            VIRTIO_DMAHEAP_S_INVAL
        );
        // Response does not fit: header only with INVAL, or nothing; no allocation made.
        let r = d.answer(&a, 16, &mut m);
        assert_eq!((r.len(), status_of(&r)), (8, VIRTIO_DMAHEAP_S_INVAL));
        assert!(d.answer(&a, 7, &mut m).is_empty());
        assert_eq!(m.maps, 0);
        // Larger writable part is fine: the response has its own size.
        assert_eq!(d.answer(&a, 4096, &mut m).len(), 32);
    }

    #[test]
    fn target_65536_small_buffers() {
        let mut l = limits();
        l.shm_size = 4 << 30;
        l.max_bytes = 4 << 30;
        let mut p = params("system");
        p.arena_size = 64 << 20;
        let (mut d, _) = device_with(vec![p], l);
        let mut m = FakeMapper::default();
        let mut ids = Vec::with_capacity(65536);
        for i in 0..65536u64 {
            let len = 4096 * (1 + i % 16);
            let (st, id, _, got) = alloc(&mut d, &mut m, 0, len);
            assert_eq!(st, VIRTIO_DMAHEAP_S_OK, "buffer {i}");
            assert_eq!(got, len);
            ids.push(id);
        }
        let s = d.stats();
        assert_eq!(s.total.buffers, 65536);
        assert!(s.total.mappings <= 64, "{} mappings", s.total.mappings);
        for id in ids {
            assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        }
        let s = d.stats();
        assert_eq!(
            (s.total.buffers, s.total.bytes, s.total.mappings),
            (0, 0, 1),
            "one spare arena until the idle deadline"
        );
        let deadline = d.idle_deadline().expect("idle spare");
        assert_eq!(d.release_idle(deadline, &mut m), 1);
        assert_eq!(d.stats().total.mappings, 0);
    }

    const NS: Duration = Duration::from_nanos(1);

    #[test]
    fn an_idle_heap_keeps_its_emptied_arena_until_the_idle_deadline() {
        let (mut d, p) = device();
        let mut m = FakeMapper::default();
        let before = Instant::now();
        assert_eq!(d.idle_deadline(), None);
        let (st, id, off, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(d.idle_deadline(), None, "a live buffer: not idle");
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        assert_eq!((m.maps, m.unmaps, m.mapped.len()), (1, 0, 1));
        let deadline = d.idle_deadline().expect("idle heap with a spare");
        assert!(deadline >= before + SPARE_IDLE_DELAY);
        // Alloc + free + alloc: the spare is reused, no new host allocation or mapping.
        let (st, id2, off2, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!((st, off2), (VIRTIO_DMAHEAP_S_OK, off));
        assert_eq!(d.peek(id2, 0, 4096).unwrap(), vec![0u8; 4096]);
        assert_eq!((m.maps, p.allocations.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(free(&mut d, &mut m, id2), VIRTIO_DMAHEAP_S_OK);
        // Activity moved the deadline; nothing goes before it, everything at it.
        let deadline2 = d.idle_deadline().expect("idle again");
        assert!(deadline2 >= deadline);
        assert_eq!(d.release_idle(before, &mut m), 0);
        assert_eq!(d.release_idle(deadline2 - NS, &mut m), 0);
        assert_eq!(m.unmaps, 0);
        assert_eq!(d.release_idle(deadline2, &mut m), 1);
        assert_eq!((m.unmaps, m.mapped.len()), (1, 0));
        assert_eq!(d.stats().total, HeapStats::default());
        // Done for this idle period.
        assert_eq!(d.idle_deadline(), None);
        assert_eq!(d.release_idle(deadline2 + SPARE_IDLE_DELAY * 10, &mut m), 0);
        // The next ALLOC maps a new arena.
        assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(m.maps, 2);
    }

    #[test]
    fn the_idle_delay_is_configurable() {
        let (mut d, _) = device();
        d.set_spare_idle_delay(Duration::from_secs(5));
        let mut m = FakeMapper::default();
        let before = Instant::now();
        let (_, id, _, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        let deadline = d.idle_deadline().unwrap();
        assert!(deadline >= before + Duration::from_secs(5));
        assert_eq!(d.release_idle(deadline - NS, &mut m), 0);
        assert_eq!(d.release_idle(deadline, &mut m), 1);
    }

    #[test]
    fn heaps_in_use_keep_their_spare_and_only_idle_heaps_release() {
        let (mut d, p) = device_with(vec![params("a"), params("b")], limits());
        let mut m = FakeMapper::default();
        // Heap 0 stays in use; fill its first arena (2 MiB) so the next buffers need another.
        let keep: Vec<u64> = (0..2)
            .map(|_| alloc(&mut d, &mut m, 0, 1 << 20).1)
            .collect();
        let (_, other, _, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(d.stats().heaps["a"].arenas, 2);
        assert_eq!(free(&mut d, &mut m, other), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            d.stats().heaps["a"].arenas,
            2,
            "the emptied arena is the spare"
        );
        assert_eq!(d.idle_deadline(), None, "heap a is in use");
        assert_eq!(
            d.release_idle(Instant::now() + SPARE_IDLE_DELAY * 10, &mut m),
            0
        );
        // Heap 1 goes idle: only its arena is released at the deadline.
        let (_, b, _, _) = alloc(&mut d, &mut m, 1, 4096);
        assert_eq!(free(&mut d, &mut m, b), VIRTIO_DMAHEAP_S_OK);
        let deadline = d.idle_deadline().unwrap();
        assert_eq!(d.release_idle(deadline, &mut m), 1);
        let s = d.stats();
        assert_eq!((s.heaps["a"].arenas, s.heaps["b"].arenas), (2, 0));
        // Heap 0 goes idle: the arena freed last is given back at once (without zeroing:
        // its memory goes with it), the spare at the deadline.
        assert_eq!(free(&mut d, &mut m, keep[0]), VIRTIO_DMAHEAP_S_OK);
        let z = p.zeroings.load(Ordering::SeqCst);
        assert_eq!(free(&mut d, &mut m, keep[1]), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            p.zeroings.load(Ordering::SeqCst),
            z,
            "no zeroing of a released arena"
        );
        assert_eq!(d.stats().heaps["a"].arenas, 1);
        let deadline = d.idle_deadline().unwrap();
        assert_eq!(d.release_idle(deadline, &mut m), 1);
        assert!(m.mapped.is_empty());
        assert_eq!(m.maps, m.unmaps);
    }

    #[test]
    fn a_disconnect_forgets_the_idle_spare_without_unmapping() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        let (_, id, _, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        let deadline = d.idle_deadline().unwrap();
        d.disconnect();
        assert_eq!(d.idle_deadline(), None);
        assert_eq!(d.release_idle(deadline + SPARE_IDLE_DELAY, &mut m), 0);
        assert_eq!(m.unmaps, 0);
        assert_eq!(d.stats().total, HeapStats::default());
    }

    #[test]
    fn a_failed_idle_unmap_keeps_the_spare_until_new_activity() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        let (_, id, off, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        struct Refuse;
        impl Mapper for Refuse {
            fn map(&mut self, _: BorrowedFd<'_>, _: u64, _: u64, _: u64) -> Result<(), MapError> {
                Err(MapError::NotRunning)
            }
            fn unmap(&mut self, _: u64, _: u64) -> Result<(), MapError> {
                Err(MapError::NotRunning)
            }
        }
        let deadline = d.idle_deadline().unwrap();
        assert_eq!(d.release_idle(deadline, &mut Refuse), 0);
        // One attempt per idle period: no retry loop.
        assert_eq!(d.idle_deadline(), None);
        assert_eq!(d.stats().total.arenas, 1);
        // Still the spare: reused without a new mapping; the next idle period releases it.
        let (st, id, off2, _) = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!((st, off2, m.maps), (VIRTIO_DMAHEAP_S_OK, off, 1));
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
        let deadline = d.idle_deadline().unwrap();
        assert_eq!(d.release_idle(deadline, &mut m), 1);
        assert!(m.mapped.is_empty());
    }

    #[test]
    fn an_arena_released_on_free_is_not_zeroed_but_a_kept_one_is() {
        let (mut d, p) = device();
        let mut m = FakeMapper::default();
        // Two arenas: fill the first (2 MiB), then one buffer in a second.
        let a: Vec<u64> = (0..2)
            .map(|_| alloc(&mut d, &mut m, 0, 1 << 20).1)
            .collect();
        let (_, b, _, _) = alloc(&mut d, &mut m, 0, 1 << 20);
        assert_eq!(d.stats().total.arenas, 2);
        let z = p.zeroings.load(Ordering::SeqCst);
        // The second arena empties first: it becomes the spare (zeroed).
        assert_eq!(free(&mut d, &mut m, b), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(p.zeroings.load(Ordering::SeqCst), z + 1);
        // The first one's last buffer: released at once, no zeroing.
        assert_eq!(free(&mut d, &mut m, a[0]), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(p.zeroings.load(Ordering::SeqCst), z + 2);
        assert_eq!(free(&mut d, &mut m, a[1]), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            p.zeroings.load(Ordering::SeqCst),
            z + 2,
            "released, not zeroed"
        );
        assert_eq!((d.stats().total.arenas, m.unmaps), (1, 1));
        // If that unmap fails, the range is zeroed after all (the arena stays in use).
        let (_, c, _, _) = alloc(&mut d, &mut m, 0, 1 << 20);
        let (_, e, _, _) = alloc(&mut d, &mut m, 0, 1 << 20);
        let (_, f, _, _) = alloc(&mut d, &mut m, 0, 1 << 20);
        assert_eq!(d.stats().total.arenas, 2);
        assert_eq!(free(&mut d, &mut m, f), VIRTIO_DMAHEAP_S_OK);
        let z = p.zeroings.load(Ordering::SeqCst);
        struct RefuseUnmap<'a>(&'a mut FakeMapper);
        impl Mapper for RefuseUnmap<'_> {
            fn map(&mut self, fd: BorrowedFd<'_>, o: u64, s: u64, l: u64) -> Result<(), MapError> {
                self.0.map(fd, o, s, l)
            }
            fn unmap(&mut self, _: u64, _: u64) -> Result<(), MapError> {
                Err(MapError::NotRunning)
            }
        }
        d.poke(e, 0, b"dirty").unwrap();
        assert_eq!(
            status_of(&d.answer(&free_bytes(c), 8, &mut RefuseUnmap(&mut m))),
            VIRTIO_DMAHEAP_S_OK
        );
        assert_eq!(
            status_of(&d.answer(&free_bytes(e), 8, &mut RefuseUnmap(&mut m))),
            VIRTIO_DMAHEAP_S_OK
        );
        assert_eq!(p.zeroings.load(Ordering::SeqCst), z + 2);
        assert_eq!(d.stats().total.arenas, 2, "unmap refused: both arenas stay");
        let (_, g, _, _) = alloc(&mut d, &mut m, 0, 1 << 20);
        let (_, h, _, _) = alloc(&mut d, &mut m, 0, 1 << 20);
        for id in [g, h] {
            assert_eq!(d.peek(id, 0, 5).unwrap(), [0; 5]);
        }
    }
}
