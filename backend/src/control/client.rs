//! The client side: the `stats` and `ctl` subcommands.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::ControlError;
use crate::core::Stats;

/// Sends one command line and returns the reply, waiting at most `timeout` for it.
pub fn request(path: &Path, line: &str, timeout: Duration) -> Result<String, ControlError> {
    let cerr = |source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(cerr)?;
    s.set_read_timeout(Some(timeout)).map_err(cerr)?;
    s.set_write_timeout(Some(timeout)).map_err(cerr)?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(cerr)?;
    s.shutdown(std::net::Shutdown::Write).map_err(cerr)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(cerr)?;
    if reply.starts_with("error") {
        return Err(ControlError::Reply(reply.trim_end().to_string()));
    }
    Ok(reply)
}

/// `stats` subcommand: prints a table, or the JSON with `json`.
pub fn client_stats(path: &Path, json: bool, timeout: Duration) -> Result<(), ControlError> {
    let reply = request(path, "stats", timeout)?;
    if json {
        print!("{reply}");
        return Ok(());
    }
    let stats: Stats = serde_json::from_str(&reply).map_err(ControlError::Json)?;
    println!(
        "{:<24} {:>14} {:>9} {:>9} {:>7} {:>14}",
        "HEAP", "BYTES", "BUFFERS", "MAPPINGS", "ARENAS", "HOST_BYTES"
    );
    let rows = stats
        .heaps
        .iter()
        .map(|(n, h)| (n.as_str(), h))
        .chain(std::iter::once(("total", &stats.total)));
    for (name, h) in rows {
        println!(
            "{:<24} {:>14} {:>9} {:>9} {:>7} {:>14}",
            name, h.bytes, h.buffers, h.mappings, h.arenas, h.host_bytes
        );
    }
    println!(
        "limits: shm_size {} max_mappings {} max_buffers {} max_bytes {}",
        stats.limits.shm_size,
        stats.limits.max_mappings,
        stats.limits.max_buffers,
        stats.limits.max_bytes
    );
    Ok(())
}
