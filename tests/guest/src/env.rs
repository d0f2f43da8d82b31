// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the guest sees of the device: heaps in sysfs, and what the host says (daemon stats
//! and command line, through run-guest's host hooks).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::host;
use crate::json;

pub const DRIVER_DIR: &str = "/sys/bus/virtio/drivers/virtio_dmaheap";
pub const PROP_FILES: [&str; 10] = [
    "heap_id",
    "contiguous",
    "cache",
    "min_align",
    "max_size",
    "capacity",
    "bytes_used",
    "buffers_used",
    "bytes_pooled",
    "buffers_pooled",
];

/// One heap published by the driver in sysfs.
#[derive(Debug, Clone)]
pub struct SysHeap {
    pub name: String,
    pub dir: PathBuf,
}

impl SysHeap {
    pub fn prop(&self, file: &str) -> Result<String, String> {
        std::fs::read_to_string(self.dir.join(file))
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("{}/{file}: {e}", self.dir.display()))
    }

    pub fn num(&self, file: &str) -> Result<u64, String> {
        let s = self.prop(file)?;
        host::parse_num(&s).map_err(|e| format!("{}/{file}: {e}", self.dir.display()))
    }
}

/// Every heap under /sys/bus/virtio/drivers/virtio_dmaheap/virtio*/heaps/.
pub fn sysfs_heaps() -> Vec<SysHeap> {
    let mut out = Vec::new();
    let Ok(devs) = std::fs::read_dir(DRIVER_DIR) else {
        return out;
    };
    let mut devs: Vec<PathBuf> = devs
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        .map(|e| e.path())
        .collect();
    devs.sort();
    for d in devs {
        let Ok(heaps) = std::fs::read_dir(d.join("heaps")) else {
            continue;
        };
        let mut hs: Vec<SysHeap> = heaps
            .flatten()
            .map(|e| SysHeap {
                name: e.file_name().to_string_lossy().into_owned(),
                dir: e.path(),
            })
            .collect();
        hs.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(hs);
    }
    out
}

pub fn sysfs_heap(name: &str) -> Result<SysHeap, String> {
    sysfs_heaps()
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| format!("no heap {name} under {DRIVER_DIR}/virtio*/heaps/"))
}

/// Per-heap counters from the daemon's `stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    pub bytes: u64,
    pub buffers: u64,
    pub mappings: Option<u64>,
    /// Host memory held for the heap (arenas and own mappings), if the daemon says.
    pub host_bytes: Option<u64>,
    /// Buffers with a UUID, and buffers freed by the guest but held for importers (and
    /// their bytes, counted in `bytes` too), if the daemon says.
    pub exported: Option<u64>,
    pub retained_buffers: Option<u64>,
    pub retained_bytes: Option<u64>,
}

/// The daemon's stats for every heap (by the daemon's heap name).
pub fn daemon_stats() -> Result<BTreeMap<String, HeapStats>, String> {
    let text = host::call(&["stats"])?;
    let v = json::parse(text.trim()).map_err(|e| format!("stats: {e} in {text:?}"))?;
    let mut out = BTreeMap::new();
    let heaps = v.get("heaps").unwrap_or(&v);
    let mut add = |name: &str, h: &json::Value| {
        if let (Some(bytes), Some(buffers)) = (
            h.get("bytes").and_then(json::Value::as_u64),
            h.get("buffers").and_then(json::Value::as_u64),
        ) {
            out.insert(
                name.to_string(),
                HeapStats {
                    bytes,
                    buffers,
                    mappings: h.get("mappings").and_then(json::Value::as_u64),
                    host_bytes: h.get("host_bytes").and_then(json::Value::as_u64),
                    exported: h.get("exported").and_then(json::Value::as_u64),
                    retained_buffers: h.get("retained_buffers").and_then(json::Value::as_u64),
                    retained_bytes: h.get("retained_bytes").and_then(json::Value::as_u64),
                },
            );
        }
    };
    match heaps {
        json::Value::Obj(m) => {
            for (k, h) in m {
                if !matches!(k.as_str(), "total" | "totals") {
                    add(k, h);
                }
            }
        }
        json::Value::Arr(a) => {
            for h in a {
                if let Some(json::Value::Str(n)) = h.get("name") {
                    add(&n.clone(), h);
                }
            }
        }
        _ => {}
    }
    if out.is_empty() {
        return Err(format!("stats: no per-heap bytes/buffers in {text:?}"));
    }
    Ok(out)
}

/// The daemon's totals, session state and reserved window bytes (`stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    pub buffers: u64,
    pub bytes: u64,
    pub mappings: u64,
    pub host_bytes: u64,
    /// `open`, `suspended`, `closed` or `implicit`.
    pub session: String,
    pub reserved_bytes: u64,
}

pub fn daemon_overview() -> Result<Overview, String> {
    let text = host::call(&["stats"])?;
    let v = json::parse(text.trim()).map_err(|e| format!("stats: {e} in {text:?}"))?;
    let num = |v: Option<&json::Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(json::Value::as_u64)
            .ok_or_else(|| format!("stats: no {k} in {text:?}"))
    };
    let total = v.get("total");
    Ok(Overview {
        buffers: num(total, "buffers")?,
        bytes: num(total, "bytes")?,
        mappings: num(total, "mappings")?,
        host_bytes: num(total, "host_bytes")?,
        session: match v.get("session") {
            Some(json::Value::Str(s)) => s.clone(),
            _ => return Err(format!("stats: no session in {text:?}")),
        },
        reserved_bytes: num(Some(&v), "reserved_bytes")?,
    })
}

/// The limits the daemon reports in `stats`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub shm_size: u64,
    pub max_bytes: u64,
}

pub fn daemon_limits() -> Result<Limits, String> {
    let text = host::call(&["stats"])?;
    let v = json::parse(text.trim()).map_err(|e| format!("stats: {e} in {text:?}"))?;
    let l = v
        .get("limits")
        .ok_or_else(|| format!("stats: no limits in {text:?}"))?;
    let get = |k: &str| {
        l.get(k)
            .and_then(json::Value::as_u64)
            .ok_or_else(|| format!("stats: no limits.{k} in {text:?}"))
    };
    Ok(Limits {
        shm_size: get("shm_size")?,
        max_bytes: get("max_bytes")?,
    })
}

pub fn daemon_heap_stats(daemon_name: &str) -> Result<HeapStats, String> {
    daemon_stats()?
        .remove(daemon_name)
        .ok_or_else(|| format!("daemon stats have no heap {daemon_name:?}"))
}

/// Poll `f` until it returns Ok(true) or the deadline passes.
pub fn wait_until<F>(what: &str, timeout: Duration, mut f: F) -> Result<(), String>
where
    F: FnMut() -> Result<bool, String>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = e,
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what}{}",
                if last.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last})")
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A heap as the daemon was told to export it (`--heap NAME=SOURCE[,OPT=VAL]...`).
#[derive(Debug, Clone, Default)]
pub struct HeapSpec {
    pub name: String,
    pub source: String,
    pub opts: BTreeMap<String, String>,
}

/// The daemon's `--heap` arguments, from run-guest's `daemon-args` hook.
pub fn daemon_heap_specs() -> Result<Vec<HeapSpec>, String> {
    let args = host::call(&["daemon-args"])?;
    let args: Vec<&str> = args.lines().collect();
    let mut specs = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        let val = if a == "--heap" {
            i += 1;
            args.get(i).copied()
        } else {
            a.strip_prefix("--heap=")
        };
        if let Some(v) = val {
            let (name, rest) = v
                .split_once('=')
                .ok_or_else(|| format!("bad --heap {v:?}"))?;
            let mut parts = rest.split(',');
            let source = parts.next().unwrap_or_default().to_string();
            let mut opts = BTreeMap::new();
            for p in parts {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                opts.insert(k.to_string(), v.to_string());
            }
            specs.push(HeapSpec {
                name: name.to_string(),
                source,
                opts,
            });
        }
        i += 1;
    }
    Ok(specs)
}

/// `SIZE` with the daemon's K/M/G (powers of 1024) suffixes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    host::parse_num(num)?
        .checked_mul(mult)
        .ok_or_else(|| format!("size overflows: {s}"))
}

/// The heap-name prefix the driver was loaded with (run-guest exports it).
pub fn heap_prefix() -> String {
    std::env::var("DMAHEAP_HEAP_PREFIX").unwrap_or_default()
}
