//! The idle policy: which emptied mappings stay mapped for the next ALLOC, and when they
//! go.
//!
//! Every `SHMEM_MAP` or `SHMEM_UNMAP` costs a memory-table update in every back end of
//! the VM, and QEMU 11.1.3 crashes on one it reads after the VM began to pause (spec A.5).
//! So the common paths must not map: a heap keeps its one emptied arena (the spare, see
//! [`super::pool::Arena::spare`]) and up to [`MAX_LARGE_SPARES`] zeroed mappings of freed
//! large buffers. They go when the heap has been idle for the idle delay, and first when
//! the window or the mapping cap is short.

use std::time::{Duration, Instant};

use log::debug;

use super::{Device, HeapRange, Mapper, RequestError};

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
/// The guest's requests submitted just before a pause are served while QEMU is stopping
/// its vCPUs, so small buffers come from arenas, and a guest that frees and allocates
/// large buffers of the same size (frame buffers) reuses these.
pub const MAX_LARGE_SPARES: usize = 4;

/// When the spares go.
#[derive(Debug)]
pub struct IdlePolicy {
    /// Time of the last ALLOC or FREE; `None` once [`Device::release_idle`] made its
    /// attempt for the current idle period (and after a reset).
    last_activity: Option<Instant>,
    delay: Duration,
    /// Per heap: window offsets of zeroed mappings of freed large buffers, oldest first.
    large_spares: Vec<Vec<u64>>,
}

impl IdlePolicy {
    /// No spares for `heaps` heaps.
    pub fn new(heaps: usize) -> Self {
        Self {
            last_activity: None,
            delay: SPARE_IDLE_DELAY,
            large_spares: vec![Vec::new(); heaps],
        }
    }

    /// An ALLOC or FREE (or a resumed session) starts a new idle period.
    pub fn touch(&mut self) {
        self.last_activity = Some(Instant::now());
    }

    /// Forgets the spares (their mappings are gone) and the idle period.
    pub fn clear(&mut self) {
        self.last_activity = None;
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
    /// Changes how long idle heaps keep their emptied arenas (default
    /// [`SPARE_IDLE_DELAY`]).
    pub fn set_spare_idle_delay(&mut self, delay: Duration) {
        self.idle.delay = delay;
    }

    /// When [`Device::release_idle`] should run next: the idle delay after the last ALLOC
    /// or FREE, if some heap without live buffers still holds arenas, or some heap holds
    /// large spares; or when retained buffers are to be checked
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
        let last = self.idle.last_activity?;
        (0..self.heaps.len())
            .any(|h| {
                (self.quota.heap(h).buffers == 0 && self.pool.arena_bytes(h) > 0)
                    || self.idle.large_spares.get(h).is_some_and(|s| !s.is_empty())
            })
            .then(|| last.checked_add(self.idle.delay))
            .flatten()
    }

    /// Unmaps and releases the (empty) arenas of every heap that has no live buffer, and
    /// every large spare, if the idle deadline has passed at `now`. Returns the number of
    /// mappings released.
    ///
    /// Must be called only where a [`Mapper`] may send requests (the vring worker of a
    /// running device). One attempt per idle period: an arena whose unmap fails stays (and
    /// stays usable); the next ALLOC or FREE starts a new period.
    pub fn release_idle(&mut self, now: Instant, mapper: &mut dyn Mapper) -> usize {
        if self.spare_deadline().is_none_or(|d| now < d) {
            return 0;
        }
        self.idle.last_activity = None;
        let quota = &self.quota;
        let mut idle = self
            .pool
            .mapping_offsets(|m| m.arena.is_some() && m.mapped && quota.heap(m.heap).buffers == 0);
        idle.append(&mut self.idle.take_all_large_spares());
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
