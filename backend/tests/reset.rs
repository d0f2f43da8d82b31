//! Device reset (GET_VRING_BASE) and front-end reconnection.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[test]
fn reset_drops_every_buffer_without_shmem_unmap() {
    let daemon = Daemon::spawn(["--heap", "a=memfd,max-size=64M", "--shm-size", "1G"]);
    let mut fe = FrontEnd::connect(&daemon);
    let mut old = Vec::new();
    for len in [4 * KIB, 4 * KIB, 64 * KIB, 32 * MIB] {
        let b = fe.alloc_ok(0, len);
        fe.write_buffer(&b, 0, b"before reset");
        old.push(b);
    }
    let requests = 4;
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 4, "{}", st.raw);
    let maps_before = fe.shm().map_count();
    let live_before = fe.shm().live_mappings();

    // The guest resets the device: QEMU stops the ring and drops the mappings itself.
    let base = fe.stop_queue();
    assert_eq!(base, requests, "GET_VRING_BASE: next avail index");
    // QEMU's memory listener removed the dropped mappings from the daemon's memory table.
    assert_eq!(
        fe.shm().mem_regions_removed,
        live_before,
        "REM_MEM_REG after reset: {:?}",
        fe.shm().violations
    );
    let st = daemon.wait_stats("0 buffers after GET_VRING_BASE", |s| {
        s.total == Counters::default()
    });
    eprintln!("stats after reset: {}", st.raw);
    assert_eq!(
        fe.shm().unmap_count(),
        0,
        "the daemon sent SHMEM_UNMAP around a reset (QEMU crashes): {:x?}",
        fe.shm().events
    );

    // The driver starts the device again.
    fe.start_queue();
    for b in &old {
        let s = fe.free(b.id);
        assert_eq!(
            s,
            S_NO_BUFFER,
            "FREE of pre-reset buffer {}: {}",
            b.id,
            status_name(s)
        );
    }
    let max_old = old.iter().map(|b| b.id).max().unwrap();
    let b = fe.alloc_ok(0, 4 * KIB);
    assert!(
        b.id > max_old,
        "id {} reused after reset (old max {max_old})",
        b.id
    );
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    assert!(
        fe.shm().map_count() > maps_before,
        "no new SHMEM_MAP after reset although QEMU dropped every mapping"
    );
    let big = fe.alloc_ok(0, 32 * MIB);
    assert!(fe.read_buffer(&big, 0, 4 * KIB).iter().all(|&x| x == 0));
    assert_eq!(fe.shm().unmap_count(), 0, "{:x?}", fe.shm().events);
    assert!(fe.shm().violations.is_empty(), "{:?}", fe.shm().violations);
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 2, "{}", st.raw);
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
fn reset_while_a_shmem_map_is_pending() {
    // QEMU runs the guest's device reset on its main thread: while it waits for the
    // GET_VRING_BASE reply it does not read the backend channel, so a SHMEM_MAP the daemon
    // sent just before stays unanswered until the ring is stopped. The daemon must answer
    // GET_VRING_BASE anyway, and must not complete the interrupted request on the stopped
    // ring.
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    fe.stall_maps(true);
    let head = fe.submit(&[
        Seg::R(alloc_req(0, 0, 4 * KIB)),
        Seg::W(ALLOC_RESP_SIZE as u32),
    ]);
    fe.kick();
    let start = std::time::Instant::now();
    while fe.stalled_maps() == 0 {
        assert!(start.elapsed() < DEADLINE, "the ALLOC never sent SHMEM_MAP");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let guard = daemon.kill_if_stuck(
        "GET_VRING_BASE while a SHMEM_MAP is pending",
        std::time::Duration::from_secs(10),
    );
    let base = fe.stop_queue();
    drop(guard);
    eprintln!("GET_VRING_BASE with a pending SHMEM_MAP returned {base}");
    // QEMU reads the stale SHMEM_MAP only now (and refuses it).
    fe.stall_maps(false);
    let late = fe.completes_within(head, std::time::Duration::from_millis(300));
    assert!(
        late.is_none(),
        "the daemon completed a request on the stopped ring: {late:?}"
    );
    daemon.wait_stats("nothing held after the reset", |s| {
        s.total == Counters::default()
    });

    fe.start_queue();
    let b = fe.alloc_ok(0, 4 * KIB);
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    fe.write_buffer(&b, 0, b"after");
    assert_eq!(daemon.peek(b.id, 0, 5), b"after");
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 1, "{}", st.raw);
}
