// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A heap's cache attribute honoured: the memory type of a buffer's user mapping and of
//! its kernel vmap, as the test importer (tests/guest/importer, `memtype`) reads them from
//! the page tables, and unaligned copies through both mappings.

use crate::cases::Ctx;
use crate::env::{self, SysHeap};
use crate::sys::{self, Heap};

const PARAM: &str = "/sys/module/dmaheap_importer/parameters/memtype";
const CHECK: &str = "/sys/module/dmaheap_importer/parameters/memtype_check";
/// Where the unaligned user copy starts, and how long it is: it crosses a page boundary.
const COPY_OFF: usize = 1;

/// The memory types a heap's `cache` attribute allows on this architecture (spec section
/// 7: never a device type): x86 PAT types, arm64 MAIR indexes (the kernel's MT_* names).
fn allowed(cache: &str) -> Option<&'static [&'static str]> {
    match (std::env::consts::ARCH, cache) {
        ("x86_64", "cached") => Some(&["WB"]),
        ("x86_64", "write-combined") => Some(&["WC"]),
        ("x86_64", "uncached") => Some(&["UC-"]),
        ("aarch64", "cached") => Some(&["NORMAL", "NORMAL_TAGGED"]),
        ("aarch64", "write-combined" | "uncached") => Some(&["NORMAL_NC"]),
        _ => None,
    }
}

/// What the importer's lookup must say of pages it vmaps with PAGE_KERNEL,
/// pgprot_writecombine() and pgprot_noncached(): else the lookup, not the driver, is wrong.
fn lookup_control() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Some("kernel=WB writecombine=WC noncached=UC-"),
        "aarch64" => Some("kernel=NORMAL writecombine=NORMAL_NC noncached=DEVICE_nGnRnE"),
        _ => None,
    }
}

/// What the importer reports: `user=T kernel=T iomem=0|1 unaligned=ok|bad|skipped`.
#[derive(Debug, Default)]
struct Report {
    user: String,
    kernel: String,
    iomem: String,
    unaligned: String,
}

fn ask_importer(buf: &sys::Buf, addr: usize) -> Result<Report, String> {
    std::fs::write(PARAM, format!("{} {addr:#x}", buf.raw()))
        .map_err(|e| format!("importer memtype: {e} (see dmesg)"))?;
    let line = std::fs::read_to_string(PARAM).map_err(|e| format!("read {PARAM}: {e}"))?;
    let mut r = Report::default();
    for word in line.split_whitespace() {
        match word.split_once('=') {
            Some(("user", v)) => r.user = v.into(),
            Some(("kernel", v)) => r.kernel = v.into(),
            Some(("iomem", v)) => r.iomem = v.into(),
            Some(("unaligned", v)) => r.unaligned = v.into(),
            _ => {}
        }
    }
    if r.user.is_empty() || r.kernel.is_empty() || r.unaligned.is_empty() {
        return Err(format!("importer memtype: unexpected answer {line:?}"));
    }
    Ok(r)
}

/// Copies `pattern` into the mapping at `COPY_OFF` and reads it back with unaligned 8-byte
/// loads, in a child process (a device mapping gets SIGBUS): "ok", "mismatch" or "SIGBUS".
fn user_unaligned(map: &sys::Map, pattern: &[u8]) -> Result<String, String> {
    let base = map.as_ptr();
    let pid = sys::fork_child(|| {
        // SAFETY: COPY_OFF + pattern.len() is inside the live, writable mapping (the caller
        // maps two pages and the pattern is one page and 7 bytes); `pattern` is a distinct
        // allocation of the parent, copied into the child.
        unsafe {
            let dst = base.add(COPY_OFF);
            std::ptr::copy_nonoverlapping(pattern.as_ptr(), dst, pattern.len());
            for i in (0..pattern.len() - 7).step_by(8) {
                let got = std::ptr::read_unaligned(dst.add(i) as *const u64);
                let want = std::ptr::read_unaligned(pattern.as_ptr().add(i) as *const u64);
                if got != want {
                    return 1;
                }
            }
        }
        0
    })?;
    Ok(match sys::wait_child(pid)? {
        0 => "ok".into(),
        1 => "mismatch".into(),
        s if s == 128 + libc::SIGBUS => "SIGBUS".into(),
        s => format!("child status {s}"),
    })
}

fn check_heap(h: &SysHeap, cache: &str, want: &[&str]) -> Result<String, String> {
    let heap = Heap::open(&h.name).map_err(|e| format!("open: {e}"))?;
    let buf = heap.alloc(2 * sys::page())?;
    let map = buf.mmap()?;
    let pattern: Vec<u8> = (0..sys::page() + 7).map(|i| (i * 13 + 5) as u8).collect();
    buf.sync(sys::SYNC_START | sys::SYNC_RW)
        .map_err(|e| format!("SYNC start: {}", sys::errname(e)))?;
    let user_copy = user_unaligned(&map, &pattern)?;
    buf.sync(sys::SYNC_END | sys::SYNC_RW)
        .map_err(|e| format!("SYNC end: {}", sys::errname(e)))?;
    let r = ask_importer(&buf, map.as_ptr() as usize + COPY_OFF)?;
    let seen = format!(
        "user {} kernel {} (want {}), iomem {}, kernel unaligned copy {}, user unaligned \
         copy {user_copy}",
        r.user,
        r.kernel,
        want.join("|"),
        r.iomem,
        r.unaligned
    );
    let ok = want.contains(&r.user.as_str())
        && want.contains(&r.kernel.as_str())
        && r.unaligned == "ok"
        && user_copy == "ok";
    if ok {
        Ok(seen)
    } else {
        Err(format!("heap {} cache={cache}: {seen}", h.name))
    }
}

pub fn memtype(_ctx: &Ctx) -> Result<(), String> {
    if !std::path::Path::new(PARAM).exists() {
        println!("# memtype: no {PARAM} (insmod dmaheap_importer.ko first): skipped");
        return Ok(());
    }
    let control = std::fs::read_to_string(CHECK).map_err(|e| format!("read {CHECK}: {e}"))?;
    let control = control.trim();
    println!("# memtype: the importer's lookup of known vmaps: {control}");
    if let Some(want) = lookup_control() {
        if control != want {
            return Err(format!(
                "the importer's lookup is wrong: known vmaps give {control:?}, want {want:?}"
            ));
        }
    }
    let heaps = env::sysfs_heaps();
    if heaps.is_empty() {
        return Err(format!("no heaps under {}", env::DRIVER_DIR));
    }
    let mut errs = Vec::new();
    for h in &heaps {
        let cache = h.prop("cache")?;
        let Some(want) = allowed(&cache) else {
            errs.push(format!(
                "heap {}: cache {cache:?} on {}: no expected memory type",
                h.name,
                std::env::consts::ARCH
            ));
            continue;
        };
        match check_heap(h, &cache, want) {
            Ok(seen) => println!("# memtype: heap {} cache={cache}: {seen}", h.name),
            Err(e) => {
                println!("# memtype: {e}");
                errs.push(e);
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}
