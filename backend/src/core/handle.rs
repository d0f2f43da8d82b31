//! The device handle: the device core behind its lock, plus what the vhost-user layer, the
//! control socket and the daemon loop share about it without taking that lock (the ring
//! epoch, a statistics snapshot, operator requests for the vring worker).
//!
//! The device lock may be held by the vring worker for a whole `SHMEM_MAP` round trip, so
//! nothing that answers the front end or an operator waits for it: `stats` reads the
//! snapshot the worker publishes after every request, and debug commands give up after a
//! deadline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Device, ExportTable, Stats, Uuid};
use crate::abi::Config;

/// How long a host request may wait for the vring worker.
pub const HOST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from the operator that only the vring worker can carry out (it sends
/// `SHMEM_UNMAP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRequest {
    /// End the driver's session: unmap every buffer and release all host memory, so that a
    /// reset of the VM finds the window empty (see `ctl prepare-reset`).
    PrepareReset,
}

/// What the worker did with a [`HostRequest`].
pub type HostResult = Result<String, String>;

#[derive(Debug, Default)]
struct HostMailbox {
    pending: Option<HostRequest>,
    result: Option<HostResult>,
}

/// The device and everything shared about it.
#[derive(Debug)]
pub struct DeviceHandle {
    dev: Mutex<Device>,
    /// Set by a front-end reset (RESET_DEVICE): the next lock drops everything first.
    forget: AtomicBool,
    /// Counts ring stops; a request taken off the ring in one epoch must not send
    /// `SHMEM_MAP`/`SHMEM_UNMAP` in a later one.
    epoch: AtomicU64,
    acked_features: AtomicU64,
    /// The device-specific features offered.
    device_features: u64,
    /// The export table (`GET_SHARED_OBJECT` reads it without the device lock).
    exports: Arc<ExportTable>,
    shared_object_table: bool,
    reopen_dir: Option<i32>,
    connected: AtomicBool,
    config: Config,
    shm_size: u64,
    stats: Mutex<Stats>,
    mailbox: Mutex<HostMailbox>,
    mailbox_cv: Condvar,
    /// Wakes the vring worker for a [`HostRequest`].
    host_wake: EventFd,
}

impl DeviceHandle {
    /// Wraps a device.
    pub fn new(dev: Device) -> std::io::Result<Self> {
        Ok(Self {
            config: dev.config(),
            shm_size: dev.limits().shm_size,
            stats: Mutex::new(dev.stats()),
            forget: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            acked_features: AtomicU64::new(dev.device_features()),
            device_features: dev.device_features(),
            exports: dev.export_table(),
            shared_object_table: dev.shared_object_table(),
            reopen_dir: dev.reopen_dir(),
            connected: AtomicBool::new(false),
            mailbox: Mutex::new(HostMailbox::default()),
            mailbox_cv: Condvar::new(),
            host_wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            dev: Mutex::new(dev),
        })
    }

    fn apply_forget(&self, dev: &mut Device) {
        if self.forget.swap(false, Ordering::SeqCst) {
            dev.disconnect();
            self.publish(dev);
        }
    }

    /// Locks the device (the vring worker, and the daemon between connections).
    pub fn lock(&self) -> MutexGuard<'_, Device> {
        let mut g = self.dev.lock().unwrap_or_else(PoisonError::into_inner);
        self.apply_forget(&mut g);
        g
    }

    /// Locks the device, giving up after `timeout` (for operators: the worker may hold the
    /// lock while the front end does not answer).
    pub fn lock_timeout(&self, timeout: Duration) -> Option<MutexGuard<'_, Device>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.dev.try_lock() {
                Ok(mut g) => {
                    self.apply_forget(&mut g);
                    return Some(g);
                }
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
                Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// The front end reset the device (RESET_DEVICE): its mappings are gone. The records
    /// are dropped by whoever takes the lock next, not here (this runs on the front-end
    /// message thread, while the front end waits).
    pub fn forget_all_later(&self) {
        self.forget.store(true, Ordering::SeqCst);
        self.bump_epoch();
    }

    /// A new front end connected.
    pub fn connect(&self) {
        self.connected.store(true, Ordering::SeqCst);
    }

    /// The front end went away (its vring worker has ended): drops every buffer, mapping
    /// and session without unmapping, and releases their host memory now.
    pub fn disconnect(&self) {
        self.connected.store(false, Ordering::SeqCst);
        self.bump_epoch();
        let mut dev = self.dev.lock().unwrap_or_else(PoisonError::into_inner);
        self.forget.store(false, Ordering::SeqCst);
        dev.disconnect();
        self.publish(&dev);
        drop(dev);
        self.finish_host_request(Err("the front end disconnected".into()));
    }

    /// The ring stopped (or the device was reset).
    pub fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The current ring epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Records the features the driver accepted (the device reads them per request).
    pub fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::SeqCst);
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::SeqCst)
    }

    /// The device-specific feature bits offered.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The export registered under `uuid` (a new fd of it), for `GET_SHARED_OBJECT`;
    /// never waits for the device.
    pub fn shared_object(&self, uuid: &Uuid) -> Option<(std::fs::File, u64)> {
        self.exports.lookup(uuid)
    }

    /// The export table (for the export socket's lookups; never the device lock).
    pub fn export_table(&self) -> Arc<ExportTable> {
        self.exports.clone()
    }

    /// The `/proc/self/fd` fd through which shared memfd buffers are reopened (the sandbox
    /// must allow `openat` on it), if release watching could be set up.
    pub fn reopen_dir(&self) -> Option<i32> {
        self.reopen_dir
    }

    /// Whether UUIDs are registered with the front end (`--shared-object-table`).
    pub fn shared_object_table(&self) -> bool {
        self.shared_object_table
    }

    /// The configuration space.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Size of the buffer window.
    pub fn shm_size(&self) -> u64 {
        self.shm_size
    }

    /// Publishes the device's counters for `stats` (call with the device locked, after
    /// every change).
    pub fn publish(&self, dev: &Device) {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = dev.stats();
    }

    /// The counters as last published; never waits for the device.
    pub fn stats(&self) -> Stats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The eventfd that wakes the vring worker for a host request.
    pub fn host_wake_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.host_wake)
    }

    /// Asks the vring worker to carry out `req` and waits (up to `timeout`) for it.
    pub fn host_request(&self, req: HostRequest, timeout: Duration) -> HostResult {
        if !self.connected.load(Ordering::SeqCst) {
            return Err("no front end is connected".into());
        }
        let mut mb = self.mailbox.lock().unwrap_or_else(PoisonError::into_inner);
        if mb.pending.is_some() {
            return Err("another request is in progress".into());
        }
        mb.pending = Some(req);
        mb.result = None;
        if let Err(e) = self.host_wake.write(1) {
            mb.pending = None;
            return Err(format!("cannot wake the vring worker: {e}"));
        }
        let deadline = Instant::now() + timeout;
        while mb.result.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                mb.pending = None;
                return Err(format!(
                    "the vring worker did not carry it out within {timeout:?} (is the VM \
                     paused?)"
                ));
            }
            mb = self
                .mailbox_cv
                .wait_timeout(mb, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        mb.result.take().unwrap_or_else(|| Err("no result".into()))
    }

    /// The vring worker takes the pending host request (after its eventfd fired).
    pub fn take_host_request(&self) -> Option<HostRequest> {
        // Nothing to read (EAGAIN) is fine: a request may be taken on another wake-up.
        let _ = self.host_wake.read();
        self.mailbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
    }

    /// The vring worker reports what it did with the pending host request.
    pub fn finish_host_request(&self, result: HostResult) {
        let mut mb = self.mailbox.lock().unwrap_or_else(PoisonError::into_inner);
        if mb.pending.take().is_some() {
            mb.result = Some(result);
            self.mailbox_cv.notify_all();
        }
    }
}
