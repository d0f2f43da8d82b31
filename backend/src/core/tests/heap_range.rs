//! Heap ranges (`VIRTIO_DMAHEAP_F_HEAP_RANGE`): heaps of different cache attributes get
//! disjoint, 2 MiB-aligned parts of the window, HEAP_INFO states them, and every mapping of
//! a heap (arenas, own mappings, spares) lies inside its heap's range.

use super::*;

const RANGE_FEATURES: u64 = (1 << VIRTIO_DMAHEAP_F_SYNC)
    | (1 << VIRTIO_DMAHEAP_F_BATCH)
    | (1 << VIRTIO_DMAHEAP_F_HEAP_RANGE);
const SESSION_FEATURES: u64 = RANGE_FEATURES | (1 << VIRTIO_DMAHEAP_F_SESSION);

const M: u64 = 1 << 20;

fn heap(name: &str, cache: CacheMode) -> HeapParams {
    HeapParams {
        cache,
        ..heap_params(name)
    }
}

/// Two cached heaps, one write-combined, one uncached, over the 1 GiB test window.
fn mixed_device() -> Device {
    let heaps = vec![
        heap("wc", CacheMode::WriteCombined),
        heap("system", CacheMode::Cached),
        heap("uncached", CacheMode::Uncached),
        heap("system2", CacheMode::Cached),
    ];
    let (mut d, _) = device_with(heaps, limits());
    d.set_acked_features(RANGE_FEATURES);
    d
}

fn mapper(window: u64) -> FakeMapper {
    FakeMapper {
        window: Some(window),
        ..Default::default()
    }
}

/// HEAP_INFO with the feature: the info and the range.
fn info(d: &mut Device, m: &mut FakeMapper, heap: u32) -> (HeapInfo, HeapRange) {
    let r = answer(d, &heap_info_req(heap), HEAP_INFO_RANGE_RESP_SIZE, m);
    assert_eq!(r.len(), HEAP_INFO_RANGE_RESP_SIZE);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    let r = parse::<HeapInfoRangeResp>(&r);
    let range = HeapRange {
        offset: r.range.offset.to_native(),
        len: r.range.len.to_native(),
    };
    (r.info, range)
}

fn session(d: &mut Device, m: &mut FakeMapper, resume: u64) -> u64 {
    let mut r = answer(d, &session_open_req(resume), SESSION_OPEN_RESP_SIZE, m);
    r.resize(SESSION_OPEN_RESP_SIZE, 0);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    le64(&r, 8)
}

fn ok_in(range: HeapRange, a: (u32, u64, u64, u64), what: &str) {
    assert_eq!(a.0, VIRTIO_DMAHEAP_S_OK, "{what}");
    assert!(
        range.holds(a.2, a.3),
        "{what}: {:#x}+{:#x} outside {range:x?}",
        a.2,
        a.3
    );
}

#[test]
fn heap_info_states_disjoint_aligned_ranges_equal_for_the_same_cache() {
    let mut d = mixed_device();
    let mut m = mapper(1 << 30);
    assert_ne!(d.device_features() & (1 << VIRTIO_DMAHEAP_F_HEAP_RANGE), 0);
    let got: Vec<_> = (0..4).map(|h| info(&mut d, &mut m, h)).collect();
    let third = 340 * M;
    let want = [2 * third, 0, third, 0];
    for (h, ((i, r), off)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            *r,
            HeapRange {
                offset: off,
                len: third
            },
            "heap {h}"
        );
        assert_eq!(r.offset % RANGE_ALIGN, 0);
        assert_eq!(r.len % RANGE_ALIGN, 0);
        assert!(r.end() <= 1 << 30);
        assert!(i.max_size.to_native() <= r.len);
        assert!(i.capacity.to_native() <= r.len && i.capacity.to_native() > 0);
        assert_eq!(d.heap_range(h), Some(*r));
    }
    for (a, (ia, ra)) in got.iter().enumerate() {
        for (ib, rb) in &got[a + 1..] {
            let disjoint = ra.end() <= rb.offset || rb.end() <= ra.offset;
            assert!(ra == rb || disjoint, "{ra:x?} and {rb:x?} overlap");
            assert_eq!(ra == rb, ia.cache == ib.cache, "{ra:x?} {rb:x?}");
        }
    }
    // The capacity of a heap is its range, also under a larger quota.
    assert_eq!(got[1].0.capacity.to_native(), third);
}

#[test]
fn without_the_feature_heap_info_keeps_the_72_byte_response() {
    let mut d = mixed_device();
    let mut m = mapper(1 << 30);
    d.set_acked_features(1 << VIRTIO_DMAHEAP_F_SYNC);
    let r = answer(&mut d, &heap_info_req(2), HEAP_INFO_RANGE_RESP_SIZE, &mut m);
    assert_eq!(r.len(), HEAP_INFO_RESP_SIZE);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_OK);
    // The heaps are placed in their ranges all the same (they are fixed at start-up).
    let a = alloc(&mut d, &mut m, 2, 4096);
    ok_in(d.heap_range(2).unwrap(), a, "uncached without the feature");
    // With it, a writable part that holds only the old response is malformed.
    d.set_acked_features(RANGE_FEATURES);
    let r = answer(&mut d, &heap_info_req(2), HEAP_INFO_RESP_SIZE, &mut m);
    assert_eq!(r.len(), RESP_HDR_SIZE);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_INVAL);
    let r = answer(&mut d, &heap_info_req(9), HEAP_INFO_RANGE_RESP_SIZE, &mut m);
    assert_eq!(r.len(), HEAP_INFO_RANGE_RESP_SIZE);
    assert_eq!(status_of(&r), VIRTIO_DMAHEAP_S_NO_HEAP);
}

#[test]
fn one_cache_attribute_keeps_the_whole_window() {
    let heaps = vec![
        heap("a", CacheMode::Uncached),
        heap("b", CacheMode::Uncached),
    ];
    let (mut d, _) = device_with(heaps, limits());
    d.set_acked_features(RANGE_FEATURES);
    let mut m = mapper(1 << 30);
    for h in 0..2 {
        let (i, r) = info(&mut d, &mut m, h);
        assert_eq!(
            r,
            HeapRange {
                offset: 0,
                len: 1 << 30
            }
        );
        assert_eq!(i.capacity.to_native(), 1 << 30);
        assert_eq!(i.max_size.to_native(), 64 * M);
    }
}

#[test]
fn every_alloc_and_batch_lies_in_its_heaps_range() {
    let mut d = mixed_device();
    let mut m = mapper(1 << 30);
    let small_limit = heap_params("x").small_limit();
    // Interleaved, so that first fit over the whole window would mix the ranges.
    for round in 0..3 {
        for h in 0..4u32 {
            let r = d.heap_range(h as usize).unwrap();
            for len in [4096, 64 << 10, small_limit + 4096, 16 * M] {
                let a = alloc(&mut d, &mut m, h, len);
                ok_in(r, a, &format!("round {round} heap {h} len {len:#x}"));
            }
            let Reply::Answer(b) =
                d.handle(&alloc_batch_req(h, 5, 8192), ALLOC_BATCH_RESP_SIZE, &mut m)
            else {
                panic!("retry");
            };
            let b = parse::<AllocBatchResp>(&b);
            assert_eq!(b.count.to_native(), 5);
            for x in &b.buffers[..5] {
                assert!(
                    r.holds(x.offset.to_native(), x.len.to_native()),
                    "batch of heap {h}"
                );
            }
        }
    }
    // Every mapping too (arenas included).
    for (&woff, &len) in &m.mapped {
        let holders = (0..4).filter(|&h| d.heap_range(h).unwrap().holds(woff, len));
        assert!(
            holders.count() > 0,
            "mapping {woff:#x}+{len:#x} in no range"
        );
    }
    for b in d.buffers() {
        let h = ["wc", "system", "uncached", "system2"]
            .iter()
            .position(|n| *n == b.heap)
            .unwrap();
        assert!(d.heap_range(h).unwrap().holds(b.offset, b.len), "{b:?}");
    }
}

/// Two attributes in an 8 MiB window: 4 MiB each; small arenas.
fn small_device(max_mappings: usize) -> Device {
    let small = |name: &str, cache| HeapParams {
        arena_size: 2 * M,
        max_size: 4 * M,
        ..heap(name, cache)
    };
    let limits = Limits {
        shm_size: 8 * M,
        max_mappings,
        ..limits()
    };
    let heaps = vec![
        small("system", CacheMode::Cached),
        small("wc", CacheMode::WriteCombined),
    ];
    let (mut d, _) = device_with(heaps, limits);
    d.set_acked_features(RANGE_FEATURES);
    d
}

#[test]
fn a_full_range_is_window_full_while_another_range_has_room() {
    let mut d = small_device(128);
    let mut m = mapper(8 * M);
    let (cached, wc) = (d.heap_range(0).unwrap(), d.heap_range(1).unwrap());
    assert_eq!(
        (cached.offset, cached.len, wc.offset, wc.len),
        (0, 4 * M, 4 * M, 4 * M)
    );
    let big = alloc(&mut d, &mut m, 0, 4 * M);
    ok_in(cached, big, "the whole cached range");
    assert_eq!(
        alloc(&mut d, &mut m, 0, 4096).0,
        VIRTIO_DMAHEAP_S_WINDOW_FULL
    );
    assert_eq!(
        alloc(&mut d, &mut m, 0, 8 * M).0,
        VIRTIO_DMAHEAP_S_TOO_BIG,
        "larger than the range"
    );
    let w = alloc(&mut d, &mut m, 1, 4 * M);
    ok_in(wc, w, "the whole wc range");
    // The wc buffer freed stays mapped as a large spare of its heap; it is no room for
    // the cached heap, and is not evicted for it.
    assert_eq!(free(&mut d, &mut m, w.1), VIRTIO_DMAHEAP_S_OK);
    assert!(m.has(w.2, w.3));
    assert_eq!(
        alloc(&mut d, &mut m, 0, 4096).0,
        VIRTIO_DMAHEAP_S_WINDOW_FULL
    );
    assert!(m.has(w.2, w.3), "a spare of another range was evicted");
    // The cached heap's own spare is: its range then has room again.
    assert_eq!(free(&mut d, &mut m, big.1), VIRTIO_DMAHEAP_S_OK);
    assert!(m.has(big.2, big.3), "kept as a large spare");
    let s = alloc(&mut d, &mut m, 0, 4096);
    ok_in(cached, s, "after the cached spare went");
    assert!(m.has(w.2, w.3), "the wc spare stays");
}

#[test]
fn spares_never_serve_a_heap_of_another_range() {
    let mut d = mixed_device();
    let mut m = mapper(1 << 30);
    let (wc, cached) = (d.heap_range(0).unwrap(), d.heap_range(1).unwrap());
    // An emptied arena and a large mapping of the wc heap, kept as its spares.
    let s = alloc(&mut d, &mut m, 0, 4096);
    let b = alloc(&mut d, &mut m, 0, 16 * M);
    assert_eq!(free(&mut d, &mut m, s.1), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(free(&mut d, &mut m, b.1), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(m.mapped.len(), 2, "both kept as spares");
    let maps = m.maps;
    // The cached heaps get mappings of their own range instead.
    ok_in(cached, alloc(&mut d, &mut m, 1, 4096), "small cached");
    ok_in(cached, alloc(&mut d, &mut m, 3, 16 * M), "large cached");
    assert_eq!(m.maps, maps + 2);
    assert!(m.covers(s.2, 4096) && m.has(b.2, b.3), "the wc spares stay");
    // The wc heap reuses them.
    let maps = m.maps;
    ok_in(wc, alloc(&mut d, &mut m, 0, 4096), "small wc");
    ok_in(wc, alloc(&mut d, &mut m, 0, 16 * M), "large wc");
    assert_eq!(m.maps, maps, "the spares served their own heap");
}

#[test]
fn the_mapping_cap_evicts_a_spare_of_any_range_and_places_in_the_right_one() {
    let mut d = small_device(1);
    let mut m = mapper(8 * M);
    let w = alloc(&mut d, &mut m, 1, 4 * M);
    assert_eq!(free(&mut d, &mut m, w.1), VIRTIO_DMAHEAP_S_OK);
    assert_eq!(m.mapped.len(), 1, "the wc spare");
    ok_in(
        d.heap_range(0).unwrap(),
        alloc(&mut d, &mut m, 0, 4096),
        "cached",
    );
    assert!(!m.has(w.2, w.3), "the wc spare made way under the cap");
    assert_eq!(m.mapped.len(), 1);
}

#[test]
fn a_resumed_session_keeps_its_offsets_and_ranges() {
    let mut d = mixed_device();
    d.set_acked_features(SESSION_FEATURES);
    let mut m = mapper(1 << 30);
    let id = session(&mut d, &mut m, 0);
    let held: Vec<_> = (0..4u32)
        .flat_map(|h| [(h, 4096), (h, 16 * M)])
        .map(|(h, len)| (h, alloc(&mut d, &mut m, h, len)))
        .collect();
    let close = session_close_req(VIRTIO_DMAHEAP_CLOSE_SUSPEND);
    assert_eq!(status_of(&answer(&mut d, &close, 8, &mut m)), 0);
    assert!(m.mapped.is_empty());
    assert_eq!(session(&mut d, &mut m, id), id);
    for (h, a) in &held {
        ok_in(d.heap_range(*h as usize).unwrap(), *a, "held");
        assert!(m.covers(a.2, a.3), "buffer {} back at {:#x}", a.1, a.2);
    }
    for h in 0..4u32 {
        let (_, r) = info(&mut d, &mut m, h);
        assert_eq!(
            Some(r),
            d.heap_range(h as usize),
            "the same range after resume"
        );
        ok_in(r, alloc(&mut d, &mut m, h, 8192), "after resume");
    }
}

#[test]
fn reservations_stay_window_absolute() {
    let mut d = small_device(128);
    d.set_acked_features(SESSION_FEATURES);
    let mut m = mapper(8 * M);
    session(&mut d, &mut m, 0);
    let reserve = |d: &mut Device, ty, off, len| {
        status_of(&answer(
            d,
            &reserve_req(ty, off, len),
            8,
            &mut FakeMapper::default(),
        ))
    };
    // Across the border of the two ranges.
    assert_eq!(reserve(&mut d, VIRTIO_DMAHEAP_REQ_RESERVE, 2 * M, 4 * M), 0);
    let c = alloc(&mut d, &mut m, 0, 2 * M);
    ok_in(
        HeapRange {
            offset: 0,
            len: 2 * M,
        },
        c,
        "cached below the reservation",
    );
    let w = alloc(&mut d, &mut m, 1, 2 * M);
    ok_in(
        HeapRange {
            offset: 6 * M,
            len: 2 * M,
        },
        w,
        "wc above it",
    );
    assert_eq!(
        alloc(&mut d, &mut m, 1, 2 * M).0,
        VIRTIO_DMAHEAP_S_WINDOW_FULL
    );
    assert_eq!(
        reserve(&mut d, VIRTIO_DMAHEAP_REQ_UNRESERVE, 2 * M, 4 * M),
        0
    );
    ok_in(
        d.heap_range(1).unwrap(),
        alloc(&mut d, &mut m, 1, 2 * M),
        "wc again",
    );
}

#[test]
fn a_window_too_small_to_split_offers_no_ranges() {
    // The daemon's configuration refuses this; the core still serves it, safely.
    let limits = Limits {
        shm_size: 2 * M,
        ..limits()
    };
    let heaps = vec![
        HeapParams {
            arena_size: 2 * M,
            max_size: 2 * M,
            ..heap("a", CacheMode::Cached)
        },
        HeapParams {
            arena_size: 2 * M,
            max_size: 2 * M,
            ..heap("b", CacheMode::WriteCombined)
        },
    ];
    let (d, _) = device_with(heaps, limits);
    assert_eq!(d.device_features() & (1 << VIRTIO_DMAHEAP_F_HEAP_RANGE), 0);
    let whole = HeapRange {
        offset: 0,
        len: 2 * M,
    };
    assert_eq!(
        (d.heap_range(0), d.heap_range(1)),
        (Some(whole), Some(whole))
    );
}
