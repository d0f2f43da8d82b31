//! The vring worker's timer: a non-blocking timerfd in its epoll loop. It wakes the worker
//! when idle heaps should give their spares back, and polls for the ring after a restart.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// A one-shot timer whose fd becomes readable at the deadline last given.
#[derive(Debug)]
pub struct WorkerTimer {
    fd: TimerFd,
}

impl WorkerTimer {
    /// A disarmed timer. Created at start-up, before the syscall filter (which allows
    /// arming and reading it, not creating one).
    pub fn new() -> io::Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        Ok(Self { fd })
    }

    /// Makes the fd readable at `deadline`, replacing a pending deadline. A deadline that
    /// became moot is not cancelled: the worker then finds nothing to do.
    pub fn arm(&self, deadline: Instant) {
        // A zero expiration would disarm the timer: a deadline already passed fires at once.
        let after = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let when = Expiration::OneShot(TimeSpec::from_duration(after));
        if let Err(e) = self.fd.set(when, TimerSetTimeFlags::empty()) {
            log::error!("cannot arm the vring worker's timer: {e}");
        }
    }

    /// Clears the fd (the worker does this when it handles the event). Nothing to read
    /// (EAGAIN) is fine: the timer may have been re-armed since it fired.
    pub fn consume(&self) -> bool {
        let mut buf = [0u8; 8];
        nix::unistd::read(self.fd.as_fd(), &mut buf).is_ok_and(|n| n == 8)
    }

    /// The fd to register with the epoll loop.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}
