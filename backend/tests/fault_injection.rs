//! The front end refuses SHMEM_MAP (QEMU out of memory slots, overlapping map, ...).
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[test]
fn a_refused_shmem_map_fails_the_alloc_and_leaks_nothing() {
    let daemon = Daemon::spawn(["--heap", "a=memfd,max-size=64M", "--shm-size", "1G"]);
    let mut fe = FrontEnd::connect(&daemon);

    fe.refuse_maps(true);
    for (what, len) in [("small", 4 * KIB), ("large", 32 * MIB)] {
        let got = fe.alloc(0, len);
        assert!(
            got.is_err(),
            "{what} ALLOC succeeded although SHMEM_MAP was refused: {got:x?}"
        );
        let s = got.unwrap_err();
        eprintln!("{what} ALLOC with SHMEM_MAP refused: {}", status_name(s));
        assert!(
            [S_IOERR, S_NOMEM, S_WINDOW_FULL].contains(&s),
            "{what}: status {}",
            status_name(s)
        );
        let st = daemon.stats();
        assert_eq!(st.total, Counters::default(), "{what}: leaked: {}", st.raw);
    }
    assert!(fe.shm().refused_map_count() >= 2);
    assert_eq!(fe.shm().live_mappings(), 0);

    // The front end accepts again: everything works.
    fe.refuse_maps(false);
    let small = fe.alloc_ok(0, 4 * KIB);
    let large = fe.alloc_ok(0, 32 * MIB);
    for b in [&small, &large] {
        assert!(fe.read_buffer(b, 0, 4 * KIB).iter().all(|&x| x == 0));
        fe.write_buffer(b, 0, b"works");
        assert_eq!(daemon.peek(b.id, 0, 5), b"works");
    }
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 2, "{}", st.raw);
    assert_eq!(
        st.total.mappings,
        fe.shm().live_mappings() as u64,
        "{}",
        st.raw
    );

    // With an arena mapped, a refused map for a new large buffer still leaves the small
    // buffer intact.
    fe.refuse_maps(true);
    assert!(fe.alloc(0, 32 * MIB).is_err());
    fe.refuse_maps(false);
    assert_eq!(fe.read_buffer(&small, 0, 5), b"works");
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 2, "{}", st.raw);
    fe.free_ok(small.id);
    fe.free_ok(large.id);
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 0, "{}", st.raw);
    assert_eq!(st.total.bytes, 0, "{}", st.raw);
    // The spare arena and the large buffer's spare mapping go once the heap is idle.
    let st = daemon.wait_stats("the spares released", |s| s.total.mappings == 0);
    assert_eq!(
        fe.shm().live_mappings(),
        0,
        "{:x?} {}",
        fe.shm().mappings(),
        st.raw
    );
}

#[test]
fn a_refused_shmem_unmap_releases_the_range() {
    // QEMU refuses SHMEM_UNMAP only for a mapping it does not have (e.g. one it dropped at
    // a reset): the daemon takes it as gone, releases the host memory and may map over the
    // range again (QEMU would refuse an overlap with a mapping it still had: a violation).
    let daemon = Daemon::spawn(["--heap", "a=memfd,max-size=64M", "--shm-size", "128M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let big = fe.alloc_ok(0, 32 * MIB);
    fe.refuse_unmaps(true);
    fe.free_ok(big.id);
    // Kept as a spare, unmapped once the heap is idle.
    let start = std::time::Instant::now();
    while fe.shm().unmap_count() == 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "the idle spare was never unmapped"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    fe.refuse_unmaps(false);
    let st = daemon.stats();
    eprintln!("after the refused unmap: {}", st.raw);
    assert_eq!(st.total.buffers, 0, "{}", st.raw);
    assert_eq!(
        st.total.mappings, 0,
        "the mapping is still counted: {}",
        st.raw
    );
    // The whole window is usable again: four 32 MiB buffers in 128 MiB.
    let mut held = Vec::new();
    while let Ok(b) = fe.alloc(0, 32 * MIB) {
        held.push(b);
        assert!(held.len() <= 4, "more 32 MiB buffers than the window holds");
    }
    assert_eq!(held.len(), 4, "held after the refused unmap: {held:x?}");
    assert!(held.iter().any(|b| b.offset == big.offset));
    fe.assert_no_violations();
    for b in held {
        fe.free_ok(b.id);
    }
    let small = fe.alloc_ok(0, 4 * KIB);
    assert!(fe.read_buffer(&small, 0, 4 * KIB).iter().all(|&x| x == 0));
}
