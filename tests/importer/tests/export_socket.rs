// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The importer's requests against vhost-user-dmaheap's real export-socket server
//! (backend/src/export_socket.rs) over memfds standing in for exported buffers.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use dmaheap_test_importer::importer::Importer;
use dmaheap_test_importer::proto::{self, Req, Resp};
use vhost_user_dmaheap::export_socket;

type Table = Arc<Mutex<HashMap<[u8; 16], (File, u64)>>>;

struct Fixture {
    _dir: tempfile::TempDir,
    table: Table,
    imp: Importer,
}

fn memfd(len: u64) -> File {
    let name = std::ffi::CString::new("export").unwrap();
    // SAFETY: memfd_create with a valid C string; the new fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nothing else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.sock");
    let table: Table = Arc::default();
    let t = table.clone();
    export_socket::serve(
        export_socket::bind(&path).unwrap(),
        Arc::new(move |u: &[u8; 16]| {
            let t = t.lock().unwrap();
            let (f, len) = t.get(u)?;
            Some((f.try_clone().ok()?, *len))
        }),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        table,
        imp: Importer::new(path),
    }
}

impl Fixture {
    /// Exports a buffer of `len` bytes holding `seed`'s pattern; its file.
    fn export(&self, uuid: [u8; 16], len: u64, seed: u64) -> File {
        let f = memfd(len);
        let mut data = vec![0u8; len as usize];
        proto::fill(&mut data, seed);
        f.write_all_at(&data, 0).unwrap();
        self.table
            .lock()
            .unwrap()
            .insert(uuid, (f.try_clone().unwrap(), len));
        f
    }

    fn run(&mut self, req: Req) -> Resp {
        self.imp.handle(&req.encode())
    }
}

fn req(op: u32, uuid: [u8; 16], len: u64, seed_in: u64, seed_out: u64) -> Req {
    Req {
        op,
        reserved: 0,
        uuid,
        len,
        seed_in,
        seed_out,
    }
}

fn read_all(f: &File, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

#[test]
fn check_reads_what_was_written_and_writes_back() {
    let mut fx = fixture();
    for len in [4096u64, 65536, 1 << 20, 8 << 20, 4096 + 3] {
        let uuid = [len as u8 ^ 0x5a; 16];
        let f = fx.export(uuid, len, 11);
        let r = fx.run(req(proto::OP_CHECK, uuid, len, 11, 22));
        assert_eq!((r.status, r.len, r.fd_size), (0, len, len), "{len}: {r:?}");
        assert_eq!(proto::first_mismatch(&read_all(&f, len), 22), None, "{len}");
    }
}

#[test]
fn a_mismatch_names_the_first_differing_byte() {
    let mut fx = fixture();
    let uuid = [3; 16];
    let f = fx.export(uuid, 65536, 5);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 40_001).unwrap();
    f.write_all_at(&[b[0] ^ 0x81], 40_001).unwrap();
    let r = fx.run(req(proto::OP_CHECK, uuid, 65536, 5, 6));
    assert_eq!(r.status, libc::EILSEQ as u32, "{r:?}");
    assert_eq!(
        (r.bad_offset, r.bad_got, r.bad_want),
        (40_001, b[0] ^ 0x81, b[0])
    );
    // Nothing written on a mismatch.
    assert_eq!(
        read_all(&f, 65536)[0..8],
        proto::pattern(5, 0).to_le_bytes()
    );
}

#[test]
fn unknown_uuids_and_wrong_lengths() {
    let mut fx = fixture();
    let r = fx.run(req(proto::OP_CHECK, [9; 16], 4096, 1, 2));
    assert_eq!((r.status, r.len, r.fd_size), (libc::ENOENT as u32, 0, 0));
    let r = fx.run(req(proto::OP_LOOKUP_ONLY, [9; 16], 0, 0, 0));
    assert_eq!(r.status, libc::ENOENT as u32);
    fx.export([1; 16], 8192, 1);
    let r = fx.run(req(proto::OP_CHECK, [1; 16], 4096, 1, 2));
    assert_eq!(
        (r.status, r.len, r.fd_size),
        (libc::EMSGSIZE as u32, 8192, 8192)
    );
    let r = fx.run(req(proto::OP_HOLD, [1; 16], 1 << 40, 0, 0));
    assert_eq!(r.status, libc::EMSGSIZE as u32);
    let r = fx.run(req(proto::OP_LOOKUP_ONLY, [1; 16], 0, 0, 0));
    assert_eq!((r.status, r.len, r.fd_size), (0, 8192, 8192));
}

#[test]
fn hold_outlives_the_export_and_release_lets_go() {
    let mut fx = fixture();
    let uuid = [7; 16];
    let f = fx.export(uuid, 1 << 20, 31);
    assert_eq!(fx.run(req(proto::OP_HOLD, uuid, 1 << 20, 0, 0)).status, 0);
    assert_eq!(
        fx.run(req(proto::OP_HOLD, uuid, 1 << 20, 0, 0)).status,
        libc::EBUSY as u32
    );
    // Withdrawn (the guest freed it): lookups fail, the held mapping still works.
    fx.table.lock().unwrap().clear();
    assert_eq!(
        fx.run(req(proto::OP_LOOKUP_ONLY, uuid, 0, 0, 0)).status,
        libc::ENOENT as u32
    );
    let r = fx.run(req(proto::OP_CHECK_HELD, [0; 16], 0, 31, 32));
    assert_eq!((r.status, r.len), (0, 1 << 20), "{r:?}");
    assert_eq!(proto::first_mismatch(&read_all(&f, 1 << 20), 32), None);
    let r = fx.run(req(proto::OP_CHECK_HELD, [0; 16], 0, 31, 0));
    assert_eq!(r.status, libc::EILSEQ as u32);
    assert_eq!(fx.run(req(proto::OP_RELEASE, [0; 16], 0, 0, 0)).status, 0);
    for op in [proto::OP_RELEASE, proto::OP_CHECK_HELD] {
        assert_eq!(fx.run(req(op, [0; 16], 0, 0, 0)).status, libc::ENXIO as u32);
    }
}

#[test]
fn malformed_requests_get_an_error_status() {
    let mut fx = fixture();
    for bytes in [
        vec![],
        vec![1u8; 5],
        vec![0u8; proto::REQ_SIZE - 1],
        vec![0u8; proto::REQ_SIZE + 1],
    ] {
        assert_eq!(
            fx.imp.handle(&bytes).status,
            libc::EINVAL as u32,
            "{}",
            bytes.len()
        );
    }
    let mut r = req(proto::OP_CHECK, [1; 16], 4096, 0, 0);
    r.reserved = 1;
    assert_eq!(fx.run(r).status, libc::EINVAL as u32);
    for op in [0, 6, 0xffff_ffff] {
        assert_eq!(
            fx.run(req(op, [1; 16], 4096, 0, 0)).status,
            libc::EOPNOTSUPP as u32
        );
    }
}

#[test]
fn no_export_socket_is_eio_and_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.sock");
    let mut imp = Importer::new(path.clone());
    let r = imp.handle(&req(proto::OP_LOOKUP_ONLY, [1; 16], 0, 0, 0).encode());
    assert_eq!(r.status, libc::EIO as u32);
    export_socket::serve(
        export_socket::bind(&path).unwrap(),
        Arc::new(|_: &[u8; 16]| None),
    )
    .unwrap();
    let r = imp.handle(&req(proto::OP_LOOKUP_ONLY, [1; 16], 0, 0, 0).encode());
    assert_eq!(r.status, libc::ENOENT as u32);
}
