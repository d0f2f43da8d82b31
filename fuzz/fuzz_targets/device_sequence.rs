//! The device state machine: arbitrary sequences of ALLOC / FREE / SYNC / HEAP_INFO /
//! SESSION_OPEN (new or resume) / SESSION_CLOSE (release or suspend) / RESERVE /
//! UNRESERVE / disconnect with arbitrary fields, host writes into buffers, the operator
//! ending the session, and injected faults (provider ENOMEM/EIO, SHMEM_MAP refused,
//! SHMEM_UNMAP refused as for a mapping the front end no longer has, the ring stopped so
//! that requests needing the front end are retried), against the device core with a
//! memfd provider and a fake mapper.
//!
//! A model of the live buffers is checked after every step:
//! * every status is a defined code, and the one the spec prescribes where it is certain
//!   (FREE/SYNC of a freed or never-allocated id: NO_BUFFER; FREE of a live id: OK);
//! * no two live buffers overlap in the window; every live buffer is inside its heap's
//!   range of the window (`VIRTIO_DMAHEAP_F_HEAP_RANGE`: the two heaps have different
//!   cache attributes, so disjoint ranges, whether the feature is negotiated or not),
//!   aligned to its heap's min_align, page-granular and backed by live mappings; HEAP_INFO
//!   has the range shape (88 bytes) exactly when the feature is negotiated, and states the
//!   range the buffers are placed in;
//! * ids are never 0 and never reused, even across sessions and disconnects;
//! * a request the device asks to retry (ring stopped) changed nothing visible, and is
//!   answered in full once the ring runs; session requests follow the state machine of
//!   spec 6.9 (NO_SESSION outside an open session, resume only of the suspended id); a
//!   suspended session keeps its buffers out of the window and gets them back, with their
//!   bytes, at the same offsets; no buffer overlaps a reserved range;
//! * the device's byte and buffer counters equal the sums over the live buffers, per heap
//!   and in total, and stay within the quotas; mappings within the mapping cap;
//! * a new buffer reads as zero where an earlier buffer had written (freed ranges are
//!   zeroed before reuse);
//! * the mapper never sees an overlapping, out-of-window or unknown request;
//! * ASSIGN_UUID (with injected export failures, stand-in dma-buf exports of arena ranges,
//!   the front end's table on or off, importers holding and closing exports): a UUID maps
//!   to exactly one live buffer (the same one every time) and resolves while it lives;
//!   a freed one never resolves again, to anything; the front end's table holds exactly
//!   the registered UUIDs of live buffers; a freed exported buffer is retained (charged)
//!   while an importer holds its file (across session ends too, until a disconnect) and
//!   released once nobody does; no live buffer ever overlaps the window range a retained
//!   buffer keeps.
#![no_main]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::sync::atomic::Ordering;

use arbitrary::Arbitrary;
use common::*;
use libfuzzer_sys::fuzz_target;
use vhost_user_dmaheap::core::{Device, HeapParams};
use vhost_user_dmaheap::wire::Reply;

#[derive(Debug, Arbitrary)]
enum Len {
    Pages(u8),
    BigPages(u16),
    Raw(u64),
}

impl Len {
    fn get(&self) -> u64 {
        match *self {
            Len::Pages(p) => u64::from(p) * PAGE,
            Len::BigPages(p) => u64::from(p) * PAGE,
            Len::Raw(v) => v,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Id {
    /// The n-th live buffer (modulo their number).
    Live(u8),
    /// The n-th freed buffer.
    Freed(u8),
    Raw(u64),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Alloc {
        heap: u8,
        flags: u8,
        len: Len,
    },
    Free(Id),
    Sync {
        id: Id,
        flags: u32,
    },
    HeapInfo(u32),
    /// Host (control socket `poke`) writes into a live buffer.
    Write {
        id: Id,
        page: u16,
        byte: u8,
    },
    Disconnect,
    Open(Resume),
    Close {
        suspend: bool,
        bad_flags: bool,
    },
    Reserve {
        page: u16,
        pages: u16,
    },
    Unreserve(u8),
    HostEndsSession,
    Stop(bool),
    FailAlloc {
        nomem: bool,
        count: u8,
    },
    AllocBatch {
        heap: u8,
        count: u8,
        len: Len,
    },
    FailMap(u8),
    FailUnmap(u8),
    Features {
        sync: bool,
        session: bool,
        batch: bool,
        uuid: bool,
        heap_range: bool,
    },
    /// The vring worker's timer fires: the idle policy releases spares whose idle
    /// deadline passed (as if the deadline had come).
    Idle,
    AssignUuid(Id),
    /// An importer resolves the UUID of the n-th exported live buffer and keeps the file.
    Hold(u8),
    /// The n-th held file is closed.
    Drop(u8),
    /// The worker's poll of retained buffers.
    PollRetained,
    /// Register UUIDs with the front end's table (`--shared-object-table`).
    ShareTable(bool),
    /// Exports are stand-in dma-bufs (arena ranges become exportable) or the provider's own.
    FakeDmabuf(bool),
    FailExport(u8),
}

#[derive(Debug, Arbitrary)]
enum Resume {
    New,
    /// The last session the device opened.
    Last,
    Raw(u64),
}

/// The session as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    /// Open; id 0 is the implicit session (no SESSION feature, or not opened yet).
    Open(u64),
    Suspended(u64),
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct Live {
    heap: usize,
    off: u64,
    len: u64,
}

struct Model {
    live: BTreeMap<u64, Live>,
    freed: Vec<u64>,
    seen: BTreeSet<u64>,
    /// Window pages an earlier buffer wrote non-zero bytes to.
    dirty: BTreeSet<u64>,
    sync: bool,
    batch: bool,
    /// `VIRTIO_DMAHEAP_F_HEAP_RANGE` negotiated.
    heap_range: bool,
    session_acked: bool,
    session: Session,
    last_session: u64,
    /// Reserved window ranges: offset -> len.
    reserved: BTreeMap<u64, u64>,
    /// Bytes written by the host into live buffers: (id, offset) -> byte.
    written: BTreeMap<(u64, u64), u8>,
    uuid: bool,
    /// UUIDs of live buffers: id -> (uuid, registered with the front end).
    uuids: BTreeMap<u64, ([u8; 16], bool)>,
    /// Every UUID ever answered, and withdrawn ones.
    all_uuids: BTreeMap<[u8; 16], u64>,
    withdrawn: BTreeSet<[u8; 16]>,
    /// Freed exported buffers the device still holds, with the files importers hold.
    retained: BTreeSet<u64>,
    /// Files importers hold: (buffer id, file).
    held: Vec<(u64, File)>,
    table: bool,
}

impl Model {
    /// Checks a buffer the device allocated (ALLOC or ALLOC_BATCH) and records it live.
    fn accept(
        &mut self,
        dev: &Device,
        params: &[HeapParams],
        h: usize,
        want: u64,
        b: (u64, u64, u64),
    ) {
        let (id, off, blen) = b;
        assert!(id != 0 && self.seen.insert(id), "id {id} zero or reused");
        assert!(
            blen >= want && blen % PAGE == 0,
            "len {blen:#x} for {want:#x}"
        );
        assert_eq!(off % params[h].min_align, 0, "offset {off:#x} misaligned");
        let end = off.checked_add(blen).expect("no overflow");
        assert!(
            end <= SHM_SIZE,
            "range {off:#x}+{blen:#x} outside the window"
        );
        let range = heap_range(h);
        assert!(
            off >= range.0 && end <= range.0 + range.1,
            "buffer {id} {off:#x}+{blen:#x} of heap {h} outside its range {range:x?}"
        );
        for (&oid, b) in &self.live {
            assert!(
                end <= b.off || b.off + b.len <= off,
                "buffer {id} {off:#x}+{blen:#x} overlaps buffer {oid} {:#x}+{:#x}",
                b.off,
                b.len
            );
        }
        for (&ro, &rl) in &self.reserved {
            assert!(
                end <= ro || ro + rl <= off,
                "buffer {id} {off:#x}+{blen:#x} inside reserved {ro:#x}+{rl:#x}"
            );
        }
        // Zeroed: every page an earlier buffer dirtied reads 0 now.
        let dirty: Vec<u64> = self.dirty.range(off..end).copied().collect();
        for page in dirty {
            let got = dev.peek(id, page - off, PAGE as usize).expect("peek");
            assert!(got.iter().all(|&b| b == 0), "stale data at {page:#x}");
            self.dirty.remove(&page);
        }
        self.live.insert(
            id,
            Live {
                heap: h,
                off,
                len: blen,
            },
        );
    }

    fn session_ok(&self) -> bool {
        !self.session_acked || matches!(self.session, Session::Open(id) if id != 0)
    }

    /// Every live buffer and reservation is gone (the session ended).
    fn end_session(&mut self) {
        self.freed.extend(self.live.keys());
        self.live.clear();
        self.reserved.clear();
        self.written.clear();
        for (u, _) in self.uuids.values() {
            self.withdrawn.insert(*u);
        }
        self.uuids.clear();
        // Retained buffers outlive the session (a disconnect ends them).
    }

    /// A live buffer was freed.
    fn freed_buffer(&mut self, id: u64) {
        self.freed.push(id);
        self.written.retain(|&(i, _), _| i != id);
        if let Some((u, _)) = self.uuids.remove(&id) {
            self.withdrawn.insert(u);
            self.retained.insert(id);
        }
    }
}

impl Model {
    fn pick(&self, id: &Id) -> u64 {
        match *id {
            Id::Live(n) if !self.live.is_empty() => *self
                .live
                .keys()
                .nth(usize::from(n) % self.live.len())
                .expect("index in range"),
            Id::Freed(n) if !self.freed.is_empty() => self.freed[usize::from(n) % self.freed.len()],
            Id::Live(n) | Id::Freed(n) => u64::from(n),
            Id::Raw(v) => v,
        }
    }
}

/// The status ALLOC (and each buffer of ALLOC_BATCH) must get for bad arguments, if any.
fn alloc_arg_error(params: &[HeapParams], h: usize, flags: u32, want: u64) -> Option<u32> {
    if h >= params.len() {
        Some(S_NO_HEAP)
    } else if flags != 0 || want == 0 || want % PAGE != 0 {
        Some(S_INVAL)
    } else if want > params[h].max_size {
        Some(S_TOO_BIG)
    } else {
        None
    }
}

/// Whether an allocation with valid arguments succeeded; if not, it failed only for lack
/// of memory, quota or window space, or a host error.
fn alloc_succeeded(st: u32, what: &str) -> bool {
    assert!(
        matches!(st, S_OK | S_NOMEM | S_QUOTA | S_WINDOW_FULL | S_IOERR),
        "{what} failed with {st}"
    );
    st == S_OK
}

fn status(resp: &[u8], writable: usize) -> u32 {
    check_response(resp, writable).expect("a resp_hdr fits")
}

/// Serves a request; a retry must have left the device's counters as they were.
fn run(dev: &mut Device, req: &[u8], writable: usize, mapper: &mut FakeMapper) -> Vec<u8> {
    let before = dev.stats();
    let mapped_before = mapper.mapped.clone();
    match dev.handle(req, writable, mapper) {
        Reply::Answer(a) => a,
        Reply::Retry => {
            assert!(mapper.stopped, "retry while the ring runs");
            let type_ = le32(req, 0);
            if type_ == REQ_ALLOC {
                // Nothing a second attempt would repeat: the same buffers, bytes and window
                // mappings. Releasing an idle spare on the way (to make room) is allowed:
                // the idle policy may do that at any time.
                let after = dev.stats();
                let same = |a: &vhost_user_dmaheap::core::HeapStats,
                            b: &vhost_user_dmaheap::core::HeapStats| {
                    a.bytes == b.bytes
                        && a.buffers == b.buffers
                        && a.mappings == b.mappings
                        && a.host_bytes <= b.host_bytes
                };
                assert!(
                    same(&after.total, &before.total)
                        && after
                            .heaps
                            .iter()
                            .all(|(n, h)| before.heaps.get(n).is_some_and(|b| same(h, b))),
                    "a retried ALLOC had an effect: {before:?} -> {after:?}"
                );
                assert_eq!(mapper.mapped, mapped_before);
            }
            let (a, _) = serve(dev, req, writable, mapper);
            a
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let (mut dev, faults) = device();
    let params = heap_params();
    let mut mapper = mapper();
    let mut m = Model {
        live: BTreeMap::new(),
        freed: Vec::new(),
        seen: BTreeSet::new(),
        dirty: BTreeSet::new(),
        sync: true,
        batch: false,
        heap_range: false,
        session_acked: false,
        session: Session::Open(0),
        last_session: 0,
        reserved: BTreeMap::new(),
        written: BTreeMap::new(),
        uuid: false,
        uuids: BTreeMap::new(),
        all_uuids: BTreeMap::new(),
        withdrawn: BTreeSet::new(),
        retained: BTreeSet::new(),
        held: Vec::new(),
        table: false,
    };
    for op in ops.iter().take(256) {
        match op {
            Op::Alloc { heap, flags, len } => {
                let heap = u32::from(*heap % 3);
                let flags = u32::from(*flags % 2);
                let want = len.get();
                let resp = run(
                    &mut dev,
                    &alloc_req(heap, flags, want),
                    ALLOC_RESP,
                    &mut mapper,
                );
                let st = status(&resp, ALLOC_RESP);
                let h = heap as usize;
                let expect_err = if !m.session_ok() {
                    Some(S_NO_SESSION)
                } else {
                    alloc_arg_error(&params, h, flags, want)
                };
                if let Some(e) = expect_err {
                    assert_eq!(st, e, "ALLOC heap {heap} flags {flags} len {want:#x}");
                    continue;
                }
                if !alloc_succeeded(st, "ALLOC") {
                    continue;
                }
                assert_eq!(resp.len(), ALLOC_RESP);
                let (id, off, blen) = (le64(&resp, 8), le64(&resp, 16), le64(&resp, 24));
                m.accept(&dev, &params, h, want, (id, off, blen));
            }
            Op::AllocBatch { heap, count, len } => {
                let heap = u32::from(*heap % 3);
                let count = u32::from(*count % 18);
                let want = len.get();
                let resp = run(
                    &mut dev,
                    &alloc_batch_req(heap, count, want),
                    ALLOC_BATCH_RESP,
                    &mut mapper,
                );
                let st = status(&resp, ALLOC_BATCH_RESP);
                let h = heap as usize;
                let expect_err = if !m.batch {
                    Some(S_UNSUPP)
                } else if !m.session_ok() {
                    Some(S_NO_SESSION)
                } else if count == 0 || count > 16 {
                    Some(S_INVAL)
                } else {
                    alloc_arg_error(&params, h, 0, want)
                };
                if let Some(e) = expect_err {
                    assert_eq!(st, e, "ALLOC_BATCH heap {heap} count {count} len {want:#x}");
                    continue;
                }
                if !alloc_succeeded(st, "ALLOC_BATCH") {
                    continue;
                }
                assert_eq!(resp.len(), ALLOC_BATCH_RESP);
                let n = le32(&resp, 8) as usize;
                assert!((1..=count as usize).contains(&n), "{n} buffers for {count}");
                assert_eq!(le32(&resp, 12), 0, "reserved");
                for i in 0..16 {
                    let e = 16 + 24 * i;
                    let b = (le64(&resp, e), le64(&resp, e + 8), le64(&resp, e + 16));
                    if i < n {
                        m.accept(&dev, &params, h, want, b);
                    } else {
                        assert_eq!(b, (0, 0, 0), "entry {i} past count {n}");
                    }
                }
            }
            Op::Free(id) => {
                let id = m.pick(id);
                let st = status(
                    &run(&mut dev, &free_req(id), RESP_HDR, &mut mapper),
                    RESP_HDR,
                );
                if !m.session_ok() {
                    assert_eq!(st, S_NO_SESSION, "FREE outside a session");
                } else if m.live.remove(&id).is_some() {
                    assert_eq!(st, S_OK, "FREE of live buffer {id}");
                    m.freed_buffer(id);
                } else {
                    assert_eq!(st, S_NO_BUFFER, "FREE of dead buffer {id}");
                }
            }
            Op::Sync { id, flags } => {
                let id = m.pick(id);
                let st = status(
                    &run(&mut dev, &sync_req(id, *flags), RESP_HDR, &mut mapper),
                    RESP_HDR,
                );
                let valid = flags & !7 == 0 && flags & 3 != 0;
                if !m.sync {
                    assert_eq!(st, S_UNSUPP);
                } else if !m.session_ok() {
                    assert_eq!(st, S_NO_SESSION);
                } else if !valid {
                    assert_eq!(st, S_INVAL, "SYNC flags {flags:#x}");
                } else if m.live.contains_key(&id) {
                    assert_eq!(st, S_OK, "SYNC of live buffer {id}");
                } else {
                    assert_eq!(st, S_NO_BUFFER, "SYNC of dead buffer {id}");
                }
            }
            Op::HeapInfo(heap) => {
                let size = if m.heap_range {
                    HEAP_INFO_RANGE_RESP
                } else {
                    HEAP_INFO_RESP
                };
                let resp = run(&mut dev, &heap_info_req(*heap), size, &mut mapper);
                let st = status(&resp, size);
                let h = *heap as usize;
                if h < params.len() {
                    assert_eq!((st, resp.len()), (S_OK, size));
                    assert_eq!(le64(&resp, 48), params[h].min_align);
                    let (off, len) = heap_range(h);
                    assert!(le64(&resp, 56) <= len && le64(&resp, 64) <= len);
                    if m.heap_range {
                        assert_eq!((le64(&resp, 72), le64(&resp, 80)), (off, len));
                    }
                } else {
                    assert_eq!(st, S_NO_HEAP);
                }
            }
            Op::Write { id, page, byte } => {
                let id = m.pick(id);
                if let Some(b) = m.live.get(&id).copied() {
                    let off = (u64::from(*page) * PAGE) % b.len;
                    dev.poke(id, off, &[byte | 1]).expect("poke a live buffer");
                    m.dirty.insert(b.off + off);
                    m.written.insert((id, off), byte | 1);
                } else {
                    assert!(dev.poke(id, 0, &[1]).is_err(), "poke of dead buffer {id}");
                }
            }
            Op::Disconnect => {
                dev.disconnect();
                // The front end went away with its mappings and its table; the memory goes
                // with them.
                mapper.mapped.clear();
                mapper.shared.clear();
                m.retained.clear();
                mapper.stopped = false;
                m.end_session();
                m.dirty.clear();
                m.session = Session::Open(0);
            }
            Op::Open(resume) => {
                let rid = match resume {
                    Resume::New => 0,
                    Resume::Last => m.last_session,
                    Resume::Raw(v) => *v,
                };
                let resp = run(
                    &mut dev,
                    &session_open_req(rid),
                    SESSION_OPEN_RESP,
                    &mut mapper,
                );
                let st = status(&resp, SESSION_OPEN_RESP);
                if !m.session_acked {
                    assert_eq!(st, S_UNSUPP);
                    continue;
                }
                let resumable = rid != 0
                    && matches!(m.session, Session::Suspended(s) | Session::Open(s) if s == rid);
                if rid == 0 {
                    assert_eq!(st, S_OK, "new session");
                    let id = le64(&resp, 8);
                    assert!(id != 0 && id != m.last_session, "session id {id:#x}");
                    assert!(
                        mapper.mapped.is_empty(),
                        "left in the window: {:x?}",
                        mapper.mapped
                    );
                    m.end_session();
                    m.session = Session::Open(id);
                    m.last_session = id;
                } else if resumable {
                    if st == S_IOERR {
                        // A refused remap ends the session.
                        m.end_session();
                        m.session = Session::Closed;
                        continue;
                    }
                    assert_eq!((st, le64(&resp, 8)), (S_OK, rid), "resume of {rid:#x}");
                    m.session = Session::Open(rid);
                    for (&(id, off), &byte) in &m.written {
                        assert_eq!(dev.peek(id, off, 1).expect("peek"), [byte], "lost byte");
                    }
                } else {
                    assert_eq!(st, S_NO_SESSION, "resume of {rid:#x} in {:?}", m.session);
                }
            }
            Op::Close { suspend, bad_flags } => {
                let flags = if *bad_flags { 2 } else { u32::from(*suspend) };
                let st = status(
                    &run(&mut dev, &session_close_req(flags), RESP_HDR, &mut mapper),
                    RESP_HDR,
                );
                if !m.session_acked {
                    assert_eq!(st, S_UNSUPP);
                } else if !m.session_ok() {
                    assert_eq!(st, S_NO_SESSION);
                } else if *bad_flags {
                    assert_eq!(st, S_INVAL);
                } else {
                    assert_eq!(st, S_OK, "close");
                    assert!(
                        mapper.mapped.is_empty(),
                        "left in the window: {:x?}",
                        mapper.mapped
                    );
                    let Session::Open(id) = m.session else {
                        unreachable!()
                    };
                    if *suspend {
                        m.session = Session::Suspended(id);
                    } else {
                        m.end_session();
                        m.session = Session::Closed;
                    }
                }
            }
            Op::Reserve { page, pages } => {
                let off = u64::from(*page) * PAGE * 4;
                let len = u64::from(*pages % 512) * PAGE;
                let req = reserve_req(REQ_RESERVE, off, len);
                let st = status(&run(&mut dev, &req, RESP_HDR, &mut mapper), RESP_HDR);
                if !m.session_acked {
                    assert_eq!(st, S_UNSUPP);
                } else if !m.session_ok() {
                    assert_eq!(st, S_NO_SESSION);
                } else if len == 0 || off + len > SHM_SIZE {
                    assert_eq!(st, S_INVAL, "reserve {off:#x}+{len:#x}");
                } else if st == S_OK {
                    for (&ro, &rl) in &m.reserved {
                        assert!(off + len <= ro || ro + rl <= off, "reserved twice");
                    }
                    for b in m.live.values() {
                        assert!(off + len <= b.off || b.off + b.len <= off, "over a buffer");
                    }
                    m.reserved.insert(off, len);
                } else {
                    assert!(matches!(st, S_WINDOW_FULL | S_QUOTA), "reserve: {st}");
                }
            }
            Op::Unreserve(n) => {
                let pick = if m.reserved.is_empty() {
                    None
                } else {
                    m.reserved
                        .iter()
                        .nth(usize::from(*n) % m.reserved.len())
                        .map(|(&o, &l)| (o, l))
                };
                let (off, len) = pick.unwrap_or((PAGE * u64::from(*n), PAGE));
                let req = reserve_req(REQ_UNRESERVE, off, len);
                let st = status(&run(&mut dev, &req, RESP_HDR, &mut mapper), RESP_HDR);
                if !m.session_acked {
                    assert_eq!(st, S_UNSUPP);
                } else if !m.session_ok() {
                    assert_eq!(st, S_NO_SESSION);
                } else if pick.is_some() {
                    assert_eq!(st, S_OK, "unreserve {off:#x}+{len:#x}");
                    m.reserved.remove(&off);
                } else {
                    assert_eq!(st, S_INVAL, "unreserve of nothing");
                }
            }
            Op::HostEndsSession => {
                let was_stopped = mapper.stopped;
                match dev.end_session_by_host(&mut mapper) {
                    Ok(_) => {
                        assert!(mapper.mapped.is_empty());
                        m.end_session();
                        m.session = Session::Closed;
                    }
                    Err(_) => {
                        assert!(was_stopped, "the host could not end the session");
                        // Progress is kept: UUIDs withdrawn before the stop stay withdrawn.
                        let gone: Vec<u64> = m
                            .uuids
                            .keys()
                            .copied()
                            .filter(|id| dev.uuid_of(*id).is_none())
                            .collect();
                        for id in gone {
                            if let Some((u, _)) = m.uuids.remove(&id) {
                                m.withdrawn.insert(u);
                            }
                        }
                    }
                }
            }
            Op::Stop(stopped) => mapper.stopped = *stopped,
            Op::FailAlloc { nomem, count } => {
                let c = u32::from(count % 4);
                if *nomem {
                    faults.nomem.store(c, std::sync::atomic::Ordering::SeqCst);
                } else {
                    faults.io.store(c, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Op::FailMap(n) => mapper.refuse_maps = u32::from(n % 4),
            Op::FailUnmap(n) => mapper.refuse_unmaps = u32::from(n % 4),
            Op::Idle => {
                // Fired at the deadline the device asked for, as the timer would be.
                if let Some(deadline) = dev.spare_deadline() {
                    let held = dev.stats().total;
                    dev.release_idle(deadline, &mut mapper);
                    let now = dev.stats().total;
                    assert_eq!(
                        (now.buffers, now.bytes),
                        (held.buffers, held.bytes),
                        "the idle policy released a live buffer"
                    );
                    // Each heap on its own clock: those due made their attempt; the
                    // others' deadlines are later.
                    assert!(
                        dev.spare_deadline().is_none_or(|next| next > deadline),
                        "one attempt per idle period of each heap"
                    );
                }
            }
            Op::Features {
                sync,
                session,
                batch,
                uuid,
                heap_range,
            } => {
                dev.set_acked_features(
                    (u64::from(*sync) << F_SYNC)
                        | (u64::from(*session) << F_SESSION)
                        | (u64::from(*batch) << F_BATCH)
                        | (u64::from(*uuid) << F_UUID)
                        | (u64::from(*heap_range) << F_HEAP_RANGE),
                );
                m.heap_range = *heap_range;
                m.sync = *sync;
                m.session_acked = *session;
                m.batch = *batch;
                m.uuid = *uuid;
            }
            Op::AssignUuid(id) => {
                let id = m.pick(id);
                let resp = run(
                    &mut dev,
                    &assign_uuid_req(id),
                    ASSIGN_UUID_RESP,
                    &mut mapper,
                );
                let st = status(&resp, ASSIGN_UUID_RESP);
                if !m.uuid {
                    assert_eq!(st, S_UNSUPP, "ASSIGN_UUID without the feature");
                    continue;
                }
                if !m.session_ok() {
                    // Rejected before it is served: a bare resp_hdr.
                    assert_eq!((st, resp.len()), (S_NO_SESSION, RESP_HDR));
                    continue;
                }
                assert_eq!(resp.len(), ASSIGN_UUID_RESP);
                let mut u = [0u8; 16];
                u.copy_from_slice(&resp[8..24]);
                if !m.live.contains_key(&id) {
                    assert_eq!(st, S_NO_BUFFER, "ASSIGN_UUID of dead buffer {id}");
                } else if let Some(&(known, _)) = m.uuids.get(&id) {
                    assert_eq!((st, u), (S_OK, known), "a second UUID for buffer {id}");
                } else if st == S_OK {
                    assert!(u[6] >> 4 == 4 && u[8] & 0xc0 == 0x80, "not v4: {u:02x?}");
                    assert!(
                        m.all_uuids.insert(u, id).is_none(),
                        "UUID {u:02x?} answered for two buffers"
                    );
                    m.uuids.insert(id, (u, m.table));
                } else {
                    assert!(
                        matches!(st, S_UNSUPP | S_IOERR | S_NOMEM),
                        "ASSIGN_UUID failed with {st}"
                    );
                    assert!(
                        st != S_UNSUPP || !faults.fake_dmabuf_exports.load(Ordering::SeqCst),
                        "UNSUPP although every range can be exported"
                    );
                    assert!(u.iter().all(|&b| b == 0), "a UUID with an error");
                }
            }
            Op::Hold(n) => {
                if !m.uuids.is_empty() {
                    let (&id, &(u, _)) = m
                        .uuids
                        .iter()
                        .nth(usize::from(*n) % m.uuids.len())
                        .expect("index in range");
                    let (f, len) = dev.export_table().lookup(&u).expect("a live UUID resolves");
                    assert_eq!(len, m.live[&id].len, "export length");
                    m.held.push((id, f));
                }
            }
            Op::Drop(n) => {
                if !m.held.is_empty() {
                    let i = usize::from(*n) % m.held.len();
                    m.held.swap_remove(i);
                }
            }
            Op::PollRetained => {
                dev.release_closed_exports();
                let held: BTreeSet<u64> = m.held.iter().map(|(id, _)| *id).collect();
                m.retained.retain(|id| held.contains(id));
            }
            Op::ShareTable(on) => {
                dev.set_shared_object_table(*on);
                m.table = *on;
            }
            Op::FakeDmabuf(on) => faults.fake_dmabuf_exports.store(*on, Ordering::SeqCst),
            Op::FailExport(n) => faults
                .export_fails
                .store(u32::from(n % 3), Ordering::SeqCst),
        }

        // Invariants after every step.
        let s = dev.stats();
        // Retained buffers: the ones the model expects; still charged.
        let dev_retained: BTreeMap<u64, vhost_user_dmaheap::core::Retained> =
            dev.retained().map(|(id, r)| (id, *r)).collect();
        assert!(
            m.retained.iter().all(|id| dev_retained.contains_key(id)),
            "a buffer an importer holds was released: {:?} vs {:?}",
            m.retained,
            dev_retained.keys()
        );
        // (The device may still hold one the model saw released: it sees closes at its
        // polls.) Every retained buffer is one the guest freed while it had a UUID.
        let freed: BTreeSet<u64> = m.freed.iter().copied().collect();
        for (id, r) in &dev_retained {
            assert!(freed.contains(id), "retained buffer {id} was never freed");
            if let Some((woff, off, len)) = r.range {
                let (start, end) = (woff + off, woff + off + len);
                for (lid, b) in &m.live {
                    assert!(
                        b.off + b.len <= start || end <= b.off,
                        "live buffer {lid} {:#x}+{:#x} in retained {id}'s range {start:#x}..{end:#x}",
                        b.off,
                        b.len
                    );
                }
            }
        }
        let rsum: u64 = dev_retained.values().map(|r| r.charged).sum();
        let sum: u64 = m.live.values().map(|b| b.len).sum::<u64>() + rsum;
        assert_eq!(s.total.bytes, sum, "accounting != live + retained buffers");
        assert_eq!(s.total.buffers, (m.live.len() + dev_retained.len()) as u64);
        assert_eq!(s.total.retained_buffers, dev_retained.len() as u64);
        assert_eq!(s.total.exported, m.uuids.len() as u64);
        assert!(s.total.bytes <= MAX_BYTES && s.total.buffers <= MAX_BUFFERS);
        for (i, p) in params.iter().enumerate() {
            let hs = &s.heaps[&p.name];
            let hsum: u64 = m
                .live
                .values()
                .filter(|b| b.heap == i)
                .map(|b| b.len)
                .sum::<u64>()
                + dev_retained
                    .values()
                    .filter(|r| r.heap == i)
                    .map(|r| r.charged)
                    .sum::<u64>();
            assert_eq!(hs.bytes, hsum, "heap {} bytes", p.name);
            assert!(p.max_bytes.is_none_or(|q| hs.bytes <= q), "heap quota");
        }
        // A UUID maps to exactly its live buffer; withdrawn ones to nothing.
        let table = dev.export_table();
        assert_eq!(table.len(), m.uuids.len(), "export table vs live UUIDs");
        for (id, (u, _)) in &m.uuids {
            assert_eq!(dev.uuid_of(*id), Some(*u));
            let (_, len) = table.lookup(u).expect("a live buffer's UUID resolves");
            assert_eq!(len, m.live[id].len);
        }
        for u in &m.withdrawn {
            assert!(
                table.lookup(u).is_none(),
                "withdrawn UUID {u:02x?} resolves"
            );
        }
        let registered: BTreeSet<[u8; 16]> = m
            .uuids
            .values()
            .filter(|(_, r)| *r)
            .map(|(u, _)| *u)
            .collect();
        assert_eq!(mapper.shared, registered, "the front end's table");
        assert!(s.total.mappings as usize <= MAX_MAPPINGS, "mapping cap");
        assert_eq!(
            s.total.mappings,
            mapper.mapped.len() as u64,
            "device vs front end"
        );
        let listed = dev.buffers();
        assert_eq!(listed.len(), m.live.len());
        for b in &listed {
            let l = m.live.get(&b.id).expect("listed buffer is live");
            assert_eq!((b.offset, b.len), (l.off, l.len));
        }
        if !matches!(m.session, Session::Suspended(_)) {
            for (id, b) in &m.live {
                assert!(
                    mapper.covers(b.off, b.len),
                    "buffer {id} not backed by a mapping"
                );
            }
        }
        assert_eq!(s.reserved_bytes, m.reserved.values().sum::<u64>());
    }
});
