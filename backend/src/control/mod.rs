//! Operator control socket (server side in the daemon, client side for the `stats` and
//! `ctl` subcommands). Protocol: the client sends one line, the daemon answers and closes.
//! Replies that start with `error` are failures.
//!
//! Commands: `stats` (JSON, from the snapshot the vring worker publishes: it never waits
//! for the device), `prepare-reset` (end the driver's session: every buffer leaves the
//! window and its host memory is released, so that resetting the VM next is safe with QEMU
//! 11.1; the guest's buffers are gone). With `--control-debug` also `buffers` (one line per
//! live buffer: `ID HEAP OFFSET LEN`, decimal), `peek ID OFF LEN` (hex bytes),
//! `poke ID OFF HEX`.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};

use crate::core::{DeviceHandle, HostRequest, HOST_REQUEST_TIMEOUT};

mod client;
pub mod metrics;

pub use client::{client_stats, request, StatsOutput};

/// Largest `peek` length.
pub const MAX_PEEK: u64 = 1 << 20;
const MAX_LINE: u64 = 4 * MAX_PEEK;
/// How long debug commands wait for the device lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Control socket errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating the socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Talking to the daemon failed.
    #[error("cannot talk to {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Reply(String),
    /// The stats reply is not valid JSON.
    #[error("invalid stats reply")]
    Json(#[source] serde_json::Error),
    /// Spawning the server thread failed.
    #[error("cannot start the control thread")]
    Thread(#[source] io::Error),
    /// A bad `--label`.
    #[error(transparent)]
    Label(#[from] metrics::LabelError),
    /// `--label` with another format than Prometheus.
    #[error("--label needs --format prometheus")]
    LabelNeedsPrometheus,
    /// Writing `--output` failed.
    #[error("cannot write {path}")]
    Output {
        /// The output file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing to stdout failed.
    #[error("cannot write to stdout")]
    Stdout(#[source] io::Error),
}

/// Listens on `path` (an existing file is replaced), mode 0600 from the start: no window
/// in which another user could connect. The umask is process-wide: call it during
/// start-up, before other threads create files. (The control and export sockets.)
pub(crate) fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: umask() only changes this process's file creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound
}

/// Starts the control server thread on `path` (an existing file is replaced): [`bind`],
/// then [`serve`].
pub fn spawn(
    path: &Path,
    handle: Arc<DeviceHandle>,
    debug: bool,
) -> Result<JoinHandle<()>, ControlError> {
    serve(bind(path)?, handle, debug)
}

/// Creates the control socket at `path` (an existing file is replaced), mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let listener = bind_owner_only(path).map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    info!("control socket on {}", path.display());
    Ok(listener)
}

/// Serves the control socket `listener` on a thread of its own.
pub fn serve(
    listener: UnixListener,
    handle: Arc<DeviceHandle>,
    debug: bool,
) -> Result<JoinHandle<()>, ControlError> {
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = serve_one(s, &handle, debug) {
                            warn!("control connection: {e}");
                        }
                    }
                    Err(e) => warn!("control accept: {e}"),
                }
            }
        })
        .map_err(ControlError::Thread)
}

fn serve_one(stream: UnixStream, handle: &DeviceHandle, debug: bool) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut line)?;
    let reply = execute(line.trim(), handle, debug);
    let mut w = &stream;
    w.write_all(reply.as_bytes())?;
    w.flush()
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2 + 1);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

/// Executes one command line and returns the reply (newline-terminated).
pub fn execute(line: &str, handle: &DeviceHandle, debug: bool) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let err = |m: &str| format!("error: {m}\n");
    let busy = || err("the device is busy (the front end is not answering?); try again");
    match words.as_slice() {
        ["stats"] => match serde_json::to_string(&handle.stats()) {
            Ok(j) => j + "\n",
            Err(e) => err(&e.to_string()),
        },
        ["prepare-reset"] => {
            match handle.host_request(HostRequest::PrepareReset, HOST_REQUEST_TIMEOUT) {
                Ok(m) => format!("ok: {m}\n"),
                Err(e) => err(&e),
            }
        }
        [cmd, ..] if !debug && matches!(*cmd, "buffers" | "peek" | "poke") => {
            err("debug commands need --control-debug")
        }
        ["buffers"] => {
            let Some(dev) = handle.lock_timeout(LOCK_TIMEOUT) else {
                return busy();
            };
            let mut out = String::new();
            for b in dev.buffers() {
                let _ = writeln!(out, "{} {} {} {}", b.id, b.heap, b.offset, b.len);
            }
            out
        }
        ["peek", id, off, len] => {
            let (Some(id), Some(off), Some(len)) = (parse_num(id), parse_num(off), parse_num(len))
            else {
                return err("usage: peek ID OFF LEN");
            };
            if len > MAX_PEEK {
                return err("peek length above 1 MiB");
            }
            let Some(dev) = handle.lock_timeout(LOCK_TIMEOUT) else {
                return busy();
            };
            match dev.peek(id, off, len as usize) {
                Ok(b) => hex(&b) + "\n",
                Err(e) => err(&e.to_string()),
            }
        }
        ["poke", id, off, data] => {
            let (Some(id), Some(off), Some(data)) = (parse_num(id), parse_num(off), unhex(data))
            else {
                return err("usage: poke ID OFF HEX");
            };
            let Some(dev) = handle.lock_timeout(LOCK_TIMEOUT) else {
                return busy();
            };
            match dev.poke(id, off, &data) {
                Ok(()) => "ok\n".to_string(),
                Err(e) => err(&e.to_string()),
            }
        }
        _ => err(&format!("unknown command {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_socket_is_created_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (dev, _) = crate::testing::device();
        let handle = Arc::new(DeviceHandle::new(dev).unwrap());
        spawn(&path, handle, false).unwrap();
        // With the usual umask (022) a socket is created 0755: only the umask set around
        // bind() makes it 0600, with no moment in which others could connect.
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert!(request(&path, "stats", Duration::from_secs(5))
            .unwrap()
            .starts_with('{'));
    }

    #[test]
    fn hex_roundtrip() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(unhex("00ab10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(parse_num("0x10"), Some(16));
        assert_eq!(parse_num("10"), Some(10));
    }
}
