//! Tests of the wire format: decoding, the answer shapes, the status mapping.

use super::*;
use crate::testing::*;

const ALL: Features = Features {
    sync: true,
    session: true,
    no_sync: true,
    batch: true,
    uuid: true,
    page_size: false,
    heap_range: false,
};

#[test]
fn requests_decode_to_their_fields() {
    let cases: Vec<(Vec<u8>, usize, Request)> = vec![
        (
            heap_info_req(3),
            HEAP_INFO_RESP_SIZE,
            Request::HeapInfo {
                heap_id: 3,
                reserved: 0,
            },
        ),
        (
            alloc_req(1, 2, 4096),
            ALLOC_RESP_SIZE,
            Request::Alloc {
                heap_id: 1,
                flags: 2,
                len: 4096,
            },
        ),
        (free_req(9), 8, Request::Free { buffer_id: 9 }),
        (
            sync_req(9, 5),
            8,
            Request::Sync {
                buffer_id: 9,
                flags: 5,
                reserved: 0,
            },
        ),
        (
            session_open_req(7),
            SESSION_OPEN_RESP_SIZE,
            Request::SessionOpen {
                resume_id: 7,
                page_size: 4096,
                reserved: 0,
            },
        ),
        (
            session_close_req(1),
            8,
            Request::SessionClose {
                flags: 1,
                reserved: 0,
            },
        ),
        (
            reserve_req(VIRTIO_DMAHEAP_REQ_UNRESERVE, 4096, 8192),
            8,
            Request::Unreserve {
                offset: 4096,
                len: 8192,
            },
        ),
    ];
    for (bytes, writable, want) in cases {
        assert_eq!(decode(&bytes, writable, ALL), Ok(want));
    }
}

#[test]
fn session_open_has_the_page_size_shape_exactly_when_the_feature_is_negotiated() {
    let with = Features {
        page_size: true,
        ..ALL
    };
    assert_eq!(
        decode(
            &session_open_page_req(5, 16384),
            SESSION_OPEN_RESP_SIZE,
            with
        ),
        Ok(Request::SessionOpen {
            resume_id: 5,
            page_size: 16384,
            reserved: 0,
        })
    );
    let mut r = session_open_page_req(0, 16384);
    r[20] = 1;
    assert_eq!(
        decode(&r, SESSION_OPEN_RESP_SIZE, with),
        Ok(Request::SessionOpen {
            resume_id: 0,
            page_size: 16384,
            reserved: 1,
        })
    );
    let d = |b: &[u8], f| decode(b, SESSION_OPEN_RESP_SIZE, f).map_err(DecodeError::status);
    assert_eq!(d(&session_open_req(0), with), Err(VIRTIO_DMAHEAP_S_INVAL));
    assert_eq!(
        d(&session_open_page_req(0, 16384), ALL),
        Err(VIRTIO_DMAHEAP_S_INVAL)
    );
    // Without sessions the page size feature means nothing.
    let bits = 1 << VIRTIO_DMAHEAP_F_PAGE_SIZE;
    assert!(!Features::from_bits(bits).page_size);
    assert!(Features::from_bits(bits | (1 << VIRTIO_DMAHEAP_F_SESSION)).page_size);
}

#[test]
fn heap_info_has_the_range_shape_exactly_when_the_feature_is_negotiated() {
    let with = Features {
        heap_range: true,
        ..ALL
    };
    assert!(Features::from_bits(1 << VIRTIO_DMAHEAP_F_HEAP_RANGE).heap_range);
    assert_ne!(Features::OFFERED & (1 << VIRTIO_DMAHEAP_F_HEAP_RANGE), 0);
    let req = heap_info_req(0);
    let want = Request::HeapInfo {
        heap_id: 0,
        reserved: 0,
    };
    assert_eq!(decode(&req, HEAP_INFO_RANGE_RESP_SIZE, with), Ok(want));
    assert_eq!(decode(&req, HEAP_INFO_RESP_SIZE, ALL), Ok(want));
    // A writable part that holds only the old response is malformed with the feature.
    assert_eq!(
        decode(&req, HEAP_INFO_RANGE_RESP_SIZE - 1, with).map_err(DecodeError::status),
        Err(VIRTIO_DMAHEAP_S_INVAL)
    );
    assert_eq!(
        decode(&req, HEAP_INFO_RESP_SIZE, with).map_err(DecodeError::status),
        Err(VIRTIO_DMAHEAP_S_INVAL)
    );
    let answer = || {
        Ok(Answer::HeapInfo {
            info: HeapInfo {
                capacity: 7.into(),
                ..Default::default()
            },
            range: Range {
                offset: 2 << 20,
                len: 4 << 20,
            },
        })
    };
    let Reply::Answer(a) = encode(&want, answer(), with) else {
        panic!("no answer");
    };
    assert_eq!(a.len(), HEAP_INFO_RANGE_RESP_SIZE);
    assert_eq!(le64(&a, 64), 7);
    assert_eq!((le64(&a, 72), le64(&a, 80)), (2 << 20, 4 << 20));
    let Reply::Answer(a) = encode(&want, answer(), ALL) else {
        panic!("no answer");
    };
    assert_eq!(a.len(), HEAP_INFO_RESP_SIZE);
    assert_eq!(le64(&a, 64), 7);
    // An error keeps the full shape, range zero.
    let Reply::Answer(a) = encode(&want, Err(RequestError::NoHeap), with) else {
        panic!("no answer");
    };
    assert_eq!(a.len(), HEAP_INFO_RANGE_RESP_SIZE);
    assert_eq!(status_of(&a), VIRTIO_DMAHEAP_S_NO_HEAP);
    assert!(a[8..].iter().all(|&b| b == 0));
}

#[test]
fn header_level_errors() {
    let none = Features {
        sync: false,
        session: false,
        no_sync: false,
        batch: false,
        uuid: false,
        page_size: false,
        heap_range: false,
    };
    let d = |b: &[u8], w, f| decode(b, w, f).map_err(DecodeError::status);
    assert_eq!(d(&[1, 0, 0], 8, ALL), Err(VIRTIO_DMAHEAP_S_INVAL));
    assert_eq!(d(&sync_req(1, 1), 8, none), Err(VIRTIO_DMAHEAP_S_UNSUPP));
    assert_eq!(
        d(&session_open_req(0), 16, none),
        Err(VIRTIO_DMAHEAP_S_UNSUPP)
    );
    assert_eq!(
        d(&assign_uuid_req(1), 24, none),
        Err(VIRTIO_DMAHEAP_S_UNSUPP)
    );
    assert_eq!(
        decode(&assign_uuid_req(9), 24, ALL),
        Ok(Request::AssignUuid { buffer_id: 9 })
    );
    assert_eq!(d(&assign_uuid_req(9), 23, ALL), Err(VIRTIO_DMAHEAP_S_INVAL));
    assert_eq!(
        d(&assign_uuid_req(9)[..12], 24, ALL),
        Err(VIRTIO_DMAHEAP_S_INVAL)
    );
    let a = alloc_req(0, 0, 4096);
    assert_eq!(d(&a[..20], 32, ALL), Err(VIRTIO_DMAHEAP_S_INVAL));
    assert_eq!(d(&a, 31, ALL), Err(VIRTIO_DMAHEAP_S_INVAL));
    let mut r = a.clone();
    r[4] = 1;
    assert_eq!(d(&r, 32, ALL), Err(VIRTIO_DMAHEAP_S_INVAL));
    assert_eq!(header_only(VIRTIO_DMAHEAP_S_INVAL, 7), Vec::<u8>::new());
    assert_eq!(header_only(VIRTIO_DMAHEAP_S_INVAL, 8).len(), 8);
}

#[test]
fn every_error_has_one_status_and_errors_keep_the_full_response_shape() {
    let alloc = Request::Alloc {
        heap_id: 0,
        flags: 0,
        len: 4096,
    };
    assert_eq!(encode(&alloc, Err(RequestError::Retry), ALL), Reply::Retry);
    let Reply::Answer(a) = encode(&alloc, Err(RequestError::WindowFull), ALL) else {
        panic!("no answer");
    };
    assert_eq!(a.len(), ALLOC_RESP_SIZE);
    assert_eq!(status_of(&a), VIRTIO_DMAHEAP_S_WINDOW_FULL);
    assert!(a[8..].iter().all(|&b| b == 0));
    assert_eq!(status(RequestError::Quota), Some(VIRTIO_DMAHEAP_S_QUOTA));
    assert_eq!(
        status(RequestError::NoSession),
        Some(VIRTIO_DMAHEAP_S_NO_SESSION)
    );
}
