//! The vhost-user back end: one queue; every chain is a request and its response.

use std::io;
use std::sync::{Mutex, PoisonError};

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::importer::Importer;
use crate::proto::{self, Resp};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = vm_memory::atomic::GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Queue size offered.
const QUEUE_SIZE: usize = 64;

/// The importer device's back end.
#[derive(Debug)]
pub struct VhuImporter {
    importer: Mutex<Importer>,
    mem: Mem,
}

impl VhuImporter {
    /// A back end reading guest memory through `mem` (the daemon's atomic).
    pub fn new(importer: Importer, mem: Mem) -> Self {
        Self {
            importer: Mutex::new(importer),
            mem,
        }
    }

    /// Serves one chain; the used length.
    fn serve(&self, chain: DescriptorChain<MemGuard>, mem: &GuestMemoryMmap) -> u32 {
        let (reader, writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                warn!("descriptor chain with invalid buffers");
                return 0;
            }
        };
        let (mut reader, mut writer) = (reader, writer);
        // One byte more than a request, to tell "too long" from "exact".
        let mut req = vec![0u8; reader.available_bytes().min(proto::REQ_SIZE + 1)];
        let resp = if io::Read::read_exact(&mut reader, &mut req).is_err() {
            Resp::status(libc::EINVAL)
        } else {
            self.importer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .handle(&req)
        };
        if writer.available_bytes() < proto::RESP_SIZE {
            warn!(
                "response space of {} bytes, want {}: nothing written",
                writer.available_bytes(),
                proto::RESP_SIZE
            );
            return 0;
        }
        if io::Write::write_all(&mut writer, &resp.encode()).is_err() {
            return 0;
        }
        u32::try_from(writer.bytes_written()).unwrap_or(0)
    }

    fn drain(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.memory();
        let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(e) => {
                warn!("queue: {e}");
                return Ok(());
            }
        };
        if chains.is_empty() {
            return Ok(());
        }
        for chain in chains {
            let head = chain.head_index();
            let used = self.serve(chain, &mem);
            if let Err(e) = vring.add_used(head, used) {
                warn!("add_used: {e}");
            }
        }
        if let Err(e) = vring.signal_used_queue() {
            warn!("signal_used_queue: {e}");
        }
        Ok(())
    }
}

impl VhostUserBackend for VhuImporter {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIGURE_MEM_SLOTS: every buffer the dmaheap device maps into its window is a
        // guest RAM region that QEMU adds to this back end's memory table too.
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never an Err for what the guest sends: that would end the worker.
        if let Some(vring) = vrings.get(device_event as usize) {
            self.drain(vring)?;
        }
        Ok(())
    }
}
