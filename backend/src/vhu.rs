//! Thin vhost-user layer: implements `VhostUserBackend` on top of the device core.
//!
//! Rules from the environment this follows:
//! * shared-memory requests (`SHMEM_MAP`/`SHMEM_UNMAP`) go out only from the vring worker
//!   thread, while processing a guest request on a running queue;
//! * `GET_VRING_BASE` (`stop_vring`) and `RESET_DEVICE` drop every buffer and mapping record
//!   without unmapping. They never wait for the device lock (the worker may hold it while
//!   it waits for the front end to acknowledge a map, and the front end waits for us);
//!   they bump a generation counter instead, and whoever takes the lock next applies the
//!   reset. A map is refused once the generation has moved on.
//! * no front-end message handler takes the device lock at all (`GET_CONFIG` may arrive
//!   from a vCPU thread of QEMU holding its big lock while the worker waits for QEMU's
//!   main loop to acknowledge a map).
//! * idle heaps give their spare arenas back after [`crate::device::SPARE_IDLE_DELAY`]:
//!   an [`IdleTimer`] wakes the vring worker (an extra event source of its epoll loop,
//!   [`IDLE_TIMER_EVENT`]), which unmaps them only if the queue is still started and
//!   enabled and no reset happened since (the generation check of every map/unmap).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Instant;

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostUserMMap, VhostUserMMapFlags, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::abi::{MAX_REQ_SIZE, VIRTIO_DMAHEAP_SHM_BUFFERS};
use crate::device::{Device, MapError, Mapper};

/// Queue size offered.
pub const QUEUE_SIZE: usize = 256;
/// Number of queues.
pub const NUM_QUEUES: usize = 1;
/// Event id of the [`IdleTimer`] in the vring worker's epoll loop (0..NUM_QUEUES are the
/// queues, NUM_QUEUES is the library's own exit / vring-enable event).
pub const IDLE_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;

#[derive(Debug, Default)]
struct TimerState {
    deadline: Option<Instant>,
    stop: bool,
}

#[derive(Debug)]
struct TimerInner {
    state: Mutex<TimerState>,
    cv: Condvar,
    fd: EventFd,
}

impl TimerInner {
    fn state(&self) -> MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        let mut st = self.state();
        loop {
            if st.stop {
                return;
            }
            st = match st.deadline {
                None => self.cv.wait(st).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        st.deadline = None;
                        if let Err(e) = self.fd.write(1) {
                            warn!("idle timer: cannot signal the vring worker: {e}");
                        }
                        st
                    } else {
                        self.cv
                            .wait_timeout(st, d - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                }
            };
        }
    }
}

/// Makes an eventfd readable at a deadline, for the vring worker's epoll loop.
///
/// A thread sleeps on a condition variable until the deadline (the daemon's syscall filter
/// allows futex and eventfd, not timerfd). Arming is cheap when a deadline is pending
/// already: a later deadline only updates it (the thread goes back to sleep when it wakes
/// up early), so a busy queue does not wake the thread at every request. A deadline that
/// became moot is not cancelled: the worker then finds nothing to do.
#[derive(Debug)]
pub struct IdleTimer {
    inner: Arc<TimerInner>,
}

impl IdleTimer {
    /// A timer and its thread (which ends when the timer is dropped).
    pub fn new() -> io::Result<Self> {
        let inner = Arc::new(TimerInner {
            state: Mutex::new(TimerState::default()),
            cv: Condvar::new(),
            fd: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        });
        let t = inner.clone();
        thread::Builder::new()
            .name("idle-timer".into())
            .spawn(move || t.run())?;
        Ok(Self { inner })
    }

    /// Signals the eventfd at `deadline`, replacing a pending deadline (a later one costs
    /// no wake-up now: the thread wakes at the old one and goes back to sleep).
    pub fn arm(&self, deadline: Instant) {
        let mut st = self.inner.state();
        let wake = st.deadline.is_none_or(|d| deadline < d);
        st.deadline = Some(deadline);
        drop(st);
        if wake {
            self.inner.cv.notify_one();
        }
    }

    /// Clears the eventfd (the worker does this when it handles the event).
    fn consume(&self) {
        // Nothing to read (EAGAIN) is fine: the event may have been consumed already.
        let _ = self.inner.fd.read();
    }

    /// The fd to register with the epoll loop.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.fd.as_raw_fd()
    }
}

impl Drop for IdleTimer {
    fn drop(&mut self) {
        self.inner.state().stop = true;
        self.inner.cv.notify_one();
    }
}

/// The device and its generation, behind one lock.
#[derive(Debug)]
pub struct DeviceSlot {
    /// The device core.
    pub dev: Device,
    gen: u64,
}

/// State shared by the vhost-user layer, the control socket and the daemon loop.
#[derive(Debug)]
pub struct Shared {
    slot: Mutex<DeviceSlot>,
    gen: AtomicU64,
    acked_features: AtomicU64,
    config: crate::abi::Config,
    shm_size: u64,
    timer: IdleTimer,
}

impl Shared {
    /// Wraps a device; starts the idle timer's thread.
    pub fn new(dev: Device) -> io::Result<Self> {
        Ok(Self {
            config: dev.config(),
            shm_size: dev.limits().shm_size,
            slot: Mutex::new(DeviceSlot { dev, gen: 0 }),
            gen: AtomicU64::new(0),
            acked_features: AtomicU64::new(Device::device_features()),
            timer: IdleTimer::new()?,
        })
    }

    /// Locks the device, first applying a pending reset.
    pub fn lock(&self) -> MutexGuard<'_, DeviceSlot> {
        let mut g = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        Self::apply(&mut g, self.gen.load(Ordering::SeqCst));
        g
    }

    fn apply(g: &mut DeviceSlot, cur: u64) {
        if g.gen != cur {
            g.dev.reset();
            g.gen = cur;
        }
    }

    /// Drops all buffers and mappings (without unmapping), now if the device is not busy,
    /// else as soon as the current request is done. Never blocks.
    pub fn reset(&self) {
        let cur = self.gen.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut g) = self.slot.try_lock() {
            Self::apply(&mut g, cur);
        }
    }

    fn generation(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }
}

/// `Mapper` over the back-end request channel, valid for one generation.
struct ChannelMapper<'a> {
    backend: Option<&'a Backend>,
    shared: &'a Shared,
    gen: u64,
}

impl ChannelMapper<'_> {
    fn check(&self) -> Result<&Backend, MapError> {
        if self.shared.generation() != self.gen {
            return Err(MapError::NotRunning);
        }
        self.backend.ok_or(MapError::NoChannel)
    }
}

impl Mapper for ChannelMapper<'_> {
    fn map(
        &mut self,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
    ) -> Result<(), MapError> {
        let backend = self.check()?;
        let msg = VhostUserMMap {
            shmid: VIRTIO_DMAHEAP_SHM_BUFFERS as u8,
            padding: [0; 7],
            fd_offset,
            shm_offset,
            len,
            flags: VhostUserMMapFlags::WRITABLE.bits(),
        };
        debug!("SHMEM_MAP {shm_offset:#x}+{len:#x}");
        backend
            .shmem_map(&msg, &fd)
            .map(|_| ())
            .map_err(MapError::Refused)
    }

    fn unmap(&mut self, shm_offset: u64, len: u64) -> Result<(), MapError> {
        let backend = self.check()?;
        let msg = VhostUserMMap {
            shmid: VIRTIO_DMAHEAP_SHM_BUFFERS as u8,
            padding: [0; 7],
            fd_offset: 0,
            shm_offset,
            len,
            flags: 0,
        };
        debug!("SHMEM_UNMAP {shm_offset:#x}+{len:#x}");
        backend
            .shmem_unmap(&msg)
            .map(|_| ())
            .map_err(MapError::Refused)
    }
}

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The vhost-user back end of one front-end connection.
pub struct VhuDmaheap {
    shared: Arc<Shared>,
    mem: Mem,
    backend_req: Mutex<Option<Backend>>,
    event_idx: AtomicBool,
}

impl std::fmt::Debug for VhuDmaheap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhuDmaheap")
            .field("shared", &self.shared)
            .field("event_idx", &self.event_idx)
            .finish_non_exhaustive()
    }
}

impl VhuDmaheap {
    /// A back end over `shared`, reading guest memory through `mem` (the same atomic the
    /// daemon was created with).
    pub fn new(shared: Arc<Shared>, mem: Mem) -> Self {
        Self {
            shared,
            mem,
            backend_req: Mutex::new(None),
            event_idx: AtomicBool::new(false),
        }
    }

    fn backend_req(&self) -> Option<Backend> {
        self.backend_req
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves every available chain. Never fails for a guest error.
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let backend = self.backend_req();
        let mut deadline = None;
        let res = self.serve_available(vring, backend.as_ref(), &mut deadline);
        if let Some(d) = deadline {
            self.shared.timer.arm(d);
        }
        res
    }

    /// The loop of [`Self::process_queue`]; leaves in `deadline` the device's idle
    /// deadline after the last request it served.
    fn serve_available(
        &self,
        vring: &VringRwLock,
        backend: Option<&Backend>,
        deadline: &mut Option<Instant>,
    ) -> io::Result<()> {
        loop {
            let mem = self.mem.memory();
            // Pop with the vring lock held, but never keep it while serving the request:
            // the front end may stop the ring (taking this lock) while we wait for it.
            let chain = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                if !queue.ready() {
                    return Ok(());
                }
                match queue.pop_descriptor_chain(mem.clone()) {
                    Some(c) => c,
                    None => break,
                }
            };
            let head = chain.head_index();
            let (used, gen) = {
                let mut slot = self.shared.lock();
                let gen = slot.gen;
                slot.dev
                    .set_acked_features(self.shared.acked_features.load(Ordering::SeqCst));
                let mut mapper = ChannelMapper {
                    backend,
                    shared: &self.shared,
                    gen,
                };
                let used = serve_chain(&mut slot.dev, chain, &mem, &mut mapper);
                *deadline = slot.dev.idle_deadline();
                (used, gen)
            };
            {
                // A request in flight when the ring was stopped (or the device reset) is not
                // answered: the used ring belongs to the front end again. The stop takes
                // this lock to mark the queue not ready, so the check cannot race with it.
                let mut state = vring.get_mut();
                if !state.get_queue().ready() || self.shared.generation() != gen {
                    debug!("dropping the response to a request from before a reset");
                    return Ok(());
                }
                if let Err(e) = state.add_used(head, used) {
                    warn!("add_used: {e}");
                    return Ok(());
                }
            }
            if vring.needs_notification().unwrap_or(true) {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }
}

impl VhuDmaheap {
    /// Registers the idle timer with the epoll loop of the vring worker (call once per
    /// connection, on the handler that serves the request queue).
    pub fn register_idle_timer(&self, handler: &VringEpollHandler<Arc<Self>>) -> io::Result<()> {
        handler.register_listener(
            self.shared.timer.as_raw_fd(),
            EventSet::IN,
            u64::from(IDLE_TIMER_EVENT),
        )
    }

    /// The idle timer fired (vring worker thread): unmap the arenas of idle heaps if the
    /// device still runs. Never fails: there is nothing the event loop could do about it.
    fn idle_timer_fired(&self, vrings: &[VringRwLock]) {
        self.shared.timer.consume();
        // SHMEM_UNMAP only while the queue is started and enabled (QEMU crashes on one for
        // a stopped device). A stop that comes after this check bumps the generation,
        // which the mapper checks before sending anything.
        let running = vrings.first().is_some_and(|v| {
            let st = v.get_ref();
            st.get_queue().ready() && st.is_enabled()
        });
        if !running {
            debug!("idle timer: queue not running, nothing released");
            return;
        }
        let backend = self.backend_req();
        let next = {
            let mut slot = self.shared.lock();
            let mut mapper = ChannelMapper {
                backend: backend.as_ref(),
                shared: &self.shared,
                gen: slot.gen,
            };
            let released = slot.dev.release_idle(Instant::now(), &mut mapper);
            debug!("idle timer: {released} mapping(s) released");
            slot.dev.idle_deadline()
        };
        // Requests came in since the timer was armed: wait for the new deadline.
        if let Some(d) = next {
            self.shared.timer.arm(d);
        }
    }
}

/// Reads the request of `chain`, lets the device answer and writes the response. Returns
/// the used length (bytes written).
pub fn serve_chain<M>(
    dev: &mut Device,
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    mapper: &mut dyn Mapper,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    // The device-readable part must come first (virtio 2.7.4.2).
    let mut seen_writable = false;
    for desc in chain.clone() {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            dev.guest_warn(format_args!(
                "descriptor chain with a readable descriptor after a writable one"
            ));
            return 0;
        }
    }
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            dev.guest_warn(format_args!("descriptor chain with invalid buffers"));
            return 0;
        }
    };
    let avail = reader.available_bytes();
    // One byte more than the largest request, to tell "too long" from "exact".
    let mut req = vec![0u8; avail.min(MAX_REQ_SIZE + 1)];
    if std::io::Read::read_exact(&mut reader, &mut req).is_err() {
        dev.guest_warn(format_args!("cannot read the request"));
        return 0;
    }
    if avail > MAX_REQ_SIZE {
        // Keep the length visible to the core as "too long".
        req.resize(MAX_REQ_SIZE + 1, 0);
    }
    let resp = dev.handle(&req, writer.available_bytes(), mapper);
    if std::io::Write::write_all(&mut writer, &resp).is_err() {
        dev.guest_warn(format_args!("cannot write the response"));
        return 0;
    }
    u32::try_from(writer.bytes_written()).unwrap_or(0)
}

impl VhostUserBackend for VhuDmaheap {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | Device::device_features()
    }

    fn acked_features(&self, features: u64) {
        // No device lock in front-end message handlers (see the module comment).
        self.shared.acked_features.store(features, Ordering::SeqCst);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        info!("device reset");
        self.shared.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::SeqCst);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.shared.config.as_slice();
        let start = offset as usize;
        start
            .checked_add(size as usize)
            .and_then(|end| bytes.get(start..end))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // The handler shares `self.mem` with us; nothing to do, and no device lock may be
        // taken here (this runs while the worker may wait for a map acknowledgement).
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self
            .backend_req
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        info!("queue {queue_index} stopped: dropping all buffers");
        self.shared.reset();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event == IDLE_TIMER_EVENT {
            self.idle_timer_fired(vrings);
            return Ok(());
        }
        if device_event as usize >= NUM_QUEUES {
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        if self.event_idx.load(Ordering::SeqCst) {
            loop {
                if vring.disable_notification().is_err() {
                    return Ok(());
                }
                self.process_queue(vring)?;
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            self.process_queue(vring)?;
        }
        Ok(())
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::new(1, &[self.shared.shm_size]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::*;
    use crate::device::tests::{limits, params, FakeMapper, FakeProvider};
    use crate::device::Heap;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    const REQ: u64 = 0x10000;
    const RESP: u64 = 0x20000;

    fn setup() -> (Device, GuestMemoryMmap) {
        let heaps = vec![Heap {
            params: params("system"),
            provider: Box::new(Arc::new(FakeProvider::default())),
        }];
        let dev = Device::new(heaps, limits(), Arc::new(AtomicU64::new(1)));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        (dev, mem)
    }

    fn alloc_req(len: u64) -> Vec<u8> {
        AllocReq {
            hdr: ReqHdr {
                type_: VIRTIO_DMAHEAP_REQ_ALLOC.into(),
                reserved: 0.into(),
            },
            heap_id: 0.into(),
            flags: 0.into(),
            len: len.into(),
        }
        .as_slice()
        .to_vec()
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
    fn run(
        dev: &mut Device,
        mem: &GuestMemoryMmap,
        req: &[u8],
        descs: &[RawDescriptor],
    ) -> (u32, u32) {
        mem.write_slice(req, GuestAddress(REQ)).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(RESP)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let mut mapper = FakeMapper::default();
        let used = serve_chain(dev, chain, mem, &mut mapper);
        (used, mem.read_obj::<u32>(GuestAddress(RESP)).unwrap())
    }

    #[test]
    fn good_chain() {
        let (mut dev, mem) = setup();
        let r = alloc_req(4096);
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
        let r = alloc_req(4096);
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
        let r = alloc_req(8192);
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
            let n = serve_chain(&mut dev, chain, &mem, &mut mapper);
            q.add_used(&mem, head, n).unwrap();
            used.push(n);
        }
        assert_eq!(used, [0, 32, 32]);
        assert_eq!(dev.stats().total.buffers, 2);
    }

    #[test]
    fn reset_is_deferred_while_busy_and_maps_are_refused_after_it() {
        let (dev, _) = setup();
        let shared = Shared::new(dev).unwrap();
        let mut mapper = FakeMapper::default();
        {
            let mut slot = shared.lock();
            let r = slot.dev.alloc(0, 0, 4096, &mut mapper);
            assert!(r.is_ok());
            let gen = slot.gen;
            // A stop arrives while the worker holds the lock: it must not block.
            shared.reset();
            let mut cm = ChannelMapper {
                backend: None,
                shared: &shared,
                gen,
            };
            let file = std::fs::File::open("/dev/null").unwrap();
            use std::os::fd::AsFd;
            assert!(matches!(
                cm.map(file.as_fd(), 0, 0, 4096),
                Err(MapError::NotRunning)
            ));
            assert_eq!(slot.dev.stats().total.buffers, 1, "not yet applied");
        }
        assert_eq!(
            shared.lock().dev.stats().total.buffers,
            0,
            "applied at next lock"
        );
        assert_eq!(mapper.unmaps, 0);
    }

    /// Waits (with a deadline) until the timer's eventfd is signalled; returns the time.
    fn wait_signalled(t: &IdleTimer) -> Instant {
        let start = Instant::now();
        loop {
            if t.inner.fd.read().is_ok() {
                return Instant::now();
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "idle timer never fired"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn idle_timer_fires_at_the_latest_deadline_it_was_given() {
        use std::time::Duration;
        let t = IdleTimer::new().unwrap();
        let start = Instant::now();
        t.arm(start);
        wait_signalled(&t);
        // A later deadline given while one is pending replaces it (no early signal).
        let d1 = Instant::now() + Duration::from_millis(20);
        let d2 = d1 + Duration::from_millis(30);
        t.arm(d1);
        t.arm(d2);
        let fired = wait_signalled(&t);
        assert!(fired >= d2, "fired {:?} before the deadline", d2 - fired);
        assert!(t.inner.fd.read().is_err(), "signalled once");
        // An earlier deadline than the pending one wakes the thread up.
        let far = Instant::now() + Duration::from_secs(3600);
        t.arm(far);
        t.arm(Instant::now());
        wait_signalled(&t);
    }

    #[test]
    fn config_reads_are_bounds_checked() {
        let (dev, _) = setup();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let b = VhuDmaheap::new(Arc::new(Shared::new(dev).unwrap()), mem);
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
}
