//! Heap ranges over vhost-user (`VIRTIO_DMAHEAP_F_HEAP_RANGE`): the daemon offers the
//! feature, answers HEAP_INFO with the 88-byte response once it is acked (72 bytes
//! otherwise), and places each heap's buffers inside the range it states.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::*;

const M: u64 = 1 << 20;

fn mixed_daemon() -> Daemon {
    Daemon::spawn([
        "--shm-size",
        "64M",
        "--heap",
        "wc=memfd,cache=wc",
        "--heap",
        "system=memfd",
        "--heap",
        "uncached=memfd,cache=uncached",
    ])
}

#[test]
fn heap_info_states_the_ranges_and_buffers_stay_in_them() {
    let daemon = mixed_daemon();
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_BATCH | F_HEAP_RANGE);
    assert_ne!(
        fe.offered_features & F_HEAP_RANGE,
        0,
        "F_HEAP_RANGE not offered"
    );
    let infos: Vec<HeapInfo> = (0..3).map(|h| fe.heap_info(h).unwrap()).collect();
    // 64 MiB between three attributes: 20 MiB each, cached, uncached, wc from offset 0.
    let want = [(40 * M, 20 * M), (0, 20 * M), (20 * M, 20 * M)];
    for (i, want) in infos.iter().zip(want) {
        let (off, len) = i.range.unwrap();
        assert_eq!((off, len), want, "{}", i.name);
        assert_eq!(off % RANGE_ALIGN, 0);
        assert!(i.max_size <= len && i.capacity <= len, "{i:?}");
    }
    for (h, i) in infos.iter().enumerate() {
        let (off, len) = i.range.unwrap();
        let inside = |b: &Buffer| b.offset >= off && b.offset + b.len <= off + len;
        for size in [4096, 64 << 10, 12 * M] {
            let b = fe.alloc_ok(h as u32, size);
            assert!(inside(&b), "{}: {b:x?} outside {off:#x}+{len:#x}", i.name);
            fe.write_buffer(&b, 0, i.name.as_bytes());
            assert_eq!(
                fe.read_buffer(&b, 0, i.name.len() as u64),
                i.name.as_bytes()
            );
        }
        for b in fe.alloc_batch(h as u32, 4, 8192).unwrap() {
            assert!(inside(&b), "{}: batch {b:x?}", i.name);
        }
        // The range holds no second 12 MiB buffer next to the first and the arena.
        assert_eq!(fe.alloc(h as u32, 12 * M), Err(S_WINDOW_FULL), "{}", i.name);
    }
}

#[test]
fn without_the_feature_heap_info_is_the_72_byte_response() {
    let daemon = mixed_daemon();
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC);
    assert_ne!(fe.offered_features & F_HEAP_RANGE, 0);
    assert_eq!(fe.acked_features & F_HEAP_RANGE, 0);
    let c = fe.request(&heap_info_req(0), HEAP_INFO_RANGE_RESP_SIZE as u32);
    assert_eq!(c.used_len as usize, HEAP_INFO_RESP_SIZE);
    let i = fe.heap_info(0).unwrap();
    assert_eq!((i.name.as_str(), i.range), ("wc", None));
    // The placement does not depend on the feature: the wc heap stays in its range.
    let b = fe.alloc_ok(0, 4096);
    assert!(b.offset >= 40 * M, "{b:x?}");
    fe.disconnect();

    // Acked, a writable part of only 72 bytes is malformed.
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_HEAP_RANGE);
    let c = fe.request(&heap_info_req(0), HEAP_INFO_RESP_SIZE as u32);
    assert_eq!(c.used_len as usize, RESP_HDR_SIZE);
    assert_eq!(FrontEnd::status_of(&c, "short HEAP_INFO"), S_INVAL);
}

#[test]
fn one_cache_attribute_keeps_the_whole_window() {
    let daemon = Daemon::spawn([
        "--shm-size",
        "64M",
        "--heap",
        "a=memfd",
        "--heap",
        "b=memfd",
    ]);
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_HEAP_RANGE);
    for h in 0..2 {
        let i = fe.heap_info(h).unwrap();
        assert_eq!(i.range, Some((0, 64 * M)));
        assert_eq!((i.max_size, i.capacity), (64 * M, 64 * M));
    }
}

#[test]
fn a_window_too_small_for_the_cache_attributes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::daemon::daemon_bin())
        .arg("--socket-path")
        .arg(dir.path().join("s"))
        .args([
            "--shm-size",
            "4M",
            "--heap",
            "a=memfd",
            "--heap",
            "b=memfd,cache=wc",
        ])
        .args(["--heap", "c=memfd,cache=uncached"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(
        stderr.contains("4194304") && stderr.contains("8388608"),
        "the sizes are named: {stderr}"
    );
}
