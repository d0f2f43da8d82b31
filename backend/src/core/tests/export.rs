//! ASSIGN_UUID, the export table, withdrawal and retained buffers (issue 13).

use std::collections::HashSet;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::*;
use crate::core::export::{parse_epoll_fdinfo, ReleaseWatch};

const UUID: u64 = 1 << VIRTIO_DMAHEAP_F_UUID;
const SESSION: u64 = 1 << VIRTIO_DMAHEAP_F_SESSION;
/// Above the test heap's small limit (8 MiB arenas / 8): a host allocation of its own.
const LARGE: u64 = 2 << 20;

fn dev() -> (Device, Arc<Faults>, FakeMapper) {
    let (mut d, f) = device();
    d.set_acked_features(UUID);
    (d, f, FakeMapper::with_window(1 << 30))
}

fn dev_table() -> (Device, Arc<Faults>, FakeMapper) {
    let (mut d, f, m) = dev();
    d.set_shared_object_table(true);
    (d, f, m)
}

fn ok_alloc(d: &mut Device, m: &mut FakeMapper, len: u64) -> (u64, u64) {
    let (st, id, off, l) = alloc(d, m, 0, len);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK, "alloc of {len}");
    assert_eq!(l, len);
    (id, off)
}

fn ok_uuid(d: &mut Device, m: &mut FakeMapper, id: u64) -> [u8; 16] {
    let (st, u) = assign_uuid(d, m, id);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK, "ASSIGN_UUID of {id}");
    u
}

fn file_len(f: &std::fs::File) -> u64 {
    let mut f = f.try_clone().unwrap();
    f.seek(SeekFrom::End(0)).unwrap()
}

#[test]
fn uuid_offered_unless_turned_off_and_refused_unless_negotiated() {
    let (mut d, _) = device();
    assert_ne!(d.device_features() & UUID, 0);
    let mut m = FakeMapper::default();
    d.set_acked_features(0);
    let (_, id, _, _) = alloc(&mut d, &mut m, 0, LARGE);
    assert_eq!(assign_uuid(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_UNSUPP);
    d.set_uuid_offered(false);
    assert_eq!(d.device_features() & UUID, 0);
    // Acking a feature that is not offered does not enable it.
    d.set_acked_features(UUID);
    assert_eq!(assign_uuid(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_UNSUPP);
}

#[test]
fn own_allocation_gets_a_stable_random_uuid_and_an_exact_file() {
    let (mut d, f, mut m) = dev();
    let (a, _) = ok_alloc(&mut d, &mut m, LARGE);
    let (b, _) = ok_alloc(&mut d, &mut m, LARGE);
    let ua = ok_uuid(&mut d, &mut m, a);
    let ub = ok_uuid(&mut d, &mut m, b);
    assert_ne!(ua, ub);
    for u in [ua, ub] {
        assert_eq!(u[6] >> 4, 4, "version 4: {u:02x?}");
        assert_eq!(u[8] & 0xc0, 0x80, "RFC 4122 variant: {u:02x?}");
    }
    // Asking again: the same UUID, no second export.
    for _ in 0..100 {
        assert_eq!(ok_uuid(&mut d, &mut m, a), ua);
    }
    assert_eq!(f.exports.load(Ordering::SeqCst), 2);
    let table = d.export_table();
    let (file, len) = table.lookup(&ua).unwrap();
    assert_eq!(len, LARGE);
    assert_eq!(file_len(&file), LARGE);
    // Both ways: the export and the buffer are the same memory.
    d.poke(a, 4096, b"from the guest").unwrap();
    let mut got = [0u8; 14];
    file.read_exact_at(&mut got, 4096).unwrap();
    assert_eq!(&got, b"from the guest");
    file.write_all_at(b"from an importer", LARGE - 16).unwrap();
    assert_eq!(d.peek(a, LARGE - 16, 16).unwrap(), b"from an importer");
    let st = d.stats();
    assert_eq!(st.total.exported, 2);
    assert_eq!(st.total.retained_buffers, 0);
    // Unknown UUIDs resolve to nothing.
    assert!(table.lookup(&[0x42; 16]).is_none());
}

#[test]
fn unknown_and_freed_ids_are_no_buffer() {
    let (mut d, _, mut m) = dev();
    assert_eq!(assign_uuid(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_NO_BUFFER);
    assert_eq!(
        assign_uuid(&mut d, &mut m, u64::MAX).0,
        VIRTIO_DMAHEAP_S_NO_BUFFER
    );
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(
        assign_uuid(&mut d, &mut m, id).0,
        VIRTIO_DMAHEAP_S_NO_BUFFER
    );
    assert!(d.export_table().is_empty());
}

#[test]
fn arena_buffer_without_udmabuf_is_unsupp_and_still_works() {
    let (mut d, f, mut m) = dev();
    let (id, _) = ok_alloc(&mut d, &mut m, 4096);
    assert_eq!(assign_uuid(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_UNSUPP);
    assert!(d.export_table().is_empty());
    assert_eq!(d.stats().total.exported, 0);
    d.poke(id, 0, b"fine").unwrap();
    assert_eq!(d.peek(id, 0, 4).unwrap(), b"fine");
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(
        f.live.load(Ordering::SeqCst),
        1,
        "only the spare arena is left"
    );
}

#[test]
fn export_failures_keep_no_state() {
    let (mut d, f, mut m) = dev_table();
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    f.export_fails.store(1, Ordering::SeqCst);
    assert_eq!(assign_uuid(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_IOERR);
    m.refuse_shares = 1;
    assert_eq!(assign_uuid(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_IOERR);
    assert!(d.export_table().is_empty());
    assert!(m.shared.is_empty());
    m.stopped = true;
    assert_eq!(d.handle(&assign_uuid_req(id), 24, &mut m), Reply::Retry);
    assert!(d.export_table().is_empty());
    m.stopped = false;
    let u = ok_uuid(&mut d, &mut m, id);
    assert!(m.shared.contains(&u));
    assert_eq!(d.export_table().len(), 1);
}

#[test]
fn the_front_end_table_is_used_only_when_asked_for_and_present() {
    // Default: not registered.
    let (mut d, _, mut m) = dev();
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    let u = ok_uuid(&mut d, &mut m, id);
    assert!(m.shared.is_empty() && m.shares == 0);
    assert!(d.export_table().lookup(&u).is_some());
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(m.unshares, 0);
    // Asked for, but the front end has no table: UUIDs still work (export socket).
    let (mut d, _, mut m) = dev_table();
    m.no_shared_objects = true;
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    let u = ok_uuid(&mut d, &mut m, id);
    assert!(d.export_table().lookup(&u).is_some());
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    // Asked for and present: ADD before the answer, REMOVE at FREE.
    let (mut d, _, mut m) = dev_table();
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    let u = ok_uuid(&mut d, &mut m, id);
    assert_eq!(ok_uuid(&mut d, &mut m, id), u);
    assert_eq!((m.shares, m.shared.len()), (1, 1));
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert!(m.shared.is_empty());
    assert!(d.export_table().lookup(&u).is_none());
}

#[test]
fn free_while_the_ring_is_stopped_is_retried_before_anything_changes() {
    let (mut d, _, mut m) = dev_table();
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    let u = ok_uuid(&mut d, &mut m, id);
    m.stopped = true;
    assert_eq!(d.handle(&free_req(id), 8, &mut m), Reply::Retry);
    assert!(d.export_table().lookup(&u).is_some());
    assert_eq!(d.uuid_of(id), Some(u));
    m.stopped = false;
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert!(d.export_table().lookup(&u).is_none());
}

#[test]
fn freed_memfd_export_is_retained_and_charged_until_its_last_close() {
    let (mut d, f, mut m) = dev();
    d.set_acked_features(UUID | SESSION);
    let r = answer(&mut d, &session_open_req(0), SESSION_OPEN_RESP_SIZE, &mut m);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    let (id, off) = ok_alloc(&mut d, &mut m, LARGE);
    let u = ok_uuid(&mut d, &mut m, id);
    let (held, _) = d.export_table().lookup(&u).unwrap();
    let second = held.try_clone().unwrap();
    d.poke(id, 0, b"kept").unwrap();
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    // Out of the window, withdrawn, still charged.
    assert!(!m.covers(off, LARGE));
    assert!(d.export_table().lookup(&u).is_none());
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_NO_BUFFER);
    let st = d.stats();
    assert_eq!((st.total.buffers, st.total.bytes), (1, LARGE));
    assert_eq!(
        (st.total.retained_buffers, st.total.retained_bytes),
        (1, LARGE)
    );
    assert_eq!(st.total.exported, 0);
    // The importer still has the bytes; the daemon's own allocation is gone.
    let mut got = [0u8; 4];
    held.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got, b"kept");
    assert_eq!(f.live.load(Ordering::SeqCst), 0);
    // One of two copies closed: still held.
    drop(held);
    assert_eq!(d.poll_retained(Instant::now() + Duration::from_secs(60)), 0);
    assert_eq!(d.stats().total.retained_buffers, 1);
    // The last one: released at the next poll.
    drop(second);
    assert_eq!(
        d.poll_retained(Instant::now() + Duration::from_secs(120)),
        1
    );
    let st = d.stats();
    assert_eq!((st.total.buffers, st.total.retained_buffers), (0, 0));
}

/// Retained buffers outlive the session (still charged, their memory never handed out
/// again) until their last close; a disconnect ends their accounting.
#[test]
fn retained_buffers_outlive_a_new_session_until_released() {
    let (mut d, f, mut m) = dev();
    f.fake_dmabuf_exports.store(true, Ordering::SeqCst);
    d.set_acked_features(UUID | SESSION);
    let open = |d: &mut Device, m: &mut FakeMapper| {
        let r = answer(d, &session_open_req(0), SESSION_OPEN_RESP_SIZE, m);
        assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    };
    open(&mut d, &mut m);
    let (a, _) = ok_alloc(&mut d, &mut m, 64 * 1024);
    let (b, _) = ok_alloc(&mut d, &mut m, LARGE);
    let ua = ok_uuid(&mut d, &mut m, a);
    let ub = ok_uuid(&mut d, &mut m, b);
    let (ha, _) = d.export_table().lookup(&ua).unwrap();
    let (hb, _) = d.export_table().lookup(&ub).unwrap();
    assert_eq!(free(&mut d, &mut m, a), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(free(&mut d, &mut m, b), VIRTIO_DMAHEAP_S_OK);
    open(&mut d, &mut m);
    let st = d.stats();
    assert_eq!((st.total.buffers, st.total.retained_buffers), (2, 2));
    assert_eq!(st.total.bytes, 64 * 1024 + LARGE);
    assert!(d.retained().all(|(_, r)| r.range.is_none()));
    drop(ha);
    assert_eq!(d.release_closed_exports(), 1);
    assert_eq!(d.stats().total.bytes, LARGE);
    d.disconnect();
    let st = d.stats();
    assert_eq!((st.total.buffers, st.total.retained_buffers), (0, 0));
    drop(hb);
}

/// The release watch on a real pollable file (a pipe): the item goes with the last close.
#[test]
fn release_watch_sees_the_last_close() {
    let mut w = ReleaseWatch::new().unwrap();
    let (r, wr) = nix::unistd::pipe().unwrap();
    let r = std::fs::File::from(r);
    let dup = r.try_clone().unwrap();
    let t = w.watch(&r).unwrap();
    drop(r);
    assert!(w.alive().unwrap().contains(&t), "a dup still holds it");
    drop(dup);
    assert!(!w.alive().unwrap().contains(&t));
    drop(wr);
    // A memfd cannot be polled: refused, so it is never mistaken for released. Its
    // reopened file is watched with inotify instead; the memfd_create file is silent.
    let mfd = std::fs::File::from(
        nix::sys::memfd::memfd_create("x", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
    );
    assert!(w.watch(&mfd).is_err());
    let re = w.reopen(&mfd).unwrap();
    let re2 = re.try_clone().unwrap();
    let wd = w.watch_close(&re).unwrap();
    drop(mfd);
    drop(re);
    assert!(!w.closed().unwrap().contains(&wd), "a dup still holds it");
    drop(re2);
    assert!(w.closed().unwrap().contains(&wd));
    w.unwatch(wd);
}

#[test]
fn epoll_fdinfo_lines() {
    let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\n\
                tfd:        5 events:       19 data:                7  pos:0 ino:3a9 sdev:e\n\
                tfd:       12 events:       19 data:     ffffffffffff  pos:0 ino:3b sdev:e\n";
    let got = parse_epoll_fdinfo(text);
    assert_eq!(got, HashSet::from([7, 0xffff_ffff_ffff]));
}

/// A retained buffer of an arena (stand-in dma-buf exports): its range is never handed out
/// again while the export is open; the last close releases it and its charge.
#[test]
fn retained_arena_range_is_not_reused_until_released() {
    let (mut d, f, mut m) = dev_table();
    f.fake_dmabuf_exports.store(true, Ordering::SeqCst);
    let (id, off) = ok_alloc(&mut d, &mut m, 64 * 1024);
    let u = ok_uuid(&mut d, &mut m, id);
    let (held, _) = d.export_table().lookup(&u).unwrap();
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    assert!(m.shared.is_empty());
    let charged = d.stats().total.bytes;
    assert_eq!(charged, 64 * 1024);
    // Fill the arena: nothing lands on the retained range.
    let mut ids = Vec::new();
    loop {
        let (st, nid, noff, nlen) = alloc(&mut d, &mut m, 0, 64 * 1024);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
        assert!(
            noff + nlen <= off || noff >= off + 64 * 1024,
            "range {noff:#x} of a new buffer overlaps the retained {off:#x}"
        );
        ids.push(nid);
        if ids.len() >= 200 {
            break;
        }
    }
    for nid in ids {
        assert_eq!(free(&mut d, &mut m, nid), VIRTIO_DMAHEAP_S_OK);
    }
    // Still open: nothing released however often it is polled.
    let later = Instant::now() + Duration::from_secs(1);
    assert_eq!(d.poll_retained(later), 0);
    assert!(d.idle_deadline().is_some(), "the worker keeps polling");
    assert_eq!(d.stats().total.retained_buffers, 1);
    drop(held);
    assert_eq!(d.poll_retained(later + Duration::from_secs(1)), 1);
    let st = d.stats();
    assert_eq!((st.total.buffers, st.total.bytes), (0, 0));
    assert_eq!(st.total.retained_buffers, 0);
    // The range is free again.
    let (_, _, noff, _) = alloc(&mut d, &mut m, 0, 64 * 1024);
    assert_eq!(noff, off);
}

/// Retained buffers count against the buffer cap: a guest cannot grow them without bound.
#[test]
fn retained_buffers_count_against_the_caps() {
    let mut l = limits();
    l.max_buffers = 2;
    let (mut d, f) = device_with(vec![heap_params("system")], l);
    d.set_acked_features(UUID);
    f.fake_dmabuf_exports.store(true, Ordering::SeqCst);
    let mut m = FakeMapper::with_window(1 << 30);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
        let u = ok_uuid(&mut d, &mut m, id);
        held.push(d.export_table().lookup(&u).unwrap().0);
        assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    }
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_QUOTA);
    held.pop();
    d.release_closed_exports();
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_QUOTA);
}

#[test]
fn suspend_keeps_exports_close_and_reset_withdraw_disconnect_drops() {
    let (mut d, _, mut m) = dev_table();
    d.set_acked_features(UUID | SESSION);
    let open = |d: &mut Device, m: &mut FakeMapper, resume: u64| {
        let r = answer(d, &session_open_req(resume), SESSION_OPEN_RESP_SIZE, m);
        assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
        le64(&r, 8)
    };
    let close = |d: &mut Device, m: &mut FakeMapper, flags: u32| {
        assert_eq!(
            status_of(&answer(d, &session_close_req(flags), 8, m)),
            VIRTIO_DMAHEAP_S_OK
        );
    };
    let sid = open(&mut d, &mut m, 0);
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    let u = ok_uuid(&mut d, &mut m, id);
    close(&mut d, &mut m, VIRTIO_DMAHEAP_CLOSE_SUSPEND);
    assert!(m.shared.contains(&u));
    assert!(d.export_table().lookup(&u).is_some());
    open(&mut d, &mut m, sid);
    assert_eq!(ok_uuid(&mut d, &mut m, id), u);
    close(&mut d, &mut m, 0);
    assert!(m.shared.is_empty());
    assert!(d.export_table().is_empty());
    // A new session (the driver's reset) withdraws too.
    open(&mut d, &mut m, 0);
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    ok_uuid(&mut d, &mut m, id);
    open(&mut d, &mut m, 0);
    assert!(m.shared.is_empty() && d.export_table().is_empty());
    assert_eq!(
        assign_uuid(&mut d, &mut m, id).0,
        VIRTIO_DMAHEAP_S_NO_BUFFER
    );
    // A disconnect drops the table without talking to the (gone) front end.
    let (id, _) = ok_alloc(&mut d, &mut m, LARGE);
    ok_uuid(&mut d, &mut m, id);
    d.disconnect();
    assert!(d.export_table().is_empty());
    assert_eq!(d.stats().total.exported, 0);
}

/// An exported buffer with a mapping of its own, freed while the ring is stopped (no
/// front-end table, so FREE needs no request): the mapping stays in the window, taken
/// whole by the retained buffer, and is never handed out again before the release.
#[test]
fn retained_own_mapping_stuck_in_the_window_is_not_reused() {
    let (mut d, f, mut m) = dev();
    f.fake_dmabuf_exports.store(true, Ordering::SeqCst);
    let (id, off) = ok_alloc(&mut d, &mut m, LARGE);
    let u = ok_uuid(&mut d, &mut m, id);
    let (held, _) = d.export_table().lookup(&u).unwrap();
    m.stopped = true;
    assert_eq!(free(&mut d, &mut m, id), VIRTIO_DMAHEAP_S_OK);
    m.stopped = false;
    assert!(m.covers(off, LARGE));
    for _ in 0..64 {
        let (st, _, noff, nlen) = alloc(&mut d, &mut m, 0, 64 * 1024);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
        assert!(noff + nlen <= off || noff >= off + LARGE);
    }
    drop(held);
    assert_eq!(d.release_closed_exports(), 1);
}

/// Live exports are bounded (each holds an fd): past the cap ASSIGN_UUID answers NOMEM,
/// and a freed export makes room again.
#[test]
fn live_exports_are_capped() {
    let (mut d, f, mut m) = dev();
    f.fake_dmabuf_exports.store(true, Ordering::SeqCst);
    d.set_export_cap(3);
    let ids: Vec<u64> = (0..4).map(|_| ok_alloc(&mut d, &mut m, 4096).0).collect();
    for &id in &ids[..3] {
        ok_uuid(&mut d, &mut m, id);
    }
    assert_eq!(
        assign_uuid(&mut d, &mut m, ids[3]).0,
        VIRTIO_DMAHEAP_S_NOMEM
    );
    // Asking again for an exported buffer still works at the cap.
    ok_uuid(&mut d, &mut m, ids[0]);
    assert_eq!(free(&mut d, &mut m, ids[0]), VIRTIO_DMAHEAP_S_OK);
    ok_uuid(&mut d, &mut m, ids[3]);
    assert!(crate::core::export::export_cap() >= 16);
}
