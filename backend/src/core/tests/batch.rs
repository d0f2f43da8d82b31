//! ALLOC_BATCH, what SYNC reaches, and heaps that need no SYNC.

use std::sync::atomic::Ordering;

use super::*;
use crate::host::MemfdProvider;
use crate::wire::BATCH_MAX;

const ALL_FEATURES: u64 = (1 << VIRTIO_DMAHEAP_F_SYNC)
    | (1 << VIRTIO_DMAHEAP_F_SESSION)
    | (1 << VIRTIO_DMAHEAP_F_NO_SYNC)
    | (1 << VIRTIO_DMAHEAP_F_BATCH);

/// A device with `features` acked and an open session (when sessions are acked).
fn acked(mut d: Device, features: u64, m: &mut FakeMapper) -> Device {
    d.set_acked_features(features);
    if features & (1 << VIRTIO_DMAHEAP_F_SESSION) != 0 {
        let r = answer(&mut d, &session_open_req(0), SESSION_OPEN_RESP_SIZE, m);
        assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    }
    d
}

/// ALLOC_BATCH through [`Device::handle`]: (status, buffers as (id, offset, len)).
fn batch(
    d: &mut Device,
    m: &mut FakeMapper,
    heap: u32,
    count: u32,
    len: u64,
) -> (u32, Vec<(u64, u64, u64)>) {
    let mut r = answer(
        d,
        &alloc_batch_req(heap, count, len),
        ALLOC_BATCH_RESP_SIZE,
        m,
    );
    r.resize(ALLOC_BATCH_RESP_SIZE, 0);
    let resp = parse::<AllocBatchResp>(&r);
    let n = resp.count.to_native() as usize;
    assert!(n <= BATCH_MAX, "count {n}");
    for unused in &resp.buffers[n..] {
        assert_eq!(
            *unused,
            BatchBuffer::default(),
            "entries past count must be 0"
        );
    }
    assert_eq!(resp.reserved.to_native(), 0);
    let bufs = resp.buffers[..n]
        .iter()
        .map(|b| {
            (
                b.buffer_id.to_native(),
                b.offset.to_native(),
                b.len.to_native(),
            )
        })
        .collect();
    (resp.hdr.status.to_native(), bufs)
}

#[test]
fn a_batch_is_count_distinct_zeroed_buffers() {
    let (d, _) = device();
    let mut m = FakeMapper::default();
    let mut d = acked(d, ALL_FEATURES, &mut m);
    // Written and freed first, so that the batch reuses dirty ranges.
    let (_, old, _, _) = alloc(&mut d, &mut m, 0, 4096);
    d.poke(old, 0, &[0xaa; 64]).unwrap();
    let r = answer(&mut d, &free_req(old), RESP_HDR_SIZE, &mut m);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);

    let (st, bufs) = batch(&mut d, &mut m, 0, 16, 8192);
    assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
    assert_eq!(bufs.len(), 16);
    let mut ranges: Vec<(u64, u64)> = bufs.iter().map(|&(_, o, l)| (o, l)).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlap: {w:?}");
    }
    let mut ids: Vec<u64> = bufs.iter().map(|b| b.0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 16);
    assert!(!ids.contains(&old) && !ids.contains(&0));
    for &(id, _, len) in &bufs {
        assert_eq!(len, 8192);
        assert!(
            d.peek(id, 0, 8192).unwrap().iter().all(|&b| b == 0),
            "buffer {id} not zeroed"
        );
    }
    assert_eq!(d.stats().total.buffers, 16);
    // Each is an ordinary buffer.
    for &(id, _, _) in &bufs {
        let r = answer(&mut d, &free_req(id), RESP_HDR_SIZE, &mut m);
        assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    }
    assert_eq!(d.stats().total.buffers, 0);
}

#[test]
fn a_batch_stops_at_the_quota_and_fails_only_if_nothing_fits() {
    let mut p = heap_params("small");
    p.max_bytes = Some(5 * 4096);
    let (d, _) = device_with(vec![p], limits());
    let mut m = FakeMapper::default();
    let mut d = acked(d, ALL_FEATURES, &mut m);
    let (st, bufs) = batch(&mut d, &mut m, 0, 16, 4096);
    assert_eq!((st, bufs.len()), (VIRTIO_DMAHEAP_S_OK, 5));
    let (st, bufs) = batch(&mut d, &mut m, 0, 2, 4096);
    assert_eq!((st, bufs.len()), (VIRTIO_DMAHEAP_S_QUOTA, 0));
    assert_eq!(d.stats().total.buffers, 5);
}

#[test]
fn bad_batches_are_refused() {
    let (d, _) = device();
    let mut m = FakeMapper::default();
    let mut d = acked(d, ALL_FEATURES, &mut m);
    for count in [0, 17, u32::MAX] {
        assert_eq!(
            batch(&mut d, &mut m, 0, count, 4096).0,
            VIRTIO_DMAHEAP_S_INVAL
        );
    }
    assert_eq!(batch(&mut d, &mut m, 0, 2, 4095).0, VIRTIO_DMAHEAP_S_INVAL);
    assert_eq!(
        batch(&mut d, &mut m, 0, 2, 128 << 20).0,
        VIRTIO_DMAHEAP_S_TOO_BIG
    );
    assert_eq!(
        batch(&mut d, &mut m, 9, 2, 4096).0,
        VIRTIO_DMAHEAP_S_NO_HEAP
    );
    // Too small a writable part: malformed.
    let r = answer(
        &mut d,
        &alloc_batch_req(0, 1, 4096),
        ALLOC_BATCH_RESP_SIZE - 1,
        &mut m,
    );
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_INVAL);
    // Not negotiated: unsupported.
    let mut d = acked(d, ALL_FEATURES & !(1 << VIRTIO_DMAHEAP_F_BATCH), &mut m);
    let r = answer(
        &mut d,
        &alloc_batch_req(0, 1, 4096),
        ALLOC_BATCH_RESP_SIZE,
        &mut m,
    );
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_UNSUPP);
    assert_eq!(d.stats().total.buffers, 0);
}

#[test]
fn sync_reaches_only_buffers_with_a_host_buffer_of_their_own() {
    let (d, faults) = device();
    let mut m = FakeMapper::default();
    let mut d = acked(d, ALL_FEATURES, &mut m);
    let (_, small, _, _) = alloc(&mut d, &mut m, 0, 4096);
    let (_, big, _, _) = alloc(&mut d, &mut m, 0, 16 << 20);
    let sync = |d: &mut Device, m: &mut FakeMapper, id| {
        status_of(&answer(
            d,
            &sync_req(id, VIRTIO_DMAHEAP_SYNC_READ),
            RESP_HDR_SIZE,
            m,
        ))
    };
    assert_eq!(sync(&mut d, &mut m, small), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(
        faults.syncs.load(Ordering::SeqCst),
        0,
        "an arena was synced"
    );
    assert_eq!(sync(&mut d, &mut m, big), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(faults.syncs.load(Ordering::SeqCst), 1);
    // Zeroing a freed small range syncs nothing either.
    let r = answer(&mut d, &free_req(small), RESP_HDR_SIZE, &mut m);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(faults.syncs.load(Ordering::SeqCst), 1);
}

#[test]
fn heaps_without_host_sync_say_so_when_negotiated() {
    let heaps = vec![
        Heap {
            provider: Box::new(FakeProvider::new("dmabuf", Arc::new(Faults::default()))),
            params: heap_params("dmabuf"),
        },
        Heap {
            provider: Box::new(MemfdProvider::new("plain")),
            params: heap_params("plain"),
        },
    ];
    let flags = |d: &mut Device, m: &mut FakeMapper, id| {
        let r = answer(d, &heap_info_req(id), HEAP_INFO_RESP_SIZE, m);
        parse::<HeapInfoResp>(&r).info.flags.to_native()
    };
    let mut m = FakeMapper::default();
    let d = Device::new(heaps, limits(), Arc::new(AtomicU64::new(1)));
    let mut d = acked(d, ALL_FEATURES, &mut m);
    assert_eq!(flags(&mut d, &mut m, 0), 0);
    assert_eq!(flags(&mut d, &mut m, 1), VIRTIO_DMAHEAP_HEAP_F_NO_SYNC);
    let mut d = acked(d, ALL_FEATURES & !(1 << VIRTIO_DMAHEAP_F_NO_SYNC), &mut m);
    assert_eq!(flags(&mut d, &mut m, 1), 0);
}
