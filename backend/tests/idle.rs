//! The idle policy for spare arenas: an idle heap keeps its emptied arena mapped so that
//! the next ALLOC needs no SHMEM_MAP, and gives it back (SHMEM_UNMAP from the vring worker)
//! after the idle delay (`SPARE_IDLE_DELAY`, 100 ms) - but never while the device is
//! stopped (a paused VM, or a reset): the timer that fires then sends nothing, and the
//! spare goes once the ring runs again.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use std::time::{Duration, Instant};

use common::*;
use vhost_user_dmaheap::core::SPARE_IDLE_DELAY;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Attempts at a timing-sensitive sequence: a test thread stalled for longer than the idle
/// delay (a loaded machine) lets the spare go early; the attempt is then repeated.
const ATTEMPTS: usize = 5;

fn daemon() -> Daemon {
    // Debug logging: the idle timer's log lines are waited for below.
    Daemon::builder()
        .args(["--heap", "a=memfd", "--shm-size", "1G"])
        .log_level("debug")
        .spawn()
}

/// Polls until `pred` holds, or fails the test after DEADLINE.
fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < DEADLINE, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn alloc_free_alloc_reuses_the_spare_and_the_idle_heap_unmaps_it_later() {
    let daemon = daemon();
    let mut fe = FrontEnd::connect(&daemon);
    let mut reused = false;
    for attempt in 0..ATTEMPTS {
        let b = fe.alloc_ok(0, 4 * KIB);
        fe.write_buffer(&b, 0, b"dirty");
        let shm = fe.shm();
        let (maps, unmaps) = (shm.map_count(), shm.unmap_count());
        drop(shm);
        fe.free_ok(b.id);
        let again = fe.alloc_ok(0, 4 * KIB);
        let shm = fe.shm();
        if shm.unmap_count() != unmaps {
            // The spare went before the second ALLOC: this thread stalled for the delay.
            eprintln!("attempt {attempt}: the spare was released before the next ALLOC");
            drop(shm);
            fe.free_ok(again.id);
            continue;
        }
        assert_eq!(
            shm.map_count(),
            maps,
            "ALLOC after FREE on an idle heap sent a new SHMEM_MAP: {:x?}",
            shm.events
        );
        assert_eq!(shm.live_mappings(), 1);
        drop(shm);
        assert_eq!(
            again.offset, b.offset,
            "the freed range is handed out again"
        );
        assert!(fe.read_buffer(&again, 0, 4 * KIB).iter().all(|&x| x == 0));
        fe.free_ok(again.id);
        reused = true;
        break;
    }
    assert!(
        reused,
        "every attempt stalled for longer than the idle delay"
    );

    // Idle now: the spare stays mapped for the idle delay, then the worker unmaps it.
    let freed_at = Instant::now();
    let unmaps = fe.shm().unmap_count();
    wait_until("the idle spare is unmapped", || {
        fe.shm().live_mappings() == 0
    });
    let waited = freed_at.elapsed();
    eprintln!("idle spare unmapped {waited:?} after the last FREE completed");
    let shm = fe.shm();
    assert_eq!(shm.unmap_count(), unmaps + 1);
    assert_eq!(shm.mem_regions_removed, shm.unmap_count());
    drop(shm);
    let st = daemon.wait_stats("no mapping in the stats", |s| s.total.mappings == 0);
    assert_eq!(st.total, Counters::default(), "{}", st.raw);
    // Not released early: the FREE was processed before `freed_at`, so allow for the time
    // its completion took to arrive (the deadline is counted from the daemon's clock).
    assert!(
        waited + Duration::from_millis(50) >= SPARE_IDLE_DELAY,
        "released after {waited:?}, before the idle delay of {SPARE_IDLE_DELAY:?}"
    );

    // A new ALLOC maps a new arena; the heap in use again keeps it.
    let maps = fe.shm().map_count();
    let b = fe.alloc_ok(0, 4 * KIB);
    assert_eq!(fe.shm().map_count(), maps + 1);
    fe.free_ok(b.id);
    wait_until("the second idle spare is unmapped", || {
        fe.shm().live_mappings() == 0
    });
    fe.assert_no_violations();
}

#[test]
fn only_idle_heaps_give_their_arenas_back() {
    let daemon = Daemon::builder()
        .args(["--heap", "a=memfd", "--heap", "b=memfd", "--shm-size", "1G"])
        .spawn();
    let mut fe = FrontEnd::connect(&daemon);
    // Heap a stays in use: one buffer keeps its first arena, and a second arena, emptied,
    // stays as its spare.
    let keep = fe.alloc_ok(0, 4 * KIB);
    let big: Vec<Buffer> = (0..3).map(|_| fe.alloc_ok(0, MIB)).collect();
    for b in &big {
        fe.free_ok(b.id);
    }
    let a = daemon.stats().heap("a");
    assert_eq!(
        (a.buffers, a.mappings),
        (1, 2),
        "keeper's arena and a spare"
    );
    // Heap b goes idle: the idle timer fires and gives back heap b's arena only.
    let b = fe.alloc_ok(1, 4 * KIB);
    fe.free_ok(b.id);
    let st = daemon.wait_stats("heap b's idle arena released", |s| {
        s.heap("b").mappings == 0
    });
    assert_eq!(
        st.heap("a"),
        a,
        "heap a (in use) lost its spare: {}",
        st.raw
    );
    assert_eq!(fe.shm().live_mappings(), 2);
    // Heap a goes idle too: everything goes.
    fe.free_ok(keep.id);
    wait_until("heap a's arenas unmapped", || fe.shm().live_mappings() == 0);
    let shm = fe.shm();
    assert_eq!(shm.map_count(), shm.unmap_count());
    drop(shm);
    fe.assert_no_violations();
}

#[test]
fn a_pause_while_a_spare_is_idle_sends_no_unmap_until_the_vm_runs_again() {
    let daemon = daemon();
    let mut fe = FrontEnd::connect(&daemon);
    let mut paused = false;
    for attempt in 0..ATTEMPTS {
        let b = fe.alloc_ok(0, 4 * KIB);
        let unmaps = fe.shm().unmap_count();
        fe.free_ok(b.id);
        // The VM is paused right after its last FREE, the idle spare still mapped.
        let shm = fe.shm();
        let spare_live = shm.unmap_count() == unmaps && shm.live_mappings() == 1;
        drop(shm);
        if !spare_live {
            eprintln!("attempt {attempt}: the spare was released before the pause");
            continue;
        }
        let before = count(&daemon.stderr(), "timer: queue not running");
        fe.pause();
        let unmaps_after_stop = fe.shm().unmap_count();
        if unmaps_after_stop != unmaps {
            // The timer won the race against the stop (if it sent its UNMAP after the stop
            // began, the front end recorded a violation, checked at the end).
            eprintln!("attempt {attempt}: the spare was released just before the pause");
            fe.resume();
            continue;
        }
        // The timer armed by the FREE fires while paused: the worker finds the queue
        // stopped and sends nothing; the spare stays, and so do the counters.
        wait_until("the idle timer fired while paused", || {
            count(&daemon.stderr(), "timer: queue not running") > before
        });
        assert_eq!(
            fe.shm().unmap_count(),
            unmaps_after_stop,
            "SHMEM_UNMAP while paused: {:x?}",
            fe.shm().events
        );
        assert_eq!(fe.shm().live_mappings(), 1);
        fe.assert_no_violations();
        paused = true;
        break;
    }
    assert!(
        paused,
        "every attempt stalled for longer than the idle delay"
    );

    // The VM runs again: the spare is reused, or given back once idle.
    fe.resume();
    let maps = fe.shm().map_count();
    let b = fe.alloc_ok(0, 4 * KIB);
    assert_eq!(fe.shm().map_count(), maps, "the spare survived the pause");
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
    let unmaps = fe.shm().unmap_count();
    fe.free_ok(b.id);
    wait_until("the idle spare is unmapped after the resume", || {
        fe.shm().live_mappings() == 0
    });
    assert_eq!(fe.shm().unmap_count(), unmaps + 1);
    fe.assert_no_violations();
}
