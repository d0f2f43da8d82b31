//! The driver's session (`VIRTIO_DMAHEAP_F_SESSION`, spec 6.9).
//!
//! A vhost-user back end cannot tell a device reset from a paused VM: both stop the rings
//! with `GET_VRING_BASE`, but QEMU drops the window's mappings only at a reset. So the
//! device never drops buffers when the ring stops. The driver says when its buffers end:
//! SESSION_OPEN ends every earlier session (their mappings are unmapped if the front end
//! still has them), SESSION_CLOSE takes every mapping out of the window before the driver
//! resets the device (optionally keeping the buffers for a resume after a suspend), and a
//! disconnect of the front end ends everything.

use std::hash::BuildHasher;

use log::debug;

use super::{Device, MapError, Mapper, RequestError};
use crate::abi::*;

/// Largest number of reserved window ranges per session.
pub const MAX_RESERVATIONS: usize = 1024;

/// Whose buffers the device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Buffers are served. Id 0 is the implicit session of a driver that did not
    /// negotiate `VIRTIO_DMAHEAP_F_SESSION` (or has not opened a session yet).
    Open(u64),
    /// Closed with `VIRTIO_DMAHEAP_CLOSE_SUSPEND`: buffers kept out of the window until
    /// SESSION_OPEN resumes this id.
    Suspended(u64),
    /// Closed (by the driver, or ended by the operator): no buffers.
    Closed,
}

impl SessionState {
    /// Name used in `stats`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Open(0) => "implicit",
            Self::Open(_) => "open",
            Self::Suspended(_) => "suspended",
            Self::Closed => "closed",
        }
    }
}

impl Device {
    /// The session state.
    pub fn session(&self) -> SessionState {
        self.session
    }

    /// Whether requests on buffers may be served: always for a driver without
    /// `VIRTIO_DMAHEAP_F_SESSION`, else only in a session the driver opened.
    pub(super) fn session_ok(&self) -> bool {
        !self.features.session || matches!(self.session, SessionState::Open(id) if id != 0)
    }

    fn new_session_id(&mut self) -> u64 {
        self.sessions_opened += 1;
        self.id_keys.hash_one(self.sessions_opened).max(1)
    }

    pub(super) fn session_open(
        &mut self,
        resume_id: u64,
        page_size: u32,
        reserved: u32,
        mapper: &mut dyn Mapper,
    ) -> Result<u64, RequestError> {
        // Checked before anything changes (spec 6.9.2, item 9).
        let page_size = u64::from(page_size);
        if reserved != 0
            || !page_size.is_power_of_two()
            || !(u64::from(VIRTIO_DMAHEAP_PAGE_SIZE)..=u64::from(VIRTIO_DMAHEAP_PAGE_SIZE_MAX))
                .contains(&page_size)
        {
            return Err(RequestError::Inval);
        }
        if resume_id == 0 {
            self.end_session(mapper)?;
            let id = self.new_session_id();
            self.session = SessionState::Open(id);
            self.page_size = page_size;
            debug!("session {id:#x} opened, page size {page_size}");
            return Ok(id);
        }
        // A resumed session keeps the page size its buffers were placed with.
        if matches!(self.session, SessionState::Open(id) | SessionState::Suspended(id)
            if id == resume_id && page_size != self.page_size)
        {
            return Err(RequestError::Inval);
        }
        match self.session {
            // Asked again after it worked: nothing left to do.
            SessionState::Open(id) if id == resume_id => Ok(id),
            SessionState::Suspended(id) if id == resume_id => {
                self.remap_all(mapper)?;
                self.session = SessionState::Open(id);
                self.idle.touch_all();
                debug!(
                    "session {id:#x} resumed with {} buffers",
                    self.pool.buffer_count()
                );
                Ok(id)
            }
            _ => Err(RequestError::NoSession),
        }
    }

    pub(super) fn session_close(
        &mut self,
        flags: u32,
        reserved: u32,
        mapper: &mut dyn Mapper,
    ) -> Result<(), RequestError> {
        if reserved != 0 || flags & !VIRTIO_DMAHEAP_CLOSE_VALID_MASK != 0 {
            return Err(RequestError::Inval);
        }
        let SessionState::Open(id) = self.session else {
            return Err(RequestError::NoSession);
        };
        self.unmap_all(mapper)?;
        // A suspended session's exports stay registered; a closed one's are withdrawn.
        if flags & VIRTIO_DMAHEAP_CLOSE_SUSPEND == 0 {
            self.withdraw_all(mapper)?;
        }
        if flags & VIRTIO_DMAHEAP_CLOSE_SUSPEND != 0 {
            self.drop_empty_arenas();
            self.session = SessionState::Suspended(id);
            debug!(
                "session {id:#x} suspended with {} buffers",
                self.pool.buffer_count()
            );
        } else {
            self.drop_records();
            self.session = SessionState::Closed;
            debug!("session {id:#x} closed");
        }
        Ok(())
    }

    /// Checks a RESERVE/UNRESERVE range.
    fn check_reserve_range(&self, off: u64, len: u64) -> Result<(), RequestError> {
        let page = self.page_size;
        if len == 0
            || !off.is_multiple_of(page)
            || !len.is_multiple_of(page)
            || off
                .checked_add(len)
                .is_none_or(|e| e > self.limits.shm_size)
        {
            return Err(RequestError::Inval);
        }
        Ok(())
    }

    pub(super) fn reserve(&mut self, off: u64, len: u64) -> Result<(), RequestError> {
        self.check_reserve_range(off, len)?;
        if self.pool.reservation_count() >= MAX_RESERVATIONS {
            return Err(RequestError::Quota);
        }
        if !self.pool.reserve(off, len) {
            return Err(RequestError::WindowFull);
        }
        Ok(())
    }

    pub(super) fn unreserve(&mut self, off: u64, len: u64) -> Result<(), RequestError> {
        self.check_reserve_range(off, len)?;
        if !self.pool.unreserve(off, len) {
            return Err(RequestError::Inval);
        }
        Ok(())
    }

    /// Takes every mapping of the session out of the window. Progress is kept when the
    /// ring stops half way ([`RequestError::Retry`]): a second attempt continues where
    /// this one ended.
    fn unmap_all(&mut self, mapper: &mut dyn Mapper) -> Result<usize, RequestError> {
        let mut unmapped = 0;
        for woff in self.pool.mapping_offsets(|m| m.mapped) {
            let Some(len) = self.pool.mapping(woff).map(|m| m.len) else {
                continue;
            };
            match mapper.unmap(woff, len) {
                Ok(()) => unmapped += 1,
                Err(MapError::NotRunning) => return Err(RequestError::Retry),
                // The front end no longer has it (it dropped the window at a reset): gone
                // all the same.
                Err(e) => self.ratelimit.warn(format_args!(
                    "unmap of {woff:#x}+{len:#x} refused ({e}): the front end no longer has it"
                )),
            }
            if let Some(m) = self.pool.mapping_mut(woff) {
                m.mapped = false;
            }
        }
        Ok(unmapped)
    }

    /// Puts every mapping of a suspended session back at its window offset. If the front
    /// end refuses one, the session cannot be resumed: it ends, and the driver is told
    /// `VIRTIO_DMAHEAP_S_IOERR` (it then opens a new session).
    fn remap_all(&mut self, mapper: &mut dyn Mapper) -> Result<(), RequestError> {
        let mut refused = false;
        for woff in self.pool.mapping_offsets(|m| !m.mapped) {
            let Some(m) = self.pool.mapping_mut(woff) else {
                continue;
            };
            match mapper.map(m.buf.fd(), 0, woff, m.len) {
                Ok(()) => m.mapped = true,
                Err(MapError::NotRunning) => return Err(RequestError::Retry),
                Err(e) => {
                    let len = m.len;
                    self.ratelimit.warn(format_args!(
                        "resume: map of {len:#x} bytes at {woff:#x} failed: {e}"
                    ));
                    refused = true;
                }
            }
        }
        if refused {
            self.end_session(mapper)?;
            self.session = SessionState::Closed;
            return Err(RequestError::IoErr);
        }
        Ok(())
    }

    /// Ends the current session, open or suspended: its mappings leave the window and every
    /// buffer, arena and reservation is released. Returns (buffers, mappings) released.
    ///
    /// Sends `SHMEM_UNMAP`: call it only where the [`Mapper`] may (the vring worker of a
    /// running device). [`RequestError::Retry`] if the ring stopped half way (nothing is
    /// lost: a second attempt continues).
    pub fn end_session(&mut self, mapper: &mut dyn Mapper) -> Result<(usize, usize), RequestError> {
        self.unmap_all(mapper)?;
        self.withdraw_all(mapper)?;
        let counts = (self.pool.buffer_count(), self.pool.mapping_count());
        if counts != (0, 0) {
            debug!(
                "session {}: released {} buffers, {} mappings",
                self.session.name(),
                counts.0,
                counts.1
            );
        }
        self.drop_records();
        Ok(counts)
    }

    /// Ends the session from the host side (the operator's `prepare-reset`): like
    /// [`Device::end_session`], and the driver is answered `VIRTIO_DMAHEAP_S_NO_SESSION`
    /// until it opens a new session.
    pub fn end_session_by_host(
        &mut self,
        mapper: &mut dyn Mapper,
    ) -> Result<(usize, usize), RequestError> {
        let counts = self.end_session(mapper)?;
        self.session = SessionState::Closed;
        Ok(counts)
    }

    /// The front end went away (or reset the device behind our back): drops every buffer,
    /// mapping, reservation, export and session without unmapping or withdrawing
    /// anything, releasing the host memory. The buffer id sequence goes on.
    pub fn disconnect(&mut self) {
        if self.pool.buffer_count() > 0 || self.pool.mapping_count() > 0 {
            debug!(
                "dropping {} buffers, {} mappings without unmapping",
                self.pool.buffer_count(),
                self.pool.mapping_count()
            );
        }
        // The connection's accounting ends: retained buffers too.
        self.drop_exports();
        self.drop_records();
        self.session = SessionState::Open(0);
        self.share_unsupported = false;
    }

    /// Forgets every buffer, mapping, reservation and export (already out of the window
    /// and withdrawn). Retained buffers stay, still charged, until their importers let go.
    fn drop_records(&mut self) {
        self.page_size = u64::from(VIRTIO_DMAHEAP_PAGE_SIZE);
        self.pool.clear();
        self.quota.clear();
        self.idle.clear();
        self.end_exports();
    }

    /// Releases the arenas that hold no buffer and the spare large mappings (already out
    /// of the window), so that a suspended session keeps only memory that holds data.
    fn drop_empty_arenas(&mut self) {
        for woff in self.idle.take_all_large_spares() {
            self.pool.forget_mapping(woff);
        }
        let empty = self
            .pool
            .mapping_offsets(|m| !m.mapped && m.arena.as_ref().is_some_and(|a| a.alloc.is_empty()));
        for woff in empty {
            self.pool.forget_mapping(woff);
        }
    }
}
