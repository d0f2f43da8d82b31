//! A guest with 16 KiB pages (`VIRTIO_DMAHEAP_F_PAGE_SIZE`): the page size stated at
//! SESSION_OPEN aligns its session's buffers; other sessions keep 4 KiB buffers.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::*;

const K4: u64 = 4 << 10;
const K16: u64 = 16 << 10;

fn aligned(b: &Buffer, align: u64) {
    assert_eq!(b.offset % align, 0, "offset of {b:x?} not {align}-aligned");
    assert_eq!(
        b.len % align,
        0,
        "length of {b:x?} not a multiple of {align}"
    );
}

#[test]
fn a_16k_session_gets_16k_buffers_and_a_4k_session_after_it_4k_buffers() {
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_SESSION | F_BATCH | F_PAGE_SIZE);
    assert_ne!(
        fe.offered_features & F_PAGE_SIZE,
        0,
        "F_PAGE_SIZE not offered"
    );
    // The page-size shape is the only SESSION_OPEN once the feature is acked.
    assert_eq!(fe.open_session(0), Err(S_INVAL));
    let id = fe.open_session_paged(0, K16 as u32).unwrap();
    assert_eq!(fe.heap_info(0).unwrap().min_align, K16);

    let small = fe.alloc_ok(0, K4);
    aligned(&small, K16);
    assert_eq!(small.len, K16, "a 4 KiB request in a 16 KiB session");
    let odd = fe.alloc_ok(0, K16 + K4);
    aligned(&odd, K16);
    assert_eq!(odd.len, 2 * K16);
    let big = fe.alloc_ok(0, 4 << 20);
    aligned(&big, K16);
    let batch = fe.alloc_batch(0, 5, K4).unwrap();
    assert_eq!(batch.len(), 5);
    for b in &batch {
        aligned(b, K16);
        assert_eq!(b.len, K16);
    }
    // The whole rounded-up range is the buffer's: written and read back through the window.
    fe.write_buffer(&small, K16 - 8, b"16k-page");
    assert_eq!(fe.read_buffer(&small, K16 - 8, 8), b"16k-page");
    // Reservations are page-granular too.
    assert_eq!(fe.reserve(REQ_RESERVE, 60 << 20, K4), S_INVAL);
    assert_eq!(fe.reserve(REQ_RESERVE, 60 << 20, K16), S_OK);
    assert_eq!(fe.reserve(REQ_UNRESERVE, 60 << 20, K16), S_OK);

    // Suspend and resume: the page size must be stated again, unchanged.
    assert_eq!(fe.close_session(CLOSE_SUSPEND), S_OK);
    assert_eq!(fe.open_session_paged(id, K4 as u32), Err(S_INVAL));
    assert_eq!(fe.open_session_paged(id, K16 as u32), Ok(id));
    aligned(&fe.alloc_ok(0, K4), K16);

    // A new session of a 4 KiB-page driver on the same device: 4 KiB buffers again.
    fe.open_session_paged(0, K4 as u32).unwrap();
    assert_eq!(fe.heap_info(0).unwrap().min_align, K4);
    assert_eq!(fe.alloc_ok(0, K4).len, K4);
    assert!(fe
        .alloc_batch(0, 3, K4)
        .unwrap()
        .iter()
        .all(|b| b.len == K4));
    fe.disconnect();

    // And a driver that does not know the feature, on the next connection.
    let (mut fe, _) = FrontEnd::connect_session(&daemon);
    assert_eq!(fe.heap_info(0).unwrap().min_align, K4);
    assert_eq!(fe.alloc_ok(0, K4).len, K4);
}

#[test]
fn a_bad_page_size_is_refused() {
    let daemon = Daemon::spawn(["--heap", "a=memfd,align=64K", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect_acking(&daemon, F_SYNC | F_SESSION | F_PAGE_SIZE);
    for page in [0, 2048, 12288, 128 << 10] {
        assert_eq!(fe.open_session_paged(0, page), Err(S_INVAL), "{page}");
    }
    fe.open_session_paged(0, 16 << 10).unwrap();
    // A heap aligned beyond the page size keeps its alignment.
    assert_eq!(fe.heap_info(0).unwrap().min_align, 64 << 10);
    assert_eq!(fe.alloc_ok(0, K4).len, 64 << 10);
}
