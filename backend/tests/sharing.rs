//! Cross-device sharing by UUID (issue 13) with the real daemon: ASSIGN_UUID, the export
//! socket and the front end's shared-object table resolving to exactly the buffer,
//! withdrawal at FREE, reset and disconnect, retained buffers, and hostile floods.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dmaheap_testkit as common;

use common::frontend::ShmEvent;
use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Arenas of 2 MiB: buffers above 256 KiB get a host allocation of their own.
const HEAP: &str = "system=memfd,arena-size=2M";

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 13 + i / 253) as u8))
        .collect()
}

struct Setup {
    daemon: Daemon,
    fe: FrontEnd,
    export: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export.sock");
    let mut args = vec![
        "--heap".to_owned(),
        HEAP.to_owned(),
        "--shm-size".to_owned(),
        "256M".to_owned(),
        "--export-socket".to_owned(),
        export.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = Daemon::spawn(args);
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_UUID | F_SESSION);
    fe.open_session(0).unwrap();
    Setup {
        daemon,
        fe,
        export,
        _dir: dir,
    }
}

fn open_session(fe: &mut FrontEnd) -> u64 {
    fe.open_session(0).unwrap()
}

fn size_of(f: &File) -> u64 {
    let mut f = f.try_clone().unwrap();
    f.seek(SeekFrom::End(0)).unwrap()
}

fn is_v4(u: &[u8; 16]) -> bool {
    u[6] >> 4 == 4 && u[8] & 0xc0 == 0x80
}

/// The file maps exactly the buffer: same size, and bytes written on either side show on
/// the other, at both ends.
fn check_same_memory(fe: &FrontEnd, b: &Buffer, f: &File) {
    assert_eq!(size_of(f), b.len, "the export's size is not the buffer's");
    let head = pattern(3, 4096);
    let tail = pattern(5, 4096);
    fe.write_buffer(b, 0, &head);
    fe.write_buffer(b, b.len - 4096, &tail);
    let mut got = vec![0u8; 4096];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(got, head, "importer does not see the guest's first page");
    f.read_exact_at(&mut got, b.len - 4096).unwrap();
    assert_eq!(got, tail, "importer does not see the guest's last page");
    let back = pattern(7, 8192);
    f.write_all_at(&back, b.len / 2).unwrap();
    assert_eq!(
        fe.read_buffer(b, b.len / 2, 8192),
        back,
        "the guest does not see what the importer wrote"
    );
    let mut past = [0u8; 1];
    assert_eq!(
        f.read_at(&mut past, b.len).unwrap(),
        0,
        "the export reaches past the buffer"
    );
}

#[test]
fn uuids_are_stable_distinct_random_and_resolve_to_exactly_the_buffer() {
    let mut s = setup(&[]);
    assert_ne!(s.fe.offered_features & F_UUID, 0, "F_UUID not offered");
    let mut seen = BTreeSet::new();
    let mut bufs = Vec::new();
    for len in [512 * KIB, MIB, 4 * MIB, 16 * MIB] {
        let b = s.fe.alloc_ok(0, len);
        let u = s.fe.assign_uuid(b.id).unwrap();
        assert!(is_v4(&u), "not an RFC 4122 v4 UUID: {u:02x?}");
        for _ in 0..5 {
            assert_eq!(s.fe.assign_uuid(b.id).unwrap(), u, "UUID changed");
        }
        assert!(seen.insert(u), "UUID {u:02x?} given twice");
        bufs.push((b, u));
    }
    // Not derived from the ids: consecutive buffers share no long common prefix.
    let v: Vec<_> = seen.iter().collect();
    for w in v.windows(2) {
        let common = w[0]
            .iter()
            .zip(w[1].iter())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(
            common < 4,
            "UUIDs look sequential: {:02x?} {:02x?}",
            w[0],
            w[1]
        );
    }
    let mut client = ExportClient::connect(&s.export);
    for (b, u) in &bufs {
        let (f, len) = client.resolve(u).unwrap();
        assert_eq!(len, b.len);
        check_same_memory(&s.fe, b, &f);
    }
    let st = s.daemon.stats();
    assert_eq!(st.total.exported, 4, "{}", st.raw);
    // Unknown UUIDs resolve to nothing.
    for i in 0..64u8 {
        let mut u = [i; 16];
        u[6] = 0x40 | (i & 0xf);
        assert_eq!(client.resolve(&u).unwrap_err(), libc::ENOENT as u32);
    }
    s.fe.assert_no_violations();
}

#[test]
fn small_arena_buffer_without_udmabuf_is_unsupp_and_still_works() {
    if std::path::Path::new("/dev/udmabuf").exists() {
        eprintln!("skipped: this host has /dev/udmabuf (ranges are exported)");
        return;
    }
    let mut s = setup(&[]);
    let b = s.fe.alloc_ok(0, 64 * KIB);
    assert_eq!(s.fe.assign_uuid(b.id), Err(S_UNSUPP));
    let data = pattern(9, 4096);
    s.fe.write_buffer(&b, 0, &data);
    assert_eq!(s.daemon.peek(b.id, 0, 4096), data);
    s.fe.free_ok(b.id);
    assert_eq!(s.daemon.stats().total.exported, 0);
}

#[test]
fn no_uuid_option_hides_the_feature() {
    let daemon = Daemon::spawn(["--heap", HEAP, "--no-uuid"]);
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_UUID);
    assert_eq!(
        fe.offered_features & F_UUID,
        0,
        "F_UUID offered with --no-uuid"
    );
    let b = fe.alloc_ok(0, MIB);
    assert_eq!(fe.assign_uuid(b.id), Err(S_UNSUPP));
}

#[test]
fn unknown_and_freed_ids_are_no_buffer() {
    let mut s = setup(&[]);
    assert_eq!(s.fe.assign_uuid(0), Err(S_NO_BUFFER));
    assert_eq!(s.fe.assign_uuid(u64::MAX), Err(S_NO_BUFFER));
    let b = s.fe.alloc_ok(0, MIB);
    s.fe.free_ok(b.id);
    for _ in 0..100 {
        assert_eq!(s.fe.assign_uuid(b.id), Err(S_NO_BUFFER));
    }
    assert_eq!(s.daemon.stats().total.exported, 0);
}

#[test]
fn freed_buffer_is_withdrawn_and_an_importer_keeps_bytes_and_charge() {
    let mut s = setup(&[]);
    let b = s.fe.alloc_ok(0, MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    let mut client = ExportClient::connect(&s.export);
    let (held, _) = client.resolve(&u).unwrap();
    let data = pattern(11, 8192);
    s.fe.write_buffer(&b, 4096, &data);
    s.fe.free_ok(b.id);
    assert_eq!(client.resolve(&u).unwrap_err(), libc::ENOENT as u32);
    let st = s.daemon.stats();
    eprintln!("after FREE with the importer holding the file: {}", st.raw);
    assert_eq!((st.total.exported, st.total.retained_buffers), (0, 1));
    assert_eq!(st.total.retained_bytes, MIB);
    assert_eq!((st.total.buffers, st.total.bytes), (1, MIB), "not charged");
    let mut got = vec![0u8; 8192];
    held.read_exact_at(&mut got, 4096).unwrap();
    assert_eq!(got, data, "the importer lost the bytes");
    // The importer still writes into memory nobody else has.
    held.write_all_at(b"still mine", 0).unwrap();
    // New buffers never get the retained memory: fill the heap's window a little and
    // check none of them shows the importer's bytes.
    for _ in 0..8 {
        let n = s.fe.alloc_ok(0, MIB);
        assert!(s.fe.read_buffer(&n, 0, 10).iter().all(|&x| x == 0));
        s.fe.free_ok(n.id);
    }
    drop(held);
    let st = s.daemon.wait_stats("the retained buffer released", |st| {
        st.total.retained_buffers == 0
    });
    assert_eq!((st.total.buffers, st.total.bytes), (0, 0), "{}", st.raw);
    s.fe.assert_no_violations();
}

#[test]
fn reset_and_disconnect_withdraw() {
    let mut s = setup(&["--shared-object-table"]);
    open_session(&mut s.fe);
    let b = s.fe.alloc_ok(0, MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    assert!(s.fe.shared_objects().contains(&u));
    let mut client = ExportClient::connect(&s.export);
    assert!(client.resolve(&u).is_ok());
    // The driver's reset: a new session ends the old one.
    open_session(&mut s.fe);
    assert!(s.fe.shared_objects().is_empty(), "not withdrawn at reset");
    assert_eq!(client.resolve(&u).unwrap_err(), libc::ENOENT as u32);
    assert!(s.fe.get_shared_object(&u).is_none());
    // The operator's prepare-reset.
    let b = s.fe.alloc_ok(0, MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    let reply = s.daemon.control("prepare-reset");
    assert!(reply.contains("released"), "{reply}");
    assert!(s.fe.shared_objects().is_empty());
    assert_eq!(client.resolve(&u).unwrap_err(), libc::ENOENT as u32);
    s.fe.assert_no_violations();
}

#[test]
fn disconnect_withdraws_every_uuid() {
    let mut s = setup(&[]);
    let b = s.fe.alloc_ok(0, MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    let mut client = ExportClient::connect(&s.export);
    let (held, _) = client.resolve(&u).unwrap();
    s.fe.free_ok(b.id);
    let b2 = s.fe.alloc_ok(0, MIB);
    let u2 = s.fe.assign_uuid(b2.id).unwrap();
    let Setup {
        daemon, fe, export, ..
    } = s;
    fe.disconnect();
    daemon.wait_stats("everything dropped at the disconnect", |st| {
        st.total.buffers == 0 && st.total.retained_buffers == 0
    });
    let mut client = ExportClient::connect(&export);
    assert_eq!(client.resolve(&u2).unwrap_err(), libc::ENOENT as u32);
    assert_eq!(client.resolve(&u).unwrap_err(), libc::ENOENT as u32);
    // The importer's memory outlives the connection.
    held.write_all_at(b"alive", 0).unwrap();
}

#[test]
fn front_end_table_add_before_answer_lookup_and_remove_at_free() {
    let mut s = setup(&["--shared-object-table"]);
    assert!(s.fe.has_shared_objects(), "SHARED_OBJECT not offered");
    let b = s.fe.alloc_ok(0, 4 * MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    // Registered before the answer: the answer came after the ADD's acknowledgement.
    assert_eq!(s.fe.shared_objects(), BTreeSet::from([u]));
    let f =
        s.fe.get_shared_object(&u)
            .expect("GET_SHARED_OBJECT gave no fd");
    check_same_memory(&s.fe, &b, &f);
    // Unknown UUIDs: the reply carries no fd.
    for i in 1..32u8 {
        assert!(s.fe.get_shared_object(&[i; 16]).is_none());
    }
    assert_eq!(s.fe.assign_uuid(b.id).unwrap(), u);
    let adds =
        s.fe.shm()
            .events
            .iter()
            .filter(|e| matches!(e, ShmEvent::SharedAdd { .. }))
            .count();
    assert_eq!(adds, 1, "a second ADD for the same buffer");
    drop(f);
    s.fe.free_ok(b.id);
    assert!(s.fe.shared_objects().is_empty(), "no REMOVE at FREE");
    assert!(s.fe.shm().events.contains(&ShmEvent::SharedRemove {
        uuid: u,
        accepted: true
    }));
    assert!(s.fe.get_shared_object(&u).is_none());
    s.fe.assert_no_violations();
}

#[test]
fn without_the_option_nothing_is_registered_with_the_front_end() {
    let mut s = setup(&[]);
    assert!(
        !s.fe.has_shared_objects(),
        "SHARED_OBJECT offered by default"
    );
    let b = s.fe.alloc_ok(0, MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    assert!(s.fe.shared_objects().is_empty());
    assert!(ExportClient::connect(&s.export).resolve(&u).is_ok());
    s.fe.free_ok(b.id);
    s.fe.assert_no_violations();
}

#[test]
fn refused_add_is_ioerr_and_leaves_nothing() {
    let mut s = setup(&["--shared-object-table"]);
    let b = s.fe.alloc_ok(0, MIB);
    s.fe.shm().refuse_shared_adds = true;
    assert_eq!(s.fe.assign_uuid(b.id), Err(S_IOERR));
    s.fe.shm().refuse_shared_adds = false;
    assert_eq!(s.daemon.stats().total.exported, 0);
    let u = s.fe.assign_uuid(b.id).unwrap();
    assert_eq!(s.fe.shared_objects(), BTreeSet::from([u]));
}

/// ASSIGN_UUID floods: one buffer asked many times costs one export; every buffer up to
/// the cap can be shared; retained buffers count against the cap.
#[test]
fn assign_uuid_floods_are_bounded() {
    let mut s = setup(&["--shared-object-table", "--max-buffers", "48"]);
    let b = s.fe.alloc_ok(0, MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    let start = Instant::now();
    for _ in 0..2000 {
        assert_eq!(s.fe.assign_uuid(b.id).unwrap(), u);
    }
    eprintln!("2000 repeated ASSIGN_UUIDs in {:?}", start.elapsed());
    assert_eq!(s.fe.shared_objects().len(), 1);
    let mut bufs = vec![b];
    while let Ok(n) = s.fe.alloc(0, 512 * KIB) {
        bufs.push(n);
    }
    assert_eq!(bufs.len(), 48, "the buffer cap");
    let mut client = ExportClient::connect(&s.export);
    let mut held = Vec::new();
    for b in &bufs {
        let u = s.fe.assign_uuid(b.id).unwrap();
        held.push(client.resolve(&u).unwrap().0);
    }
    assert_eq!(s.fe.shared_objects().len(), 48);
    assert_eq!(s.daemon.stats().total.exported, 48);
    for b in &bufs {
        s.fe.free_ok(b.id);
    }
    // All retained: the guest cannot allocate anything until the importer lets go.
    let st = s.daemon.stats();
    assert_eq!(st.total.retained_buffers, 48, "{}", st.raw);
    assert_eq!(s.fe.alloc(0, 4096), Err(S_QUOTA));
    assert!(s.fe.shared_objects().is_empty());
    held.truncate(40);
    s.daemon
        .wait_stats("8 released", |st| st.total.retained_buffers == 40);
    for _ in 0..8 {
        s.fe.alloc_ok(0, 4096);
    }
    assert_eq!(s.fe.alloc(0, 4096), Err(S_QUOTA));
    s.fe.assert_no_violations();
}

/// Lookups on the front end's channel and on the export socket, in another thread, while
/// the guest frees the buffers: every lookup either maps the whole buffer or gets nothing,
/// and nothing hangs.
#[test]
fn lookups_racing_with_free() {
    let mut s = setup(&["--shared-object-table"]);
    let mut uuids = Vec::new();
    let mut bufs = Vec::new();
    for _ in 0..16 {
        let b = s.fe.alloc_ok(0, 512 * KIB);
        uuids.push(s.fe.assign_uuid(b.id).unwrap());
        bufs.push(b);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let export = s.export.clone();
    let (u2, stop2) = (uuids.clone(), stop.clone());
    let socket_side = std::thread::spawn(move || {
        let mut client = ExportClient::connect(&export);
        let (mut ok, mut gone) = (0u64, 0u64);
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            for u in &u2 {
                match client.resolve(u) {
                    Ok((f, len)) => {
                        assert_eq!(size_of(&f), len);
                        ok += 1;
                    }
                    Err(e) => {
                        assert_eq!(e, libc::ENOENT as u32);
                        gone += 1;
                    }
                }
            }
        }
        (ok, gone)
    });
    let mut heads = Vec::new();
    for b in &bufs {
        heads.push(s.fe.submit(&[Seg::R(free_req(b.id)), Seg::W(RESP_HDR_SIZE as u32)]));
        s.fe.kick();
        for u in &uuids {
            if let Some(f) = s.fe.get_shared_object(u) {
                assert_eq!(size_of(&f), 512 * KIB);
            }
        }
    }
    for h in heads {
        let c = s.fe.wait(h);
        assert_eq!(FrontEnd::status_of(&c, "FREE"), S_OK);
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, gone) = socket_side.join().unwrap();
    eprintln!("export socket during the FREEs: {ok} resolved, {gone} withdrawn");
    for u in &uuids {
        assert!(s.fe.get_shared_object(u).is_none());
    }
    assert!(s.fe.shared_objects().is_empty());
    s.daemon
        .wait_stats("all released", |st| st.total.buffers == 0);
    s.fe.assert_no_violations();
}

/// The whole path under the syscall filter and the Landlock ruleset: export, resolve, free
/// while held, release.
#[test]
fn sharing_works_under_seccomp() {
    let mut s = setup(&["--seccomp", "on", "--shared-object-table"]);
    let b = s.fe.alloc_ok(0, 2 * MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    let (f, _) = ExportClient::connect(&s.export).resolve(&u).unwrap();
    check_same_memory(&s.fe, &b, &f);
    let g = s.fe.get_shared_object(&u).unwrap();
    s.fe.free_ok(b.id);
    drop(g);
    assert_eq!(s.daemon.stats().total.retained_buffers, 1);
    drop(f);
    s.daemon
        .wait_stats("released", |st| st.total.retained_buffers == 0);
    s.daemon.assert_alive();
    // Released through the memfd reopen, which Landlock (where the kernel has it) confines.
    let err = s.daemon.stderr();
    assert!(
        err.contains("Landlock ruleset enforced") || err.contains("the kernel has no Landlock"),
        "{err}"
    );
}

/// GET_SHARED_OBJECT and the export socket answer while the vring worker holds the device
/// waiting for the front end to acknowledge a SHMEM_MAP (QEMU sends GET_SHARED_OBJECT
/// with its main loop blocked: a handler that took the device lock would deadlock).
#[test]
fn lookups_answer_while_the_worker_waits_for_the_front_end() {
    let mut s = setup(&["--shared-object-table"]);
    let b = s.fe.alloc_ok(0, MIB);
    let u = s.fe.assign_uuid(b.id).unwrap();
    s.fe.stall_maps(true);
    let head = s.fe.submit(&[
        Seg::R(alloc_req(0, 0, 32 * MIB)),
        Seg::W(ALLOC_RESP_SIZE as u32),
    ]);
    s.fe.kick();
    let start = Instant::now();
    while s.fe.stalled_maps() == 0 {
        assert!(start.elapsed() < DEADLINE, "the ALLOC never sent SHMEM_MAP");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let f =
        s.fe.get_shared_object(&u)
            .expect("GET_SHARED_OBJECT while busy");
    let (g, len) = ExportClient::connect(&s.export).resolve(&u).unwrap();
    let took = t0.elapsed();
    eprintln!("two lookups while a SHMEM_MAP is pending: {took:?}");
    assert!(took < Duration::from_secs(2), "lookups took {took:?}");
    assert_eq!((size_of(&f), size_of(&g), len), (MIB, MIB, MIB));
    s.fe.stall_maps(false);
    parse_alloc(&s.fe.wait(head), "the stalled ALLOC").unwrap();
    s.fe.assert_no_violations();
}
