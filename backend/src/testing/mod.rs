//! Fakes and helpers shared by the unit tests, the integration tests (`backend/tests`,
//! through the test kit) and the fuzz targets (`fuzz/`): a memfd provider with fault
//! injection, a mapper that refuses what QEMU refuses, request encoders written byte by
//! byte from the header's constants, and a device built over them.
//!
//! Compiled for unit tests and with the `test-utils` feature; never in the daemon.

mod fakes;
mod requests;

pub use fakes::{CountedBuffer, FakeMapper, FakeProvider, Faults};
pub use requests::*;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::core::{CacheMode, Device, Heap, HeapParams, Limits, Mapper};
use crate::wire::Reply;

/// A heap of the default test shape: 4 KiB alignment, 64 MiB buffers, 8 MiB arenas.
pub fn heap_params(name: &str) -> HeapParams {
    HeapParams {
        name: name.into(),
        contiguous: false,
        cache: CacheMode::Cached,
        min_align: 4096,
        max_size: 64 << 20,
        max_bytes: None,
        arena_size: 8 << 20,
    }
}

/// Roomy limits: a 1 GiB window, 128 mappings.
pub fn limits() -> Limits {
    Limits {
        shm_size: 1 << 30,
        max_mappings: 128,
        max_buffers: 1 << 20,
        max_bytes: 1 << 30,
    }
}

/// A device with `heaps` over one fault-injecting provider (its faults returned).
pub fn device_with(heaps: Vec<HeapParams>, limits: Limits) -> (Device, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let heaps = heaps
        .into_iter()
        .map(|params| Heap {
            provider: Box::new(FakeProvider::new(&params.name, faults.clone())),
            params,
        })
        .collect();
    (
        Device::new(heaps, limits, Arc::new(AtomicU64::new(1))),
        faults,
    )
}

/// A device with one heap named `system`.
pub fn device() -> (Device, Arc<Faults>) {
    device_with(vec![heap_params("system")], limits())
}

/// [`Device::handle`] for a request that must be answered (not retried).
pub fn answer(d: &mut Device, req: &[u8], writable: usize, m: &mut dyn Mapper) -> Vec<u8> {
    match d.handle(req, writable, m) {
        Reply::Answer(a) => a,
        Reply::Retry => panic!("request asked for a retry"),
    }
}

/// ALLOC through [`Device::handle`]; returns (status, id, offset, len).
pub fn alloc(d: &mut Device, m: &mut FakeMapper, heap: u32, len: u64) -> (u32, u64, u64, u64) {
    let mut resp = answer(d, &alloc_req(heap, 0, len), ALLOC_RESP_SIZE, m);
    // A failure may be answered with the header only.
    resp.resize(ALLOC_RESP_SIZE, 0);
    (
        le32(&resp, 0),
        le64(&resp, 8),
        le64(&resp, 16),
        le64(&resp, 24),
    )
}

/// ASSIGN_UUID through [`Device::handle`]; returns (status, uuid).
pub fn assign_uuid(d: &mut Device, m: &mut FakeMapper, id: u64) -> (u32, [u8; 16]) {
    let mut resp = answer(d, &assign_uuid_req(id), ASSIGN_UUID_RESP_SIZE, m);
    resp.resize(ASSIGN_UUID_RESP_SIZE, 0);
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&resp[8..24]);
    (le32(&resp, 0), uuid)
}

/// FREE through [`Device::handle`]; returns the status.
pub fn free(d: &mut Device, m: &mut FakeMapper, id: u64) -> u32 {
    status_of(&answer(d, &free_req(id), RESP_HDR_SIZE, m))
}

/// Handles a request like the vring worker does: a request that asks for a retry (the
/// ring stopped) is served again once the ring runs (`mapper.stopped` cleared). Returns
/// the answer and whether a retry happened.
pub fn serve_with_retry(
    dev: &mut Device,
    req: &[u8],
    writable: usize,
    mapper: &mut FakeMapper,
) -> (Vec<u8>, bool) {
    match dev.handle(req, writable, mapper) {
        Reply::Answer(a) => (a, false),
        Reply::Retry => {
            assert!(mapper.stopped, "a retry while the ring runs");
            mapper.stopped = false;
            match dev.handle(req, writable, mapper) {
                Reply::Answer(a) => (a, true),
                Reply::Retry => panic!("a retry with the ring running"),
            }
        }
    }
}
