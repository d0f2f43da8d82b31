//! Thin vhost-user layer: implements `VhostUserBackend` on top of the device core.
//!
//! Rules from the environment this follows:
//! * shared-memory requests (`SHMEM_MAP`/`SHMEM_UNMAP`) go out only from the vring worker
//!   thread, while processing a guest request on a running queue (QEMU 11.1 crashes on one
//!   for a stopped device, and deadlocks on one sent while it waits for a reply);
//! * `GET_VRING_BASE` (`stop_vring`) is not a reset: QEMU sends it when the VM is paused
//!   too, and keeps the window's mappings then. Nothing is dropped; the stop only moves the
//!   ring epoch on, so that a request still being served sends no map or unmap. The driver
//!   ends its buffers itself (SESSION_OPEN/SESSION_CLOSE, see `device::session`).
//! * a request in flight when the ring stops is kept with its answer (or, if it needed the
//!   front end, unanswered) and completed when the ring runs again with the same state: a
//!   pause resumed. If the driver set up a new ring meanwhile (a reset), it is dropped
//!   unanswered. Nothing is written to guest memory while the ring is stopped.
//! * no front-end message handler takes the device lock (`GET_CONFIG` may arrive from a
//!   vCPU thread of QEMU holding its big lock while the worker waits for QEMU's main loop
//!   to acknowledge a map).
//! * idle heaps give their spare arenas back after [`crate::device::SPARE_IDLE_DELAY`]: an
//!   [`IdleTimer`] wakes the vring worker (an extra event source of its epoll loop,
//!   [`IDLE_TIMER_EVENT`]). The same timer polls for the ring to run again after a stop.
//!   Operator requests that need the worker ([`crate::handle::HostRequest`]) wake it
//!   through [`HOST_REQUEST_EVENT`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostUserMMap, VhostUserMMapFlags, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::abi::{MAX_REQ_SIZE, VIRTIO_DMAHEAP_SHM_BUFFERS};
use crate::device::{Device, MapError, Mapper, Reply};
use crate::handle::{DeviceHandle, HostRequest};

/// Queue size offered.
pub const QUEUE_SIZE: usize = 256;
/// Number of queues.
pub const NUM_QUEUES: usize = 1;
/// Event id of the [`IdleTimer`] in the vring worker's epoll loop (0..NUM_QUEUES are the
/// queues, NUM_QUEUES is the library's own exit / vring-enable event).
pub const IDLE_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Event id of operator requests for the vring worker.
pub const HOST_REQUEST_EVENT: u16 = NUM_QUEUES as u16 + 2;

/// How long a host request may wait for the vring worker.
pub const HOST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// First poll for the ring to run again after the front end restarts the device, and the
/// longest interval between polls while it has not.
const RESTART_POLL_FIRST: Duration = Duration::from_millis(5);
const RESTART_POLL_MAX: Duration = Duration::from_secs(1);

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

/// `Mapper` over the back-end request channel, for requests taken off the ring in one
/// epoch: it refuses ([`MapError::NotRunning`]) once the ring stopped or was disabled.
struct ChannelMapper<'a> {
    backend: Option<&'a Backend>,
    handle: &'a DeviceHandle,
    vring: &'a VringRwLock,
    epoch: u64,
}

impl ChannelMapper<'_> {
    fn check(&self) -> Result<&Backend, MapError> {
        if !ring_running(self.vring) || self.handle.epoch() != self.epoch {
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

/// Started and enabled: the only state in which the front end copes with map requests.
fn ring_running(vring: &VringRwLock) -> bool {
    let st = vring.get_ref();
    st.get_queue().ready() && st.is_enabled()
}

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = vm_memory::atomic::GuestMemoryLoadGuard<GuestMemoryMmap>;

/// What identifies a ring across a stop: the driver's ring addresses and our indices. A
/// paused VM resumes with exactly this state (QEMU restores the avail index we reported
/// at `GET_VRING_BASE`, and the used index is read back from guest memory); a driver that
/// set the device up again after a reset does not (its indices start at 0, and a request
/// in flight means our used index was behind our avail index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RingState {
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

impl RingState {
    fn of(q: &impl QueueT) -> Self {
        Self {
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        }
    }
}

/// A request taken off the ring that the ring stopped under.
struct InFlight {
    chain: DescriptorChain<MemGuard>,
    /// The answer to write, or [`Reply::Retry`]: serve it again.
    reply: Reply,
    /// The ring just after the request was taken off it.
    ring: RingState,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("head", &self.chain.head_index())
            .field("reply", &self.reply)
            .field("ring", &self.ring)
            .finish()
    }
}

/// Why a chain cannot be served, before the device sees it.
fn chain_request<M>(
    chain: &DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Result<(Vec<u8>, usize), &'static str>
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    // The device-readable part must come first (virtio 2.7.4.2).
    let mut seen_writable = false;
    for desc in chain.clone() {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err("descriptor chain with a readable descriptor after a writable one");
        }
    }
    let (mut reader, writer) = match (chain.clone().reader(mem), chain.clone().writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => return Err("descriptor chain with invalid buffers"),
    };
    let avail = reader.available_bytes();
    // One byte more than the largest request, to tell "too long" from "exact".
    let mut req = vec![0u8; avail.min(MAX_REQ_SIZE + 1)];
    if std::io::Read::read_exact(&mut reader, &mut req).is_err() {
        return Err("cannot read the request");
    }
    Ok((req, writer.available_bytes()))
}

/// Reads the request of `chain` and lets the device handle it. Writes nothing: an answer
/// goes to guest memory with [`write_answer`], once the caller knows the ring still runs.
pub fn handle_chain<M>(
    dev: &mut Device,
    chain: &DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    mapper: &mut dyn Mapper,
) -> Reply
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    match chain_request(chain, mem) {
        Ok((req, writable)) => dev.handle(&req, writable, mapper),
        Err(why) => {
            dev.guest_warn(format_args!("{why}"));
            Reply::Answer(Vec::new())
        }
    }
}

/// Writes `answer` into the chain's writable part; returns the used length.
pub fn write_answer<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap, answer: &[u8]) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    if answer.is_empty() {
        return 0;
    }
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    if std::io::Write::write_all(&mut writer, answer).is_err() {
        return 0;
    }
    u32::try_from(writer.bytes_written()).unwrap_or(0)
}

/// Serves one chain completely (handle, then write the answer); `None` if the device asks
/// for a retry. Tests and fuzzing use this; the worker splits the two steps.
pub fn serve_chain<M>(
    dev: &mut Device,
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    mapper: &mut dyn Mapper,
) -> Option<u32>
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    match handle_chain(dev, &chain, mem, mapper) {
        Reply::Answer(a) => Some(write_answer(chain, mem, &a)),
        Reply::Retry => None,
    }
}

/// The vhost-user back end of one front-end connection.
pub struct VhuDmaheap {
    handle: Arc<DeviceHandle>,
    timer: Arc<IdleTimer>,
    mem: Mem,
    backend_req: Mutex<Option<Backend>>,
    event_idx: AtomicBool,
    in_flight: Mutex<Option<InFlight>>,
    /// The ring stopped and has not been seen running since: poll for it after a restart.
    restart_pending: AtomicBool,
    restart_poll: Mutex<Duration>,
}

impl std::fmt::Debug for VhuDmaheap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhuDmaheap")
            .field("handle", &self.handle)
            .field("event_idx", &self.event_idx)
            .finish_non_exhaustive()
    }
}

impl VhuDmaheap {
    /// A back end over `handle`, reading guest memory through `mem` (the same atomic the
    /// daemon was created with), woken by `timer`.
    pub fn new(handle: Arc<DeviceHandle>, timer: Arc<IdleTimer>, mem: Mem) -> Self {
        Self {
            handle,
            timer,
            mem,
            backend_req: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            in_flight: Mutex::new(None),
            restart_pending: AtomicBool::new(false),
            restart_poll: Mutex::new(RESTART_POLL_FIRST),
        }
    }

    fn backend_req(&self) -> Option<Backend> {
        self.backend_req
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn in_flight(&self) -> MutexGuard<'_, Option<InFlight>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the idle timer and the host-request eventfd with the epoll loop of the
    /// vring worker (call once per connection, on the handler that serves the queue).
    pub fn register_worker_events(&self, handler: &VringEpollHandler<Arc<Self>>) -> io::Result<()> {
        handler.register_listener(
            self.timer.as_raw_fd(),
            EventSet::IN,
            u64::from(IDLE_TIMER_EVENT),
        )?;
        handler.register_listener(
            self.handle.host_wake_fd(),
            EventSet::IN,
            u64::from(HOST_REQUEST_EVENT),
        )
    }

    /// Serves the ring: first a request the last stop left in flight, then every
    /// available chain. Never fails for a guest error.
    fn drain(&self, vring: &VringRwLock) -> io::Result<()> {
        if !ring_running(vring) {
            return Ok(());
        }
        self.restart_pending.store(false, Ordering::SeqCst);
        let backend = self.backend_req();
        let mut deadline = None;
        let res = self.serve_available(vring, backend.as_ref(), &mut deadline);
        if let Some(d) = deadline {
            self.timer.arm(d);
        }
        res
    }

    /// Serves one chain with the device locked.
    fn serve(
        &self,
        vring: &VringRwLock,
        backend: Option<&Backend>,
        chain: &DescriptorChain<MemGuard>,
        epoch: u64,
        deadline: &mut Option<Instant>,
    ) -> Reply {
        let mem = self.mem.memory();
        let mut dev = self.handle.lock();
        dev.set_acked_features(self.handle.acked_features());
        let mut mapper = ChannelMapper {
            backend,
            handle: &self.handle,
            vring,
            epoch,
        };
        let reply = handle_chain(&mut dev, chain, &mem, &mut mapper);
        *deadline = dev.idle_deadline();
        self.handle.publish(&dev);
        reply
    }

    /// The request in flight at the last stop, if the ring now runs as it was: serves it
    /// again (a retry) or completes it. Returns false while it must stay in flight.
    fn resume_in_flight(
        &self,
        vring: &VringRwLock,
        backend: Option<&Backend>,
        deadline: &mut Option<Instant>,
    ) -> io::Result<bool> {
        let Some(inf) = self.in_flight().take() else {
            return Ok(true);
        };
        let now = RingState::of(vring.get_ref().get_queue());
        if now != inf.ring {
            debug!(
                "the driver set the ring up again (device reset): dropping request {} from \
                 before the stop ({:?} then, {:?} now)",
                inf.chain.head_index(),
                inf.ring,
                now
            );
            return Ok(true);
        }
        let epoch = self.handle.epoch();
        let reply = match inf.reply {
            Reply::Retry => self.serve(vring, backend, &inf.chain, epoch, deadline),
            answer => answer,
        };
        debug!(
            "completing request {} from before the ring stopped",
            inf.chain.head_index()
        );
        self.complete(vring, inf.chain, reply, inf.ring, epoch)
    }

    /// Writes the answer and returns the chain, if the ring still runs in `epoch`; else
    /// keeps the request in flight. Returns false if it was kept.
    fn complete(
        &self,
        vring: &VringRwLock,
        chain: DescriptorChain<MemGuard>,
        reply: Reply,
        ring: RingState,
        epoch: u64,
    ) -> io::Result<bool> {
        let mut state = vring.get_mut();
        // The stop takes this lock to mark the queue not ready, so it cannot come between
        // this check and the answer.
        let running = state.get_queue().ready() && state.is_enabled();
        let answer = match reply {
            Reply::Answer(a) if running && self.handle.epoch() == epoch => a,
            reply => {
                debug!(
                    "ring stopped under request {}: kept until it runs again",
                    chain.head_index()
                );
                *self.in_flight() = Some(InFlight { chain, reply, ring });
                drop(state);
                self.restart_pending.store(true, Ordering::SeqCst);
                self.timer.arm(Instant::now() + RESTART_POLL_FIRST);
                return Ok(false);
            }
        };
        let head = chain.head_index();
        let used = write_answer(chain, &self.mem.memory(), &answer);
        if let Err(e) = state.add_used(head, used) {
            warn!("add_used: {e}");
            return Ok(true);
        }
        drop(state);
        if vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(true)
    }

    /// The loop of [`Self::drain`]; leaves in `deadline` the device's idle deadline after
    /// the last request it served.
    fn serve_available(
        &self,
        vring: &VringRwLock,
        backend: Option<&Backend>,
        deadline: &mut Option<Instant>,
    ) -> io::Result<()> {
        if !self.resume_in_flight(vring, backend, deadline)? {
            return Ok(());
        }
        loop {
            let mem = self.mem.memory();
            // Pop with the vring lock held, but never keep it while serving the request:
            // the front end may stop the ring (taking this lock) while we wait for it.
            let (chain, ring, epoch) = {
                let mut state = vring.get_mut();
                let epoch = self.handle.epoch();
                let queue = state.get_queue_mut();
                if !queue.ready() {
                    return Ok(());
                }
                match queue.pop_descriptor_chain(mem) {
                    Some(c) => (c, RingState::of(queue), epoch),
                    None => break,
                }
            };
            let reply = self.serve(vring, backend, &chain, epoch, deadline);
            if !self.complete(vring, chain, reply, ring, epoch)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The timer fired: a request in flight or the ring may be waiting for a restart, and
    /// idle heaps may give their arenas back. Never fails: there is nothing the event loop
    /// could do about it.
    fn timer_fired(&self, vrings: &[VringRwLock]) {
        self.timer.consume();
        let Some(vring) = vrings.first() else {
            return;
        };
        if !ring_running(vring) {
            // The front end restarts the device (SET_FEATURES) a little before the ring:
            // poll for it with a growing interval.
            if self.restart_pending.load(Ordering::SeqCst) {
                let mut poll = self
                    .restart_poll
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                self.timer.arm(Instant::now() + *poll);
                *poll = (*poll * 2).min(RESTART_POLL_MAX);
            }
            debug!("timer: queue not running");
            return;
        }
        if self.restart_pending.load(Ordering::SeqCst) || self.in_flight().is_some() {
            if let Err(e) = self.drain(vring) {
                warn!("serving the ring after a restart: {e}");
            }
        }
        let backend = self.backend_req();
        let epoch = self.handle.epoch();
        let next = {
            let mut dev = self.handle.lock();
            let mut mapper = ChannelMapper {
                backend: backend.as_ref(),
                handle: &self.handle,
                vring,
                epoch,
            };
            let released = dev.release_idle(Instant::now(), &mut mapper);
            if released > 0 {
                debug!("idle timer: {released} mapping(s) released");
                self.handle.publish(&dev);
            }
            dev.idle_deadline()
        };
        // Requests came in since the timer was armed: wait for the new deadline.
        if let Some(d) = next {
            self.timer.arm(d);
        }
    }

    /// An operator request ([`HostRequest`]) for the worker.
    fn host_request(&self, vrings: &[VringRwLock]) {
        let Some(req) = self.handle.take_host_request() else {
            return;
        };
        let Some(vring) = vrings.first().filter(|v| ring_running(v)) else {
            self.handle.finish_host_request(Err(
                "the device is not running (VM paused, or the driver not started)".into(),
            ));
            return;
        };
        let backend = self.backend_req();
        let result = match req {
            HostRequest::PrepareReset => {
                let mut dev = self.handle.lock();
                let mut mapper = ChannelMapper {
                    backend: backend.as_ref(),
                    handle: &self.handle,
                    vring,
                    epoch: self.handle.epoch(),
                };
                let r = dev.end_session_by_host(&mut mapper);
                self.handle.publish(&dev);
                match r {
                    Ok((buffers, mappings)) => {
                        info!(
                            "prepare-reset: released {buffers} buffers and {mappings} \
                             mappings; the driver's session is ended"
                        );
                        Ok(format!(
                            "released {buffers} buffers and {mappings} mappings"
                        ))
                    }
                    Err(_) => Err("the ring stopped while unmapping: try again".into()),
                }
            }
        };
        self.handle.finish_host_request(result);
    }
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
        self.handle.set_acked_features(features);
        // QEMU negotiates features at every device start: after a stop, the ring follows.
        if self.restart_pending.load(Ordering::SeqCst) {
            *self
                .restart_poll
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = RESTART_POLL_FIRST;
            self.timer.arm(Instant::now() + RESTART_POLL_FIRST);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        // Only with VHOST_USER_PROTOCOL_F_RESET_DEVICE, which this back end does not offer
        // (QEMU 11.1 would not send it for this device anyway).
        info!("device reset by the front end: dropping all buffers");
        *self.in_flight() = None;
        self.handle.forget_all_later();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::SeqCst);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.handle.config().as_slice();
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
        // A pause or a reset: the front end does not say which. Buffers stay (see the
        // module comment); requests being served send no more maps.
        self.handle.bump_epoch();
        self.restart_pending.store(true, Ordering::SeqCst);
        info!("queue {queue_index} stopped (VM paused or device reset): buffers kept");
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            IDLE_TIMER_EVENT => {
                self.timer_fired(vrings);
                return Ok(());
            }
            HOST_REQUEST_EVENT => {
                self.host_request(vrings);
                return Ok(());
            }
            e if e as usize >= NUM_QUEUES => return Ok(()),
            _ => {}
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        if self.event_idx.load(Ordering::SeqCst) {
            loop {
                if vring.disable_notification().is_err() {
                    return Ok(());
                }
                self.drain(vring)?;
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            self.drain(vring)?;
        }
        Ok(())
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::new(1, &[self.handle.shm_size()]))
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
        let dev = Device::new(
            heaps,
            limits(),
            Arc::new(std::sync::atomic::AtomicU64::new(1)),
        );
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
        let used = serve_chain(dev, chain, mem, &mut mapper).expect("answered");
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
        mem.write_slice(&alloc_req(4096), GuestAddress(REQ))
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
        assert_eq!(dev.stats().total, crate::device::HeapStats::default());
        // Served again once the ring runs: answered in full.
        let used = serve_chain(&mut dev, chain, &mem, &mut FakeMapper::default());
        assert_eq!(used, Some(32));
        assert_eq!(dev.stats().total.buffers, 1);
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
        let b = VhuDmaheap::new(
            Arc::new(DeviceHandle::new(dev).unwrap()),
            Arc::new(IdleTimer::new().unwrap()),
            mem,
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
}
