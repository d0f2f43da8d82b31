//! A raw vhost-user front end for hostile-guest tests: full control of the descriptor table,
//! the avail ring and the vhost-user socket, to send what no honest driver (and no helper of
//! the shared front end) sends: descriptors outside guest memory, writable-then-readable
//! chains, loops, broken indirect tables, out-of-range heads, avail index jumps, and
//! vhost-user messages with arbitrary fields.
//!
//! SHMEM_MAP requests are accepted without mapping anything (the tests here never touch the
//! window), SHMEM_UNMAP too.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::frontend::poll_in;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserMMap};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::common::{Daemon, DEADLINE};

/// Queue size of the raw ring.
pub const QSIZE: u16 = 64;
/// Guest-physical base of guest RAM.
pub const BASE: u64 = 0x2_0000_0000;
/// Guest RAM size.
pub const MEM: u64 = 0x20_0000;
/// Offsets (from BASE) of the rings and of free data space.
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const DATA: u64 = 0x10000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Accepts every backend request without doing anything.
struct AcceptAll;

impl VhostUserFrontendReqHandler for AcceptAll {
    fn shmem_map(&self, _req: &VhostUserMMap, _fd: &dyn AsRawFd) -> HandlerResult<u64> {
        Ok(0)
    }

    fn shmem_unmap(&self, _req: &VhostUserMMap) -> HandlerResult<u64> {
        Ok(0)
    }
}

/// One descriptor: (guest address, len, flags, next).
pub type Desc = (u64, u32, u16, u16);

/// The raw front end.
pub struct Raw {
    /// Kept for the connection's lifetime (dropping it would close the socket).
    _fe: Frontend,
    /// A clone of the front-end socket, for raw messages.
    pub sock: UnixStream,
    pub mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    stop: Arc<AtomicBool>,
    handler: Option<JoinHandle<()>>,
    avail_idx: u16,
    pub last_used: u16,
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raw")
            .field("avail_idx", &self.avail_idx)
            .field("last_used", &self.last_used)
            .finish_non_exhaustive()
    }
}

impl Raw {
    /// Connects and does QEMU's start-up (features, backend channel, memory table, ring).
    pub fn connect(daemon: &Daemon) -> Raw {
        let stream = UnixStream::connect(daemon.socket_path()).unwrap();
        let sock = stream.try_clone().unwrap();
        let mut fe = Frontend::from_stream(stream, 1);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::SHMEM
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        )
        .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.get_shmem_config().unwrap();

        let mut handler = FrontendReqHandler::new(Arc::new(AcceptAll)).unwrap();
        handler.set_reply_ack_flag(true);
        fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handler = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if poll_in(handler.as_raw_fd(), Duration::from_millis(50))
                    && matches!(
                        handler.handle_request(),
                        Err(vhost::vhost_user::Error::Disconnected)
                    )
                {
                    return;
                }
            }
        });
        let acked = offered
            & (VIRTIO_F_VERSION_1 | proto_bit | VIRTIO_RING_F_INDIRECT_DESC | 1/* F_SYNC */);
        fe.set_features(acked).unwrap();

        // SAFETY: plain syscall with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"raw-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(MEM).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(BASE),
            MEM as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let region = mem.find_region(GuestAddress(BASE)).unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        fe.set_mem_table(&[info]).unwrap();

        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let hva = |off: u64| mem.get_host_address(GuestAddress(BASE + off)).unwrap() as u64;
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: hva(DESC),
                used_ring_addr: hva(USED),
                avail_ring_addr: hva(AVAIL),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Raw {
            _fe: fe,
            sock,
            mem,
            kick,
            call,
            stop,
            handler: Some(handler),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn gpa(off: u64) -> u64 {
        BASE + off
    }

    pub fn write(&self, off: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(BASE + off))
            .unwrap();
    }

    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(BASE + off))
            .unwrap();
        v
    }

    /// Writes descriptor `i` of the table at `table` (offset from BASE).
    pub fn desc_at(&self, table: u64, i: u16, d: Desc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.0.to_le_bytes());
        b[8..12].copy_from_slice(&d.1.to_le_bytes());
        b[12..14].copy_from_slice(&d.2.to_le_bytes());
        b[14..16].copy_from_slice(&d.3.to_le_bytes());
        self.write(table + 16 * u64::from(i), &b);
    }

    /// Writes descriptors 0.. of the main table.
    pub fn descs(&self, ds: &[Desc]) {
        for (i, d) in ds.iter().enumerate() {
            self.desc_at(DESC, i as u16, *d);
        }
    }

    /// Puts `head` on the avail ring and publishes it (no kick).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the avail index as is (for jumps).
    pub fn set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        self.write(AVAIL + 2, &idx.to_le_bytes());
        fence(Ordering::SeqCst);
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le_bytes(self.read(USED + 2, 2).try_into().unwrap())
    }

    /// Waits up to `timeout` for the next used entry: (id, len).
    pub fn next_used(&mut self, timeout: Duration) -> Option<(u32, u32)> {
        let start = Instant::now();
        loop {
            if self.used_idx() != self.last_used {
                let slot = u64::from(self.last_used % QSIZE);
                let e = self.read(USED + 4 + 8 * slot, 8);
                self.last_used = self.last_used.wrapping_add(1);
                return Some((
                    u32::from_le_bytes(e[0..4].try_into().unwrap()),
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                ));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return None;
            }
            if poll_in(self.call.as_raw_fd(), left.min(Duration::from_millis(20))) {
                let _ = self.call.read();
            }
        }
    }

    /// Publishes chain `head` (descriptors already written), kicks, waits for its used
    /// entry and returns the used length.
    pub fn run(&mut self, head: u16) -> u32 {
        self.publish(head);
        self.kick();
        let (id, len) = self
            .next_used(DEADLINE)
            .unwrap_or_else(|| panic!("chain {head} was not used within {DEADLINE:?}"));
        assert_eq!(id, u32::from(head), "used id");
        len
    }

    /// A well-formed HEAP_INFO in descriptors 62 and 63: returns (used len, status).
    pub fn heap_info_ok(&mut self) -> (u32, u32) {
        let req = [1u32.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat();
        self.write(DATA + 0x8000, &req);
        self.write(DATA + 0x8100, &[0xa5; 72]);
        self.desc_at(DESC, 62, (Self::gpa(DATA + 0x8000), 16, F_NEXT, 63));
        self.desc_at(DESC, 63, (Self::gpa(DATA + 0x8100), 72, F_WRITE, 0));
        let used = self.run(62);
        let st = u32::from_le_bytes(self.read(DATA + 0x8100, 4).try_into().unwrap());
        (used, st)
    }

    /// Sends one raw vhost-user message (header + body) on the front-end socket and reads
    /// the reply if one comes within `timeout`: (request, flags, body) or None.
    pub fn raw_message(
        &mut self,
        request: u32,
        body: &[u8],
        size_field: u32,
        timeout: Duration,
    ) -> Option<(u32, u32, Vec<u8>)> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&0x1u32.to_le_bytes()); // version 1, no NEED_REPLY
        msg.extend_from_slice(&size_field.to_le_bytes());
        msg.extend_from_slice(body);
        if self.sock.write_all(&msg).is_err() {
            return None;
        }
        if !poll_in(self.sock.as_raw_fd(), timeout) {
            return None;
        }
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr).ok()?;
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size.min(4096)];
        self.sock.read_exact(&mut body).ok()?;
        Some((
            u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
            u32::from_le_bytes(hdr[4..8].try_into().unwrap()),
            body,
        ))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}
