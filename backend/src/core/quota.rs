//! Accounting of what the guest holds, against the per-VM and per-heap limits: one path
//! charges a buffer before it is placed, one uncharges it; totals are sums over the heaps.

use super::{Limits, RequestError};

/// Bytes and buffers held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes held by live buffers.
    pub bytes: u64,
    /// Live buffers.
    pub buffers: u64,
}

/// Usage per heap.
#[derive(Debug)]
pub struct Quota {
    per_heap: Vec<Usage>,
}

impl Quota {
    /// Nothing held by `heaps` heaps.
    pub fn new(heaps: usize) -> Self {
        Self {
            per_heap: vec![Usage::default(); heaps],
        }
    }

    /// What heap `heap` holds.
    pub fn heap(&self, heap: usize) -> Usage {
        self.per_heap.get(heap).copied().unwrap_or_default()
    }

    /// What all heaps hold.
    pub fn total(&self) -> Usage {
        self.per_heap.iter().fold(Usage::default(), |t, u| Usage {
            bytes: t.bytes + u.bytes,
            buffers: t.buffers + u.buffers,
        })
    }

    /// Charges a buffer of `len` bytes to `heap` (whose own byte limit is `heap_max`), or
    /// refuses with [`RequestError::Quota`] if a limit would be exceeded.
    pub fn charge(
        &mut self,
        heap: usize,
        len: u64,
        limits: &Limits,
        heap_max: Option<u64>,
    ) -> Result<(), RequestError> {
        let total = self.total();
        let used = self.per_heap.get_mut(heap).ok_or(RequestError::NoHeap)?;
        if total.buffers >= limits.max_buffers
            || total
                .bytes
                .checked_add(len)
                .is_none_or(|b| b > limits.max_bytes)
            || heap_max.is_some_and(|max| used.bytes.checked_add(len).is_none_or(|b| b > max))
        {
            return Err(RequestError::Quota);
        }
        used.bytes += len;
        used.buffers += 1;
        Ok(())
    }

    /// Charges without checking the limits (what was charged before a reset, carried over).
    pub fn force_charge(&mut self, heap: usize, len: u64) {
        if let Some(used) = self.per_heap.get_mut(heap) {
            used.bytes = used.bytes.saturating_add(len);
            used.buffers = used.buffers.saturating_add(1);
        }
    }

    /// Gives back what [`Quota::charge`] charged.
    pub fn uncharge(&mut self, heap: usize, len: u64) {
        if let Some(used) = self.per_heap.get_mut(heap) {
            used.bytes = used.bytes.saturating_sub(len);
            used.buffers = used.buffers.saturating_sub(1);
        }
    }

    /// Forgets everything held.
    pub fn clear(&mut self) {
        self.per_heap.fill(Usage::default());
    }
}
