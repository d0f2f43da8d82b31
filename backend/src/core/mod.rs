//! The transport-free device core: the protocol over a typed buffer pool. It knows nothing
//! of vhost; mappings into the shared memory window go through the [`Mapper`] trait, which
//! the vhost-user layer implements with the back-end request channel (and tests with a
//! fake, [`crate::testing`]).
//!
//! * [`layout`]: the heap ranges, the part of the window each heap's buffers lie in
//!   (`VIRTIO_DMAHEAP_F_HEAP_RANGE`);
//! * [`pool`]: the window, its mappings (arenas shared by small buffers, or one large
//!   buffer's own), the live buffers and the driver's reservations;
//! * [`buffers`]: ALLOC and FREE over the pool;
//! * [`quota`]: the per-VM and per-heap accounting, one charge and one uncharge path;
//! * [`idle`]: which emptied mappings stay mapped for reuse, and when they go;
//! * [`session`]: the driver's session (`VIRTIO_DMAHEAP_F_SESSION`);
//! * [`export`]: sharing buffers with other devices by UUID (`VIRTIO_DMAHEAP_F_UUID`);
//! * [`handle`]: the device behind its lock, shared by the vhost-user layer, the control
//!   socket and the daemon.

mod buffers;
pub mod export;
pub mod handle;
mod idle;
pub mod layout;
mod mapper;
mod params;
mod pool;
mod quota;
mod ratelimit;
mod release_watch;
mod session;
#[cfg(test)]
mod tests;

pub use export::{ExportTable, Retained, Uuid, Watch};
pub use handle::{DeviceHandle, HostRequest, HostResult, HOST_REQUEST_TIMEOUT};
pub use idle::{MAX_LARGE_SPARES, SESSION_SPARE_IDLE_DELAY, SPARE_IDLE_DELAY};
pub use layout::{heap_ranges, HeapRange, LayoutError, RANGE_ALIGN};
pub use mapper::{MapError, Mapper};
pub use params::{
    BufferInfo, CacheMode, Heap, HeapParams, HeapStats, LimitStats, Limits, Stats, ARENA_MIN,
};
pub use ratelimit::RateLimit;
pub use session::{SessionState, MAX_RESERVATIONS};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::abi::*;
use crate::host::{HostBuffer, ProviderError};
use crate::wire::{self, Answer, Features, Reply, Request};

use idle::IdlePolicy;
use pool::Pool;
use quota::Quota;

/// Why the core refused a request; [`wire::status`] turns it into a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Invalid argument.
    #[error("invalid argument")]
    Inval,
    /// Host failure.
    #[error("host I/O error")]
    IoErr,
    /// No such heap.
    #[error("no such heap")]
    NoHeap,
    /// No such buffer.
    #[error("no such buffer")]
    NoBuffer,
    /// The host heap is out of memory.
    #[error("host out of memory")]
    NoMem,
    /// A per-VM or per-heap quota.
    #[error("quota exceeded")]
    Quota,
    /// No room in the window, or the mapping cap.
    #[error("window full")]
    WindowFull,
    /// Larger than the heap's largest buffer.
    #[error("too big")]
    TooBig,
    /// No open session.
    #[error("no session")]
    NoSession,
    /// Not supported (here: a buffer that cannot be exported alone, or a front end
    /// without a shared-object table).
    #[error("not supported")]
    Unsupp,
    /// The ring stopped while the request needed the front end: serve it again later
    /// ([`Reply::Retry`]); never sent to the driver.
    #[error("ring stopped: retry")]
    Retry,
}

/// Errors of operator access to buffers (the control socket; guests see status codes).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Unknown buffer id.
    #[error("no buffer {0}")]
    NoBuffer(u64),
    /// Range outside the buffer.
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

/// A buffer-id counter that starts at an unpredictable value below 2^62, so that ids of
/// different daemon processes serving the same VM do not collide (spec A.3).
pub fn unpredictable_id_start() -> u64 {
    (RandomState::new().hash_one(0xd1a7_u16) & ((1 << 62) - 1)).max(1)
}

/// The device: heaps, live buffers and mappings of one VM.
#[derive(Debug)]
pub struct Device {
    heaps: Vec<Heap>,
    /// Each heap's range of the window (spec 6.3), by heap index: every mapping of the heap
    /// lies inside it. Fixed for the device's lifetime.
    ranges: Vec<HeapRange>,
    /// Whether `VIRTIO_DMAHEAP_F_HEAP_RANGE` is offered (the ranges follow its rules).
    heap_range_offered: bool,
    limits: Limits,
    pool: Pool,
    quota: Quota,
    idle: IdlePolicy,
    next_id: Arc<AtomicU64>,
    features: Features,
    ratelimit: RateLimit,
    session: SessionState,
    /// The page size of the open or suspended session (`VIRTIO_DMAHEAP_F_PAGE_SIZE`), else
    /// `VIRTIO_DMAHEAP_PAGE_SIZE`: every heap's alignment is at least this.
    page_size: u64,
    /// Keys for unpredictable session ids.
    id_keys: RandomState,
    sessions_opened: u64,
    /// Whether `VIRTIO_DMAHEAP_F_UUID` is offered.
    uuid_offered: bool,
    /// UUID -> export fd, read by `GET_SHARED_OBJECT` without the device lock.
    exports: Arc<ExportTable>,
    /// Live buffers with a UUID.
    exported: HashMap<u64, export::Exported>,
    /// Buffers freed by the guest but held for importers, by their old id.
    retained: BTreeMap<u64, Retained>,
    /// Sees when dma-buf exports are closed (`None`: could not be set up; then nothing
    /// retained is released before the session ends).
    watch: Option<export::ReleaseWatch>,
    /// When retained buffers are checked for release next.
    retained_next: Option<std::time::Instant>,
    /// Register UUIDs with the front end's shared-object table.
    share_table: bool,
    /// Most live exports (each holds an fd).
    export_cap: usize,
    /// The front end has no shared-object table (learnt at the first ASSIGN_UUID).
    share_unsupported: bool,
}

impl Device {
    /// A device serving `heaps` within `limits`. Buffer ids come from `next_id`, which the
    /// caller keeps for the daemon's lifetime so that ids are never reused.
    ///
    /// The heap ranges are laid out here ([`layout`]). The daemon's configuration refuses
    /// heaps the window cannot be split for ([`LayoutError`]); should such heaps reach this
    /// point anyway, every heap gets the whole window and `VIRTIO_DMAHEAP_F_HEAP_RANGE` is
    /// not offered.
    pub fn new(heaps: Vec<Heap>, limits: Limits, next_id: Arc<AtomicU64>) -> Self {
        let caches: Vec<CacheMode> = heaps.iter().map(|h| h.params.cache).collect();
        let (ranges, heap_range_offered) = match heap_ranges(limits.shm_size, &caches) {
            Ok(r) => (r, true),
            Err(e) => {
                log::error!("{e}: heap ranges not offered");
                let whole = HeapRange {
                    offset: 0,
                    len: limits.shm_size,
                };
                (vec![whole; heaps.len()], false)
            }
        };
        Self {
            ranges,
            heap_range_offered,
            pool: Pool::new(limits.shm_size),
            quota: Quota::new(heaps.len()),
            idle: IdlePolicy::new(heaps.len()),
            heaps,
            limits,
            next_id,
            features: Features {
                sync: true,
                session: false,
                no_sync: false,
                batch: false,
                uuid: false,
                page_size: false,
                heap_range: false,
            },
            ratelimit: RateLimit::new(),
            session: SessionState::Open(0),
            page_size: u64::from(VIRTIO_DMAHEAP_PAGE_SIZE),
            id_keys: RandomState::new(),
            sessions_opened: 0,
            uuid_offered: true,
            exports: Arc::new(ExportTable::default()),
            exported: HashMap::new(),
            retained: BTreeMap::new(),
            watch: match export::ReleaseWatch::new() {
                Ok(w) => Some(w),
                Err(e) => {
                    log::warn!(
                        "cannot watch exports for release ({e}): buffers freed while \
                         shared stay charged until the session ends"
                    );
                    None
                }
            },
            retained_next: None,
            share_table: false,
            export_cap: export::export_cap(),
            share_unsupported: false,
        }
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
    pub fn device_features(&self) -> u64 {
        let mut f = Features::OFFERED;
        if self.uuid_offered {
            f |= 1 << VIRTIO_DMAHEAP_F_UUID;
        }
        if !self.heap_range_offered {
            f &= !(1 << VIRTIO_DMAHEAP_F_HEAP_RANGE);
        }
        f
    }

    /// The range of the window that holds every buffer of heap `heap` (an index).
    pub fn heap_range(&self, heap: usize) -> Option<HeapRange> {
        self.ranges.get(heap).copied()
    }

    /// Records the features the driver accepted (of those offered).
    pub fn set_acked_features(&mut self, features: u64) {
        self.features = Features::from_bits(features & self.device_features());
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

    /// Handles one request. `req` is the device-readable part of the chain, `writable` the
    /// size of the device-writable part. An answer never holds more than `writable` bytes
    /// (it is empty if not even a response header fits).
    pub fn handle(&mut self, req: &[u8], writable: usize, mapper: &mut dyn Mapper) -> Reply {
        let req = match wire::decode(req, writable, self.features) {
            Ok(r) => r,
            Err(e) => {
                self.ratelimit.warn(format_args!("{e}"));
                return Reply::Answer(wire::header_only(e.status(), writable));
            }
        };
        if req.needs_session() && !self.session_ok() {
            return Reply::Answer(wire::header_only(VIRTIO_DMAHEAP_S_NO_SESSION, writable));
        }
        let outcome = self.serve(req, mapper);
        wire::encode(&req, outcome, self.features)
    }

    fn serve(&mut self, req: Request, mapper: &mut dyn Mapper) -> Result<Answer, RequestError> {
        let done = |r: Result<(), RequestError>| r.map(|()| Answer::Done);
        match req {
            Request::HeapInfo { heap_id, reserved } => self
                .heap_info(heap_id, reserved)
                .map(|(info, range)| Answer::HeapInfo { info, range }),
            Request::Alloc {
                heap_id,
                flags,
                len,
            } => self
                .alloc(heap_id, flags, len, mapper)
                .map(|(buffer_id, offset, len)| Answer::Alloc {
                    buffer_id,
                    offset,
                    len,
                }),
            Request::AllocBatch {
                heap_id,
                count,
                len,
            } => self.alloc_batch(heap_id, count, len, mapper),
            Request::Free { buffer_id } => done(self.free(buffer_id, mapper)),
            Request::AssignUuid { buffer_id } => self
                .assign_uuid(buffer_id, mapper)
                .map(|uuid| Answer::Uuid { uuid }),
            Request::Sync {
                buffer_id,
                flags,
                reserved,
            } => done(self.sync(buffer_id, flags, reserved)),
            Request::SessionOpen {
                resume_id,
                page_size,
                reserved,
            } => self
                .session_open(resume_id, page_size, reserved, mapper)
                .map(|session_id| Answer::SessionOpened { session_id }),
            Request::SessionClose { flags, reserved } => {
                done(self.session_close(flags, reserved, mapper))
            }
            Request::Reserve { offset, len } => done(self.reserve(offset, len)),
            Request::Unreserve { offset, len } => done(self.unreserve(offset, len)),
        }
    }

    /// A heap's effective alignment in the current session (spec 6.3): its own, raised to
    /// the session's page size.
    fn align_of(&self, p: &HeapParams) -> u64 {
        p.min_align.max(self.page_size)
    }

    /// The session's page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// HEAP_INFO: the heap's properties and its range.
    fn heap_info(
        &self,
        heap_id: u32,
        reserved: u32,
    ) -> Result<(HeapInfo, HeapRange), RequestError> {
        if reserved != 0 {
            return Err(RequestError::Inval);
        }
        let (heap, range) = usize::try_from(heap_id)
            .ok()
            .and_then(|i| self.heaps.get(i).zip(self.ranges.get(i).copied()))
            .ok_or(RequestError::NoHeap)?;
        let p = &heap.params;
        // No buffer of the heap can be larger than its range, nor can the heap hold more.
        let global = self.limits.max_bytes.min(range.len);
        let max_size = p.max_size.min(range.len);
        let mut flags = 0;
        if p.contiguous {
            flags |= VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS;
        }
        if self.features.no_sync && !heap.provider.has_sync() {
            flags |= VIRTIO_DMAHEAP_HEAP_F_NO_SYNC;
        }
        let info = HeapInfo {
            name: wire::heap_name_bytes(&p.name),
            flags: flags.into(),
            cache: p.cache.abi().into(),
            min_align: self.align_of(p).into(),
            // A driver rounds every length up to its page, so a limit between two pages
            // would refuse the page-rounded length of a buffer it allows.
            max_size: (max_size - max_size % self.page_size).into(),
            capacity: p.max_bytes.map_or(global, |b| b.min(global)).into(),
        };
        Ok((info, range))
    }

    fn sync(&mut self, id: u64, flags: u32, reserved: u32) -> Result<(), RequestError> {
        if reserved != 0
            || flags & !VIRTIO_DMAHEAP_SYNC_VALID_MASK != 0
            || flags & (VIRTIO_DMAHEAP_SYNC_READ | VIRTIO_DMAHEAP_SYNC_WRITE) == 0
        {
            return Err(RequestError::Inval);
        }
        let rec = self.pool.buffer(id).ok_or(RequestError::NoBuffer)?;
        let m = self.pool.mapping(rec.mapping).ok_or(RequestError::IoErr)?;
        // An arena's dma-buf has no host importer, only CPU mappings (the VMM's, ours),
        // and a sync of it would cover the whole arena: nothing to do (spec 6.6).
        if m.arena.is_some() {
            return Ok(());
        }
        // The dma-buf sync flags have the same values as the virtio ones.
        if let Err(e) = m.buf.sync(u64::from(flags)) {
            self.ratelimit
                .warn(format_args!("sync of buffer {id}: {e}"));
            return Err(RequestError::IoErr);
        }
        Ok(())
    }

    /// Counters per heap and in total.
    pub fn stats(&self) -> Stats {
        let mut per: Vec<HeapStats> = (0..self.heaps.len())
            .map(|h| {
                let u = self.quota.heap(h);
                let (exported, retained_buffers, retained_bytes) = self.export_counts(h);
                HeapStats {
                    bytes: u.bytes,
                    buffers: u.buffers,
                    exported,
                    retained_buffers,
                    retained_bytes,
                    ..Default::default()
                }
            })
            .collect();
        for m in self.pool.mappings() {
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
            reserved_bytes: self.pool.reserved_bytes(),
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
            stats.total.exported += s.exported;
            stats.total.retained_buffers += s.retained_buffers;
            stats.total.retained_bytes += s.retained_bytes;
            stats.heaps.insert(heap.params.name.clone(), s);
        }
        stats
    }

    /// Every live buffer, by id.
    pub fn buffers(&self) -> Vec<BufferInfo> {
        let mut v: Vec<BufferInfo> = self
            .pool
            .buffer_records()
            .map(|(id, r)| BufferInfo {
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
        let rec = self.pool.buffer(id).ok_or(DeviceError::NoBuffer(id))?;
        if offset.checked_add(len).is_none_or(|e| e > rec.len) {
            return Err(DeviceError::OutOfRange {
                id,
                offset,
                len,
                size: rec.len,
            });
        }
        let m = self
            .pool
            .mapping(rec.mapping)
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
