//! Malformed descriptor chains and requests: each gets an error status (or used length 0),
//! the daemon allocates nothing for them, and the queue keeps working.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::frontend::UNMAPPED_GPA;
use common::*;

fn check_still_works(fe: &mut FrontEnd, daemon: &mut Daemon, after: &str) {
    daemon.assert_alive();
    let info = fe.heap_info(0);
    assert!(info.is_ok(), "HEAP_INFO after {after}: {info:?}");
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 0, "after {after}: {}", st.raw);
}

/// Either used len 0 or an error status in a resp_hdr.
fn assert_rejected(c: &Completion, what: &str) {
    if c.used_len == 0 {
        return;
    }
    let s = FrontEnd::status_of(c, what);
    assert_ne!(s, S_OK, "{what}: accepted (used len {})", c.used_len);
}

#[test]
fn malformed_requests_get_an_error_status() {
    let mut daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let alloc = alloc_req(0, 0, 4096);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("empty request", vec![], S_INVAL),
        ("short header", vec![2, 0, 0, 0], S_INVAL),
        ("header only ALLOC", req_hdr(REQ_ALLOC, 0).build(), S_INVAL),
        ("truncated ALLOC", alloc[..20].to_vec(), S_INVAL),
        ("truncated FREE", free_req(1)[..12].to_vec(), S_INVAL),
        (
            "truncated HEAP_INFO",
            heap_info_req(0)[..12].to_vec(),
            S_INVAL,
        ),
        (
            "ALLOC with hdr.reserved",
            req_hdr(REQ_ALLOC, 1).u32(0).u32(0).u64(4096).build(),
            S_INVAL,
        ),
        (
            "HEAP_INFO with reserved",
            req_hdr(REQ_HEAP_INFO, 0).u32(0).u32(7).build(),
            S_INVAL,
        ),
        (
            "SYNC with reserved",
            req_hdr(REQ_SYNC, 0).u64(1).u32(SYNC_READ).u32(1).build(),
            S_INVAL,
        ),
        (
            "FREE with hdr.reserved",
            req_hdr(REQ_FREE, 0x8000_0000).u64(1).build(),
            S_INVAL,
        ),
    ];
    for (what, req, want) in &cases {
        let c = fe.request(req, 64);
        eprintln!("{what}: used {} bytes {:02x?}", c.used_len, &c.written[..8]);
        let s = FrontEnd::status_of(&c, what);
        assert_eq!(status_name(s), status_name(*want), "{what}");
        assert_eq!(
            c.used_len as usize, RESP_HDR_SIZE,
            "{what}: used len of an error"
        );
        check_still_works(&mut fe, &mut daemon, what);
    }
    // Unknown types: UNSUPP (or INVAL).
    for ty in [0, 6, 99, u32::MAX] {
        let what = format!("type {ty}");
        let c = fe.request(&req_hdr(ty, 0).u64(0).u64(0).build(), 64);
        let s = FrontEnd::status_of(&c, &what);
        assert!(s == S_UNSUPP || s == S_INVAL, "{what}: {}", status_name(s));
        check_still_works(&mut fe, &mut daemon, &what);
    }
}

#[test]
fn response_buffer_too_small() {
    let mut daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    // Room for a resp_hdr but not the alloc_resp: INVAL, and nothing allocated (the guest
    // could never learn the buffer id).
    let c = fe.request(&alloc_req(0, 0, 4096), RESP_HDR_SIZE as u32);
    let s = FrontEnd::status_of(&c, "ALLOC with an 8-byte response");
    assert_eq!(status_name(s), status_name(S_INVAL));
    check_still_works(&mut fe, &mut daemon, "ALLOC with an 8-byte response");
    assert_eq!(fe.shm().live_mappings(), 0, "{:x?}", fe.shm().mappings());

    let c = fe.request(&alloc_req(0, 0, 4096), (ALLOC_RESP_SIZE - 1) as u32);
    assert_rejected(&c, "ALLOC with a 31-byte response");
    check_still_works(&mut fe, &mut daemon, "ALLOC with a 31-byte response");

    let c = fe.request(&heap_info_req(0), 16);
    assert_rejected(&c, "HEAP_INFO with a 16-byte response");
    check_still_works(&mut fe, &mut daemon, "HEAP_INFO with a 16-byte response");

    // Not even a resp_hdr: nothing can be written.
    for len in [1, 4, 7] {
        let c = fe.request(&alloc_req(0, 0, 4096), len);
        assert_eq!(c.used_len, 0, "{len}-byte response: used len");
        check_still_works(&mut fe, &mut daemon, &format!("{len}-byte response"));
    }
    // A larger response buffer than needed: used len is the struct size.
    let c = fe.request(&free_req(424242), 64);
    assert_eq!(c.used_len as usize, RESP_HDR_SIZE);
    assert_eq!(FrontEnd::status_of(&c, "FREE"), S_NO_BUFFER);
    assert!(c.written[RESP_HDR_SIZE..].iter().all(|&b| b == POISON));
}

#[test]
fn wrong_descriptor_directions() {
    let mut daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let alloc = alloc_req(0, 0, 4096);
    let cases: Vec<(&str, Vec<Seg>)> = vec![
        ("no writable part", vec![Seg::R(alloc.clone())]),
        (
            "response in a readable descriptor",
            vec![Seg::R(alloc.clone()), Seg::R(vec![0; 32])],
        ),
        (
            "request in a writable descriptor",
            vec![Seg::W(24), Seg::W(32)],
        ),
        (
            "readable descriptor outside guest memory",
            vec![
                Seg::RawR {
                    gpa: UNMAPPED_GPA,
                    len: 24,
                },
                Seg::W(32),
            ],
        ),
    ];
    for (what, segs) in cases {
        let c = fe.call(&segs);
        eprintln!("{what}: used len {}", c.used_len);
        assert_rejected(&c, what);
        check_still_works(&mut fe, &mut daemon, what);
    }
    assert_eq!(fe.shm().map_count(), 0, "{:x?}", fe.shm().events);
}

#[test]
fn requests_split_across_descriptors_are_valid() {
    // Devices must not depend on how the driver splits a request into descriptors.
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let req = alloc_req(0, 0, 8192);
    let c = fe.call(&[
        Seg::R(req[..8].to_vec()),
        Seg::R(req[8..12].to_vec()),
        Seg::R(req[12..].to_vec()),
        Seg::W(8),
        Seg::W(10),
        Seg::W(14),
    ]);
    let b = common::frontend::parse_alloc(&c, "split ALLOC").unwrap();
    assert!(b.len >= 8192);
    assert!(fe.read_buffer(&b, 0, 8192).iter().all(|&x| x == 0));
    let c = fe.call(&[
        Seg::R(heap_info_req(0)[..3].to_vec()),
        Seg::R(heap_info_req(0)[3..].to_vec()),
        Seg::W(40),
        Seg::W(32),
    ]);
    let s = FrontEnd::status_of(&c, "split HEAP_INFO");
    assert_eq!(s, S_OK);
    assert_eq!(HeapInfo::parse(&c.written[RESP_HDR_SIZE..]).name, "a");
    fe.free_ok(b.id);
}
