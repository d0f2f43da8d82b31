//! How the core asks the front end for mappings in the shared memory window (region
//! `VIRTIO_DMAHEAP_SHM_BUFFERS`) and for entries in its shared-object table: the
//! vhost-user layer sends `SHMEM_MAP`/`SHMEM_UNMAP` and `SHARED_OBJECT_ADD`/`_REMOVE`,
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
    /// The front end did not negotiate what the request needs (`SHARED_OBJECT`).
    #[error("not supported by the front end")]
    Unsupported,
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
    /// Registers `uuid` in the front end's shared-object table, as exported by this
    /// device (`SHARED_OBJECT_ADD`).
    fn share(&mut self, uuid: &[u8; 16]) -> Result<(), MapError> {
        let _ = uuid;
        Err(MapError::Unsupported)
    }
    /// Withdraws `uuid` from the front end's shared-object table
    /// (`SHARED_OBJECT_REMOVE`).
    fn unshare(&mut self, uuid: &[u8; 16]) -> Result<(), MapError> {
        let _ = uuid;
        Err(MapError::Unsupported)
    }
}
