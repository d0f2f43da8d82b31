//! A first-fit range allocator over `[0, size)` with alignment (optionally within bounds:
//! a heap's range of the window), used for the buffer window and for sub-allocation inside
//! arenas.

use std::collections::BTreeMap;

/// Free-list allocator of byte ranges. Free ranges are kept coalesced.
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    size: u64,
    /// start -> length of every free range.
    free: BTreeMap<u64, u64>,
    used: u64,
}

impl RangeAllocator {
    /// An allocator whose whole range `[0, size)` is free.
    pub fn new(size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        Self {
            size,
            free,
            used: 0,
        }
    }

    /// Total size managed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes currently allocated.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// True when nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Allocates `len` bytes at a multiple of `align` (a power of two). First fit.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        self.alloc_in(len, align, 0, self.size)
    }

    /// Allocates `len` bytes at a multiple of `align` (a power of two), wholly inside
    /// `[lo, hi)`. First fit.
    pub fn alloc_in(&mut self, len: u64, align: u64, lo: u64, hi: u64) -> Option<u64> {
        if len == 0 || !align.is_power_of_two() || lo >= hi {
            return None;
        }
        // The free range that holds `lo` (if any) starts below it; every later one starts
        // inside `[lo, hi)`.
        let first = self.free.range(..=lo).next_back().map_or(lo, |(&s, _)| s);
        let mut found = None;
        for (&start, &flen) in self.free.range(first..hi) {
            let from = start.max(lo);
            let Some(aligned) = from.checked_next_multiple_of(align) else {
                continue;
            };
            let Some(end) = aligned.checked_add(len) else {
                continue;
            };
            if end <= start + flen && end <= hi {
                found = Some((start, flen, aligned));
                break;
            }
        }
        let (start, flen, aligned) = found?;
        self.free.remove(&start);
        if aligned > start {
            self.free.insert(start, aligned - start);
        }
        let end = aligned + len;
        let fend = start + flen;
        if fend > end {
            self.free.insert(end, fend - end);
        }
        self.used += len;
        Some(aligned)
    }

    /// Allocates exactly `[start, start + len)` if all of it is free. Returns false (and
    /// changes nothing) otherwise.
    pub fn alloc_at(&mut self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if len == 0 || end > self.size {
            return false;
        }
        let Some((fs, fl)) = self.free.range(..=start).next_back().map(|(&s, &l)| (s, l)) else {
            return false;
        };
        let fend = fs + fl;
        if fend < end {
            return false;
        }
        self.free.remove(&fs);
        if fs < start {
            self.free.insert(fs, start - fs);
        }
        if fend > end {
            self.free.insert(end, fend - end);
        }
        self.used += len;
        true
    }

    /// Returns `[start, start + len)` to the free list. The caller guarantees that it was
    /// allocated; a range overlapping a free range is refused (returns false).
    pub fn free(&mut self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if len == 0 || end > self.size {
            return false;
        }
        // Overlap checks against neighbours.
        let prev = self.free.range(..=start).next_back().map(|(&s, &l)| (s, l));
        if let Some((ps, pl)) = prev {
            if ps + pl > start {
                return false;
            }
        }
        let next = self.free.range(start..).next().map(|(&s, &l)| (s, l));
        if let Some((ns, _)) = next {
            if ns < end {
                return false;
            }
        }
        let mut new_start = start;
        let mut new_len = len;
        if let Some((ps, pl)) = prev {
            if ps + pl == start {
                self.free.remove(&ps);
                new_start = ps;
                new_len += pl;
            }
        }
        if let Some((ns, nl)) = next {
            if ns == end {
                self.free.remove(&ns);
                new_len += nl;
            }
        }
        self.free.insert(new_start, new_len);
        self.used -= len;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesce() {
        let mut r = RangeAllocator::new(1 << 20);
        let a = r.alloc(4096, 4096).unwrap();
        let b = r.alloc(8192, 4096).unwrap();
        let c = r.alloc(4096, 65536).unwrap();
        assert_eq!((a, b, c), (0, 4096, 65536));
        assert_eq!(r.used(), 16384);
        assert!(r.free(b, 8192));
        assert!(!r.free(b, 8192), "double free refused");
        assert_eq!(r.alloc(8192, 4096), Some(4096));
        assert!(r.free(4096, 8192));
        assert!(r.free(a, 4096));
        assert!(r.free(c, 4096));
        assert!(r.is_empty());
        assert_eq!(r.free.len(), 1);
        assert_eq!(r.alloc(1 << 20, 4096), Some(0));
        assert_eq!(r.alloc(4096, 4096), None);
    }

    #[test]
    fn alloc_at_takes_exactly_a_free_range() {
        let mut r = RangeAllocator::new(1 << 20);
        assert!(r.alloc_at(8192, 4096));
        assert!(!r.alloc_at(8192, 4096), "taken already");
        assert!(!r.alloc_at(4096, 8192), "overlaps the taken range");
        assert!(!r.alloc_at((1 << 20) - 4096, 8192), "past the end");
        assert!(!r.alloc_at(u64::MAX - 1, 4), "overflow");
        assert!(!r.alloc_at(0, 0));
        assert_eq!(r.used(), 4096);
        // First fit goes around it.
        assert_eq!(r.alloc(8192, 4096), Some(0));
        assert_eq!(r.alloc(8192, 4096), Some(12288));
        assert!(r.alloc_at(20480, (1 << 20) - 20480), "the whole tail");
        assert!(r.free(8192, 4096));
        assert!(r.alloc_at(8192, 4096));
    }

    #[test]
    fn alloc_in_stays_inside_its_bounds() {
        let mut r = RangeAllocator::new(16 << 20);
        // A free range that starts below the bounds and ends inside them.
        assert_eq!(r.alloc_in(4096, 4096, 4 << 20, 8 << 20), Some(4 << 20));
        assert_eq!(
            r.alloc_in(4096, 4096, 4 << 20, 8 << 20),
            Some((4 << 20) + 4096)
        );
        // Aligned inside, not at the bound.
        assert_eq!(
            r.alloc_in(4096, 1 << 20, (4 << 20) + 1, 8 << 20),
            Some(5 << 20)
        );
        // Does not fit before `hi` although the free range goes on.
        assert_eq!(r.alloc_in(4 << 20, 4096, 6 << 20, 8 << 20), None);
        assert_eq!(r.alloc_in(2 << 20, 4096, 6 << 20, 8 << 20), Some(6 << 20));
        assert_eq!(r.alloc_in(4096, 4096, 6 << 20, 8 << 20), None, "full");
        // Other bounds still have room; the unbounded alloc goes first fit from 0.
        assert_eq!(r.alloc_in(4096, 4096, 8 << 20, 16 << 20), Some(8 << 20));
        assert_eq!(r.alloc(4096, 4096), Some(0));
        assert_eq!(
            r.alloc_in(4096, 4096, 8 << 20, 8 << 20),
            None,
            "empty bounds"
        );
        assert_eq!(
            r.alloc_in(4096, 4096, 16 << 20, u64::MAX),
            None,
            "past the end"
        );
        assert!(r.free(4 << 20, 4096));
        assert_eq!(r.alloc_in(4096, 4096, 0, 16 << 20), Some(4096));
        assert_eq!(r.alloc_in(4096, 4096, 2 << 20, 16 << 20), Some(2 << 20));
    }

    #[test]
    fn rejects_bad_args() {
        let mut r = RangeAllocator::new(1 << 20);
        assert_eq!(r.alloc(0, 4096), None);
        assert_eq!(r.alloc(4096, 3), None);
        assert_eq!(r.alloc(2 << 20, 4096), None);
        assert!(!r.free(u64::MAX, 2));
        assert!(!r.free(0, 0));
    }
}
