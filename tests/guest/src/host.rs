// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Client of run-guest's host hooks (tests/vm/run-guest): one request line
//! `ID COMMAND ARGS...` on the virtio-serial port /dev/rg-hook, one reply line
//! `ID STATUS NLINES` followed by NLINES lines of output.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const HOOK_PATH: &str = "/dev/rg-hook";
const TIMEOUT: Duration = Duration::from_secs(120);

struct Port {
    file: File,
    next_id: u64,
    pending: Vec<u8>,
}

static PORT: Mutex<Option<Port>> = Mutex::new(None);

/// Run a host hook; `Ok(output)` if it exited 0, `Err(message)` otherwise.
pub fn call(args: &[&str]) -> Result<String, String> {
    let (status, out) = call_status(args)?;
    if status != 0 {
        return Err(format!(
            "host `{}` failed ({status}): {}",
            args.join(" "),
            out.trim()
        ));
    }
    Ok(out)
}

/// Run a host hook; its exit status and output.
pub fn call_status(args: &[&str]) -> Result<(i32, String), String> {
    let mut guard = PORT
        .lock()
        .map_err(|_| "host port lock poisoned".to_string())?;
    if guard.is_none() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(HOOK_PATH)
            .map_err(|e| format!("open {HOOK_PATH}: {e} (not booted by run-guest?)"))?;
        *guard = Some(Port {
            file,
            next_id: 1,
            pending: Vec::new(),
        });
    }
    let port = guard.as_mut().ok_or("no port")?;
    let id = port.next_id;
    port.next_id += 1;
    let req = format!("{id} {}\n", args.join(" "));
    port.file
        .write_all(req.as_bytes())
        .map_err(|e| format!("write {HOOK_PATH}: {e}"))?;
    let deadline = Instant::now() + TIMEOUT;
    let header = read_line(port, deadline)?;
    let f: Vec<&str> = header.split_whitespace().collect();
    if f.len() != 3 || f[0] != id.to_string() {
        return Err(format!("bad host reply header {header:?} to request {id}"));
    }
    let status: i32 = f[1]
        .parse()
        .map_err(|_| format!("bad status in {header:?}"))?;
    let n: usize = f[2]
        .parse()
        .map_err(|_| format!("bad count in {header:?}"))?;
    let mut out = String::new();
    for _ in 0..n {
        out.push_str(&read_line(port, deadline)?);
        out.push('\n');
    }
    Ok((status, out))
}

fn read_line(port: &mut Port, deadline: Instant) -> Result<String, String> {
    loop {
        if let Some(pos) = port.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = port.pending.drain(..=pos).collect();
            return Ok(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for the host hook reply".into());
        }
        let mut pfd = libc::pollfd {
            fd: port.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if rc <= 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        let n = port
            .file
            .read(&mut buf)
            .map_err(|e| format!("read {HOOK_PATH}: {e}"))?;
        if n == 0 {
            // The host side is not connected right now; poll again until the deadline.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        port.pending.extend_from_slice(&buf[..n]);
    }
}

/// Where the host sees a guest buffer: found by the unique bytes at its start.
#[derive(Debug, Clone)]
pub struct HostBuf {
    pub id: String,
    pub heap: String,
    pub offset: u64,
    pub len: u64,
}

pub fn find_buffer(tag: &[u8], min_len: usize) -> Result<HostBuf, String> {
    let out = call(&["find-buffer", &crate::sys::hex(tag), &min_len.to_string()])?;
    let f: Vec<&str> = out.split_whitespace().collect();
    if f.len() != 4 {
        return Err(format!("find-buffer: unexpected reply {out:?}"));
    }
    Ok(HostBuf {
        id: f[0].to_string(),
        heap: f[1].to_string(),
        offset: parse_num(f[2])?,
        len: parse_num(f[3])?,
    })
}

/// Bytes of a host buffer, read on the host (`ctl peek`).
pub fn peek(id: &str, off: usize, len: usize) -> Result<Vec<u8>, String> {
    let out = call(&["ctl", "peek", id, &off.to_string(), &len.to_string()])?;
    crate::sys::unhex(&out).ok_or_else(|| format!("peek: not hex: {out:?}"))
}

/// Ask the host to compare bytes of a host buffer; a mismatch also fails run-guest.
pub fn expect(id: &str, off: usize, data: &[u8]) -> Result<(), String> {
    call(&["expect", id, &off.to_string(), &crate::sys::hex(data)]).map(|_| ())
}

/// Write bytes into a host buffer on the host (`ctl poke`).
pub fn poke(id: &str, off: usize, data: &[u8]) -> Result<(), String> {
    call(&["ctl", "poke", id, &off.to_string(), &crate::sys::hex(data)]).map(|_| ())
}

pub fn parse_num(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|_| format!("not a number: {s:?}"))
}
