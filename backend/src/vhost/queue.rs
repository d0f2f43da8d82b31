//! The queue path: a descriptor chain parsed into the request the device core sees, and
//! its answer written back into the chain. Chains are parsed with virtio-queue's `Reader`
//! and `Writer`; nothing a guest puts in a chain makes this fail, it only answers with an
//! error status or a used length of 0.

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemoryMmap;

use super::MemGuard;
use crate::abi::MAX_REQ_SIZE;
use crate::core::{Device, Mapper};
use crate::wire::Reply;

/// What identifies a ring across a stop: the driver's ring addresses and our indices. A
/// paused VM resumes with exactly this state (QEMU restores the avail index we reported
/// at `GET_VRING_BASE`, and the used index is read back from guest memory); a driver that
/// set the device up again after a reset does not (its indices start at 0, and a request
/// in flight means our used index was behind our avail index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RingState {
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

impl RingState {
    pub(super) fn of(q: &impl QueueT) -> Self {
        Self {
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        }
    }
}

/// A request taken off the ring that the ring stopped under.
pub(super) struct InFlight {
    pub(super) chain: DescriptorChain<MemGuard>,
    /// The answer to write, or [`Reply::Retry`]: serve it again.
    pub(super) reply: Reply,
    /// The ring just after the request was taken off it.
    pub(super) ring: RingState,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("head", &self.chain.head_index())
            .field("reply", &self.reply)
            .field("ring", &self.ring)
            .finish()
    }
}

/// Why a chain cannot be served, before the device sees it.
pub fn chain_request<M>(
    chain: &DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Result<(Vec<u8>, usize), &'static str>
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    // The device-readable part must come first (virtio 2.7.4.2).
    let mut seen_writable = false;
    for desc in chain.clone() {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err("descriptor chain with a readable descriptor after a writable one");
        }
    }
    let (mut reader, writer) = match (chain.clone().reader(mem), chain.clone().writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => return Err("descriptor chain with invalid buffers"),
    };
    let avail = reader.available_bytes();
    // One byte more than the largest request, to tell "too long" from "exact".
    let mut req = vec![0u8; avail.min(MAX_REQ_SIZE + 1)];
    if std::io::Read::read_exact(&mut reader, &mut req).is_err() {
        return Err("cannot read the request");
    }
    Ok((req, writer.available_bytes()))
}

/// Reads the request of `chain` and lets the device handle it. Writes nothing: an answer
/// goes to guest memory with [`write_answer`], once the caller knows the ring still runs.
pub fn handle_chain<M>(
    dev: &mut Device,
    chain: &DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    mapper: &mut dyn Mapper,
) -> Reply
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    match chain_request(chain, mem) {
        Ok((req, writable)) => dev.handle(&req, writable, mapper),
        Err(why) => {
            dev.guest_warn(format_args!("{why}"));
            Reply::Answer(Vec::new())
        }
    }
}

/// Writes `answer` into the chain's writable part; returns the used length.
pub fn write_answer<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap, answer: &[u8]) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    if answer.is_empty() {
        return 0;
    }
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    if std::io::Write::write_all(&mut writer, answer).is_err() {
        return 0;
    }
    u32::try_from(writer.bytes_written()).unwrap_or(0)
}

/// Serves one chain completely (handle, then write the answer); `None` if the device asks
/// for a retry. Tests and fuzzing use this; the worker splits the two steps.
pub fn serve_chain<M>(
    dev: &mut Device,
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    mapper: &mut dyn Mapper,
) -> Option<u32>
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    match handle_chain(dev, &chain, mem, mapper) {
        Reply::Answer(a) => Some(write_answer(chain, mem, &a)),
        Reply::Retry => None,
    }
}
