//! Exports of real dma-bufs (udmabuf, a dma-heap) for sharing by UUID: exactly the
//! buffer's bytes, both ways, and the release watch seeing their last close. These need
//! /dev/udmabuf and /dev/dma_heap/system (a guest kernel has them: tests/guest/suite runs
//! `host::` there with DMAHEAP_REQUIRE_UDMABUF=1 and DMAHEAP_REQUIRE_REAL_HEAP=1); on a
//! host without them they are skipped unless those variables ask for them.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::*;
use crate::core::export::ReleaseWatch;
use crate::core::{Device, Heap};
use crate::testing::{alloc, assign_uuid, free, heap_params, limits, FakeMapper};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn udmabuf() -> Option<UdmabufProvider> {
    match UdmabufProvider::open("export-test") {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(!required("DMAHEAP_REQUIRE_UDMABUF"), "no udmabuf: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn dma_heap() -> Option<DmaHeapProvider> {
    match DmaHeapProvider::open("system") {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(
                !required("DMAHEAP_REQUIRE_REAL_HEAP"),
                "no system heap: {e}"
            );
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn size_of(f: &File) -> u64 {
    let mut f = f.try_clone().unwrap();
    f.seek(SeekFrom::End(0)).unwrap()
}

/// A shared mapping of a whole dma-buf.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: u64) -> Map {
        let len = len as usize;
        // SAFETY: a new shared mapping of an open fd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        Map {
            ptr: ptr.cast(),
            len,
        }
    }
    fn read(&self, off: usize, n: usize) -> Vec<u8> {
        assert!(off + n <= self.len);
        // SAFETY: inside the live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), n).to_vec() }
    }
    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: inside the live, writable mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `e` maps exactly `[off, off + len)` of `b`: same size, bytes both ways.
fn check_exact(b: &dyn HostBuffer, e: &Export, off: u64, len: u64) {
    assert_eq!(e.kind, ExportKind::DmaBuf);
    assert_eq!(size_of(&e.file), len, "export size");
    let m = Map::new(&e.file, len);
    b.write_at(off, b"first").unwrap();
    b.write_at(off + len - 4, b"last").unwrap();
    assert_eq!(m.read(0, 5), b"first");
    assert_eq!(m.read(len as usize - 4, 4), b"last");
    m.write(len as usize / 2, b"from the importer");
    let mut got = [0u8; 17];
    b.read_at(off + len / 2, &mut got).unwrap();
    assert_eq!(&got, b"from the importer");
}

/// The watch sees the last close of `file` (a dma-buf), not an earlier one. `owner` is
/// the provider's buffer, which holds a whole-buffer export's file too: it goes before the
/// last mapping.
fn check_watch(file: File, owner: Box<dyn HostBuffer>) {
    let mut w = ReleaseWatch::new().unwrap();
    let t = w.watch(&file).unwrap();
    let dup = file.try_clone().unwrap();
    drop(file);
    assert!(w.alive().unwrap().contains(&t));
    let m = Map::new(&dup, 4096);
    drop(dup);
    drop(owner);
    assert!(w.alive().unwrap().contains(&t), "a mapping holds it");
    drop(m);
    assert!(
        !w.alive().unwrap().contains(&t),
        "released but still listed"
    );
}

#[test]
fn udmabuf_exports_whole_and_ranges_exactly() {
    let Some(p) = udmabuf() else { return };
    let b = p.allocate(1 << 20).unwrap();
    let whole = b.export(0, 1 << 20).unwrap().unwrap();
    check_exact(b.as_ref(), &whole, 0, 1 << 20);
    let range = b.export(128 << 10, 64 << 10).unwrap().unwrap();
    check_exact(b.as_ref(), &range, 128 << 10, 64 << 10);
    check_watch(whole.file, b);
    // A range's udmabuf lives on its own (it pins the pages, not the memfd's file).
    let b = p.allocate(1 << 20).unwrap();
    let range = b.export(0, 64 << 10).unwrap().unwrap();
    check_watch(range.file, b);
}

#[test]
fn memfd_ranges_export_as_udmabuf() {
    let Some(_) = udmabuf() else { return };
    let p = MemfdProvider::with_udmabuf("export-test", udmabuf::open_udmabuf_dev());
    let b = p.allocate(2 << 20).unwrap();
    let range = b.export(64 << 10, 16 << 10).unwrap().unwrap();
    check_exact(b.as_ref(), &range, 64 << 10, 16 << 10);
    check_watch(range.file, b);
}

#[test]
fn dma_heap_exports_only_whole_buffers() {
    let Some(p) = dma_heap() else { return };
    let b = p.allocate(1 << 20).unwrap();
    assert!(
        b.export(4096, 4096).unwrap().is_none(),
        "a range of a heap dma-buf"
    );
    let whole = b.export(0, 1 << 20).unwrap().unwrap();
    check_exact(b.as_ref(), &whole, 0, 1 << 20);
    check_watch(whole.file, b);
}

/// The device with a real udmabuf heap: an arena buffer is exported, held by an importer
/// after FREE (retained, charged, its range not reused) and released at the last close.
#[test]
fn device_retains_a_real_dmabuf_export_until_its_last_close() {
    let Some(p) = udmabuf() else { return };
    let heap = Heap {
        params: heap_params("u"),
        provider: Box::new(p),
    };
    let mut d = Device::new(vec![heap], limits(), Arc::new(AtomicU64::new(1)));
    d.set_acked_features(1 << crate::abi::VIRTIO_DMAHEAP_F_UUID);
    let mut m = FakeMapper::with_window(1 << 30);
    let (st, id, off, len) = alloc(&mut d, &mut m, 0, 64 << 10);
    assert_eq!(st, 0);
    let (st, u) = assign_uuid(&mut d, &mut m, id);
    assert_eq!(st, 0, "ASSIGN_UUID of an arena buffer on udmabuf");
    let (f, flen) = d.export_table().lookup(&u).unwrap();
    assert_eq!((flen, size_of(&f)), (len, len));
    let map = Map::new(&f, len);
    drop(f);
    d.poke(id, 0, b"guest").unwrap();
    assert_eq!(map.read(0, 5), b"guest");
    assert_eq!(free(&mut d, &mut m, id), 0);
    assert_eq!(d.release_closed_exports(), 0, "the mapping holds it");
    assert_eq!(d.stats().total.retained_bytes, len);
    for _ in 0..32 {
        let (st, _, noff, nlen) = alloc(&mut d, &mut m, 0, 64 << 10);
        assert_eq!(st, 0);
        assert!(
            noff + nlen <= off || noff >= off + len,
            "retained range reused"
        );
    }
    assert_eq!(map.read(0, 5), b"guest");
    drop(map);
    assert_eq!(d.release_closed_exports(), 1);
    assert_eq!(d.stats().total.retained_buffers, 0);
}
