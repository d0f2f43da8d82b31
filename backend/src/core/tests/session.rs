//! The driver's session: open, close, suspend and resume, reservations.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use super::super::*;
use super::{hdr, parse, req};
use crate::testing::*;

const SESSION: u64 = (1 << VIRTIO_DMAHEAP_F_SYNC) | (1 << VIRTIO_DMAHEAP_F_SESSION);

fn session_device() -> (Device, Arc<Faults>) {
    let (mut d, p) = device();
    d.set_acked_features(SESSION);
    (d, p)
}

fn open(d: &mut Device, m: &mut dyn Mapper, resume: u64) -> (u32, u64) {
    let mut r = answer(
        d,
        &req(SessionOpenReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN),
            resume_id: resume.into(),
        }),
        16,
        m,
    );
    r.resize(16, 0);
    let r = parse::<SessionOpenResp>(&r);
    (r.hdr.status.to_native(), r.session_id.to_native())
}

fn close_bytes(flags: u32) -> Vec<u8> {
    req(SessionCloseReq {
        hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_CLOSE),
        flags: flags.into(),
        reserved: 0.into(),
    })
}

fn close(d: &mut Device, m: &mut dyn Mapper, flags: u32) -> u32 {
    status_of(&answer(d, &close_bytes(flags), 8, m))
}

fn reserve(d: &mut Device, ty: u32, offset: u64, len: u64) -> u32 {
    let r = req(ReserveReq {
        hdr: hdr(ty),
        offset: offset.into(),
        len: len.into(),
    });
    status_of(&answer(d, &r, 8, &mut FakeMapper::default()))
}

/// Fails with NotRunning after `ok` successful calls (a stop in the middle).
struct StopsAfter<'a> {
    inner: &'a mut FakeMapper,
    ok: usize,
}

impl Mapper for StopsAfter<'_> {
    fn map(&mut self, fd: BorrowedFd<'_>, o: u64, s: u64, l: u64) -> Result<(), MapError> {
        if self.ok == 0 {
            return Err(MapError::NotRunning);
        }
        self.ok -= 1;
        self.inner.map(fd, o, s, l)
    }
    fn unmap(&mut self, s: u64, l: u64) -> Result<(), MapError> {
        if self.ok == 0 {
            return Err(MapError::NotRunning);
        }
        self.ok -= 1;
        self.inner.unmap(s, l)
    }
}

#[test]
fn a_session_driver_opens_before_it_allocates() {
    let (mut d, _) = session_device();
    let mut m = FakeMapper::default();
    assert_eq!(
        alloc(&mut d, &mut m, 0, 4096).0,
        VIRTIO_DMAHEAP_S_NO_SESSION
    );
    assert_eq!(free(&mut d, &mut m, 1), VIRTIO_DMAHEAP_S_NO_SESSION);
    assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_NO_SESSION);
    let (st, id) = open(&mut d, &mut m, 0);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
    assert_ne!(id, 0);
    assert_eq!(d.stats().session, "open");
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
}

#[test]
fn a_driver_without_the_feature_has_an_implicit_session() {
    let (mut d, _) = device();
    let mut m = FakeMapper::default();
    assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_UNSUPP);
    assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_UNSUPP);
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(d.stats().session, "implicit");
}

#[test]
fn a_new_session_ends_the_previous_one_and_takes_its_buffers_out_of_the_window() {
    let (mut d, _) = session_device();
    let mut m = FakeMapper::default();
    let (_, first) = open(&mut d, &mut m, 0);
    let small = alloc(&mut d, &mut m, 0, 4096);
    let big = alloc(&mut d, &mut m, 0, 32 << 20);
    assert_eq!((small.0, big.0), (VIRTIO_DMAHEAP_S_OK, VIRTIO_DMAHEAP_S_OK));
    assert_eq!(
        reserve(&mut d, VIRTIO_DMAHEAP_REQ_RESERVE, 64 << 20, 4096),
        0
    );
    let (st, second) = open(&mut d, &mut m, 0);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
    assert_ne!(second, first);
    assert!(m.mapped.is_empty(), "left in the window: {:x?}", m.mapped);
    assert_eq!(m.maps, m.unmaps);
    let s = d.stats();
    assert_eq!((s.total, s.reserved_bytes), (HeapStats::default(), 0));
    assert_eq!(free(&mut d, &mut m, small.1), VIRTIO_DMAHEAP_S_NO_BUFFER);
    assert_eq!(open(&mut d, &mut m, first).0, VIRTIO_DMAHEAP_S_NO_SESSION);
    let again = alloc(&mut d, &mut m, 0, 4096);
    assert!(again.1 > big.1, "ids go on across sessions");
}

#[test]
fn close_takes_every_mapping_out_and_releases_everything() {
    let (mut d, _) = session_device();
    let mut m = FakeMapper::default();
    let (_, id) = open(&mut d, &mut m, 0);
    let b = alloc(&mut d, &mut m, 0, 4096);
    alloc(&mut d, &mut m, 0, 16 << 20);
    assert_eq!(free(&mut d, &mut m, b.1), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(close(&mut d, &mut m, 8), VIRTIO_DMAHEAP_S_INVAL, "bad flag");
    assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_OK);
    assert!(m.mapped.is_empty(), "left in the window: {:x?}", m.mapped);
    assert_eq!(d.stats().total, HeapStats::default());
    assert_eq!(d.stats().session, "closed");
    assert_eq!(
        alloc(&mut d, &mut m, 0, 4096).0,
        VIRTIO_DMAHEAP_S_NO_SESSION
    );
    assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_NO_SESSION);
    assert_eq!(open(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_NO_SESSION);
    assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
}

#[test]
fn a_suspended_session_resumes_with_its_buffers_at_their_offsets() {
    let (mut d, p) = session_device();
    let mut m = FakeMapper::default();
    let (_, id) = open(&mut d, &mut m, 0);
    let small = alloc(&mut d, &mut m, 0, 4096);
    let big = alloc(&mut d, &mut m, 0, 16 << 20);
    // A second, emptied arena (the spare) holds no data: it is not kept.
    let fill: Vec<_> = (0..8).map(|_| alloc(&mut d, &mut m, 0, 1 << 20)).collect();
    for f in &fill {
        assert_eq!(free(&mut d, &mut m, f.1), VIRTIO_DMAHEAP_S_OK);
    }
    d.poke(small.1, 0, b"small").unwrap();
    d.poke(big.1, 8 << 20, b"big").unwrap();
    let before = d.stats();
    let held_mappings = before.total.mappings;
    assert_eq!(close(&mut d, &mut m, VIRTIO_DMAHEAP_CLOSE_SUSPEND), 0);
    assert!(m.mapped.is_empty(), "left in the window: {:x?}", m.mapped);
    let s = d.stats();
    assert_eq!(s.session, "suspended");
    assert_eq!((s.total.buffers, s.total.mappings), (2, 0));
    assert_eq!(
        alloc(&mut d, &mut m, 0, 4096).0,
        VIRTIO_DMAHEAP_S_NO_SESSION
    );
    assert_eq!(free(&mut d, &mut m, small.1), VIRTIO_DMAHEAP_S_NO_SESSION);
    assert_eq!(open(&mut d, &mut m, id ^ 1).0, VIRTIO_DMAHEAP_S_NO_SESSION);
    let allocations = p.allocations.load(Ordering::SeqCst);
    let (st, resumed) = open(&mut d, &mut m, id);
    assert_eq!((st, resumed), (VIRTIO_DMAHEAP_S_OK, id));
    assert_eq!(
        p.allocations.load(Ordering::SeqCst),
        allocations,
        "the same host memory comes back"
    );
    assert!(m.has(big.2, big.3), "big buffer back at {:#x}", big.2);
    assert!(
        d.stats().total.mappings < held_mappings,
        "the empty arena went"
    );
    assert_eq!(d.peek(small.1, 0, 5).unwrap(), b"small");
    assert_eq!(d.peek(big.1, 8 << 20, 3).unwrap(), b"big");
    // Asking again is harmless; the session works as before.
    assert_eq!(open(&mut d, &mut m, id), (VIRTIO_DMAHEAP_S_OK, id));
    assert_eq!(free(&mut d, &mut m, small.1), VIRTIO_DMAHEAP_S_OK);
    let n = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!(n.0, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(d.peek(n.1, 0, 5).unwrap(), [0; 5]);
}

#[test]
fn a_stop_during_close_or_resume_is_retried_where_it_stopped() {
    let (mut d, _) = session_device();
    let mut m = FakeMapper::default();
    let (_, id) = open(&mut d, &mut m, 0);
    for _ in 0..3 {
        alloc(&mut d, &mut m, 0, 16 << 20);
    }
    let r = d.handle(
        &close_bytes(VIRTIO_DMAHEAP_CLOSE_SUSPEND),
        8,
        &mut StopsAfter {
            inner: &mut m,
            ok: 1,
        },
    );
    assert_eq!(r, Reply::Retry);
    assert_eq!(m.mapped.len(), 2, "one unmapped before the stop");
    assert_eq!(d.stats().session, "open");
    // Served again once the ring runs: continues (the fake refuses a double unmap).
    assert_eq!(close(&mut d, &mut m, VIRTIO_DMAHEAP_CLOSE_SUSPEND), 0);
    assert!(m.mapped.is_empty());
    let open_req = req(SessionOpenReq {
        hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN),
        resume_id: id.into(),
    });
    let r = d.handle(
        &open_req,
        16,
        &mut StopsAfter {
            inner: &mut m,
            ok: 2,
        },
    );
    assert_eq!(r, Reply::Retry);
    assert_eq!(d.stats().session, "suspended");
    assert_eq!(open(&mut d, &mut m, id), (VIRTIO_DMAHEAP_S_OK, id));
    assert_eq!((m.mapped.len(), m.maps), (3, 6));
    // A stop while a new session ends the old one: retried too.
    let new_req = req(SessionOpenReq {
        hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN),
        resume_id: 0.into(),
    });
    let r = d.handle(
        &new_req,
        16,
        &mut StopsAfter {
            inner: &mut m,
            ok: 1,
        },
    );
    assert_eq!(r, Reply::Retry);
    assert_eq!(d.stats().total.buffers, 3, "nothing dropped yet");
    assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
    assert!(m.mapped.is_empty());
}

#[test]
fn a_refused_remap_ends_the_session() {
    let (mut d, _) = session_device();
    let mut m = FakeMapper::default();
    let (_, id) = open(&mut d, &mut m, 0);
    alloc(&mut d, &mut m, 0, 16 << 20);
    alloc(&mut d, &mut m, 0, 4096);
    assert_eq!(close(&mut d, &mut m, VIRTIO_DMAHEAP_CLOSE_SUSPEND), 0);
    m.refuse_maps = u32::MAX;
    assert_eq!(open(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_IOERR);
    m.refuse_maps = 0;
    assert_eq!(d.stats().total, HeapStats::default());
    assert_eq!(d.stats().session, "closed");
    assert!(m.mapped.is_empty());
    assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
}

#[test]
fn reserved_ranges_are_kept_out_of_allocations() {
    let mut l = limits();
    l.shm_size = 64 << 20;
    let (mut d, _) = device_with(vec![heap_params("a")], l);
    d.set_acked_features(SESSION);
    let mut m = FakeMapper::default();
    let rs = VIRTIO_DMAHEAP_REQ_RESERVE;
    let un = VIRTIO_DMAHEAP_REQ_UNRESERVE;
    assert_eq!(reserve(&mut d, rs, 0, 4096), VIRTIO_DMAHEAP_S_NO_SESSION);
    open(&mut d, &mut m, 0);
    for (off, len) in [
        (0, 0),
        (1, 4096),
        (0, 4097),
        (60 << 20, 8 << 20),
        (u64::MAX - 4095, 8192),
    ] {
        assert_eq!(
            reserve(&mut d, rs, off, len),
            VIRTIO_DMAHEAP_S_INVAL,
            "{off:#x}+{len:#x}"
        );
    }
    // Everything but the last 16 MiB.
    assert_eq!(reserve(&mut d, rs, 0, 48 << 20), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(
        reserve(&mut d, rs, 4096, 4096),
        VIRTIO_DMAHEAP_S_WINDOW_FULL
    );
    assert_eq!(d.stats().reserved_bytes, 48 << 20);
    let a = alloc(&mut d, &mut m, 0, 8 << 20);
    assert_eq!(a.0, VIRTIO_DMAHEAP_S_OK);
    assert!(
        a.2 >= 48 << 20,
        "placed at {:#x}, inside the reservation",
        a.2
    );
    assert_eq!(
        alloc(&mut d, &mut m, 0, 16 << 20).0,
        VIRTIO_DMAHEAP_S_WINDOW_FULL
    );
    assert_eq!(
        reserve(&mut d, rs, a.2, 4096),
        VIRTIO_DMAHEAP_S_WINDOW_FULL,
        "in use"
    );
    assert_eq!(
        reserve(&mut d, un, 0, 4096),
        VIRTIO_DMAHEAP_S_INVAL,
        "not exact"
    );
    assert_eq!(reserve(&mut d, un, 0, 48 << 20), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(
        reserve(&mut d, un, 0, 48 << 20),
        VIRTIO_DMAHEAP_S_INVAL,
        "twice"
    );
    assert_eq!(alloc(&mut d, &mut m, 0, 16 << 20).0, VIRTIO_DMAHEAP_S_OK);
    // Bounded count.
    let mut n = 0;
    while reserve(&mut d, rs, (32 << 20) + n * 4096, 4096) == VIRTIO_DMAHEAP_S_OK {
        n += 1;
    }
    assert_eq!(n as usize, MAX_RESERVATIONS);
    assert_eq!(reserve(&mut d, rs, 60 << 20, 4096), VIRTIO_DMAHEAP_S_QUOTA);
    // They end with the session.
    open(&mut d, &mut m, 0);
    assert_eq!(d.stats().reserved_bytes, 0);
}

#[test]
fn the_host_can_end_the_session() {
    let (mut d, _) = session_device();
    let mut m = FakeMapper::default();
    open(&mut d, &mut m, 0);
    let b = alloc(&mut d, &mut m, 0, 4096);
    alloc(&mut d, &mut m, 0, 16 << 20);
    assert_eq!(d.end_session_by_host(&mut m), Ok((2, 2)));
    assert!(m.mapped.is_empty());
    assert_eq!(d.stats().session, "closed");
    assert_eq!(free(&mut d, &mut m, b.1), VIRTIO_DMAHEAP_S_NO_SESSION);
    assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(free(&mut d, &mut m, b.1), VIRTIO_DMAHEAP_S_NO_BUFFER);
}

#[test]
fn session_ids_are_unpredictable_and_never_zero() {
    let (mut d, _) = session_device();
    let mut m = FakeMapper::default();
    let ids: Vec<u64> = (0..64).map(|_| open(&mut d, &mut m, 0).1).collect();
    assert!(ids.iter().all(|&i| i != 0));
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    assert!(
        ids.windows(2).any(|w| w[1] != w[0] + 1),
        "sequential: {ids:x?}"
    );
}
