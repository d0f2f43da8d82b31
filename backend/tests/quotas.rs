//! Quotas and window exhaustion: the guest gets QUOTA / WINDOW_FULL, and everything works
//! again after a FREE.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn expect_status(got: Result<Buffer, u32>, want: &[u32], what: &str) {
    match got {
        Ok(b) => panic!("{what}: ALLOC succeeded ({b:x?}), wanted {want:?}"),
        Err(s) => assert!(
            want.contains(&s),
            "{what}: got {}, wanted one of {:?}",
            status_name(s),
            want.iter().map(|&w| status_name(w)).collect::<Vec<_>>()
        ),
    }
}

#[test]
fn per_heap_max_bytes() {
    let daemon = Daemon::spawn([
        "--heap",
        "q=memfd,max-bytes=64K",
        "--heap",
        "free=memfd",
        "--shm-size",
        "64M",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    assert_eq!(fe.heap_info(0).unwrap().capacity, 64 * KIB, "max-bytes=64K");
    let held: Vec<Buffer> = (0..4).map(|_| fe.alloc_ok(0, 16 * KIB)).collect();
    expect_status(
        fe.alloc(0, 4 * KIB),
        &[S_QUOTA],
        "5th 16 KiB past max-bytes=64K",
    );
    // The other heap is not limited by q's quota.
    let other = fe.alloc_ok(1, 128 * KIB);
    // Recovery.
    fe.free_ok(held[2].id);
    let again = fe.alloc_ok(0, 16 * KIB);
    expect_status(fe.alloc(0, 4 * KIB), &[S_QUOTA], "full again");
    assert!(fe.read_buffer(&again, 0, 16 * KIB).iter().all(|&x| x == 0));
    let st = daemon.stats();
    assert_eq!(st.heap("q").bytes, 64 * KIB, "{}", st.raw);
    assert_eq!(st.heap("q").buffers, 4, "{}", st.raw);
    fe.free_ok(other.id);
}

#[test]
fn max_buffers() {
    let daemon = Daemon::spawn([
        "--heap",
        "a=memfd",
        "--max-buffers",
        "3",
        "--shm-size",
        "64M",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    assert_eq!(fe.config.max_buffers, 3);
    let held: Vec<Buffer> = (0..3).map(|_| fe.alloc_ok(0, 4 * KIB)).collect();
    expect_status(
        fe.alloc(0, 4 * KIB),
        &[S_QUOTA],
        "4th buffer with --max-buffers 3",
    );
    fe.free_ok(held[0].id);
    let _b = fe.alloc_ok(0, 4 * KIB);
    expect_status(fe.alloc(0, 4 * KIB), &[S_QUOTA], "full again");
}

#[test]
fn global_max_bytes_across_heaps() {
    let daemon = Daemon::spawn([
        "--heap",
        "a=memfd",
        "--heap",
        "b=memfd",
        "--max-bytes",
        "64K",
        "--shm-size",
        "64M",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    // HEAP_INFO.capacity: bytes the guest may hold from the heap, so at most --max-bytes.
    for heap in 0..2 {
        let info = fe.heap_info(heap).unwrap();
        assert!(
            info.capacity <= 64 * KIB,
            "heap {heap} capacity above --max-bytes 64K: {info:?}"
        );
    }
    let a = fe.alloc_ok(0, 32 * KIB);
    let _b = fe.alloc_ok(1, 32 * KIB);
    expect_status(
        fe.alloc(0, 4 * KIB),
        &[S_QUOTA],
        "heap a past --max-bytes 64K",
    );
    expect_status(
        fe.alloc(1, 4 * KIB),
        &[S_QUOTA],
        "heap b past --max-bytes 64K",
    );
    fe.free_ok(a.id);
    let _c = fe.alloc_ok(1, 32 * KIB);
    let st = daemon.stats();
    assert_eq!(st.total.bytes, 64 * KIB, "{}", st.raw);
}

#[test]
fn max_mappings() {
    let daemon = Daemon::spawn([
        "--heap",
        "a=memfd,max-size=64M",
        "--max-mappings",
        "2",
        "--shm-size",
        "1G",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    let mut held = Vec::new();
    let mut failed = None;
    // Large buffers each need a mapping of their own: the third cannot be mapped.
    for i in 0..4 {
        match fe.alloc(0, 32 * MIB) {
            Ok(b) => held.push(b),
            Err(s) => {
                failed = Some((i, s));
                break;
            }
        }
    }
    let live = fe.shm().live_mappings();
    eprintln!("held {held:x?}, failed {failed:?}, live mappings {live}");
    let (i, s) = failed.expect("--max-mappings 2 never refused an ALLOC");
    assert!(i <= 2, "ALLOC {i} failed, but the first two should fit");
    assert_eq!(
        s,
        S_WINDOW_FULL,
        "status past --max-mappings: {}",
        status_name(s)
    );
    assert!(live <= 2, "{live} live mappings with --max-mappings 2");
    assert_eq!(fe.shm().refused_map_count(), 0);
    // Recovery.
    let b = held.pop().expect("no buffer held");
    fe.free_ok(b.id);
    let again = fe.alloc_ok(0, 32 * MIB);
    fe.write_buffer(&again, 0, b"ok");
    assert_eq!(daemon.peek(again.id, 0, 2), b"ok");
}

#[test]
fn window_full_with_a_small_window() {
    let daemon = Daemon::spawn(["--heap", "a=memfd,max-size=4M", "--shm-size", "4M"]);
    let mut fe = FrontEnd::connect(&daemon);
    assert_eq!(fe.window_size(), 4 * MIB);
    let mut held: Vec<Buffer> = Vec::new();
    let status = loop {
        match fe.alloc(0, MIB) {
            Ok(b) => {
                assert!(
                    b.offset + b.len <= 4 * MIB,
                    "buffer {b:x?} outside the 4 MiB window"
                );
                held.push(b);
                assert!(
                    held.len() <= 4,
                    "more than 4 x 1 MiB in a 4 MiB window: {held:x?}"
                );
            }
            Err(s) => break s,
        }
    };
    eprintln!("held {} x 1 MiB: {held:x?}", held.len());
    assert!(!held.is_empty(), "not even one 1 MiB buffer fits in 4 MiB");
    assert_eq!(
        status_name(status),
        status_name(S_WINDOW_FULL),
        "status when the window is full"
    );
    // Recovery: freeing one makes room for one.
    let b = held.pop().unwrap();
    fe.free_ok(b.id);
    let again = fe.alloc_ok(0, MIB);
    assert!(fe.read_buffer(&again, 0, MIB).iter().all(|&x| x == 0));
    // A buffer bigger than the window can never fit.
    expect_status(
        fe.alloc(0, 8 * MIB),
        &[S_TOO_BIG, S_WINDOW_FULL],
        "8 MiB in a 4 MiB window",
    );
}
