//! The idle policy: which emptied mappings stay mapped for the next ALLOC, and when they
//! go.
//!
//! Every `SHMEM_MAP` or `SHMEM_UNMAP` costs a memory-table update in every back end of
//! the VM, and QEMU 11.1.3 crashes on one it reads after the VM began to pause (spec A.5).
//! So the common paths must not map: a heap keeps its one emptied arena (the spare, see
//! [`super::pool::Arena::spare`]) and up to [`MAX_LARGE_SPARES`] zeroed mappings of freed
//! large buffers. They go when their heap has been idle for the idle delay (each heap on
//! its own clock, so a busy heap keeps no other heap's spares), and first when the window
//! or the mapping cap is short.

use std::time::{Duration, Instant};

use log::debug;

use super::{Device, HeapRange, Mapper, RequestError, SessionState};

/// How long a heap with no live buffer keeps its emptied arenas mapped after its last
/// ALLOC or FREE, before [`Device::release_idle`] unmaps them, for a driver that did not
/// open a session ([`SESSION_SPARE_IDLE_DELAY`] for one that did).
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

/// The idle delay while a driver's session is open (`VIRTIO_DMAHEAP_F_SESSION`).
///
/// Such a driver closes its session before the resets it makes (unbind, reboot, suspend),
/// and the close unmaps every spare, so a long delay no longer meets the QEMU crash on
/// that path; only resets nobody announces (spec A.5) find the spares still mapped, as
/// they find every live buffer. One second spans the gaps of allocators that free and
/// reallocate large buffers (a frame every 16-100 ms, a 64 MiB buffer cycle in a nested
/// guest that takes over 100 ms, bench/README.md), where every expired spare costs a new
/// host allocation and a SHMEM_MAP.
pub const SESSION_SPARE_IDLE_DELAY: Duration = Duration::from_secs(1);

/// Most mappings of freed large buffers a heap keeps (zeroed) for the next large ALLOC.
///
/// The guest's requests submitted just before a pause are served while QEMU is stopping
/// its vCPUs, so small buffers come from arenas, and a guest that frees and allocates
/// large buffers of the same size (frame buffers) reuses these.
pub const MAX_LARGE_SPARES: usize = 4;

/// When the spares go.
#[derive(Debug)]
pub struct IdlePolicy {
    /// Per heap: time of its last ALLOC or FREE; `None` once [`Device::release_idle`] made
    /// its attempt for the heap's current idle period (and after a reset).
    last_activity: Vec<Option<Instant>>,
    /// Set by [`Device::set_spare_idle_delay`]: the delay with or without a session.
    delay: Option<Duration>,
    /// Per heap: window offsets of zeroed mappings of freed large buffers, oldest first.
    large_spares: Vec<Vec<u64>>,
}

impl IdlePolicy {
    /// No spares for `heaps` heaps.
    pub fn new(heaps: usize) -> Self {
        Self {
            last_activity: vec![None; heaps],
            delay: None,
            large_spares: vec![Vec::new(); heaps],
        }
    }

    /// An ALLOC or FREE on `heap` starts a new idle period of that heap.
    pub fn touch(&mut self, heap: usize) {
        if let Some(last) = self.last_activity.get_mut(heap) {
            *last = Some(Instant::now());
        }
    }

    /// A resumed session starts a new idle period of every heap.
    pub fn touch_all(&mut self) {
        let now = Instant::now();
        self.last_activity.iter_mut().for_each(|l| *l = Some(now));
    }

    /// Forgets the spares (their mappings are gone) and the idle periods.
    pub fn clear(&mut self) {
        self.last_activity.iter_mut().for_each(|l| *l = None);
        self.large_spares.iter_mut().for_each(Vec::clear);
    }

    /// Takes every large spare of every heap off the lists.
    pub fn take_all_large_spares(&mut self) -> Vec<u64> {
        self.large_spares
            .iter_mut()
            .flat_map(std::mem::take)
            .collect()
    }
}

impl Device {
    /// Changes how long idle heaps keep their emptied arenas, with or without a session
    /// (default [`SESSION_SPARE_IDLE_DELAY`] in a session the driver opened,
    /// [`SPARE_IDLE_DELAY`] otherwise).
    pub fn set_spare_idle_delay(&mut self, delay: Duration) {
        self.idle.delay = Some(delay);
    }

    /// How long idle heaps keep their emptied arenas now.
    pub fn spare_idle_delay(&self) -> Duration {
        match (self.idle.delay, self.session) {
            (Some(delay), _) => delay,
            (None, SessionState::Open(id)) if id != 0 => SESSION_SPARE_IDLE_DELAY,
            (None, _) => SPARE_IDLE_DELAY,
        }
    }

    /// When [`Device::release_idle`] should run next: the idle delay after the last ALLOC
    /// or FREE of a heap that holds spares (arenas while it has no live buffer, or large
    /// spares), the earliest of them; or when retained buffers are to be checked
    /// ([`Device::poll_retained`]). `None`: nothing to do (or the attempt for this idle
    /// period was made already).
    pub fn idle_deadline(&self) -> Option<Instant> {
        match (self.spare_deadline(), self.retained_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the spares go (see [`Device::idle_deadline`], which also covers the poll of
    /// retained buffers).
    pub fn spare_deadline(&self) -> Option<Instant> {
        (0..self.heaps.len())
            .filter_map(|h| self.heap_spare_deadline(h))
            .min()
    }

    /// When `heap`'s spares go, if it holds any.
    fn heap_spare_deadline(&self, heap: usize) -> Option<Instant> {
        let last = (*self.idle.last_activity.get(heap)?)?;
        let holds_spares = (self.quota.heap(heap).buffers == 0 && self.pool.arena_bytes(heap) > 0)
            || self
                .idle
                .large_spares
                .get(heap)
                .is_some_and(|s| !s.is_empty());
        holds_spares
            .then(|| last.checked_add(self.spare_idle_delay()))
            .flatten()
    }

    /// Unmaps and releases, for every heap whose idle deadline has passed at `now`, its
    /// large spares and, if it has no live buffer, its (empty) arenas. Returns the number
    /// of mappings released.
    ///
    /// Must be called only where a [`Mapper`] may send requests (the vring worker of a
    /// running device). One attempt per idle period: an arena whose unmap fails stays (and
    /// stays usable); the heap's next ALLOC or FREE starts a new period.
    pub fn release_idle(&mut self, now: Instant, mapper: &mut dyn Mapper) -> usize {
        let due: Vec<usize> = (0..self.heaps.len())
            .filter(|&h| self.heap_spare_deadline(h).is_some_and(|d| now >= d))
            .collect();
        if due.is_empty() {
            return 0;
        }
        let mut idle = Vec::new();
        for &heap in &due {
            self.idle.last_activity[heap] = None;
            if self.quota.heap(heap).buffers == 0 {
                idle.extend(
                    self.pool
                        .mapping_offsets(|m| m.arena.is_some() && m.mapped && m.heap == heap),
                );
            }
            idle.append(&mut self.idle.large_spares[heap]);
        }
        let mut released = 0;
        for &woff in &idle {
            if self.release_mapping(woff, mapper).is_ok() {
                released += 1;
            }
        }
        // A large spare whose unmap the stop prevented stays in the window: keep it a spare.
        for woff in idle {
            if let Some(m) = self.pool.mapping(woff).filter(|m| m.arena.is_none()) {
                if let Some(s) = self.idle.large_spares.get_mut(m.heap) {
                    s.push(woff);
                }
            }
        }
        if released > 0 {
            debug!("idle: released {released} spare mapping(s)");
        }
        released
    }

    /// A zeroed mapping of a freed large buffer that fits `rlen` without wasting more than
    /// half of it (the smallest such), taken off the heap's spares.
    pub(super) fn take_large_spare(&mut self, heap: usize, rlen: u64) -> Option<u64> {
        let pool = &self.pool;
        let spares = self.idle.large_spares.get_mut(heap)?;
        let (i, _) = spares
            .iter()
            .enumerate()
            .filter_map(|(i, &w)| pool.mapping(w).map(|m| (i, m.len)))
            .filter(|&(_, len)| len >= rlen && len / 2 <= rlen)
            .min_by_key(|&(_, len)| len)?;
        Some(spares.remove(i))
    }

    /// Keeps the mapping of a freed large buffer, zeroed, for the next large ALLOC of the
    /// heap. False if the heap keeps enough spares already or zeroing failed.
    pub(super) fn keep_large_spare(&mut self, heap: usize, woff: u64) -> bool {
        if self
            .idle
            .large_spares
            .get(heap)
            .is_none_or(|s| s.len() >= MAX_LARGE_SPARES)
        {
            return false;
        }
        let Some(m) = self.pool.mapping(woff) else {
            return false;
        };
        if let Err(e) = m.buf.zero(0, m.len) {
            self.ratelimit.error(format_args!(
                "mapping {woff:#x}: zeroing failed, not reused: {e}"
            ));
            return false;
        }
        self.idle.large_spares[heap].push(woff);
        true
    }

    /// Unmaps and releases one spare mapping (large spares first) of any heap, or, with
    /// `within`, one that lies inside that heap range (the only kind whose window range
    /// another mapping of that range can use). Returns true if one was released;
    /// [`RequestError::Retry`] if the ring stopped.
    pub(super) fn evict_spare(
        &mut self,
        within: Option<HeapRange>,
        mapper: &mut dyn Mapper,
    ) -> Result<bool, RequestError> {
        let pool = &self.pool;
        let fits = |woff: u64| {
            within.is_none_or(|r| pool.mapping(woff).is_some_and(|m| r.holds(woff, m.len)))
        };
        let large = (0..self.heaps.len()).find_map(|heap| {
            let spares = self.idle.large_spares.get(heap)?;
            let i = spares.iter().position(|&w| fits(w))?;
            Some((heap, i, spares[i]))
        });
        if let Some((heap, i, woff)) = large {
            self.release_mapping(woff, mapper)
                .map_err(|_| RequestError::Retry)?;
            self.idle.large_spares[heap].remove(i);
            return Ok(true);
        }
        let arena = (0..self.heaps.len())
            .filter_map(|heap| self.pool.spare_of(heap))
            .find(|&w| fits(w));
        if let Some(woff) = arena {
            self.release_mapping(woff, mapper)
                .map_err(|_| RequestError::Retry)?;
            return Ok(true);
        }
        Ok(false)
    }
}
