//! What the device is made of and what it reports: heap properties, limits, statistics.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::abi::*;
use crate::host::HeapProvider;

/// Smallest arena, and alignment of every mapping in the window (guests map the window
/// with 2 MiB granularity).
pub const ARENA_MIN: u64 = 2 << 20;

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
    pub(crate) fn abi(self) -> u32 {
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

/// Counters of one heap, as shown by `stats`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes held by live (and retained) buffers.
    pub bytes: u64,
    /// Live (and retained) buffers.
    pub buffers: u64,
    /// Live mappings in the window (arenas and own mappings).
    pub mappings: u64,
    /// Live arenas.
    pub arenas: u64,
    /// Host bytes held (all mappings).
    pub host_bytes: u64,
    /// Live buffers with a UUID (ASSIGN_UUID).
    #[serde(default)]
    pub exported: u64,
    /// Buffers the guest freed while shared, held (and still counted in `bytes` and
    /// `buffers`) until their importers let go.
    #[serde(default)]
    pub retained_buffers: u64,
    /// Bytes of the retained buffers.
    #[serde(default)]
    pub retained_bytes: u64,
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
