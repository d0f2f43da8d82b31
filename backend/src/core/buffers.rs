//! ALLOC and FREE: buffers placed in the pool, host memory and window mappings asked for
//! and given back.

use std::sync::atomic::Ordering;

use super::pool::{Arena, BufferRec, Mapping};
use super::{Device, MapError, Mapper, RequestError, ARENA_MIN};
use crate::abi::VIRTIO_DMAHEAP_PAGE_SIZE;
use crate::host::ProviderError;
use crate::wire::{Answer, BATCH_MAX};

const PAGE: u64 = VIRTIO_DMAHEAP_PAGE_SIZE as u64;

impl Device {
    /// Allocates a buffer; returns (id, window offset, length).
    pub fn alloc(
        &mut self,
        heap_id: u32,
        flags: u32,
        len: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<(u64, u64, u64), RequestError> {
        let heap = usize::try_from(heap_id)
            .ok()
            .filter(|&h| h < self.heaps.len())
            .ok_or(RequestError::NoHeap)?;
        self.idle.touch(heap);
        if flags != 0 || len == 0 || !len.is_multiple_of(PAGE) {
            return Err(RequestError::Inval);
        }
        let params = self.heaps[heap].params.clone();
        // The configuration keeps max_size within the heap range; the range bounds it all
        // the same (spec 6.3.1).
        let range_len = self.heap_range(heap).map_or(0, |r| r.len);
        if len > params.max_size.min(range_len) {
            return Err(RequestError::TooBig);
        }
        let align = self.align_of(&params);
        let rlen = len
            .checked_next_multiple_of(align)
            .ok_or(RequestError::TooBig)?;
        self.quota
            .charge(heap, rlen, &self.limits, params.max_bytes)?;
        let placed = if rlen <= params.small_limit() {
            self.alloc_in_arena(heap, rlen, align, params.arena_size, mapper)
        } else if let Some(woff) = self.take_large_spare(heap, rlen) {
            Ok((woff, 0))
        } else {
            self.new_mapping(heap, rlen, false, mapper).map(|w| (w, 0))
        };
        let (mapping, off) = match placed {
            Ok(p) => p,
            Err(e) => {
                self.quota.uncharge(heap, rlen);
                return Err(e);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pool.insert_buffer(
            id,
            BufferRec {
                heap,
                mapping,
                off,
                len: rlen,
            },
        );
        Ok((id, mapping + off, rlen))
    }

    /// ALLOC_BATCH: up to `count` buffers of `len` bytes, allocated one after the other
    /// until one fails (spec 6.10). Fails only if the first does, as ALLOC would have.
    pub fn alloc_batch(
        &mut self,
        heap_id: u32,
        count: u32,
        len: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<Answer, RequestError> {
        let count = usize::try_from(count)
            .ok()
            .filter(|c| (1..=BATCH_MAX).contains(c))
            .ok_or(RequestError::Inval)?;
        let mut buffers = Vec::with_capacity(count);
        while buffers.len() < count {
            match self.alloc(heap_id, 0, len, mapper) {
                Ok(b) => buffers.push(b),
                // Nothing took effect yet: answer (or retry) as ALLOC would.
                Err(e) if buffers.is_empty() => return Err(e),
                // What was allocated stays allocated; a retry would allocate it again.
                Err(_) => break,
            }
        }
        Ok(Answer::AllocBatch(buffers))
    }

    fn alloc_in_arena(
        &mut self,
        heap: usize,
        rlen: u64,
        align: u64,
        arena_size: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<(u64, u64), RequestError> {
        if let Some(found) = self.pool.place_in_arena(heap, rlen, align) {
            return Ok(found);
        }
        // A new arena: double the heap's arena bytes, within [ARENA_MIN, arena_size].
        let want = self
            .pool
            .arena_bytes(heap)
            .clamp(ARENA_MIN, arena_size.max(ARENA_MIN));
        let floor = rlen.next_multiple_of(ARENA_MIN);
        let mut size = want.max(floor);
        let woff = loop {
            match self.new_mapping(heap, size, true, mapper) {
                Ok(w) => break w,
                Err(RequestError::WindowFull) if size / 2 >= floor => size /= 2,
                Err(e) => return Err(e),
            }
        };
        let off = self
            .pool
            .mapping_mut(woff)
            .and_then(|m| m.arena.as_mut())
            .and_then(|a| a.alloc.alloc(rlen, align))
            .ok_or(RequestError::IoErr)?;
        Ok((woff, off))
    }

    /// Maps a new host buffer of `size` bytes into the window (an arena if `arena`), inside
    /// the heap's range; returns its window offset.
    pub(super) fn new_mapping(
        &mut self,
        heap: usize,
        size: u64,
        arena: bool,
        mapper: &mut dyn Mapper,
    ) -> Result<u64, RequestError> {
        let range = self.heap_range(heap).ok_or(RequestError::NoHeap)?;
        // The mapping cap is a limit of the window (spec 6.2: WINDOW_FULL): any heap's spare
        // may go for it.
        if self.pool.mapping_count() >= self.limits.max_mappings
            && !self.evict_spare(None, mapper)?
        {
            return Err(RequestError::WindowFull);
        }
        let align = ARENA_MIN.max(self.align_of(&self.heaps[heap].params));
        let woff = match self.pool.take_range(size, align, range) {
            Some(w) => w,
            None => {
                // Only a spare inside the heap's range makes room there.
                if !self.evict_spare(Some(range), mapper)? {
                    return Err(RequestError::WindowFull);
                }
                self.pool
                    .take_range(size, align, range)
                    .ok_or(RequestError::WindowFull)?
            }
        };
        let buf = match self.heaps[heap].provider.allocate(size) {
            Ok(b) => b,
            Err(e) => {
                self.pool.give_back_range(woff, size);
                let name = &self.heaps[heap].params.name;
                self.ratelimit.warn(format_args!(
                    "heap {name}: host allocation of {size} bytes failed: {e}"
                ));
                return Err(match e {
                    ProviderError::NoMemory(_) => RequestError::NoMem,
                    _ => RequestError::IoErr,
                });
            }
        };
        if let Err(e) = mapper.map(buf.fd(), 0, woff, size) {
            self.pool.give_back_range(woff, size);
            if matches!(e, MapError::NotRunning) {
                return Err(RequestError::Retry);
            }
            self.ratelimit.warn(format_args!(
                "map of {size} bytes at window offset {woff:#x} failed: {e}"
            ));
            return Err(RequestError::IoErr);
        }
        self.pool.insert_mapping(
            woff,
            Mapping {
                heap,
                len: size,
                buf,
                arena: arena.then(|| Arena::new(size)),
                mapped: true,
            },
        );
        Ok(woff)
    }

    /// Unmaps the mapping at `woff` (if it is in the window) and releases its window range
    /// and host buffer. Fails only with [`MapError::NotRunning`]: the mapping is still in
    /// the window then, and its record stays. A refused unmap means the front end no
    /// longer has the mapping (QEMU refuses an unmap only for a mapping it does not have,
    /// e.g. after it dropped the window at a reset): it is released all the same.
    pub(super) fn release_mapping(
        &mut self,
        woff: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<(), MapError> {
        let Some(m) = self.pool.mapping(woff) else {
            return Ok(());
        };
        let (len, mapped) = (m.len, m.mapped);
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
        self.pool.forget_mapping(woff);
        Ok(())
    }

    /// A large buffer's mapping that could not be unmapped (the ring stopped) stays in the
    /// window: zero it and use it as an arena for small buffers (its range is never mapped
    /// over).
    fn adopt_as_arena(&mut self, woff: u64) {
        let Some(m) = self.pool.mapping_mut(woff) else {
            return;
        };
        if let Err(e) = m.buf.zero(0, m.len) {
            self.ratelimit.error(format_args!(
                "stuck mapping {woff:#x}: zeroing failed, range not reused: {e}"
            ));
            return;
        }
        m.arena = Some(Arena::new(m.len));
    }

    /// Frees a buffer.
    pub fn free(&mut self, id: u64, mapper: &mut dyn Mapper) -> Result<(), RequestError> {
        if self.uuid_of(id).is_some() {
            return self.free_exported(id, mapper);
        }
        let rec = self.pool.remove_buffer(id).ok_or(RequestError::NoBuffer)?;
        self.idle.touch(rec.heap);
        self.quota.uncharge(rec.heap, rec.len);
        let heap = rec.heap;
        let Some(m) = self.pool.mapping(rec.mapping) else {
            self.ratelimit.error(format_args!(
                "buffer {id}: mapping {:#x} missing",
                rec.mapping
            ));
            return Ok(());
        };
        let Some(arena) = m.arena.as_ref() else {
            if self.keep_large_spare(heap, rec.mapping) {
                return Ok(());
            }
            // The ring stopped: the mapping stays in the window; reuse it for small buffers.
            if self.release_mapping(rec.mapping, mapper).is_err() {
                self.adopt_as_arena(rec.mapping);
            }
            return Ok(());
        };
        // The last buffer of the arena, and the heap has a spare already: the larger of the
        // two stays the spare (a heap whose buffers grew would otherwise map and unmap an
        // arena per ALLOC beside a small spare that never goes while it is busy). The arena
        // given back takes its memory along, so its range needs no zeroing.
        let mut spare = self.pool.spare_of(heap).filter(|&s| s != rec.mapping);
        if let Some(old) = spare.filter(|_| arena.alloc.used() == rec.len) {
            let (len, old_len) = (m.len, self.pool.mapping(old).map_or(0, |o| o.len));
            if len <= old_len {
                if self.release_mapping(rec.mapping, mapper).is_ok() {
                    return Ok(());
                }
            } else if self.release_mapping(old, mapper).is_ok() {
                spare = None;
            }
        }
        let Some(m) = self.pool.mapping_mut(rec.mapping) else {
            return Ok(());
        };
        // Zero now, so the range is clean when handed out again.
        if let Err(e) = m.buf.zero(rec.off, rec.len) {
            self.ratelimit.error(format_args!(
                "buffer {id}: zeroing failed, range not reused: {e}"
            ));
            return Ok(());
        }
        let Some(arena) = m.arena.as_mut() else {
            return Ok(());
        };
        arena.alloc.free(rec.off, rec.len);
        if arena.alloc.is_empty() && spare.is_none() {
            // Keep one empty arena mapped for recycling, also when the heap becomes idle:
            // the next ALLOC then needs no SHMEM_MAP. Idle heaps give their arenas back
            // after the idle delay (release_idle, called by the vring worker).
            arena.spare = true;
        }
        Ok(())
    }
}
