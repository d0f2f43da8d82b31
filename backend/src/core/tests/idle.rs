//! The idle policy: spares kept until the idle deadline, then released.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::super::*;
use crate::testing::*;

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
    let (mut d, p) = device_with(vec![heap_params("a"), heap_params("b")], limits());
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
        status_of(&answer(&mut d, &free_req(c), 8, &mut RefuseUnmap(&mut m))),
        VIRTIO_DMAHEAP_S_OK
    );
    assert_eq!(
        status_of(&answer(&mut d, &free_req(e), 8, &mut RefuseUnmap(&mut m))),
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

#[test]
fn a_larger_emptied_arena_replaces_a_smaller_spare() {
    // The daemon's default arena size: buffers up to 8 MiB come from arenas.
    let params = HeapParams {
        arena_size: 64 << 20,
        ..heap_params("system")
    };
    let (mut d, p) = device_with(vec![params], limits());
    let mut m = FakeMapper::default();
    // A small buffer: a first arena of ARENA_MIN, the spare once emptied.
    let (_, id, small_off, _) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    // Buffers that outgrew it get an arena of their size; emptied, it becomes the spare and
    // the small one goes, instead of one arena mapped and unmapped per ALLOC.
    let len = 2 * ARENA_MIN;
    let (st, id, off, _) = alloc(&mut d, &mut m, 0, len);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
    assert_ne!(off, small_off);
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert_eq!((m.maps, m.unmaps, m.mapped.len()), (2, 1, 1));
    for _ in 0..3 {
        let (st, id, again, _) = alloc(&mut d, &mut m, 0, len);
        assert_eq!((st, again), (VIRTIO_DMAHEAP_S_OK, off));
        assert_eq!(d.peek(id, 0, 4096).unwrap(), vec![0u8; 4096]);
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    }
    assert_eq!((m.maps, m.unmaps), (2, 1));
    assert_eq!(p.allocations.load(Ordering::SeqCst), 2);
    // Smaller buffers now come from the larger spare.
    let (st, id, off2, _) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!((st, off2), (VIRTIO_DMAHEAP_S_OK, off));
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(m.maps, 2);
}

#[test]
fn a_session_keeps_spares_for_the_longer_delay_and_its_close_unmaps_them() {
    let (mut d, _) = device();
    let mut m = FakeMapper::default();
    assert_eq!(d.spare_idle_delay(), SPARE_IDLE_DELAY, "no session");
    d.set_acked_features(1 << VIRTIO_DMAHEAP_F_SESSION);
    let r = answer(&mut d, &session_open_req(0), SESSION_OPEN_RESP_SIZE, &mut m);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(d.spare_idle_delay(), SESSION_SPARE_IDLE_DELAY);
    let before = Instant::now();
    let (_, id, _, _) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    let deadline = d.idle_deadline().expect("a spare");
    assert!(deadline >= before + SESSION_SPARE_IDLE_DELAY);
    // Still there after the short delay.
    assert_eq!(d.release_idle(before + SPARE_IDLE_DELAY * 2, &mut m), 0);
    assert_eq!(m.mapped.len(), 1);
    // The close (before a reset) empties the window at once.
    let r = answer(&mut d, &session_close_req(0), 8, &mut m);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    assert_eq!((m.unmaps, m.mapped.len()), (1, 0));
    assert_eq!(d.spare_idle_delay(), SPARE_IDLE_DELAY, "closed");
}

#[test]
fn a_busy_heap_does_not_keep_an_idle_heaps_spare() {
    let (mut d, _) = device_with(vec![heap_params("a"), heap_params("b")], limits());
    let mut m = FakeMapper::default();
    let t0 = Instant::now();
    let (_, b, _, _) = alloc(&mut d, &mut m, 1, 4096);
    assert_eq!(free(&mut d, &mut m, b), VIRTIO_DMAHEAP_S_OK);
    let b_deadline = d.idle_deadline().expect("heap b's spare");
    // Heap a is busy after heap b went idle: its alloc/free cycles push only its own
    // deadline.
    std::thread::sleep(Duration::from_millis(1));
    let (_, a, _, _) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!(free(&mut d, &mut m, a), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(d.idle_deadline(), Some(b_deadline), "the earliest deadline");
    assert_eq!(d.release_idle(b_deadline, &mut m), 1, "heap b's arena only");
    let s = d.stats();
    assert_eq!((s.heaps["a"].arenas, s.heaps["b"].arenas), (1, 0));
    // Heap a's deadline is still ahead, then its spare goes too.
    let a_deadline = d.idle_deadline().expect("heap a's spare");
    assert!(a_deadline >= t0 + SPARE_IDLE_DELAY);
    assert_eq!(d.release_idle(a_deadline, &mut m), 1);
    assert!(m.mapped.is_empty());
}
