//! Unit tests of the vhost-user layer: chains on a mock queue, the epoch, the timer.

use super::*;
use crate::abi::*;
use crate::core::Device;
use crate::core::{MapError, Mapper};
use crate::testing::{alloc_req, device, FakeMapper};
use queue::handle_chain;
use std::os::fd::BorrowedFd;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const REQ: u64 = 0x10000;
const RESP: u64 = 0x20000;

fn setup() -> (Device, GuestMemoryMmap) {
    let (dev, _) = device();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
    (dev, mem)
}

fn alloc_bytes(len: u64) -> Vec<u8> {
    alloc_req(0, 0, len)
}

fn d(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Serves one chain; returns (used length, status in the response area).
fn run(dev: &mut Device, mem: &GuestMemoryMmap, req: &[u8], descs: &[RawDescriptor]) -> (u32, u32) {
    mem.write_slice(req, GuestAddress(REQ)).unwrap();
    mem.write_obj(0xdead_beef_u32, GuestAddress(RESP)).unwrap();
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    let mut mapper = FakeMapper::default();
    let used = serve_chain(dev, chain, mem, &mut mapper).expect("answered");
    (used, mem.read_obj::<u32>(GuestAddress(RESP)).unwrap())
}

#[test]
fn good_chain() {
    let (mut dev, mem) = setup();
    let r = alloc_bytes(4096);
    let (used, status) = run(&mut dev, &mem, &r, &[d(REQ, 24, false), d(RESP, 32, true)]);
    assert_eq!((used, status), (32, VIRTIO_DMAHEAP_S_OK));
    // Split over several descriptors on both sides.
    let (used, status) = run(
        &mut dev,
        &mem,
        &r,
        &[
            d(REQ, 8, false),
            d(REQ + 8, 16, false),
            d(RESP, 8, true),
            d(RESP + 8, 24, true),
        ],
    );
    assert_eq!((used, status), (32, VIRTIO_DMAHEAP_S_OK));
}

#[test]
fn malformed_chains_get_an_error_and_the_device_keeps_working() {
    let (mut dev, mem) = setup();
    let r = alloc_bytes(4096);
    let inval = VIRTIO_DMAHEAP_S_INVAL;
    let unsupp = VIRTIO_DMAHEAP_S_UNSUPP;
    let untouched = 0xdead_beef;
    let mut unknown = r.clone();
    unknown[0] = 77;
    type Case<'a> = (&'a str, Vec<u8>, Vec<RawDescriptor>, (u32, u32));
    let cases: Vec<Case> = vec![
        (
            "truncated",
            r.clone(),
            vec![d(REQ, 20, false), d(RESP, 32, true)],
            (8, inval),
        ),
        (
            "oversized",
            r.clone(),
            vec![d(REQ, 4096, false), d(RESP, 32, true)],
            (8, inval),
        ),
        (
            "no readable part",
            r.clone(),
            vec![d(RESP, 32, true)],
            (8, inval),
        ),
        (
            "no writable part",
            r.clone(),
            vec![d(REQ, 24, false)],
            (0, untouched),
        ),
        (
            "writable too small",
            r.clone(),
            vec![d(REQ, 24, false), d(RESP, 4, true)],
            (0, untouched),
        ),
        (
            "response does not fit",
            r.clone(),
            vec![d(REQ, 24, false), d(RESP, 16, true)],
            (8, inval),
        ),
        (
            "unknown type",
            unknown,
            vec![d(REQ, 24, false), d(RESP, 32, true)],
            (8, unsupp),
        ),
        (
            "outside memory",
            r.clone(),
            vec![d(0x1000_0000, 24, false), d(RESP, 32, true)],
            (0, untouched),
        ),
        (
            "wrapping address",
            r.clone(),
            vec![d(u64::MAX - 4, 24, false), d(RESP, 32, true)],
            (0, untouched),
        ),
        (
            "writable first",
            r.clone(),
            vec![d(RESP, 32, true), d(REQ, 24, false)],
            (0, untouched),
        ),
    ];
    for (name, req, descs, want) in cases {
        let got = run(&mut dev, &mem, &req, &descs);
        assert_eq!(got, want, "{name}");
        assert_eq!(dev.stats().total.buffers, 0, "{name}: nothing allocated");
    }
    let (used, status) = run(&mut dev, &mem, &r, &[d(REQ, 24, false), d(RESP, 32, true)]);
    assert_eq!((used, status), (32, VIRTIO_DMAHEAP_S_OK));
}

#[test]
fn queue_level_processing_continues_after_bad_chains() {
    let (mut dev, mem) = setup();
    let r = alloc_bytes(8192);
    mem.write_slice(&r, GuestAddress(REQ)).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let f = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    let descs = [
        // chain 0: bad (readable only, truncated)
        RawDescriptor::from(SplitDescriptor::new(REQ, 3, 0, 0)),
        // chain 1: good
        RawDescriptor::from(SplitDescriptor::new(REQ, 24, f, 2)),
        RawDescriptor::from(SplitDescriptor::new(RESP, 32, VRING_DESC_F_WRITE as u16, 0)),
        // chain 2: good
        RawDescriptor::from(SplitDescriptor::new(REQ, 24, f, 4)),
        RawDescriptor::from(SplitDescriptor::new(
            RESP + 64,
            32,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut mapper = FakeMapper::default();
    let mut used = Vec::new();
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let n = serve_chain(&mut dev, chain, &mem, &mut mapper).expect("answered");
        q.add_used(&mem, head, n).unwrap();
        used.push(n);
    }
    assert_eq!(used, [0, 32, 32]);
    assert_eq!(dev.stats().total.buffers, 2);
}

#[test]
fn maps_are_refused_once_the_ring_stopped_but_buffers_stay() {
    let (dev, _) = setup();
    let handle = DeviceHandle::new(dev).unwrap();
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap(),
    );
    let vring = VringRwLock::new(mem, 16).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let file = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsFd;
    let mut fake = FakeMapper::default();
    assert!(handle.lock().alloc(0, 0, 4096, &mut fake).is_ok());
    let epoch = handle.epoch();
    let mut cm = ChannelMapper {
        backend: None,
        handle: &handle,
        vring: &vring,
        epoch,
    };
    // Running, same epoch: only the missing channel stops it.
    assert!(matches!(
        cm.map(file.as_fd(), 0, 0, 4096),
        Err(MapError::NoChannel)
    ));
    // GET_VRING_BASE: a pause or a reset. No map may go out for a request of the old
    // epoch, even once the ring runs again, and nothing is dropped.
    handle.bump_epoch();
    assert!(matches!(
        cm.map(file.as_fd(), 0, 0, 4096),
        Err(MapError::NotRunning)
    ));
    assert!(matches!(cm.unmap(0, 4096), Err(MapError::NotRunning)));
    cm.epoch = handle.epoch();
    vring.set_enabled(false);
    assert!(matches!(cm.unmap(0, 4096), Err(MapError::NotRunning)));
    assert_eq!(
        handle.lock().stats().total.buffers,
        1,
        "a stop drops nothing"
    );
    // A front-end reset (RESET_DEVICE) drops everything at the next lock, not on the
    // front end's thread.
    handle.forget_all_later();
    assert_eq!(handle.lock().stats().total.buffers, 0);
    assert_eq!(fake.unmaps, 0);
}

#[test]
fn a_request_that_needs_the_front_end_is_retried_not_answered_after_a_stop() {
    let (mut dev, mem) = setup();
    struct Stopped;
    impl Mapper for Stopped {
        fn map(&mut self, _: BorrowedFd<'_>, _: u64, _: u64, _: u64) -> Result<(), MapError> {
            Err(MapError::NotRunning)
        }
        fn unmap(&mut self, _: u64, _: u64) -> Result<(), MapError> {
            Err(MapError::NotRunning)
        }
    }
    mem.write_slice(&alloc_bytes(4096), GuestAddress(REQ))
        .unwrap();
    mem.write_obj(0xdead_beef_u32, GuestAddress(RESP)).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq
        .build_desc_chain(&[d(REQ, 24, false), d(RESP, 32, true)])
        .unwrap();
    assert_eq!(
        handle_chain(&mut dev, &chain, &mem, &mut Stopped),
        Reply::Retry
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(RESP)).unwrap(),
        0xdead_beef,
        "nothing written"
    );
    assert_eq!(dev.stats().total, crate::core::HeapStats::default());
    // Served again once the ring runs: answered in full.
    let used = serve_chain(&mut dev, chain, &mem, &mut FakeMapper::default());
    assert_eq!(used, Some(32));
    assert_eq!(dev.stats().total.buffers, 1);
}

/// Waits (with a deadline) until the timer fires; returns the time.
fn wait_fired(t: &WorkerTimer) -> Instant {
    let start = Instant::now();
    loop {
        if t.consume() {
            return Instant::now();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "worker timer never fired"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn worker_timer_fires_at_the_latest_deadline_it_was_given() {
    let t = WorkerTimer::new().unwrap();
    t.arm(Instant::now());
    wait_fired(&t);
    // A later deadline given while one is pending replaces it (no early signal).
    let d1 = Instant::now() + Duration::from_millis(20);
    let d2 = d1 + Duration::from_millis(30);
    t.arm(d1);
    t.arm(d2);
    let fired = wait_fired(&t);
    assert!(fired >= d2, "fired {:?} before the deadline", d2 - fired);
    assert!(!t.consume(), "signalled once");
    // An earlier deadline than the pending one replaces it too.
    t.arm(Instant::now() + Duration::from_secs(3600));
    t.arm(Instant::now());
    wait_fired(&t);
}

#[test]
fn config_reads_are_bounds_checked() {
    let (dev, _) = setup();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let b = VhuDmaheap::new(
        Arc::new(DeviceHandle::new(dev).unwrap()),
        Arc::new(WorkerTimer::new().unwrap()),
        mem,
        Duration::ZERO,
    );
    let all = b.get_config(0, 16);
    assert_eq!(all.len(), 16);
    assert_eq!(&all[..4], &VIRTIO_DMAHEAP_MAGIC.to_le_bytes());
    assert_eq!(b.get_config(8, 4), 1u32.to_le_bytes());
    assert!(b.get_config(12, 8).is_empty());
    assert!(b.get_config(u32::MAX, 2).is_empty());
    assert!(b.get_config(16, 0).is_empty());
    let shm = b.get_shmem_config().unwrap();
    assert_eq!(shm.nregions, 1);
    assert_eq!({ shm.memory_sizes }[0], 1 << 30);
    assert!(b
        .protocol_features()
        .contains(VhostUserProtocolFeatures::SHMEM));
    assert!(b
        .protocol_features()
        .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
}
