//! The [`Mapper`] of a running device: `SHMEM_MAP`/`SHMEM_UNMAP` over the back-end request
//! channel, refused once the ring that the request came from stopped.

use std::os::fd::BorrowedFd;

use log::debug;
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;

use crate::abi::VIRTIO_DMAHEAP_SHM_BUFFERS;
use crate::core::{DeviceHandle, MapError, Mapper};

/// `Mapper` over the back-end request channel, for requests taken off the ring in one
/// epoch: it refuses ([`MapError::NotRunning`]) once the ring stopped or was disabled.
pub(super) struct ChannelMapper<'a> {
    pub(super) backend: Option<&'a Backend>,
    pub(super) handle: &'a DeviceHandle,
    pub(super) vring: &'a VringRwLock,
    pub(super) epoch: u64,
}

impl ChannelMapper<'_> {
    fn check(&self) -> Result<&Backend, MapError> {
        if !ring_running(self.vring) || self.handle.epoch() != self.epoch {
            return Err(MapError::NotRunning);
        }
        self.backend.ok_or(MapError::NoChannel)
    }
}

impl Mapper for ChannelMapper<'_> {
    fn map(
        &mut self,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
    ) -> Result<(), MapError> {
        let backend = self.check()?;
        let msg = VhostUserMMap {
            shmid: VIRTIO_DMAHEAP_SHM_BUFFERS as u8,
            padding: [0; 7],
            fd_offset,
            shm_offset,
            len,
            flags: VhostUserMMapFlags::WRITABLE.bits(),
        };
        debug!("SHMEM_MAP {shm_offset:#x}+{len:#x}");
        backend
            .shmem_map(&msg, &fd)
            .map(|_| ())
            .map_err(MapError::Refused)
    }

    fn unmap(&mut self, shm_offset: u64, len: u64) -> Result<(), MapError> {
        let backend = self.check()?;
        let msg = VhostUserMMap {
            shmid: VIRTIO_DMAHEAP_SHM_BUFFERS as u8,
            padding: [0; 7],
            fd_offset: 0,
            shm_offset,
            len,
            flags: 0,
        };
        debug!("SHMEM_UNMAP {shm_offset:#x}+{len:#x}");
        backend
            .shmem_unmap(&msg)
            .map(|_| ())
            .map_err(MapError::Refused)
    }
}

/// Started and enabled: the only state in which the front end copes with map requests.
pub(super) fn ring_running(vring: &VringRwLock) -> bool {
    let st = vring.get_ref();
    st.get_queue().ready() && st.is_enabled()
}
