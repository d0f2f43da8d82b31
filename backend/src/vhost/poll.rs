//! Ring polling: after the worker empties the ring it keeps reading the avail index for a
//! while, with the driver's notifications off, so that a request that follows soon costs
//! neither the driver's kick nor the worker's wake-up. How long it polls adapts to the
//! gaps between requests, much as KVM's halt polling does: a request that came within the
//! longest window after polling stopped (a longer window might have caught it) doubles
//! the window, one that came later halves it, down to no polling at all. A VM that
//! allocates rarely so costs at most a few windows of spinning per burst.

use std::time::{Duration, Instant};

/// The smallest window worth spinning for; a window that shrinks below it is 0.
const WINDOW_START: Duration = Duration::from_micros(10);

/// How long the worker spins between yields of its CPU while it polls: a thread the
/// scheduler queued on the same CPU (a vCPU, say, woken by the worker's own answer) then
/// waits at most this long instead of the whole window.
pub const YIELD_EVERY: Duration = Duration::from_micros(5);

/// The longest window `--poll-us` may set.
pub const WINDOW_LIMIT: Duration = Duration::from_millis(10);

/// The current polling window and what it adapts from.
#[derive(Debug)]
pub struct PollWindow {
    max: Duration,
    window: Duration,
    /// When the worker last stopped polling (or, with no window, emptied the ring).
    idle_since: Option<Instant>,
}

impl PollWindow {
    /// A window of at most `max` (0: never poll), starting at 0.
    pub fn new(max: Duration) -> Self {
        Self {
            max: max.min(WINDOW_LIMIT),
            window: Duration::ZERO,
            idle_since: None,
        }
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The worker went idle at `now`: the ring is empty and notifications are on again.
    pub fn idle(&mut self, now: Instant) {
        self.idle_since = Some(now);
    }

    /// A kick woke the worker at `now`: adapt the window to the gap since it went idle
    /// (grow if the gap was at most the longest window, else shrink).
    pub fn kicked(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        if self.max.is_zero() {
            return;
        }
        let gap = now.saturating_duration_since(since);
        if gap <= self.max {
            self.window = (self.window * 2).clamp(WINDOW_START, self.max);
        } else {
            self.window /= 2;
            if self.window < WINDOW_START {
                self.window = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Idle at `t`, kicked `gap` later; returns the window after.
    fn step(p: &mut PollWindow, t: &mut Instant, gap: Duration) -> Duration {
        p.idle(*t);
        *t += gap;
        p.kicked(*t);
        p.window()
    }

    #[test]
    fn close_requests_grow_the_window_to_the_max() {
        let mut p = PollWindow::new(us(50));
        let mut t = Instant::now();
        let seen: Vec<_> = (0..5).map(|_| step(&mut p, &mut t, us(5))).collect();
        assert_eq!(seen, [us(10), us(20), us(40), us(50), us(50)]);
    }

    #[test]
    fn distant_requests_shrink_it_to_nothing() {
        let mut p = PollWindow::new(us(50));
        let mut t = Instant::now();
        for _ in 0..4 {
            step(&mut p, &mut t, us(1));
        }
        assert_eq!(p.window(), us(50));
        let seen: Vec<_> = (0..4).map(|_| step(&mut p, &mut t, us(1000))).collect();
        assert_eq!(
            seen,
            [us(25), us(12) + Duration::from_nanos(500), us(0), us(0)]
        );
    }

    #[test]
    fn no_max_never_polls_and_the_max_is_capped() {
        let mut p = PollWindow::new(Duration::ZERO);
        let mut t = Instant::now();
        assert_eq!(step(&mut p, &mut t, us(1)), Duration::ZERO);
        let mut p = PollWindow::new(Duration::from_secs(5));
        for _ in 0..20 {
            step(&mut p, &mut t, us(1));
        }
        assert_eq!(p.window(), WINDOW_LIMIT);
    }

    #[test]
    fn a_kick_without_idle_changes_nothing() {
        let mut p = PollWindow::new(us(50));
        p.kicked(Instant::now());
        assert_eq!(p.window(), Duration::ZERO);
    }
}
