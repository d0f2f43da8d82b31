// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cross-device sharing end to end (issue 13): a second device of the VM, the test
//! importer (tests/importer on the host, tests/guest/sharing/dmaheap_sharing.ko here),
//! gets a buffer's UUID from the guest, resolves it through the daemon's export socket,
//! maps it, checks what the guest wrote and writes what the guest then reads.
//! tests/sharing/run boots the VM for these cases (insmod dmaheap_sharing.ko first).
//! Protocol: tests/importer/importer_proto.h, mirrored here.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::cases::Ctx;
use crate::env;
use crate::host;
use crate::sys::{self, errname, Buf, Heap};

const DEV: &str = "/dev/dmaheap_sharing";

const OP_CHECK: u32 = 1;
const OP_HOLD: u32 = 2;
const OP_CHECK_HELD: u32 = 3;
const OP_RELEASE: u32 = 4;
const OP_LOOKUP_ONLY: u32 = 5;

/// `struct dmaheap_imp_resp`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Resp {
    status: u32,
    reserved: u32,
    len: u64,
    fd_size: u64,
    bad_offset: u64,
    bad_got: u8,
    bad_want: u8,
    reserved2: [u8; 6],
}

/// `struct dmaheap_sharing_run`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    fd: i32,
    op: u32,
    seed_in: u64,
    seed_out: u64,
    uuid: [u8; 16],
    len: u64,
    resp: Resp,
}

const RESP_SIZE: usize = 40;
const RUN_SIZE: usize = 88;
const _: () = assert!(std::mem::size_of::<Resp>() == RESP_SIZE);
const _: () = assert!(std::mem::size_of::<Run>() == RUN_SIZE);

/// `_IOWR('S', 0x38, struct dmaheap_sharing_run)`.
const IOC_RUN: u64 = (3 << 30) | ((RUN_SIZE as u64) << 16) | ((b'S' as u64) << 8) | 0x38;

/// How long the daemon may take to show a free or a release in its stats.
const STATS_WAIT: Duration = Duration::from_secs(15);

/// The module's device.
struct Sharing(File);

impl Sharing {
    fn open() -> Result<Sharing, String> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEV)
            .map(Sharing)
            .map_err(|e| {
                format!("{DEV}: {e} (insmod dmaheap_sharing.ko; is the importer device there?)")
            })
    }

    /// One request: the filled struct, or the ioctl's errno (the module's: EMEDIUMTYPE
    /// not a virtio_dma_buf, get_uuid's error, ETIMEDOUT, ...).
    fn run(&self, mut r: Run) -> Result<Run, i32> {
        // SAFETY: the ioctl reads and writes one `Run`, which lives for the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), IOC_RUN as _, &mut r as *mut Run) };
        if rc < 0 {
            return Err(sys::errno());
        }
        Ok(r)
    }

    fn op(&self, op: u32, buf: Option<&Buf>, seed_in: u64, seed_out: u64) -> Result<Run, i32> {
        self.run(Run {
            fd: buf.map_or(-1, Buf::raw),
            op,
            seed_in,
            seed_out,
            ..Run::default()
        })
    }

    /// LOOKUP_ONLY of a given UUID.
    fn lookup(&self, uuid: [u8; 16]) -> Result<Run, i32> {
        self.run(Run {
            fd: -1,
            op: OP_LOOKUP_ONLY,
            uuid,
            ..Run::default()
        })
    }
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn status_name(s: u32) -> String {
    if s == 0 {
        "0".into()
    } else {
        errname(s as i32)
    }
}

/// The answer of a request that must have succeeded, with what the importer saw.
fn must_ok(what: &str, r: Result<Run, i32>) -> Result<Run, String> {
    let r = r.map_err(|e| format!("{what}: the ioctl failed with {}", errname(e)))?;
    let p = &r.resp;
    if p.status != 0 {
        let mut m = format!(
            "{what}: importer status {} (lookup len {}, fd size {}, buffer len {})",
            status_name(p.status),
            p.len,
            p.fd_size,
            r.len
        );
        if p.status == libc::EILSEQ as u32 {
            m += &format!(
                ": first differing byte at {}: {:#04x}, want {:#04x}",
                p.bad_offset, p.bad_got, p.bad_want
            );
        }
        return Err(m);
    }
    Ok(r)
}

/// Does the host have /dev/udmabuf (host hook `udmabuf`, registered by tests/sharing/run)?
/// Without it a buffer sharing a memfd arena cannot be exported alone.
fn host_has_udmabuf() -> Result<bool, String> {
    match host::call(&["udmabuf"])?.trim() {
        "yes" => Ok(true),
        "no" => Ok(false),
        o => Err(format!("host hook udmabuf answered {o:?}")),
    }
}

/// Buffers up to this size share arenas on the heap (the daemon's arena-size / 8, from
/// its --heap arguments; 64 MiB arenas by default).
fn arena_limit(ctx: &Ctx) -> Result<u64, String> {
    let name = ctx.daemon_name(&ctx.heap);
    let specs = env::daemon_heap_specs()?;
    let arena = match specs.iter().find(|s| s.name == name) {
        Some(s) => match s.opts.get("arena-size") {
            Some(v) => env::parse_size(v)?,
            None => 64 << 20,
        },
        None => 64 << 20,
    };
    Ok(arena / 8)
}

fn is_v4(u: &[u8; 16]) -> bool {
    u[6] >> 4 == 4 && u[8] >> 6 == 0b10
}

/// A buffer of `len` bytes holding `seed`'s pattern (written between SYNC start/end).
fn filled(heap: &Heap, len: usize, seed: u64) -> Result<(Buf, sys::Map), String> {
    let buf = heap.alloc(len)?;
    let map = buf.mmap()?;
    buf.sync(sys::SYNC_START | sys::SYNC_WRITE)
        .map_err(|e| format!("SYNC start: {}", errname(e)))?;
    map.fill(seed);
    buf.sync(sys::SYNC_END | sys::SYNC_WRITE)
        .map_err(|e| format!("SYNC end: {}", errname(e)))?;
    Ok((buf, map))
}

/// The guest reads `seed`'s pattern (between SYNC start/end).
fn guest_sees(buf: &Buf, map: &sys::Map, seed: u64, what: &str) -> Result<(), String> {
    buf.sync(sys::SYNC_START | sys::SYNC_READ)
        .map_err(|e| format!("SYNC start: {}", errname(e)))?;
    let r = map.check(seed);
    buf.sync(sys::SYNC_END | sys::SYNC_READ)
        .map_err(|e| format!("SYNC end: {}", errname(e)))?;
    r.map_err(|off| {
        let got = map.read_vec(off, 8.min(buf.len - off));
        let want = sys::pattern(seed, (off / 8) as u64).to_le_bytes();
        format!(
            "{what}: the guest reads {} at byte {off}, want {} (what the importer wrote)",
            sys::hex(&got),
            sys::hex(&want[..got.len()])
        )
    })
}

fn seed() -> u64 {
    let b = sys::random_bytes(8);
    u64::from_le_bytes(b.try_into().unwrap_or([7; 8])) | 1
}

/// One CHECK round trip of a `len`-byte buffer.
fn roundtrip_one(s: &Sharing, heap: &Heap, len: usize) -> Result<String, String> {
    let what = format!("{} KiB", len >> 10);
    // The dma-buf is whole pages (4 KiB is one 16 KiB page with 16 KiB pages).
    let len = sys::page_round(len);
    let (a, b, c) = (seed(), seed(), seed());
    let (buf, map) = filled(heap, len, a).map_err(|e| format!("{what}: {e}"))?;
    let r = must_ok(&format!("{what} CHECK"), s.op(OP_CHECK, Some(&buf), a, b))?;
    check(
        r.len == len as u64 && r.resp.len == len as u64 && r.resp.fd_size == len as u64,
        || {
            format!(
                "{what}: dma-buf len {}, the export socket says {}, its fd has {} bytes",
                r.len, r.resp.len, r.resp.fd_size
            )
        },
    )?;
    check(is_v4(&r.uuid), || {
        format!("{what}: UUID {} is not RFC 4122 v4", sys::hex(&r.uuid))
    })?;
    guest_sees(&buf, &map, b, &what)?;
    // Again, through a new lookup: the importer sees its own bytes and the guest's next.
    filled_again(&buf, &map, c)?;
    must_ok(
        &format!("{what} second CHECK"),
        s.op(OP_CHECK, Some(&buf), c, a),
    )?;
    guest_sees(&buf, &map, a, &what)?;
    Ok(format!("{what} ok (uuid {})", sys::hex(&r.uuid)))
}

fn filled_again(buf: &Buf, map: &sys::Map, seed: u64) -> Result<(), String> {
    buf.sync(sys::SYNC_START | sys::SYNC_WRITE)
        .map_err(|e| format!("SYNC start: {}", errname(e)))?;
    map.fill(seed);
    buf.sync(sys::SYNC_END | sys::SYNC_WRITE)
        .map_err(|e| format!("SYNC end: {}", errname(e)))
}

/// sharing-roundtrip.
pub fn roundtrip(ctx: &Ctx) -> Result<(), String> {
    let s = Sharing::open()?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let limit = arena_limit(ctx)?;
    let udmabuf = host_has_udmabuf()?;
    for len in [4usize << 10, 64 << 10, 1 << 20, 8 << 20] {
        if sys::page_round(len) as u64 <= limit && !udmabuf {
            // An arena buffer without /dev/udmabuf on the host: not exportable alone.
            let (buf, _map) = filled(&heap, len, 1)?;
            let r = s.op(OP_CHECK, Some(&buf), 1, 2);
            check(matches!(r, Err(libc::EOPNOTSUPP)), || {
                format!(
                    "{} KiB (an arena buffer, no /dev/udmabuf on the host): {:?}, want the \
                     ioctl to fail with EOPNOTSUPP",
                    len >> 10,
                    r.map_err(errname)
                )
            })?;
            println!(
                "# sharing-roundtrip: {} KiB shares an arena (<= {limit} bytes) and the host \
                 has no /dev/udmabuf: EOPNOTSUPP, as specified",
                len >> 10
            );
            continue;
        }
        let line = roundtrip_one(&s, &heap, len)?;
        if ctx.verbose {
            println!("# sharing-roundtrip: {line}");
        }
    }
    // Freed by the guest and closed by the importer: the daemon releases them.
    wait_counts(ctx, "the freed buffers released (none retained)", |c| {
        c.retained == 0 && c.exported == 0
    })
    .map(|_| ())
}

/// The heap's `bytes`, `buffers`, `exported`, `retained_buffers` (daemon stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    bytes: u64,
    buffers: u64,
    exported: u64,
    retained: u64,
    retained_bytes: u64,
}

fn counts(ctx: &Ctx) -> Result<Counts, String> {
    let st = env::daemon_heap_stats(&ctx.daemon_name(&ctx.heap))?;
    let need = |v: Option<u64>, k: &str| v.ok_or_else(|| format!("stats: no {k} in {st:?}"));
    Ok(Counts {
        bytes: st.bytes,
        buffers: st.buffers,
        exported: need(st.exported, "exported")?,
        retained: need(st.retained_buffers, "retained_buffers")?,
        retained_bytes: need(st.retained_bytes, "retained_bytes")?,
    })
}

/// Waits until the stats satisfy `f`; the last counts seen.
fn wait_counts(ctx: &Ctx, what: &str, f: impl Fn(&Counts) -> bool) -> Result<Counts, String> {
    let mut last = None;
    let r = env::wait_until(what, STATS_WAIT, || {
        let c = counts(ctx)?;
        last = Some(c);
        Ok(f(&c))
    });
    match (r, last) {
        (Ok(()), Some(c)) => Ok(c),
        (Err(e), last) => Err(format!("{e}; last stats {last:?}")),
        (Ok(()), None) => Err(format!("{what}: no stats")),
    }
}

/// sharing-lifetime.
pub fn lifetime(ctx: &Ctx) -> Result<(), String> {
    let s = Sharing::open()?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let len = 1usize << 20;
    // Earlier cases' buffers are freed and no importer holds them: none stays retained,
    // and the driver's pool of small buffers (which the daemon counts too) gives its
    // buffers back after 1 s idle. Counting from that quiet state keeps the pool out of
    // the comparisons below.
    let before = wait_counts(ctx, "no buffer retained or pooled before the case", |c| {
        c.retained == 0 && c.buffers == 0
    })?;
    let (a, b) = (seed(), seed());
    let (buf, map) = filled(&heap, len, a)?;
    let held = must_ok("HOLD", s.op(OP_HOLD, Some(&buf), 0, 0))?;
    let r = lifetime_held(ctx, &s, &heap, (buf, map), held.uuid, before, (a, b));
    if r.is_err() {
        // Let go, so that a failure here does not fail the cases after it too.
        let _ = s.op(OP_RELEASE, None, 0, 0);
    }
    r
}

/// sharing-lifetime, once the importer holds the buffer.
fn lifetime_held(
    ctx: &Ctx,
    s: &Sharing,
    heap: &Heap,
    (buf, map): (Buf, sys::Map),
    uuid: [u8; 16],
    before: Counts,
    (a, b): (u64, u64),
) -> Result<(), String> {
    let len = 1usize << 20;
    let live = counts(ctx)?;
    check(
        live.exported == before.exported + 1 && live.buffers == before.buffers + 1,
        || format!("held and live: stats {live:?}, before {before:?}"),
    )?;
    // The guest frees it: the daemon withdraws the UUID and retains the buffer, still
    // charged.
    drop(map);
    drop(buf);
    let retained = wait_counts(ctx, "the buffer retained after the guest's free", |c| {
        c.retained == before.retained + 1
    })?;
    check(
        retained.exported == before.exported
            && retained.bytes == live.bytes
            && retained.buffers == live.buffers
            && retained.retained_bytes >= before.retained_bytes + len as u64,
        || {
            format!(
                "retained: stats {retained:?}; while live {live:?}; before {before:?} (want \
                 the buffer not exported, still charged: bytes and buffers as while live)"
            )
        },
    )?;
    let r = s
        .lookup(uuid)
        .map_err(|e| format!("LOOKUP_ONLY: {}", errname(e)))?;
    check(r.resp.status == libc::ENOENT as u32, || {
        format!(
            "LOOKUP_ONLY of the freed buffer's UUID: status {}, want ENOENT",
            status_name(r.resp.status)
        )
    })?;
    // New buffers of the same size must not get the retained memory: they are zeroed by
    // the host and written here, and the importer's bytes stay apart from them.
    let x = seed();
    let fresh: Vec<(Buf, sys::Map)> = (0..2)
        .map(|_| filled(heap, len, x))
        .collect::<Result<_, _>>()?;
    must_ok("CHECK_HELD after the free", s.op(OP_CHECK_HELD, None, a, b))?;
    must_ok(
        "CHECK_HELD of its own write",
        s.op(OP_CHECK_HELD, None, b, 0),
    )?;
    for (i, (fb, fm)) in fresh.iter().enumerate() {
        guest_sees(
            fb,
            fm,
            x,
            &format!("new buffer {i} after the importer's write"),
        )?;
    }
    drop(fresh);
    must_ok("RELEASE", s.op(OP_RELEASE, None, 0, 0))?;
    // Released: no longer retained nor charged (the new buffers are freed too).
    wait_counts(
        ctx,
        &format!("the retained buffer released (stats as before the case: {before:?})"),
        |c| c.retained == before.retained && c.bytes == before.bytes && c.buffers == before.buffers,
    )?;
    let r = s.op(OP_RELEASE, None, 0, 0);
    check(
        matches!(r, Ok(ref r) if r.resp.status == libc::ENXIO as u32),
        || format!("a second RELEASE: {r:?}, want status ENXIO"),
    )
}

/// sharing-unknown.
pub fn unknown(ctx: &Ctx) -> Result<(), String> {
    let s = Sharing::open()?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sys::random_bytes(16));
    let r = s
        .lookup(uuid)
        .map_err(|e| format!("LOOKUP_ONLY: {}", errname(e)))?;
    check(
        r.resp.status == libc::ENOENT as u32 && r.resp.len == 0,
        || {
            format!(
                "a random UUID: status {}, len {}, want ENOENT",
                status_name(r.resp.status),
                r.resp.len
            )
        },
    )?;
    // A freed buffer's UUID.
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let before = counts(ctx)?;
    let buf = heap.alloc(1 << 20)?;
    let r = must_ok(
        "LOOKUP_ONLY of a live buffer",
        s.op(OP_LOOKUP_ONLY, Some(&buf), 0, 0),
    )?;
    check(r.resp.len == 1 << 20, || {
        format!("LOOKUP_ONLY of a live 1 MiB buffer: len {}", r.resp.len)
    })?;
    drop(buf);
    wait_counts(ctx, "the buffer's free (its UUID withdrawn)", |c| {
        c.exported == before.exported
    })?;
    let r2 = s
        .lookup(r.uuid)
        .map_err(|e| format!("LOOKUP_ONLY: {}", errname(e)))?;
    check(r2.resp.status == libc::ENOENT as u32, || {
        format!(
            "a freed buffer's UUID {}: status {}, len {}, want ENOENT",
            sys::hex(&r.uuid),
            status_name(r2.resp.status),
            r2.resp.len
        )
    })?;
    // The guest kernel's own heap gives plain dma-bufs: not virtio_dma_bufs.
    if let Ok(reference) = Heap::open(&ctx.reference) {
        let b = reference.alloc(sys::page())?;
        let r = s.op(OP_CHECK, Some(&b), 0, 0);
        check(matches!(r, Err(libc::EMEDIUMTYPE)), || {
            format!(
                "a buffer of the guest's own {} heap: {:?}, want EMEDIUMTYPE",
                ctx.reference,
                r.map_err(errname)
            )
        })?;
    }
    // The importer answers what it does not know with an error, and nothing is held.
    for (op, want) in [
        (99, libc::EOPNOTSUPP),
        (0, libc::EOPNOTSUPP),
        (OP_CHECK_HELD, libc::ENXIO),
        (OP_RELEASE, libc::ENXIO),
    ] {
        let r = s
            .op(op, None, 0, 0)
            .map_err(|e| format!("op {op}: ioctl {}", errname(e)))?;
        check(r.resp.status == want as u32, || {
            format!(
                "op {op}: status {}, want {}",
                status_name(r.resp.status),
                errname(want)
            )
        })?;
    }
    Ok(())
}

/// sharing-small.
pub fn small(ctx: &Ctx) -> Result<(), String> {
    let s = Sharing::open()?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let udmabuf = host_has_udmabuf()?;
    let limit = arena_limit(ctx)?;
    check(sys::page() as u64 <= limit, || {
        format!("heap {}: one-page buffers do not share arenas", ctx.heap)
    })?;
    let (a, b) = (seed(), seed());
    let (buf, map) = filled(&heap, sys::page(), a)?;
    let before = counts(ctx)?;
    let r = s.op(OP_CHECK, Some(&buf), a, b);
    if udmabuf {
        must_ok("a one-page arena buffer with /dev/udmabuf on the host", r)?;
        return guest_sees(&buf, &map, b, "one page");
    }
    check(matches!(r, Err(libc::EOPNOTSUPP)), || {
        format!(
            "a one-page arena buffer, no /dev/udmabuf on the host: {:?}, want EOPNOTSUPP",
            r.map_err(errname)
        )
    })?;
    // Refused, it still works for the guest and is not exported.
    guest_sees(&buf, &map, a, "one page after the refusal")?;
    let c = counts(ctx)?;
    check(c.exported == before.exported, || {
        format!("refused, yet exported: stats {c:?}, before {before:?}")
    })
}

/// sharing-killable.
pub fn killable(ctx: &Ctx) -> Result<(), String> {
    let s = Sharing::open()?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let (a, b, c) = (seed(), seed(), seed());
    let (buf, map) = filled(&heap, 1 << 20, a)?;
    // The UUID is assigned now, so that the request below waits for the importer only.
    must_ok("CHECK before the stop", s.op(OP_CHECK, Some(&buf), a, 0))?;
    host::call(&["stop-importer"])?;
    let res = crate::lifecycle::killed_while_waiting("CHECK", || {
        i32::from(s.op(OP_CHECK, Some(&buf), a, b).is_err())
    });
    host::call(&["cont-importer"])?;
    let t = res?;
    check(t < Duration::from_secs(2), || {
        format!("CHECK ended {t:.1?} after SIGKILL")
    })?;
    eprintln!("  sharing-killable: a waiting CHECK ended {t:.1?} after SIGKILL");
    // The abandoned CHECK is served first (it writes b), then this one.
    must_ok(
        "CHECK after the importer resumed",
        s.op(OP_CHECK, Some(&buf), b, c),
    )?;
    guest_sees(&buf, &map, c, "after the resume")
}

const DRIVER: &str = "/sys/bus/virtio/drivers/dmaheap_sharing";

/// The virtio device the module drives (`virtioN`).
fn bound_device() -> Result<String, String> {
    std::fs::read_dir(DRIVER)
        .map_err(|e| format!("{DRIVER}: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("virtio"))
        .ok_or_else(|| format!("no device bound to {DRIVER}"))
}

/// sharing-remove.
pub fn remove(ctx: &Ctx) -> Result<(), String> {
    let s = Sharing::open()?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let (a, b) = (seed(), seed());
    let (buf, map) = filled(&heap, 1 << 20, a)?;
    must_ok("CHECK before the stop", s.op(OP_CHECK, Some(&buf), a, 0))?;
    let dev = bound_device()?;
    host::call(&["stop-importer"])?;
    // SAFETY: the child only makes system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = errname(sys::errno());
        host::call(&["cont-importer"])?;
        return Err(format!("fork: {e}"));
    }
    if pid == 0 {
        let rc = match s.op(OP_CHECK, Some(&buf), a, b) {
            Ok(r) if r.resp.status == 0 => 0,
            Ok(_) => 100,
            Err(e) => e & 0x7f,
        };
        // SAFETY: leaving the child at once.
        unsafe { libc::_exit(rc) };
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut status = 0;
    // SAFETY: polling our own child.
    let early = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != 0;
    // The reset below waits for the importer (QEMU stops its rings), and QEMU's main loop
    // with it, so the host resumes the importer by itself a little later.
    let later = host::call(&["cont-importer-later", "2"]);
    if early || later.is_err() {
        host::call(&["cont-importer"])?;
        later?;
        return Err("the CHECK finished although the importer is stopped".into());
    }
    let t0 = std::time::Instant::now();
    std::fs::write(format!("{DRIVER}/unbind"), &dev).map_err(|e| format!("unbind {dev}: {e}"))?;
    let unbind = t0.elapsed();
    let waited = loop {
        // SAFETY: as above.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return Err("the waiting CHECK still waits 15 s after the device was unbound".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let code = libc::WEXITSTATUS(status);
    eprintln!(
        "  sharing-remove: unbind took {unbind:.1?}; the waiting CHECK ended after \
         {waited:.1?} with {}",
        if code == 0 {
            "its answer".to_string()
        } else {
            errname(code)
        }
    );
    check(code == 0 || code == libc::ENODEV, || {
        format!(
            "the waiting CHECK ended with {}, want ENODEV or its answer",
            errname(code)
        )
    })?;
    let r = s.op(OP_LOOKUP_ONLY, None, 0, 0);
    check(matches!(r, Err(libc::ENODEV)), || {
        format!(
            "a request with no device bound: {:?}, want ENODEV",
            r.map_err(errname)
        )
    })?;
    // Whichever way the race went, the buffer holds the guest's bytes or the importer's.
    buf.sync(sys::SYNC_START | sys::SYNC_READ)
        .map_err(|e| format!("SYNC start: {}", errname(e)))?;
    let intact = map.check(a).is_ok() || map.check(b).is_ok();
    buf.sync(sys::SYNC_END | sys::SYNC_READ)
        .map_err(|e| format!("SYNC end: {}", errname(e)))?;
    check(intact, || {
        "the buffer holds neither the guest's nor the importer's pattern".into()
    })?;
    std::fs::write(format!("{DRIVER}/bind"), &dev).map_err(|e| format!("bind {dev}: {e}"))?;
    let c = seed();
    must_ok("CHECK after the rebind", s.op(OP_CHECK, Some(&buf), 0, c))?;
    guest_sees(&buf, &map, c, "after the rebind")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_header_agrees() {
        let text = include_str!("../../importer/importer_proto.h");
        let def = |k: &str| -> u64 {
            text.lines()
                .find_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    (w.len() >= 3 && w[0] == "#define" && w[1] == k).then(|| w[2].parse().unwrap())
                })
                .unwrap()
        };
        assert_eq!(def("DMAHEAP_IMP_OP_CHECK"), u64::from(OP_CHECK));
        assert_eq!(def("DMAHEAP_IMP_OP_HOLD"), u64::from(OP_HOLD));
        assert_eq!(def("DMAHEAP_IMP_OP_CHECK_HELD"), u64::from(OP_CHECK_HELD));
        assert_eq!(def("DMAHEAP_IMP_OP_RELEASE"), u64::from(OP_RELEASE));
        assert_eq!(def("DMAHEAP_IMP_OP_LOOKUP_ONLY"), u64::from(OP_LOOKUP_ONLY));
        assert_eq!(def("DMAHEAP_IMP_RESP_SIZE"), RESP_SIZE as u64);
        assert_eq!(def("DMAHEAP_SHARING_RUN_SIZE"), RUN_SIZE as u64);
        assert!(text.contains("_IOWR('S', 0x38, struct dmaheap_sharing_run)"));
        assert_eq!(IOC_RUN, 0xc058_5338);
    }
}
