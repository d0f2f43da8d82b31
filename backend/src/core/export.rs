//! Cross-device sharing by UUID (`VIRTIO_DMAHEAP_F_UUID`, issue 13): ASSIGN_UUID, the
//! export table the front end's `GET_SHARED_OBJECT` reads, withdrawal, and the buffers the
//! guest freed while an importer may still hold their export ("retained").
//!
//! * ASSIGN_UUID makes one export fd per buffer ([`crate::host::HostBuffer::export`]),
//!   puts it in the [`ExportTable`] and registers a random UUID with the front end
//!   (`SHARED_OBJECT_ADD`) before it answers. Asking again answers the same UUID.
//! * The [`ExportTable`] has its own small lock, never held across a request to the front
//!   end, so that `GET_SHARED_OBJECT` (a front-end message, sent while QEMU's main loop
//!   waits) never waits for the device lock.
//! * FREE of an exported buffer withdraws the UUID (`SHARED_OBJECT_REMOVE`), drops the
//!   daemon's references to the export and keeps the buffer's host memory out of reuse,
//!   still charged to the quotas ("retained"), until the daemon sees that no copy of the
//!   export is open any more: a dma-buf export is registered in a private epoll instance
//!   (which does not hold the file); the item leaves `/proc/self/fdinfo/<epfd>` when the
//!   last reference is closed ([`ReleaseWatch`]). A memfd cannot be polled: it stays
//!   retained until the session or the connection ends.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::debug;

use super::{Device, MapError, Mapper, RequestError};
use crate::host::{ExportKind, ProviderError};

/// A UUID as its 16 bytes (RFC 4122 byte order).
pub type Uuid = [u8; 16];

/// A random RFC 4122 version 4 UUID from `getrandom(2)`.
pub fn random_uuid() -> io::Result<Uuid> {
    let mut u = [0u8; 16];
    let mut done = 0;
    while done < u.len() {
        let rest = &mut u[done..];
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

/// UUID -> export fd, for `GET_SHARED_OBJECT`. Shared by the device core (which fills it)
/// and the vhost-user layer (which answers lookups from it without the device lock).
#[derive(Debug, Default)]
pub struct ExportTable {
    files: Mutex<HashMap<Uuid, (File, u64)>>,
}

impl ExportTable {
    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (File, u64)>> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new fd of the export registered under `uuid`, and the buffer's length.
    pub fn lookup(&self, uuid: &Uuid) -> Option<(File, u64)> {
        let files = self.files();
        let (f, len) = files.get(uuid)?;
        f.try_clone().ok().map(|f| (f, *len))
    }

    /// Number of registered exports.
    pub fn len(&self) -> usize {
        self.files().len()
    }

    /// Whether no export is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, uuid: Uuid, file: File, len: u64) {
        self.files().insert(uuid, (file, len));
    }

    fn remove(&self, uuid: &Uuid) -> Option<File> {
        self.files().remove(uuid).map(|(f, _)| f)
    }

    fn clear(&self) {
        // Dropped outside the lock: closing a dma-buf may take a while.
        let old = std::mem::take(&mut *self.files());
        drop(old);
    }
}

/// Sees when dma-buf exports are closed everywhere: a private epoll instance in which each
/// export is registered (an epoll item does not hold its file, and leaves the instance
/// when the file's last reference goes), read back through `/proc/self/fdinfo/<epfd>`,
/// opened at creation (the sandbox forbids opening files later).
#[derive(Debug)]
pub struct ReleaseWatch {
    epoll: OwnedFd,
    fdinfo: File,
    next_token: u64,
}

impl ReleaseWatch {
    /// A new, empty watch.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        let fdinfo = File::open(format!("/proc/self/fdinfo/{raw}"))?;
        Ok(Self {
            epoll,
            fdinfo,
            next_token: 1,
        })
    }

    /// Registers `file`; returns the token under which [`ReleaseWatch::alive`] lists it.
    pub fn watch(&mut self, file: &File) -> io::Result<u64> {
        let token = self.next_token;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open; `ev` is a live epoll_event the kernel only reads.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                file.as_fd().as_raw_fd(),
                &mut ev,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.next_token += 1;
        Ok(token)
    }

    /// Tokens of the registered files that are still open somewhere.
    pub fn alive(&self) -> io::Result<HashSet<u64>> {
        let mut text = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = self.fdinfo.read_at(&mut chunk, text.len() as u64)?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
        }
        Ok(parse_epoll_fdinfo(&String::from_utf8_lossy(&text)))
    }
}

/// The `data:` values of the `tfd:` lines of an epoll instance's fdinfo.
pub fn parse_epoll_fdinfo(text: &str) -> HashSet<u64> {
    text.lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "data:")?;
            u64::from_str_radix(words.next()?, 16).ok()
        })
        .collect()
}

/// A live buffer's export.
#[derive(Debug, Clone, Copy)]
pub(super) struct Exported {
    pub(super) uuid: Uuid,
    pub(super) kind: ExportKind,
    /// Registered with the front end's shared-object table.
    pub(super) registered: bool,
}

/// A buffer the guest freed while its export may still be open.
#[derive(Debug, Clone, Copy)]
pub struct Retained {
    /// Heap index.
    pub heap: usize,
    /// Bytes still charged to the quotas.
    pub charged: u64,
    /// Where its memory stays allocated in the window's bookkeeping: (arena offset, offset
    /// in the arena, length). `None`: the buffer had a host allocation of its own, which
    /// left the window (the importer's fd holds the memory).
    pub range: Option<(u64, u64, u64)>,
    /// The [`ReleaseWatch`] token; `None`: cannot be watched (a memfd).
    pub token: Option<u64>,
}

/// How often retained, watched buffers are checked for release.
pub const RETAINED_POLL: Duration = Duration::from_millis(200);

impl Device {
    /// The export table (shared with the vhost-user layer for `GET_SHARED_OBJECT`).
    pub fn export_table(&self) -> std::sync::Arc<ExportTable> {
        self.exports.clone()
    }

    /// Whether the device offers `VIRTIO_DMAHEAP_F_UUID` (default: yes).
    pub fn set_uuid_offered(&mut self, offered: bool) {
        self.uuid_offered = offered;
    }

    /// Whether UUIDs are registered with the front end's shared-object table
    /// (`--shared-object-table`; default: no, QEMU 11.1.3's is broken, spec A.5).
    pub fn set_shared_object_table(&mut self, on: bool) {
        self.share_table = on;
    }

    /// Whether UUIDs are registered with the front end's shared-object table.
    pub fn shared_object_table(&self) -> bool {
        self.share_table
    }

    /// The UUID of a live buffer, if it has one.
    pub fn uuid_of(&self, id: u64) -> Option<Uuid> {
        self.exported.get(&id).map(|e| e.uuid)
    }

    /// Buffers freed by the guest but held for importers, by their old id.
    pub fn retained(&self) -> impl Iterator<Item = (u64, &Retained)> {
        self.retained.iter().map(|(&id, r)| (id, r))
    }

    /// ASSIGN_UUID.
    pub(super) fn assign_uuid(
        &mut self,
        id: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<Uuid, RequestError> {
        let rec = self.pool.buffer(id).ok_or(RequestError::NoBuffer)?;
        if let Some(e) = self.exported.get(&id) {
            return Ok(e.uuid);
        }
        let m = self.pool.mapping(rec.mapping).ok_or(RequestError::IoErr)?;
        let export = match m.buf.export(rec.off, rec.len) {
            Ok(Some(e)) => e,
            Ok(None) => return Err(RequestError::Unsupp),
            Err(e) => {
                let status = match e {
                    ProviderError::NoMemory(_) => RequestError::NoMem,
                    _ => RequestError::IoErr,
                };
                self.ratelimit
                    .warn(format_args!("buffer {id}: export failed: {e}"));
                return Err(status);
            }
        };
        let uuid = random_uuid().map_err(|e| {
            self.ratelimit
                .warn(format_args!("getrandom for a UUID failed: {e}"));
            RequestError::IoErr
        })?;
        // In the table before anyone knows the UUID: a lookup may follow at once.
        self.exports.insert(uuid, export.file, rec.len);
        let registered = match self.register(&uuid, mapper) {
            Ok(r) => r,
            Err(e) => {
                self.exports.remove(&uuid);
                return Err(e);
            }
        };
        debug!("buffer {id}: UUID {}", uuid_string(&uuid));
        self.exported.insert(
            id,
            Exported {
                uuid,
                kind: export.kind,
                registered,
            },
        );
        Ok(uuid)
    }

    /// Registers `uuid` with the front end's shared-object table if the operator asked for
    /// it (`--shared-object-table`) and the front end has one. Returns whether it did.
    fn register(&mut self, uuid: &Uuid, mapper: &mut dyn Mapper) -> Result<bool, RequestError> {
        if !self.share_table || self.share_unsupported {
            return Ok(false);
        }
        match mapper.share(uuid) {
            Ok(()) => Ok(true),
            Err(MapError::NotRunning) => Err(RequestError::Retry),
            Err(MapError::Unsupported) => {
                self.share_unsupported = true;
                log::warn!(
                    "the front end did not negotiate VHOST_USER_PROTOCOL_F_SHARED_OBJECT: \
                     UUIDs are not registered with it (the export socket still resolves them)"
                );
                Ok(false)
            }
            Err(e) => {
                self.ratelimit
                    .warn(format_args!("the front end refused SHARED_OBJECT_ADD: {e}"));
                Err(RequestError::IoErr)
            }
        }
    }

    /// Withdraws the UUID of a live buffer from the front end and the export table, and
    /// returns the export (the caller drops it). [`RequestError::Retry`] if the ring
    /// stopped (nothing changed then).
    fn withdraw(
        &mut self,
        id: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<Option<(File, ExportKind)>, RequestError> {
        let Some(e) = self.exported.get(&id).copied() else {
            return Ok(None);
        };
        if e.registered {
            match mapper.unshare(&e.uuid) {
                Ok(()) => {}
                Err(MapError::NotRunning) => return Err(RequestError::Retry),
                // The front end no longer has it: gone all the same.
                Err(err) => self.ratelimit.warn(format_args!(
                    "SHARED_OBJECT_REMOVE of buffer {id}'s UUID refused: {err}"
                )),
            }
        }
        self.exported.remove(&id);
        Ok(self.exports.remove(&e.uuid).map(|f| (f, e.kind)))
    }

    /// Withdraws every live buffer's UUID (the session ends). Progress is kept when the
    /// ring stops half way.
    pub(super) fn withdraw_all(&mut self, mapper: &mut dyn Mapper) -> Result<(), RequestError> {
        let ids: Vec<u64> = self.exported.keys().copied().collect();
        for id in ids {
            self.withdraw(id, mapper)?;
        }
        Ok(())
    }

    /// FREE of an exported buffer: the UUID is withdrawn and the buffer is retained (its
    /// memory out of reuse, still charged) until its export is released.
    pub(super) fn free_exported(
        &mut self,
        id: u64,
        mapper: &mut dyn Mapper,
    ) -> Result<(), RequestError> {
        let export = self.withdraw(id, mapper)?;
        let Some(rec) = self.pool.remove_buffer(id) else {
            return Err(RequestError::NoBuffer);
        };
        self.idle.touch();
        // Watch before our last reference goes, so that the registration sees the file.
        let token = match &export {
            Some((file, ExportKind::DmaBuf)) => match self.watch.as_mut().map(|w| w.watch(file)) {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    self.ratelimit.warn(format_args!(
                        "buffer {id}: cannot watch its export ({e}): retained until the \
                         session ends"
                    ));
                    None
                }
                None => None,
            },
            _ => None,
        };
        drop(export);
        let own = self
            .pool
            .mapping(rec.mapping)
            .map(|m| (m.arena.is_none(), m.len));
        let range = match own {
            // Its own host allocation: out of the window, our references dropped; the
            // importer's fd holds the memory.
            Some((true, len)) => match self.release_mapping(rec.mapping, mapper) {
                Ok(()) => None,
                // The ring stopped: the mapping stays in the window. Keep it whole, as an
                // arena fully taken by this retained buffer.
                Err(_) => {
                    let m = self.pool.mapping_mut(rec.mapping);
                    if let Some(m) = m {
                        let mut arena = super::pool::Arena::new(len);
                        arena.alloc.alloc_at(0, len);
                        m.arena = Some(arena);
                    }
                    Some((rec.mapping, 0, len))
                }
            },
            Some((false, _)) => Some((rec.mapping, rec.off, rec.len)),
            None => None,
        };
        self.retained.insert(
            id,
            Retained {
                heap: rec.heap,
                charged: rec.len,
                range,
                token,
            },
        );
        if token.is_some() && self.retained_next.is_none() {
            self.retained_next = Some(Instant::now() + RETAINED_POLL);
        }
        Ok(())
    }

    /// When [`Device::poll_retained`] should run next: every [`RETAINED_POLL`] while
    /// retained buffers are watched.
    pub(super) fn retained_deadline(&self) -> Option<Instant> {
        self.retained_next
    }

    /// If the poll is due at `now`: releases every retained buffer whose export is closed
    /// everywhere. Returns how many.
    pub fn poll_retained(&mut self, now: Instant) -> usize {
        if self.retained_next.is_none_or(|d| now < d) {
            return 0;
        }
        let released = self.release_closed_exports();
        self.retained_next = self
            .retained
            .values()
            .any(|r| r.token.is_some())
            .then(|| now + RETAINED_POLL);
        released
    }

    /// Releases every retained buffer whose export is closed everywhere, now.
    pub fn release_closed_exports(&mut self) -> usize {
        let Some(watch) = &self.watch else {
            return 0;
        };
        let alive = match watch.alive() {
            Ok(a) => a,
            Err(e) => {
                self.ratelimit
                    .warn(format_args!("reading the export watch failed: {e}"));
                return 0;
            }
        };
        let gone: Vec<u64> = self
            .retained
            .iter()
            .filter(|(_, r)| r.token.is_some_and(|t| !alive.contains(&t)))
            .map(|(&id, _)| id)
            .collect();
        for &id in &gone {
            if let Some(r) = self.retained.remove(&id) {
                self.release_retained(id, r);
            }
        }
        gone.len()
    }

    /// Gives a retained buffer's memory and charge back.
    fn release_retained(&mut self, id: u64, r: Retained) {
        debug!("retained buffer {id}: export released");
        self.quota.uncharge(r.heap, r.charged);
        self.idle.touch();
        let Some((woff, off, len)) = r.range else {
            return;
        };
        let spare = self.pool.spare_of(r.heap);
        let Some(m) = self.pool.mapping_mut(woff) else {
            return;
        };
        if let Err(e) = m.buf.zero(off, len) {
            self.ratelimit.error(format_args!(
                "retained buffer {id}: zeroing failed, range not reused: {e}"
            ));
            return;
        }
        let Some(arena) = m.arena.as_mut() else {
            return;
        };
        arena.alloc.free(off, len);
        if arena.alloc.is_empty() && spare.is_none() {
            arena.spare = true;
        }
    }

    /// Forgets every export and retained buffer (the session or the connection ended; the
    /// kernel keeps the pages for whoever still holds an fd).
    pub(super) fn drop_exports(&mut self) {
        self.exported.clear();
        self.retained.clear();
        self.retained_next = None;
        self.exports.clear();
    }

    /// Exported live buffers and retained buffers (count, bytes) of `heap`.
    pub(super) fn export_counts(&self, heap: usize) -> (u64, u64, u64) {
        let exported = self
            .exported
            .keys()
            .filter(|id| self.pool.buffer(**id).is_some_and(|r| r.heap == heap))
            .count() as u64;
        let (n, bytes) = self
            .retained
            .values()
            .filter(|r| r.heap == heap)
            .fold((0, 0), |(n, b), r| (n + 1, b + r.charged));
        (exported, n, bytes)
    }
}

/// The usual text form of a UUID.
pub fn uuid_string(u: &Uuid) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}
