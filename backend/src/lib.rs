//! vhost-user back end of the virtio-dmaheap device: serves host DMA-BUF heaps to a guest.
//!
//! Layers: [`provider`] (host heaps), [`device`] (transport-free core), [`vhu`] (thin
//! vhost-user layer), [`daemon`] (sockets, signals), [`control`] (operator socket).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod abi;
pub mod args;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod handle;
pub mod provider;
pub mod range;
pub mod sandbox;
pub mod vhu;
