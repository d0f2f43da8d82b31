// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Client of run-guest's host hooks (tests/vm/run-guest): one request line
//! `ID COMMAND ARGS...` on the virtio-serial port /dev/rg-hook, one reply line
//! `ID STATUS NLINES` followed by NLINES lines of output.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
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
    call_timeout(args, TIMEOUT)
}

/// After a guest suspend the hook port is dead (the guest's virtio-serial driver resets
/// the device and QEMU does not say again that the host end is open): ask run-guest, with
/// a marker on the console, to make QEMU connect the port again; wait until a hook answers.
pub fn reconnect() -> Result<(), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| e.to_string())?;
    let nonce = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rg.nonce="))
        .ok_or("no rg.nonce on the kernel command line")?;
    let mut last = String::new();
    for _ in 0..5 {
        std::fs::write("/dev/console", format!("@@RG-{nonce} HOOK-RECONNECT\n"))
            .map_err(|e| format!("/dev/console: {e}"))?;
        match call_timeout(&["boot"], Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(format!("the host hooks did not come back: {last}"))
}

/// Writes all of `data` to the non-blocking port before `deadline`.
fn write_all(port: &mut Port, data: &[u8], deadline: Instant) -> Result<(), String> {
    let mut done = 0;
    while done < data.len() {
        match port.file.write(&data[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err("timed out writing to the host hook port".into());
                }
                let mut pfd = libc::pollfd {
                    fd: port.file.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            }
            Err(e) => return Err(format!("write {HOOK_PATH}: {e}")),
        }
    }
    Ok(())
}

/// Run a host hook, waiting at most `timeout` for it; its exit status and output.
pub fn call_timeout(args: &[&str], timeout: Duration) -> Result<(i32, String), String> {
    let mut guard = PORT
        .lock()
        .map_err(|_| "host port lock poisoned".to_string())?;
    if guard.is_none() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
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
    let deadline = Instant::now() + timeout;
    write_all(port, req.as_bytes(), deadline)?;
    let (header, f) = loop {
        let header = read_line(port, deadline)?;
        let f: Vec<String> = header.split_whitespace().map(str::to_string).collect();
        let rid: Option<u64> = f.first().and_then(|r| r.parse().ok());
        match (f.len(), rid) {
            (3, Some(r)) if r == id => break (header, f),
            // The late reply to a request that timed out: skip it and its lines.
            (3, Some(r)) if r < id => {
                let n: usize = f[2].parse().unwrap_or(0);
                for _ in 0..n {
                    read_line(port, deadline)?;
                }
            }
            _ => return Err(format!("bad host reply header {header:?} to request {id}")),
        }
    };
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
        let n = match port.file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("read {HOOK_PATH}: {e}")),
        };
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
