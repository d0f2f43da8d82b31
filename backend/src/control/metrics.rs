//! The `stats` reply in the Prometheus text exposition format 0.0.4, for node_exporter's
//! textfile collector (`stats --format prometheus`). The metrics are documented in
//! packaging/metrics/README.md; [`FAMILIES`] is the list that document must match.
//!
//! Every value is a gauge: the daemon's counters go down as well as up. No timestamps
//! (the textfile collector rejects them) and a fixed order, so that two pages of the
//! same state are byte-identical.

use std::fmt::Write as _;

use crate::core::{HeapStats, Stats};

/// Prefix of every metric name.
pub const PREFIX: &str = "vhost_user_dmaheap_";

/// Label that names the heap in the per-heap metrics.
pub const HEAP_LABEL: &str = "heap";
/// Label of the session metric.
pub const STATE_LABEL: &str = "state";

/// The session states `stats` reports; each gets a sample (1 for the current one).
pub const SESSION_STATES: [&str; 4] = ["open", "suspended", "closed", "implicit"];

/// One metric family: name without [`PREFIX`], labels its samples carry (besides the
/// operator's `--label`s), help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// Name without [`PREFIX`].
    pub name: &'static str,
    /// Labels of its samples, besides the operator's `--label`s.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn fam(name: &'static str, labels: &'static [&'static str], help: &'static str) -> Family {
    Family { name, labels, help }
}

const NONE: &[&str] = &[];
const HEAP: &[&str] = &[HEAP_LABEL];

/// Every family, in output order (all gauges).
pub const FAMILIES: [Family; 23] = [
    fam("up", NONE, "1 if the daemon answered the stats request, 0 if not."),
    fam("heap_buffer_bytes", HEAP, "Bytes held by the guest's live buffers of the heap."),
    fam("heap_buffers", HEAP, "Live buffers of the heap."),
    fam(
        "heap_mappings",
        HEAP,
        "Live mappings of the heap in the shared memory window (arenas and buffers with a mapping of their own).",
    ),
    fam(
        "heap_arenas",
        HEAP,
        "Live arenas of the heap (host allocations shared by small buffers).",
    ),
    fam(
        "heap_host_bytes",
        HEAP,
        "Host memory held for the heap (all its mappings), in bytes.",
    ),
    fam(
        "heap_exported_buffers",
        HEAP,
        "Live buffers of the heap that have a UUID (ASSIGN_UUID): shared with other devices.",
    ),
    fam(
        "heap_retained_buffers",
        HEAP,
        "Buffers of the heap the guest freed while other devices may still hold them: kept out of reuse and still counted in heap_buffers.",
    ),
    fam(
        "heap_retained_bytes",
        HEAP,
        "Bytes of the heap's retained buffers (still counted in heap_buffer_bytes).",
    ),
    fam("buffer_bytes", NONE, "Bytes held by the guest's live buffers, all heaps."),
    fam("buffers", NONE, "Live buffers, all heaps."),
    fam("mappings", NONE, "Live mappings in the shared memory window, all heaps."),
    fam("arenas", NONE, "Live arenas, all heaps."),
    fam("host_bytes", NONE, "Host memory held for the guest's buffers, all heaps, in bytes."),
    fam(
        "exported_buffers",
        NONE,
        "Live buffers that have a UUID (ASSIGN_UUID), all heaps.",
    ),
    fam(
        "retained_buffers",
        NONE,
        "Buffers freed by the guest but held for other devices, all heaps (still counted in buffers).",
    ),
    fam(
        "retained_bytes",
        NONE,
        "Bytes of the retained buffers, all heaps (still counted in buffer_bytes).",
    ),
    fam(
        "reserved_bytes",
        NONE,
        "Bytes of the window the guest driver reserved (RESERVE requests).",
    ),
    fam("shm_size_bytes", NONE, "Size of the shared memory window (--shm-size)."),
    fam("limit_mappings", NONE, "Most live mappings in the window (--max-mappings)."),
    fam("limit_buffers", NONE, "Most live buffers (--max-buffers)."),
    fam("limit_buffer_bytes", NONE, "Most bytes held by live buffers (--max-bytes)."),
    fam(
        "session",
        &[STATE_LABEL],
        "The guest driver's session: 1 for the current state (open, suspended, closed, implicit), 0 for the others.",
    ),
];

/// A bad `--label`.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// Not `NAME=VALUE`.
    #[error("--label {0:?}: expected NAME=VALUE")]
    Syntax(String),
    /// The name is not a Prometheus label name, is reserved, or is used twice.
    #[error(
        "--label {0:?}: NAME must match [a-zA-Z_][a-zA-Z0-9_]*, not start with __, \
         not be heap or state, and be given once"
    )]
    Name(String),
}

/// The operator's extra labels, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    /// Parses `NAME=VALUE` arguments (the value may contain anything, `=` too).
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self, LabelError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for arg in args {
            let arg = arg.as_ref();
            let (name, value) = arg
                .split_once('=')
                .ok_or_else(|| LabelError::Syntax(arg.to_owned()))?;
            let reserved = name.starts_with("__") || name == HEAP_LABEL || name == STATE_LABEL;
            if !is_label_name(name) || reserved || out.iter().any(|(n, _)| n == name) {
                return Err(LabelError::Name(arg.to_owned()));
            }
            out.push((name.to_owned(), value.to_owned()));
        }
        Ok(Self(out))
    }

    /// True without labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Escapes a label value: backslash, double quote and line feed (format 0.0.4).
pub fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a `# HELP` text: backslash and line feed (format 0.0.4).
pub fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Builds the page family by family.
struct Page<'a> {
    out: String,
    labels: &'a Labels,
}

impl Page<'_> {
    fn header(&mut self, f: &Family) {
        let _ = writeln!(
            self.out,
            "# HELP {PREFIX}{} {}",
            f.name,
            escape_help(f.help)
        );
        let _ = writeln!(self.out, "# TYPE {PREFIX}{} gauge", f.name);
    }

    /// One sample of `f`: the operator's labels first, then `own`.
    fn sample(&mut self, f: &Family, own: &[(&str, &str)], value: u64) {
        let _ = write!(self.out, "{PREFIX}{}", f.name);
        let all = self
            .labels
            .0
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .chain(own.iter().copied());
        let mut first = true;
        for (name, value) in all {
            self.out.push(if first { '{' } else { ',' });
            first = false;
            let _ = write!(self.out, "{name}=\"{}\"", escape_label_value(value));
        }
        if !first {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The value of a per-heap or all-heaps family for `h`.
fn counter(name: &str, h: &HeapStats) -> Option<u64> {
    Some(match name.strip_prefix("heap_").unwrap_or(name) {
        "buffer_bytes" => h.bytes,
        "buffers" => h.buffers,
        "mappings" => h.mappings,
        "arenas" => h.arenas,
        "host_bytes" => h.host_bytes,
        "exported_buffers" => h.exported,
        "retained_buffers" => h.retained_buffers,
        "retained_bytes" => h.retained_bytes,
        _ => return None,
    })
}

/// The page for a daemon that answered with `stats`.
pub fn render(stats: &Stats, labels: &Labels) -> String {
    let mut page = Page {
        out: String::new(),
        labels,
    };
    for f in &FAMILIES {
        page.header(f);
        if f.labels == HEAP {
            for (heap, h) in &stats.heaps {
                page.sample(f, &[(HEAP_LABEL, heap)], counter(f.name, h).unwrap_or(0));
            }
            continue;
        }
        match f.name {
            "up" => page.sample(f, &[], 1),
            "reserved_bytes" => page.sample(f, &[], stats.reserved_bytes),
            "shm_size_bytes" => page.sample(f, &[], stats.limits.shm_size),
            "limit_mappings" => page.sample(f, &[], stats.limits.max_mappings),
            "limit_buffers" => page.sample(f, &[], stats.limits.max_buffers),
            "limit_buffer_bytes" => page.sample(f, &[], stats.limits.max_bytes),
            "session" => {
                // A state this client does not know (a newer daemon) still shows.
                let current = stats.session.as_str();
                let extra =
                    (!current.is_empty() && !SESSION_STATES.contains(&current)).then_some(current);
                for state in SESSION_STATES.iter().copied().chain(extra) {
                    page.sample(f, &[(STATE_LABEL, state)], u64::from(state == current));
                }
            }
            name => page.sample(f, &[], counter(name, &stats.total).unwrap_or(0)),
        }
    }
    page.out
}

/// The page for a daemon that did not answer: only `up` 0, so that a textfile collector
/// shows the failure instead of the last good page.
pub fn render_down(labels: &Labels) -> String {
    let mut page = Page {
        out: String::new(),
        labels,
    };
    let up = &FAMILIES[0];
    page.header(up);
    page.sample(up, &[], 0);
    page.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::LimitStats;

    fn stats() -> Stats {
        let mut s = Stats {
            session: "open".into(),
            reserved_bytes: 2 << 20,
            limits: LimitStats {
                shm_size: 4 << 30,
                max_mappings: 128,
                max_buffers: 262_144,
                max_bytes: 1 << 30,
            },
            ..Default::default()
        };
        let a = HeapStats {
            bytes: 8192,
            buffers: 2,
            mappings: 1,
            arenas: 1,
            host_bytes: 64 << 20,
            exported: 1,
            retained_buffers: 1,
            retained_bytes: 4096,
        };
        let b = HeapStats {
            bytes: 16 << 20,
            buffers: 1,
            mappings: 1,
            arenas: 0,
            host_bytes: 16 << 20,
            ..Default::default()
        };
        s.heaps.insert("linux,cma".into(), a.clone());
        s.heaps.insert("system".into(), b.clone());
        s.total = HeapStats {
            bytes: a.bytes + b.bytes,
            buffers: 3,
            mappings: 2,
            arenas: 1,
            host_bytes: a.host_bytes + b.host_bytes,
            exported: 1,
            retained_buffers: 1,
            retained_bytes: 4096,
        };
        s
    }

    /// The sample lines of `page` (no comments).
    fn samples(page: &str) -> Vec<&str> {
        page.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn every_family_has_help_type_and_a_valid_name() {
        let page = render(&stats(), &Labels::default());
        let lines: Vec<&str> = page.lines().collect();
        for f in &FAMILIES {
            let name = format!("{PREFIX}{}", f.name);
            assert!(is_metric_name(&name), "{name}");
            let help = format!("# HELP {name} {}", f.help);
            let ty = format!("# TYPE {name} gauge");
            let at = lines.iter().position(|l| *l == help);
            assert!(at.is_some(), "no {help:?} in\n{page}");
            assert_eq!(at.map(|i| lines[i + 1]), Some(ty.as_str()), "{page}");
            // Gauges only: the _total suffix is for counters.
            assert!(!name.ends_with("_total"), "{name}");
        }
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a family twice");
    }

    #[test]
    fn page_has_exact_lines() {
        let page = render(&stats(), &Labels::default());
        let s = samples(&page);
        for want in [
            "vhost_user_dmaheap_up 1",
            "vhost_user_dmaheap_heap_buffer_bytes{heap=\"linux,cma\"} 8192",
            "vhost_user_dmaheap_heap_buffer_bytes{heap=\"system\"} 16777216",
            "vhost_user_dmaheap_heap_buffers{heap=\"linux,cma\"} 2",
            "vhost_user_dmaheap_heap_mappings{heap=\"system\"} 1",
            "vhost_user_dmaheap_heap_arenas{heap=\"linux,cma\"} 1",
            "vhost_user_dmaheap_heap_host_bytes{heap=\"linux,cma\"} 67108864",
            "vhost_user_dmaheap_buffer_bytes 16785408",
            "vhost_user_dmaheap_buffers 3",
            "vhost_user_dmaheap_mappings 2",
            "vhost_user_dmaheap_arenas 1",
            "vhost_user_dmaheap_host_bytes 83886080",
            "vhost_user_dmaheap_reserved_bytes 2097152",
            "vhost_user_dmaheap_shm_size_bytes 4294967296",
            "vhost_user_dmaheap_limit_mappings 128",
            "vhost_user_dmaheap_limit_buffers 262144",
            "vhost_user_dmaheap_limit_buffer_bytes 1073741824",
            "vhost_user_dmaheap_session{state=\"open\"} 1",
            "vhost_user_dmaheap_session{state=\"suspended\"} 0",
            "vhost_user_dmaheap_session{state=\"closed\"} 0",
            "vhost_user_dmaheap_session{state=\"implicit\"} 0",
            "vhost_user_dmaheap_heap_exported_buffers{heap=\"linux,cma\"} 1",
            "vhost_user_dmaheap_heap_retained_buffers{heap=\"system\"} 0",
            "vhost_user_dmaheap_heap_retained_bytes{heap=\"linux,cma\"} 4096",
            "vhost_user_dmaheap_exported_buffers 1",
            "vhost_user_dmaheap_retained_buffers 1",
            "vhost_user_dmaheap_retained_bytes 4096",
        ] {
            assert!(s.contains(&want), "missing {want:?} in\n{page}");
        }
        // 1 up + 8 per-heap families x 2 heaps + 13 device-wide + 4 session states.
        assert_eq!(s.len(), 1 + 8 * 2 + 13 + 4, "{page}");
        assert!(page.ends_with('\n'));
        // Each family's samples follow its own TYPE line (the Go parser requires it).
        let mut current = "";
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("linux,cma"), "linux,cma");
        assert_eq!(escape_label_value(r"a\b"), r"a\\b");
        assert_eq!(escape_label_value("a\"b"), "a\\\"b");
        assert_eq!(escape_label_value("a\nb"), "a\\nb");
        assert_eq!(escape_label_value("a=b c{d}"), "a=b c{d}");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");

        let mut s = stats();
        s.heaps
            .insert("we\"ird\\\nname".into(), HeapStats::default());
        let page = render(&s, &Labels::default());
        assert!(
            page.contains("vhost_user_dmaheap_heap_buffers{heap=\"we\\\"ird\\\\\\nname\"} 0\n"),
            "{page}"
        );
        assert!(
            !page.lines().any(|l| l == "name\"} 0"),
            "raw newline:\n{page}"
        );
    }

    #[test]
    fn operator_labels_go_on_every_sample() {
        let labels = Labels::parse(&["vm=web,1", "host=a=\"b\""]).unwrap();
        let page = render(&stats(), &labels);
        for line in samples(&page) {
            assert!(
                line.contains("{vm=\"web,1\",host=\"a=\\\"b\\\"\""),
                "{line}\n{page}"
            );
        }
        assert!(page.contains(
            "vhost_user_dmaheap_heap_buffers{vm=\"web,1\",host=\"a=\\\"b\\\"\",heap=\"system\"} 1\n"
        ));
        assert_eq!(
            render_down(&labels),
            "# HELP vhost_user_dmaheap_up 1 if the daemon answered the stats request, 0 if not.\n\
             # TYPE vhost_user_dmaheap_up gauge\n\
             vhost_user_dmaheap_up{vm=\"web,1\",host=\"a=\\\"b\\\"\"} 0\n"
        );
    }

    #[test]
    fn bad_labels_are_refused() {
        for bad in [
            "vm",
            "=x",
            "1vm=x",
            "v-m=x",
            "__name__=x",
            "heap=x",
            "state=x",
            "vé=x",
        ] {
            assert!(Labels::parse(&[bad]).is_err(), "{bad}");
        }
        assert!(Labels::parse(&["vm=a", "vm=b"]).is_err());
        assert!(Labels::parse(&["_vm=", "vm2=x"]).is_ok());
    }

    #[test]
    fn unknown_session_state_still_shows() {
        let mut s = stats();
        s.session = "frozen".into();
        let page = render(&s, &Labels::default());
        assert!(page.contains("vhost_user_dmaheap_session{state=\"frozen\"} 1\n"));
        assert!(page.contains("vhost_user_dmaheap_session{state=\"open\"} 0\n"));
        s.session = String::new();
        let page = render(&s, &Labels::default());
        assert_eq!(page.matches("vhost_user_dmaheap_session{").count(), 4);
        assert!(!page.contains("_session{state=\"open\"} 1"));
    }

    #[test]
    fn a_daemon_without_heaps_gives_headers_only() {
        let page = render(&Stats::default(), &Labels::default());
        assert!(page.contains("# TYPE vhost_user_dmaheap_heap_buffers gauge\n"));
        assert!(!page.contains("heap=\""));
    }
}
