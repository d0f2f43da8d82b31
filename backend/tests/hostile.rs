//! Hostile-guest tests at the vhost-user level: what no honest driver sends. Every case
//! checks that the request gets a clear error status (or used length 0), that the queue
//! keeps running (a valid request afterwards succeeds), that the daemon is still alive,
//! and that its counters are back to zero after cleanup.
//!
//! Request-level cases use the shared front end (`common`); ring-level and vhost-user
//! message-level cases use the raw front end of `hostile/raw.rs`.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;
#[path = "hostile/raw.rs"]
mod raw;

use std::time::Duration;

use common::frontend::{parse_alloc, UNMAPPED_GPA};
use common::*;
use raw::{Raw, DATA, F_INDIRECT, F_NEXT, F_WRITE};

/// The daemon is alive, a valid request succeeds, nothing is held.
fn healthy(fe: &mut FrontEnd, daemon: &mut Daemon, after: &str) {
    daemon.assert_alive();
    let b = fe
        .alloc(0, 4096)
        .unwrap_or_else(|s| panic!("ALLOC after {after}: {}", status_name(s)));
    fe.free_ok(b.id);
    // The idle heap keeps its emptied arena as a spare for SPARE_IDLE_DELAY (100 ms), then
    // gives it back: nothing may stay held after that.
    daemon.wait_stats(&format!("nothing held after {after}"), |st| {
        (st.total.buffers, st.total.bytes, st.total.mappings) == (0, 0, 0)
    });
}

/// Error status in exactly a resp_hdr (the device may also write the whole response
/// structure of the type; the spec allows both).
fn expect_error(c: &Completion, want: &[u32], what: &str) {
    let s = FrontEnd::status_of(c, what);
    assert!(
        want.contains(&s),
        "{what}: got {}, want one of {:?}",
        status_name(s),
        want.iter().map(|&w| status_name(w)).collect::<Vec<_>>()
    );
}

fn small_daemon(extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--heap",
        "a=memfd,max-size=16M",
        "--heap",
        "b=memfd,max-bytes=8M,align=64K",
        "--shm-size",
        "64M",
    ];
    args.extend_from_slice(extra);
    Daemon::spawn(args)
}

#[test]
fn truncated_oversized_and_reserved_requests() {
    let mut daemon = small_daemon(&[]);
    let mut fe = FrontEnd::connect(&daemon);
    let full = [
        ("HEAP_INFO", heap_info_req(0), HEAP_INFO_RESP_SIZE),
        ("ALLOC", alloc_req(0, 0, 4096), ALLOC_RESP_SIZE),
        ("FREE", free_req(1), RESP_HDR_SIZE),
        ("SYNC", sync_req(1, SYNC_READ), RESP_HDR_SIZE),
    ];
    for (name, req, resp) in &full {
        // Every truncation, byte by byte.
        for cut in 0..req.len() {
            let what = format!("{name} truncated to {cut}");
            let c = fe.request(&req[..cut], 64);
            expect_error(&c, &[S_INVAL], &what);
            assert_eq!(c.used_len as usize, RESP_HDR_SIZE, "{what}");
        }
        // Oversized: one byte more, a page, a slot full of garbage.
        for extra in [1usize, 8, 4096 - req.len()] {
            let what = format!("{name} + {extra} bytes");
            let mut r = req.clone();
            r.resize(req.len() + extra, 0xff);
            expect_error(&fe.request(&r, 64), &[S_INVAL], &what);
        }
        // Writable part too small for the response: INVAL in a header, or nothing.
        for w in 0..*resp as u32 {
            let what = format!("{name} with {w} writable bytes");
            let c = fe.request(req, w);
            if w < RESP_HDR_SIZE as u32 {
                assert_eq!(c.used_len, 0, "{what}");
                assert!(c.written.iter().all(|&b| b == POISON), "{what}: wrote");
            } else {
                expect_error(&c, &[S_INVAL], &what);
                assert_eq!(c.used_len as usize, RESP_HDR_SIZE, "{what}");
            }
        }
        // Reserved fields not zero.
        let mut r = req.clone();
        r[4] = 1;
        expect_error(
            &fe.request(&r, 64),
            &[S_INVAL],
            &format!("{name} hdr.reserved"),
        );
        healthy(&mut fe, &mut daemon, name);
    }
}

#[test]
fn unknown_types_heap_ids_lengths_and_flags() {
    let mut daemon = small_daemon(&[]);
    let mut fe = FrontEnd::connect(&daemon);
    for ty in [0, REQ_ASSIGN_UUID, 6, 0x100, 0x8000_0000, u32::MAX] {
        for body in [0usize, 8, 16, 64] {
            let mut r = req_hdr(ty, 0).build();
            r.resize(8 + body, 0);
            let what = format!("type {ty:#x} with {body} body bytes");
            expect_error(&fe.request(&r, 64), &[S_UNSUPP, S_INVAL], &what);
        }
    }
    for heap in [2, 3, 0x100, 0x8000_0000, u32::MAX] {
        expect_error(
            &fe.request(&heap_info_req(heap), HEAP_INFO_RESP_SIZE as u32),
            &[S_NO_HEAP],
            &format!("HEAP_INFO {heap}"),
        );
        assert_eq!(fe.alloc(heap, 4096), Err(S_NO_HEAP), "ALLOC heap {heap}");
    }
    // Heap a: max-size 16M; heap b: max-size = the window (64M), quota 8M.
    let lens: &[u64] = &[
        0,
        1,
        4095,
        4097,
        (16 << 20) + 4096,
        32 << 20,
        64 << 20,
        (64 << 20) + 4096,
        1 << 63,
        u64::MAX - 4095,
        u64::MAX,
    ];
    for &len in lens {
        for (heap, max) in [(0u32, 16u64 << 20), (1, 64 << 20)] {
            let what = format!("ALLOC heap {heap} len {len:#x}");
            let got = fe.alloc(heap, len);
            let ok: &[u32] = if len == 0 || len % 4096 != 0 {
                &[S_INVAL]
            } else if len > max {
                &[S_TOO_BIG]
            } else {
                &[S_QUOTA, S_WINDOW_FULL]
            };
            assert!(matches!(got, Err(s) if ok.contains(&s)), "{what}: {got:?}");
        }
    }
    for flags in [1, 2, 0x8000_0000, u32::MAX] {
        assert_eq!(
            fe.alloc_flags(0, flags, 4096),
            Err(S_INVAL),
            "flags {flags:#x}"
        );
    }
    // Heap b rounds up to its 64K alignment; nothing else changes.
    let b = fe.alloc_ok(1, 4096);
    assert_eq!((b.len, b.offset % (64 << 10)), (64 << 10, 0));
    fe.free_ok(b.id);
    healthy(&mut fe, &mut daemon, "argument errors");
}

#[test]
fn double_free_and_ids_never_allocated_or_freed() {
    let mut daemon = small_daemon(&[]);
    let mut fe = FrontEnd::connect(&daemon);
    let keep = fe.alloc_ok(0, 8192);
    let gone = fe.alloc_ok(0, 4096);
    fe.free_ok(gone.id);
    for id in [gone.id, 0, keep.id + 1, keep.id + 1000, u64::MAX, 1 << 63] {
        assert_eq!(fe.free(id), S_NO_BUFFER, "FREE {id}");
        for flags in [SYNC_READ, SYNC_WRITE | SYNC_END] {
            assert_eq!(fe.sync(id, flags), S_NO_BUFFER, "SYNC {id} {flags}");
        }
    }
    // Bad SYNC flags on a live buffer.
    for flags in [0, SYNC_END, 8, 8 | SYNC_READ, u32::MAX] {
        assert_eq!(fe.sync(keep.id, flags), S_INVAL, "SYNC flags {flags:#x}");
    }
    // Double free of a live buffer: the second is NO_BUFFER and changes nothing.
    let other = fe.alloc_ok(0, 4096);
    fe.free_ok(keep.id);
    assert_eq!(fe.free(keep.id), S_NO_BUFFER);
    assert_eq!(daemon.stats().total.buffers, 1, "the other buffer survives");
    assert_eq!(fe.sync(other.id, SYNC_READ), S_OK);
    fe.free_ok(other.id);
    // An id from a previous connection is dead too.
    let old = fe.alloc_ok(0, 4096);
    fe.disconnect();
    let mut fe = FrontEnd::connect(&daemon);
    assert_eq!(fe.free(old.id), S_NO_BUFFER, "pre-reconnect id");
    assert_eq!(fe.sync(old.id, SYNC_READ), S_NO_BUFFER, "pre-reconnect id");
    healthy(&mut fe, &mut daemon, "stale ids");
}

#[test]
fn floods_beyond_every_quota() {
    let mut daemon = small_daemon(&["--max-buffers", "40", "--max-bytes", "32M"]);
    let mut fe = FrontEnd::connect(&daemon);
    // Buffers: small ones until refused, then more refusals.
    let mut held = Vec::new();
    loop {
        match fe.alloc(0, 4096) {
            Ok(b) => held.push(b.id),
            Err(s) => {
                assert_eq!(s, S_QUOTA, "after {} buffers", held.len());
                break;
            }
        }
        assert!(held.len() <= 40, "more buffers than --max-buffers");
    }
    assert_eq!(held.len(), 40);
    for _ in 0..100 {
        assert_eq!(fe.alloc(0, 4096), Err(S_QUOTA));
    }
    for id in held.drain(..) {
        fe.free_ok(id);
    }
    // Per-heap bytes (heap b: 8M).
    loop {
        match fe.alloc(1, 1 << 20) {
            Ok(b) => held.push(b.id),
            Err(s) => {
                assert_eq!(s, S_QUOTA);
                break;
            }
        }
    }
    assert_eq!(held.len(), 8);
    for id in held.drain(..) {
        fe.free_ok(id);
    }
    // Bytes in total (--max-bytes 32M), 1M buffers until refused.
    loop {
        match fe.alloc(0, 1 << 20) {
            Ok(b) => held.push(b.id),
            Err(s) => {
                assert!(s == S_QUOTA || s == S_WINDOW_FULL, "{}", status_name(s));
                break;
            }
        }
        assert!(held.len() <= 32, "more than --max-bytes");
    }
    assert!(held.len() >= 24, "only {} MiB held", held.len());
    assert!(daemon.stats().total.bytes <= 32 << 20);
    for id in held.drain(..) {
        fe.free_ok(id);
    }
    // A ring full of requests at once (no waiting in between), half of them bad.
    let mut heads = Vec::new();
    for i in 0..30u64 {
        let req = if i % 2 == 0 {
            alloc_req(0, 0, 4096 * (1 + i % 5))
        } else {
            alloc_req(7, 0, 4096)
        };
        heads.push(fe.submit(&[Seg::R(req), Seg::W(ALLOC_RESP_SIZE as u32)]));
    }
    fe.kick();
    for (i, h) in heads.into_iter().enumerate() {
        let c = fe.wait(h);
        match parse_alloc(&c, &format!("flood {i}")) {
            Ok(b) => held.push(b.id),
            Err(s) => assert!(
                i % 2 == 1 && s == S_NO_HEAP,
                "flood {i}: {}",
                status_name(s)
            ),
        }
    }
    assert_eq!(held.len(), 15);
    for id in held.drain(..) {
        fe.free_ok(id);
    }
    healthy(&mut fe, &mut daemon, "floods");
}

#[test]
fn mapping_and_window_floods() {
    // Mappings: big buffers take one each (--max-mappings 3).
    let mut daemon = Daemon::spawn([
        "--heap",
        "a=memfd,max-size=32M",
        "--shm-size",
        "256M",
        "--max-mappings",
        "3",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    let mut held = Vec::new();
    for _ in 0..20 {
        match fe.alloc(0, 12 << 20) {
            Ok(b) => held.push(b.id),
            Err(s) => assert_eq!(s, S_WINDOW_FULL, "mapping cap"),
        }
    }
    assert_eq!(held.len(), 3);
    assert_eq!(fe.shm().live_mappings(), 3);
    assert_eq!(
        fe.alloc(0, 4096),
        Err(S_WINDOW_FULL),
        "an arena needs a mapping too"
    );
    for id in held.drain(..) {
        fe.free_ok(id);
    }
    healthy(&mut fe, &mut daemon, "mapping flood");
    drop(fe);
    // The window (16M): 12M fits once; then nothing of that size.
    let mut daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "16M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let big = fe.alloc_ok(0, 12 << 20);
    for _ in 0..10 {
        let r = fe.alloc(0, 12 << 20);
        assert!(matches!(r, Err(S_WINDOW_FULL) | Err(S_QUOTA)), "{r:?}");
    }
    fe.free_ok(big.id);
    healthy(&mut fe, &mut daemon, "window flood");
}

#[test]
fn malformed_flood_is_logged_at_a_limited_rate() {
    let mut daemon = small_daemon(&[]);
    let mut fe = FrontEnd::connect(&daemon);
    for i in 0..2000u32 {
        let c = fe.request(&req_hdr(1000 + i, 0).build(), 8);
        expect_error(&c, &[S_UNSUPP, S_INVAL], "flood");
    }
    healthy(&mut fe, &mut daemon, "malformed flood");
    let warnings = daemon
        .stderr()
        .lines()
        .filter(|l| l.contains("not supported"))
        .count();
    assert!(
        warnings < 200,
        "{warnings} warning lines for 2000 bad requests"
    );
}

#[test]
fn descriptors_outside_guest_memory_and_wrong_directions() {
    let mut daemon = small_daemon(&[]);
    let mut fe = FrontEnd::connect(&daemon);
    let alloc = alloc_req(0, 0, 4096);
    let cases: Vec<(&str, Vec<Seg>)> = vec![
        (
            "readable outside RAM",
            vec![
                Seg::RawR {
                    gpa: UNMAPPED_GPA,
                    len: 24,
                },
                Seg::W(32),
            ],
        ),
        (
            "readable at u64::MAX",
            vec![
                Seg::RawR {
                    gpa: u64::MAX - 7,
                    len: 24,
                },
                Seg::W(32),
            ],
        ),
        (
            "readable len u32::MAX",
            vec![
                Seg::RawR {
                    gpa: UNMAPPED_GPA,
                    len: u32::MAX,
                },
                Seg::W(32),
            ],
        ),
        ("only readable", vec![Seg::R(alloc.clone())]),
        ("only writable", vec![Seg::W(32)]),
        ("writable first", vec![Seg::W(32), Seg::R(alloc.clone())]),
        (
            "readable after writable",
            vec![
                Seg::R(alloc[..8].to_vec()),
                Seg::W(16),
                Seg::R(alloc[8..].to_vec()),
                Seg::W(16),
            ],
        ),
        ("zero-length segments", vec![Seg::R(vec![]), Seg::W(0)]),
        (
            "zero-length writable",
            vec![Seg::R(alloc.clone()), Seg::W(0)],
        ),
    ];
    for (what, segs) in cases {
        let c = fe.call(&segs);
        if c.used_len != 0 {
            let s = FrontEnd::status_of(&c, what);
            assert_ne!(s, S_OK, "{what}: accepted");
        }
        healthy(&mut fe, &mut daemon, what);
    }
    // Split over many descriptors on both sides is fine.
    let mut segs: Vec<Seg> = alloc.iter().map(|&b| Seg::R(vec![b])).collect();
    segs.extend((0..4).map(|_| Seg::W(8)));
    let c = fe.call(&segs);
    let b = parse_alloc(&c, "byte-split ALLOC").unwrap();
    fe.free_ok(b.id);
    healthy(&mut fe, &mut daemon, "byte-split");
}

/// Request bytes of a valid HEAP_INFO for heap 0.
fn heap_info_bytes() -> Vec<u8> {
    heap_info_req(0)
}

#[test]
fn raw_rings_loops_indirect_tables_and_bad_heads() {
    let mut daemon = small_daemon(&[]);
    let mut raw = Raw::connect(&daemon);
    assert_eq!(raw.heap_info_ok(), (72, S_OK));
    let req = heap_info_bytes();
    raw.write(DATA, &req);
    let r = Raw::gpa(DATA);
    let w = Raw::gpa(DATA + 0x100);
    let out = raw::BASE + raw::MEM; // first byte after guest RAM
    type Case = (&'static str, Vec<raw::Desc>);
    let cases: Vec<Case> = vec![
        (
            "writable outside RAM",
            vec![(r, 16, F_NEXT, 1), (UNMAPPED_GPA, 72, F_WRITE, 0)],
        ),
        (
            "writable straddling the end of RAM",
            vec![(r, 16, F_NEXT, 1), (out - 8, 72, F_WRITE, 0)],
        ),
        (
            "readable straddling the end of RAM",
            vec![(out - 8, 16, F_NEXT, 1), (w, 72, F_WRITE, 0)],
        ),
        (
            "writable wrapping u64",
            vec![(r, 16, F_NEXT, 1), (u64::MAX - 3, 72, F_WRITE, 0)],
        ),
        (
            "loop of two",
            vec![(r, 16, F_NEXT, 1), (w, 72, F_WRITE | F_NEXT, 0)],
        ),
        ("self loop", vec![(r, 16, F_NEXT, 0)]),
        (
            "next out of range",
            vec![(r, 16, F_NEXT, 1000), (w, 72, F_WRITE, 0)],
        ),
        (
            "indirect table outside RAM",
            vec![(UNMAPPED_GPA, 32, F_INDIRECT, 0)],
        ),
        (
            "indirect table of odd length",
            vec![(Raw::gpa(DATA + 0x1000), 17, F_INDIRECT, 0)],
        ),
        (
            "indirect table of length 0",
            vec![(Raw::gpa(DATA + 0x1000), 0, F_INDIRECT, 0)],
        ),
        (
            "indirect with NEXT",
            vec![
                (Raw::gpa(DATA + 0x1000), 32, F_INDIRECT | F_NEXT, 1),
                (w, 72, F_WRITE, 0),
            ],
        ),
        (
            "nested indirect",
            vec![(Raw::gpa(DATA + 0x2000), 16, F_INDIRECT, 0)],
        ),
        (
            "huge indirect table",
            vec![(Raw::gpa(DATA + 0x1000), 0xfff0, F_INDIRECT, 0)],
        ),
    ];
    // Indirect table at DATA+0x1000: a valid HEAP_INFO chain; at DATA+0x2000: an
    // indirect descriptor (nested, forbidden).
    raw.desc_at(DATA + 0x1000, 0, (r, 16, F_NEXT, 1));
    raw.desc_at(DATA + 0x1000, 1, (w, 72, F_WRITE, 0));
    raw.desc_at(
        DATA + 0x2000,
        0,
        (Raw::gpa(DATA + 0x1000), 32, F_INDIRECT, 0),
    );
    for (what, descs) in cases {
        raw.write(DATA + 0x100, &[0xa5; 72]);
        raw.descs(&descs);
        let used = raw.run(0);
        let status = u32::from_le_bytes(raw.read(DATA + 0x100, 4).try_into().unwrap());
        // virtio-queue follows an indirect descriptor that also has NEXT set (the spec
        // forbids drivers to send it; harmless).
        let lenient = matches!(what, "huge indirect table" | "indirect with NEXT");
        assert!(
            used == 0 || status != S_OK || lenient,
            "{what}: used {used}, status {status}"
        );
        daemon.assert_alive();
        assert_eq!(raw.heap_info_ok(), (72, S_OK), "queue after {what}");
    }
    // A valid indirect chain works.
    raw.descs(&[(Raw::gpa(DATA + 0x1000), 32, F_INDIRECT, 0)]);
    raw.write(DATA + 0x100, &[0xa5; 72]);
    assert_eq!(raw.run(0), 72, "valid indirect chain");
    assert_eq!(raw.read(DATA + 0x100, 4), S_OK.to_le_bytes());

    // A head index beyond the queue size: no used entry for it, the queue goes on.
    raw.publish(500);
    raw.kick();
    let _ = raw.next_used(Duration::from_millis(300));
    daemon.assert_alive();
    assert_eq!(raw.heap_info_ok(), (72, S_OK), "queue after a bad head");

    // The avail index jumping by more than the queue size: the guest wedges its own queue;
    // the daemon survives and serves the next front end.
    raw.set_avail_idx(raw.last_used.wrapping_add(1000));
    raw.kick();
    let _ = raw.next_used(Duration::from_millis(300));
    daemon.assert_alive();
    drop(raw);
    let mut fe = FrontEnd::connect(&daemon);
    healthy(&mut fe, &mut daemon, "avail index jump");
}

#[test]
fn get_config_with_any_offset_and_size() {
    let mut daemon = small_daemon(&[]);
    let config = FrontEnd::handshake(&daemon).config;
    let want = [
        MAGIC.to_le_bytes(),
        VERSION.to_le_bytes(),
        config.num_heaps.to_le_bytes(),
        config.max_buffers.to_le_bytes(),
    ]
    .concat();
    // Raw GET_CONFIG messages (request 24): body {offset, size, flags} + size payload bytes,
    // including sizes and offsets that overflow, and payloads that disagree with size.
    let offsets = [
        0u32,
        1,
        4,
        8,
        12,
        15,
        16,
        17,
        255,
        256,
        u32::MAX - 3,
        u32::MAX,
    ];
    let sizes = [0u32, 1, 4, 8, 16, 17, 256, 257, 0x1_0000, u32::MAX];
    let mut raw = Raw::connect(&daemon);
    let mut answered = 0;
    for off in offsets {
        for size in sizes {
            for payload in [size.min(512) as usize, 0] {
                let mut body = Vec::new();
                body.extend_from_slice(&off.to_le_bytes());
                body.extend_from_slice(&size.to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.resize(12 + payload, 0);
                let what = format!("GET_CONFIG({off:#x}, {size:#x}) with {payload} bytes");
                match raw.raw_message(24, &body, body.len() as u32, Duration::from_secs(2)) {
                    Some((req, _flags, b)) => {
                        answered += 1;
                        assert_eq!(req, 24, "{what}: reply type");
                        let got = &b[12.min(b.len())..];
                        // Either an empty payload (error) or exactly the bytes asked for.
                        if !got.is_empty() {
                            let (o, n) = (off as usize, got.len());
                            assert_eq!(n, size as usize, "{what}");
                            assert!(o + n <= CONFIG_SIZE, "{what}: {n} bytes");
                            assert_eq!(got, &want[o..o + n], "{what}");
                        }
                    }
                    None => {
                        // The daemon dropped the connection (invalid message): fine, as
                        // long as it serves the next one.
                        daemon.assert_alive();
                        drop(raw);
                        raw = Raw::connect(&daemon);
                    }
                }
            }
        }
    }
    eprintln!("{answered} GET_CONFIG messages answered");
    assert!(answered > 0);
    drop(raw);
    daemon.assert_alive();
    let mut fe = FrontEnd::connect(&daemon);
    healthy(&mut fe, &mut daemon, "get_config");
}

#[test]
fn refused_shmem_map_disconnect_mid_request_and_reconnect() {
    let mut daemon = small_daemon(&[]);
    let mut fe = FrontEnd::connect(&daemon);
    // SHMEM_MAP refused: IOERR, nothing held, then it works again.
    fe.refuse_maps(true);
    for len in [4096, 12 << 20] {
        assert_eq!(fe.alloc(0, len), Err(S_IOERR), "refused map, len {len:#x}");
    }
    assert_eq!(daemon.stats().total.buffers, 0);
    fe.refuse_maps(false);
    healthy(&mut fe, &mut daemon, "refused maps");

    // Disconnect with requests in flight, one of them stuck in SHMEM_MAP.
    let keep = fe.alloc_ok(0, 4096);
    fe.stall_maps(true);
    let mut heads = Vec::new();
    heads.push(fe.submit(&[Seg::R(alloc_req(0, 0, 12 << 20)), Seg::W(32)]));
    for _ in 0..20 {
        heads.push(fe.submit(&[Seg::R(heap_info_req(0)), Seg::W(72)]));
    }
    fe.kick();
    let start = std::time::Instant::now();
    while fe.stalled_maps() == 0 && start.elapsed() < DEADLINE {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fe.stalled_maps(), 1, "the big ALLOC waits in SHMEM_MAP");
    fe.crash();
    daemon.assert_alive();

    // Reconnect: a fresh device, old ids dead, everything released.
    let mut fe = FrontEnd::connect(&daemon);
    let st = daemon.wait_stats("zero after reconnect", |s| s.total.buffers == 0);
    assert_eq!((st.total.bytes, st.total.mappings), (0, 0), "{}", st.raw);
    assert_eq!(fe.free(keep.id), S_NO_BUFFER);
    healthy(&mut fe, &mut daemon, "disconnect mid-request");
    // And a few more front ends in a row, each leaving buffers behind.
    for i in 0..5 {
        fe.alloc_ok(0, 4096 << i);
        fe.alloc_ok(1, 65536);
        fe.disconnect();
        fe = FrontEnd::connect(&daemon);
        daemon.wait_stats("zero after reconnect", |s| s.total.buffers == 0);
    }
    healthy(&mut fe, &mut daemon, "reconnects");
}

#[test]
fn a_front_end_that_sends_garbage_messages_is_dropped_and_the_next_one_served() {
    let mut daemon = small_daemon(&[]);
    for (req, body, size) in [
        (0u32, vec![], 0u32),
        (9999, vec![0; 8], 8),
        (24, vec![0; 4], 0x1000_0000), // claims a huge body
        (5 /* SET_MEM_TABLE */, vec![0xff; 64], 64),
    ] {
        let mut raw = Raw::connect(&daemon);
        let _ = raw.raw_message(req, &body, size, Duration::from_millis(300));
        drop(raw);
        daemon.assert_alive();
        let mut fe = FrontEnd::connect(&daemon);
        healthy(&mut fe, &mut daemon, &format!("message {req}"));
    }
}
