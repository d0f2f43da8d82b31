//! The client side: the `stats` and `ctl` subcommands.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::metrics::{self, Labels};
use super::ControlError;
use crate::args::StatsFormat;
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

/// What the `stats` subcommand prints and where.
#[derive(Debug, Clone, Default)]
pub struct StatsOutput<'a> {
    /// Output format.
    pub format: StatsFormat,
    /// The operator's `--label NAME=VALUE`s (Prometheus only).
    pub labels: &'a [String],
    /// Write here (atomically) instead of stdout.
    pub output: Option<&'a Path>,
}

/// `stats` subcommand: prints a table, the JSON reply, or the Prometheus page. With the
/// Prometheus format a failed request still writes a page (`up` 0) before the error
/// is returned.
pub fn client_stats(
    path: &Path,
    out: &StatsOutput<'_>,
    timeout: Duration,
) -> Result<(), ControlError> {
    let labels = Labels::parse(out.labels)?;
    if !labels.is_empty() && out.format != StatsFormat::Prometheus {
        return Err(ControlError::LabelNeedsPrometheus);
    }
    let reply = request(path, "stats", timeout);
    let parse = |r: String| serde_json::from_str::<Stats>(&r).map_err(ControlError::Json);
    let (page, result) = match out.format {
        StatsFormat::Json => (reply?, Ok(())),
        StatsFormat::Text => (table(&reply.and_then(parse)?), Ok(())),
        StatsFormat::Prometheus => match reply.and_then(parse) {
            Ok(stats) => (metrics::render(&stats, &labels), Ok(())),
            Err(e) => (metrics::render_down(&labels), Err(e)),
        },
    };
    match out.output {
        Some(file) => write_atomically(file, page.as_bytes()),
        None => io::stdout()
            .lock()
            .write_all(page.as_bytes())
            .map_err(ControlError::Stdout),
    }?;
    result
}

fn table(stats: &Stats) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:>14} {:>9} {:>9} {:>7} {:>14} {:>8} {:>8} {:>14}",
        "HEAP",
        "BYTES",
        "BUFFERS",
        "MAPPINGS",
        "ARENAS",
        "HOST_BYTES",
        "EXPORTED",
        "RETAINED",
        "RETAINED_BYTES"
    );
    let rows = stats
        .heaps
        .iter()
        .map(|(n, h)| (n.as_str(), h))
        .chain(std::iter::once(("total", &stats.total)));
    for (name, h) in rows {
        let _ = writeln!(
            s,
            "{:<24} {:>14} {:>9} {:>9} {:>7} {:>14} {:>8} {:>8} {:>14}",
            name,
            h.bytes,
            h.buffers,
            h.mappings,
            h.arenas,
            h.host_bytes,
            h.exported,
            h.retained_buffers,
            h.retained_bytes
        );
    }
    let _ = writeln!(
        s,
        "limits: shm_size {} max_mappings {} max_buffers {} max_bytes {}",
        stats.limits.shm_size,
        stats.limits.max_mappings,
        stats.limits.max_buffers,
        stats.limits.max_bytes
    );
    s
}

/// Writes `data` to a temporary file next to `file` and renames it over `file`, so that a
/// reader (node_exporter) sees the old page or the new one, never a part. The temporary
/// name does not end in `.prom`, which the textfile collector ignores.
fn write_atomically(file: &Path, data: &[u8]) -> Result<(), ControlError> {
    let err = |source| ControlError::Output {
        path: file.to_path_buf(),
        source,
    };
    let name = file
        .file_name()
        .ok_or_else(|| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = file.with_file_name(tmp_name);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, file)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.prom");
        fs::write(&file, "old\n").unwrap();
        write_atomically(&file, b"new\n").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "new\n");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["vm.prom"]);
        let missing = dir.path().join("no-such-dir").join("vm.prom");
        let e = write_atomically(&missing, b"x").unwrap_err();
        assert!(e.to_string().contains("no-such-dir"), "{e}");
    }

    #[test]
    fn labels_need_the_prometheus_format() {
        let out = StatsOutput {
            format: StatsFormat::Json,
            labels: &["vm=a".to_string()],
            output: None,
        };
        let e = client_stats(Path::new("/nonexistent"), &out, Duration::from_secs(1));
        assert!(
            matches!(e, Err(ControlError::LabelNeedsPrometheus)),
            "{e:?}"
        );
    }
}
