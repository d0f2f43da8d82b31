// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cases for L2 of tests/nested/run, where the daemon runs in L1 on L1's real heaps: what
//! the host (L1) sees of a guest buffer, through the host hooks of tests/nested/l1-hook.sh
//! (`pfns-start`, `pfns`, `trace-start`, `trace-stop`). Both hold a buffer larger than the daemon's
//! default arena-size/8 (8 MiB), so that it has a host dma-buf and a mapping of its own.

use crate::cases::{heap_has_feature, Ctx};
use crate::env;
use crate::host;
use crate::sys::{self, errname, Heap};

/// 16 MiB and a page: above the default small-buffer limit, and a size no arena has
/// (arenas are multiples of 2 MiB), so L1 finds the buffer's mapping by its size.
fn buf_len() -> usize {
    (16 << 20) + sys::page()
}
/// SYNC brackets per traced run.
const BRACKETS: u64 = 50;

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// `KEY=VALUE` of a hook's output line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// One `map ... present=P/N runs=R ... contiguous=yes|no` line of `pfns`.
#[derive(Debug)]
struct Pages {
    present: u64,
    total: u64,
    runs: u64,
    first_pfn: String,
}

fn pages(line: &str) -> Result<Pages, String> {
    let bad = || format!("pfns: cannot parse {line:?}");
    let (p, n) = field(line, "present")
        .and_then(|v| v.split_once('/'))
        .ok_or_else(bad)?;
    Ok(Pages {
        present: p.parse().map_err(|_| bad())?,
        total: n.parse().map_err(|_| bad())?,
        runs: field(line, "runs")
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?,
        first_pfn: field(line, "first_pfn").ok_or_else(bad)?.to_string(),
    })
}

/// The host pages of a large buffer, as L1 sees them mapped into L2's QEMU (pagemap, or
/// kprobes for the VM_PFNMAP mappings of dma-bufs): all there once the guest touched them,
/// and one run of consecutive page frames if the heap says `contiguous` in sysfs (a CMA
/// heap); for other heaps the runs are only reported.
pub fn host_pages(ctx: &Ctx) -> Result<(), String> {
    let sh = env::sysfs_heap(&ctx.heap)?;
    let contiguous = sh.prop("contiguous")? == "1";
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    // L1 records the page frames the kernel maps into QEMU and the daemon from now on.
    host::call(&["pfns-start"])?;
    let buf = heap.alloc(buf_len())?;
    let map = buf.mmap()?;
    // Every page written: QEMU's page table (which KVM fills on L2's faults) has them all.
    let seed = u64::from_le_bytes(sys::random_bytes(8).try_into().unwrap_or_default());
    map.fill(seed);
    let out = host::call(&["pfns", &buf_len().to_string()])?;
    for l in out.lines() {
        println!("  host-pages {}: {l}", ctx.heap);
    }
    let qemu: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("qemu: map "))
        .collect();
    check(qemu.len() == 1, || {
        format!(
            "want one {}-byte mapping in L2's QEMU, L1 found {}:\n{out}",
            buf_len(),
            qemu.len()
        )
    })?;
    let q = pages(qemu[0])?;
    check(
        q.present == q.total && q.total == (buf_len() / sys::page()) as u64,
        || {
            format!(
                "only {}/{} pages of the buffer are mapped in QEMU after the guest wrote \
                 every one (want {}):\n{out}",
                q.present,
                q.total,
                buf_len() / sys::page()
            )
        },
    )?;
    // The daemon's own mapping (dma-heap buffers) shows the same frames where it has them.
    for d in out.lines().filter(|l| l.starts_with("daemon: map ")) {
        let d = pages(d)?;
        if d.present == d.total {
            check(d.first_pfn == q.first_pfn && d.runs == q.runs, || {
                format!("the daemon's mapping shows other page frames than QEMU's:\n{out}")
            })?;
        }
    }
    if contiguous {
        check(q.runs == 1, || {
            format!(
                "heap {} says contiguous=1, but the buffer's {} pages are in {} runs of \
                 consecutive page frames on the host:\n{out}",
                ctx.heap, q.total, q.runs
            )
        })?;
        println!(
            "  host-pages {}: contiguous heap, {} pages in 1 run from PFN {}: \
             physically contiguous",
            ctx.heap, q.total, q.first_pfn
        );
    } else {
        println!(
            "  host-pages {}: non-contiguous heap (not required), {} pages in {} run(s) \
             of consecutive page frames{}",
            ctx.heap,
            q.total,
            q.runs,
            if q.runs == 1 {
                ": contiguous by chance"
            } else {
                ""
            }
        );
    }
    map.check(seed)
        .map_err(|off| format!("the buffer changed at offset {off}"))
}

/// `daemon begin=N end=N lost=N` of `trace-stop`.
fn traced(out: &str) -> Result<(u64, u64), String> {
    let line = out
        .lines()
        .find(|l| l.starts_with("daemon "))
        .ok_or_else(|| format!("trace-stop: no `daemon` line in {out:?}"))?;
    let num = |k: &str| {
        field(line, k)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("trace-stop: no {k}= in {line:?}"))
    };
    let lost = num("lost")?;
    check(lost == 0, || {
        format!("the trace lost {lost} events:\n{out}")
    })?;
    Ok((num("begin")?, num("end")?))
}

/// Each guest SYNC bracket on a buffer with a host dma-buf of its own reaches the host
/// exporter's begin_cpu_access and end_cpu_access once, called by the daemon (L1's
/// function tracer): BRACKETS brackets add BRACKETS calls of each to a run that touches the
/// buffer as often without SYNC. Heaps marked NO_SYNC (memfd) have nothing to trace.
pub fn host_sync(ctx: &Ctx) -> Result<(), String> {
    let sh = env::sysfs_heap(&ctx.heap)?;
    check(
        !heap_has_feature(&sh, 3)? || !crate::lifecycle::dmesg_says_no_host_sync(&ctx.heap)?,
        || {
            format!(
                "heap {} is NO_SYNC: its buffers have no host dma-buf to trace",
                ctx.heap
            )
        },
    )?;
    let name = ctx.daemon_name(&ctx.heap);
    let heap = Heap::open(&ctx.heap).map_err(|e| format!("open {}: {e}", ctx.heap))?;
    let buf = heap.alloc(buf_len())?;
    let map = buf.mmap()?;
    let run = |sync: bool| -> Result<(u64, u64), String> {
        let start = host::call(&["trace-start", &name])?;
        let res = (|| {
            for i in 0..BRACKETS {
                if sync {
                    buf.sync(sys::SYNC_START | sys::SYNC_RW)
                        .map_err(|e| format!("SYNC START: {}", errname(e)))?;
                }
                map.write((i as usize * sys::page()) % buf_len(), &i.to_le_bytes());
                if sync {
                    buf.sync(sys::SYNC_END | sys::SYNC_RW)
                        .map_err(|e| format!("SYNC END: {}", errname(e)))?;
                }
            }
            Ok::<(), String>(())
        })();
        let out = host::call(&["trace-stop"])?;
        res?;
        for l in start.lines().chain(out.lines()) {
            println!(
                "  host-sync {} ({}): {l}",
                ctx.heap,
                if sync { "SYNC" } else { "no SYNC" }
            );
        }
        traced(&out)
    };
    let (b0, e0) = run(false)?;
    let (b1, e1) = run(true)?;
    let (db, de) = (b1.saturating_sub(b0), e1.saturating_sub(e0));
    println!(
        "  host-sync {}: {BRACKETS} brackets: begin_cpu_access +{db} ({b0} -> {b1}), \
             end_cpu_access +{de} ({e0} -> {e1}) in the daemon",
        ctx.heap
    );
    check(
        db == BRACKETS && de == BRACKETS && b1 >= b0 && e1 >= e0,
        || {
            format!(
                "{BRACKETS} SYNC brackets made the daemon call the exporter's \
                 begin_cpu_access {b1} times and end_cpu_access {e1} times, {b0} and {e0} \
                 without SYNC; want {BRACKETS} more of each"
            )
        },
    )
}
