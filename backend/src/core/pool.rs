//! The typed buffer pool: the window's address space, the mappings in it (arenas that
//! small buffers share, or one large buffer's own mapping), the live buffers, and the
//! window ranges the driver reserved. Pure bookkeeping: the host and the front end are
//! asked for memory and mappings by [`super::buffers`].

use std::collections::{BTreeMap, HashMap};

use super::HeapRange;
use crate::host::HostBuffer;
use crate::range::RangeAllocator;

/// A mapping shared by small buffers.
#[derive(Debug)]
pub struct Arena {
    /// Which ranges of the mapping hold buffers.
    pub alloc: RangeAllocator,
    /// The heap's one emptied arena kept mapped for the next small ALLOC (zeroed).
    pub spare: bool,
}

impl Arena {
    /// An empty arena of `len` bytes, not the spare.
    pub fn new(len: u64) -> Self {
        Self {
            alloc: RangeAllocator::new(len),
            spare: false,
        }
    }
}

/// One host buffer mapped (or kept for mapping) at a window offset.
#[derive(Debug)]
pub struct Mapping {
    /// Heap index.
    pub heap: usize,
    /// Length.
    pub len: u64,
    /// The host memory.
    pub buf: Box<dyn HostBuffer>,
    /// Some: an arena; None: a mapping of its own.
    pub arena: Option<Arena>,
    /// In the front end's window now (false while the session is suspended).
    pub mapped: bool,
}

/// A live buffer.
#[derive(Debug, Clone, Copy)]
pub struct BufferRec {
    /// Heap index.
    pub heap: usize,
    /// Window offset of the mapping that holds it.
    pub mapping: u64,
    /// Offset inside that mapping.
    pub off: u64,
    /// Length.
    pub len: u64,
}

/// Window, mappings, buffers and reservations.
#[derive(Debug)]
pub struct Pool {
    shm_size: u64,
    window: RangeAllocator,
    mappings: BTreeMap<u64, Mapping>,
    buffers: HashMap<u64, BufferRec>,
    /// Window ranges the driver reserved (RESERVE): start -> length.
    reservations: BTreeMap<u64, u64>,
}

impl Pool {
    /// An empty window of `shm_size` bytes.
    pub fn new(shm_size: u64) -> Self {
        Self {
            shm_size,
            window: RangeAllocator::new(shm_size),
            mappings: BTreeMap::new(),
            buffers: HashMap::new(),
            reservations: BTreeMap::new(),
        }
    }

    /// Forgets every buffer, mapping and reservation (already out of the window).
    pub fn clear(&mut self) {
        *self = Self::new(self.shm_size);
    }

    /// Takes a free, `align`ed range of `len` bytes of the window inside `within` (the
    /// heap range of the mapping's heap). First fit.
    pub fn take_range(&mut self, len: u64, align: u64, within: HeapRange) -> Option<u64> {
        self.window
            .alloc_in(len, align, within.offset, within.end())
    }

    /// Gives back a range that [`Pool::take_range`] took and no mapping holds.
    pub fn give_back_range(&mut self, woff: u64, len: u64) {
        self.window.free(woff, len);
    }

    /// Records a mapping at `woff` (its range was taken with [`Pool::take_range`]).
    pub fn insert_mapping(&mut self, woff: u64, m: Mapping) {
        self.mappings.insert(woff, m);
    }

    /// Drops the record of the mapping at `woff` (out of the window) and gives its window
    /// range back.
    pub fn forget_mapping(&mut self, woff: u64) -> Option<Mapping> {
        let m = self.mappings.remove(&woff)?;
        self.window.free(woff, m.len);
        Some(m)
    }

    /// The mapping at `woff`.
    pub fn mapping(&self, woff: u64) -> Option<&Mapping> {
        self.mappings.get(&woff)
    }

    /// The mapping at `woff`, mutable.
    pub fn mapping_mut(&mut self, woff: u64) -> Option<&mut Mapping> {
        self.mappings.get_mut(&woff)
    }

    /// Every mapping.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.values()
    }

    /// Window offsets of the mappings that `keep` selects.
    pub fn mapping_offsets(&self, keep: impl Fn(&Mapping) -> bool) -> Vec<u64> {
        self.mappings
            .iter()
            .filter(|(_, m)| keep(m))
            .map(|(&w, _)| w)
            .collect()
    }

    /// Mapping records: in the window, or kept for a suspended session (which needs them
    /// back in the window when it resumes).
    pub fn mapping_count(&self) -> usize {
        self.mappings.len()
    }

    /// Bytes of `heap`'s arenas.
    pub fn arena_bytes(&self, heap: usize) -> u64 {
        self.mappings
            .values()
            .filter(|m| m.heap == heap && m.arena.is_some())
            .map(|m| m.len)
            .sum()
    }

    /// The window offset of `heap`'s spare arena.
    pub fn spare_of(&self, heap: usize) -> Option<u64> {
        self.mappings
            .iter()
            .find(|(_, m)| m.heap == heap && m.arena.as_ref().is_some_and(|a| a.spare))
            .map(|(&w, _)| w)
    }

    /// Places `len` bytes aligned to `align` in one of `heap`'s arenas, the spare last
    /// (which then is no longer the spare). Returns (arena offset, offset inside it).
    pub fn place_in_arena(&mut self, heap: usize, len: u64, align: u64) -> Option<(u64, u64)> {
        let mut spare = None;
        for (&woff, m) in self.mappings.iter_mut() {
            let Some(arena) = m.arena.as_mut().filter(|_| m.heap == heap) else {
                continue;
            };
            if arena.spare {
                spare = Some(woff);
                continue;
            }
            if let Some(off) = arena.alloc.alloc(len, align) {
                return Some((woff, off));
            }
        }
        let woff = spare?;
        let arena = self.mappings.get_mut(&woff)?.arena.as_mut()?;
        let off = arena.alloc.alloc(len, align)?;
        arena.spare = false;
        Some((woff, off))
    }

    /// Records a live buffer.
    pub fn insert_buffer(&mut self, id: u64, rec: BufferRec) {
        self.buffers.insert(id, rec);
    }

    /// Removes a live buffer's record.
    pub fn remove_buffer(&mut self, id: u64) -> Option<BufferRec> {
        self.buffers.remove(&id)
    }

    /// A live buffer.
    pub fn buffer(&self, id: u64) -> Option<BufferRec> {
        self.buffers.get(&id).copied()
    }

    /// Every live buffer.
    pub fn buffer_records(&self) -> impl Iterator<Item = (u64, &BufferRec)> {
        self.buffers.iter().map(|(&id, r)| (id, r))
    }

    /// Live buffers.
    pub fn buffer_count(&self) -> usize {
        self.buffers.len()
    }

    /// Reserves `[off, off + len)` for the driver; false if any of it is in use.
    pub fn reserve(&mut self, off: u64, len: u64) -> bool {
        if !self.window.alloc_at(off, len) {
            return false;
        }
        self.reservations.insert(off, len);
        true
    }

    /// Gives back exactly a range [`Pool::reserve`] reserved; false if there is none.
    pub fn unreserve(&mut self, off: u64, len: u64) -> bool {
        if self.reservations.get(&off) != Some(&len) {
            return false;
        }
        self.reservations.remove(&off);
        self.window.free(off, len);
        true
    }

    /// Reserved ranges.
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Reserved bytes.
    pub fn reserved_bytes(&self) -> u64 {
        self.reservations.values().sum()
    }
}
