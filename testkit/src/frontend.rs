//! An in-process vhost-user front end that does what QEMU does for the device: feature
//! negotiation, guest memory shared through a memfd, one split virtqueue built by hand,
//! and the shared memory window where SHMEM_MAP / SHMEM_UNMAP land.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserMMap, VhostUserMMapFlags,
    VhostUserSharedMsg,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserFrontendReqHandlerMut, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::daemon::{Daemon, DEADLINE};
use super::proto::*;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Queue size of the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Guest-physical layout of the front end's guest memory.
const DESC_GPA: u64 = 0x0;
const AVAIL_GPA: u64 = 0x1000;
const USED_GPA: u64 = 0x2000;
const DATA_GPA: u64 = 0x10000;
/// Every descriptor owns one data slot of this size.
pub const SLOT_SIZE: u32 = 0x1000;
const MEM_SIZE: usize = 0x10000 + QUEUE_SIZE as usize * SLOT_SIZE as usize;
const GUEST_BASE: u64 = 0x1_0000_0000;
/// Guest-physical address of the buffer window (QEMU's BAR 4).
pub const WINDOW_GPA: u64 = 0x80_0000_0000;
/// A guest-physical address with no guest RAM behind it.
pub const UNMAPPED_GPA: u64 = 0x40_0000_0000;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// The protocol features QEMU needs from this device (see ENVIRONMENT.md).
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::SHMEM
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The protocol features QEMU 11.1 acks when the daemon offers them: the ones it needs,
/// and SHARED_OBJECT (which the daemon offers with `--shared-object-table` only).
pub fn qemu_protocol_features() -> VhostUserProtocolFeatures {
    wanted_protocol_features() | VhostUserProtocolFeatures::SHARED_OBJECT
}

fn uuid_of_msg(msg: &VhostUserSharedMsg) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(vm_memory::ByteValued::as_slice(msg));
    u
}

/// One event seen on the backend request channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShmEvent {
    Map {
        shm_offset: u64,
        len: u64,
        fd_offset: u64,
        flags: u64,
        accepted: bool,
    },
    Unmap {
        shm_offset: u64,
        len: u64,
        accepted: bool,
    },
    /// SHARED_OBJECT_ADD.
    SharedAdd { uuid: [u8; 16], accepted: bool },
    /// SHARED_OBJECT_REMOVE.
    SharedRemove { uuid: [u8; 16], accepted: bool },
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    len: u64,
    writable: bool,
}

/// The shared memory window: what QEMU's BAR 4 is.
pub struct ShmWindow {
    base: usize,
    size: u64,
    /// Live mappings by shm_offset.
    maps: BTreeMap<u64, Mapping>,
    /// Every SHMEM_MAP / SHMEM_UNMAP in order.
    pub events: Vec<ShmEvent>,
    /// Refuse SHMEM_MAP while set (fault injection).
    pub refuse_maps: bool,
    /// Refuse SHMEM_UNMAP while set, as QEMU does for a mapping it no longer has (fault
    /// injection: the mapping is dropped and the unmap refused).
    pub refuse_unmaps: bool,
    /// The ring is enabled (between SET_VRING_ENABLE 1 and the stop): the only time QEMU
    /// copes with SHMEM_MAP / SHMEM_UNMAP.
    running: bool,
    /// Set while a map stalled before the stop is being answered.
    late_map_ok: bool,
    /// Things the daemon did that QEMU would reject or that break the protocol.
    pub violations: Vec<String>,
    /// Like QEMU, push every mapping into the daemon's memory table (ADD_MEM_REG /
    /// REM_MEM_REG on the front-end channel) before acknowledging SHMEM_MAP / SHMEM_UNMAP.
    frontend: Option<Frontend>,
    /// GET_MAX_MEM_SLOTS, including the guest RAM region.
    max_mem_slots: u64,
    /// ADD_MEM_REG / REM_MEM_REG messages the daemon acknowledged.
    pub mem_regions_added: usize,
    pub mem_regions_removed: usize,
    /// Mappings the last device reset dropped: QEMU refuses an unmap of one with an error
    /// (no crash), so a late unmap of them is not a violation.
    dropped_at_reset: BTreeSet<(u64, u64)>,
    /// Device resets that found mappings in the window. QEMU 11.1.3 then dies with
    /// SIGSEGV when the driver starts the device again (its vhost-user memory table still
    /// lists the dropped regions); the driver prevents it with SESSION_CLOSE.
    pub resets_with_live_mappings: usize,
    /// The shared-object table as QEMU keeps it: UUIDs this back end added and has not
    /// removed.
    pub shared_objects: BTreeSet<[u8; 16]>,
    /// Refuse SHARED_OBJECT_ADD while set (fault injection).
    pub refuse_shared_adds: bool,
}

impl std::fmt::Debug for ShmWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmWindow")
            .field("base", &format_args!("{:#x}", self.base))
            .field("size", &format_args!("{:#x}", self.size))
            .field("maps", &self.maps)
            .field("events", &self.events.len())
            .field("refuse_maps", &self.refuse_maps)
            .field("violations", &self.violations)
            .finish_non_exhaustive()
    }
}

impl ShmWindow {
    fn new(size: u64) -> Self {
        // SAFETY: reserves address space only (PROT_NONE, anonymous); no existing memory is
        // affected. The result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(
            base,
            libc::MAP_FAILED,
            "reserving the {size:#x}-byte window: {}",
            std::io::Error::last_os_error()
        );
        Self {
            base: base as usize,
            size,
            maps: BTreeMap::new(),
            events: Vec::new(),
            refuse_maps: false,
            refuse_unmaps: false,
            running: false,
            late_map_ok: false,
            violations: Vec::new(),
            frontend: None,
            max_mem_slots: u64::MAX,
            mem_regions_added: 0,
            mem_regions_removed: 0,
            dropped_at_reset: BTreeSet::new(),
            resets_with_live_mappings: 0,
            shared_objects: BTreeSet::new(),
            refuse_shared_adds: false,
        }
    }

    pub fn region_info(
        &self,
        shm_offset: u64,
        len: u64,
        fd_offset: u64,
        fd: RawFd,
    ) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: WINDOW_GPA + shm_offset,
            memory_size: len,
            userspace_addr: self.base as u64 + shm_offset,
            mmap_offset: fd_offset,
            mmap_handle: fd,
        }
    }

    /// QEMU's memory listener: the new RAM region goes to the daemon's memory table.
    fn add_mem_region(&mut self, shm_offset: u64, len: u64, fd_offset: u64, fd: RawFd) {
        if 1 + self.maps.len() as u64 > self.max_mem_slots {
            self.violations.push(format!(
                "{} mappings + guest RAM exceed the daemon's {} memory slots",
                self.maps.len(),
                self.max_mem_slots
            ));
        }
        let info = self.region_info(shm_offset, len, fd_offset, fd);
        if let Some(fe) = self.frontend.as_mut() {
            match fe.add_mem_region(&info) {
                Ok(_) => self.mem_regions_added += 1,
                Err(e) => self.violations.push(format!(
                    "ADD_MEM_REG for window {shm_offset:#x}+{len:#x} failed: {e}"
                )),
            }
        }
    }

    fn remove_mem_region(&mut self, shm_offset: u64, len: u64) {
        let info = self.region_info(shm_offset, len, 0, -1);
        if let Some(fe) = self.frontend.as_mut() {
            match fe.remove_mem_region(&info) {
                Ok(()) => self.mem_regions_removed += 1,
                Err(e) => self.violations.push(format!(
                    "REM_MEM_REG for window {shm_offset:#x}+{len:#x} failed: {e}"
                )),
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Live mappings (shm_offset, len).
    pub fn mappings(&self) -> Vec<(u64, u64)> {
        self.maps.iter().map(|(&o, m)| (o, m.len)).collect()
    }

    pub fn live_mappings(&self) -> usize {
        self.maps.len()
    }

    pub fn map_count(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, ShmEvent::Map { accepted: true, .. }))
            .count()
    }

    /// SHMEM_UNMAP requests received (accepted or not).
    pub fn unmap_count(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, ShmEvent::Unmap { .. }))
            .count()
    }

    pub fn refused_map_count(&self) -> usize {
        self.events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    ShmEvent::Map {
                        accepted: false,
                        ..
                    }
                )
            })
            .count()
    }

    /// Puts PROT_NONE back over [off, off+len).
    fn unmap_range(&mut self, off: u64, len: u64) {
        // SAFETY: [off, off+len) lies inside our reservation (checked when it was mapped);
        // MAP_FIXED replaces only pages of the reservation.
        let p = unsafe {
            libc::mmap(
                (self.base as u64 + off) as *mut libc::c_void,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    }

    /// What QEMU does at a device reset: drops every mapping (the daemon is not told by
    /// SHMEM_UNMAP). Returns the dropped (offset, len) pairs.
    pub fn drop_all(&mut self) -> Vec<(u64, u64)> {
        let maps: Vec<_> = self.mappings();
        for &(off, len) in &maps {
            self.unmap_range(off, len);
        }
        self.maps.clear();
        maps
    }

    /// Checks that [off, off+len) is covered by live mappings (writable ones if `write`).
    fn check_covered(&self, off: u64, len: u64, write: bool) -> Result<(), String> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| format!("range {off:#x}+{len:#x} outside the window"))?;
        let mut pos = off;
        while pos < end {
            let hit = self
                .maps
                .range(..=pos)
                .next_back()
                .filter(|(&o, m)| pos < o + m.len);
            match hit {
                Some((&o, m)) => {
                    if write && !m.writable {
                        return Err(format!("window {o:#x}+{:#x} is mapped read-only", m.len));
                    }
                    pos = o + m.len;
                }
                None => {
                    return Err(format!(
                        "window offset {pos:#x} is not mapped (live mappings: {:x?})",
                        self.mappings()
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        if let Err(e) = self.check_covered(off, len, false) {
            panic!("reading window {off:#x}+{len:#x}: {e}");
        }
        let mut v = vec![0u8; len as usize];
        // SAFETY: the range is inside the reservation and backed by live mappings (checked
        // above, under the lock that serialises map/unmap).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base as u64 + off) as *const u8,
                v.as_mut_ptr(),
                len as usize,
            );
        }
        v
    }

    pub fn write(&self, off: u64, bytes: &[u8]) {
        if let Err(e) = self.check_covered(off, bytes.len() as u64, true) {
            panic!("writing window {off:#x}+{:#x}: {e}", bytes.len());
        }
        // SAFETY: as in read(), and the mappings are writable.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.base as u64 + off) as *mut u8,
                bytes.len(),
            );
        }
    }
}

impl Drop for ShmWindow {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our reservation (and whatever was mapped inside it).
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size as usize);
        }
    }
}

impl VhostUserFrontendReqHandlerMut for ShmWindow {
    fn shared_object_add(&mut self, msg: &VhostUserSharedMsg) -> std::io::Result<u64> {
        let uuid = uuid_of_msg(msg);
        if self.refuse_shared_adds {
            self.events.push(ShmEvent::SharedAdd {
                uuid,
                accepted: false,
            });
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // QEMU's table refuses a UUID it has already.
        let accepted = self.shared_objects.insert(uuid);
        self.events.push(ShmEvent::SharedAdd { uuid, accepted });
        if !accepted {
            self.violations.push(format!(
                "SHARED_OBJECT_ADD of {uuid:02x?}, which is registered"
            ));
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(0)
    }

    fn shared_object_remove(&mut self, msg: &VhostUserSharedMsg) -> std::io::Result<u64> {
        let uuid = uuid_of_msg(msg);
        let accepted = self.shared_objects.remove(&uuid);
        self.events.push(ShmEvent::SharedRemove { uuid, accepted });
        if !accepted {
            self.violations.push(format!(
                "SHARED_OBJECT_REMOVE of {uuid:02x?}, which is not registered"
            ));
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(0)
    }

    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> std::io::Result<u64> {
        let (shmid, fd_offset, shm_offset, len, flags) =
            (req.shmid, req.fd_offset, req.shm_offset, req.len, req.flags);
        let res = (|| {
            if !self.running {
                // QEMU 11.1 segfaults on a SHMEM_MAP for a stopped device. A map that was
                // already pending when the device stopped cannot be helped; refuse it.
                if !self.late_map_ok {
                    self.violations.push(format!(
                        "SHMEM_MAP {shm_offset:#x}+{len:#x} while the device is stopped (QEMU \
                         segfaults)"
                    ));
                }
                return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
            }
            if self.refuse_maps {
                return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
            }
            if shmid != 0 {
                self.violations
                    .push(format!("SHMEM_MAP with shmid {shmid}"));
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            if shm_offset.checked_add(len).is_none_or(|e| e > self.size) {
                self.violations
                    .push(format!("SHMEM_MAP {shm_offset:#x}+{len:#x} out of range"));
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            if let Some((&o, m)) = self
                .maps
                .range(..shm_offset + len)
                .next_back()
                .filter(|(&o, m)| o + m.len > shm_offset)
            {
                self.violations.push(format!(
                    "SHMEM_MAP {shm_offset:#x}+{len:#x} overlaps {o:#x}+{:#x}",
                    m.len
                ));
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            let writable = flags & VhostUserMMapFlags::WRITABLE.bits() != 0;
            let prot = if writable {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            // SAFETY: the target range lies inside our reservation (checked above) and is
            // not mapped (no overlap), so MAP_FIXED replaces only reserved PROT_NONE pages.
            let p = unsafe {
                libc::mmap(
                    (self.base as u64 + shm_offset) as *mut libc::c_void,
                    len as usize,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    fd_offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                self.violations.push(format!(
                    "SHMEM_MAP {shm_offset:#x}+{len:#x} fd_offset {fd_offset:#x}: mmap: {e}"
                ));
                // A failed MAP_FIXED may have left the range unmapped: restore it.
                self.unmap_range(shm_offset, len);
                return Err(e);
            }
            self.maps.insert(shm_offset, Mapping { len, writable });
            self.add_mem_region(shm_offset, len, fd_offset, fd.as_raw_fd());
            Ok(0)
        })();
        self.events.push(ShmEvent::Map {
            shm_offset,
            len,
            fd_offset,
            flags,
            accepted: res.is_ok(),
        });
        res
    }

    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> std::io::Result<u64> {
        let (shm_offset, len) = (req.shm_offset, req.len);
        if !self.running {
            self.violations.push(format!(
                "SHMEM_UNMAP {shm_offset:#x}+{len:#x} while the device is stopped (QEMU \
                 segfaults)"
            ));
            self.events.push(ShmEvent::Unmap {
                shm_offset,
                len,
                accepted: false,
            });
            return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
        }
        if self.refuse_unmaps {
            self.events.push(ShmEvent::Unmap {
                shm_offset,
                len,
                accepted: false,
            });
            if self.maps.get(&shm_offset).is_some_and(|m| m.len == len) {
                self.remove_mem_region(shm_offset, len);
                self.maps.remove(&shm_offset);
                self.unmap_range(shm_offset, len);
            }
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        }
        let found = self.maps.get(&shm_offset).is_some_and(|m| m.len == len);
        self.events.push(ShmEvent::Unmap {
            shm_offset,
            len,
            accepted: found,
        });
        if !found && self.dropped_at_reset.remove(&(shm_offset, len)) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        if !found {
            self.violations.push(format!(
                "SHMEM_UNMAP {shm_offset:#x}+{len:#x} matches no mapping (live: {:x?})",
                self.mappings()
            ));
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.remove_mem_region(shm_offset, len);
        self.maps.remove(&shm_offset);
        self.unmap_range(shm_offset, len);
        Ok(0)
    }
}

/// What the backend-request thread serves: the window plus stall-style fault injection
/// that must work without the window lock.
#[derive(Debug)]
pub struct ShmShared {
    pub window: Mutex<ShmWindow>,
    /// While set, SHMEM_MAP is neither acknowledged nor refused (a hung VMM).
    stall_maps: AtomicBool,
    /// SHMEM_MAP requests currently stalled.
    stalled: std::sync::atomic::AtomicUsize,
    /// Set when the front end goes away: stalled requests give up.
    stop: AtomicBool,
}

impl VhostUserFrontendReqHandler for ShmShared {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> std::io::Result<u64> {
        let stalled = self.stall_maps.load(Ordering::SeqCst);
        if stalled {
            self.stalled.fetch_add(1, Ordering::SeqCst);
            while self.stall_maps.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.stalled.fetch_sub(1, Ordering::SeqCst);
            if self.stop.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::ECONNRESET));
            }
        }
        let mut window = self.window.lock().unwrap();
        window.late_map_ok = stalled;
        let res = window.shmem_map(req, fd);
        window.late_map_ok = false;
        res
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> std::io::Result<u64> {
        self.window.lock().unwrap().shmem_unmap(req)
    }

    fn shared_object_add(&self, msg: &VhostUserSharedMsg) -> std::io::Result<u64> {
        self.window.lock().unwrap().shared_object_add(msg)
    }

    fn shared_object_remove(&self, msg: &VhostUserSharedMsg) -> std::io::Result<u64> {
        self.window.lock().unwrap().shared_object_remove(msg)
    }
}

/// A descriptor-chain segment.
#[derive(Debug, Clone)]
pub enum Seg {
    /// Device-readable bytes.
    R(Vec<u8>),
    /// Device-writable space of this many bytes.
    W(u32),
    /// A device-readable descriptor with this raw guest address (e.g. outside guest RAM).
    RawR { gpa: u64, len: u32 },
}

/// A used-ring entry and the writable bytes of its chain.
#[derive(Debug, Clone)]
pub struct Completion {
    pub used_len: u32,
    /// All writable segments, concatenated (bytes not written by the device keep the
    /// POISON pattern).
    pub written: Vec<u8>,
}

/// What the front end fills device-writable buffers with before submitting.
pub const POISON: u8 = 0xa5;

#[derive(Debug)]
struct InFlight {
    descs: Vec<u16>,
    writable: Vec<(u64, u32)>,
}

/// The front end's state of the request queue.
#[derive(Debug)]
struct Queue {
    free: Vec<u16>,
    next_avail: u16,
    last_used: u16,
    in_flight: HashMap<u16, InFlight>,
    done: HashMap<u16, Completion>,
}

impl Queue {
    fn new(base: u16) -> Self {
        Self {
            free: (0..QUEUE_SIZE).rev().collect(),
            next_avail: base,
            last_used: base,
            in_flight: HashMap::new(),
            done: HashMap::new(),
        }
    }
}

/// An in-process vhost-user front end connected to a daemon.
pub struct FrontEnd {
    fe: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    queue: Queue,
    shm: Arc<ShmShared>,
    /// The backend channel's socket, to cut it like a dying VMM would.
    backend_sock: RawFd,
    stop: Arc<AtomicBool>,
    handler_thread: Option<JoinHandle<String>>,
    /// Virtio features the daemon offered.
    pub offered_features: u64,
    /// Virtio features we acked.
    pub acked_features: u64,
    /// Protocol features the daemon offered.
    pub protocol_features: VhostUserProtocolFeatures,
    pub max_mem_slots: u64,
    /// Sizes of the shared memory regions from GET_SHMEM_CONFIG.
    pub shm_sizes: Vec<u64>,
    pub config: Config,
    pub queue_started: bool,
    mem_table_sent: bool,
    /// The avail index the daemon reported at the last pause.
    paused_base: Option<u16>,
    /// Like the guest driver (see [`Self::behave_like_driver`]); `None`: always kick,
    /// never spin.
    driver_spin: Option<Duration>,
    /// Kicks left out because the daemon had turned notifications off.
    pub kicks_suppressed: u64,
    /// Whether the last kick was left out: the daemon was polling its ring then.
    daemon_polling: bool,
}

impl std::fmt::Debug for FrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontEnd")
            .field("offered_features", &self.offered_features)
            .field("acked_features", &self.acked_features)
            .field("protocol_features", &self.protocol_features)
            .field("shm_sizes", &self.shm_sizes)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn memfd(name: &str, size: usize) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: plain syscall with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// Waits up to `timeout` for `fd` to become readable.
pub fn poll_in(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfd is a valid pollfd array of length 1 for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0 && pfd.revents != 0
}

impl FrontEnd {
    /// Connects to the daemon and does QEMU's whole start-up: negotiation, backend channel,
    /// GET_SHMEM_CONFIG, config space, memory table and the request queue.
    pub fn connect(daemon: &Daemon) -> FrontEnd {
        let mut fe = Self::handshake(daemon);
        fe.start_queue();
        fe
    }

    /// [`FrontEnd::connect`], acking only the device features in `device_features` (the
    /// driver's choice; VERSION_1 and PROTOCOL_FEATURES are always acked).
    pub fn connect_acking(daemon: &Daemon, device_features: u64) -> FrontEnd {
        let stream = UnixStream::connect(daemon.socket_path()).unwrap();
        let mut fe = Self::handshake_with(stream, device_features);
        fe.start_queue();
        fe
    }

    /// Does what QEMU does when the device is realized (negotiation, backend channel,
    /// GET_SHMEM_CONFIG, config space), not what it does at the guest's DRIVER_OK.
    pub fn handshake(daemon: &Daemon) -> FrontEnd {
        let stream = UnixStream::connect(daemon.socket_path())
            .unwrap_or_else(|e| panic!("connect {}: {e}", daemon.socket_path().display()));
        Self::handshake_stream(stream)
    }

    /// [`FrontEnd::handshake`] on an already connected socket.
    pub fn handshake_stream(stream: UnixStream) -> FrontEnd {
        Self::handshake_with(stream, F_SYNC)
    }

    fn handshake_with(stream: UnixStream, device_features: u64) -> FrontEnd {
        Self::handshake_full(stream, device_features, qemu_protocol_features())
    }

    /// [`FrontEnd::connect_acking`] the session feature, and SESSION_OPEN as the guest
    /// driver does at probe. Returns the front end and the session id.
    pub fn connect_session(daemon: &Daemon) -> (FrontEnd, u64) {
        let mut fe = Self::connect_acking(daemon, F_SYNC | F_SESSION);
        let id = fe
            .open_session(0)
            .unwrap_or_else(|s| panic!("SESSION_OPEN: {}", status_name(s)));
        (fe, id)
    }

    /// [`FrontEnd::connect`] for an older or different VMM that acks only `protocol` of the
    /// protocol features QEMU 11.1 uses (e.g. no SHMEM: QEMU before 10.x).
    pub fn connect_protocol(daemon: &Daemon, protocol: VhostUserProtocolFeatures) -> FrontEnd {
        let stream = UnixStream::connect(daemon.socket_path()).unwrap();
        let mut fe = Self::handshake_full(stream, F_SYNC, protocol);
        fe.start_queue();
        fe
    }

    fn handshake_full(
        stream: UnixStream,
        device_features: u64,
        protocol: VhostUserProtocolFeatures,
    ) -> FrontEnd {
        // SHARED_OBJECT is acked when the daemon offers it (as QEMU 11.1 does).
        let optional = protocol & VhostUserProtocolFeatures::SHARED_OBJECT;
        let protocol = protocol & wanted_protocol_features();
        let mut fe = Frontend::from_stream(stream, 1);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert!(
            offered & protocol_bit != 0,
            "daemon does not offer VHOST_USER_F_PROTOCOL_FEATURES: {offered:#x}"
        );
        let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let missing = protocol - proto;
        assert!(
            missing.is_empty(),
            "daemon lacks protocol features QEMU needs: {missing:?} (offered {proto:?})"
        );
        let protocol = protocol | (optional & proto);
        fe.set_protocol_features(protocol)
            .expect("SET_PROTOCOL_FEATURES");
        let has = |f: VhostUserProtocolFeatures| protocol.contains(f);
        if has(VhostUserProtocolFeatures::REPLY_ACK) {
            // As QEMU does with REPLY_ACK: every message that has no reply of its own is
            // acked, so a failure shows up at the message that caused it.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let max_mem_slots = if has(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS")
        } else {
            8
        };

        let sizes: Vec<u64> = if has(VhostUserProtocolFeatures::SHMEM) {
            let shm_cfg = fe.get_shmem_config().expect("GET_SHMEM_CONFIG");
            let nregions = shm_cfg.nregions;
            let all = shm_cfg.memory_sizes;
            let sizes: Vec<u64> = all.iter().take(nregions as usize).copied().collect();
            assert!(
                !sizes.is_empty() && sizes[0] > 0,
                "GET_SHMEM_CONFIG: no buffer window (nregions {nregions}, sizes {sizes:x?})"
            );
            assert!(
                sizes[0].is_power_of_two(),
                "window size {:#x} is not a power of two (QEMU asserts)",
                sizes[0]
            );
            sizes
        } else {
            Vec::new()
        };

        let config = if has(VhostUserProtocolFeatures::CONFIG) {
            let (_, cfg) = fe
                .get_config(
                    0,
                    CONFIG_SIZE as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &[0u8; CONFIG_SIZE],
                )
                .expect("GET_CONFIG");
            Config::parse(&cfg)
        } else {
            Config::parse(&[0; CONFIG_SIZE])
        };

        // Without SHMEM there is no window; keep one page so the bookkeeping stays simple
        // (any SHMEM_MAP then fails as out of range).
        let mut window = ShmWindow::new(sizes.first().copied().unwrap_or(PAGE_SIZE));
        if has(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            window.frontend = Some(fe.clone());
        }
        window.max_mem_slots = max_mem_slots;
        let shm = Arc::new(ShmShared {
            window: Mutex::new(window),
            stall_maps: AtomicBool::new(false),
            stalled: std::sync::atomic::AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let mut req_handler = FrontendReqHandler::new(Arc::clone(&shm)).unwrap();
        let backend_sock = req_handler.as_raw_fd();
        req_handler.set_reply_ack_flag(has(VhostUserProtocolFeatures::REPLY_ACK));
        if has(VhostUserProtocolFeatures::BACKEND_REQ) {
            fe.set_backend_request_fd(&req_handler.get_tx_raw_fd())
                .expect("SET_BACKEND_REQ_FD");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handler_thread = std::thread::Builder::new()
            .name("backend-req".to_owned())
            .spawn(move || loop {
                if stop2.load(Ordering::Relaxed) {
                    return "stopped".to_owned();
                }
                if !poll_in(req_handler.as_raw_fd(), Duration::from_millis(50)) {
                    continue;
                }
                match req_handler.handle_request() {
                    Ok(_) | Err(vhost::vhost_user::Error::ReqHandlerError(_)) => {}
                    Err(vhost::vhost_user::Error::Disconnected) => {
                        return "backend channel closed".to_owned()
                    }
                    Err(e) => return format!("backend channel error: {e}"),
                }
            })
            .unwrap();

        let acked = offered & (VIRTIO_F_VERSION_1 | protocol_bit | (device_features & 0xff_ffff));

        let file = memfd("dmaheap-it-guest-ram", MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(GUEST_BASE),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();

        FrontEnd {
            fe,
            mem,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            queue: Queue::new(0),
            shm,
            backend_sock,
            stop,
            handler_thread: Some(handler_thread),
            offered_features: offered,
            acked_features: acked,
            protocol_features: proto,
            max_mem_slots,
            shm_sizes: sizes,
            config,
            queue_started: false,
            mem_table_sent: false,
            paused_base: None,
            driver_spin: None,
            kicks_suppressed: 0,
            daemon_polling: false,
        }
    }

    /// The underlying vhost-user frontend, for messages the helpers do not cover.
    pub fn vhost(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    fn gpa(off: u64) -> GuestAddress {
        GuestAddress(GUEST_BASE + off)
    }

    /// SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE on a freshly zeroed ring (driver start).
    pub fn start_queue(&mut self) {
        self.setup_queue();
        self.enable_queue();
    }

    /// SET_VRING_NUM/BASE/ADDR/KICK/CALL on a freshly zeroed ring, leaving it disabled.
    pub fn setup_queue(&mut self) {
        self.setup_queue_at(0);
    }

    /// [`FrontEnd::setup_queue`] with the ring indices starting at `base` (as after a
    /// vhost-user reconnect or a migration; used to cross the 16-bit wrap quickly).
    pub fn setup_queue_at(&mut self, base: u16) {
        // vhost_dev_start: features, memory table (sent once; later starts find it
        // unchanged), then the ring.
        self.fe
            .set_features(self.acked_features)
            .expect("SET_FEATURES");
        if !self.mem_table_sent {
            let region = self.mem.find_region(GuestAddress(GUEST_BASE)).unwrap();
            let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
            self.fe.set_mem_table(&[info]).expect("SET_MEM_TABLE");
            self.mem_table_sent = true;
        }
        let zero = vec![0u8; DATA_GPA as usize];
        self.mem.write_slice(&zero, Self::gpa(0)).unwrap();
        self.queue = Queue::new(base);
        // The driver's indices: avail.idx and used.idx (which the back end reads at
        // SET_VRING_ADDR) both start at `base`.
        self.mem.write_obj(base, Self::gpa(AVAIL_GPA + 2)).unwrap();
        self.mem.write_obj(base, Self::gpa(USED_GPA + 2)).unwrap();
        self.set_ring(base);
    }

    /// SET_VRING_NUM/BASE/ADDR/KICK/CALL of the ring in guest memory, as it is.
    fn set_ring(&mut self, base: u16) {
        let _ = self.call.read();
        let fe = &mut self.fe;
        fe.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
        fe.set_vring_base(0, base).expect("SET_VRING_BASE");
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.mem.get_host_address(Self::gpa(DESC_GPA)).unwrap() as u64,
            used_ring_addr: self.mem.get_host_address(Self::gpa(USED_GPA)).unwrap() as u64,
            avail_ring_addr: self.mem.get_host_address(Self::gpa(AVAIL_GPA)).unwrap() as u64,
            log_addr: None,
        };
        fe.set_vring_addr(0, &cfg).expect("SET_VRING_ADDR");
        fe.set_vring_kick(0, &self.kick).expect("SET_VRING_KICK");
        fe.set_vring_call(0, &self.call).expect("SET_VRING_CALL");
    }

    /// SET_VRING_ENABLE 1.
    pub fn enable_queue(&mut self) {
        self.shm().running = true;
        self.fe
            .set_vring_enable(0, true)
            .expect("SET_VRING_ENABLE 1");
        self.queue_started = true;
    }

    /// What QEMU does when the VM is paused (QMP `stop`): disable and stop the ring
    /// (GET_VRING_BASE); the window keeps its mappings. Returns the ring base the daemon
    /// reported.
    pub fn pause(&mut self) -> u32 {
        self.shm().running = false;
        self.fe
            .set_vring_enable(0, false)
            .expect("SET_VRING_ENABLE 0");
        let base = self.fe.get_vring_base(0).expect("GET_VRING_BASE");
        self.queue_started = false;
        self.paused_base = u16::try_from(base).ok();
        base
    }

    /// What QEMU does when a paused VM continues (QMP `cont`): the device starts again
    /// with the same ring, at the avail index the daemon reported (the used index is read
    /// back from guest memory).
    pub fn resume(&mut self) {
        let base = self.paused_base.take().expect("resume without a pause");
        self.fe
            .set_features(self.acked_features)
            .expect("SET_FEATURES");
        self.set_ring(base);
        self.enable_queue();
    }

    /// What QEMU does at a guest device reset: stops the ring like [`FrontEnd::pause`],
    /// then drops every window mapping on its own. Returns the ring base the daemon
    /// reported. The driver then starts the device on a fresh ring ([`FrontEnd::start_queue`]).
    pub fn reset_device(&mut self) -> u32 {
        let base = self.pause();
        self.paused_base = None;
        let dropped = self.shm().drop_all();
        if !dropped.is_empty() {
            self.shm().resets_with_live_mappings += 1;
        }
        self.shm().dropped_at_reset.extend(dropped.iter().copied());
        // A QEMU without the 11.1.3 bug then removes the regions from the daemon's memory
        // table (11.1.3 keeps them listed and crashes at the next start instead).
        for (off, len) in dropped {
            let info = self.shm().region_info(off, len, 0, -1);
            match self.fe.remove_mem_region(&info) {
                Ok(()) => self.shm().mem_regions_removed += 1,
                Err(e) => self.shm().violations.push(format!(
                    "REM_MEM_REG after reset for {off:#x}+{len:#x}: {e}"
                )),
            }
        }
        base
    }

    /// The window and its bookkeeping (locked: do not hold across requests).
    pub fn shm(&self) -> MutexGuard<'_, ShmWindow> {
        self.shm.window.lock().unwrap()
    }

    /// Fault injection: leave SHMEM_MAP unanswered (or answer again).
    pub fn stall_maps(&self, stall: bool) {
        self.shm.stall_maps.store(stall, Ordering::SeqCst);
    }

    /// Number of SHMEM_MAP requests currently left unanswered.
    pub fn stalled_maps(&self) -> usize {
        self.shm.stalled.load(Ordering::SeqCst)
    }

    /// Dies like a killed VMM: both channels are cut at once, whatever is in flight.
    pub fn crash(self) {
        // SAFETY: shutdown() on a socket fd this object owns (held open by the handler
        // thread's FrontendReqHandler until the thread is joined in drop).
        unsafe {
            libc::shutdown(self.backend_sock, libc::SHUT_RDWR);
        }
        drop(self);
    }

    /// Panics if the daemon did anything QEMU would have refused or choked on.
    pub fn assert_no_violations(&self) {
        let shm = self.shm();
        assert!(
            shm.violations.is_empty(),
            "protocol violations seen by the front end: {:#?}",
            shm.violations
        );
    }

    /// Fault injection: refuse (or accept again) SHMEM_MAP.
    pub fn refuse_maps(&self, refuse: bool) {
        self.shm().refuse_maps = refuse;
    }

    /// Fault injection: refuse (or accept again) SHMEM_UNMAP, as QEMU does for a mapping it
    /// no longer has.
    pub fn refuse_unmaps(&self, refuse: bool) {
        self.shm().refuse_unmaps = refuse;
    }

    pub fn window_size(&self) -> u64 {
        self.shm().size()
    }

    pub fn read_window(&self, off: u64, len: u64) -> Vec<u8> {
        self.shm().read(off, len)
    }

    pub fn write_window(&self, off: u64, bytes: &[u8]) {
        self.shm().write(off, bytes)
    }

    /// Puts a chain on the avail ring (no kick). Returns its head.
    pub fn submit(&mut self, segs: &[Seg]) -> u16 {
        assert!(!segs.is_empty());
        assert!(
            self.queue.free.len() >= segs.len(),
            "queue full: {} free descriptors, {} in flight",
            self.queue.free.len(),
            self.queue.in_flight.len()
        );
        let descs: Vec<u16> = (0..segs.len())
            .map(|_| self.queue.free.pop().unwrap())
            .collect();
        let mut writable = Vec::new();
        for (i, (seg, &d)) in segs.iter().zip(&descs).enumerate() {
            let data = DATA_GPA + u64::from(d) * u64::from(SLOT_SIZE);
            let (len, mut flags) = match seg {
                Seg::R(bytes) => {
                    assert!(bytes.len() <= SLOT_SIZE as usize);
                    self.mem.write_slice(bytes, Self::gpa(data)).unwrap();
                    (bytes.len() as u32, 0)
                }
                Seg::W(len) => {
                    assert!(*len <= SLOT_SIZE);
                    let poison = vec![POISON; *len as usize];
                    self.mem.write_slice(&poison, Self::gpa(data)).unwrap();
                    writable.push((data, *len));
                    (*len, VRING_DESC_F_WRITE)
                }
                Seg::RawR { len, .. } => (*len, 0),
            };
            let addr = match seg {
                Seg::RawR { gpa, .. } => *gpa,
                _ => GUEST_BASE + data,
            };
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
                descs[i + 1]
            } else {
                0
            };
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&desc, Self::gpa(DESC_GPA + 16 * u64::from(d)))
                .unwrap();
        }
        let head = descs[0];
        let slot = self.queue.next_avail % QUEUE_SIZE;
        self.mem
            .write_obj(head, Self::gpa(AVAIL_GPA + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.queue.next_avail = self.queue.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem
            .store(
                self.queue.next_avail,
                Self::gpa(AVAIL_GPA + 2),
                Ordering::Release,
            )
            .unwrap();
        fence(Ordering::SeqCst);
        self.queue
            .in_flight
            .insert(head, InFlight { descs, writable });
        head
    }

    /// Kicks the daemon; when behaving like the driver, only if it has not turned
    /// notifications off (used ring flag `VRING_USED_F_NO_NOTIFY`: it polls the ring).
    pub fn kick(&mut self) {
        if self.driver_spin.is_some() && !self.daemon_wants_kicks() {
            self.kicks_suppressed += 1;
            self.daemon_polling = true;
            return;
        }
        self.daemon_polling = false;
        self.kick.write(1).unwrap();
    }

    /// Whether the used ring's flags ask for kicks (virtio 2.7.10).
    pub fn daemon_wants_kicks(&self) -> bool {
        fence(Ordering::SeqCst);
        let flags: u16 = self
            .mem
            .load(Self::gpa(USED_GPA), Ordering::Acquire)
            .unwrap();
        flags & VRING_USED_F_NO_NOTIFY == 0
    }

    /// Behave like the guest driver: [`Self::kick`] leaves out kicks the daemon turned
    /// off, and [`Self::wait`], if the last kick was left out (the daemon polls, so it
    /// runs on another CPU), first spins on the used ring for `spin` (the driver's
    /// `spin_us`) before it sleeps on the call eventfd.
    pub fn behave_like_driver(&mut self, spin: Duration) {
        self.driver_spin = Some(spin);
    }

    /// Moves new used-ring entries to `done`.
    fn reap(&mut self) {
        fence(Ordering::SeqCst);
        let used_idx: u16 = self
            .mem
            .load(Self::gpa(USED_GPA + 2), Ordering::Acquire)
            .unwrap();
        while self.queue.last_used != used_idx {
            let slot = u64::from(self.queue.last_used % QUEUE_SIZE);
            let mut elem = [0u8; 8];
            self.mem
                .read_slice(&mut elem, Self::gpa(USED_GPA + 4 + 8 * slot))
                .unwrap();
            let id = le32(&elem, 0);
            let used_len = le32(&elem, 4);
            let head = u16::try_from(id).unwrap_or(u16::MAX);
            let Some(inf) = self.queue.in_flight.remove(&head) else {
                panic!(
                    "used ring entry {} has id {id} which is not an in-flight head (in flight: \
                     {:?})",
                    self.queue.last_used,
                    self.queue.in_flight.keys().collect::<Vec<_>>()
                );
            };
            let mut written = Vec::new();
            for (gpa, len) in &inf.writable {
                let mut b = vec![0u8; *len as usize];
                self.mem.read_slice(&mut b, Self::gpa(*gpa)).unwrap();
                written.extend_from_slice(&b);
            }
            assert!(
                used_len as usize <= written.len(),
                "used len {used_len} > {} writable bytes in the chain",
                written.len()
            );
            self.queue.free.extend(inf.descs.iter().rev());
            self.queue
                .done
                .insert(head, Completion { used_len, written });
            self.queue.last_used = self.queue.last_used.wrapping_add(1);
        }
    }

    /// Returns the completion of `head` if the daemon has used it already.
    pub fn try_complete(&mut self, head: u16) -> Option<Completion> {
        self.reap();
        self.queue.done.remove(&head)
    }

    /// Waits (call eventfd, with a deadline) for the used-ring entry of `head`.
    pub fn wait(&mut self, head: u16) -> Completion {
        let start = Instant::now();
        let spin = if self.daemon_polling {
            self.driver_spin.unwrap_or_default()
        } else {
            Duration::ZERO
        };
        while start.elapsed() < spin {
            if let Some(c) = self.try_complete(head) {
                return c;
            }
            std::hint::spin_loop();
        }
        loop {
            if let Some(c) = self.try_complete(head) {
                return c;
            }
            let left = DEADLINE.saturating_sub(start.elapsed());
            if left.is_zero() {
                let channel = self.backend_channel_state();
                panic!(
                    "no used-ring entry for chain {head} within {DEADLINE:?} (used idx seen {}, \
                     avail idx {}; backend channel: {channel})",
                    self.queue.last_used, self.queue.next_avail
                );
            }
            if poll_in(self.call.as_raw_fd(), left.min(Duration::from_millis(100))) {
                let _ = self.call.read();
            }
        }
    }

    /// True if the daemon has used `head` within `timeout` (for "must not answer" checks).
    pub fn completes_within(&mut self, head: u16, timeout: Duration) -> Option<Completion> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.try_complete(head) {
                return Some(c);
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

    fn backend_channel_state(&self) -> String {
        match &self.handler_thread {
            Some(t) if t.is_finished() => "handler thread ended".to_owned(),
            Some(_) => "open".to_owned(),
            None => "none".to_owned(),
        }
    }

    /// Submits one chain, kicks and waits for it.
    pub fn call(&mut self, segs: &[Seg]) -> Completion {
        let head = self.submit(segs);
        self.kick();
        self.wait(head)
    }

    /// A request with one readable and one writable descriptor.
    pub fn request(&mut self, req: &[u8], resp_len: u32) -> Completion {
        self.call(&[Seg::R(req.to_vec()), Seg::W(resp_len)])
    }

    /// Status of a completion; panics if the device wrote less than a resp_hdr.
    pub fn status_of(c: &Completion, what: &str) -> u32 {
        assert!(
            c.used_len as usize >= RESP_HDR_SIZE,
            "{what}: used len {} is smaller than a resp_hdr (bytes {:02x?})",
            c.used_len,
            &c.written[..c.written.len().min(16)]
        );
        let reserved = le32(&c.written, 4);
        assert_eq!(reserved, 0, "{what}: resp_hdr.reserved is {reserved:#x}");
        le32(&c.written, 0)
    }

    /// HEAP_INFO; with [`F_HEAP_RANGE`] acked, the heap range too.
    pub fn heap_info(&mut self, heap_id: u32) -> Result<HeapInfo, u32> {
        let size = if self.acked_features & F_HEAP_RANGE != 0 {
            HEAP_INFO_RANGE_RESP_SIZE
        } else {
            HEAP_INFO_RESP_SIZE
        };
        let c = self.request(&heap_info_req(heap_id), size as u32);
        let what = format!("HEAP_INFO {heap_id}");
        let status = Self::status_of(&c, &what);
        if status != S_OK {
            return Err(status);
        }
        assert_eq!(
            c.used_len as usize, size,
            "{what}: used len of an OK heap_info_resp"
        );
        Ok(HeapInfo::parse(&c.written[RESP_HDR_SIZE..size]))
    }

    pub fn alloc(&mut self, heap_id: u32, len: u64) -> Result<Buffer, u32> {
        self.alloc_flags(heap_id, 0, len)
    }

    pub fn alloc_flags(&mut self, heap_id: u32, flags: u32, len: u64) -> Result<Buffer, u32> {
        let c = self.request(&alloc_req(heap_id, flags, len), ALLOC_RESP_SIZE as u32);
        parse_alloc(&c, &format!("ALLOC heap {heap_id} len {len:#x}"))
    }

    /// ALLOC_BATCH (needs [`F_BATCH`] acked): the buffers the daemon allocated.
    pub fn alloc_batch(&mut self, heap_id: u32, count: u32, len: u64) -> Result<Vec<Buffer>, u32> {
        let c = self.request(
            &alloc_batch_req(heap_id, count, len),
            ALLOC_BATCH_RESP_SIZE as u32,
        );
        let what = format!("ALLOC_BATCH heap {heap_id} count {count} len {len:#x}");
        let status = FrontEnd::status_of(&c, &what);
        if status != S_OK {
            return Err(status);
        }
        assert_eq!(
            c.used_len as usize, ALLOC_BATCH_RESP_SIZE,
            "{what}: used len"
        );
        let n = le32(&c.written, 8) as usize;
        assert!(n >= 1 && n <= count as usize, "{what}: {n} buffers");
        Ok((0..n)
            .map(|i| {
                let e = 16 + 24 * i;
                Buffer {
                    id: le64(&c.written, e),
                    offset: le64(&c.written, e + 8),
                    len: le64(&c.written, e + 16),
                }
            })
            .collect())
    }

    /// ALLOC that must succeed.
    pub fn alloc_ok(&mut self, heap_id: u32, len: u64) -> Buffer {
        self.alloc(heap_id, len).unwrap_or_else(|s| {
            panic!(
                "ALLOC heap {heap_id} len {len:#x} failed: {}",
                status_name(s)
            )
        })
    }

    pub fn free(&mut self, buffer_id: u64) -> u32 {
        let c = self.request(&free_req(buffer_id), RESP_HDR_SIZE as u32);
        Self::status_of(&c, &format!("FREE {buffer_id}"))
    }

    pub fn free_ok(&mut self, buffer_id: u64) {
        let s = self.free(buffer_id);
        assert_eq!(s, S_OK, "FREE {buffer_id}: {}", status_name(s));
    }

    /// SESSION_OPEN; the session id, or the status.
    pub fn open_session(&mut self, resume_id: u64) -> Result<u64, u32> {
        let c = self.request(&session_open_req(resume_id), SESSION_OPEN_RESP_SIZE as u32);
        let status = Self::status_of(&c, &format!("SESSION_OPEN {resume_id:#x}"));
        if status != S_OK {
            return Err(status);
        }
        assert_eq!(c.used_len as usize, SESSION_OPEN_RESP_SIZE);
        let id = le64(&c.written, 8);
        assert_ne!(id, 0, "SESSION_OPEN answered session id 0");
        Ok(id)
    }

    /// SESSION_OPEN stating the driver's page size (`VIRTIO_DMAHEAP_F_PAGE_SIZE` acked);
    /// the session id, or the status.
    pub fn open_session_paged(&mut self, resume_id: u64, page_size: u32) -> Result<u64, u32> {
        let c = self.request(
            &session_open_page_req(resume_id, page_size),
            SESSION_OPEN_RESP_SIZE as u32,
        );
        let what = format!("SESSION_OPEN {resume_id:#x} page size {page_size}");
        let status = Self::status_of(&c, &what);
        if status != S_OK {
            return Err(status);
        }
        assert_eq!(c.used_len as usize, SESSION_OPEN_RESP_SIZE);
        let id = le64(&c.written, 8);
        assert_ne!(id, 0, "SESSION_OPEN answered session id 0");
        Ok(id)
    }

    /// SESSION_CLOSE with `flags`; the status.
    pub fn close_session(&mut self, flags: u32) -> u32 {
        let c = self.request(&session_close_req(flags), RESP_HDR_SIZE as u32);
        Self::status_of(&c, &format!("SESSION_CLOSE {flags:#x}"))
    }

    /// RESERVE (or UNRESERVE with `ty`); the status.
    pub fn reserve(&mut self, ty: u32, offset: u64, len: u64) -> u32 {
        let c = self.request(&reserve_req(ty, offset, len), RESP_HDR_SIZE as u32);
        Self::status_of(&c, &format!("RESERVE/UNRESERVE {offset:#x}+{len:#x}"))
    }

    pub fn sync(&mut self, buffer_id: u64, flags: u32) -> u32 {
        let c = self.request(&sync_req(buffer_id, flags), RESP_HDR_SIZE as u32);
        Self::status_of(&c, &format!("SYNC {buffer_id} flags {flags:#x}"))
    }

    /// Bytes of an allocated buffer as the guest sees them in the window.
    pub fn read_buffer(&self, b: &Buffer, off: u64, len: u64) -> Vec<u8> {
        assert!(off + len <= b.len);
        self.read_window(b.offset + off, len)
    }

    pub fn write_buffer(&self, b: &Buffer, off: u64, bytes: &[u8]) {
        assert!(off + bytes.len() as u64 <= b.len);
        self.write_window(b.offset + off, bytes)
    }

    /// ASSIGN_UUID; the UUID, or the status.
    pub fn assign_uuid(&mut self, buffer_id: u64) -> Result<[u8; 16], u32> {
        let c = self.request(&assign_uuid_req(buffer_id), ASSIGN_UUID_RESP_SIZE as u32);
        let status = Self::status_of(&c, &format!("ASSIGN_UUID {buffer_id}"));
        if status != S_OK {
            return Err(status);
        }
        assert_eq!(
            c.used_len as usize, ASSIGN_UUID_RESP_SIZE,
            "ASSIGN_UUID {buffer_id}: used length"
        );
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&c.written[8..24]);
        Ok(uuid)
    }

    /// GET_SHARED_OBJECT on the front-end channel, as QEMU sends it when another back end
    /// looks `uuid` up (the UUID in the body, as the vhost-user spec says): the fd the
    /// daemon answered with, or `None` if it answered without one.
    pub fn get_shared_object(&mut self, uuid: &[u8; 16]) -> Option<File> {
        let mut msg = VhostUserSharedMsg::default();
        vm_memory::ByteValued::as_mut_slice(&mut msg).copy_from_slice(uuid);
        self.fe.get_shared_object(&msg).ok()
    }

    /// The UUIDs the daemon registered and has not withdrawn (QEMU's table).
    pub fn shared_objects(&self) -> BTreeSet<[u8; 16]> {
        self.shm().shared_objects.clone()
    }

    /// Whether the daemon offered SHARED_OBJECT (acked unless the test connected with a
    /// protocol subset without it).
    pub fn has_shared_objects(&self) -> bool {
        self.protocol_features
            .contains(VhostUserProtocolFeatures::SHARED_OBJECT)
    }

    /// Closes the connection and waits for the backend channel to close too.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// Parses an alloc_resp completion.
pub fn parse_alloc(c: &Completion, what: &str) -> Result<Buffer, u32> {
    let status = FrontEnd::status_of(c, what);
    if status != S_OK {
        return Err(status);
    }
    assert_eq!(
        c.used_len as usize, ALLOC_RESP_SIZE,
        "{what}: used len of an OK alloc_resp"
    );
    Ok(Buffer {
        id: le64(&c.written, 8),
        offset: le64(&c.written, 16),
        len: le64(&c.written, 24),
    })
}

impl Drop for FrontEnd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shm.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.handler_thread.take() {
            let _ = t.join();
        }
        if !std::thread::panicking() {
            // Every test implicitly checks that the daemon never did anything QEMU refuses.
            let violations = self
                .shm
                .window
                .lock()
                .map(|s| s.violations.clone())
                .unwrap_or_default();
            assert!(
                violations.is_empty(),
                "{} protocol violations seen by the front end; the first: {:#?}",
                violations.len(),
                &violations[..violations.len().min(10)]
            );
        } else {
            let shm = self.shm.window.lock();
            if let Ok(shm) = shm {
                let n = shm.events.len();
                let live = shm.mappings();
                eprintln!(
                    "---- front end: {} SHMEM_MAP, {} refused, {} SHMEM_UNMAP, {} live mappings \
                     (first: {:x?}); {} violations (first: {:?}); last events: {:x?}",
                    shm.map_count(),
                    shm.refused_map_count(),
                    shm.unmap_count(),
                    live.len(),
                    &live[..live.len().min(8)],
                    shm.violations.len(),
                    &shm.violations[..shm.violations.len().min(5)],
                    &shm.events[n.saturating_sub(10)..]
                );
            }
        }
    }
}
