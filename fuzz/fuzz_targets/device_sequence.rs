//! The device state machine: arbitrary sequences of ALLOC / FREE / SYNC / HEAP_INFO /
//! reset with arbitrary fields, host writes into buffers, and injected host faults
//! (provider ENOMEM/EIO, SHMEM_MAP and SHMEM_UNMAP refused), against the device core with
//! a memfd provider and a fake mapper.
//!
//! A model of the live buffers is checked after every step:
//! * every status is a defined code, and the one the spec prescribes where it is certain
//!   (FREE/SYNC of a freed or never-allocated id: NO_BUFFER; FREE of a live id: OK);
//! * no two live buffers overlap in the window; every live buffer is inside the window,
//!   aligned to its heap's min_align, page-granular and backed by live mappings;
//! * ids are never 0 and never reused, even across resets;
//! * the device's byte and buffer counters equal the sums over the live buffers, per heap
//!   and in total, and stay within the quotas; mappings within the mapping cap;
//! * a new buffer reads as zero where an earlier buffer had written (freed ranges are
//!   zeroed before reuse);
//! * the mapper never sees an overlapping, out-of-window or unknown request.
#![no_main]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use common::*;
use libfuzzer_sys::fuzz_target;

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
    Reset,
    FailAlloc {
        nomem: bool,
        count: u8,
    },
    FailMap(u8),
    FailUnmap(u8),
    Features(bool),
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

fn status(resp: &[u8], writable: usize) -> u32 {
    check_response(resp, writable).expect("a resp_hdr fits")
}

fuzz_target!(|ops: Vec<Op>| {
    let (mut dev, faults) = device();
    let params = heap_params();
    let mut mapper = FakeMapper::default();
    let mut m = Model {
        live: BTreeMap::new(),
        freed: Vec::new(),
        seen: BTreeSet::new(),
        dirty: BTreeSet::new(),
        sync: true,
    };
    for op in ops.iter().take(256) {
        match op {
            Op::Alloc { heap, flags, len } => {
                let heap = u32::from(*heap % 3);
                let flags = u32::from(*flags % 2);
                let want = len.get();
                let resp = dev.handle(&alloc_req(heap, flags, want), ALLOC_RESP, &mut mapper);
                let st = status(&resp, ALLOC_RESP);
                let h = heap as usize;
                let expect_err = if h >= params.len() {
                    Some(S_NO_HEAP)
                } else if flags != 0 || want == 0 || want % PAGE != 0 {
                    Some(S_INVAL)
                } else if want > params[h].max_size {
                    Some(S_TOO_BIG)
                } else {
                    None
                };
                if let Some(e) = expect_err {
                    assert_eq!(st, e, "ALLOC heap {heap} flags {flags} len {want:#x}");
                    continue;
                }
                if st != S_OK {
                    assert!(
                        matches!(st, S_NOMEM | S_QUOTA | S_WINDOW_FULL | S_IOERR),
                        "ALLOC failed with {st}"
                    );
                    continue;
                }
                assert_eq!(resp.len(), ALLOC_RESP);
                let (id, off, blen) = (le64(&resp, 8), le64(&resp, 16), le64(&resp, 24));
                assert!(id != 0 && m.seen.insert(id), "id {id} zero or reused");
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
                for (&oid, b) in &m.live {
                    assert!(
                        end <= b.off || b.off + b.len <= off,
                        "buffer {id} {off:#x}+{blen:#x} overlaps buffer {oid} {:#x}+{:#x}",
                        b.off,
                        b.len
                    );
                }
                // Zeroed: every page an earlier buffer dirtied reads 0 now.
                let dirty: Vec<u64> = m.dirty.range(off..end).copied().collect();
                for page in dirty {
                    let got = dev.peek(id, page - off, PAGE as usize).expect("peek");
                    assert!(got.iter().all(|&b| b == 0), "stale data at {page:#x}");
                    m.dirty.remove(&page);
                }
                m.live.insert(
                    id,
                    Live {
                        heap: h,
                        off,
                        len: blen,
                    },
                );
            }
            Op::Free(id) => {
                let id = m.pick(id);
                let st = status(&dev.handle(&free_req(id), RESP_HDR, &mut mapper), RESP_HDR);
                if m.live.remove(&id).is_some() {
                    assert_eq!(st, S_OK, "FREE of live buffer {id}");
                    m.freed.push(id);
                } else {
                    assert_eq!(st, S_NO_BUFFER, "FREE of dead buffer {id}");
                }
            }
            Op::Sync { id, flags } => {
                let id = m.pick(id);
                let st = status(
                    &dev.handle(&sync_req(id, *flags), RESP_HDR, &mut mapper),
                    RESP_HDR,
                );
                let valid = flags & !7 == 0 && flags & 3 != 0;
                if !m.sync {
                    assert_eq!(st, S_UNSUPP);
                } else if !valid {
                    assert_eq!(st, S_INVAL, "SYNC flags {flags:#x}");
                } else if m.live.contains_key(&id) {
                    assert_eq!(st, S_OK, "SYNC of live buffer {id}");
                } else {
                    assert_eq!(st, S_NO_BUFFER, "SYNC of dead buffer {id}");
                }
            }
            Op::HeapInfo(heap) => {
                let resp = dev.handle(&heap_info_req(*heap), HEAP_INFO_RESP, &mut mapper);
                let st = status(&resp, HEAP_INFO_RESP);
                if (*heap as usize) < params.len() {
                    assert_eq!((st, resp.len()), (S_OK, HEAP_INFO_RESP));
                    assert_eq!(le64(&resp, 48), params[*heap as usize].min_align);
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
                } else {
                    assert!(dev.poke(id, 0, &[1]).is_err(), "poke of dead buffer {id}");
                }
            }
            Op::Reset => {
                dev.reset();
                // The front end drops every mapping itself; the memory goes with them.
                mapper.mapped.clear();
                m.freed.extend(m.live.keys());
                m.live.clear();
                m.dirty.clear();
            }
            Op::FailAlloc { nomem, count } => {
                let c = u32::from(count % 4);
                if *nomem {
                    faults.nomem.store(c, std::sync::atomic::Ordering::SeqCst);
                } else {
                    faults.io.store(c, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Op::FailMap(n) => mapper.fail_maps = u32::from(n % 4),
            Op::FailUnmap(n) => mapper.fail_unmaps = u32::from(n % 4),
            Op::Features(sync) => {
                dev.set_acked_features(u64::from(*sync));
                m.sync = *sync;
            }
        }

        // Invariants after every step.
        let s = dev.stats();
        let sum: u64 = m.live.values().map(|b| b.len).sum();
        assert_eq!(s.total.bytes, sum, "accounting != sum of live buffers");
        assert_eq!(s.total.buffers, m.live.len() as u64);
        assert!(s.total.bytes <= MAX_BYTES && s.total.buffers <= MAX_BUFFERS);
        for (i, p) in params.iter().enumerate() {
            let hs = &s.heaps[&p.name];
            let hsum: u64 = m.live.values().filter(|b| b.heap == i).map(|b| b.len).sum();
            assert_eq!(hs.bytes, hsum, "heap {} bytes", p.name);
            assert!(p.max_bytes.is_none_or(|q| hs.bytes <= q), "heap quota");
        }
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
        for (id, b) in &m.live {
            assert!(
                mapper.covers(b.off, b.len),
                "buffer {id} not backed by a mapping"
            );
        }
        assert!(mapper.violations.is_empty(), "{:?}", mapper.violations);
    }
});
