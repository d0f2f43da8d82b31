//! Host-side benchmarks of vhost-user-dmaheap (P1, P1b, P3, P5 of bench/README.md).
//!
//! The real daemon runs as a child process (release build: `cargo bench` builds it with the
//! bench profile, which inherits `release`); the in-process vhost-user front end of the
//! integration tests (the `testkit/` crate) drives it the way QEMU does, including the
//! real SHMEM_MAP of every host allocation into the front end's window and the
//! ADD_MEM_REG / REM_MEM_REG that QEMU pushes back into the daemon's memory table.
//! The baseline allocates the same buffer from the same host provider (a sealed memfd,
//! exactly as `host/memfd.rs` does) in this process.
//!
//!     cargo bench -p vhost-user-dmaheap --bench dmaheap -- [--quick] [--out FILE.json]
//!
//! Normally run through `bench/run`, which also runs the in-guest part and plots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dmaheap_testkit as common;

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{
    free_req, Buffer, Daemon, FrontEnd, Seg, F_BATCH, F_SESSION, F_SYNC, RESP_HDR_SIZE, S_OK,
};
use serde_json::{json, Value};

const PAGE: u64 = 4096;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// How long and how often one measured case runs.
#[derive(Debug, Clone, Copy)]
struct Budget {
    time: Duration,
    min_iters: usize,
    max_iters: usize,
}

#[derive(Debug)]
struct Opts {
    quick: bool,
    out: Option<String>,
    /// `--loop SIZE SECONDS fresh|recycled[-async]|batch|stream`: only alloc/free in a loop (to attach a
    /// profiler to the daemon, whose pid is printed).
    profile: Option<(u64, u64, String)>,
}

fn parse_opts() -> Opts {
    let mut opts = Opts {
        quick: false,
        out: None,
        profile: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--out" => opts.out = args.next(),
            "--loop" => {
                let size = args.next().and_then(|v| v.parse().ok()).unwrap_or(MIB);
                let secs = args.next().and_then(|v| v.parse().ok()).unwrap_or(10);
                let mode = args.next().unwrap_or_default();
                opts.profile = Some((size, secs, mode));
            }
            // cargo bench passes --bench to harness=false targets.
            "--bench" => {}
            other => {
                eprintln!(
                    "usage: dmaheap [--quick] [--out FILE.json] | --loop SIZE SECONDS \
                     fresh|recycled[-async]|batch|stream (unknown: {other})"
                );
                std::process::exit(2);
            }
        }
    }
    opts
}

/// Median, p99 and friends of a sample set, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Summary {
    n: usize,
    median: f64,
    p99: f64,
    min: f64,
    mean: f64,
}

impl Summary {
    fn of(samples: &[Duration]) -> Summary {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let n = us.len();
        assert!(n > 0, "no samples");
        // Nearest-rank percentiles.
        let rank = |p: f64| us[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Summary {
            n,
            median: rank(0.5),
            p99: rank(0.99),
            min: us[0],
            mean: us.iter().sum::<f64>() / n as f64,
        }
    }

    fn json(&self) -> Value {
        json!({
            "n": self.n,
            "median_us": round3(self.median),
            "p99_us": round3(self.p99),
            "min_us": round3(self.min),
            "mean_us": round3(self.mean),
        })
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1000.0).round() / 1000.0
    } else {
        f64::NAN
    }
}

/// Runs the cases round-robin (one iteration of each per round, rotating the order, so a
/// burst of noise from other processes hits every case alike) until the budget is spent.
/// Each case returns the duration of its measured part.
fn interleaved(budget: Budget, cases: &mut [&mut dyn FnMut() -> Duration]) -> Vec<Summary> {
    let k = cases.len();
    // Warm-up: two rounds, not recorded.
    for _ in 0..2 {
        for c in cases.iter_mut() {
            c();
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); k];
    let start = Instant::now();
    let mut round = 0usize;
    while round < budget.max_iters && (round < budget.min_iters || start.elapsed() < budget.time) {
        for j in 0..k {
            let i = (round + j) % k;
            samples[i].push(cases[i]());
        }
        round += 1;
    }
    samples.iter().map(|s| Summary::of(s)).collect()
}

// ----------------------------------------------------------------------------------------
// The direct path: the host provider (memfd) in this process.

/// A sealed-size memfd of `len` bytes, as `host::new_memfd` makes it.
fn memfd_alloc(len: u64) -> libc::c_int {
    // SAFETY: plain syscalls on a fresh fd with a valid C string; results are checked.
    unsafe {
        let fd = libc::memfd_create(
            c"dmaheap-bench".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0, "ftruncate");
        assert_eq!(
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
            ),
            0,
            "F_ADD_SEALS"
        );
        fd
    }
}

fn mmap_shared(fd: libc::c_int, len: u64) -> *mut u8 {
    // SAFETY: maps a fresh shared mapping of our own fd; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p.cast()
}

/// Writes one byte in every page of `[p, p + len)`.
///
/// # Safety
/// The range must be mapped writable and not aliased by any Rust reference.
unsafe fn touch(p: *mut u8, len: u64) {
    let mut off = 0;
    while off < len {
        // SAFETY: inside the range the caller vouches for.
        unsafe { std::ptr::write_volatile(p.add(off as usize), 1) };
        off += PAGE;
    }
}

/// Direct: memfd + mmap (+ touch) + munmap + close.
fn direct_once(len: u64, do_touch: bool) -> Duration {
    let t = Instant::now();
    let fd = memfd_alloc(len);
    let p = mmap_shared(fd, len);
    if do_touch {
        // SAFETY: p is our fresh RW mapping of len bytes.
        unsafe { touch(p, len) };
    }
    // SAFETY: unmapping and closing what we just created.
    unsafe {
        libc::munmap(p.cast(), len as usize);
        libc::close(fd);
    }
    t.elapsed()
}

/// Floor: a fresh anonymous mapping, every byte zeroed with memset (the page faults and
/// the kernel's zeroing of each new page included), unmapped.
fn floor_fresh_once(len: u64) -> Duration {
    let t = Instant::now();
    // SAFETY: a fresh anonymous mapping; checked; written only inside its length.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::write_bytes(black_box(p.cast::<u8>()), 0, len as usize);
        libc::munmap(black_box(p), len as usize);
    }
    t.elapsed()
}

/// A pre-faulted buffer for the warm memset floor (pure store bandwidth).
struct Warm {
    p: *mut u8,
    len: usize,
}

impl Warm {
    fn new(len: u64) -> Warm {
        // SAFETY: a fresh anonymous mapping, checked, then filled inside its length.
        let p = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            std::ptr::write_bytes(p.cast::<u8>(), 1, len as usize);
            p.cast::<u8>()
        };
        Warm {
            p,
            len: len as usize,
        }
    }

    fn memset(&self, len: u64) -> Duration {
        assert!(len as usize <= self.len);
        let t = Instant::now();
        // SAFETY: inside our own mapping.
        unsafe { std::ptr::write_bytes(black_box(self.p), 0, len as usize) };
        black_box(self.p);
        t.elapsed()
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.p.cast(), self.len) };
    }
}

// ----------------------------------------------------------------------------------------
// The daemon path.

fn spawn_daemon(extra: &[&str]) -> Daemon {
    let mut args = vec!["--heap", "system=memfd"];
    args.extend_from_slice(extra);
    let d = Daemon::builder().no_control_debug().args(args).spawn();
    d.wait_ready();
    d
}

/// Host address of a buffer in the front end's window (QEMU's BAR 4 stand-in).
fn window_ptr(fe: &FrontEnd, b: &Buffer) -> *mut u8 {
    fe.shm().region_info(b.offset, b.len, 0, -1).userspace_addr as *mut u8
}

/// How long the guest driver spins for an answer before it sleeps (its `spin_us`
/// default); the front end does the same, and leaves out kicks while the daemon polls.
const DRIVER_SPIN: Duration = Duration::from_micros(50);

/// A front end and the FREE requests it sent without waiting (as the guest driver does).
struct Dev {
    fe: FrontEnd,
    pending: Vec<u16>,
}

impl Dev {
    fn new(daemon: &Daemon) -> Dev {
        // Like the driver: a session (which sets the device's spare delay to the driver's
        // 1 s, spec A.5), the spin and the kicks.
        let mut fe = FrontEnd::connect_acking(daemon, F_SYNC | F_BATCH | F_SESSION);
        fe.open_session(0)
            .unwrap_or_else(|s| panic!("SESSION_OPEN: status {s}"));
        fe.behave_like_driver(DRIVER_SPIN);
        Dev {
            fe,
            pending: Vec::new(),
        }
    }

    /// Collects FREE completions; with `wait`, waits for all of them.
    fn reap(&mut self, wait: bool) {
        let fe = &mut self.fe;
        self.pending.retain(|&h| {
            let c = if wait {
                Some(fe.wait(h))
            } else {
                fe.try_complete(h)
            };
            match c {
                Some(c) => {
                    assert_eq!(FrontEnd::status_of(&c, "FREE"), S_OK, "async FREE");
                    false
                }
                None => true,
            }
        });
    }
}

/// Daemon: ALLOC (the daemon allocates, SHMEM_MAPs if it needs a new mapping and answers)
/// (+ touch through the window) + FREE, each request waited for.
fn daemon_once(dev: &mut Dev, len: u64, do_touch: bool) -> Duration {
    dev.reap(true);
    let fe = &mut dev.fe;
    let t = Instant::now();
    let b = fe.alloc_ok(0, len);
    if do_touch {
        let p = window_ptr(fe, &b);
        // SAFETY: the daemon answers ALLOC only after the front end acknowledged the
        // SHMEM_MAP covering [offset, offset + len) (writable); it stays mapped until FREE.
        unsafe { touch(p, len) };
    }
    fe.free_ok(b.id);
    t.elapsed()
}

/// Like the guest driver: ALLOC waited for, FREE queued and kicked but not waited for
/// (its processing delays the next request instead).
fn daemon_once_async_free(dev: &mut Dev, len: u64) -> Duration {
    dev.reap(false);
    let t = Instant::now();
    let b = dev.fe.alloc_ok(0, len);
    let h = dev
        .fe
        .submit(&[Seg::R(free_req(b.id)), Seg::W(RESP_HDR_SIZE as u32)]);
    dev.fe.kick();
    let d = t.elapsed();
    dev.pending.push(h);
    d
}

fn vm_status(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn human(len: u64) -> String {
    if len >= MIB {
        format!("{}M", len / MIB)
    } else {
        format!("{}K", len / KIB)
    }
}

// ----------------------------------------------------------------------------------------
// P1 + P1b

/// Buffers per ALLOC_BATCH in the batched case (the spec's maximum).
const BATCH: u32 = 16;

/// Like the guest driver with ALLOC_BATCH: one request allocates `BATCH` buffers, each is
/// freed with a FREE not waited for; the time per buffer.
fn daemon_batch_once(dev: &mut Dev, len: u64) -> Duration {
    // Collect every earlier FREE first: their descriptor heads must not be reused while a
    // completion of theirs is still to be matched.
    dev.reap(true);
    let t = Instant::now();
    let bufs = dev
        .fe
        .alloc_batch(0, BATCH, len)
        .unwrap_or_else(|s| panic!("ALLOC_BATCH of {len:#x}: status {s}"));
    for b in &bufs {
        let h = dev
            .fe
            .submit(&[Seg::R(free_req(b.id)), Seg::W(RESP_HDR_SIZE as u32)]);
        dev.pending.push(h);
    }
    dev.fe.kick();
    let d = t.elapsed() / u32::try_from(bufs.len()).unwrap_or(1);
    // The queue has 256 descriptors: do not let FREEs pile up past it.
    dev.reap(true);
    d
}

/// Like the guest driver allocating one buffer after another (e.g. a pipeline filling its
/// buffer queue): `BATCH` recycled ALLOCs back to back, each FREE not waited for; the time
/// per buffer. The first ALLOC of a stream finds the daemon asleep; the ones after it find
/// it polling the ring.
fn daemon_stream_once(dev: &mut Dev, len: u64) -> Duration {
    dev.reap(true);
    let t = Instant::now();
    for _ in 0..BATCH {
        dev.reap(false);
        let b = dev.fe.alloc_ok(0, len);
        let h = dev
            .fe
            .submit(&[Seg::R(free_req(b.id)), Seg::W(RESP_HDR_SIZE as u32)]);
        dev.fe.kick();
        dev.pending.push(h);
    }
    let d = t.elapsed() / BATCH;
    dev.reap(true);
    d
}

fn bench_p1(quick: bool) -> Value {
    let sizes: Vec<u64> = if quick {
        vec![4 * KIB, 64 * KIB, MIB, 8 * MIB, 64 * MIB]
    } else {
        vec![
            4 * KIB,
            16 * KIB,
            64 * KIB,
            256 * KIB,
            MIB,
            2 * MIB,
            4 * MIB,
            8 * MIB,
            16 * MIB,
            32 * MIB,
            64 * MIB,
        ]
    };
    let budget = if quick {
        Budget {
            time: Duration::from_millis(200),
            min_iters: 10,
            max_iters: 200,
        }
    } else {
        Budget {
            time: Duration::from_millis(1500),
            min_iters: 30,
            max_iters: 2000,
        }
    };
    let warm = Warm::new(*sizes.iter().max().unwrap());
    let mut rows = Vec::new();
    for &len in &sizes {
        // Fresh path: no other live buffer, so the daemon gives every mapping back when
        // the buffer is freed and the next ALLOC starts from nothing.
        let fresh_daemon = spawn_daemon(&[]);
        let fresh = RefCell::new(Dev::new(&fresh_daemon));
        // Recycled path: a 4 KiB keeper stays live, so the daemon keeps the emptied arena
        // as its spare and the next ALLOC of the same size reuses its range.
        let rec_daemon = spawn_daemon(&[]);
        let rec = RefCell::new(Dev::new(&rec_daemon));
        let keeper = rec.borrow_mut().fe.alloc_ok(0, PAGE);
        // Batched path, on a daemon of its own (its arenas must not change the recycled
        // path's): a keeper too, ALLOC_BATCH of BATCH buffers, each FREE not waited for.
        let bat_daemon = spawn_daemon(&[]);
        let bat = RefCell::new(Dev::new(&bat_daemon));
        let bat_keeper = bat.borrow_mut().fe.alloc_ok(0, PAGE);
        // Streamed path, on a daemon of its own too (its polling window adapts to its own
        // requests only), with a keeper.
        let str_daemon = spawn_daemon(&[]);
        let stream = RefCell::new(Dev::new(&str_daemon));
        let str_keeper = stream.borrow_mut().fe.alloc_ok(0, PAGE);

        let maps_before = (
            fresh.borrow().fe.shm().map_count(),
            rec.borrow().fe.shm().map_count(),
        );
        let (nf, nft, nr, nrt) = (
            Cell::new(0usize),
            Cell::new(0usize),
            Cell::new(0usize),
            Cell::new(0),
        );
        let sums = {
            let mut c_fresh = || {
                nf.set(nf.get() + 1);
                daemon_once(&mut fresh.borrow_mut(), len, false)
            };
            let mut c_direct = || direct_once(len, false);
            let mut c_floor = || floor_fresh_once(len);
            let mut c_warm = || warm.memset(len);
            let mut c_rec = || {
                nr.set(nr.get() + 1);
                daemon_once(&mut rec.borrow_mut(), len, false)
            };
            let mut c_fresh_t = || {
                nft.set(nft.get() + 1);
                daemon_once(&mut fresh.borrow_mut(), len, true)
            };
            let mut c_direct_t = || direct_once(len, true);
            let mut c_rec_t = || {
                nrt.set(nrt.get() + 1);
                daemon_once(&mut rec.borrow_mut(), len, true)
            };
            let mut c_fresh_a = || {
                nf.set(nf.get() + 1);
                daemon_once_async_free(&mut fresh.borrow_mut(), len)
            };
            let mut c_rec_a = || {
                nr.set(nr.get() + 1);
                daemon_once_async_free(&mut rec.borrow_mut(), len)
            };
            let mut c_rec_b = || daemon_batch_once(&mut bat.borrow_mut(), len);
            let mut c_rec_s = || daemon_stream_once(&mut stream.borrow_mut(), len);
            interleaved(
                budget,
                &mut [
                    &mut c_fresh,
                    &mut c_direct,
                    &mut c_floor,
                    &mut c_warm,
                    &mut c_rec,
                    &mut c_fresh_t,
                    &mut c_direct_t,
                    &mut c_rec_t,
                    &mut c_fresh_a,
                    &mut c_rec_a,
                    &mut c_rec_b,
                    &mut c_rec_s,
                ],
            )
        };
        let mut bat = bat.into_inner();
        bat.reap(true);
        bat.fe.free_ok(bat_keeper.id);
        bat.fe.assert_no_violations();
        drop(bat);
        drop(bat_daemon);
        let mut stream = stream.into_inner();
        stream.reap(true);
        stream.fe.free_ok(str_keeper.id);
        stream.fe.assert_no_violations();
        drop(stream);
        drop(str_daemon);
        let (mut fresh, mut rec) = (fresh.into_inner(), rec.into_inner());
        fresh.reap(true);
        rec.reap(true);
        let (fresh, rec) = (fresh.fe, rec.fe);
        let fresh_maps = fresh.shm().map_count() - maps_before.0;
        let rec_maps = rec.shm().map_count() - maps_before.1;
        let fresh_maps_per_alloc = fresh_maps as f64 / (nf.get() + nft.get()) as f64;
        let rec_maps_per_alloc = rec_maps as f64 / (nr.get() + nrt.get()) as f64;
        let mut rec = rec;
        rec.free_ok(keeper.id);
        fresh.assert_no_violations();
        rec.assert_no_violations();
        drop(fresh);
        drop(rec);
        drop(fresh_daemon);
        drop(rec_daemon);

        let [d, direct, floor, warm_s, r, dt, directt, rt, da, ra, rb, rs] = sums[..] else {
            unreachable!()
        };
        eprintln!(
            "P1 {:>4}: daemon {:9.1} us (p99 {:9.1}) direct {:9.1} us (p99 {:9.1}) ratio {:.2} | \
             recycled {:9.1} us ratio {:.2} | touch: daemon {:9.1} direct {:9.1} floor {:9.1} \
             (n={})",
            human(len),
            d.median,
            d.p99,
            direct.median,
            direct.p99,
            d.median / direct.median,
            r.median,
            r.median / direct.median,
            dt.median,
            directt.median,
            floor.median,
            d.n
        );
        rows.push(json!({
            "size": len,
            "size_h": human(len),
            "daemon": d.json(),
            "direct": direct.json(),
            "ratio_median": ratio(d.median, direct.median),
            "ratio_p99": ratio(d.p99, direct.p99),
            "recycled": r.json(),
            "recycled_ratio_median": ratio(r.median, direct.median),
            "recycled_ratio_p99": ratio(r.p99, direct.p99),
            "daemon_async_free": da.json(),
            "async_ratio_median": ratio(da.median, direct.median),
            "recycled_async_free": ra.json(),
            "recycled_async_ratio_median": ratio(ra.median, direct.median),
            "recycled_batch": rb.json(),
            "recycled_batch_ratio_median": ratio(rb.median, direct.median),
            "recycled_stream": rs.json(),
            "recycled_stream_ratio_median": ratio(rs.median, direct.median),
            "batch": BATCH,
            "daemon_touch": dt.json(),
            "direct_touch": directt.json(),
            "recycled_touch": rt.json(),
            "touch_ratio_median": ratio(dt.median, directt.median),
            "recycled_touch_ratio_median": ratio(rt.median, directt.median),
            "floor_fresh_memset": floor.json(),
            "floor_warm_memset": warm_s.json(),
            "shmem_maps_per_alloc_fresh": round3(fresh_maps_per_alloc),
            "shmem_maps_per_alloc_recycled": round3(rec_maps_per_alloc),
        }));
    }
    Value::Array(rows)
}

// ----------------------------------------------------------------------------------------
// P3 + P5

/// The kernel's seccomp audit record for `pid`, if the daemon was killed by its filter.
fn seccomp_audit(pid: u32) -> Option<String> {
    let out = std::process::Command::new("dmesg").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let needle = format!(" pid={pid} ");
    text.lines()
        .rev()
        .find(|l| l.contains("type=1326") && l.contains(&needle))
        .map(|l| l.trim().to_owned())
}

fn bench_p3(quick: bool) -> Value {
    let reached = std::sync::atomic::AtomicU64::new(0);
    let daemon = spawn_daemon(&[]);
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        p3_levels(&daemon, quick, &reached)
    }));
    match first {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            let exited = daemon.has_exited();
            let audit = seccomp_audit(daemon.pid());
            let live = reached.load(std::sync::atomic::Ordering::Relaxed);
            drop(daemon);
            eprintln!(
                "P3: the daemon stopped answering at {live} live buffers (exited: {exited}; \
                 seccomp audit: {audit:?}); measuring again with --seccomp log"
            );
            let daemon = spawn_daemon(&["--seccomp", "log"]);
            let again = std::sync::atomic::AtomicU64::new(0);
            let mut v = p3_levels(&daemon, quick, &again);
            v["seccomp"] = json!("log (the default `on` killed the daemon, see first_attempt)");
            v["first_attempt"] = json!({
                "live_reached": live,
                "daemon_exited": exited,
                "seccomp_audit": audit,
                "panic": msg,
            });
            v
        }
    }
}

fn p3_levels(daemon: &Daemon, quick: bool, reached: &std::sync::atomic::AtomicU64) -> Value {
    let levels: Vec<u64> = if quick {
        vec![1, 100, 1000, 10_000]
    } else {
        vec![1, 100, 1000, 10_000, 65_536, 262_143]
    };
    let iters = if quick { 300 } else { 3000 };
    let small = PAGE;
    let pid = daemon.pid();
    let mut fe = FrontEnd::connect(daemon);
    let max_buffers = u64::from(fe.config.max_buffers);
    let max_mappings = fe.max_mem_slots;
    let (rss0, anon0) = vm_status(pid);
    let mut live: Vec<u64> = Vec::new();
    let mut rows = Vec::new();
    let mut stop = Value::Null;
    let t_all = Instant::now();
    for &n in &levels {
        let t_fill = Instant::now();
        let from = live.len() as u64;
        let mut failed = None;
        while (live.len() as u64) < n {
            match fe.alloc(0, small) {
                Ok(b) => {
                    live.push(b.id);
                    reached.store(live.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(s) => {
                    failed = Some(s);
                    break;
                }
            }
        }
        let fill = t_fill.elapsed();
        if let Some(s) = failed {
            stop = json!({
                "live": live.len(),
                "wanted": n,
                "status": common::status_name(s),
            });
            eprintln!(
                "P3: stopped at {} live buffers: {}",
                live.len(),
                common::status_name(s)
            );
            break;
        }
        // Latency of one more alloc + free of a small buffer with n live.
        let mut samples = Vec::with_capacity(iters);
        let mut alloc_only = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            let b = fe.alloc_ok(0, small);
            let ta = t.elapsed();
            let st = fe.free(b.id);
            samples.push(t.elapsed());
            alloc_only.push(ta);
            assert_eq!(st, S_OK);
        }
        let s = Summary::of(&samples);
        let sa = Summary::of(&alloc_only);
        let (rss, anon) = vm_status(pid);
        let stats = daemon.stats();
        let added = (n - from).max(1);
        let per_buf_rss = (rss.saturating_sub(rss0) * 1024) as f64 / n as f64;
        let per_buf_anon = (anon.saturating_sub(anon0) * 1024) as f64 / n as f64;
        eprintln!(
            "P3 {n:>6} live: alloc+free median {:7.1} us p99 {:7.1} us; fill {:.1} us/buffer; \
             mappings {}; daemon VmRSS +{} KiB RssAnon +{} KiB ({:.0} B/buffer anon)",
            s.median,
            s.p99,
            fill.as_secs_f64() * 1e6 / added as f64,
            stats.total.mappings,
            rss.saturating_sub(rss0),
            anon.saturating_sub(anon0),
            per_buf_anon
        );
        rows.push(json!({
            "live": n,
            "alloc_free": s.json(),
            "alloc": sa.json(),
            "fill_us_per_buffer": round3(fill.as_secs_f64() * 1e6 / added as f64),
            "mappings": stats.total.mappings,
            "daemon_vmrss_kib": rss,
            "daemon_rssanon_kib": anon,
            "rss_per_buffer_bytes": round3(per_buf_rss),
            "rssanon_per_buffer_bytes": round3(per_buf_anon),
        }));
    }
    // Where does it stop? Keep allocating past the last level (up to the daemon's
    // max_buffers and one more) until the daemon refuses.
    if stop.is_null() && !quick {
        while live.len() as u64 <= max_buffers {
            match fe.alloc(0, small) {
                Ok(b) => live.push(b.id),
                Err(s) => {
                    stop = json!({
                        "live": live.len(),
                        "wanted": live.len() + 1,
                        "status": common::status_name(s),
                    });
                    break;
                }
            }
        }
        eprintln!("P3: stops at {stop}");
    }
    let total = t_all.elapsed();
    for id in live.drain(..) {
        fe.free_ok(id);
    }
    fe.assert_no_violations();
    drop(fe);
    json!({
        "seccomp": "on (default)",
        "buffer_size": small,
        "levels": rows,
        "stop": stop,
        "max_buffers": max_buffers,
        "daemon_max_mem_slots": max_mappings,
        "baseline_vmrss_kib": rss0,
        "baseline_rssanon_kib": anon0,
        "seconds": round3(total.as_secs_f64()),
    })
}

fn profile_loop(size: u64, secs: u64, mode: &str) {
    let batch = mode == "batch";
    let stream = mode == "stream";
    let recycled = batch || stream || mode.starts_with("recycled");
    let async_free = mode.ends_with("async");
    let daemon = spawn_daemon(&[]);
    let mut dev = Dev::new(&daemon);
    let keeper = recycled.then(|| dev.fe.alloc_ok(0, PAGE));
    println!("daemon pid {}", daemon.pid());
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        samples.push(if batch {
            daemon_batch_once(&mut dev, size)
        } else if stream {
            daemon_stream_once(&mut dev, size)
        } else if async_free {
            daemon_once_async_free(&mut dev, size)
        } else {
            daemon_once(&mut dev, size, false)
        });
    }
    dev.reap(true);
    if let Some(k) = keeper {
        dev.fe.free_ok(k.id);
    }
    let s = Summary::of(&samples);
    println!(
        "{} x {} alloc+free ({mode}): median {:.1} us p99 {:.1} us",
        s.n,
        human(size),
        s.median,
        s.p99
    );
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel.trim(),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

fn main() {
    let opts = parse_opts();
    if std::env::var_os("RUST_LOG").is_none() {
        // The test support starts the daemon with RUST_LOG=debug unless told otherwise:
        // per-request debug logging is not what we want to measure.
        std::env::set_var("RUST_LOG", "warn");
    }
    if let Some((size, secs, mode)) = opts.profile {
        profile_loop(size, secs, &mode);
        return;
    }
    let t = Instant::now();
    let machine = machine();
    let p1 = bench_p1(opts.quick);
    let p3 = bench_p3(opts.quick);
    let out = json!({
        "quick": opts.quick,
        "machine": machine,
        "p1": p1,
        "p3": p3,
        "seconds": round3(t.elapsed().as_secs_f64()),
    });
    let text = serde_json::to_string_pretty(&out).unwrap();
    match opts.out {
        Some(path) => std::fs::write(&path, text + "\n").unwrap(),
        None => println!("{text}"),
    }
}
