//! vhost-user back end of the virtio-dmaheap device: serves host DMA-BUF heaps to a guest.
//!
//! Layers: [`host`] (host heaps, one file per provider), [`wire`] (the request queue's
//! format), [`core`] (the transport-free device core), [`vhost`] (the thin vhost-user
//! layer), [`daemon`] (sockets, signals), [`control`] (operator socket), [`sandbox`]
//! (containment, with [`landlock`]), [`systemd`] (socket activation). [`testing`] holds
//! the fakes shared by tests and fuzzing (feature `test-utils`).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod abi;
pub mod args;
pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod export_socket;
pub mod host;
pub mod landlock;
pub mod range;
pub mod sandbox;
pub mod systemd;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vhost;
pub mod wire;
