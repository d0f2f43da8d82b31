//! Thin vhost-user layer: implements `VhostUserBackend` on top of the device core.
//!
//! * [`queue`]: a descriptor chain to a request, and the answer back into it;
//! * [`poll`]: how long the worker keeps reading the ring after emptying it;
//! * [`shmem`]: the [`crate::core::Mapper`] over the back-end request channel;
//! * [`timer`]: the vring worker's timerfd.
//!
//! Rules from the environment this follows:
//! * shared-memory requests (`SHMEM_MAP`/`SHMEM_UNMAP`) go out only from the vring worker
//!   thread, while processing a guest request on a running queue (QEMU 11.1 crashes on one
//!   for a stopped device, and deadlocks on one sent while it waits for a reply);
//! * `GET_VRING_BASE` (`stop_vring`) is not a reset: QEMU sends it when the VM is paused
//!   too, and keeps the window's mappings then. Nothing is dropped; the stop only moves the
//!   ring epoch on, so that a request still being served sends no map or unmap. The driver
//!   ends its buffers itself (SESSION_OPEN/SESSION_CLOSE, see `core::session`).
//! * a request in flight when the ring stops is kept with its answer (or, if it needed the
//!   front end, unanswered) and completed when the ring runs again with the same state: a
//!   pause resumed. If the driver set up a new ring meanwhile (a reset), it is dropped
//!   unanswered. Nothing is written to guest memory while the ring is stopped.
//! * no front-end message handler takes the device lock (`GET_CONFIG` may arrive from a
//!   vCPU thread of QEMU holding its big lock while the worker waits for QEMU's main loop
//!   to acknowledge a map).
//! * idle heaps give their spare arenas back after the idle delay
//!   ([`crate::core::Device::spare_idle_delay`]): a [`WorkerTimer`] (a timerfd in the
//!   vring worker's epoll loop, [`IDLE_TIMER_EVENT`]) wakes the worker. The same timer
//!   polls for the ring to run again after a stop. Operator requests that need the worker
//!   ([`crate::core::HostRequest`]) wake it through [`HOST_REQUEST_EVENT`].

mod poll;
mod queue;
mod shmem;
#[cfg(test)]
mod tests;
mod timer;

pub use poll::WINDOW_LIMIT as POLL_LIMIT;
pub use queue::{handle_chain, serve_chain, write_answer};
pub use timer::WorkerTimer;

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, info};
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::core::{DeviceHandle, HostRequest, RateLimit};
use crate::wire::Reply;
use poll::PollWindow;
use queue::{InFlight, RingState};
use shmem::{ring_running, ChannelMapper};

/// Queue size offered.
pub const QUEUE_SIZE: usize = 256;
/// Number of queues.
pub const NUM_QUEUES: usize = 1;
/// Event id of the [`WorkerTimer`] in the vring worker's epoll loop (0..NUM_QUEUES are the
/// queues, NUM_QUEUES is the library's own exit / vring-enable event).
pub const IDLE_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Event id of operator requests for the vring worker.
pub const HOST_REQUEST_EVENT: u16 = NUM_QUEUES as u16 + 2;

/// First poll for the ring to run again after the front end restarts the device, and the
/// longest interval between polls while it has not.
const RESTART_POLL_FIRST: Duration = Duration::from_millis(5);
const RESTART_POLL_MAX: Duration = Duration::from_secs(1);

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = vm_memory::atomic::GuestMemoryLoadGuard<GuestMemoryMmap>;

/// What the avail ring holds beyond the requests the worker took.
enum Pending {
    Empty,
    Requests,
    /// The driver's index is this far ahead: more than the queue holds, a broken ring.
    Broken(u16),
}

/// The vhost-user back end of one front-end connection.
pub struct VhuDmaheap {
    handle: Arc<DeviceHandle>,
    timer: Arc<WorkerTimer>,
    mem: Mem,
    backend_req: Mutex<Option<Backend>>,
    in_flight: Mutex<Option<InFlight>>,
    /// The ring stopped and has not been seen running since: poll for it after a restart.
    restart_pending: AtomicBool,
    restart_poll: Mutex<Duration>,
    /// How long the worker polls the ring after emptying it.
    poll: Mutex<PollWindow>,
    /// Warnings about the guest's rings (a guest must not flood the host log).
    ratelimit: Mutex<RateLimit>,
}

impl std::fmt::Debug for VhuDmaheap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhuDmaheap")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl VhuDmaheap {
    /// A back end over `handle`, reading guest memory through `mem` (the same atomic the
    /// daemon was created with), woken by `timer`, polling its ring for up to `poll_max`
    /// after emptying it (0: never; see [`poll`]).
    pub fn new(
        handle: Arc<DeviceHandle>,
        timer: Arc<WorkerTimer>,
        mem: Mem,
        poll_max: Duration,
    ) -> Self {
        Self {
            handle,
            timer,
            mem,
            backend_req: Mutex::new(None),
            in_flight: Mutex::new(None),
            restart_pending: AtomicBool::new(false),
            restart_poll: Mutex::new(RESTART_POLL_FIRST),
            poll: Mutex::new(PollWindow::new(poll_max)),
            ratelimit: Mutex::new(RateLimit::new()),
        }
    }

    fn backend_req(&self) -> Option<Backend> {
        self.backend_req
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn warn(&self, args: std::fmt::Arguments<'_>) {
        self.ratelimit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .warn(args);
    }

    fn poll_window(&self) -> MutexGuard<'_, PollWindow> {
        self.poll.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Turns the driver's notifications on or off, if the ring runs (nothing is written to
    /// a stopped ring). Returns whether requests came in that the worker has not seen
    /// (after turning them on), or `None` if the ring does not run.
    fn set_notification(vring: &VringRwLock, enable: bool) -> Option<bool> {
        let mut state = vring.get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) {
            return None;
        }
        if enable {
            state.enable_notification().ok()
        } else {
            state.disable_notification().ok().map(|()| false)
        }
    }

    /// Serves the ring until it stays empty: drains it with the driver's notifications
    /// off, polls it for the current window, and turns notifications on again (serving
    /// what came in meanwhile). Leaves them on unless the ring stopped, in which case the
    /// restart comes back here.
    fn serve_until_idle(&self, vring: &VringRwLock) -> io::Result<()> {
        loop {
            if Self::set_notification(vring, false).is_none() {
                return Ok(());
            }
            self.drain(vring)?;
            if self.poll_ring(vring) {
                continue;
            }
            if Self::set_notification(vring, true).is_none() {
                return Ok(());
            }
            // A request that came before notifications were on again brought no kick.
            match self.pending(vring) {
                Some(Pending::Requests) => continue,
                Some(Pending::Broken(ahead)) => {
                    self.warn(format_args!(
                        "the driver's avail index is {ahead} entries ahead of the device, \
                         more than the queue holds: ring ignored until set up again"
                    ));
                    break;
                }
                Some(Pending::Empty) | None => break,
            }
        }
        self.poll_window().idle(Instant::now());
        Ok(())
    }

    /// What the avail ring holds that the worker has not taken; `None` if the ring does
    /// not run.
    fn pending(&self, vring: &VringRwLock) -> Option<Pending> {
        let mem = self.mem.memory();
        let state = vring.get_ref();
        let queue = state.get_queue();
        if !(queue.ready() && state.is_enabled()) {
            return None;
        }
        let idx = queue.avail_idx(&*mem, Ordering::Acquire).ok()?;
        let ahead = idx.0.wrapping_sub(queue.next_avail());
        Some(match ahead {
            0 => Pending::Empty,
            n if n <= queue.size() => Pending::Requests,
            n => Pending::Broken(n),
        })
    }

    /// Reads the avail index for up to the current poll window, giving its CPU away every
    /// `YIELD_EVERY`. True as soon as a request is there; false when the window ends, the
    /// ring stops or its index is broken.
    fn poll_ring(&self, vring: &VringRwLock) -> bool {
        let window = self.poll_window().window();
        if window.is_zero() {
            return false;
        }
        let start = Instant::now();
        let mut yielded = start;
        loop {
            match self.pending(vring) {
                Some(Pending::Empty) => {}
                Some(Pending::Requests) => return true,
                Some(Pending::Broken(_)) | None => return false,
            }
            let now = Instant::now();
            if now.duration_since(start) >= window {
                return false;
            }
            if now.duration_since(yielded) >= poll::YIELD_EVERY {
                std::thread::yield_now();
                yielded = now;
            } else {
                std::hint::spin_loop();
            }
        }
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
            self.warn(format_args!("add_used: {e}"));
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
            // Also turns the notifications back on that a stop in the middle of polling left
            // off.
            if let Err(e) = self.serve_until_idle(vring) {
                self.warn(format_args!("serving the ring after a restart: {e}"));
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
            let now = Instant::now();
            let released = dev.release_idle(now, &mut mapper);
            if released > 0 {
                debug!("idle timer: {released} mapping(s) released");
            }
            let retained = dev.poll_retained(now);
            if retained > 0 {
                debug!("idle timer: {retained} retained buffer(s) released by their importers");
            }
            if released + retained > 0 {
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
            | self.handle.device_features()
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
        let base = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        // Only when the operator asks for it: QEMU 11.1.3's table is broken (spec A.5).
        if self.handle.shared_object_table() {
            base | VhostUserProtocolFeatures::SHARED_OBJECT
        } else {
            base
        }
    }

    fn reset_device(&self) {
        // Only with VHOST_USER_PROTOCOL_F_RESET_DEVICE, which this back end does not offer
        // (QEMU 11.1 would not send it for this device anyway).
        info!("device reset by the front end: dropping all buffers");
        *self.in_flight() = None;
        self.handle.forget_all_later();
    }

    fn set_event_idx(&self, enabled: bool) {
        // The library sets the queue up for it; turning notifications on and off goes
        // through the queue, which knows which of the two ways to suppress them applies.
        debug!("VIRTIO_RING_F_EVENT_IDX: {enabled}");
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
        self.poll_window().kicked(Instant::now());
        self.serve_until_idle(vring)
    }

    /// Another back end looks up a UUID this device registered (QEMU sends this while its
    /// main loop waits): answered from the export table, never with the device lock. No
    /// export: an error, which the vhost crate answers with no fd.
    fn get_shared_object(&self, uuid: VhostUserSharedMsg) -> io::Result<File> {
        let bytes = shmem::shared_msg_uuid(&uuid);
        let name = crate::core::export::uuid_string(&bytes);
        match self.handle.shared_object(&bytes) {
            Some((f, _)) => {
                debug!("GET_SHARED_OBJECT {name}: answered");
                Ok(f)
            }
            None => {
                self.warn(format_args!(
                    "GET_SHARED_OBJECT {name}: no such export (withdrawn or never assigned)"
                ));
                Err(io::Error::from_raw_os_error(libc::ENOENT))
            }
        }
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::new(1, &[self.handle.shm_size()]))
    }
}
