//! The VM life cycle as the daemon sees it through a QEMU-like front end: pause and resume
//! (GET_VRING_BASE with the mappings kept), requests in flight across a pause, the driver's
//! session (SESSION_OPEN / SESSION_CLOSE, suspend and resume across a device reset, window
//! reservations), device resets, the operator's prepare-reset, and reconnection.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use std::time::{Duration, Instant};

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn daemon() -> Daemon {
    Daemon::spawn(["--heap", "a=memfd,max-size=64M", "--shm-size", "1G"])
}

/// Buffers of every kind, written: two small (one arena), one large (its own mapping).
fn fill(fe: &mut FrontEnd) -> Vec<Buffer> {
    let mut held = Vec::new();
    for (i, len) in [4 * KIB, 64 * KIB, 32 * MIB].into_iter().enumerate() {
        let b = fe.alloc_ok(0, len);
        fe.write_buffer(&b, 0, format!("buffer {i}").as_bytes());
        fe.write_buffer(&b, len - 4, b"tail");
        held.push(b);
    }
    held
}

fn check_bytes(fe: &FrontEnd, daemon: &Daemon, held: &[Buffer]) {
    for (i, b) in held.iter().enumerate() {
        let head = format!("buffer {i}");
        assert_eq!(
            fe.read_buffer(b, 0, head.len() as u64),
            head.as_bytes(),
            "guest view of buffer {}",
            b.id
        );
        assert_eq!(fe.read_buffer(b, b.len - 4, 4), b"tail");
        assert_eq!(daemon.peek(b.id, 0, head.len() as u64), head.as_bytes());
    }
}

#[test]
fn a_pause_keeps_every_buffer_mapping_and_counter() {
    let daemon = daemon();
    let (mut fe, _) = FrontEnd::connect_session(&daemon);
    let held = fill(&mut fe);
    let before = daemon.stats();
    let mappings = fe.shm().mappings();
    for round in 0..5 {
        let base = fe.pause();
        assert!(base > 0, "GET_VRING_BASE");
        // While paused: nothing dropped, nothing unmapped, stats unchanged.
        let st = daemon.stats();
        assert_eq!(
            (st.total, st.heap("a")),
            (before.total, before.heap("a")),
            "round {round}: counters while paused: {}",
            st.raw
        );
        assert_eq!(fe.shm().mappings(), mappings, "round {round}");
        fe.resume();
        check_bytes(&fe, &daemon, &held);
    }
    assert_eq!(fe.shm().unmap_count(), 0, "{:x?}", fe.shm().events);
    // Alloc and free keep working, and new buffers do not overlap the old ones.
    let b = fe.alloc_ok(0, 4 * KIB);
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    let big = fe.alloc_ok(0, 16 * MIB);
    for h in held.iter().chain([&b, &big]) {
        fe.free_ok(h.id);
    }
    daemon.wait_stats("everything freed", |s| s.total.buffers == 0);
    fe.assert_no_violations();
}

#[test]
fn a_request_in_flight_across_a_pause_is_answered_after_the_resume() {
    // QEMU pauses the VM on its main thread: while it waits for the GET_VRING_BASE reply it
    // does not read the backend channel, so a SHMEM_MAP sent just before stays unanswered
    // until the ring is stopped. (QEMU 11.1.3 would then crash on that map; this front end
    // refuses it, so the daemon's path through it can be checked.)
    let daemon = daemon();
    let (mut fe, _) = FrontEnd::connect_session(&daemon);
    let keep = fe.alloc_ok(0, 4 * KIB);
    fe.stall_maps(true);
    let head = fe.submit(&[
        Seg::R(alloc_req(0, 0, 32 * MIB)),
        Seg::W(ALLOC_RESP_SIZE as u32),
    ]);
    fe.kick();
    let start = Instant::now();
    while fe.stalled_maps() == 0 {
        assert!(start.elapsed() < DEADLINE, "the ALLOC never sent SHMEM_MAP");
        std::thread::sleep(Duration::from_millis(5));
    }
    let guard = daemon.kill_if_stuck(
        "GET_VRING_BASE while a SHMEM_MAP is pending",
        Duration::from_secs(10),
    );
    fe.pause();
    drop(guard);
    fe.stall_maps(false);
    // Nothing is completed, and nothing written to guest memory, while the ring is stopped.
    let early = fe.completes_within(head, Duration::from_millis(300));
    assert!(
        early.is_none(),
        "the daemon completed a request on the stopped ring: {early:?}"
    );
    fe.resume();
    let c = fe.wait(head);
    let got = parse_alloc(&c, "ALLOC across the pause");
    eprintln!(
        "ALLOC across a pause: {:?}",
        got.as_ref().map_err(|s| status_name(*s))
    );
    assert_eq!(got.err(), Some(S_IOERR), "the refused map fails the ALLOC");
    assert_eq!(fe.shm().live_mappings(), 1, "only the first buffer's arena");
    // The ring goes on where it was.
    let b = fe.alloc_ok(0, 32 * MIB);
    fe.write_buffer(&b, 0, b"after");
    assert_eq!(daemon.peek(b.id, 0, 5), b"after");
    fe.free_ok(keep.id);
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 1, "{}", st.raw);
}

#[test]
fn requests_queued_during_a_pause_are_served_after_the_resume() {
    let daemon = daemon();
    let (mut fe, _) = FrontEnd::connect_session(&daemon);
    fe.pause();
    // The guest cannot run while paused; these model requests made just before the stop
    // that the daemon had not taken off the ring yet (their kick already consumed).
    let heads: Vec<u16> = (0..3)
        .map(|_| {
            fe.submit(&[
                Seg::R(alloc_req(0, 0, 4 * KIB)),
                Seg::W(ALLOC_RESP_SIZE as u32),
            ])
        })
        .collect();
    fe.resume();
    for h in heads {
        let c = fe.wait(h);
        parse_alloc(&c, "ALLOC queued across a pause").unwrap();
    }
}

#[test]
fn closing_the_session_empties_the_window_before_the_reset() {
    let daemon = daemon();
    let (mut fe, first) = FrontEnd::connect_session(&daemon);
    let held = fill(&mut fe);
    // The driver is unbound: it closes its session, then resets the device.
    assert_eq!(fe.close_session(0), S_OK);
    assert_eq!(fe.shm().live_mappings(), 0, "{:x?}", fe.shm().mappings());
    let st = daemon.stats();
    assert_eq!(
        (st.total, st.session.as_str()),
        (Counters::default(), "closed")
    );
    fe.reset_device();
    assert_eq!(
        fe.shm().resets_with_live_mappings,
        0,
        "QEMU 11.1.3 would crash at the next start"
    );
    // The driver binds again: a new session; the old ids are gone, new buffers are zeroed.
    fe.start_queue();
    let second = fe.open_session(0).unwrap();
    assert_ne!(second, first);
    assert_eq!(fe.open_session(first), Err(S_NO_SESSION));
    for b in &held {
        assert_eq!(fe.free(b.id), S_NO_BUFFER);
    }
    let b = fe.alloc_ok(0, 32 * MIB);
    assert!(b.id > held[2].id, "ids go on");
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    fe.assert_no_violations();
}

#[test]
fn a_suspended_session_survives_a_device_reset_with_its_bytes() {
    let daemon = daemon();
    let (mut fe, id) = FrontEnd::connect_session(&daemon);
    let held = fill(&mut fe);
    let offsets: Vec<u64> = held.iter().map(|b| b.offset).collect();
    // Guest suspend (virtio freeze): close with SUSPEND, then the transport resets.
    assert_eq!(fe.close_session(CLOSE_SUSPEND), S_OK);
    assert_eq!(fe.shm().live_mappings(), 0);
    let st = daemon.stats();
    assert_eq!(
        (st.session.as_str(), st.total.buffers, st.total.mappings),
        ("suspended", 3, 0),
        "{}",
        st.raw
    );
    assert_eq!(fe.alloc(0, 4 * KIB).err(), Some(S_NO_SESSION));
    fe.reset_device();
    // Resume (virtio restore): a fresh ring, the same session.
    fe.start_queue();
    assert_eq!(fe.open_session(id), Ok(id));
    assert_eq!(
        held.iter().map(|b| b.offset).collect::<Vec<_>>(),
        offsets,
        "same offsets"
    );
    check_bytes(&fe, &daemon, &held);
    for b in &held {
        fe.free_ok(b.id);
    }
    let b = fe.alloc_ok(0, 4 * KIB);
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    assert_eq!(fe.shm().resets_with_live_mappings, 0);
    fe.assert_no_violations();
}

#[test]
fn a_new_session_after_an_unannounced_reset_releases_the_old_buffers() {
    // A guest that reset the device without closing its session (a crash, a forced
    // reset): with a QEMU that survives that, the next SESSION_OPEN releases everything.
    let daemon = daemon();
    let (mut fe, _) = FrontEnd::connect_session(&daemon);
    let held = fill(&mut fe);
    fe.reset_device();
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 3, "a reset alone is not seen: {}", st.raw);
    fe.start_queue();
    fe.open_session(0).unwrap();
    let st = daemon.stats();
    assert_eq!(st.total, Counters::default(), "{}", st.raw);
    for b in &held {
        assert_eq!(fe.free(b.id), S_NO_BUFFER);
    }
    let b = fe.alloc_ok(0, 32 * MIB);
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    fe.assert_no_violations();
}

#[test]
fn reserved_ranges_stay_out_of_new_buffers() {
    let daemon = Daemon::spawn(["--heap", "a=memfd,max-size=64M", "--shm-size", "256M"]);
    let (mut fe, _) = FrontEnd::connect_session(&daemon);
    // The driver still has kernel users of [0, 128M) from before a reset.
    assert_eq!(fe.reserve(REQ_RESERVE, 0, 128 * MIB), S_OK);
    let mut held = Vec::new();
    for len in [4 * KIB, 64 * KIB, 32 * MIB, 16 * MIB] {
        let b = fe.alloc_ok(0, len);
        assert!(
            b.offset >= 128 * MIB,
            "{len:#x}-byte buffer placed at {:#x}, inside the reserved range",
            b.offset
        );
        held.push(b);
    }
    assert_eq!(daemon.stats().reserved_bytes, 128 * MIB);
    assert_eq!(
        fe.reserve(REQ_UNRESERVE, 0, 4096),
        S_INVAL,
        "not the range reserved"
    );
    assert_eq!(fe.reserve(REQ_UNRESERVE, 0, 128 * MIB), S_OK);
    let b = fe.alloc_ok(0, 32 * MIB);
    assert!(b.offset < 128 * MIB, "the range is usable again");
    fe.assert_no_violations();
}

#[test]
fn prepare_reset_empties_the_window_for_an_operator_reset() {
    let daemon = daemon();
    let (mut fe, _) = FrontEnd::connect_session(&daemon);
    let held = fill(&mut fe);
    let reply = daemon.control("prepare-reset");
    assert!(reply.starts_with("ok"), "prepare-reset: {reply}");
    assert_eq!(fe.shm().live_mappings(), 0, "{:x?}", fe.shm().mappings());
    let st = daemon.stats();
    assert_eq!(
        (st.total, st.session.as_str()),
        (Counters::default(), "closed")
    );
    // The guest's old buffers are gone; its requests say so until it opens a session.
    assert_eq!(fe.free(held[0].id), S_NO_SESSION);
    assert_eq!(fe.alloc(0, 4 * KIB).err(), Some(S_NO_SESSION));
    // The operator resets the VM: nothing was mapped.
    fe.reset_device();
    assert_eq!(fe.shm().resets_with_live_mappings, 0);
    fe.start_queue();
    fe.open_session(0).unwrap();
    fe.alloc_ok(0, 32 * MIB);
    // Paused, the worker cannot unmap: the operator is told so.
    fe.pause();
    let reply = daemon.control("prepare-reset");
    assert!(
        reply.starts_with("error"),
        "prepare-reset while paused: {reply}"
    );
    fe.resume();
    fe.assert_no_violations();
}

#[test]
fn a_new_front_end_can_connect_after_a_disconnect() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let first = fe.alloc_ok(0, 4 * KIB);
    let _second = fe.alloc_ok(0, 4 * KIB);
    fe.disconnect();
    daemon.wait_stats("0 buffers after the front end left", |s| {
        s.total == Counters::default()
    });

    let mut fe = FrontEnd::connect(&daemon);
    assert_eq!(fe.config.magic, MAGIC);
    assert_eq!(fe.heap_info(0).unwrap().name, "a");
    let s = fe.free(first.id);
    assert_eq!(
        s,
        S_NO_BUFFER,
        "buffer of the previous front end: {}",
        status_name(s)
    );
    let b = fe.alloc_ok(0, 4 * KIB);
    assert!(b.id > first.id, "id reused across connections");
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    fe.write_buffer(&b, 0, b"second vm");
    assert_eq!(daemon.peek(b.id, 0, 9), b"second vm");

    // And a third time, dropping the connection while buffers are held and the ring runs.
    drop(fe);
    let mut fe = FrontEnd::connect(&daemon);
    let _ = fe.alloc_ok(0, 4 * KIB);
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 1, "{}", st.raw);
}

#[test]
fn buffer_ids_start_at_an_unpredictable_value() {
    let mut starts = Vec::new();
    for _ in 0..3 {
        let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
        let mut fe = FrontEnd::connect(&daemon);
        starts.push(fe.alloc_ok(0, 4 * KIB).id);
    }
    eprintln!("first buffer ids of three daemons: {starts:x?}");
    assert!(starts.iter().all(|&i| i != 0 && i < 1 << 63));
    assert!(
        starts[0] != starts[1] && starts[1] != starts[2] && starts[0] != starts[2],
        "{starts:x?}"
    );
    assert!(
        starts.iter().any(|&i| i > 1 << 32),
        "small ids: {starts:x?}"
    );
}
