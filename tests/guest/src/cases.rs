// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The test cases. Each returns Err(reason) on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::env::{self, SysHeap};
use crate::host;
use crate::sys::{self, errname, AllocationData, Buf, Heap, Map};

/// Settings shared by every case.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The host-backed (virtio_dmaheap) heap under test.
    pub heap: String,
    /// The guest kernel's own heap, the reference for errno values.
    pub reference: String,
    /// A heap with a small per-heap quota (daemon `--heap NAME=...,max-bytes=SIZE`).
    pub quota_heap: String,
    /// How many one-page buffers `many-small` holds at once.
    pub many: usize,
    pub prefix: String,
    /// Print details (e.g. every ABI probe's outcome).
    pub verbose: bool,
}

impl Ctx {
    /// The daemon's name of a guest heap: the guest name without the driver's prefix.
    pub fn daemon_name(&self, guest: &str) -> String {
        guest
            .strip_prefix(&self.prefix)
            .unwrap_or(guest)
            .to_string()
    }
}

pub type CaseFn = fn(&Ctx) -> Result<(), String>;

pub const CASES: &[(&str, &str, CaseFn)] = &[
    ("abi-sizes", "4 KiB..64 MiB: size, zeroed, mmap read/write, second mmap sees the same bytes", abi_sizes),
    ("abi-errors", "bad fd_flags/heap_flags/len/fd, out-of-range mmap, bad SYNC/SET_NAME: errno as the kernel's heap", abi_errors),
    ("mmap-filled", "mmap maps every page at once, as the system heap does (no fault on a first touch); after MADV_DONTNEED a touch maps the bytes again; a private mapping copies on write; a child process maps it too", mmap_filled),
    ("sync-name", "DMA_BUF_IOCTL_SYNC start/end and DMA_BUF_SET_NAME (fdinfo)", sync_name),
    ("android", "libdmabufheap pattern: O_RDONLY heap, O_RDWR|O_CLOEXEC buffer, name, SYNC around CPU access", android),
    ("zero-copy", "guest writes seen by the host and host writes seen by the guest (checked on the host)", zero_copy),
    ("concurrent", "allocation, mapping and freeing from several threads at once", concurrent),
    ("lifetime", "a mapping or a dup'd fd keeps a buffer alive on the host; the last reference frees it", lifetime),
    ("free-returns", "closing buffers returns their memory to the host (daemon stats, sysfs)", free_returns),
    ("quota", "quota exhaustion gives ENOMEM and recovers after frees", quota),
    ("pool", "a freed buffer is reused zeroed without a host round trip (zeroed ahead over 16 KiB), given back when idle or when the quota is full", pool),
    ("sysfs", "heap properties in sysfs match what the daemon exports", sysfs),
    ("many-small", "thousands of one-page buffers held at once", many_small),
    ("reference-untouched", "the guest kernel's own heap still works and allocates nothing on the host", reference_untouched),
];

/// Cases run only when named: they need a special run-guest set-up.
pub const EXPLICIT_CASES: &[(&str, &str, CaseFn)] = &[
    (
        "daemon-death",
        "the daemon is killed (host hook kill-daemon) while 2000 buffers are held: \
         releasing them must not hang (run-guest --daemon-may-exit; run it last)",
        daemon_death,
    ),
    (
        "importer",
        "a kernel importer (tests/guest/importer, insmod first) vmaps, attaches and \
         DMA-maps buffers and brackets CPU access; its writes show in the user mapping",
        importer,
    ),
    (
        "memtype",
        "every heap's cache attribute honoured (importer loaded): the user mapping and the \
         kernel vmap of a buffer have the memory type it names (x86: cached WB, wc WC, \
         uncached UC-; arm64: cached Normal, wc and uncached Normal-NC, never Device), and \
         unaligned copies through both work",
        crate::memtype::memtype,
    ),
    (
        "uuid",
        "VIRTIO_DMAHEAP_F_UUID (importer loaded; memfd heap, no host udmabuf): buffers are \
         virtio_dma_bufs; get_uuid (8 callers at once) succeeds, is stable, counted by the \
         daemon; every buffer its own random v4 UUID; a one-page arena buffer gets EOPNOTSUPP \
         and still works; a buffer asked for a UUID is never pooled",
        crate::uuid::uuid,
    ),
    (
        "uuid-revoked",
        "after the host ends the session (ctl prepare-reset) and after the device is \
         removed (unbind), get_uuid of old buffers fails with ENODEV; new buffers get new \
         UUIDs (importer loaded; run it last: the device stays unbound)",
        crate::uuid::uuid_revoked,
    ),
    (
        "uuid-off",
        "daemon --no-uuid: the feature is not negotiated, buffers are plain dma-bufs (the \
         importer's uuid gives EMEDIUMTYPE) and work as before (importer loaded)",
        crate::uuid::uuid_off,
    ),
    (
        "sharing-roundtrip",
        "4 KiB..8 MiB through the test importer (tests/sharing/run): the bytes the guest \
         wrote are what the importer saw through the export socket, the importer's writes \
         are what the guest reads after SYNC start; arena buffers without /dev/udmabuf on \
         the host give EOPNOTSUPP",
        crate::sharing::roundtrip,
    ),
    (
        "sharing-lifetime",
        "the importer holds a buffer the guest frees: retained and still charged in the \
         daemon's stats, its UUID withdrawn, the importer still reads and writes it; \
         released when the importer lets go",
        crate::sharing::lifetime,
    ),
    (
        "sharing-unknown",
        "a random UUID and a freed buffer's UUID give ENOENT; a plain dma-buf EMEDIUMTYPE; \
         unknown ops and CHECK_HELD/RELEASE with nothing held an error status",
        crate::sharing::unknown,
    ),
    (
        "sharing-small",
        "a one-page arena buffer: EOPNOTSUPP without /dev/udmabuf on the host (it still \
         works and is not exported); with /dev/udmabuf, a round trip",
        crate::sharing::small,
    ),
    (
        "sharing-killable",
        "with the test importer stopped (host hooks stop-importer/cont-importer), a fatal \
         signal ends a waiting request at once; the abandoned request is served later and \
         the next one works",
        crate::sharing::killable,
    ),
    (
        "sharing-remove",
        "the test importer's device unbound while a request waits for the stopped \
         importer: the waiter ends (ENODEV or its answer), requests give ENODEV until it \
         is bound again, then work",
        crate::sharing::remove,
    ),
    (
        "device-reset",
        "unbinding the driver (a device reset) while buffers are held and mapped releases \
         every host buffer and mapping; allocation then fails with ENODEV (run it last: \
         the device stays unbound)",
        device_reset,
    ),
    (
        "pause-resume",
        "QMP stop/cont six times while buffers are held and others allocated and freed: \
         bytes, daemon records and counters intact, alloc/free keep working, nothing leaks",
        crate::lifecycle::pause_resume,
    ),
    (
        "suspend-to-idle",
        "suspend to idle (woken by the ACPI power button) with buffers held and in flight: \
         the session is suspended and resumed, the bytes survive in the old mappings",
        crate::lifecycle::suspend_to_idle,
    ),
    (
        "suspend-to-ram",
        "suspend to RAM (S3, woken by QMP system_wakeup) with buffers held and in flight: \
         the session is suspended and resumed, the bytes survive in the old mappings",
        crate::lifecycle::suspend_to_ram,
    ),
    (
        "rebind",
        "driver unbind and bind with buffers held and a kernel user keeping a vmap and a DMA \
         mapping: everything released on the host, user mappings revoked, VM alive, new \
         buffers zeroed and never where the kernel user still writes",
        crate::lifecycle::rebind,
    ),
    (
        "mmap-revoke",
        "driver unbind while threads map buffers without pause, 16 times: no mapping made \
         before the revocation keeps a page mapped, mmap then fails with ENODEV",
        crate::lifecycle::mmap_revoke,
    ),
    (
        "killable",
        "with the daemon stopped (host hooks stop-daemon/cont-daemon), a fatal signal ends \
         a waiting ALLOC, get_uuid (importer loaded) and SYNC at once; the abandoned ALLOC \
         leaks nothing",
        crate::lifecycle::killable,
    ),
    (
        "reboot",
        "reboot the guest with buffers held (does not return; then run after-reboot)",
        crate::lifecycle::reboot,
    ),
    (
        "after-reboot",
        "after a reboot: the daemon holds nothing of before, allocation works",
        crate::lifecycle::after_restart,
    ),
    (
        "reset",
        "the host ends the session (prepare-reset) and resets the VM with buffers held \
         (does not return; then run after-reset)",
        crate::lifecycle::reset,
    ),
    (
        "after-reset",
        "after a host reset: the daemon holds nothing of before, allocation works",
        crate::lifecycle::after_restart,
    ),
    (
        "host-pages",
        "tests/nested only: a 16 MiB buffer's host page frames (L1's pagemap and kprobes) \
         are all mapped, in one run where sysfs says contiguous",
        crate::nested::host_pages,
    ),
    (
        "host-sync",
        "tests/nested only: each SYNC bracket on a 16 MiB buffer reaches the host exporter's \
         begin/end_cpu_access once (L1's function tracer)",
        crate::nested::host_sync,
    ),
];

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn rw_cloexec() -> u32 {
    (libc::O_RDWR | libc::O_CLOEXEC) as u32
}

// ---------------------------------------------------------------------------------------

fn abi_sizes(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    for &len in &[
        4 << 10,
        8 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
        4 << 20,
        16 << 20,
        64 << 20,
    ] {
        let what = |m: &str| format!("{len} bytes: {m}");
        let buf = heap.alloc(len)?;
        let size = buf.size()?;
        // Whole pages, as the kernel's system heap gives (4 KiB is one 16 KiB page there).
        let want = sys::page_round(len);
        check(size == want, || {
            what(&format!("dma-buf size is {size}, want {want}"))
        })?;
        // From here on the whole buffer, which is what `mmap` maps.
        let len = size;
        let m1 = buf.mmap()?;
        if let Some(pos) = m1.as_slice().iter().position(|&b| b != 0) {
            return Err(what(&format!(
                "not zeroed: byte {pos} is {:#x}",
                m1.as_slice()[pos]
            )));
        }
        let seed = len as u64 ^ 0x5eed;
        m1.fill(seed);
        m1.check(seed)
            .map_err(|off| what(&format!("first mapping reads back wrong at {off}")))?;
        let m2 = buf.mmap()?;
        m2.check(seed)
            .map_err(|off| what(&format!("second mapping differs at {off}")))?;
        // And the other way round: write through the second, read through the first.
        let tail = sys::random_bytes(64);
        m2.write(len - 64, &tail);
        check(m1.read_vec(len - 64, 64) == tail, || {
            what("a write through the second mapping is not seen by the first")
        })?;
        drop(m1);
        // A mapping made after the first one went away still sees the bytes.
        let m3 = buf.mmap()?;
        check(m3.read_vec(len - 64, 64) == tail, || {
            what("a new mapping does not see the earlier writes")
        })?;
        check(
            m3.read_vec(0, 8) == sys::pattern(seed, 0).to_le_bytes(),
            || what("a new mapping does not see the first bytes"),
        )?;
    }
    // A length that is not a page multiple is rounded up by the dma-heap core, as for the
    // kernel's own heap.
    let reference =
        Heap::open(&ctx.reference).map_err(|e| format!("open {}: {e}", ctx.reference))?;
    for len in [1usize, 5000, sys::page() + 1] {
        let ours = heap.alloc(len)?.size()?;
        let theirs = reference.alloc(len)?.size()?;
        check(ours == theirs, || {
            format!(
                "alloc({len}): size {ours}, the kernel's {} heap gives {theirs}",
                ctx.reference
            )
        })?;
    }
    Ok(())
}

/// What one operation did: Ok or an errno.
type Outcome = Result<(), i32>;

fn outcome_str(o: &Outcome) -> String {
    match o {
        Ok(()) => "ok".into(),
        Err(e) => errname(*e),
    }
}

fn alloc_with(heap: &Heap, data: AllocationData) -> Result<Buf, i32> {
    heap.alloc_raw_data(data)
}

/// Each probe runs against the reference heap and the heap under test.
type Probe = (&'static str, fn(&Heap) -> Outcome);

fn probes() -> Vec<Probe> {
    fn alloc(h: &Heap, len: u64, fd: u32, fd_flags: u32, heap_flags: u64) -> Outcome {
        alloc_with(
            h,
            AllocationData {
                len,
                fd,
                fd_flags,
                heap_flags,
            },
        )
        .map(|_| ())
    }
    // Lengths and offsets in pages of the guest's size, so each probe means the same with
    // 4 and 16 KiB pages.
    fn pages(n: u64) -> u64 {
        n * sys::page() as u64
    }
    /// Maps `map_len` pages at page `off` of a `len`-page buffer.
    fn mapping(
        h: &Heap,
        len: u64,
        fd_flags: u32,
        map_len: u64,
        off: u64,
        prot: i32,
        flags: i32,
    ) -> Outcome {
        let buf = h.alloc_raw(pages(len), fd_flags, 0)?;
        Map::new(
            buf.raw(),
            pages(map_len) as usize,
            pages(off) as i64,
            prot,
            flags,
        )
        .map(|_| ())
    }
    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
    vec![
        ("alloc fd_flags O_RDWR|O_CLOEXEC", |h| {
            alloc(h, pages(1), 0, rw_cloexec(), 0)
        }),
        ("alloc fd_flags O_RDONLY", |h| {
            alloc(h, pages(1), 0, libc::O_RDONLY as u32, 0)
        }),
        ("alloc fd_flags O_WRONLY", |h| {
            alloc(h, pages(1), 0, libc::O_WRONLY as u32, 0)
        }),
        ("alloc fd_flags |O_NONBLOCK", |h| {
            alloc(h, pages(1), 0, rw_cloexec() | libc::O_NONBLOCK as u32, 0)
        }),
        ("alloc fd_flags |O_APPEND", |h| {
            alloc(h, pages(1), 0, rw_cloexec() | libc::O_APPEND as u32, 0)
        }),
        ("alloc fd_flags 0x80000000", |h| {
            alloc(h, pages(1), 0, 0x8000_0000, 0)
        }),
        ("alloc heap_flags 1", |h| {
            alloc(h, pages(1), 0, rw_cloexec(), 1)
        }),
        ("alloc heap_flags 1<<63", |h| {
            alloc(h, pages(1), 0, rw_cloexec(), 1 << 63)
        }),
        ("alloc len 0", |h| alloc(h, 0, 0, rw_cloexec(), 0)),
        ("alloc len u64::MAX", |h| {
            alloc(h, u64::MAX, 0, rw_cloexec(), 0)
        }),
        ("alloc fd field nonzero", |h| {
            alloc(h, pages(1), 7, rw_cloexec(), 0)
        }),
        ("mmap whole buffer", |h| {
            mapping(h, 4, rw_cloexec(), 4, 0, RW, libc::MAP_SHARED)
        }),
        ("mmap last page", |h| {
            mapping(h, 4, rw_cloexec(), 1, 3, RW, libc::MAP_SHARED)
        }),
        ("mmap one page past the end", |h| {
            mapping(h, 4, rw_cloexec(), 5, 0, RW, libc::MAP_SHARED)
        }),
        ("mmap at offset len", |h| {
            mapping(h, 4, rw_cloexec(), 1, 4, RW, libc::MAP_SHARED)
        }),
        ("mmap straddling the end", |h| {
            mapping(h, 4, rw_cloexec(), 2, 3, RW, libc::MAP_SHARED)
        }),
        ("mmap far offset", |h| {
            mapping(h, 4, rw_cloexec(), 1, 1 << 28, RW, libc::MAP_SHARED)
        }),
        ("mmap PROT_WRITE of an O_RDONLY buffer", |h| {
            mapping(h, 4, libc::O_RDONLY as u32, 4, 0, RW, libc::MAP_SHARED)
        }),
        ("mmap PROT_READ of an O_RDONLY buffer", |h| {
            mapping(
                h,
                4,
                libc::O_RDONLY as u32,
                4,
                0,
                libc::PROT_READ,
                libc::MAP_SHARED,
            )
        }),
        ("SYNC flags 0", |h| {
            h.alloc_raw(pages(1), rw_cloexec(), 0)?.sync(0)
        }),
        ("SYNC flags END only", |h| {
            h.alloc_raw(pages(1), rw_cloexec(), 0)?.sync(sys::SYNC_END)
        }),
        ("SYNC unknown flag 8", |h| {
            h.alloc_raw(pages(1), rw_cloexec(), 0)?
                .sync(sys::SYNC_RW | 8)
        }),
        ("SYNC READ end without start", |h| {
            h.alloc_raw(pages(1), rw_cloexec(), 0)?
                .sync(sys::SYNC_READ | sys::SYNC_END)
        }),
        ("SET_NAME 31 bytes", |h| {
            h.alloc_raw(pages(1), rw_cloexec(), 0)?
                .set_name(&[b'n'; 31])
        }),
        ("SET_NAME 40 bytes", |h| {
            h.alloc_raw(pages(1), rw_cloexec(), 0)?
                .set_name(&[b'n'; 40])
        }),
        ("unknown dma-buf ioctl", |h| {
            let b = h.alloc_raw(pages(1), rw_cloexec(), 0)?;
            // SAFETY: an ioctl number no driver implements; the argument is not used.
            let rc = unsafe { libc::ioctl(b.raw(), 0x4008_62ff as _, 0usize) };
            if rc < 0 {
                Err(sys::errno())
            } else {
                Ok(())
            }
        }),
        ("ftruncate", |h| {
            let b = h.alloc_raw(pages(1), rw_cloexec(), 0)?;
            // SAFETY: plain syscall on an fd we own.
            let rc = unsafe { libc::ftruncate(b.raw(), pages(2) as i64) };
            if rc < 0 {
                Err(sys::errno())
            } else {
                Ok(())
            }
        }),
    ]
}

fn abi_errors(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let reference =
        Heap::open(&ctx.reference).map_err(|e| format!("open {}: {e}", ctx.reference))?;
    let mut bad = Vec::new();
    for (name, probe) in probes() {
        let want = probe(&reference);
        let got = probe(&heap);
        if ctx.verbose {
            println!(
                "  # {name:40} {:10} ({}: {})",
                outcome_str(&got),
                ctx.reference,
                outcome_str(&want)
            );
        }
        if want != got {
            bad.push(format!(
                "{name}: {} (kernel's {}: {})",
                outcome_str(&got),
                ctx.reference,
                outcome_str(&want)
            ));
        }
    }
    // Heap-specific answers where the kernel's own heaps disagree among themselves:
    // a private mapping (system: allowed, cma: EINVAL) and a length beyond the heap
    // (system: ENOMEM; a heap with a max_size may say EINVAL). Any failure must be clean.
    let private = (|| -> Outcome {
        let b = heap.alloc_raw(16384, rw_cloexec(), 0)?;
        let m = Map::new(
            b.raw(),
            16384,
            0,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )?;
        m.write(0, b"private");
        Ok(())
    })();
    if !matches!(private, Ok(()) | Err(libc::EINVAL)) {
        bad.push(format!("MAP_PRIVATE: {}", outcome_str(&private)));
    }
    // (Not on the kernel's system heap itself: it tries, and the OOM killer answers.)
    if ctx.heap != ctx.reference {
        let huge = heap.alloc_raw(1 << 44, rw_cloexec(), 0).map(|_| ());
        if !matches!(huge, Err(libc::ENOMEM) | Err(libc::EINVAL)) {
            bad.push(format!(
                "alloc 16 TiB: {} (want ENOMEM or EINVAL)",
                outcome_str(&huge)
            ));
        }
    }
    check(bad.is_empty(), || bad.join("; "))
}

fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_minflt
}

fn mmap_filled(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    for &len in &[4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20] {
        let what = |m: &str| format!("{len} bytes: {m}");
        let buf = heap.alloc(len)?;
        // The buffer is whole pages (4 KiB is one 16 KiB page with 16 KiB pages).
        let (len, page) = (sys::page_round(len), sys::page());
        let map = buf.mmap()?;
        let present = map.present_pages()?;
        check(present == len / page, || {
            what(&format!(
                "{present} of {} pages mapped after mmap",
                len / page
            ))
        })?;
        let before = minor_faults();
        map.fill(len as u64);
        let faults = minor_faults() - before;
        check(faults == 0, || {
            what(&format!("the first touch took {faults} page faults"))
        })?;
        // Zapped: a touch refills from the same buffer.
        map.dontneed()?;
        let present = map.present_pages()?;
        check(present < len / page, || {
            what("MADV_DONTNEED left every page mapped")
        })?;
        map.check(len as u64)
            .map_err(|off| what(&format!("after MADV_DONTNEED byte {off} differs")))?;
        // A mapping at an offset is filled too.
        if len > page {
            let part = Map::new(
                buf.raw(),
                len - page,
                page as i64,
                libc::PROT_READ,
                libc::MAP_SHARED,
            )
            .map_err(|e| what(&format!("mmap at offset {page}: {}", errname(e))))?;
            let present = part.present_pages()?;
            check(present == len / page - 1, || {
                what(&format!(
                    "{present} pages mapped after an mmap at an offset"
                ))
            })?;
            check(part.read_vec(0, 8) == map.read_vec(page, 8), || {
                what("the mapping at an offset shows other bytes")
            })?;
        }
        // A private mapping shows the buffer and copies on write, as the system heap's.
        let private = Map::new(
            buf.raw(),
            len,
            0,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .map_err(|e| what(&format!("MAP_PRIVATE: {}", errname(e))))?;
        let shared_tail = map.read_vec(len - 8, 8);
        check(private.read_vec(len - 8, 8) == shared_tail, || {
            what("a private mapping shows other bytes")
        })?;
        private.write(len - 8, b"private!");
        check(map.read_vec(len - 8, 8) == shared_tail, || {
            what("a write to a private mapping reached the buffer")
        })?;
        check(private.read_vec(len - 8, 8) == b"private!", || {
            what("a private mapping lost its own write")
        })?;
        drop(private);
        // Another process maps it and exits; the next mmap here forgets that mm.
        let first = map.read_vec(0, 1)[0];
        let status = sys::wait_child(sys::fork_child(|| {
            let prot = libc::PROT_READ;
            match Map::new(buf.raw(), len, 0, prot, libc::MAP_SHARED) {
                Ok(m) => {
                    let mut b = [0u8];
                    m.read(0, &mut b);
                    i32::from(b[0] != first)
                }
                Err(_) => 2,
            }
        })?)?;
        check(status == 0, || {
            what(&format!("a child's mapping failed (status {status})"))
        })?;
        let again = buf.mmap()?;
        check(again.present_pages()? == len / page, || {
            what("an mmap after the child's is not filled")
        })?;
    }
    Ok(())
}

fn sync_name(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let buf = heap.alloc(64 << 10)?;
    let map = buf.mmap()?;
    for (what, dir) in [
        ("READ", sys::SYNC_READ),
        ("WRITE", sys::SYNC_WRITE),
        ("RW", sys::SYNC_RW),
    ] {
        buf.sync(sys::SYNC_START | dir)
            .map_err(|e| format!("SYNC START {what}: {}", errname(e)))?;
        map.write(0, what.as_bytes());
        buf.sync(sys::SYNC_END | dir)
            .map_err(|e| format!("SYNC END {what}: {}", errname(e)))?;
    }
    // Nested and repeated brackets are fine for the kernel's heaps too.
    buf.sync(sys::SYNC_START | sys::SYNC_READ)
        .map_err(errname)?;
    buf.sync(sys::SYNC_START | sys::SYNC_WRITE)
        .map_err(errname)?;
    buf.sync(sys::SYNC_END | sys::SYNC_WRITE).map_err(errname)?;
    buf.sync(sys::SYNC_END | sys::SYNC_READ).map_err(errname)?;
    for name in ["dmaheap-test", "a", &"x".repeat(31)] {
        buf.set_name(name.as_bytes())
            .map_err(|e| format!("SET_NAME {name:?}: {}", errname(e)))?;
        let info = buf.fdinfo()?;
        let got = info
            .lines()
            .find_map(|l| l.strip_prefix("name:"))
            .map(str::trim)
            .unwrap_or("");
        check(got == name, || {
            format!("fdinfo name is {got:?}, want {name:?}:\n{info}")
        })?;
    }
    let info = buf.fdinfo()?;
    let size = info
        .lines()
        .find_map(|l| l.strip_prefix("size:"))
        .map(str::trim)
        .unwrap_or("");
    check(size == (64 << 10).to_string(), || {
        format!("fdinfo size {size:?}:\n{info}")
    })
}

fn android(ctx: &Ctx) -> Result<(), String> {
    for name in [&ctx.heap, &ctx.reference] {
        android_on(name).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

fn android_on(name: &str) -> Result<(), String> {
    // libdmabufheap: open("/dev/dma_heap/<name>", O_RDONLY | O_CLOEXEC).
    let heap = Heap::open(name).map_err(|e| format!("open: {e}"))?;
    let len = 3 * sys::page() * 17; // an odd-sized graphics buffer
    let buf = heap
        .alloc_raw(len as u64, rw_cloexec(), 0)
        .map_err(|e| format!("alloc O_RDWR|O_CLOEXEC: {}", errname(e)))?;
    // SAFETY: fcntl queries on an fd we own.
    let (fdfl, flfl) = unsafe {
        (
            libc::fcntl(buf.raw(), libc::F_GETFD),
            libc::fcntl(buf.raw(), libc::F_GETFL),
        )
    };
    check(fdfl >= 0 && fdfl & libc::FD_CLOEXEC != 0, || {
        "buffer fd lacks FD_CLOEXEC".into()
    })?;
    check(flfl >= 0 && flfl & libc::O_ACCMODE == libc::O_RDWR, || {
        format!("buffer fd flags {flfl:#x}: not O_RDWR")
    })?;
    buf.set_name(b"gralloc-android-test")
        .map_err(|e| format!("DMA_BUF_SET_NAME: {}", errname(e)))?;
    let map = buf.mmap()?;
    buf.sync(sys::SYNC_START | sys::SYNC_RW)
        .map_err(|e| format!("SYNC START RW: {}", errname(e)))?;
    map.fill(0xa11d);
    buf.sync(sys::SYNC_END | sys::SYNC_RW)
        .map_err(|e| format!("SYNC END RW: {}", errname(e)))?;
    buf.sync(sys::SYNC_START | sys::SYNC_READ)
        .map_err(|e| format!("SYNC START READ: {}", errname(e)))?;
    let ok = map.check(0xa11d);
    buf.sync(sys::SYNC_END | sys::SYNC_READ)
        .map_err(|e| format!("SYNC END READ: {}", errname(e)))?;
    ok.map_err(|off| format!("reads back wrong at {off}"))
}

// ---------------------------------------------------------------------------------------

/// A guest buffer, mapped, whose host-side buffer was found by a random tag at offset 0.
struct Tracked {
    buf: Buf,
    map: Map,
    host: host::HostBuf,
}

fn track(heap: &Heap, len: usize) -> Result<Tracked, String> {
    let buf = heap.alloc(len)?;
    let map = buf.mmap()?;
    let tag = sys::random_bytes(16);
    map.write(0, &tag);
    let host = host::find_buffer(&tag, len)?;
    Ok(Tracked { buf, map, host })
}

/// Like [`track`], after checking that the new buffer reads as zeros (`what` if not).
fn track_zeroed(heap: &Heap, len: usize, what: &str) -> Result<Tracked, String> {
    let buf = heap.alloc(len)?;
    let map = buf.mmap()?;
    check(map.as_slice().iter().all(|&b| b == 0), || what.to_string())?;
    let tag = sys::random_bytes(16);
    map.write(0, &tag);
    let host = host::find_buffer(&tag, len)?;
    Ok(Tracked { buf, map, host })
}

fn zero_copy(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let daemon_heap = ctx.daemon_name(&ctx.heap);
    // Small buffers live in shared arenas, big ones get their own mapping: cover both.
    for len in [4 << 10, 64 << 10, 2 << 20, 32 << 20] {
        let what = |m: String| format!("{len} bytes: {m}");
        let t = track(&heap, len).map_err(what)?;
        check(t.host.heap == daemon_heap, || {
            what(format!(
                "host buffer is in heap {}, want {daemon_heap}",
                t.host.heap
            ))
        })?;
        check(t.host.len >= len as u64, || {
            what(format!("host len {}", t.host.len))
        })?;
        // Guest -> host: bytes written now, with no request in between, are on the host.
        for off in [8, len / 2, len - 32] {
            let data = sys::random_bytes(32.min(len - off));
            t.map.write(off, &data);
            host::expect(&t.host.id, off, &data).map_err(what)?;
        }
        // Host -> guest: bytes the host writes appear in the existing mapping.
        for off in [sys::page().min(len - 64), len - 64] {
            let data = sys::random_bytes(48);
            host::poke(&t.host.id, off, &data).map_err(what)?;
            env::wait_until(
                "the host's write in the guest mapping",
                Duration::from_secs(5),
                || Ok(t.map.read_vec(off, data.len()) == data),
            )
            .map_err(what)?;
            // and in a brand-new mapping.
            let m2 = t.buf.mmap()?;
            check(m2.read_vec(off, data.len()) == data, || {
                what("a new mapping does not see the host's write".into())
            })?;
        }
        // A whole-buffer round trip through the host: peek what the guest wrote.
        let page = t.map.read_vec(0, sys::page().min(len));
        let seen = host::peek(&t.host.id, 0, page.len()).map_err(what)?;
        check(seen == page, || {
            what("host's view of the first page differs".into())
        })?;
        let id = t.host.id.clone();
        drop(t);
        // Once freed, the host drops the buffer.
        env::wait_until(
            "the host to drop the freed buffer",
            Duration::from_secs(10),
            || {
                let list = host::call(&["ctl", "buffers"])?;
                Ok(!list
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(id.as_str())))
            },
        )
        .map_err(what)?;
    }
    Ok(())
}

fn concurrent(ctx: &Ctx) -> Result<(), String> {
    const THREADS: usize = 4;
    const ITER: usize = 150;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let name = ctx.heap.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<usize, String> {
                let heap = Heap::open(&name).map_err(|e| format!("open: {e}"))?;
                let mut held: Vec<(Buf, Map, u64)> = Vec::new();
                let mut rnd = sys::pattern(t as u64, 42);
                for i in 0..ITER {
                    rnd = sys::pattern(rnd, i as u64);
                    let len = sys::page() * (1 + (rnd % 48) as usize);
                    let buf = heap.alloc(len).map_err(|e| format!("thread {t}: {e}"))?;
                    let map = buf.mmap()?;
                    if map.as_slice().iter().any(|&b| b != 0) {
                        return Err(format!("thread {t}: buffer {i} not zeroed"));
                    }
                    let seed = ((t as u64) << 32) | i as u64;
                    map.fill(seed);
                    held.push((buf, map, seed));
                    if held.len() > 12 {
                        let (_, m, s) = held.remove((rnd % 12) as usize);
                        m.check(s)
                            .map_err(|off| format!("thread {t}: buffer overwritten at {off}"))?;
                    }
                }
                // Every thread holds its buffers while the others check theirs.
                barrier.wait();
                for (_, m, s) in &held {
                    m.check(*s)
                        .map_err(|off| format!("thread {t}: held buffer overwritten at {off}"))?;
                }
                barrier.wait();
                Ok(held.len())
            })
        })
        .collect();
    let mut errs = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => errs.push(e),
            Err(_) => errs.push("a thread panicked".into()),
        }
    }
    check(errs.is_empty(), || errs.join("; "))
}

fn wait_daemon_idle(ctx: &Ctx, name: &str) -> Result<env::HeapStats, String> {
    let mut last = env::HeapStats::default();
    env::wait_until(
        &format!("daemon heap {name} to have no buffers"),
        Duration::from_secs(20),
        || {
            last = env::daemon_heap_stats(&ctx.daemon_name(name))?;
            Ok(last.buffers == 0)
        },
    )
    .map_err(|e| format!("{e}; last stats {last:?}"))?;
    Ok(last)
}

fn host_has(id: &str) -> Result<bool, String> {
    let list = host::call(&["ctl", "buffers"])?;
    Ok(list
        .lines()
        .any(|l| l.split_whitespace().next() == Some(id)))
}

fn lifetime(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    for len in [sys::page(), 16 << 20] {
        let what = |m: String| format!("{len} bytes: {m}");
        // Closing the fd while a mapping exists: the buffer lives on, on both sides.
        let Tracked { buf, map, host } = track(&heap, len).map_err(what)?;
        let dup = buf.fd.try_clone().map_err(|e| what(format!("dup: {e}")))?;
        drop(buf);
        let data = sys::random_bytes(32);
        map.write(len - 32, &data);
        host::expect(&host.id, len - 32, &data).map_err(what)?;
        drop(dup);
        check(host_has(&host.id)?, || {
            what("freed on the host while still mapped".into())
        })?;
        let poke = sys::random_bytes(16);
        host::poke(&host.id, 64, &poke).map_err(what)?;
        env::wait_until("the host's write", Duration::from_secs(5), || {
            Ok(map.read_vec(64, 16) == poke)
        })
        .map_err(what)?;
        // The last reference goes: the host frees the buffer.
        drop(map);
        env::wait_until(
            "the host to free the buffer",
            Duration::from_secs(10),
            || Ok(!host_has(&host.id)?),
        )
        .map_err(what)?;
    }
    Ok(())
}

fn free_returns(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let sys_heap = env::sysfs_heap(&ctx.heap)?;
    let base = wait_daemon_idle(ctx, &ctx.heap)?;
    let dname = ctx.daemon_name(&ctx.heap);
    // Big buffers get host mappings of their own; small ones share arenas.
    const BIG: usize = 16 << 20;
    let sizes: Vec<usize> = (0..76)
        .map(|i| match i {
            0..4 => BIG,
            4..12 => 1 << 20,
            _ => sys::page(),
        })
        .collect();
    let mut bufs = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let b = heap.alloc(len)?;
        b.mmap()?.fill(i as u64);
        bufs.push(b);
    }
    let n = sizes.len() as u64;
    let want_bytes: u64 = sizes.iter().map(|&l| l as u64).sum();
    let held = env::daemon_heap_stats(&dname)?;
    check(held.buffers == n, || {
        format!("daemon has {} buffers, want {n}", held.buffers)
    })?;
    check(held.bytes >= base.bytes + want_bytes, || {
        format!(
            "daemon bytes {} while holding {want_bytes} (idle {})",
            held.bytes, base.bytes
        )
    })?;
    let host_held = held.host_bytes.unwrap_or(0);
    check(host_held >= want_bytes, || {
        format!("daemon host_bytes {host_held} while holding {want_bytes}")
    })?;
    let used = sys_heap.num("buffers_used")?;
    check(used == n, || format!("sysfs buffers_used {used}, want {n}"))?;
    let bytes_used = sys_heap.num("bytes_used")?;
    check(bytes_used >= want_bytes, || {
        format!("sysfs bytes_used {bytes_used} < {want_bytes}")
    })?;
    drop(bufs);
    // Every buffer is released on the host; the host memory goes back too, except at most
    // one empty arena the daemon keeps as a spare.
    let mut last = held;
    env::wait_until(
        "the daemon to release the freed buffers",
        Duration::from_secs(20),
        || {
            last = env::daemon_heap_stats(&dname)?;
            Ok(last.buffers == 0
                && last.bytes <= base.bytes
                && last.mappings.unwrap_or(0) <= 1
                && last.host_bytes.unwrap_or(0) + 4 * BIG as u64 <= host_held)
        },
    )
    .map_err(|e| format!("{e}: idle {base:?}, holding {held:?}, now {last:?}"))?;
    if last.mappings == Some(0) {
        check(last.host_bytes.unwrap_or(0) == 0, || {
            format!("no mappings but {last:?}")
        })?;
    }
    env::wait_until(
        "sysfs bytes_used/buffers_used back to 0",
        Duration::from_secs(10),
        || Ok(sys_heap.num("buffers_used")? == 0 && sys_heap.num("bytes_used")? == 0),
    )
}

/// The driver's pool: what sysfs and the daemon say about a heap's pooled buffers.
fn pool_counts(ctx: &Ctx, sh: &env::SysHeap) -> Result<(u64, u64, env::HeapStats), String> {
    let st = env::daemon_heap_stats(&ctx.daemon_name(&sh.name))?;
    Ok((sh.num("buffers_pooled")?, sh.num("buffers_used")?, st))
}

fn wait_pool_empty(ctx: &Ctx, sh: &env::SysHeap, what: &str) -> Result<(), String> {
    let mut last = None;
    env::wait_until(what, Duration::from_secs(10), || {
        let c = pool_counts(ctx, sh)?;
        let done = c.0 == 0 && c.1 == 0 && c.2.buffers == 0;
        last = Some(c);
        Ok(done)
    })
    .map_err(|e| format!("{e}; last (pooled, used, daemon) {last:?}"))
}

const POOL_PARAMS: &str = "/sys/module/virtio_dmaheap/parameters";

/// Sets a driver parameter for as long as it lives, then puts the old value back.
pub struct ParamGuard {
    path: String,
    old: String,
}

impl ParamGuard {
    pub fn set(name: &str, value: &str) -> Result<ParamGuard, String> {
        let path = format!("{POOL_PARAMS}/{name}");
        let old = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        std::fs::write(&path, value).map_err(|e| format!("{path} <- {value}: {e}"))?;
        Ok(ParamGuard {
            path,
            old: old.trim().to_string(),
        })
    }
}

impl Drop for ParamGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

/// Whether the heap's device negotiated a feature bit (virtio sysfs `features`).
pub fn heap_has_feature(sh: &env::SysHeap, bit: usize) -> Result<bool, String> {
    let dev = sh.dir.join("../..");
    let f = std::fs::read_to_string(dev.join("features"))
        .map_err(|e| format!("{}/features: {e}", dev.display()))?;
    Ok(f.as_bytes().get(bit) == Some(&b'1'))
}

fn pool(ctx: &Ctx) -> Result<(), String> {
    let sh = env::sysfs_heap(&ctx.heap)?;
    check(sh.prop("cache")? == "cached", || {
        format!(
            "heap {}: the pool keeps buffers of cached heaps only",
            ctx.heap
        )
    })?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    wait_pool_empty(ctx, &sh, "an idle heap")?;

    // One buffer per request first, so that every count below is exact.
    let single = ParamGuard::set("pool_batch", "1")?;
    // A freed one-page buffer stays allocated on the host and comes back, zeroed.
    let first = track(&heap, sys::page())?;
    first.map.fill(7);
    let id = first.host.id.clone();
    drop(first);
    let (pooled, used, st) = pool_counts(ctx, &sh)?;
    check(pooled == 1 && used == 0 && st.buffers == 1, || {
        format!("after freeing one buffer: pooled {pooled}, used {used}, daemon {st:?}")
    })?;
    let again = track_zeroed(&heap, sys::page(), "a reused buffer is not zeroed")?;
    let host = &again.host;
    check(host.id == id, || {
        format!(
            "reused buffer is host buffer {}, the freed one was {id}",
            host.id
        )
    })?;
    let (pooled, used, st) = pool_counts(ctx, &sh)?;
    check(pooled == 0 && used == 1 && st.buffers == 1, || {
        format!("after the reuse: pooled {pooled}, used {used}, daemon {st:?}")
    })?;
    // Another size is a new host buffer.
    let other = heap.alloc(2 * sys::page())?;
    let st = env::daemon_heap_stats(&ctx.daemon_name(&ctx.heap))?;
    check(st.buffers == 2, || format!("a second size: daemon {st:?}"))?;
    drop((again, other));
    // Unused, the pool gives them back to the host (pool_idle_ms).
    wait_pool_empty(ctx, &sh, "the pool to give idle buffers back")?;
    check(!host_has(&id)?, || format!("host buffer {id} still there"))?;

    // The pool keeps no buffer over pool_max_len, and at most pool_max_bytes.
    {
        let page = sys::page();
        let _len = ParamGuard::set("pool_max_len", &(2 * page).to_string())?;
        let _bytes = ParamGuard::set("pool_max_bytes", &(3 * page).to_string())?;
        drop(heap.alloc(3 * page)?);
        let (pooled, _, _) = pool_counts(ctx, &sh)?;
        check(pooled == 0, || {
            format!("a 3-page buffer freed with pool_max_len of 2 pages: {pooled} pooled")
        })?;
        // Freed in this order: the 2-page buffer no longer fits.
        let three = [heap.alloc(page)?, heap.alloc(page)?, heap.alloc(2 * page)?];
        drop(three);
        let pooled_bytes = sh.num("bytes_pooled")?;
        check(pooled_bytes == 2 * page as u64, || {
            format!(
                "1 + 1 + 2 pages freed with pool_max_bytes of 3 pages: {pooled_bytes} bytes pooled"
            )
        })?;
    }
    wait_pool_empty(ctx, &sh, "the pool to give idle buffers back")?;

    // A freed buffer over 16 KiB of a size in demand is zeroed ahead, while it waits in
    // the pool: an allocation that finds it unzeroed gets a new buffer and has it zeroed,
    // and the next allocation of its size gets it back zeroed. Any such buffer, right
    // after a free too, reads as zeros. Still one buffer per request: a batch's spares
    // are clean too, and would be handed out first.
    for (len, size) in [(64usize << 10, "64 KiB"), (1 << 20, "1 MiB")] {
        let zeroed = |b: &Buf, what: &str| -> Result<(), String> {
            check(b.mmap()?.as_slice().iter().all(|&x| x == 0), || {
                format!("{what}: a {size} buffer is not zeroed")
            })
        };
        let first = track(&heap, len)?;
        first.map.fill(7);
        let id = first.host.id.clone();
        drop(first);
        let second = heap.alloc(len)?;
        zeroed(&second, "right after a free")?;
        second.mmap()?.fill(8);
        drop(second);
        std::thread::sleep(Duration::from_millis(300));
        let again = track_zeroed(&heap, len, &format!("a pooled {size} buffer is not zeroed"))?;
        let host = &again.host;
        // A quota of less than two such buffers gives the pooled one back to make room.
        let cap = sh.num("capacity")?;
        check(host.id == id || (cap != 0 && cap < 2 * len as u64), || {
            format!(
                "host buffer {id} ({size}) was freed, then another {size} buffer; 300 ms \
                 later the next {size} buffer is host buffer {}: the pool did not zero the \
                 first ahead",
                host.id
            )
        })?;
        drop(again);
        wait_pool_empty(ctx, &sh, "the pool to give idle buffers back")?;
    }
    drop(single);

    // With ALLOC_BATCH, a size the pool lacks comes with pool_batch - 1 more buffers of
    // it: a burst of allocations costs one request.
    if heap_has_feature(&sh, 4)? {
        let _batch = ParamGuard::set("pool_batch", "4")?;
        let len = 3 * sys::page();
        let mut burst = vec![heap.alloc(len)?];
        let (pooled, used, st) = pool_counts(ctx, &sh)?;
        check(pooled == 3 && used == 1 && st.buffers == 4, || {
            format!("one buffer with pool_batch 4: pooled {pooled}, used {used}, daemon {st:?}")
        })?;
        for _ in 0..3 {
            let b = heap.alloc(len)?;
            check(b.mmap()?.as_slice().iter().all(|&x| x == 0), || {
                "a buffer of a batch is not zeroed".into()
            })?;
            burst.push(b);
        }
        let (pooled, used, st) = pool_counts(ctx, &sh)?;
        check(pooled == 0 && used == 4 && st.buffers == 4, || {
            format!("four buffers from one batch: pooled {pooled}, used {used}, daemon {st:?}")
        })?;
        drop(burst);
        wait_pool_empty(ctx, &sh, "the pool to give idle buffers back")?;
    } else {
        return Err(
            "the device did not negotiate VIRTIO_DMAHEAP_F_BATCH (the daemon offers it)".into(),
        );
    }

    // A full quota: pooled buffers are given back so that an allocation of another size
    // fits (a heap with a small quota only).
    let cap = sh.num("capacity")?;
    if cap == 0 || cap > 4 << 20 {
        println!(
            "# pool: {} has no small quota, quota part skipped",
            ctx.heap
        );
        return Ok(());
    }
    const BIG: usize = 64 << 10;
    let mut held = Vec::new();
    let err = loop {
        match heap.alloc_raw(BIG as u64, rw_cloexec(), 0) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
        check(held.len() as u64 * (BIG as u64) <= cap, || {
            format!("{} x 64 KiB from a {cap}-byte quota", held.len())
        })?;
    };
    check(err == libc::ENOMEM, || {
        format!("a full quota gives {}", errname(err))
    })?;
    let n = held.len();
    drop(held);
    let pooled = sh.num("buffers_pooled")?;
    check(pooled as usize == n, || {
        format!("{n} freed, {pooled} pooled")
    })?;
    let mut small = Vec::new();
    let err = loop {
        match heap.alloc_raw(sys::page() as u64, rw_cloexec(), 0) {
            Ok(b) => small.push(b),
            Err(e) => break e,
        }
        check(small.len() as u64 * (sys::page() as u64) <= cap, || {
            format!("{} pages from a {cap}-byte quota", small.len())
        })?;
    };
    let got = (small.len() * sys::page()) as u64;
    check(err == libc::ENOMEM && got + (BIG as u64) > cap, || {
        format!(
            "with {n} x 64 KiB pooled, one-page buffers got {got} of {cap} bytes, then {}",
            errname(err)
        )
    })?;
    drop(small);
    wait_pool_empty(ctx, &sh, "the pool to give idle buffers back")
}

fn quota(ctx: &Ctx) -> Result<(), String> {
    let name = &ctx.quota_heap;
    let sh = env::sysfs_heap(name).map_err(|e| {
        format!(
            "{e} (start the daemon with --heap {}=memfd,max-bytes=SIZE)",
            ctx.daemon_name(name)
        )
    })?;
    let cap = sh.num("capacity")?;
    check(cap > 0 && cap <= 256 << 20, || {
        format!("heap {name}: capacity {cap}: want a small per-heap quota (1..256 MiB)")
    })?;
    let heap = Heap::open(name).map_err(|e| format!("open {name}: {e}"))?;
    wait_daemon_idle(ctx, name)?;
    const CHUNK: usize = 1 << 20;
    let limit = cap as usize / CHUNK + 8;
    let mut held = Vec::new();
    let err = loop {
        match heap.alloc_raw(CHUNK as u64, rw_cloexec(), 0) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
        if held.len() > limit {
            return Err(format!(
                "{} MiB allocated from a {cap}-byte quota without failing",
                held.len()
            ));
        }
    };
    check(err == libc::ENOMEM, || {
        format!("exhausted quota gives {}, want ENOMEM", errname(err))
    })?;
    let got = (held.len() * CHUNK) as u64;
    check(got <= cap && got + 2 * CHUNK as u64 > cap, || {
        format!("ENOMEM after {got} bytes with capacity {cap}")
    })?;
    // Smaller requests that still do not fit fail the same way; a page may still fit.
    let small = heap
        .alloc_raw(
            (cap - got + sys::page() as u64).max(sys::page() as u64),
            rw_cloexec(),
            0,
        )
        .map(|_| ());
    check(small == Err(libc::ENOMEM), || {
        format!("alloc over the quota gives {}", outcome_str(&small))
    })?;
    // Recovery: freeing one buffer makes room again (FREE is asynchronous: poll).
    held.pop();
    env::wait_until(
        "an allocation to succeed after a free",
        Duration::from_secs(10),
        || match heap.alloc_raw(CHUNK as u64, rw_cloexec(), 0) {
            Ok(b) => {
                held.push(b);
                Ok(true)
            }
            Err(libc::ENOMEM) => Ok(false),
            Err(e) => Err(errname(e)),
        },
    )?;
    drop(held);
    // After freeing everything the whole quota is available again: the largest buffer
    // the heap allows, then the rest in 1 MiB pieces (FREE is asynchronous: poll).
    let max_size = sh.num("max_size")?.min(cap) as usize;
    let mut again = Vec::new();
    env::wait_until(
        "the quota to be available again",
        Duration::from_secs(10),
        || match heap.alloc_raw(max_size as u64, rw_cloexec(), 0) {
            Ok(b) => {
                again.push(b);
                Ok(true)
            }
            Err(libc::ENOMEM) => Ok(false),
            Err(e) => Err(format!("alloc {max_size}: {}", errname(e))),
        },
    )?;
    let mut total = max_size;
    while total + CHUNK <= got as usize {
        let b = heap
            .alloc_raw(CHUNK as u64, rw_cloexec(), 0)
            .map_err(|e| format!("after freeing everything, alloc at {total}: {}", errname(e)))?;
        again.push(b);
        total += CHUNK;
    }
    for (i, b) in again.iter().enumerate() {
        let m = b.mmap()?;
        m.fill(i as u64);
        m.check(i as u64)
            .map_err(|off| format!("buffer {i} reads back wrong at {off}"))?;
    }
    Ok(())
}

fn sysfs(ctx: &Ctx) -> Result<(), String> {
    let heaps = env::sysfs_heaps();
    check(!heaps.is_empty(), || {
        format!("no heaps under {}", env::DRIVER_DIR)
    })?;
    let mut specs = env::daemon_heap_specs()?;
    if specs.is_empty() {
        // No --heap: the daemon exports one heap `system` (host dma-heap or memfd).
        specs.push(env::HeapSpec {
            name: "system".into(),
            source: "default".into(),
            ..Default::default()
        });
    }
    let limits = env::daemon_limits()?;
    let attrs = specs
        .iter()
        .map(|s| s.opts.get("cache").map_or("cached", String::as_str))
        .collect::<BTreeSet<_>>()
        .len() as u64;
    let mut errs = Vec::new();
    let mut ids = BTreeSet::new();
    for h in &heaps {
        let mut e = |m: String| errs.push(format!("{}: {m}", h.name));
        for f in env::PROP_FILES {
            if let Err(m) = h.prop(f) {
                e(m);
            }
        }
        if !std::path::Path::new(&format!("/dev/dma_heap/{}", h.name)).exists() {
            e("no /dev/dma_heap node".into());
        }
        if !h.name.starts_with(&ctx.prefix) {
            e(format!("name lacks the heap_prefix {:?}", ctx.prefix));
        }
        let num = |f: &str| h.num(f).unwrap_or(u64::MAX);
        if !ids.insert(num("heap_id")) {
            e(format!("duplicate heap_id {}", num("heap_id")));
        }
        let contiguous = h.prop("contiguous").unwrap_or_default();
        if !matches!(contiguous.as_str(), "0" | "1") {
            e(format!("contiguous {contiguous:?}"));
        }
        let cache = h.prop("cache").unwrap_or_default();
        if !matches!(cache.as_str(), "cached" | "uncached" | "write-combined") {
            e(format!("cache {cache:?}"));
        }
        let align = num("min_align");
        if !align.is_power_of_two() || align < sys::page() as u64 {
            e(format!("min_align {align}"));
        }
        if num("max_size") == 0 || num("max_size") % sys::page() as u64 != 0 {
            e(format!("max_size {}", num("max_size")));
        }
        // Against the daemon's own configuration of this heap, with the defaults its
        // --help documents (max-size: --shm-size; align: 4K; cache: cached; contiguous:
        // only dma-heap heaps named like *cma*/*reserved*; capacity: the per-heap quota
        // capped by the per-VM --max-bytes and the window).
        let dname = ctx.daemon_name(&h.name);
        let Some(idx) = specs.iter().position(|s| s.name == dname) else {
            e(format!("the daemon exports no heap {dname:?}"));
            continue;
        };
        let spec = &specs[idx];
        if num("heap_id") != idx as u64 {
            e(format!(
                "heap_id {} but it is --heap number {idx}",
                num("heap_id")
            ));
        }
        let size_opt = |opt: &str, default: u64| -> Result<u64, String> {
            spec.opts
                .get(opt)
                .map_or(Ok(default), |v| env::parse_size(v))
        };
        let global = limits.max_bytes.min(limits.shm_size);
        // With heaps of several cache attributes the daemon splits the window between them
        // (VIRTIO_DMAHEAP_F_HEAP_RANGE): a heap's buffers, and so its default max-size, fit
        // its attribute's range, an even share of the window in 2 MiB units.
        if !spec.opts.contains_key("max-size") && attrs > 1 {
            let share = (limits.shm_size / attrs) & !((2 << 20) - 1);
            let got = num("max_size");
            if !(share..=limits.shm_size).contains(&got) {
                e(format!(
                    "max_size is {got}: with {attrs} cache attributes the daemon's \
                     configuration gives the window ({}) or at least {share}",
                    limits.shm_size
                ));
            }
        }
        for (file, want) in [
            (
                "max_size",
                if spec.opts.contains_key("max-size") || attrs == 1 {
                    size_opt("max-size", limits.shm_size)
                } else {
                    Ok(num("max_size")) // checked above
                },
            ),
            ("min_align", size_opt("align", sys::page() as u64)),
            (
                "capacity",
                size_opt("max-bytes", global).map(|b| b.min(global)),
            ),
        ] {
            match want {
                Ok(want) if want != num(file) => e(format!(
                    "{file} is {} but the daemon's configuration gives {want}",
                    num(file)
                )),
                Ok(_) => {}
                Err(m) => e(m),
            }
        }
        let want_cache = match spec.opts.get("cache").map(String::as_str) {
            None => "cached",
            Some("wc") => "write-combined",
            Some(v) => v,
        };
        if want_cache != cache {
            e(format!(
                "cache {cache}, the daemon's configuration gives {want_cache}"
            ));
        }
        let host_name = spec.source.strip_prefix("dma-heap:").unwrap_or("");
        let want_contig = match spec.opts.get("contiguous").map(String::as_str) {
            Some("yes") => "1",
            Some(_) => "0",
            None if host_name.contains("cma") || host_name.contains("reserved") => "1",
            None => "0",
        };
        if want_contig != contiguous {
            e(format!(
                "contiguous {contiguous}, the daemon's configuration gives {want_contig}"
            ));
        }
    }
    if specs.len() != heaps.len() {
        errs.push(format!(
            "{} heaps in sysfs ({}), the daemon has {} ({})",
            heaps.len(),
            heaps
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            specs.len(),
            specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    check(errs.is_empty(), || errs.join("; "))?;
    // The usage counters agree with the daemon's while buffers are held.
    let h = env::sysfs_heap(&ctx.heap)?;
    wait_daemon_idle(ctx, &ctx.heap)?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let bufs: Vec<Buf> = (0..3)
        .map(|_| heap.alloc(64 << 10))
        .collect::<Result<_, _>>()?;
    let st = env::daemon_heap_stats(&ctx.daemon_name(&ctx.heap))?;
    let (bu, by) = (h.num("buffers_used")?, h.num("bytes_used")?);
    // The host also holds what the driver pools (spec 6.5.1 item 5).
    let pooled = h.num("buffers_pooled")?;
    check(bu == 3 && st.buffers == 3 + pooled, || {
        format!(
            "buffers: sysfs {bu} used + {pooled} pooled, daemon {}, want 3 used",
            st.buffers
        )
    })?;
    check(by >= 3 * (64 << 10) && st.bytes >= 3 * (64 << 10), || {
        format!(
            "bytes: sysfs {by}, daemon {}, want >= {}",
            st.bytes,
            3 * (64 << 10)
        )
    })?;
    drop(bufs);
    Ok(())
}

fn many_small(ctx: &Ctx) -> Result<(), String> {
    let n = ctx.many;
    sys::raise_nofile(n as u64 + 1024)?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let dname = ctx.daemon_name(&ctx.heap);
    let base = wait_daemon_idle(ctx, &ctx.heap)?;
    let run = sys::random_bytes(8);
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let b = heap
            .alloc(sys::page())
            .map_err(|e| format!("after {i} buffers: {e}"))?;
        let m = b.mmap().map_err(|e| format!("after {i} buffers: {e}"))?;
        let mut tag = run.clone();
        tag.extend_from_slice(&(i as u64).to_le_bytes());
        m.write(0, &tag);
        m.write(sys::page() - 8, &(i as u64).to_le_bytes());
        held.push((b, m, tag));
    }
    let alloc_time = t0.elapsed();
    for (i, (_, m, tag)) in held.iter().enumerate() {
        check(
            m.read_vec(0, 16) == *tag && m.read_vec(sys::page() - 8, 8) == (i as u64).to_le_bytes(),
            || format!("buffer {i} does not hold its own bytes (overlap?)"),
        )?;
    }
    // The host also holds what the driver pools (spec 6.5.1 item 5): a batch refill
    // during the loop leaves some. The pool may change between the two reads: retry.
    let sh = env::sysfs_heap(&ctx.heap)?;
    let mut st = env::HeapStats::default();
    let mut pooled = 0;
    env::wait_until(
        "the daemon to hold the buffers",
        Duration::from_secs(10),
        || {
            pooled = sh.num("buffers_pooled")?;
            st = env::daemon_heap_stats(&dname)?;
            Ok(st.buffers == n as u64 + pooled)
        },
    )
    .map_err(|e| {
        format!(
            "{e}: daemon holds {} buffers, want {n} + {pooled} pooled",
            st.buffers
        )
    })?;
    // Spot-check on the host: the last buffer is where the host says and holds its bytes.
    let (_, _, tag) = held.last().ok_or("no buffers")?;
    let hb = host::find_buffer(tag, sys::page())?;
    host::expect(&hb.id, sys::page() - 8, &((n - 1) as u64).to_le_bytes())?;
    drop(held);
    let mut last = st;
    env::wait_until(
        "the daemon to free every small buffer",
        Duration::from_secs(60),
        || {
            last = env::daemon_heap_stats(&dname)?;
            Ok(last.buffers == 0 && last.bytes <= base.bytes)
        },
    )
    .map_err(|e| format!("{e}: now {last:?}"))?;
    eprintln!("  many-small: {n} buffers allocated+mapped in {alloc_time:.2?}");
    Ok(())
}

fn reference_untouched(ctx: &Ctx) -> Result<(), String> {
    let reference =
        Heap::open(&ctx.reference).map_err(|e| format!("open {}: {e}", ctx.reference))?;
    let before = env::daemon_stats()?;
    let bufs: Vec<Buf> = (0..4)
        .map(|_| reference.alloc(1 << 20))
        .collect::<Result<_, _>>()?;
    for (i, b) in bufs.iter().enumerate() {
        let m = b.mmap()?;
        m.fill(i as u64);
        m.check(i as u64)
            .map_err(|off| format!("kernel heap buffer {i} wrong at {off}"))?;
    }
    let during = env::daemon_stats()?;
    let count = |s: &std::collections::BTreeMap<String, env::HeapStats>| -> u64 {
        s.values().map(|h| h.buffers).sum()
    };
    // Earlier cases' FREEs may still be landing: the count may only go down.
    check(count(&during) <= count(&before), || {
        format!(
            "allocating from /dev/dma_heap/{} changed the daemon's buffers: {} -> {}",
            ctx.reference,
            count(&before),
            count(&during)
        )
    })
}

/// Heaps published by the driver, for the demo and for picking defaults.
pub fn guest_heaps() -> Vec<SysHeap> {
    env::sysfs_heaps()
}

fn daemon_death(ctx: &Ctx) -> Result<(), String> {
    const N: usize = 2000;
    sys::raise_nofile(N as u64 + 1024)?;
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let mut held = Vec::with_capacity(N);
    for i in 0..N {
        let b = heap
            .alloc(sys::page())
            .map_err(|e| format!("after {i} buffers: {e}"))?;
        let m = b.mmap()?;
        m.write(0, &(i as u64).to_le_bytes());
        held.push((b, m));
    }
    // Shorter request timeout, so the first request after the kill gives up quickly.
    let param = "/sys/module/virtio_dmaheap/parameters/timeout_ms";
    if std::fs::write(param, "5000").is_err() {
        eprintln!("  daemon-death: could not set {param}");
    }
    host::call(&["kill-daemon"])?;
    // Release everything in a thread: if the driver blocks in release, report it here
    // rather than hang silently (the stuck thread then keeps the process from exiting).
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        drop(held);
        let _ = tx.send(());
    });
    const LIMIT: Duration = Duration::from_secs(60);
    rx.recv_timeout(LIMIT).map_err(|_| {
        format!("releasing {N} buffers after the daemon died took more than {LIMIT:?}")
    })?;
    eprintln!(
        "  daemon-death: {N} buffers released in {:.2?}",
        t0.elapsed()
    );
    Ok(())
}

fn device_reset(ctx: &Ctx) -> Result<(), String> {
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let dname = ctx.daemon_name(&ctx.heap);
    // Nothing pooled from earlier tests, so that the daemon holds exactly our buffers.
    wait_pool_empty(ctx, &env::sysfs_heap(&ctx.heap)?, "an idle heap")?;
    // Small buffers (arenas) and a large one (its own mapping), mapped and written.
    let mut held = Vec::new();
    for (i, len) in [sys::page(), sys::page(), 64 << 10, 16 << 20]
        .into_iter()
        .enumerate()
    {
        let b = heap.alloc(len)?;
        let m = b.mmap()?;
        m.fill(i as u64);
        held.push((b, m));
    }
    let before = env::daemon_heap_stats(&dname)?;
    let pooled = env::sysfs_heap(&ctx.heap)?.num("buffers_pooled")?;
    check(before.buffers == held.len() as u64 + pooled, || {
        format!(
            "daemon holds {before:?} for {} buffers and {pooled} pooled",
            held.len()
        )
    })?;
    // The virtio device the heap belongs to: .../virtio_dmaheap/virtioN/heaps/NAME.
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
    // The reset reaches the daemon as GET_VRING_BASE: it must drop every buffer and mapping
    // of every heap while the guest still holds (revoked) dma-bufs.
    let mut last = BTreeMap::new();
    env::wait_until(
        "the daemon to release everything after the reset",
        Duration::from_secs(20),
        || {
            last = env::daemon_stats()?;
            Ok(last
                .values()
                .all(|h| h.buffers == 0 && h.bytes == 0 && h.mappings.unwrap_or(0) == 0))
        },
    )
    .map_err(|e| format!("{e}: before {before:?}, now {last:?}"))?;
    let r = heap.alloc_raw(sys::page() as u64, rw_cloexec(), 0);
    check(matches!(r, Err(libc::ENODEV)), || {
        format!("ALLOC after the reset: {:?}, want ENODEV", r.map(|_| ()))
    })?;
    // Releasing the revoked buffers must not hang.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(held);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| "releasing the buffers after the reset took more than 30 s".to_string())
}

fn importer(ctx: &Ctx) -> Result<(), String> {
    const PARAM: &str = "/sys/module/dmaheap_importer/parameters/check";
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    // A sub-allocated small buffer (not at the start of its host mapping), an odd size,
    // and one large enough for a mapping of its own.
    for len in [sys::page(), 3 * sys::page() + (1 << 20), 16 << 20] {
        let b = heap.alloc(len)?;
        let m = b.mmap()?;
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        m.write(0, &pattern);
        // The module runs its checks in this write and fails it with their errno.
        std::fs::write(PARAM, b.raw().to_string())
            .map_err(|e| format!("{len} bytes: kernel importer: {e} (see dmesg)"))?;
        let (head, tail) = (m.read_vec(0, 8), m.read_vec(len - 8, 8));
        check(head == b"importer" && tail == b"importer", || {
            format!(
                "{len} bytes: the importer's vmap writes are not in the user mapping: \
                 head {head:?}, tail {tail:?}"
            )
        })?;
        check(m.read_vec(8, len - 16) == pattern[8..len - 8], || {
            format!("{len} bytes: the importer changed bytes it did not write")
        })?;
    }
    Ok(())
}
