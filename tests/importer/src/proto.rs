//! The queue protocol: a mirror of `tests/importer/importer_proto.h` (the one definition
//! file; a test below reads it and compares).

/// Device id of the importer device.
pub const DEVICE_ID: u32 = 38;

/// Look up, check len, map, check seed_in, write seed_out, unmap, close.
pub const OP_CHECK: u32 = 1;
/// Look up, check len, map, keep.
pub const OP_HOLD: u32 = 2;
/// Check and write on the held mapping.
pub const OP_CHECK_HELD: u32 = 3;
/// Let the held buffer go.
pub const OP_RELEASE: u32 = 4;
/// Look up only.
pub const OP_LOOKUP_ONLY: u32 = 5;

/// Size of a request on the queue.
pub const REQ_SIZE: usize = 48;
/// Size of a response on the queue.
pub const RESP_SIZE: usize = 40;

/// `struct dmaheap_imp_req`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Req {
    pub op: u32,
    pub reserved: u32,
    pub uuid: [u8; 16],
    pub len: u64,
    pub seed_in: u64,
    pub seed_out: u64,
}

/// `struct dmaheap_imp_resp`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resp {
    pub status: u32,
    pub reserved: u32,
    pub len: u64,
    pub fd_size: u64,
    pub bad_offset: u64,
    pub bad_got: u8,
    pub bad_want: u8,
    pub reserved2: [u8; 6],
}

const _: () = assert!(std::mem::size_of::<Req>() == REQ_SIZE);
const _: () = assert!(std::mem::size_of::<Resp>() == RESP_SIZE);

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl Req {
    /// Decodes exactly [`REQ_SIZE`] bytes; `None` for any other length.
    pub fn decode(b: &[u8]) -> Option<Req> {
        if b.len() != REQ_SIZE {
            return None;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        Some(Req {
            op: le32(b, 0),
            reserved: le32(b, 4),
            uuid,
            len: le64(b, 24),
            seed_in: le64(b, 32),
            seed_out: le64(b, 40),
        })
    }

    /// The wire bytes (tests, and a guest-side mirror would do the same).
    pub fn encode(&self) -> [u8; REQ_SIZE] {
        let mut b = [0u8; REQ_SIZE];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..24].copy_from_slice(&self.uuid);
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.seed_in.to_le_bytes());
        b[40..48].copy_from_slice(&self.seed_out.to_le_bytes());
        b
    }
}

impl Resp {
    /// A response carrying only a status.
    pub fn status(status: i32) -> Resp {
        Resp {
            status: status.unsigned_abs(),
            ..Resp::default()
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; RESP_SIZE] {
        let mut b = [0u8; RESP_SIZE];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.fd_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.bad_offset.to_le_bytes());
        b[32] = self.bad_got;
        b[33] = self.bad_want;
        b[34..40].copy_from_slice(&self.reserved2);
        b
    }

    /// Decodes exactly [`RESP_SIZE`] bytes.
    pub fn decode(b: &[u8]) -> Option<Resp> {
        if b.len() != RESP_SIZE {
            return None;
        }
        let mut reserved2 = [0u8; 6];
        reserved2.copy_from_slice(&b[34..40]);
        Some(Resp {
            status: le32(b, 0),
            reserved: le32(b, 4),
            len: le64(b, 8),
            fd_size: le64(b, 16),
            bad_offset: le64(b, 24),
            bad_got: b[32],
            bad_want: b[33],
            reserved2,
        })
    }
}

/// The pattern of chunk `i` (8 bytes, little endian) for `seed` (see the header).
pub fn pattern(seed: u64, i: u64) -> u64 {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// The first byte of `mem` that differs from `seed`'s pattern: (offset, got, want).
pub fn first_mismatch(mem: &[u8], seed: u64) -> Option<(usize, u8, u8)> {
    for (i, chunk) in mem.chunks(8).enumerate() {
        let want = pattern(seed, i as u64).to_le_bytes();
        if chunk != &want[..chunk.len()] {
            let j = chunk
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some((i * 8 + j, chunk[j], want[j]));
        }
    }
    None
}

/// Writes `seed`'s pattern over `mem`.
pub fn fill(mem: &mut [u8], seed: u64) {
    for (i, chunk) in mem.chunks_mut(8).enumerate() {
        let v = pattern(seed, i as u64).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `#define NAME VALUE` lines of the header.
    fn header_defines() -> std::collections::HashMap<String, String> {
        let text = include_str!("../importer_proto.h");
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("#define")).then_some(())?;
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect()
    }

    #[test]
    fn the_header_agrees() {
        let d = header_defines();
        let num = |k: &str| -> u64 { d[k].parse().unwrap() };
        assert_eq!(num("DMAHEAP_IMP_DEVICE_ID"), u64::from(DEVICE_ID));
        assert_eq!(num("DMAHEAP_IMP_OP_CHECK"), u64::from(OP_CHECK));
        assert_eq!(num("DMAHEAP_IMP_OP_HOLD"), u64::from(OP_HOLD));
        assert_eq!(num("DMAHEAP_IMP_OP_CHECK_HELD"), u64::from(OP_CHECK_HELD));
        assert_eq!(num("DMAHEAP_IMP_OP_RELEASE"), u64::from(OP_RELEASE));
        assert_eq!(num("DMAHEAP_IMP_OP_LOOKUP_ONLY"), u64::from(OP_LOOKUP_ONLY));
        assert_eq!(num("DMAHEAP_IMP_REQ_SIZE"), REQ_SIZE as u64);
        assert_eq!(num("DMAHEAP_IMP_RESP_SIZE"), RESP_SIZE as u64);
        // The C side checks these sizes with static_assert when the module builds.
        let text = include_str!("../importer_proto.h");
        for s in [
            "static_assert(sizeof(struct dmaheap_imp_req) == DMAHEAP_IMP_REQ_SIZE);",
            "static_assert(sizeof(struct dmaheap_imp_resp) == DMAHEAP_IMP_RESP_SIZE);",
        ] {
            assert!(text.contains(s), "{s}");
        }
    }

    #[test]
    fn codec_roundtrip_and_offsets() {
        let r = Req {
            op: 3,
            reserved: 0,
            uuid: std::array::from_fn(|i| i as u8),
            len: 0x1000,
            seed_in: 7,
            seed_out: 9,
        };
        let b = r.encode();
        assert_eq!(b[0], 3);
        assert_eq!(&b[8..24], &r.uuid);
        assert_eq!(b[24..32], 0x1000u64.to_le_bytes());
        assert_eq!(Req::decode(&b), Some(r));
        assert_eq!(Req::decode(&b[..47]), None);
        let resp = Resp {
            status: 84,
            bad_offset: 5,
            bad_got: 1,
            bad_want: 2,
            ..Resp::default()
        };
        assert_eq!(Resp::decode(&resp.encode()), Some(resp));
    }

    #[test]
    fn pattern_matches_the_guest_tests() {
        // tests/guest/src/sys.rs `pattern`, the same formula: a few fixed values.
        assert_eq!(pattern(0, 0), 0);
        let mut m = vec![0u8; 21];
        fill(&mut m, 42);
        assert_eq!(first_mismatch(&m, 42), None);
        m[13] ^= 0xff;
        let (off, got, want) = first_mismatch(&m, 42).unwrap();
        assert_eq!((off, got ^ 0xff), (13, want));
    }
}
