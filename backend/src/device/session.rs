//! The driver's session (`VIRTIO_DMAHEAP_F_SESSION`, spec 6.9).
//!
//! A vhost-user back end cannot tell a device reset from a paused VM: both stop the rings
//! with `GET_VRING_BASE`, but QEMU drops the window's mappings only at a reset. So the
//! device never drops buffers when the ring stops. The driver says when its buffers end:
//! SESSION_OPEN ends every earlier session (their mappings are unmapped if the front end
//! still has them), SESSION_CLOSE takes every mapping out of the window before the driver
//! resets the device (optionally keeping the buffers for a resume after a suspend), and a
//! disconnect of the front end ends everything.

use super::*;

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
        !self.session_acked || matches!(self.session, SessionState::Open(id) if id != 0)
    }

    fn new_session_id(&mut self) -> u64 {
        self.sessions_opened += 1;
        self.id_keys.hash_one(self.sessions_opened).max(1)
    }

    pub(super) fn session_open_req(&mut self, req: &[u8], mapper: &mut dyn Mapper) -> Reply {
        let mut resp = SessionOpenResp {
            hdr: resp_hdr(VIRTIO_DMAHEAP_S_INVAL),
            ..Default::default()
        };
        if let Some(r) = parse::<SessionOpenReq>(req) {
            match self.session_open(r.resume_id.to_native(), mapper) {
                Ok(id) => {
                    resp.hdr = resp_hdr(VIRTIO_DMAHEAP_S_OK);
                    resp.session_id = id.into();
                }
                Err(RETRY) => return Reply::Retry,
                Err(status) => resp.hdr = resp_hdr(status),
            }
        }
        Reply::Answer(resp.as_slice().to_vec())
    }

    fn session_open(&mut self, resume_id: u64, mapper: &mut dyn Mapper) -> Result<u64, Status> {
        if resume_id == 0 {
            self.end_session(mapper)?;
            let id = self.new_session_id();
            self.session = SessionState::Open(id);
            debug!("session {id:#x} opened");
            return Ok(id);
        }
        match self.session {
            // Asked again after it worked: nothing left to do.
            SessionState::Open(id) if id == resume_id => Ok(id),
            SessionState::Suspended(id) if id == resume_id => {
                self.remap_all(mapper)?;
                self.session = SessionState::Open(id);
                self.last_activity = Some(Instant::now());
                debug!(
                    "session {id:#x} resumed with {} buffers",
                    self.buffers.len()
                );
                Ok(id)
            }
            _ => Err(VIRTIO_DMAHEAP_S_NO_SESSION),
        }
    }

    pub(super) fn session_close_req(&mut self, req: &[u8], mapper: &mut dyn Mapper) -> Status {
        let Some(r) = parse::<SessionCloseReq>(req) else {
            return VIRTIO_DMAHEAP_S_INVAL;
        };
        let flags = r.flags.to_native();
        if r.reserved.to_native() != 0 || flags & !VIRTIO_DMAHEAP_CLOSE_VALID_MASK != 0 {
            return VIRTIO_DMAHEAP_S_INVAL;
        }
        let SessionState::Open(id) = self.session else {
            return VIRTIO_DMAHEAP_S_NO_SESSION;
        };
        if let Err(status) = self.unmap_all(mapper) {
            return status;
        }
        if flags & VIRTIO_DMAHEAP_CLOSE_SUSPEND != 0 {
            self.drop_empty_arenas();
            self.session = SessionState::Suspended(id);
            debug!(
                "session {id:#x} suspended with {} buffers",
                self.buffers.len()
            );
        } else {
            self.drop_records();
            self.session = SessionState::Closed;
            debug!("session {id:#x} closed");
        }
        VIRTIO_DMAHEAP_S_OK
    }

    /// Checks a RESERVE/UNRESERVE range; returns (offset, len).
    fn reserve_range(&self, req: &[u8]) -> Result<(u64, u64), Status> {
        let r = parse::<ReserveReq>(req).ok_or(VIRTIO_DMAHEAP_S_INVAL)?;
        let (off, len) = (r.offset.to_native(), r.len.to_native());
        let page = u64::from(VIRTIO_DMAHEAP_PAGE_SIZE);
        if len == 0
            || !off.is_multiple_of(page)
            || !len.is_multiple_of(page)
            || off
                .checked_add(len)
                .is_none_or(|e| e > self.limits.shm_size)
        {
            return Err(VIRTIO_DMAHEAP_S_INVAL);
        }
        Ok((off, len))
    }

    pub(super) fn reserve_req(&mut self, req: &[u8]) -> Status {
        let (off, len) = match self.reserve_range(req) {
            Ok(r) => r,
            Err(s) => return s,
        };
        if self.reservations.len() >= MAX_RESERVATIONS {
            return VIRTIO_DMAHEAP_S_QUOTA;
        }
        if !self.window.alloc_at(off, len) {
            return VIRTIO_DMAHEAP_S_WINDOW_FULL;
        }
        self.reservations.insert(off, len);
        VIRTIO_DMAHEAP_S_OK
    }

    pub(super) fn unreserve_req(&mut self, req: &[u8]) -> Status {
        let (off, len) = match self.reserve_range(req) {
            Ok(r) => r,
            Err(s) => return s,
        };
        if self.reservations.get(&off) != Some(&len) {
            return VIRTIO_DMAHEAP_S_INVAL;
        }
        self.reservations.remove(&off);
        self.window.free(off, len);
        VIRTIO_DMAHEAP_S_OK
    }

    /// Takes every mapping of the session out of the window. Progress is kept when the
    /// ring stops half way ([`RETRY`]): a second attempt continues where this one ended.
    fn unmap_all(&mut self, mapper: &mut dyn Mapper) -> Result<usize, Status> {
        let mut unmapped = 0;
        let mapped: Vec<(u64, u64)> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.mapped)
            .map(|(&w, m)| (w, m.len))
            .collect();
        for (woff, len) in mapped {
            match mapper.unmap(woff, len) {
                Ok(()) => unmapped += 1,
                Err(MapError::NotRunning) => return Err(RETRY),
                // The front end no longer has it (it dropped the window at a reset): gone
                // all the same.
                Err(e) => self.ratelimit.warn(format_args!(
                    "unmap of {woff:#x}+{len:#x} refused ({e}): the front end no longer has it"
                )),
            }
            if let Some(m) = self.mappings.get_mut(&woff) {
                m.mapped = false;
            }
        }
        Ok(unmapped)
    }

    /// Puts every mapping of a suspended session back at its window offset. If the front
    /// end refuses one, the session cannot be resumed: it ends, and the driver is told
    /// `VIRTIO_DMAHEAP_S_IOERR` (it then opens a new session).
    fn remap_all(&mut self, mapper: &mut dyn Mapper) -> Result<(), Status> {
        let unmapped: Vec<u64> = self
            .mappings
            .iter()
            .filter(|(_, m)| !m.mapped)
            .map(|(&w, _)| w)
            .collect();
        let mut refused = false;
        for woff in unmapped {
            let Some(m) = self.mappings.get_mut(&woff) else {
                continue;
            };
            match mapper.map(m.buf.fd(), 0, woff, m.len) {
                Ok(()) => m.mapped = true,
                Err(MapError::NotRunning) => return Err(RETRY),
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
            return Err(VIRTIO_DMAHEAP_S_IOERR);
        }
        Ok(())
    }

    /// Ends the current session, open or suspended: its mappings leave the window and every
    /// buffer, arena and reservation is released. Returns (buffers, mappings) released.
    ///
    /// Sends `SHMEM_UNMAP`: call it only where the [`Mapper`] may (the vring worker of a
    /// running device). [`RETRY`] if the ring stopped half way (nothing is lost: a second
    /// attempt continues).
    pub fn end_session(&mut self, mapper: &mut dyn Mapper) -> Result<(usize, usize), Status> {
        self.unmap_all(mapper)?;
        let counts = (self.buffers.len(), self.mappings.len());
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
    ) -> Result<(usize, usize), Status> {
        let counts = self.end_session(mapper)?;
        self.session = SessionState::Closed;
        Ok(counts)
    }

    /// The front end went away (or reset the device behind our back): drops every buffer,
    /// mapping, reservation and session without unmapping anything, releasing the host
    /// memory. The buffer id sequence goes on.
    pub fn disconnect(&mut self) {
        if !self.buffers.is_empty() || !self.mappings.is_empty() {
            debug!(
                "dropping {} buffers, {} mappings without unmapping",
                self.buffers.len(),
                self.mappings.len()
            );
        }
        self.drop_records();
        self.session = SessionState::Open(0);
    }

    /// Forgets every buffer, mapping and reservation (already out of the window).
    fn drop_records(&mut self) {
        self.buffers.clear();
        self.mappings.clear();
        self.reservations.clear();
        self.window = RangeAllocator::new(self.limits.shm_size);
        self.counters = vec![HeapCounters::default(); self.heaps.len()];
        self.bytes = 0;
        self.last_activity = None;
    }

    /// Releases the arenas that hold no buffer and the spare large mappings (already out
    /// of the window), so that a suspended session keeps only memory that holds data.
    fn drop_empty_arenas(&mut self) {
        for c in &mut self.counters {
            for woff in std::mem::take(&mut c.large_spares) {
                if let Some(m) = self.mappings.remove(&woff) {
                    self.window.free(woff, m.len);
                }
            }
        }
        let empty: Vec<u64> = self
            .mappings
            .iter()
            .filter(|(_, m)| !m.mapped && m.arena.as_ref().is_some_and(|a| a.alloc.is_empty()))
            .map(|(&w, _)| w)
            .collect();
        for woff in empty {
            if let Some(m) = self.mappings.get(&woff) {
                let (heap, len) = (m.heap, m.len);
                self.counters[heap].arena_bytes -= len;
                if self.counters[heap].spare == Some(woff) {
                    self.counters[heap].spare = None;
                }
            }
            self.forget_mapping(woff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    const SESSION: u64 = (1 << VIRTIO_DMAHEAP_F_SYNC) | (1 << VIRTIO_DMAHEAP_F_SESSION);

    fn session_device() -> (Device, Arc<FakeProvider>) {
        let (mut d, p) = device();
        d.set_acked_features(SESSION);
        (d, p)
    }

    fn open(d: &mut Device, m: &mut dyn Mapper, resume: u64) -> (u32, u64) {
        let mut r = d.answer(
            &req(SessionOpenReq {
                hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN),
                resume_id: resume.into(),
            }),
            16,
            m,
        );
        r.resize(16, 0);
        let r = parse::<SessionOpenResp>(&r).unwrap();
        (r.hdr.status.to_native(), r.session_id.to_native())
    }

    fn close_bytes(flags: u32) -> Vec<u8> {
        req(SessionCloseReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_CLOSE),
            flags: flags.into(),
            reserved: 0.into(),
        })
    }

    fn close(d: &mut Device, m: &mut dyn Mapper, flags: u32) -> u32 {
        status_of(&d.answer(&close_bytes(flags), 8, m))
    }

    fn reserve(d: &mut Device, ty: u32, offset: u64, len: u64) -> u32 {
        let r = req(ReserveReq {
            hdr: hdr(ty),
            offset: offset.into(),
            len: len.into(),
        });
        status_of(&d.answer(&r, 8, &mut FakeMapper::default()))
    }

    /// Fails with NotRunning after `ok` successful calls (a stop in the middle).
    struct StopsAfter<'a> {
        inner: &'a mut FakeMapper,
        ok: usize,
    }

    impl Mapper for StopsAfter<'_> {
        fn map(&mut self, fd: BorrowedFd<'_>, o: u64, s: u64, l: u64) -> Result<(), MapError> {
            if self.ok == 0 {
                return Err(MapError::NotRunning);
            }
            self.ok -= 1;
            self.inner.map(fd, o, s, l)
        }
        fn unmap(&mut self, s: u64, l: u64) -> Result<(), MapError> {
            if self.ok == 0 {
                return Err(MapError::NotRunning);
            }
            self.ok -= 1;
            self.inner.unmap(s, l)
        }
    }

    #[test]
    fn a_session_driver_opens_before_it_allocates() {
        let (mut d, _) = session_device();
        let mut m = FakeMapper::default();
        assert_eq!(
            alloc(&mut d, &mut m, 0, 4096).0,
            VIRTIO_DMAHEAP_S_NO_SESSION
        );
        assert_eq!(free(&mut d, &mut m, 1), VIRTIO_DMAHEAP_S_NO_SESSION);
        assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_NO_SESSION);
        let (st, id) = open(&mut d, &mut m, 0);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
        assert_ne!(id, 0);
        assert_eq!(d.stats().session, "open");
        assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
    }

    #[test]
    fn a_driver_without_the_feature_has_an_implicit_session() {
        let (mut d, _) = device();
        let mut m = FakeMapper::default();
        assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_UNSUPP);
        assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_UNSUPP);
        assert_eq!(alloc(&mut d, &mut m, 0, 4096).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(d.stats().session, "implicit");
    }

    #[test]
    fn a_new_session_ends_the_previous_one_and_takes_its_buffers_out_of_the_window() {
        let (mut d, _) = session_device();
        let mut m = FakeMapper::default();
        let (_, first) = open(&mut d, &mut m, 0);
        let small = alloc(&mut d, &mut m, 0, 4096);
        let big = alloc(&mut d, &mut m, 0, 32 << 20);
        assert_eq!((small.0, big.0), (VIRTIO_DMAHEAP_S_OK, VIRTIO_DMAHEAP_S_OK));
        assert_eq!(
            reserve(&mut d, VIRTIO_DMAHEAP_REQ_RESERVE, 64 << 20, 4096),
            0
        );
        let (st, second) = open(&mut d, &mut m, 0);
        assert_eq!(st, VIRTIO_DMAHEAP_S_OK);
        assert_ne!(second, first);
        assert!(m.mapped.is_empty(), "left in the window: {:x?}", m.mapped);
        assert_eq!(m.maps, m.unmaps);
        let s = d.stats();
        assert_eq!((s.total, s.reserved_bytes), (HeapStats::default(), 0));
        assert_eq!(free(&mut d, &mut m, small.1), VIRTIO_DMAHEAP_S_NO_BUFFER);
        assert_eq!(open(&mut d, &mut m, first).0, VIRTIO_DMAHEAP_S_NO_SESSION);
        let again = alloc(&mut d, &mut m, 0, 4096);
        assert!(again.1 > big.1, "ids go on across sessions");
    }

    #[test]
    fn close_takes_every_mapping_out_and_releases_everything() {
        let (mut d, _) = session_device();
        let mut m = FakeMapper::default();
        let (_, id) = open(&mut d, &mut m, 0);
        let b = alloc(&mut d, &mut m, 0, 4096);
        alloc(&mut d, &mut m, 0, 16 << 20);
        assert_eq!(free(&mut d, &mut m, b.1), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(close(&mut d, &mut m, 8), VIRTIO_DMAHEAP_S_INVAL, "bad flag");
        assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_OK);
        assert!(m.mapped.is_empty(), "left in the window: {:x?}", m.mapped);
        assert_eq!(d.stats().total, HeapStats::default());
        assert_eq!(d.stats().session, "closed");
        assert_eq!(
            alloc(&mut d, &mut m, 0, 4096).0,
            VIRTIO_DMAHEAP_S_NO_SESSION
        );
        assert_eq!(close(&mut d, &mut m, 0), VIRTIO_DMAHEAP_S_NO_SESSION);
        assert_eq!(open(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_NO_SESSION);
        assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
    }

    #[test]
    fn a_suspended_session_resumes_with_its_buffers_at_their_offsets() {
        let (mut d, p) = session_device();
        let mut m = FakeMapper::default();
        let (_, id) = open(&mut d, &mut m, 0);
        let small = alloc(&mut d, &mut m, 0, 4096);
        let big = alloc(&mut d, &mut m, 0, 16 << 20);
        // A second, emptied arena (the spare) holds no data: it is not kept.
        let fill: Vec<_> = (0..8).map(|_| alloc(&mut d, &mut m, 0, 1 << 20)).collect();
        for f in &fill {
            assert_eq!(free(&mut d, &mut m, f.1), VIRTIO_DMAHEAP_S_OK);
        }
        d.poke(small.1, 0, b"small").unwrap();
        d.poke(big.1, 8 << 20, b"big").unwrap();
        let before = d.stats();
        let held_mappings = before.total.mappings;
        assert_eq!(close(&mut d, &mut m, VIRTIO_DMAHEAP_CLOSE_SUSPEND), 0);
        assert!(m.mapped.is_empty(), "left in the window: {:x?}", m.mapped);
        let s = d.stats();
        assert_eq!(s.session, "suspended");
        assert_eq!((s.total.buffers, s.total.mappings), (2, 0));
        assert_eq!(
            alloc(&mut d, &mut m, 0, 4096).0,
            VIRTIO_DMAHEAP_S_NO_SESSION
        );
        assert_eq!(free(&mut d, &mut m, small.1), VIRTIO_DMAHEAP_S_NO_SESSION);
        assert_eq!(open(&mut d, &mut m, id ^ 1).0, VIRTIO_DMAHEAP_S_NO_SESSION);
        let allocations = p.allocations.load(Ordering::SeqCst);
        let (st, resumed) = open(&mut d, &mut m, id);
        assert_eq!((st, resumed), (VIRTIO_DMAHEAP_S_OK, id));
        assert_eq!(
            p.allocations.load(Ordering::SeqCst),
            allocations,
            "the same host memory comes back"
        );
        assert!(
            m.mapped.contains(&(big.2, big.3)),
            "big buffer back at {:#x}",
            big.2
        );
        assert!(
            d.stats().total.mappings < held_mappings,
            "the empty arena went"
        );
        assert_eq!(d.peek(small.1, 0, 5).unwrap(), b"small");
        assert_eq!(d.peek(big.1, 8 << 20, 3).unwrap(), b"big");
        // Asking again is harmless; the session works as before.
        assert_eq!(open(&mut d, &mut m, id), (VIRTIO_DMAHEAP_S_OK, id));
        assert_eq!(free(&mut d, &mut m, small.1), VIRTIO_DMAHEAP_S_OK);
        let n = alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(n.0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(d.peek(n.1, 0, 5).unwrap(), [0; 5]);
    }

    #[test]
    fn a_stop_during_close_or_resume_is_retried_where_it_stopped() {
        let (mut d, _) = session_device();
        let mut m = FakeMapper::default();
        let (_, id) = open(&mut d, &mut m, 0);
        for _ in 0..3 {
            alloc(&mut d, &mut m, 0, 16 << 20);
        }
        let r = d.handle(
            &close_bytes(VIRTIO_DMAHEAP_CLOSE_SUSPEND),
            8,
            &mut StopsAfter {
                inner: &mut m,
                ok: 1,
            },
        );
        assert_eq!(r, Reply::Retry);
        assert_eq!(m.mapped.len(), 2, "one unmapped before the stop");
        assert_eq!(d.stats().session, "open");
        // Served again once the ring runs: continues (the fake refuses a double unmap).
        assert_eq!(close(&mut d, &mut m, VIRTIO_DMAHEAP_CLOSE_SUSPEND), 0);
        assert!(m.mapped.is_empty());
        let open_req = req(SessionOpenReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN),
            resume_id: id.into(),
        });
        let r = d.handle(
            &open_req,
            16,
            &mut StopsAfter {
                inner: &mut m,
                ok: 2,
            },
        );
        assert_eq!(r, Reply::Retry);
        assert_eq!(d.stats().session, "suspended");
        assert_eq!(open(&mut d, &mut m, id), (VIRTIO_DMAHEAP_S_OK, id));
        assert_eq!((m.mapped.len(), m.maps), (3, 6));
        // A stop while a new session ends the old one: retried too.
        let new_req = req(SessionOpenReq {
            hdr: hdr(VIRTIO_DMAHEAP_REQ_SESSION_OPEN),
            resume_id: 0.into(),
        });
        let r = d.handle(
            &new_req,
            16,
            &mut StopsAfter {
                inner: &mut m,
                ok: 1,
            },
        );
        assert_eq!(r, Reply::Retry);
        assert_eq!(d.stats().total.buffers, 3, "nothing dropped yet");
        assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
        assert!(m.mapped.is_empty());
    }

    #[test]
    fn a_refused_remap_ends_the_session() {
        let (mut d, _) = session_device();
        let mut m = FakeMapper::default();
        let (_, id) = open(&mut d, &mut m, 0);
        alloc(&mut d, &mut m, 0, 16 << 20);
        alloc(&mut d, &mut m, 0, 4096);
        assert_eq!(close(&mut d, &mut m, VIRTIO_DMAHEAP_CLOSE_SUSPEND), 0);
        m.fail_map = true;
        assert_eq!(open(&mut d, &mut m, id).0, VIRTIO_DMAHEAP_S_IOERR);
        m.fail_map = false;
        assert_eq!(d.stats().total, HeapStats::default());
        assert_eq!(d.stats().session, "closed");
        assert!(m.mapped.is_empty());
        assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
    }

    #[test]
    fn reserved_ranges_are_kept_out_of_allocations() {
        let mut l = limits();
        l.shm_size = 64 << 20;
        let (mut d, _) = device_with(vec![params("a")], l);
        d.set_acked_features(SESSION);
        let mut m = FakeMapper::default();
        let rs = VIRTIO_DMAHEAP_REQ_RESERVE;
        let un = VIRTIO_DMAHEAP_REQ_UNRESERVE;
        assert_eq!(reserve(&mut d, rs, 0, 4096), VIRTIO_DMAHEAP_S_NO_SESSION);
        open(&mut d, &mut m, 0);
        for (off, len) in [
            (0, 0),
            (1, 4096),
            (0, 4097),
            (60 << 20, 8 << 20),
            (u64::MAX - 4095, 8192),
        ] {
            assert_eq!(
                reserve(&mut d, rs, off, len),
                VIRTIO_DMAHEAP_S_INVAL,
                "{off:#x}+{len:#x}"
            );
        }
        // Everything but the last 16 MiB.
        assert_eq!(reserve(&mut d, rs, 0, 48 << 20), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            reserve(&mut d, rs, 4096, 4096),
            VIRTIO_DMAHEAP_S_WINDOW_FULL
        );
        assert_eq!(d.stats().reserved_bytes, 48 << 20);
        let a = alloc(&mut d, &mut m, 0, 8 << 20);
        assert_eq!(a.0, VIRTIO_DMAHEAP_S_OK);
        assert!(
            a.2 >= 48 << 20,
            "placed at {:#x}, inside the reservation",
            a.2
        );
        assert_eq!(
            alloc(&mut d, &mut m, 0, 16 << 20).0,
            VIRTIO_DMAHEAP_S_WINDOW_FULL
        );
        assert_eq!(
            reserve(&mut d, rs, a.2, 4096),
            VIRTIO_DMAHEAP_S_WINDOW_FULL,
            "in use"
        );
        assert_eq!(
            reserve(&mut d, un, 0, 4096),
            VIRTIO_DMAHEAP_S_INVAL,
            "not exact"
        );
        assert_eq!(reserve(&mut d, un, 0, 48 << 20), VIRTIO_DMAHEAP_S_OK);
        assert_eq!(
            reserve(&mut d, un, 0, 48 << 20),
            VIRTIO_DMAHEAP_S_INVAL,
            "twice"
        );
        assert_eq!(alloc(&mut d, &mut m, 0, 16 << 20).0, VIRTIO_DMAHEAP_S_OK);
        // Bounded count.
        let mut n = 0;
        while reserve(&mut d, rs, (32 << 20) + n * 4096, 4096) == VIRTIO_DMAHEAP_S_OK {
            n += 1;
        }
        assert_eq!(n as usize, MAX_RESERVATIONS);
        assert_eq!(reserve(&mut d, rs, 60 << 20, 4096), VIRTIO_DMAHEAP_S_QUOTA);
        // They end with the session.
        open(&mut d, &mut m, 0);
        assert_eq!(d.stats().reserved_bytes, 0);
    }

    #[test]
    fn the_host_can_end_the_session() {
        let (mut d, _) = session_device();
        let mut m = FakeMapper::default();
        open(&mut d, &mut m, 0);
        let b = alloc(&mut d, &mut m, 0, 4096);
        alloc(&mut d, &mut m, 0, 16 << 20);
        assert_eq!(d.end_session_by_host(&mut m), Ok((2, 2)));
        assert!(m.mapped.is_empty());
        assert_eq!(d.stats().session, "closed");
        assert_eq!(free(&mut d, &mut m, b.1), VIRTIO_DMAHEAP_S_NO_SESSION);
        assert_eq!(open(&mut d, &mut m, 0).0, VIRTIO_DMAHEAP_S_OK);
        assert_eq!(free(&mut d, &mut m, b.1), VIRTIO_DMAHEAP_S_NO_BUFFER);
    }

    #[test]
    fn session_ids_are_unpredictable_and_never_zero() {
        let (mut d, _) = session_device();
        let mut m = FakeMapper::default();
        let ids: Vec<u64> = (0..64).map(|_| open(&mut d, &mut m, 0).1).collect();
        assert!(ids.iter().all(|&i| i != 0));
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(
            ids.windows(2).any(|w| w[1] != w[0] + 1),
            "sequential: {ids:x?}"
        );
    }
}
