// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cross-device sharing (VIRTIO_DMAHEAP_F_UUID, spec 6.7): buffers are virtio_dma_bufs
//! whose UUID another device's driver asks for. The kernel importer (tests/guest/importer,
//! insmod first) does what such a driver does: writing a dma-buf fd to its `uuid`
//! parameter checks is_virtio_dma_buf() and calls virtio_dma_buf_get_uuid() (`uuid_race`:
//! from 8 workers at once); reading `uuid` gives the UUID.

use std::time::Duration;

use crate::cases::{heap_has_feature, Ctx, ParamGuard};
use crate::env;
use crate::host;
use crate::sys::{self, errname, Buf, Heap};

pub const UUID_PARAM: &str = "/sys/module/dmaheap_importer/parameters/uuid";
const UUID_RACE_PARAM: &str = "/sys/module/dmaheap_importer/parameters/uuid_race";
const CHECK_PARAM: &str = "/sys/module/dmaheap_importer/parameters/check";
/// VIRTIO_DMAHEAP_F_UUID.
const F_UUID: usize = 1;
/// Large enough for a host allocation of its own with the default arena size (64 MiB:
/// buffers up to 8 MiB share arenas).
const OWN: usize = 16 << 20;

type Uuid = [u8; 16];

/// What a guest driver importing `buf` gets from virtio_dma_buf_get_uuid(): the UUID, or
/// the errno (EMEDIUMTYPE: the buffer is not a virtio_dma_buf). The outer error is the
/// harness's (no importer, unreadable answer).
fn get_uuid(buf: &Buf) -> Result<Result<Uuid, i32>, String> {
    get_uuid_via(UUID_PARAM, buf)
}

/// The same from 8 kernel workers at once (they must agree: EILSEQ otherwise).
fn get_uuid_race(buf: &Buf) -> Result<Result<Uuid, i32>, String> {
    get_uuid_via(UUID_RACE_PARAM, buf)
}

fn get_uuid_via(param: &str, buf: &Buf) -> Result<Result<Uuid, i32>, String> {
    if let Err(e) = std::fs::write(param, buf.raw().to_string()) {
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Err(format!(
                "{param}: no such file (insmod tests/guest/importer's dmaheap_importer.ko)"
            )),
            Some(errno) => Ok(Err(errno)),
            None => Err(format!("{UUID_PARAM}: {e}")),
        };
    }
    let text = std::fs::read_to_string(UUID_PARAM).map_err(|e| format!("{UUID_PARAM}: {e}"))?;
    parse_uuid(text.trim())
        .map(Ok)
        .ok_or_else(|| format!("{UUID_PARAM} reads {text:?}, not a UUID"))
}

/// The UUID of `buf`, which must have one.
fn must_get_uuid(buf: &Buf, what: &str) -> Result<Uuid, String> {
    get_uuid(buf)?.map_err(|e| format!("{what}: get_uuid failed with {}", errname(e)))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lower-case hex), in RFC 4122 byte order.
fn parse_uuid(s: &str) -> Option<Uuid> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let digits: String = s.split('-').collect();
    if digits.len() != 32
        || digits
            .bytes()
            .any(|c| !matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    sys::unhex(&digits)?.try_into().ok()
}

fn fmt_uuid(u: &Uuid) -> String {
    let h = sys::hex(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// RFC 4122 version 4 (random) with the RFC 4122 variant.
fn is_v4(u: &Uuid) -> bool {
    u[6] >> 4 == 4 && u[8] >> 6 == 0b10
}

fn hamming(a: &Uuid, b: &Uuid) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn open_heap(name: &str) -> Result<Heap, String> {
    Heap::open(name).map_err(|e| format!("open {name}: {e}"))
}

/// The device of `heap` negotiated VIRTIO_DMAHEAP_F_UUID (the daemon offers it unless
/// `--no-uuid`; the driver asks for it when the kernel has virtio_dma_buf).
pub fn negotiated(heap: &str) -> Result<bool, String> {
    heap_has_feature(&env::sysfs_heap(heap)?, F_UUID)
}

/// virtio_dma_buf is in the kernel (a loaded module or built in).
fn kernel_has_virtio_dma_buf() -> bool {
    std::fs::read_to_string("/proc/kallsyms").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("virtio_dma_buf_export"))
    })
}

/// The buffer is written and read by the guest and the host, and the importer's checks
/// (vmap, attach through virtio_dma_buf_attach, DMA map, CPU access) pass.
fn still_works(buf: &Buf, what: &str) -> Result<(), String> {
    let what = |m: String| format!("{what}: {m}");
    // The whole buffer: the importer checks every byte of it.
    let len = sys::page_round(buf.len);
    let map = buf.mmap().map_err(what)?;
    let tag = sys::random_bytes(16);
    map.write(0, &tag);
    let hb = host::find_buffer(&tag, len).map_err(what)?;
    let data = sys::random_bytes(32);
    map.write(len - 32, &data);
    host::expect(&hb.id, len - 32, &data).map_err(what)?;
    let poke = sys::random_bytes(16);
    host::poke(&hb.id, 64, &poke).map_err(what)?;
    env::wait_until("the host's write", Duration::from_secs(5), || {
        Ok(map.read_vec(64, 16) == poke)
    })
    .map_err(what)?;
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    map.write(0, &pattern);
    std::fs::write(CHECK_PARAM, buf.raw().to_string())
        .map_err(|e| what(format!("kernel importer's checks: {e} (see dmesg)")))?;
    check(map.read_vec(0, 8) == b"importer", || {
        what("the importer's vmap write is not in the user mapping".into())
    })
}

/// The daemon's `exported` and `retained_buffers` counts of the heap under test (stats).
fn daemon_exports(ctx: &Ctx) -> Result<(u64, u64), String> {
    let st = env::daemon_heap_stats(&ctx.daemon_name(&ctx.heap))?;
    match (st.exported, st.retained_buffers) {
        (Some(e), Some(r)) => Ok((e, r)),
        _ => Err(format!("stats: no exported/retained_buffers in {st:?}")),
    }
}

/// Case `uuid`: the daemon offers VIRTIO_DMAHEAP_F_UUID, memfd heaps, no /dev/udmabuf on
/// the host (suite main).
pub fn uuid(ctx: &Ctx) -> Result<(), String> {
    if !negotiated(&ctx.heap)? {
        return Err(format!(
            "the device of {} did not negotiate VIRTIO_DMAHEAP_F_UUID{}",
            ctx.heap,
            if kernel_has_virtio_dma_buf() {
                ""
            } else {
                " (no virtio_dma_buf_export in /proc/kallsyms: kernel without CONFIG_VIRTIO_DMA_SHARED_BUFFER)"
            }
        ));
    }
    let heap = open_heap(&ctx.heap)?;
    // A small buffer shares an arena: without /dev/udmabuf on the host it cannot be shared
    // alone (S_UNSUPP -> EOPNOTSUPP), every time, and it still works.
    let small = heap.alloc(sys::page())?;
    for n in ["first", "second"] {
        let r = get_uuid(&small)?;
        check(r == Err(libc::EOPNOTSUPP), || {
            format!(
                "{n} get_uuid of a one-page arena buffer: {}, want EOPNOTSUPP (memfd arena, \
                 no udmabuf on the host)",
                uuid_or_errno(r)
            )
        })?;
    }
    still_works(&small, "a one-page buffer refused a UUID")?;
    drop(small);
    not_pooled(ctx, &heap)?;

    let (exp0, ret0) = daemon_exports(ctx)?;

    // A buffer with a host allocation of its own: a virtio_dma_buf with a UUID, the same
    // one every time (8 concurrent first callers included: the importer checks they agree).
    let a = heap.alloc(OWN)?;
    let ua = get_uuid_race(&a)?.map_err(|e| {
        format!(
            "first buffer, 8 callers at once: {} (EILSEQ: they got different UUIDs)",
            errname(e)
        )
    })?;
    let again = must_get_uuid(&a, "first buffer, again")?;
    check(again == ua, || {
        format!(
            "get_uuid changed: {} then {}",
            fmt_uuid(&ua),
            fmt_uuid(&again)
        )
    })?;
    println!("# uuid: {} bytes -> {}", OWN, fmt_uuid(&ua));
    // The daemon counts it as exported.
    let (exp, _) = daemon_exports(ctx)?;
    check(exp == exp0 + 1, || {
        format!("daemon stats: exported {exp0} before, {exp} with one UUID assigned")
    })?;
    still_works(&a, "a buffer with a UUID")?;
    check(must_get_uuid(&a, "after use")? == ua, || {
        "the UUID changed after the buffer was used".into()
    })?;

    // Every buffer its own random UUID: version 4, no two alike or close.
    let mut bufs = vec![a];
    let mut uuids = vec![ua];
    for i in 1..6 {
        let b = heap.alloc(OWN)?;
        uuids.push(must_get_uuid(&b, &format!("buffer {i}"))?);
        bufs.push(b);
    }
    let shown: Vec<String> = uuids.iter().map(fmt_uuid).collect();
    for (i, u) in uuids.iter().enumerate() {
        check(is_v4(u), || {
            format!("UUID {} is not RFC 4122 version 4", shown[i])
        })?;
        for (j, v) in uuids.iter().enumerate().skip(i + 1) {
            // Random UUIDs differ in about 61 of their 122 random bits.
            let d = hamming(u, v);
            check(d >= 24, || {
                format!(
                    "UUIDs {} and {} differ in only {d} bits (not random?); all: {shown:?}",
                    shown[i], shown[j]
                )
            })?;
        }
    }
    let (exp, _) = daemon_exports(ctx)?;
    check(exp == exp0 + bufs.len() as u64, || {
        format!(
            "daemon stats: exported {exp0} before, {exp} with {} UUIDs",
            bufs.len()
        )
    })?;
    drop(bufs);
    // Freed, nobody on the host holds them: withdrawn and released, nothing retained.
    let mut last = (0, 0);
    env::wait_until(
        "the daemon to withdraw the freed buffers' UUIDs",
        Duration::from_secs(20),
        || {
            last = daemon_exports(ctx)?;
            Ok(last == (exp0, ret0))
        },
    )
    .map_err(|e| {
        format!(
            "{e}; (exported, retained) before {:?}, last {last:?}",
            (exp0, ret0)
        )
    })?;

    Ok(())
}

/// A released buffer that was asked for a UUID goes back to the host (FREE withdraws the
/// UUID), never into the driver's pool, where it would come back under the same UUID.
fn not_pooled(ctx: &Ctx, heap: &Heap) -> Result<(), String> {
    let sh = env::sysfs_heap(&ctx.heap)?;
    if sh.prop("cache")? != "cached" {
        println!(
            "# uuid: {} is not cached (no pool): pool part skipped",
            ctx.heap
        );
        return Ok(());
    }
    let _single = ParamGuard::set("pool_batch", "1")?;
    // An empty pool first (idle buffers go back after pool_idle_ms), so that it counts
    // only what happens here.
    env::wait_until("an empty pool", Duration::from_secs(10), || {
        Ok(sh.num("buffers_pooled")? == 0)
    })?;
    let pooled0 = 0;
    // Asked (and refused: a one-page arena buffer) for a UUID: freed on the host.
    let asked = heap.alloc(sys::page())?;
    let map = asked.mmap()?;
    let tag = sys::random_bytes(16);
    map.write(0, &tag);
    let hb = host::find_buffer(&tag, sys::page())?;
    let r = get_uuid(&asked)?;
    check(r.is_err(), || "a one-page arena buffer got a UUID".into())?;
    drop((map, asked));
    let pooled = sh.num("buffers_pooled")?;
    check(pooled == pooled0, || {
        format!("a buffer asked for a UUID was pooled: buffers_pooled {pooled0} -> {pooled}")
    })?;
    env::wait_until(
        "the host to free the buffer asked for a UUID",
        Duration::from_secs(10),
        || {
            let list = host::call(&["ctl", "buffers"])?;
            Ok(!list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(hb.id.as_str())))
        },
    )?;
    // The control: one never asked is pooled.
    drop(heap.alloc(sys::page())?);
    let pooled = sh.num("buffers_pooled")?;
    check(pooled == pooled0 + 1, || {
        format!("a plain one-page buffer was not pooled: buffers_pooled {pooled0} -> {pooled}")
    })
}

fn uuid_or_errno(r: Result<Uuid, i32>) -> String {
    match r {
        Ok(u) => format!("UUID {}", fmt_uuid(&u)),
        Err(e) => errname(e),
    }
}

/// get_uuid of each of `bufs` fails with ENODEV.
fn all_enodev(bufs: &[(&Buf, &str)], when: &str) -> Result<(), String> {
    for (b, what) in bufs {
        let r = get_uuid(b)?;
        check(r == Err(libc::ENODEV), || {
            format!("{what}, {when}: {}, want ENODEV", uuid_or_errno(r))
        })?;
    }
    Ok(())
}

/// Case `uuid-revoked`: after the host ends the session (`ctl prepare-reset`), and after
/// the device is removed (driver unbind), old buffers have no UUID any more (ENODEV),
/// whether they had one or not; in between, new buffers get new UUIDs. Run it last: the
/// device stays unbound.
pub fn uuid_revoked(ctx: &Ctx) -> Result<(), String> {
    let heap = open_heap(&ctx.heap)?;
    let had = heap.alloc(OWN)?;
    let u = must_get_uuid(&had, "before the session ended")?;
    let never = heap.alloc(OWN)?;
    host::call(&["ctl", "prepare-reset"])?;
    // The driver learns it at its next request (NO_SESSION), then revokes every buffer.
    env::wait_until(
        "the driver to revoke the old session's buffers",
        Duration::from_secs(30),
        || {
            // Not a small size: the driver's pool could answer that without asking the device.
            let _ = heap.alloc(OWN);
            Ok(never.mmap().is_err())
        },
    )?;
    let when = "after the host ended the session";
    all_enodev(
        &[
            (&had, "a buffer that had a UUID"),
            (&never, "a buffer never asked"),
        ],
        when,
    )?;
    let fresh = heap.alloc(OWN)?;
    let f = must_get_uuid(&fresh, "a buffer of the new session")?;
    check(f != u, || "a new buffer got the old session's UUID".into())?;
    let fresh_never = heap.alloc(OWN)?;

    // The device goes away (a reset, then no device): same for the new session's buffers.
    let dev_dir = env::sysfs_heap(&ctx.heap)?
        .dir
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.to_path_buf())
        .ok_or("no device directory above the heap's sysfs directory")?;
    let dev = dev_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("device name")?
        .to_string();
    std::fs::write(format!("{}/unbind", env::DRIVER_DIR), &dev)
        .map_err(|e| format!("unbind {dev}: {e}"))?;
    all_enodev(
        &[
            (&fresh, "a buffer that had a UUID"),
            (&fresh_never, "a buffer never asked"),
        ],
        "after the device was removed",
    )
}

/// Case `uuid-off`: the daemon runs with `--no-uuid`: the feature is not negotiated, and
/// buffers are plain dma-bufs (not virtio_dma_bufs: EMEDIUMTYPE from the importer) that
/// work as before.
pub fn uuid_off(ctx: &Ctx) -> Result<(), String> {
    check(!negotiated(&ctx.heap)?, || {
        format!(
            "the device of {} negotiated VIRTIO_DMAHEAP_F_UUID (daemon without --no-uuid?)",
            ctx.heap
        )
    })?;
    let heap = open_heap(&ctx.heap)?;
    for len in [sys::page(), OWN] {
        let b = heap.alloc(len)?;
        let r = get_uuid(&b)?;
        check(r == Err(libc::EMEDIUMTYPE), || {
            format!(
                "{len} bytes without the feature: {}, want EMEDIUMTYPE (not a virtio_dma_buf)",
                uuid_or_errno(r)
            )
        })?;
        still_works(&b, &format!("{len} bytes without the feature"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uuids() {
        let u = parse_uuid("0123abcd-4567-489a-bcde-f0123456789a").expect("a valid UUID");
        assert_eq!(fmt_uuid(&u), "0123abcd-4567-489a-bcde-f0123456789a");
        assert!(is_v4(&u));
        assert!(parse_uuid("0123abcd-4567-489a-bcde-f0123456789").is_none());
        assert!(parse_uuid("0123abcd04567-489a-bcde-f0123456789a").is_none());
        assert!(parse_uuid("0123ABCD-4567-489a-bcde-f0123456789a").is_none());
        assert!(parse_uuid("").is_none());
    }
}
