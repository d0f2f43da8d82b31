//! Buffer life cycle as the guest sees it: zeroed allocations, zero-copy through the window,
//! FREE, id rules and argument errors.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::*;

const KIB: u64 = 1024;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 7 + i / 251) as u8))
        .collect()
}

#[test]
fn alloc_is_zeroed_and_the_window_is_the_host_buffer() {
    let daemon = Daemon::spawn(["--heap", "a=memfd,align=64K", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let info = fe.heap_info(0).unwrap();

    let b = fe.alloc_ok(0, 64 * KIB);
    eprintln!("allocated {b:x?}");
    assert_ne!(b.id, 0, "buffer id 0");
    assert_eq!(
        b.offset % info.min_align,
        0,
        "offset not aligned to min_align"
    );
    assert!(b.len >= 64 * KIB, "len {} < requested", b.len);
    assert!(
        b.offset + b.len <= fe.window_size(),
        "buffer outside the window"
    );
    // At least one SHMEM_MAP made it visible, with a writable mapping.
    let events = fe.shm().events.clone();
    assert!(fe.shm().map_count() >= 1, "no SHMEM_MAP: {events:x?}");
    for e in &events {
        if let common::frontend::ShmEvent::Map {
            flags, fd_offset, ..
        } = e
        {
            assert_eq!(flags & 1, 1, "mapping not WRITABLE: {e:x?}");
            assert_eq!(fd_offset % PAGE_SIZE, 0, "fd_offset unaligned: {e:x?}");
        }
    }

    // Zeroed, all of it.
    let bytes = fe.read_buffer(&b, 0, b.len);
    let nonzero = bytes.iter().position(|&x| x != 0);
    assert_eq!(nonzero, None, "fresh buffer not zeroed");

    // Guest writes are the host buffer's bytes.
    let data = pattern(1, 4096);
    fe.write_buffer(&b, 8192, &data);
    let host = daemon.peek(b.id, 8192, 4096);
    assert_eq!(host, data, "host buffer does not show what the guest wrote");
    // And the host's writes show up in the guest's window.
    let data2 = pattern(99, 100);
    daemon.poke(b.id, 60 * KIB, &data2);
    assert_eq!(
        fe.read_buffer(&b, 60 * KIB, 100),
        data2,
        "window does not show what the host wrote"
    );

    // SYNC brackets are accepted on a memfd heap.
    for flags in [
        SYNC_READ,
        SYNC_READ | SYNC_END,
        SYNC_WRITE,
        SYNC_WRITE | SYNC_END,
        SYNC_READ | SYNC_WRITE,
        SYNC_READ | SYNC_WRITE | SYNC_END,
    ] {
        let s = fe.sync(b.id, flags);
        assert_eq!(s, S_OK, "SYNC flags {flags:#x}: {}", status_name(s));
    }
    fe.free_ok(b.id);
}

#[test]
fn a_freed_range_comes_back_zeroed() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    // A keeper so the arena stays mapped and the freed range can be reused in place.
    let keeper = fe.alloc_ok(0, 4 * KIB);
    let a = fe.alloc_ok(0, 16 * KIB);
    fe.write_buffer(&a, 0, &vec![0xff; (16 * KIB) as usize]);
    fe.free_ok(a.id);

    let mut held = Vec::new();
    let mut reused = None;
    for _ in 0..64 {
        let b = fe.alloc_ok(0, 16 * KIB);
        let bytes = fe.read_buffer(&b, 0, b.len);
        assert!(
            bytes.iter().all(|&x| x == 0),
            "buffer {b:x?} (freed range was {a:x?}) is not zeroed: first non-zero at {:?}",
            bytes.iter().position(|&x| x != 0)
        );
        let overlaps = b.offset < a.offset + a.len && a.offset < b.offset + b.len;
        held.push(b);
        if overlaps {
            reused = Some(b);
            break;
        }
    }
    let reused = reused.unwrap_or_else(|| {
        panic!("the freed range {a:x?} was never reused in 64 allocations: {held:x?}")
    });
    eprintln!("freed {a:x?}, reused as {reused:x?}");
    assert_ne!(reused.id, a.id, "buffer id reused");
    // The keeper was not disturbed.
    assert!(fe.read_buffer(&keeper, 0, 4 * KIB).iter().all(|&x| x == 0));
}

#[test]
fn buffer_ids_are_never_zero_and_never_reused() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let mut seen = std::collections::BTreeSet::new();
    let mut last = 0;
    for i in 0..200 {
        let b = fe.alloc_ok(0, 4 * KIB);
        assert_ne!(b.id, 0);
        assert!(seen.insert(b.id), "id {} reused at allocation {i}", b.id);
        assert!(b.id > last, "ids not monotonic: {} after {last}", b.id);
        last = b.id;
        // Free every other one right away so that ranges get recycled.
        if i % 2 == 0 {
            fe.free_ok(b.id);
        }
    }
}

#[test]
fn free_of_unknown_or_freed_ids_is_no_buffer() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    for id in [0, 1, 12345, u64::MAX] {
        let s = fe.free(id);
        assert_eq!(
            s,
            S_NO_BUFFER,
            "FREE {id} with no buffers: {}",
            status_name(s)
        );
    }
    let a = fe.alloc_ok(0, 8 * KIB);
    let b = fe.alloc_ok(0, 8 * KIB);
    fe.free_ok(a.id);
    let s = fe.free(a.id);
    assert_eq!(s, S_NO_BUFFER, "double FREE: {}", status_name(s));
    let s = fe.sync(a.id, SYNC_READ);
    assert_eq!(s, S_NO_BUFFER, "SYNC of a freed buffer: {}", status_name(s));
    let s = fe.free(b.id + 1000);
    assert_eq!(s, S_NO_BUFFER, "FREE of a future id: {}", status_name(s));
    // b is untouched by all that.
    fe.write_buffer(&b, 0, b"still here");
    assert_eq!(daemon.peek(b.id, 0, 10), b"still here");
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 1, "stats: {}", st.raw);
    fe.free_ok(b.id);
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 0, "stats: {}", st.raw);
    assert_eq!(st.total.bytes, 0, "stats: {}", st.raw);
}

#[test]
fn alloc_and_sync_argument_errors() {
    let daemon = Daemon::spawn([
        "--heap",
        "a=memfd,max-size=1M",
        "--heap",
        "b=memfd",
        "--shm-size",
        "64M",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    let cases: &[(&str, u32, u32, u64, u32)] = &[
        ("len 0", 0, 0, 0, S_INVAL),
        ("len not a page multiple", 0, 0, 4097, S_INVAL),
        ("len 1", 0, 0, 1, S_INVAL),
        ("len above max_size", 0, 0, 2 << 20, S_TOO_BIG),
        ("largest page multiple", 0, 0, !(PAGE_SIZE - 1), S_TOO_BIG),
        ("flags 1", 0, 1, 4096, S_INVAL),
        ("flags 1<<31", 0, 1 << 31, 4096, S_INVAL),
        ("heap id num_heaps", 2, 0, 4096, S_NO_HEAP),
        ("heap id u32::MAX", u32::MAX, 0, 4096, S_NO_HEAP),
    ];
    for &(what, heap, flags, len, want) in cases {
        let got = fe.alloc_flags(heap, flags, len);
        assert_eq!(
            got.map_err(status_name),
            Err(status_name(want)),
            "ALLOC {what} (heap {heap}, flags {flags:#x}, len {len:#x})"
        );
    }
    let st = daemon.stats();
    assert_eq!(
        st.total.buffers, 0,
        "failed ALLOCs left buffers: {}",
        st.raw
    );
    assert_eq!(fe.shm().map_count(), 0, "failed ALLOCs mapped something");

    // Exactly max_size is fine.
    let max = fe.alloc_ok(0, 1 << 20);
    assert!(max.len >= 1 << 20);
    fe.free_ok(max.id);

    let b = fe.alloc_ok(0, 4096);
    for (what, flags) in [
        ("no READ/WRITE", 0),
        ("END only", SYNC_END),
        ("unknown bit", SYNC_READ | 1 << 3),
        ("high bit", SYNC_WRITE | 1 << 31),
    ] {
        let s = fe.sync(b.id, flags);
        assert_eq!(s, S_INVAL, "SYNC {what}: {}", status_name(s));
    }
    // ASSIGN_UUID needs F_UUID, which this driver did not accept.
    let c = fe.request(&assign_uuid_req(b.id), ASSIGN_UUID_RESP_SIZE as u32);
    let s = FrontEnd::status_of(&c, "ASSIGN_UUID");
    assert_eq!(s, S_UNSUPP, "ASSIGN_UUID: {}", status_name(s));
    // The buffer still works.
    fe.free_ok(b.id);
    let _ = fe.alloc_ok(1, 4096);
}

#[test]
fn many_requests_in_flight_at_once_are_all_answered() {
    // The guest driver sends FREE without waiting: several chains are on the ring at once.
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let heads: Vec<u16> = (0..16)
        .map(|_| {
            fe.submit(&[
                Seg::R(alloc_req(0, 0, 4096)),
                Seg::W(ALLOC_RESP_SIZE as u32),
            ])
        })
        .collect();
    fe.kick();
    let bufs: Vec<Buffer> = heads
        .iter()
        .map(|&h| {
            let c = fe.wait(h);
            common::frontend::parse_alloc(&c, "batched ALLOC").unwrap()
        })
        .collect();
    let mut ids: Vec<u64> = bufs.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 16, "duplicate ids: {bufs:x?}");
    let heads: Vec<u16> = bufs
        .iter()
        .map(|b| fe.submit(&[Seg::R(free_req(b.id)), Seg::W(RESP_HDR_SIZE as u32)]))
        .collect();
    fe.kick();
    for h in heads {
        let c = fe.wait(h);
        assert_eq!(FrontEnd::status_of(&c, "batched FREE"), S_OK);
    }
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 0, "{}", st.raw);
}

#[test]
fn sync_needs_f_sync_to_be_negotiated() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect_acking(&daemon, 0);
    assert_eq!(fe.acked_features & F_SYNC, 0);
    let b = fe.alloc_ok(0, 4 * KIB);
    let s = fe.sync(b.id, SYNC_READ);
    assert_eq!(
        status_name(s),
        status_name(S_UNSUPP),
        "SYNC without F_SYNC negotiated"
    );
    // Everything else works without it.
    fe.write_buffer(&b, 0, b"no sync");
    assert_eq!(daemon.peek(b.id, 0, 7), b"no sync");
    fe.free_ok(b.id);
}

#[test]
fn a_batch_maps_count_zeroed_buffers_in_one_request() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_BATCH);
    // Dirty ranges first, so that the batch reuses them.
    let dirty: Vec<Buffer> = (0..4).map(|_| fe.alloc_ok(0, 16 * KIB)).collect();
    for b in &dirty {
        fe.write_buffer(b, 0, &pattern(3, (16 * KIB) as usize));
    }
    for b in &dirty {
        fe.free_ok(b.id);
    }
    let bufs = fe.alloc_batch(0, 16, 16 * KIB).unwrap();
    assert_eq!(bufs.len(), 16, "{bufs:x?}");
    for (i, b) in bufs.iter().enumerate() {
        assert!(
            b.offset + b.len <= fe.window_size(),
            "buffer {b:x?} outside the window"
        );
        assert!(
            fe.read_buffer(b, 0, b.len).iter().all(|&x| x == 0),
            "buffer {i} ({b:x?}) not zeroed"
        );
        // Each one is the host buffer behind the window, and its own.
        let data = pattern(i as u8, 64);
        fe.write_buffer(b, 100, &data);
        assert_eq!(daemon.peek(b.id, 100, 64), data, "buffer {i}: host bytes");
    }
    for b in &bufs {
        fe.free_ok(b.id);
    }
    assert_eq!(daemon.stats().total.buffers, 0);
    // Without the feature the request is unknown (the daemon serves one front end at a time).
    drop(fe);
    let mut plain = FrontEnd::connect_acking(&daemon, F_SYNC);
    assert_eq!(plain.alloc_batch(0, 2, 4 * KIB), Err(S_UNSUPP));
}
