//! The [`Mapper`] of a running device: `SHMEM_MAP`/`SHMEM_UNMAP` over the back-end request
//! channel, refused once the ring that the request came from stopped.

use std::os::fd::BorrowedFd;

use log::debug;
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags, VhostUserSharedMsg};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::ByteValued;

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

    fn share(&mut self, uuid: &[u8; 16]) -> Result<(), MapError> {
        let backend = self.check()?;
        debug!("SHARED_OBJECT_ADD");
        backend
            .shared_object_add(&shared_msg(uuid))
            .map(|_| ())
            .map_err(shared_object_error)
    }

    fn unshare(&mut self, uuid: &[u8; 16]) -> Result<(), MapError> {
        let backend = self.check()?;
        debug!("SHARED_OBJECT_REMOVE");
        backend
            .shared_object_remove(&shared_msg(uuid))
            .map(|_| ())
            .map_err(shared_object_error)
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

/// The message of a UUID, built from its bytes (its 16 bytes are the whole message).
pub(super) fn shared_msg(uuid: &[u8; 16]) -> VhostUserSharedMsg {
    let mut msg = VhostUserSharedMsg::default();
    msg.as_mut_slice().copy_from_slice(uuid);
    msg
}

/// The UUID of a message, as bytes.
pub(super) fn shared_msg_uuid(msg: &VhostUserSharedMsg) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(msg.as_slice());
    uuid
}

/// The vhost crate refuses shared-object requests itself when the front end did not
/// negotiate `VHOST_USER_PROTOCOL_F_SHARED_OBJECT` (it has no other way to tell us).
fn shared_object_error(e: std::io::Error) -> MapError {
    if e.kind() == std::io::ErrorKind::Other && e.to_string().contains("not negotiated") {
        MapError::Unsupported
    } else {
        MapError::Refused(e)
    }
}

/// Started and enabled: the only state in which the front end copes with map requests.
pub(super) fn ring_running(vring: &VringRwLock) -> bool {
    let st = vring.get_ref();
    st.get_queue().ready() && st.is_enabled()
}
