//! How the core asks for mappings in the shared memory window (region
//! `VIRTIO_DMAHEAP_SHM_BUFFERS`): the vhost-user layer sends `SHMEM_MAP`/`SHMEM_UNMAP`,
//! tests use a fake.

use std::io;
use std::os::fd::BorrowedFd;

/// Errors a [`Mapper`] reports.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The device is not running (not started, or stopped since the request arrived).
    #[error("device not running")]
    NotRunning,
    /// No back-end request channel.
    #[error("no back-end request channel")]
    NoChannel,
    /// The front end refused the request or the channel failed.
    #[error("front end refused the request")]
    Refused(#[source] io::Error),
}

/// Maps host buffers into the shared memory window.
pub trait Mapper {
    /// Maps `len` bytes of `fd` from `fd_offset` at `shm_offset` in the window, writable.
    fn map(
        &mut self,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
    ) -> Result<(), MapError>;
    /// Unmaps `[shm_offset, shm_offset + len)`.
    fn unmap(&mut self, shm_offset: u64, len: u64) -> Result<(), MapError>;
}
