//! Request decoding: arbitrary bytes as the device-readable part of request chains, with
//! arbitrary writable sizes, fed to the device core one after the other.
//!
//! Input: a sequence of records `[writable: u16 LE][features: u8][len: u8][len bytes]`
//! (the last record takes whatever is left). Feature byte: bits 0 and 1 are
//! `VIRTIO_DMAHEAP_F_SYNC` and `_UUID`; bit 2 acks `VIRTIO_DMAHEAP_F_SESSION` with
//! `VIRTIO_DMAHEAP_F_PAGE_SIZE`, so SESSION_OPEN takes its page-size shape; bit 3 acks
//! `VIRTIO_DMAHEAP_F_HEAP_RANGE`, so HEAP_INFO takes its range shape. Before the first
//! record the device holds one live buffer (id 1), so FREE and SYNC also reach a real
//! buffer.
//!
//! Checked for every response: never longer than the writable part; nothing at all below
//! a resp_hdr; a defined status; reserved 0; an OK response has its full size; an OK
//! ALLOC is page-granular, aligned, inside its heap's range of the window and backed by a
//! mapping; an OK HEAP_INFO with the range states that range; an OK
//! ASSIGN_UUID has its full size and a v4 UUID. After the run: the device's counters match
//! the buffers it reported (plus retained ones), and the fake mapper saw no request QEMU
//! would refuse.
#![no_main]

mod common;

use common::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mut dev, _faults) = device();
    let mut mapper = mapper();
    let (first, _) = serve(&mut dev, &alloc_req(0, 0, PAGE), ALLOC_RESP, &mut mapper);
    assert_eq!(check_response(&first, ALLOC_RESP), Some(S_OK));

    let mut rest = data;
    while rest.len() >= 4 {
        let writable = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let features = rest[2];
        let len = usize::from(rest[3]);
        rest = &rest[4..];
        let take = if rest.len() < len { rest.len() } else { len };
        let req = &rest[..take];
        rest = &rest[take..];

        let page_size = if features & 4 != 0 {
            (1 << F_SESSION) | (1 << F_PAGE_SIZE)
        } else {
            0
        };
        let range_acked = features & 8 != 0;
        dev.set_acked_features(
            u64::from(features & 3) | page_size | (u64::from(range_acked) << F_HEAP_RANGE),
        );
        let heap_info_resp = if range_acked {
            HEAP_INFO_RANGE_RESP
        } else {
            HEAP_INFO_RESP
        };
        let before = dev.stats();
        let (resp, _) = serve(&mut dev, req, writable, &mut mapper);
        let Some(status) = check_response(&resp, writable) else {
            assert_eq!(
                dev.stats(),
                before,
                "a request without an answer had an effect"
            );
            continue;
        };
        let ty = if req.len() >= 4 { le32(req, 0) } else { 0 };
        if status != S_OK {
            // At least a resp_hdr, never beyond the response structure of the type.
            let full = match ty {
                REQ_HEAP_INFO => heap_info_resp,
                REQ_ALLOC => ALLOC_RESP,
                REQ_SESSION_OPEN => SESSION_OPEN_RESP,
                REQ_ASSIGN_UUID => ASSIGN_UUID_RESP,
                _ => RESP_HDR,
            };
            assert!(
                resp.len() == RESP_HDR || resp.len() == full,
                "error response of {} bytes for type {ty}",
                resp.len()
            );
            if status != S_NO_BUFFER || ty != REQ_FREE {
                // Failed requests change nothing (a failed FREE of course neither).
                let after = dev.stats();
                assert_eq!(after.total.buffers, before.total.buffers);
                assert_eq!(after.total.bytes, before.total.bytes);
            }
            continue;
        }
        match ty {
            REQ_HEAP_INFO => {
                assert_eq!(resp.len(), heap_info_resp);
                let (off, len) = heap_range(le32(req, 8) as usize);
                assert!(le64(&resp, 56) <= len && le64(&resp, 64) <= len);
                if range_acked {
                    assert_eq!((le64(&resp, 72), le64(&resp, 80)), (off, len));
                }
            }
            REQ_ALLOC => {
                assert_eq!(resp.len(), ALLOC_RESP);
                let (id, off, blen) = (le64(&resp, 8), le64(&resp, 16), le64(&resp, 24));
                let want = le64(req, 16);
                let heap = le32(req, 8) as usize;
                // Raised to the session's page size (VIRTIO_DMAHEAP_F_PAGE_SIZE).
                let align = heap_params()[heap].min_align.max(dev.page_size());
                assert_ne!(id, 0);
                assert!(blen >= want && blen % align == 0 && off % align == 0);
                let (lo, len) = heap_range(heap);
                assert!(off >= lo && off.checked_add(blen).is_some_and(|e| e <= lo + len));
                assert!(mapper.covers(off, blen), "ALLOC range not mapped");
            }
            REQ_FREE | REQ_SYNC | REQ_SESSION_CLOSE | REQ_RESERVE | REQ_UNRESERVE => {
                assert_eq!(resp.len(), RESP_HDR)
            }
            REQ_SESSION_OPEN => {
                assert_eq!(resp.len(), SESSION_OPEN_RESP);
                assert_ne!(le64(&resp, 8), 0, "session id 0");
            }
            REQ_ASSIGN_UUID => {
                assert_eq!(resp.len(), ASSIGN_UUID_RESP);
                assert!(
                    resp[14] >> 4 == 4 && resp[16] & 0xc0 == 0x80,
                    "not a v4 UUID"
                );
            }
            other => panic!("OK for request type {other}"),
        }
    }
    // Live buffers plus retained ones (freed while exported: still charged).
    let s = dev.stats();
    let listed = dev.buffers();
    assert_eq!(
        s.total.buffers,
        listed.len() as u64 + s.total.retained_buffers
    );
    assert_eq!(
        s.total.bytes,
        listed.iter().map(|b| b.len).sum::<u64>() + s.total.retained_bytes
    );
    assert_eq!(s.total.mappings, mapper.mapped.len() as u64);
});
