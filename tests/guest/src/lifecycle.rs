// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM life cycle as users put VMs through it: pause and resume (QMP stop/cont), guest
//! suspend to idle, driver unbind and bind, reboot, and a host reset of the VM. Each case
//! holds buffers of every kind the device treats differently (small ones in arenas, large
//! ones with a mapping of their own), mapped and written, and checks the bytes in the guest
//! and on the host, the daemon's records, and that nothing leaks.
//!
//! They need run-guest's lifecycle set-up (tests/guest/suite lifecycle): --qmp,
//! --allow-reboot, --kmod button, the tests/lifecycle/host-actions hooks and the importer
//! module.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cases::{heap_has_feature, Ctx, ParamGuard};
use crate::env::{self, Overview};
use crate::host;
use crate::sys::{self, errname, Buf, Heap, Map};

/// Small (one page, in an arena), arena-sized, and large enough for a mapping of its own.
fn sizes() -> [usize; 4] {
    [sys::page(), 64 << 10, 2 << 20, 16 << 20]
}
const IMPORTER: &str = "/sys/module/dmaheap_importer/parameters";

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn open_heap(ctx: &Ctx) -> Result<Heap, String> {
    Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))
}

/// A mapped buffer holding a random tag at 0 and a pattern after it, found on the host.
struct Held {
    buf: Buf,
    map: Map,
    seed: u64,
    tag: Vec<u8>,
    host: host::HostBuf,
}

impl Held {
    fn new(heap: &Heap, len: usize) -> Result<Held, String> {
        let buf = heap.alloc(len)?;
        let map = buf.mmap()?;
        let seed = u64::from_le_bytes(sys::random_bytes(8).try_into().unwrap_or([7; 8]));
        map.fill(seed);
        let tag = sys::random_bytes(16);
        map.write(0, &tag);
        let host = host::find_buffer(&tag, len)?;
        Ok(Held {
            buf,
            map,
            seed,
            tag,
            host,
        })
    }

    /// The guest's bytes are still there, and the host has the same bytes.
    fn check(&self, what: &str) -> Result<(), String> {
        let len = self.buf.len;
        let err = |m: String| format!("{what}: {len}-byte buffer {}: {m}", self.host.id);
        check(self.map.read_vec(0, 16) == self.tag, || {
            err("tag lost".into())
        })?;
        // Skip the tag's two pattern words.
        let bytes = self.map.read_vec(16, len - 16);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let want = sys::pattern(self.seed, i as u64 + 2).to_le_bytes();
            if chunk != &want[..chunk.len()] {
                return Err(err(format!("guest bytes differ at {}", 16 + i * 8)));
            }
        }
        for off in [0, len / 2, len - 64] {
            host::expect(&self.host.id, off, &self.map.read_vec(off, 64)).map_err(err)?;
        }
        Ok(())
    }
}

fn hold_all(heap: &Heap) -> Result<Vec<Held>, String> {
    sizes()
        .into_iter()
        .map(|len| Held::new(heap, len))
        .collect()
}

fn check_all(held: &[Held], what: &str) -> Result<(), String> {
    held.iter().try_for_each(|h| h.check(what))
}

/// Threads that allocate, map, check, write and free in a loop: requests in flight at
/// any moment.
struct Churn {
    stop: Arc<AtomicBool>,
    /// Buffers each thread went through so far.
    done: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<Result<u64, String>>>,
}

impl Churn {
    fn start(heap_name: &str, sizes: &[usize]) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let done: Vec<_> = sizes.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let threads = sizes
            .iter()
            .zip(&done)
            .map(|(&len, done)| {
                let (stop, done, name) = (stop.clone(), done.clone(), heap_name.to_string());
                std::thread::spawn(move || -> Result<u64, String> {
                    let heap = Heap::open(&name).map_err(|e| format!("open: {e}"))?;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let b = heap
                            .alloc(len)
                            .map_err(|e| format!("{len}: after {n}: {e}"))?;
                        let m = b.mmap()?;
                        let edges = [m.read_vec(0, 8), m.read_vec(len - 8, 8)];
                        if edges.iter().any(|e| e.iter().any(|&x| x != 0)) {
                            return Err(format!("{len}: buffer {n} not zeroed"));
                        }
                        m.write(0, &n.to_le_bytes());
                        m.write(len - 8, &n.to_le_bytes());
                        if m.read_vec(len - 8, 8) != n.to_le_bytes() {
                            return Err(format!("{len}: buffer {n} lost a write"));
                        }
                        n += 1;
                        done.store(n, Ordering::Relaxed);
                    }
                    Ok(n)
                })
            })
            .collect();
        Churn {
            stop,
            done,
            threads,
        }
    }

    /// Waits until every thread went through `n` buffers. Until then a large buffer may
    /// need a new host mapping; afterwards the daemon reuses the freed ones. A mapping
    /// message that QEMU 11.1.3 reads after a pause stopped the device crashes it (spec
    /// A.5): the pauses must meet the steady state, not the first allocations.
    fn warm_up(&self, n: u64) -> Result<(), String> {
        env::wait_until(
            "the allocating threads to get going",
            Duration::from_secs(60),
            || Ok(self.done.iter().all(|d| d.load(Ordering::Relaxed) >= n)),
        )
    }

    /// Stops the threads; the number of buffers they went through.
    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.threads {
            total += t.join().map_err(|_| "a churn thread panicked")??;
        }
        Ok(total)
    }
}

/// Waits until the daemon holds exactly `buffers` buffers; its overview then.
fn daemon_holds(buffers: u64) -> Result<Overview, String> {
    let mut last = Overview::default();
    env::wait_until(
        &format!("the daemon to hold {buffers} buffers"),
        Duration::from_secs(20),
        || {
            last = env::daemon_overview()?;
            Ok(last.buffers == buffers)
        },
    )
    .map_err(|e| format!("{e}: last {last:?}"))?;
    Ok(last)
}

/// Allocation works, buffers are zeroed and the host sees the guest's writes.
fn allocation_works(heap: &Heap) -> Result<(), String> {
    for len in [sys::page(), 16 << 20] {
        let b = heap.alloc(len)?;
        let m = b.mmap()?;
        check(m.as_slice().iter().all(|&x| x == 0), || {
            format!("a new {len}-byte buffer is not zeroed")
        })?;
        let tag = sys::random_bytes(16);
        m.write(0, &tag);
        let hb = host::find_buffer(&tag, len)?;
        host::expect(&hb.id, 0, &tag)?;
    }
    Ok(())
}

fn the_end(held: Vec<Held>, base: u64) -> Result<(), String> {
    drop(held);
    let o = daemon_holds(base)?;
    check(o.session == "open", || {
        format!("session {:?} at the end", o.session)
    })
}

pub fn pause_resume(ctx: &Ctx) -> Result<(), String> {
    let heap = open_heap(ctx)?;
    let base = env::daemon_overview()?.buffers;
    let held = hold_all(&heap)?;
    let churn = Churn::start(&ctx.heap, &[sys::page(), 16 << 20]);
    if let Err(e) = churn.warm_up(4) {
        return Err(format!("{e}; the threads: {:?}", churn.finish()));
    }
    let out = host::call(&["pause-resume", "6", "300"])?;
    print!(
        "{}",
        out.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let n = churn.finish()?;
    check(n > 0, || "no allocation went through".into())?;
    eprintln!("  pause-resume: {n} buffers allocated and freed around 6 pauses");
    check_all(&held, "after the pauses")?;
    daemon_holds(base + held.len() as u64)?;
    allocation_works(&heap)?;
    the_end(held, base)
}

/// Enables the ACPI power button as a wake-up source (run-guest --kmod button).
fn arm_power_button() -> Result<(), String> {
    let dir = std::fs::read_dir("/sys/devices/platform")
        .map_err(|e| format!("/sys/devices/platform: {e}"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("LNXPWRBN"))
        .ok_or("no ACPI power button (run-guest --kmod button)")?;
    std::fs::write(dir.join("power/wakeup"), "enabled")
        .map_err(|e| format!("enable wake-up of {}: {e}", dir.display()))
}

fn dmesg() -> String {
    std::process::Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The RTC alarm that wakes an arm64 guest (QEMU virt's PL031; there is no ACPI).
const RTC_WAKEALARM: &str = "/sys/class/rtc/rtc0/wakealarm";

/// Suspends the guest (`freeze`: to idle, woken by the host pressing the power button, or
/// on arm64 by the RTC alarm; `mem`: to RAM, woken by QMP system_wakeup) and waits until it
/// runs again.
fn suspend(state: &str) -> Result<(), String> {
    let rtc = cfg!(target_arch = "aarch64");
    let (wake, stop) = match state {
        "freeze" => (["wake-presses", "start"], Some(["wake-presses", "stop"])),
        _ => (["s3-wake", "start"], None),
    };
    let mut last = String::new();
    for attempt in 0..5 {
        // A wake event while the kernel is entering suspend aborts it: then again.
        if rtc {
            std::fs::write(RTC_WAKEALARM, "0")
                .and_then(|()| std::fs::write(RTC_WAKEALARM, "+5"))
                .map_err(|e| format!("{RTC_WAKEALARM}: {e}"))?;
        } else {
            host::call(&wake)?;
        }
        let t0 = Instant::now();
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open("/sys/power/state")
            .and_then(|mut f| f.write_all(state.as_bytes()));
        // The hook port is dead after a suspend (virtio-serial): reconnect it first.
        host::reconnect()?;
        if let (false, Some(stop)) = (rtc, stop) {
            host::call(&stop)?;
        }
        match r {
            Ok(()) => {
                eprintln!(
                    "  suspend {state}: suspended and woken{} in {:.1?} (attempt {attempt})",
                    if rtc { " by the RTC" } else { "" },
                    t0.elapsed()
                );
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("suspend {state} failed 5 times: {last}"))
}

pub fn suspend_to_idle(ctx: &Ctx) -> Result<(), String> {
    if !cfg!(target_arch = "aarch64") {
        arm_power_button()?;
    }
    suspend_case(ctx, "freeze")
}

pub fn suspend_to_ram(ctx: &Ctx) -> Result<(), String> {
    // Without `deep`, `mem` is suspend to idle again (QEMU's arm64 virt machine).
    let modes = std::fs::read_to_string("/sys/power/mem_sleep").unwrap_or_default();
    check(modes.contains("deep"), || {
        format!(
            "no suspend to RAM here: /sys/power/mem_sleep is {:?}",
            modes.trim()
        )
    })?;
    suspend_case(ctx, "mem")
}

/// Buffers held and in flight survive a guest suspend in `state`.
fn suspend_case(ctx: &Ctx, state: &str) -> Result<(), String> {
    let heap = open_heap(ctx)?;
    let base = env::daemon_overview()?.buffers;
    let held = hold_all(&heap)?;
    let churn = Churn::start(&ctx.heap, &[sys::page(), 16 << 20]);
    let resumed_before = dmesg().matches("session resumed").count();
    suspend(state)?;
    let n = churn.finish()?;
    eprintln!("  suspend {state}: {n} buffers allocated and freed around the suspend");
    let resumed = dmesg().matches("session resumed").count();
    check(resumed == resumed_before + 1, || {
        format!(
            "the driver did not resume its session ({resumed_before} -> {resumed}); dmesg:\n{}",
            dmesg()
                .lines()
                .filter(|l| l.contains("dmaheap") || l.contains("PM:"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    check_all(&held, "after the suspend")?;
    let o = daemon_holds(base + held.len() as u64)?;
    check(o.session == "open", || format!("session {:?}", o.session))?;
    allocation_works(&heap)?;
    the_end(held, base)
}

/// The virtio device a heap belongs to: `virtioN`.
fn device_of(heap: &str) -> Result<String, String> {
    let dir = env::sysfs_heap(heap)?.dir;
    dir.parent()
        .and_then(|p| p.parent())
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| "no device directory above the heap's sysfs directory".into())
}

/// Reading the first byte of `map` in a child process: killed by SIGBUS?
fn read_gets_sigbus(map: &Map) -> Result<bool, String> {
    let pid = sys::fork_child(|| {
        let mut b = [0u8];
        map.read(0, &mut b);
        i32::from(b[0] == 0)
    })?;
    Ok(sys::wait_child(pid)? == 128 + libc::SIGBUS)
}

fn importer(param: &str, value: &str) -> Result<(), String> {
    std::fs::write(format!("{IMPORTER}/{param}"), value)
        .map_err(|e| format!("importer {param}={value}: {e}"))
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

pub fn rebind(ctx: &Ctx) -> Result<(), String> {
    let heap = open_heap(ctx)?;
    let held = hold_all(&heap)?;
    // A kernel user (another driver) keeps a vmap and a DMA mapping of one buffer.
    let kept = Held::new(&heap, 2 << 20)?;
    importer("hold", &kept.buf.raw().to_string())?;
    let kept_range = (kept.host.offset, kept.buf.len as u64);
    let dev = device_of(&ctx.heap)?;

    std::fs::write(format!("{}/unbind", env::DRIVER_DIR), &dev)
        .map_err(|e| format!("unbind {dev}: {e}"))?;
    // The driver closed its session before the reset: nothing left on the host.
    let o = env::daemon_overview()?;
    check(
        o.buffers == 0 && o.mappings == 0 && o.host_bytes == 0 && o.session == "closed",
        || format!("after the unbind the daemon holds {o:?}"),
    )?;
    // Revoked: user mappings fault, nothing maps the buffers again.
    for h in &held {
        check(read_gets_sigbus(&h.map)?, || {
            format!("{}-byte buffer: its old mapping still reads", h.buf.len)
        })?;
    }
    let again = Map::new(
        held[0].buf.raw(),
        sys::page(),
        0,
        libc::PROT_READ,
        libc::MAP_SHARED,
    );
    check(matches!(again, Err(libc::ENODEV)), || {
        format!("mmap of a revoked buffer: {:?}", again.map(|_| ()))
    })?;
    let r = std::fs::write(format!("{IMPORTER}/check"), held[1].buf.raw().to_string());
    // A revoked buffer has no vmap any more: dma_buf_vmap() says EINVAL (an
    // exporter's own vmap failure would WARN).
    check(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EINVAL),
        || format!("a kernel importer could still use a revoked buffer: {r:?}"),
    )?;
    let r = heap.alloc_raw(
        sys::page() as u64,
        (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        0,
    );
    check(matches!(r, Err(libc::ENODEV)), || {
        format!("ALLOC while unbound: {:?}", r.map(|_| ()))
    })?;

    std::fs::write(format!("{}/bind", env::DRIVER_DIR), &dev)
        .map_err(|e| format!("bind {dev}: {e}"))?;
    env::wait_until("the heaps to come back", Duration::from_secs(20), || {
        Ok(env::sysfs_heap(&ctx.heap).is_ok())
    })?;
    // The new session keeps the kept buffer's range out of new buffers.
    let o = env::daemon_overview()?;
    check(
        o.session == "open" && o.reserved_bytes == kept_range.1,
        || {
            format!(
                "after the bind: {o:?}, want {} bytes reserved",
                kept_range.1
            )
        },
    )?;
    let fresh: Vec<Held> = (0..3)
        .flat_map(|_| sizes())
        .map(|len| Held::new(&heap, len))
        .collect::<Result<_, _>>()?;
    for f in &fresh {
        check(!overlaps((f.host.offset, f.host.len), kept_range), || {
            format!(
                "new buffer at {:#x}+{:#x} inside the range a kernel user still maps \
                     ({:#x}+{:#x})",
                f.host.offset, f.host.len, kept_range.0, kept_range.1
            )
        })?;
    }
    // That user keeps writing: no new buffer sees it.
    importer("poke", "0x5a")?;
    for f in &fresh {
        f.check("after an old kernel user wrote its range")?;
    }
    // It lets go: the range is given back.
    importer("release", "1")?;
    let mut last = Overview::default();
    env::wait_until(
        "the reservation to be given back",
        Duration::from_secs(10),
        || {
            last = env::daemon_overview()?;
            Ok(last.reserved_bytes == 0)
        },
    )
    .map_err(|e| format!("{e}: {last:?}"))?;
    allocation_works(&heap)?;
    // Releasing the revoked buffers must not hang.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(held);
        drop(kept);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| "releasing the revoked buffers took more than 30 s".to_string())?;
    let n = fresh.len() as u64;
    daemon_holds(n)?;
    the_end(fresh, 0)
}

/// What a mapping thread kept, how many mmaps succeeded, the last error.
type Mapped = (Vec<Map>, u64, Option<i32>);

/// Unbinds (revokes every buffer) while threads map buffers as fast as they can, a few
/// times: afterwards no mapping made before the revocation maps a page. mmap fills a
/// mapping before the kernel links it where the revocation's zap looks (vdh_mmap.c).
pub fn mmap_revoke(ctx: &Ctx) -> Result<(), String> {
    const ROUNDS: usize = 16;
    const THREADS: usize = 3;
    let heap = open_heap(ctx)?;
    let dev = device_of(&ctx.heap)?;
    for round in 0..ROUNDS {
        let what = |m: String| format!("round {round}: {m}");
        let bufs: Vec<Buf> = (0..THREADS * 4)
            .map(|i| heap.alloc(if i % 2 == 0 { sys::page() } else { 64 << 10 }))
            .collect::<Result<_, _>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mappers: Vec<JoinHandle<Mapped>> = bufs
            .chunks(4)
            .map(|chunk| {
                let fds: Vec<(i32, usize)> = chunk.iter().map(|b| (b.raw(), b.len)).collect();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut kept, mut made, mut refused) = (Vec::new(), 0u64, None);
                    while !stop.load(Ordering::Relaxed) {
                        for &(fd, len) in &fds {
                            let prot = libc::PROT_READ | libc::PROT_WRITE;
                            match Map::new(fd, len, 0, prot, libc::MAP_SHARED) {
                                Ok(m) => {
                                    made += 1;
                                    // The newest ones are the ones that can race.
                                    if kept.len() == 512 {
                                        kept.swap_remove(made as usize % 512);
                                    }
                                    kept.push(m);
                                }
                                Err(e) => refused = Some(e),
                            }
                        }
                    }
                    (kept, made, refused)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        std::fs::write(format!("{}/unbind", env::DRIVER_DIR), &dev)
            .map_err(|e| what(format!("unbind {dev}: {e}")))?;
        std::thread::sleep(Duration::from_millis(10));
        stop.store(true, Ordering::Relaxed);
        let mut present = 0;
        let (mut maps, mut made) = (0, 0);
        for t in mappers {
            let (kept, n, refused) = t.join().map_err(|_| what("a mapper panicked".into()))?;
            check(refused == Some(libc::ENODEV), || {
                what(format!(
                    "after the unbind mmap did not fail with ENODEV: {refused:?}"
                ))
            })?;
            for m in &kept {
                present += m.present_pages()?;
            }
            maps += kept.len();
            made += n;
        }
        check(present == 0, || {
            what(format!(
                "{present} pages still mapped in {maps} mappings made around the revocation"
            ))
        })?;
        check(made > 0, || {
            what("no mmap succeeded before the unbind".into())
        })?;
        std::fs::write(format!("{}/bind", env::DRIVER_DIR), &dev)
            .map_err(|e| what(format!("bind {dev}: {e}")))?;
        env::wait_until("the heaps to come back", Duration::from_secs(20), || {
            Ok(env::sysfs_heap(&ctx.heap).is_ok())
        })?;
    }
    allocation_works(&heap)
}

/// Reboots with buffers held (the shutdown path closes the session); does not return.
pub fn reboot(ctx: &Ctx) -> Result<(), String> {
    let heap = open_heap(ctx)?;
    let held = hold_all(&heap)?;
    daemon_holds(held.len() as u64)?;
    println!("# rebooting with {} buffers held and mapped", held.len());
    let _ = std::io::stdout().flush();
    // SAFETY: reboot(2); the process does not continue if it works.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    Err(format!("reboot: {}", errname(sys::errno())))
}

/// After a reboot or a reset: nothing of before is held, allocation works.
pub fn after_restart(ctx: &Ctx) -> Result<(), String> {
    let o = env::daemon_overview()?;
    check(
        o.buffers == 0 && o.mappings == 0 && o.session == "open",
        || format!("at start the daemon holds {o:?}"),
    )?;
    let heap = open_heap(ctx)?;
    allocation_works(&heap)?;
    let held = hold_all(&heap)?;
    check_all(&held, "new buffers")?;
    the_end(held, 0)
}

/// The host resets the VM (QMP system_reset) with buffers held, after `prepare-reset`;
/// does not return.
pub fn reset(ctx: &Ctx) -> Result<(), String> {
    let heap = open_heap(ctx)?;
    let held = hold_all(&heap)?;
    daemon_holds(held.len() as u64)?;
    println!("# the host resets the VM with {} buffers held", held.len());
    let out = host::call(&["reset-later", "1"])?;
    print!(
        "{}",
        out.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(60));
    Err("the VM was not reset".into())
}

/// Whether the driver logged that the device marks `heap` as needing no SYNC.
pub(crate) fn dmesg_says_no_host_sync(heap: &str) -> Result<bool, String> {
    let out = std::process::Command::new("dmesg")
        .output()
        .map_err(|e| format!("dmesg: {e}"))?;
    let needle = format!("heap {heap}: ");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(&needle) && l.ends_with(", no host sync")))
}

/// Forks a child that runs `f` (a request the device will not answer); kills it after a
/// moment and returns how long it took to go.
pub(crate) fn killed_while_waiting(
    what: &str,
    f: impl FnOnce() -> i32,
) -> Result<Duration, String> {
    let pid = sys::fork_child(f)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut status = 0;
    // SAFETY: polling our own child.
    let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if done != 0 {
        return Err(format!(
            "{what}: finished although the device does not answer"
        ));
    }
    let t0 = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    loop {
        // SAFETY: as above.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("{what}: still waiting 10 s after SIGKILL"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// With the daemon stopped (SIGSTOP), an ALLOC and a SYNC wait for the device; a fatal
/// signal ends the wait at once, and the ALLOC answered later leaks nothing.
pub fn killable(ctx: &Ctx) -> Result<(), String> {
    let heap = open_heap(ctx)?;
    // No pool: the ALLOC below must go to the (stopped) device.
    let _no_pool = ParamGuard::set("pool_buffers", "0")?;
    let sh = env::sysfs_heap(&ctx.heap)?;
    env::wait_until("the pool to empty", Duration::from_secs(10), || {
        Ok(sh.num("buffers_pooled")? == 0)
    })?;
    // A heap the device marks NO_SYNC never waits for the device in SYNC.
    let host_sync = !(heap_has_feature(&sh, 3)? && dmesg_says_no_host_sync(&ctx.heap)?);
    let base = env::daemon_overview()?.buffers;
    let synced = heap.alloc(sys::page())?;
    let name = ctx.heap.clone();
    host::call(&["stop-daemon"])?;
    let res = (|| -> Result<(), String> {
        let t = killed_while_waiting("ALLOC", move || {
            Heap::open(&name).map_or(2, |h| i32::from(h.alloc(sys::page()).is_err()))
        })?;
        eprintln!("  killable: ALLOC ended {t:.1?} after SIGKILL");
        let fd = synced.raw();
        // A driver's first virtio_dma_buf_get_uuid() waits for ASSIGN_UUID (the importer
        // calls it in the writer's context).
        if crate::uuid::negotiated(&ctx.heap)? {
            let t = killed_while_waiting("get_uuid (ASSIGN_UUID)", move || {
                i32::from(std::fs::write(crate::uuid::UUID_PARAM, fd.to_string()).is_err())
            })?;
            eprintln!("  killable: get_uuid ended {t:.1?} after SIGKILL");
        } else {
            eprintln!("  killable: VIRTIO_DMAHEAP_F_UUID not negotiated, get_uuid not tried");
        }
        if !host_sync {
            let t0 = Instant::now();
            synced
                .sync(sys::SYNC_START | sys::SYNC_RW)
                .map_err(|e| format!("SYNC of a NO_SYNC heap: {}", errname(e)))?;
            eprintln!(
                "  killable: SYNC of a NO_SYNC heap returned in {:.1?} with the daemon stopped",
                t0.elapsed()
            );
            return Ok(());
        }
        let t = killed_while_waiting("SYNC", move || {
            let flags: u64 = sys::SYNC_START | sys::SYNC_RW;
            // SAFETY: DMA_BUF_IOCTL_SYNC reads one u64 that outlives the call.
            let rc = unsafe { libc::ioctl(fd, sys::DMA_BUF_IOCTL_SYNC as _, &flags) };
            i32::from(rc != 0)
        })?;
        eprintln!("  killable: SYNC ended {t:.1?} after SIGKILL");
        Ok(())
    })();
    host::call(&["cont-daemon"])?;
    res?;
    // The ALLOC the killed child abandoned was answered by now: the driver freed it.
    daemon_holds(base + 1)?;
    allocation_works(&heap)?;
    drop(synced);
    daemon_holds(base).map(|_| ())
}
