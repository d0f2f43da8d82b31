//! The queue path: arbitrary descriptor tables and available rings on a mock split queue
//! (virtio-queue `MockSplitQueue`), every chain served as the vring worker serves it
//! (`vhost::serve_chain`: the chain parsed into a request, the device core, the answer
//! written back). Checks: nothing panics or loops, an answer never exceeds the chain's
//! writable bytes, nothing is written for a chain the device could not parse, and the
//! device keeps serving a good request afterwards.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::*;
use libfuzzer_sys::fuzz_target;
use vhost_user_dmaheap::vhost::serve_chain;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE: u16 = 16;
const MEM: u64 = 0x10000;
/// Request bytes of the input go here (after the rings, which start at 0).
const DATA: u64 = 0x8000;

#[derive(Debug, Arbitrary)]
struct Desc {
    /// Offset from DATA (may run past guest memory or into the rings).
    addr: u16,
    len: u16,
    flags: u16,
    next: u8,
}

#[derive(Debug, Arbitrary)]
struct Input {
    descs: Vec<Desc>,
    heads: Vec<u8>,
    data: Vec<u8>,
    features: u8,
}

fuzz_target!(|input: Input| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return;
    };
    let data: Vec<u8> = input.data.iter().copied().take(0x1000).collect();
    if mem.write_slice(&data, GuestAddress(DATA)).is_err() {
        return;
    }
    let vq = MockSplitQueue::new(&mem, QUEUE);
    for (i, d) in input.descs.iter().take(usize::from(QUEUE)).enumerate() {
        let desc = SplitDescriptor::new(
            DATA.wrapping_add(u64::from(d.addr)),
            u32::from(d.len),
            d.flags,
            u16::from(d.next),
        );
        if vq
            .desc_table()
            .store(i as u16, RawDescriptor::from(desc))
            .is_err()
        {
            return;
        }
    }
    let heads: Vec<u16> = input
        .heads
        .iter()
        .take(usize::from(QUEUE))
        .map(|&h| u16::from(h))
        .collect();
    for (i, &h) in heads.iter().enumerate() {
        if vq.avail().ring().ref_at(i).map(|r| r.store(h)).is_err() {
            return;
        }
    }
    vq.avail().idx().store(heads.len() as u16);
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return;
    };
    let (mut dev, _faults) = device();
    dev.set_acked_features(u64::from(input.features) << F_SYNC);
    let mut mapper = mapper();
    let mut served = 0;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        served += 1;
        assert!(served <= heads.len(), "more chains than heads");
        // Bytes the device may write: the writable descriptors (an upper bound; the
        // device must never go beyond what the chain offers).
        let writable: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        let head = chain.head_index();
        let used =
            serve_chain(&mut dev, chain, &mem, &mut mapper).expect("the ring runs: no retry");
        assert!(
            u64::from(used) <= writable,
            "used {used} of {writable} writable"
        );
        assert!(
            used == 0 || used >= RESP_HDR as u32,
            "partial resp_hdr ({used})"
        );
        if q.add_used(&mem, head, used).is_err() {
            break;
        }
    }
    // The device still serves a good request (HEAP_INFO in the shape the acked features
    // give it: 88 bytes with VIRTIO_DMAHEAP_F_HEAP_RANGE).
    let heap_info_resp = if u64::from(input.features) << F_SYNC & 1 << F_HEAP_RANGE != 0 {
        HEAP_INFO_RANGE_RESP
    } else {
        HEAP_INFO_RESP
    };
    let (resp, _) = serve(&mut dev, &heap_info_req(0), heap_info_resp, &mut mapper);
    assert_eq!(check_response(&resp, heap_info_resp), Some(S_OK));
});
