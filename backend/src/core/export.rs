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
//!   last reference is closed; a memfd's export is a reopened file whose last close
//!   inotify reports ([`ReleaseWatch`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::debug;

use super::{Device, MapError, Mapper, RequestError};
use crate::host::{ExportKind, ProviderError};

pub use super::release_watch::{parse_epoll_fdinfo, ReleaseWatch, Watch};

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
    /// How its release is seen; `None`: it cannot be (it stays until the session ends).
    pub token: Option<Watch>,
}

/// Raises the soft limit of open files to the hard one (as systemd recommends services
/// that need many fds do), before the sandbox. Failures only log.
pub fn raise_nofile_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a live rlimit the kernel writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 || l.rlim_cur >= l.rlim_max {
        return;
    }
    let want = libc::rlimit {
        rlim_cur: l.rlim_max,
        rlim_max: l.rlim_max,
    };
    // SAFETY: `want` is a live rlimit the kernel reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        log::warn!(
            "cannot raise the open-file limit to {}: {}",
            l.rlim_max,
            io::Error::last_os_error()
        );
    }
}

/// Most live exports: each holds an fd, so half of the open-file limit (less a reserve
/// for sockets, arenas and the vhost-user machinery), at least 16. A guest that asks for
/// more is answered `VIRTIO_DMAHEAP_S_NOMEM` instead of starving the daemon of fds.
pub fn export_cap() -> usize {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a live rlimit the kernel writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return 16;
    }
    let soft = usize::try_from(l.rlim_cur).unwrap_or(usize::MAX);
    (soft.saturating_sub(1024) / 2)
        .max(soft.min(1024) / 4)
        .max(16)
}

/// How often retained, watched buffers are checked for release.
pub const RETAINED_POLL: Duration = Duration::from_millis(200);

impl Device {
    /// The export table (shared with the vhost-user layer for `GET_SHARED_OBJECT`).
    pub fn export_table(&self) -> std::sync::Arc<ExportTable> {
        self.exports.clone()
    }

    /// Whether the device offers `VIRTIO_DMAHEAP_F_UUID` (default: yes). Without it nothing
    /// is ever shared: no release watch, so the sandbox needs no `openat` exception.
    pub fn set_uuid_offered(&mut self, offered: bool) {
        self.uuid_offered = offered;
        if !offered {
            self.watch = None;
        }
    }

    /// Whether UUIDs are registered with the front end's shared-object table
    /// (`--shared-object-table`; default: no, QEMU 11.1.3's is broken, spec A.5).
    pub fn set_shared_object_table(&mut self, on: bool) {
        self.share_table = on;
    }

    /// Changes the most live exports (default [`export_cap`]).
    pub fn set_export_cap(&mut self, cap: usize) {
        self.export_cap = cap;
    }

    /// Whether UUIDs are registered with the front end's shared-object table.
    pub fn shared_object_table(&self) -> bool {
        self.share_table
    }

    /// See [`super::DeviceHandle::reopen_dir`].
    pub fn reopen_dir(&self) -> Option<i32> {
        self.watch.as_ref().map(ReleaseWatch::reopen_dir)
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
        if self.exported.len() >= self.export_cap {
            self.ratelimit.warn(format_args!(
                "buffer {id}: {} buffers shared already (each holds an fd): refused",
                self.exported.len()
            ));
            return Err(RequestError::NoMem);
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
        // A memfd's export is a reopened file, so that its last close can be seen.
        let mut export = export;
        if export.kind == ExportKind::Memfd {
            match self.watch.as_ref().map(|w| w.reopen(&export.file)) {
                Some(Ok(f)) => export.file = f,
                Some(Err(e)) => self.ratelimit.warn(format_args!(
                    "buffer {id}: cannot reopen its memfd ({e}): if freed while shared, it \
                     stays charged until the session ends"
                )),
                None => {}
            }
        }
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
    /// The ones registered with the front end go first, so that a stop of the ring leaves
    /// the others untouched.
    pub(super) fn withdraw_all(&mut self, mapper: &mut dyn Mapper) -> Result<(), RequestError> {
        let mut ids: Vec<(bool, u64)> = self
            .exported
            .iter()
            .map(|(&id, e)| (!e.registered, id))
            .collect();
        ids.sort_unstable();
        for (_, id) in ids {
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
        self.idle.touch(rec.heap);
        // Watch before our last reference goes, so that the registration sees the file.
        let token = match (&export, self.watch.as_mut()) {
            (Some((file, kind)), Some(w)) => {
                let r = match kind {
                    ExportKind::DmaBuf => w.watch(file).map(Watch::Epoll),
                    ExportKind::Memfd => w.watch_close(file).map(Watch::Inotify),
                };
                match r {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.ratelimit.warn(format_args!(
                            "buffer {id}: cannot watch its export ({e}): retained until the \
                             session ends"
                        ));
                        None
                    }
                }
            }
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
        let Some(watch) = self.watch.as_mut() else {
            return 0;
        };
        let alive = if self
            .retained
            .values()
            .any(|r| matches!(r.token, Some(Watch::Epoll(_))))
        {
            watch.alive()
        } else {
            Ok(HashSet::new())
        };
        let closed = watch.closed();
        let (alive, closed) = match (alive, closed) {
            (Ok(a), Ok(c)) => (a, c),
            (Err(e), _) | (_, Err(e)) => {
                self.ratelimit
                    .warn(format_args!("reading the export watch failed: {e}"));
                return 0;
            }
        };
        let gone: Vec<u64> = self
            .retained
            .iter()
            .filter(|(_, r)| match r.token {
                Some(Watch::Epoll(t)) => !alive.contains(&t),
                Some(Watch::Inotify(wd)) => closed.contains(&wd),
                None => false,
            })
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
        if let (Some(Watch::Inotify(wd)), Some(w)) = (r.token, self.watch.as_mut()) {
            w.unwatch(wd);
        }
        self.quota.uncharge(r.heap, r.charged);
        self.idle.touch(r.heap);
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

    /// The session ended (its buffers and arenas are gone, the quotas cleared): forgets the
    /// exports of live buffers (withdrawn already) and keeps the retained buffers, charged
    /// again, watched as before. Their memory left the pool with its arenas: the kernel
    /// keeps it for the importers, and nothing of it is handed out again.
    pub(super) fn end_exports(&mut self) {
        self.exported.clear();
        self.exports.clear();
        for r in self.retained.values_mut() {
            r.range = None;
            self.quota.force_charge(r.heap, r.charged);
        }
    }

    /// Forgets every export and retained buffer (the connection ended; the kernel keeps the
    /// pages for whoever still holds an fd).
    pub(super) fn drop_exports(&mut self) {
        self.exported.clear();
        for r in std::mem::take(&mut self.retained).into_values() {
            if let (Some(Watch::Inotify(wd)), Some(w)) = (r.token, self.watch.as_mut()) {
                w.unwatch(wd);
            }
        }
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
