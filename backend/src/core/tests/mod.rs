//! Unit tests of the device core, through [`Device::handle`] and the shared fakes.

mod batch;
mod export;
mod heap_range;
mod idle;
mod page_size;
mod session;

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use vm_memory::ByteValued;

use super::*;
use crate::testing::*;

pub(super) fn req<T: ByteValued>(v: T) -> Vec<u8> {
    v.as_slice().to_vec()
}

pub(super) fn hdr(ty: u32) -> ReqHdr {
    ReqHdr {
        type_: ty.into(),
        reserved: 0.into(),
    }
}

pub(super) fn parse<T: ByteValued + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    v.as_mut_slice()
        .copy_from_slice(&b[..std::mem::size_of::<T>()]);
    v
}

#[test]
fn config_space() {
    let (d, _) = device_with(vec![heap_params("a"), heap_params("b")], limits());
    let c = d.config();
    assert_eq!(c.magic.to_native(), VIRTIO_DMAHEAP_MAGIC);
    assert_eq!(c.version.to_native(), 1);
    assert_eq!(c.num_heaps.to_native(), 2);
    assert_eq!(c.max_buffers.to_native(), 1 << 20);
}

#[test]
fn heap_info() {
    let mut p = heap_params("linux,cma");
    p.contiguous = true;
    p.cache = CacheMode::WriteCombined;
    p.max_bytes = Some(32 << 20);
    let (mut d, _) = device_with(vec![heap_params("system"), p], limits());
    let mut m = FakeMapper::default();
    let info = |d: &mut Device, m: &mut FakeMapper, id: u32, reserved: u32| {
        let r = req(HeapInfoReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_HEAP_INFO),
            heap_id: id.into(),
            reserved: reserved.into(),
        });
        parse::<HeapInfoResp>(&answer(d, &r, 72, m))
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
    // Two cache attributes split the 1 GiB window: the heap's range bounds its capacity.
    assert_eq!(r.info.capacity.to_native(), 512 << 20);
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
    let small_limit = heap_params("x").small_limit();
    let (st, id, off, len) = alloc(&mut d, &mut m, 0, small_limit + 4096);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(len, small_limit + 4096);
    assert_eq!(off % ARENA_MIN, 0);
    assert!(m.has(off, len));
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
    let (mut d, _) = device_with(vec![heap_params("a")], l);
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
        status_of(&answer(&mut d, &req(r), 32, &mut m)),
        VIRTIO_DMAHEAP_S_INVAL
    );
    r.flags = 0.into();
    r.hdr.reserved = 1.into();
    assert_eq!(
        status_of(&answer(&mut d, &req(r), 32, &mut m)),
        VIRTIO_DMAHEAP_S_INVAL
    );
    assert_eq!(m.maps, 0);
    assert_eq!(d.stats().total.buffers, 0);
}

#[test]
fn min_align_rounds_and_aligns() {
    let mut p = heap_params("big-align");
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
    let mut hp = heap_params("capped");
    hp.max_bytes = Some(64 << 10);
    let (mut d, _) = device_with(vec![heap_params("a"), hp], l);
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
    let (mut d, _) = device_with(vec![heap_params("a")], l);
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
    let (mut d, _) = device_with(vec![heap_params("a")], l);
    let mut m = FakeMapper::default();
    let a = alloc(&mut d, &mut m, 0, 4 << 20);
    assert_eq!(a.0, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(alloc(&mut d, &mut m, 0, 4 << 20).0, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(alloc(&mut d, &mut m, 0, 4 << 20).0, VIRTIO_DMAHEAP_S_QUOTA);
    assert_eq!(free(&mut d, &mut m, a.1), VIRTIO_DMAHEAP_S_OK);
    // 2 MiB arena fits in the freed 4 MiB; a 6 MiB buffer does not.
    let mut l = limits();
    l.shm_size = 8 << 20;
    let (mut d, _) = device_with(vec![heap_params("a")], l);
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
    p.nomem.store(1, Ordering::SeqCst);
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_NOMEM);
    p.io.store(1, Ordering::SeqCst);
    assert_eq!(alloc(&mut d, &mut m, 0, 32 << 20).0, VIRTIO_DMAHEAP_S_IOERR);
    m.refuse_maps = u32::MAX;
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_IOERR);
    m.refuse_maps = 0;
    assert_eq!(d.stats().total, HeapStats::default());
    // Nothing leaked: the window starts at 0 again.
    let (st, id, off, _) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!((st, off), (VIRTIO_DMAHEAP_S_OK, 0));
    assert_eq!(id, 1, "failed allocations consume no id");
}

#[test]
fn spare_arena_kept_and_released() {
    let (mut d, _) = device_with(vec![heap_params("a")], limits());
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
        status_of(&answer(&mut d, &free_req(id), 8, &mut Refuse(&mut m))),
        VIRTIO_DMAHEAP_S_OK
    );
    // Still mapped: never mapped over, reused for small buffers, zeroed.
    assert!(m.has(off, len));
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
    let s =
        |d: &mut Device, m: &mut FakeMapper, id, f| status_of(&answer(d, &sync_req(id, f), 8, m));
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
        status_of(&answer(&mut d, &[1, 0, 0], 8, &mut m)),
        VIRTIO_DMAHEAP_S_INVAL
    );
    assert!(answer(&mut d, &[], 4, &mut m).is_empty(), "nothing fits");
    // Unknown and unoffered types.
    for ty in [0, 5, 6, u32::MAX] {
        let r = req(AssignUuidReq {
            hdr: hdr(ty),
            buffer_id: 1.into(),
        });
        assert_eq!(
            status_of(&answer(&mut d, &r, 24, &mut m)),
            VIRTIO_DMAHEAP_S_UNSUPP
        );
    }
    // Truncated and oversized requests.
    let a = alloc_req(0, 0, 4096);
    assert_eq!(
        status_of(&answer(&mut d, &a[..20], 32, &mut m)),
        VIRTIO_DMAHEAP_S_INVAL
    );
    let mut long = a.clone();
    long.push(0);
    assert_eq!(
        status_of(&answer(&mut d, &long, 32, &mut m)),
        VIRTIO_DMAHEAP_S_INVAL
    );
    // Response does not fit: header only with INVAL, or nothing; no allocation made.
    let r = answer(&mut d, &a, 16, &mut m);
    assert_eq!((r.len(), status_of(&r)), (8, VIRTIO_DMAHEAP_S_INVAL));
    assert!(answer(&mut d, &a, 7, &mut m).is_empty());
    assert_eq!(m.maps, 0);
    // Larger writable part is fine: the response has its own size.
    assert_eq!(answer(&mut d, &a, 4096, &mut m).len(), 32);
}

#[test]
fn target_65536_small_buffers() {
    let mut l = limits();
    l.shm_size = 4 << 30;
    l.max_bytes = 4 << 30;
    let mut p = heap_params("system");
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

#[test]
fn failed_host_syncs_are_warned_about_at_a_limited_rate() {
    let (mut d, faults) = device();
    let mut m = FakeMapper::default();
    // A buffer with a host buffer of its own: SYNC reaches the host.
    let (_, id, _, _) = alloc(&mut d, &mut m, 0, 16 << 20);
    // A guest can make every SYNC fail on the host: a flood of warnings.
    faults.sync_fails.store(u32::MAX, Ordering::SeqCst);
    let start = std::time::Instant::now();
    for _ in 0..100 {
        let r = answer(&mut d, &sync_req(id, VIRTIO_DMAHEAP_SYNC_READ), 8, &mut m);
        assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_IOERR);
    }
    // They go through the device's limit: PER_SECOND logged in the first second.
    let logged = d.ratelimit.logged();
    if start.elapsed() < std::time::Duration::from_secs(1) {
        assert_eq!(logged, u64::from(RateLimit::PER_SECOND));
    } else {
        assert!(logged > 0 && logged < 100, "{logged} warnings logged");
    }
}
