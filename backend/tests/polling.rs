//! Ring polling (`--poll-us`): while requests come close together the worker keeps reading
//! the ring with the driver's notifications off, so a driver that honours that (every
//! virtio driver does) sends no kicks. Once requests stop it turns them on again, also
//! after a pause that stopped the ring in the middle of polling.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use std::time::{Duration, Instant};

use common::*;

const PAIRS: usize = 200;

fn daemon(poll_us: &str) -> Daemon {
    Daemon::spawn([
        "--heap",
        "a=memfd",
        "--shm-size",
        "1G",
        "--poll-us",
        poll_us,
    ])
}

/// A front end that kicks only when the daemon asks for kicks, as a driver does.
fn driver(daemon: &Daemon) -> FrontEnd {
    let mut fe = FrontEnd::connect(daemon);
    fe.behave_like_driver(Duration::ZERO);
    fe
}

/// ALLOC + FREE, each waited for, `n` times: `2 n` requests, each `gap` after the answer
/// to the one before.
fn pairs(fe: &mut FrontEnd, n: usize, gap: Duration) {
    for _ in 0..n {
        std::thread::sleep(gap);
        let b = fe.alloc_ok(0, 4096);
        std::thread::sleep(gap);
        fe.free_ok(b.id);
    }
}

/// How many of `2 PAIRS` requests, each 1 ms after the answer before, went without a kick.
fn unkicked_at_1ms(fe: &mut FrontEnd) -> u64 {
    let before = fe.kicks_suppressed;
    pairs(fe, PAIRS, Duration::from_millis(1));
    fe.kicks_suppressed - before
}

fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < DEADLINE, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn requests_close_together_need_no_kicks() {
    let daemon = daemon("10000");
    let mut fe = driver(&daemon);
    // The window reaches 10 ms within a few requests; a loaded machine may still stall
    // this thread past it now and then.
    let unkicked = unkicked_at_1ms(&mut fe);
    assert!(
        unkicked >= (2 * PAIRS as u64) * 3 / 4,
        "only {unkicked} of {} requests 1 ms apart went without a kick",
        2 * PAIRS
    );
    // Requests stopped: the daemon must ask for kicks again, or the next one would wait
    // forever.
    wait_until("the daemon turns notifications on again", || {
        fe.daemon_wants_kicks()
    });
    let before = fe.kicks_suppressed;
    let head = fe.submit(&[Seg::R(heap_info_req(0)), Seg::W(HEAP_INFO_RESP_SIZE as u32)]);
    fe.kick();
    assert_eq!(fe.kicks_suppressed, before, "no kick after idle");
    let c = fe.wait(head);
    assert_eq!(FrontEnd::status_of(&c, "HEAP_INFO after idle"), S_OK);
}

#[test]
fn without_polling_requests_are_kicked() {
    let daemon = daemon("0");
    let mut fe = driver(&daemon);
    // A request that comes while the worker is still on the ring (between its answer and
    // turning notifications back on, some microseconds) needs no kick; 1 ms later it does.
    let unkicked = unkicked_at_1ms(&mut fe);
    assert!(
        unkicked <= (2 * PAIRS as u64) / 4,
        "{unkicked} of {} requests 1 ms apart went without a kick with --poll-us 0",
        2 * PAIRS
    );
}

#[test]
fn a_request_left_unkicked_by_a_pause_while_polling_is_served_after_resume() {
    let daemon = daemon("10000");
    let mut fe = driver(&daemon);
    // Pause while the worker polls (notifications off). Once the ring is stopped the daemon
    // writes nothing to it, so the flags read then stay as they are.
    let mut caught = false;
    for _ in 0..20 {
        pairs(&mut fe, 20, Duration::ZERO);
        fe.pause();
        if !fe.daemon_wants_kicks() {
            caught = true;
            break;
        }
        fe.resume();
    }
    assert!(caught, "never paused while the daemon polled (20 tries)");
    // The flags still say "no kicks": a driver queues its request without one.
    let kicks = fe.kicks_suppressed;
    let head = fe.submit(&[Seg::R(heap_info_req(0)), Seg::W(HEAP_INFO_RESP_SIZE as u32)]);
    fe.kick();
    assert_eq!(fe.kicks_suppressed, kicks + 1, "the request was kicked");
    fe.resume();
    let c = fe.wait(head);
    assert_eq!(FrontEnd::status_of(&c, "HEAP_INFO after resume"), S_OK);
    wait_until("notifications on after the resume", || {
        fe.daemon_wants_kicks()
    });
    pairs(&mut fe, 1, Duration::ZERO);
}
