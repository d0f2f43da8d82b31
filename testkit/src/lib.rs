//! The test kit of vhost-user-dmaheap: what its integration tests and its bench share.
//!
//! - [`daemon`]: the real `vhost-user-dmaheap` binary as a child process, started on a
//!   listening socket handed over with `--socket-fd` (no start-up race), with a control
//!   socket client (`stats`, `buffers`, `peek`, `poke`), a watchdog that kills a daemon a
//!   hung test still holds, and its stderr printed when a test fails.
//! - [`frontend`]: an in-process vhost-user front end that does what QEMU 11.1 does for
//!   this device: protocol features CONFIG, BACKEND_REQ, REPLY_ACK, SHMEM,
//!   CONFIGURE_MEM_SLOTS, and SHARED_OBJECT when offered (its table of UUIDs fed by
//!   SHARED_OBJECT_ADD/REMOVE, GET_SHARED_OBJECT sent as the vhost-user spec says); GET_SHMEM_CONFIG and GET_CONFIG at realize; SET_FEATURES,
//!   SET_MEM_TABLE and the ring at DRIVER_OK; a split virtqueue built by hand in memfd
//!   guest memory; the buffer window where SHMEM_MAP / SHMEM_UNMAP are really mmapped,
//!   each mapping also pushed to the daemon's memory table with ADD_MEM_REG / REM_MEM_REG
//!   before the map is acknowledged (as QEMU's memory listener does). Whatever QEMU would
//!   refuse or crash on (overlapping or out-of-range maps, unknown unmaps, maps or unmaps
//!   while the device is stopped) is recorded as a violation, and a front end with
//!   violations fails its test when dropped. Fault injection: refuse or stall SHMEM_MAP,
//!   refuse SHMEM_UNMAP, cut both channels like a killed VMM.
//! - [`export`]: a client of the daemon's export socket (UUID -> the buffer's file).
//! - [`proto`]: the wire format: the constants and sizes of the daemon's header-checked
//!   `abi.rs`, the shared request encoders (`vhost_user_dmaheap::testing`), response
//!   parsers.
#![allow(clippy::unwrap_used, missing_debug_implementations)]

pub mod daemon;
pub mod export;
pub mod frontend;
pub mod proto;

pub use daemon::{Counters, Daemon, Stats, DEADLINE};
pub use export::ExportClient;
pub use frontend::{parse_alloc, Completion, FrontEnd, Seg, POISON};
pub use proto::*;
