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
            let used = {
                let mut imp = self.importer.lock().unwrap_or_else(PoisonError::into_inner);
                serve_chain(&mut imp, chain, &mem)
            };
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

/// Serves one chain: reads the request from its device-readable part, answers into its
/// device-writable part; the used length (0 when the response does not fit).
pub fn serve_chain<M>(imp: &mut Importer, chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            warn!("descriptor chain with invalid buffers");
            return 0;
        }
    };
    // One byte more than a request, to tell "too long" from "exact".
    let mut req = vec![0u8; reader.available_bytes().min(proto::REQ_SIZE + 1)];
    let resp = if io::Read::read_exact(&mut reader, &mut req).is_err() {
        Resp::status(libc::EINVAL)
    } else {
        imp.handle(&req)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Req;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const REQ: u64 = 0x1000;
    const RESP: u64 = 0x2000;
    const MEM_END: u64 = 0x4000;

    fn d(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Serves one chain over `req`; (used length, the first 4 response bytes).
    fn run(req: &[u8], descs: &[RawDescriptor]) -> (u32, u32) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap();
        mem.write_slice(req, GuestAddress(REQ)).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(RESP)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        // No export socket: lookups fail with EIO; the chain handling is under test.
        let mut imp = Importer::new("/nonexistent/export.sock".into());
        let used = serve_chain(&mut imp, chain, &mem);
        (used, mem.read_obj::<u32>(GuestAddress(RESP)).unwrap())
    }

    fn req(op: u32) -> Vec<u8> {
        Req {
            op,
            ..Req::default()
        }
        .encode()
        .to_vec()
    }

    #[test]
    fn chains_good_and_malformed() {
        let resp = proto::RESP_SIZE as u32;
        let rq = proto::REQ_SIZE as u32;
        let (eio, einval, enxio) = (libc::EIO as u32, libc::EINVAL as u32, libc::ENXIO as u32);
        let untouched = 0xdead_beef;
        let lookup = req(proto::OP_LOOKUP_ONLY);
        type Case<'a> = (&'a str, Vec<u8>, Vec<RawDescriptor>, (u32, u32));
        let cases: Vec<Case> = vec![
            (
                "good",
                lookup.clone(),
                vec![d(REQ, rq, false), d(RESP, resp, true)],
                (resp, eio),
            ),
            (
                "split",
                req(proto::OP_RELEASE),
                vec![
                    d(REQ, 20, false),
                    d(REQ + 20, rq - 20, false),
                    d(RESP, 3, true),
                    d(RESP + 3, resp - 3, true),
                ],
                (resp, enxio),
            ),
            (
                "short request",
                lookup.clone(),
                vec![d(REQ, rq - 1, false), d(RESP, resp, true)],
                (resp, einval),
            ),
            (
                "long request",
                lookup.clone(),
                vec![d(REQ, rq + 8, false), d(RESP, resp, true)],
                (resp, einval),
            ),
            (
                "no request",
                vec![],
                vec![d(RESP, resp, true)],
                (resp, einval),
            ),
            (
                "response too small",
                lookup.clone(),
                vec![d(REQ, rq, false), d(RESP, resp - 1, true)],
                (0, untouched),
            ),
            (
                "no response",
                lookup.clone(),
                vec![d(REQ, rq, false)],
                (0, untouched),
            ),
            (
                "request out of memory",
                lookup.clone(),
                vec![d(MEM_END - 8, rq, false), d(RESP, resp, true)],
                (0, untouched),
            ),
            (
                "response out of memory",
                lookup.clone(),
                vec![d(REQ, rq, false), d(MEM_END - 8, resp, true)],
                (0, untouched),
            ),
            (
                "unknown op",
                req(77),
                vec![d(REQ, rq, false), d(RESP, resp, true)],
                (resp, libc::EOPNOTSUPP as u32),
            ),
        ];
        for (name, bytes, descs, want) in cases {
            assert_eq!(run(&bytes, &descs), want, "{name}");
        }
    }
}
