// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! In-guest tests of virtio-dmaheap, run by tests/vm/run-guest (see tests/run-all).
//!
//!     dmaheap-guest-tests [--heap NAME] [--reference NAME] [--quota-heap NAME]
//!                         [--many N] [-v] [CASE...]
//!     dmaheap-guest-tests --list
//!     dmaheap-guest-tests demo
//!
//! Prints one line per case and a final `N passed, N failed` line; exits 0 only if every
//! case passed. Cases that check the host side use run-guest's host hooks.

mod cases;
mod env;
mod host;
mod json;
mod lifecycle;
mod memtype;
mod nested;
mod sharing;
mod sys;
mod uuid;

use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: dmaheap-guest-tests [--heap NAME] [--reference NAME] \
[--quota-heap NAME] [--many N] [-v] [CASE...] | --list | demo";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmaheap-guest-tests: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let prefix = env::heap_prefix();
    let mut ctx = cases::Ctx {
        heap: String::new(),
        reference: "system".into(),
        quota_heap: format!("{prefix}quota"),
        many: 10_000,
        prefix,
        verbose: false,
    };
    let mut selected = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--heap" => ctx.heap = val(a)?,
            "--reference" => ctx.reference = val(a)?,
            "--quota-heap" => ctx.quota_heap = val(a)?,
            "--many" => ctx.many = val(a)?.parse().map_err(|_| "--many: not a number")?,
            "-v" | "--verbose" => ctx.verbose = true,
            "--list" => {
                for (name, doc, _) in cases::CASES.iter().chain(cases::EXPLICIT_CASES) {
                    println!("{name:20} {doc}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            "demo" if selected.is_empty() => return Ok(demo(&ctx)),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => {
                if !cases::CASES
                    .iter()
                    .chain(cases::EXPLICIT_CASES)
                    .any(|(n, _, _)| *n == s)
                {
                    return Err(format!("unknown case {s} (see --list)"));
                }
                selected.push(s.to_string());
            }
        }
    }
    if ctx.heap.is_empty() {
        ctx.heap = default_heap(&ctx.prefix);
    }
    println!(
        "# heap under test: {}, reference: {}, quota heap: {}",
        ctx.heap, ctx.reference, ctx.quota_heap
    );
    let (mut passed, mut failed) = (0, 0);
    for (i, (name, _, f)) in cases::CASES.iter().chain(cases::EXPLICIT_CASES).enumerate() {
        let explicit = i >= cases::CASES.len();
        if (explicit || !selected.is_empty()) && !selected.iter().any(|s| s == name) {
            continue;
        }
        let t0 = Instant::now();
        let res =
            std::panic::catch_unwind(|| f(&ctx)).unwrap_or_else(|_| Err("panicked".to_string()));
        let secs = t0.elapsed().as_secs_f64();
        match res {
            Ok(()) => {
                passed += 1;
                println!("ok   {name} ({secs:.1}s)");
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name} ({secs:.1}s): {e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `PREFIXsystem` if the driver published it, else the first host-backed heap.
fn default_heap(prefix: &str) -> String {
    let heaps = cases::guest_heaps();
    let want = format!("{prefix}system");
    if heaps.iter().any(|h| h.name == want) {
        return want;
    }
    heaps.first().map(|h| h.name.clone()).unwrap_or(want)
}

/// The demo: list the host-backed heaps, allocate, write, have the host verify.
fn demo(ctx: &cases::Ctx) -> ExitCode {
    match demo_inner(ctx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("demo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo_inner(ctx: &cases::Ctx) -> Result<(), String> {
    let heaps = cases::guest_heaps();
    if heaps.is_empty() {
        return Err(format!("no host-backed heaps under {}", env::DRIVER_DIR));
    }
    println!("Host-backed dma-buf heaps in this guest:");
    for h in &heaps {
        let props: Vec<String> = env::PROP_FILES
            .iter()
            .map(|f| format!("{f}={}", h.prop(f).unwrap_or_else(|_| "?".into())))
            .collect();
        println!("  /dev/dma_heap/{:<14} {}", h.name, props.join(" "));
    }
    let mut kernel: Vec<String> = std::fs::read_dir("/dev/dma_heap")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    kernel.retain(|n| !heaps.iter().any(|h| &h.name == n));
    kernel.sort();
    println!("Guest kernel's own heaps: {}", kernel.join(" "));

    let name = if ctx.heap.is_empty() {
        default_heap(&ctx.prefix)
    } else {
        ctx.heap.clone()
    };
    let heap = sys::Heap::open(&name).map_err(|e| format!("open {name}: {e}"))?;
    let len = 256 << 10;
    let buf = heap.alloc(len)?;
    buf.set_name(b"demo").map_err(sys::errname)?;
    let map = buf.mmap()?;
    buf.sync(sys::SYNC_START | sys::SYNC_WRITE)
        .map_err(sys::errname)?;
    map.fill(0xde40);
    let tag = sys::random_bytes(16);
    map.write(0, &tag);
    buf.sync(sys::SYNC_END | sys::SYNC_WRITE)
        .map_err(sys::errname)?;
    println!(
        "Allocated {} KiB from {name}, named it \"demo\", wrote a pattern",
        len >> 10
    );
    let hb = host::find_buffer(&tag, len)?;
    println!(
        "Host: that is buffer {} of host heap {} at window offset {:#x} ({} bytes)",
        hb.id, hb.heap, hb.offset, hb.len
    );
    // The host reads every byte of the buffer and compares it with what the guest wrote.
    let chunk = 16 << 10;
    for off in (0..len).step_by(chunk) {
        host::expect(&hb.id, off, &map.read_vec(off, chunk))?;
    }
    println!("Host: verified all {len} bytes in its own memory (no copies made)");
    let msg = b"hello from the host";
    host::poke(&hb.id, 4096, msg)?;
    env::wait_until(
        "the host's write",
        std::time::Duration::from_secs(5),
        || Ok(map.read_vec(4096, msg.len()) == msg),
    )?;
    println!(
        "Guest: read {:?} that the host wrote into the buffer",
        String::from_utf8_lossy(msg)
    );
    let st = env::daemon_heap_stats(&ctx.daemon_name(&name))?;
    println!(
        "Host stats for heap {}: {} bytes in {} buffers",
        ctx.daemon_name(&name),
        st.bytes,
        st.buffers
    );
    drop(map);
    drop(buf);
    println!(
        "Summary: {} host-backed heap(s); {} KiB allocated from {name}; zero-copy verified \
         guest->host ({len} bytes) and host->guest ({} bytes)",
        heaps.len(),
        len >> 10,
        msg.len()
    );
    Ok(())
}
