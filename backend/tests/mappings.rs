//! How buffers become SHMEM_MAP mappings: small buffers share arenas, large ones get their
//! own mapping, and an emptied arena is unmapped.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::frontend::ShmEvent;
use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn overlap(a: &Buffer, b: &Buffer) -> bool {
    a.offset < b.offset + b.len && b.offset < a.offset + a.len
}

#[test]
fn a_thousand_small_buffers_share_a_handful_of_mappings() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "1G"]);
    let mut fe = FrontEnd::connect(&daemon);
    let mut bufs = Vec::new();
    for i in 0..1000u32 {
        let b = fe.alloc_ok(0, 4 * KIB);
        // A tag at both ends of the page: overlapping buffers would clobber each other.
        let tag = i.to_le_bytes();
        fe.write_buffer(&b, 0, &tag);
        fe.write_buffer(&b, 4 * KIB - 4, &tag);
        bufs.push(b);
    }
    let maps = fe.shm().map_count();
    let live = fe.shm().live_mappings();
    eprintln!("1000 x 4 KiB: {maps} SHMEM_MAPs, {live} live mappings");
    // As in QEMU, each mapping went into the daemon's memory table too.
    assert_eq!(fe.shm().mem_regions_added, maps, "ADD_MEM_REG acknowledged");
    assert!(
        maps <= 16,
        "1000 x 4 KiB buffers used {maps} SHMEM_MAPs (each is a guest RAM region in QEMU)"
    );
    for (i, b) in bufs.iter().enumerate() {
        let tag = (i as u32).to_le_bytes();
        assert_eq!(fe.read_buffer(b, 0, 4), tag, "buffer {i} {b:x?} clobbered");
        assert_eq!(
            fe.read_buffer(b, 4 * KIB - 4, 4),
            tag,
            "buffer {i} {b:x?} clobbered"
        );
    }
    // Host view of a few buffers matches too (each buffer has its own host bytes).
    for i in [0usize, 1, 499, 999] {
        let b = &bufs[i];
        assert_eq!(
            daemon.peek(b.id, 0, 4),
            (i as u32).to_le_bytes(),
            "host bytes of buffer {i}"
        );
    }
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 1000, "{}", st.raw);
    assert_eq!(st.total.mappings, live as u64, "{}", st.raw);

    // Free all: emptied arenas are unmapped again; the daemon may keep one empty arena
    // per heap as a spare.
    for b in &bufs {
        fe.free_ok(b.id);
    }
    let shm = fe.shm();
    assert!(
        shm.live_mappings() <= 1,
        "mappings left after freeing everything: {:x?}",
        shm.mappings()
    );
    assert_eq!(shm.unmap_count() + shm.live_mappings(), shm.map_count());
    assert_eq!(
        shm.mem_regions_removed,
        shm.unmap_count(),
        "REM_MEM_REG acknowledged"
    );
    assert!(shm.violations.is_empty(), "{:?}", shm.violations);
    let live = shm.live_mappings() as u64;
    drop(shm);
    let st = daemon.stats();
    assert_eq!(
        st.total,
        Counters {
            bytes: 0,
            buffers: 0,
            mappings: live,
            ..Default::default()
        },
        "{}",
        st.raw
    );
}

#[test]
fn emptied_arenas_are_unmapped() {
    // Several arenas' worth of small buffers; freeing all of them must give the mappings
    // back (at most one spare arena stays), and a spare is reused before a new SHMEM_MAP.
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "1G"]);
    let mut fe = FrontEnd::connect(&daemon);
    let bufs: Vec<Buffer> = (0..40).map(|_| fe.alloc_ok(0, 256 * KIB)).collect();
    let maps = fe.shm().map_count();
    eprintln!("40 x 256 KiB: {maps} mappings {:x?}", fe.shm().mappings());
    assert!(
        maps >= 2,
        "expected several arenas for 10 MiB of small buffers"
    );
    for b in &bufs {
        fe.free_ok(b.id);
    }
    let live = fe.shm().live_mappings();
    assert!(
        live <= 1,
        "{live} mappings stay mapped after every buffer was freed: {:x?}",
        fe.shm().mappings()
    );
    // Allocating again reuses the spare (if any) without a new SHMEM_MAP.
    let maps_before = fe.shm().map_count();
    let b = fe.alloc_ok(0, 4 * KIB);
    if live == 1 {
        assert_eq!(fe.shm().map_count(), maps_before, "spare arena not reused");
    }
    assert!(fe.read_buffer(&b, 0, 4 * KIB).iter().all(|&x| x == 0));
}

#[test]
fn a_large_buffer_gets_its_own_mapping_kept_after_free_until_idle() {
    let daemon = Daemon::spawn(["--heap", "a=memfd,max-size=64M", "--shm-size", "1G"]);
    let mut fe = FrontEnd::connect(&daemon);
    let small = fe.alloc_ok(0, 4 * KIB);
    fe.write_buffer(&small, 0, b"small");
    let before = fe.shm().events.len();
    let big = fe.alloc_ok(0, 32 * MIB);
    let new_events: Vec<ShmEvent> = fe.shm().events[before..].to_vec();
    eprintln!("small {small:x?}, big {big:x?}, events for big: {new_events:x?}");
    assert!(!overlap(&small, &big));
    let big_maps: Vec<(u64, u64)> = new_events
        .iter()
        .filter_map(|e| match *e {
            ShmEvent::Map {
                shm_offset,
                len,
                accepted: true,
                ..
            } => Some((shm_offset, len)),
            _ => None,
        })
        .collect();
    assert_eq!(
        big_maps.len(),
        1,
        "a 32 MiB buffer should take exactly one new mapping: {new_events:x?}"
    );
    let (off, len) = big_maps[0];
    assert!(
        off <= big.offset && big.offset + big.len <= off + len,
        "the new mapping {off:#x}+{len:#x} does not cover {big:x?}"
    );
    assert!(
        len < 2 * big.len,
        "mapping {len:#x} much larger than the buffer {big:x?}"
    );
    // Zeroed at both ends, writable, host-visible.
    assert!(fe.read_buffer(&big, 0, 4096).iter().all(|&x| x == 0));
    assert!(fe
        .read_buffer(&big, big.len - 4096, 4096)
        .iter()
        .all(|&x| x == 0));
    fe.write_buffer(&big, 31 * MIB, b"big");
    assert_eq!(daemon.peek(big.id, 31 * MIB, 3), b"big");

    let unmaps_before = fe.shm().unmap_count();
    fe.free_ok(big.id);
    // Kept for the next buffer of that size: reused with no new mapping, zeroed.
    assert_eq!(fe.shm().unmap_count(), unmaps_before);
    let maps = fe.shm().map_count();
    let again = fe.alloc_ok(0, 32 * MIB);
    assert_eq!((fe.shm().map_count(), again.offset), (maps, big.offset));
    assert!(fe.read_buffer(&again, 31 * MIB, 3).iter().all(|&x| x == 0));
    fe.free_ok(again.id);
    // Given back once the heap is idle (the small buffer keeps its arena).
    let start = std::time::Instant::now();
    while fe.shm().unmap_count() == unmaps_before {
        assert!(
            start.elapsed() < DEADLINE,
            "the large spare was never unmapped"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let shm = fe.shm();
    assert_eq!(
        shm.unmap_count(),
        unmaps_before + 1,
        "the idle large spare should be unmapped once: {:x?}",
        &shm.events[before..]
    );
    assert_eq!(
        shm.events.last(),
        Some(&ShmEvent::Unmap {
            shm_offset: off,
            len,
            accepted: true
        })
    );
    drop(shm);
    // The small buffer and its arena are untouched.
    assert_eq!(fe.read_buffer(&small, 0, 5), b"small");
    assert_eq!(fe.shm().live_mappings(), 1);
}

#[test]
fn mappings_never_overlap_and_buffers_stay_inside_them() {
    // Mixed sizes from two heaps with different alignments.
    let daemon = Daemon::spawn([
        "--heap",
        "a=memfd,max-size=16M",
        "--heap",
        "b=memfd,align=1M,max-size=16M",
        "--shm-size",
        "1G",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    let sizes = [4 * KIB, 64 * KIB, MIB, 12 * KIB, 4 * MIB, 8 * KIB, 16 * MIB];
    let mut bufs = Vec::new();
    for (i, &len) in sizes.iter().cycle().take(40).enumerate() {
        let heap = (i % 2) as u32;
        let b = fe.alloc_ok(heap, len);
        if heap == 1 {
            assert_eq!(b.offset % MIB, 0, "heap b buffer not 1 MiB aligned: {b:x?}");
        }
        fe.write_buffer(&b, 0, &(i as u32).to_le_bytes());
        bufs.push(b);
    }
    for (i, a) in bufs.iter().enumerate() {
        for b in &bufs[i + 1..] {
            assert!(!overlap(a, b), "buffers overlap: {a:x?} {b:x?}");
        }
        assert_eq!(fe.read_buffer(a, 0, 4), (i as u32).to_le_bytes());
    }
    // Free in an interleaved order; the front end checks every UNMAP matches a MAP.
    for b in bufs.iter().step_by(2).chain(bufs.iter().skip(1).step_by(2)) {
        fe.free_ok(b.id);
    }
    let shm = fe.shm();
    assert!(shm.violations.is_empty(), "{:?}", shm.violations);
    // At most one spare arena and a few large spares per heap stay, until idle.
    assert!(
        shm.live_mappings() <= 2 * (1 + vhost_user_dmaheap::core::MAX_LARGE_SPARES),
        "{:x?}",
        shm.mappings()
    );
}

#[test]
fn a_spare_arena_is_given_back_when_the_window_needs_the_room() {
    // An emptied arena kept as a spare must not make a large allocation fail.
    let daemon = Daemon::spawn(["--heap", "a=memfd,max-size=8M", "--shm-size", "8M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let small = fe.alloc_ok(0, 4 * KIB);
    fe.free_ok(small.id);
    let spare = fe.shm().live_mappings();
    eprintln!("after freeing the only small buffer: {spare} live mapping(s)");
    let big = fe.alloc(0, 8 * MIB).unwrap_or_else(|s| {
        panic!(
            "8 MiB in an 8 MiB window with only an empty arena mapped: {}",
            status_name(s)
        )
    });
    assert_eq!((big.offset, big.len), (0, 8 * MIB));
    assert!(fe
        .read_buffer(&big, 8 * MIB - 4096, 4096)
        .iter()
        .all(|&x| x == 0));
    fe.free_ok(big.id);
    let again = fe.alloc_ok(0, 4 * KIB);
    assert!(fe.read_buffer(&again, 0, 4 * KIB).iter().all(|&x| x == 0));
}

#[test]
fn the_mapping_cap_respects_the_memory_slots_of_the_front_end() {
    // Every mapping is a RAM region in QEMU's memory table, pushed to the daemon's own
    // table, which has GET_MAX_MEM_SLOTS (509) slots, one of them taken by guest RAM. A
    // --max-mappings above that must be refused or clamped, never overrun the table.
    let mut daemon = Daemon::spawn([
        "--heap",
        "a=memfd,arena-size=2M",
        "--max-mappings",
        "600",
        "--shm-size",
        "2G",
    ]);
    if !daemon.up_or_exited() {
        let status = daemon.wait_exit();
        eprintln!("--max-mappings 600 refused: {status}; {}", daemon.stderr());
        assert!(!status.success());
        return;
    }
    let mut fe = FrontEnd::connect(&daemon);
    let slots = fe.max_mem_slots;
    let mut held = 0u64;
    let status = loop {
        match fe.alloc(0, MIB) {
            Ok(_) => held += 1,
            Err(s) => break s,
        }
        assert!(held <= 600, "more buffers than --max-mappings 600");
    };
    eprintln!(
        "{held} buffers of their own mapping, then {}; {slots} memory slots",
        status_name(status)
    );
    assert!(
        held < slots,
        "{held} mappings + guest RAM in a memory table of {slots} slots"
    );
}
