//! The driver's page size (`VIRTIO_DMAHEAP_F_PAGE_SIZE`): every heap's alignment raised
//! to it for the session that stated it.

use super::*;

const PAGE_FEATURES: u64 = (1 << VIRTIO_DMAHEAP_F_SYNC)
    | (1 << VIRTIO_DMAHEAP_F_SESSION)
    | (1 << VIRTIO_DMAHEAP_F_BATCH)
    | (1 << VIRTIO_DMAHEAP_F_PAGE_SIZE);

const K16: u64 = 16 << 10;

/// SESSION_OPEN with a page size: (status, session id).
fn open(d: &mut Device, m: &mut FakeMapper, resume: u64, page: u32) -> (u32, u64) {
    let mut r = answer(
        d,
        &session_open_page_req(resume, page),
        SESSION_OPEN_RESP_SIZE,
        m,
    );
    r.resize(SESSION_OPEN_RESP_SIZE, 0);
    (status_of(&r), le64(&r, 8))
}

fn heap_info(d: &mut Device, m: &mut FakeMapper, heap: u32) -> HeapInfo {
    let r = answer(d, &heap_info_req(heap), HEAP_INFO_RESP_SIZE, m);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    parse::<HeapInfoResp>(&r).info
}

fn min_align(d: &mut Device, m: &mut FakeMapper, heap: u32) -> u64 {
    heap_info(d, m, heap).min_align.to_native()
}

fn max_size(d: &mut Device, m: &mut FakeMapper, heap: u32) -> u64 {
    heap_info(d, m, heap).max_size.to_native()
}

fn page_device() -> Device {
    let mut big = heap_params("big");
    big.min_align = 64 << 10;
    let mut odd = heap_params("odd");
    odd.max_size = (1 << 20) + 4096;
    let (mut d, _) = device_with(vec![heap_params("system"), big, odd], limits());
    d.set_acked_features(PAGE_FEATURES);
    d
}

#[test]
fn a_16k_session_gets_16k_aligned_buffers_and_heap_info_says_so() {
    let mut d = page_device();
    let mut m = FakeMapper::default();
    assert_eq!(open(&mut d, &mut m, 0, 16384).0, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(min_align(&mut d, &mut m, 0), K16);
    // A heap aligned beyond the page size keeps its own alignment.
    assert_eq!(min_align(&mut d, &mut m, 1), 64 << 10);
    for len in [4096, 8192, K16, K16 + 4096, 3 << 20] {
        let (st, _, off, got) = alloc(&mut d, &mut m, 0, len);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK, "len {len}");
        assert_eq!(off % K16, 0, "offset {off:#x} of len {len}");
        assert_eq!(got % K16, 0, "len {got} for {len}");
        assert!(got >= len && got < len + K16);
    }
    let (st, _, _, got) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!((st, got), (VIRTIO_DMAHEAP_S_OK, K16));
    let Reply::Answer(r) = d.handle(&alloc_batch_req(0, 4, 4096), ALLOC_BATCH_RESP_SIZE, &mut m)
    else {
        panic!("retry");
    };
    let r = parse::<AllocBatchResp>(&r);
    assert_eq!(r.count.to_native(), 4);
    for b in &r.buffers[..4] {
        assert_eq!(b.offset.to_native() % K16, 0);
        assert_eq!(b.len.to_native(), K16);
    }
}

#[test]
fn reservations_are_page_granular_in_a_16k_session() {
    let mut d = page_device();
    let mut m = FakeMapper::default();
    open(&mut d, &mut m, 0, 16384);
    let st = |d: &mut Device, m: &mut FakeMapper, ty, off, len| {
        status_of(&answer(d, &reserve_req(ty, off, len), 8, m))
    };
    let res = VIRTIO_DMAHEAP_REQ_RESERVE;
    assert_eq!(st(&mut d, &mut m, res, 4096, K16), VIRTIO_DMAHEAP_S_INVAL);
    assert_eq!(st(&mut d, &mut m, res, K16, 4096), VIRTIO_DMAHEAP_S_INVAL);
    assert_eq!(st(&mut d, &mut m, res, K16, K16), VIRTIO_DMAHEAP_S_OK);
    let unres = VIRTIO_DMAHEAP_REQ_UNRESERVE;
    assert_eq!(st(&mut d, &mut m, unres, K16, K16), VIRTIO_DMAHEAP_S_OK);
}

#[test]
fn a_bad_page_size_is_refused_and_changes_nothing() {
    let mut d = page_device();
    let mut m = FakeMapper::default();
    let (_, id) = open(&mut d, &mut m, 0, 16384);
    let (st, _, off, _) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
    for page in [0, 2048, 4095, 12288, 128 << 10, u32::MAX] {
        assert_eq!(
            open(&mut d, &mut m, 0, page).0,
            VIRTIO_DMAHEAP_S_INVAL,
            "{page}"
        );
    }
    let mut r = session_open_page_req(0, 4096);
    r[20] = 1;
    assert_eq!(
        status_of(&answer(&mut d, &r, SESSION_OPEN_RESP_SIZE, &mut m)),
        VIRTIO_DMAHEAP_S_INVAL
    );
    // The session, its page size and its buffer are still there.
    assert_eq!(d.session(), SessionState::Open(id));
    assert_eq!(d.page_size(), K16);
    assert!(m.covers(off, K16));
}

#[test]
fn a_resumed_session_keeps_its_page_size_and_a_new_one_states_its_own() {
    let mut d = page_device();
    let mut m = FakeMapper::default();
    let (_, id) = open(&mut d, &mut m, 0, 16384);
    let (_, _, off, _) = alloc(&mut d, &mut m, 0, 4096);
    let close = session_close_req(VIRTIO_DMAHEAP_CLOSE_SUSPEND);
    assert_eq!(
        status_of(&answer(&mut d, &close, 8, &mut m)),
        VIRTIO_DMAHEAP_S_OK
    );
    // Suspended: HEAP_INFO still describes the session's alignment.
    assert_eq!(min_align(&mut d, &mut m, 0), K16);
    assert_eq!(open(&mut d, &mut m, id, 4096).0, VIRTIO_DMAHEAP_S_INVAL);
    assert_eq!(d.session(), SessionState::Suspended(id));
    assert_eq!(open(&mut d, &mut m, id, 16384), (VIRTIO_DMAHEAP_S_OK, id));
    assert!(m.covers(off, K16));
    let (_, _, off, got) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!((off % K16, got), (0, K16));
    // A new session with 4 KiB pages gets 4 KiB buffers again.
    let (st, id2) = open(&mut d, &mut m, 0, 4096);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
    assert_ne!(id2, id);
    assert_eq!(min_align(&mut d, &mut m, 0), 4096);
    let (_, _, _, got) = alloc(&mut d, &mut m, 0, 4096);
    assert_eq!(got, 4096);
    // Closed: no session page size any more.
    let close = session_close_req(0);
    assert_eq!(
        status_of(&answer(&mut d, &close, 8, &mut m)),
        VIRTIO_DMAHEAP_S_OK
    );
    assert_eq!(d.page_size(), 4096);
}

#[test]
fn without_the_feature_the_page_size_is_4k_and_the_short_request_is_used() {
    let (mut d, _) = device();
    d.set_acked_features(1 << VIRTIO_DMAHEAP_F_SESSION);
    let mut m = FakeMapper::default();
    let r = answer(&mut d, &session_open_req(0), SESSION_OPEN_RESP_SIZE, &mut m);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(d.page_size(), 4096);
    assert_eq!(alloc(&mut d, &mut m, 0, 4096).3, 4096);
    assert!(d.device_features() & (1 << VIRTIO_DMAHEAP_F_PAGE_SIZE) != 0);
}

/// A heap limit between two guest pages is stated rounded down to a page: every length
/// the driver may then ask for (page-rounded) is allowed.
#[test]
fn max_size_is_rounded_down_to_the_session_page() {
    let mut d = page_device();
    let mut m = FakeMapper::default();
    assert_eq!(max_size(&mut d, &mut m, 2), (1 << 20) + 4096);
    assert_eq!(open(&mut d, &mut m, 0, 16384).0, VIRTIO_DMAHEAP_S_OK);
    let stated = max_size(&mut d, &mut m, 2);
    assert_eq!(stated, 1 << 20);
    let (st, _, _, got) = alloc(&mut d, &mut m, 2, stated);
    assert_eq!((st, got), (VIRTIO_DMAHEAP_S_OK, stated));
    let (st, ..) = alloc(&mut d, &mut m, 2, stated + K16);
    assert_eq!(st, VIRTIO_DMAHEAP_S_TOO_BIG);
}
