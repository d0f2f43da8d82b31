//! Test support shared by the integration tests: the daemon as a child process, an
//! in-process vhost-user front end doing what QEMU does, and the wire format.
//!
//! Every test binary uses a different part of it.
#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod frontend;
pub mod proto;

pub use daemon::{Counters, Daemon, Stats, DEADLINE};
pub use frontend::{Completion, FrontEnd, Seg, POISON};
pub use proto::*;
