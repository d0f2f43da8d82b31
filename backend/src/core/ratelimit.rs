//! Rate limiting of the warnings a guest can trigger: a guest must not be able to flood
//! the host log.

use std::fmt;
use std::time::{Duration, Instant};

use log::{error, warn, Level};

/// At most [`RateLimit::PER_SECOND`] warnings a second; the rest are counted and reported
/// as one line when the next second starts.
pub struct RateLimit {
    window_start: Instant,
    count: u32,
    suppressed: u64,
    logged: u64,
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("count", &self.count)
            .finish()
    }
}

impl RateLimit {
    /// Warnings logged per second.
    pub const PER_SECOND: u32 = 10;

    /// A fresh limit.
    pub fn new() -> Self {
        Self {
            window_start: Instant::now(),
            count: 0,
            suppressed: 0,
            logged: 0,
        }
    }

    /// Warnings logged so far (not counting the suppressed ones).
    pub fn logged(&self) -> u64 {
        self.logged
    }

    /// Logs `args` at `warn!` unless the limit is reached.
    pub fn warn(&mut self, args: fmt::Arguments<'_>) {
        self.emit(Level::Warn, args);
    }

    /// Logs `args` at `error!` unless the limit is reached (host failures that a guest's
    /// requests run into, once per request).
    pub fn error(&mut self, args: fmt::Arguments<'_>) {
        self.emit(Level::Error, args);
    }

    fn emit(&mut self, level: Level, args: fmt::Arguments<'_>) {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!("{} guest request warnings suppressed", self.suppressed);
            }
            self.window_start = now;
            self.count = 0;
            self.suppressed = 0;
        }
        if self.count < Self::PER_SECOND {
            self.count += 1;
            self.logged += 1;
            if level == Level::Error {
                error!("{args}");
            } else {
                warn!("{args}");
            }
        } else {
            self.suppressed += 1;
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}
