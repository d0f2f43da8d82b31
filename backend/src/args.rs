//! Command line (clap derive only; validation lives in `config.rs`).

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// vhost-user back end of the virtio-dmaheap device: serves host DMA-BUF heaps to a guest.
///
/// Without a subcommand the daemon runs: it listens on the vhost-user socket (exactly one
/// of --socket-path, --socket-fd and a socket passed by systemd), serves one front end
/// (QEMU) at a time with fresh device state, and accepts the next after a disconnect.
/// SIGTERM or SIGINT end it cleanly (exit status 0). Logging is controlled with RUST_LOG
/// (default: info). SIZE values are bytes with an optional K, M, G or T suffix (powers of
/// 1024).
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-dmaheap",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Client subcommand (talks to a running daemon's control socket).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Daemon options.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Options of the daemon.
#[derive(Debug, Default, ClapArgs)]
pub struct DaemonArgs {
    /// Unix socket to listen on for the vhost-user front end (created; an existing file
    /// is replaced).
    #[arg(long, value_name = "PATH", conflicts_with = "socket_fd")]
    pub socket_path: Option<PathBuf>,

    /// Already bound and listening Unix socket inherited from the caller (e.g. a VMM or
    /// a test harness), used instead of --socket-path. Under systemd socket activation
    /// (LISTEN_PID is the daemon, LISTEN_FDS=1: fd 3) give neither option.
    #[arg(long, value_name = "FD")]
    pub socket_fd: Option<i32>,

    /// Export a heap to the guest as NAME (repeatable; heap ids follow the order given;
    /// NAME: 1-31 characters of [A-Za-z0-9_.,-], e.g. `linux,cma`).
    /// SOURCE is `dma-heap:HOSTNAME` (/dev/dma_heap/HOSTNAME), `memfd`, or `udmabuf`.
    /// OPTs: max-bytes=SIZE (per-heap quota), max-size=SIZE (largest buffer, default: the
    /// heap's range, see --shm-size), align=SIZE (min_align, power of two >= 4K, default
    /// 4K), cache=cached|uncached|wc (default cached), contiguous=yes|no (default: yes for
    /// dma-heap heaps named like *cma* or *reserved*, else no), arena-size=SIZE (largest
    /// host allocation shared by small buffers, multiple of 2M, default 64M or the heap's
    /// range if smaller; buffers up to arena-size/8 are sub-allocated in arenas, larger
    /// ones get a mapping of their own). align, max-size and arena-size above the heap's
    /// range are refused.
    /// Without --heap: the host's `system` dma-heap if /dev/dma_heap/system exists,
    /// else a memfd heap named `system` (with a warning).
    #[arg(long = "heap", value_name = "NAME=SOURCE[,OPT=VAL]...")]
    pub heaps: Vec<String>,

    /// Size of the shared memory window (BAR 4), a power of two. It is split evenly between
    /// the cache attributes the heaps use, in the order cached, uncached, wc: each gets a
    /// range of (SIZE / attributes) rounded down to 2M that holds all buffers of its heaps
    /// (so the guest maps each range with one memory type); with one attribute that range
    /// is the whole window. Heaps of several attributes therefore each see only part of
    /// the window (their max-size, arena-size and capacity shrink to it): raise SIZE
    /// accordingly. A window that leaves an attribute less than 2M is refused.
    #[arg(long, value_name = "SIZE", default_value = "4G")]
    pub shm_size: String,

    /// Most live mappings in the window, at most 480 (each costs the VMM one of its ~509
    /// vhost-user memory slots).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_mappings: usize,

    /// Most live buffers per VM (also stated in the config space).
    #[arg(long, value_name = "N", default_value_t = 262_144)]
    pub max_buffers: u64,

    /// Most bytes held by live buffers per VM (default: --shm-size).
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: Option<String>,

    /// Longest time, in microseconds, the request worker keeps reading the ring after
    /// serving it, with the guest's notifications off (at most 10000; 0: never). A request
    /// that comes within it costs neither the guest's notification nor the worker's
    /// wake-up. The window adapts to the gaps between requests: it doubles (starting at
    /// 10) when a request came within US of polling stopping, and halves when one came
    /// later, down to not polling; so a quiet guest costs no spinning. While it polls, the
    /// worker gives its CPU away every 5 us, so a vCPU sharing that CPU is not held up.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u64,

    /// Unix socket for operators (created with mode 0600; an existing file is replaced):
    /// one request line, one reply. `stats` answers JSON: {"heaps": {NAME: {"bytes",
    /// "buffers", "mappings", "arenas", "host_bytes", "exported", "retained_buffers",
    /// "retained_bytes"}}, "total": {...}, "limits": {...}, "session":
    /// "open"|"suspended"|"closed"|"implicit", "reserved_bytes": N}. Retained buffers
    /// (freed by the guest while another process holds their export) count in "bytes"
    /// and "buffers".
    /// `prepare-reset` ends the guest's session (every buffer leaves the window and its
    /// memory is released) so that resetting the VM next is safe with QEMU 11.1. See the
    /// `stats` and `ctl` subcommands.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Do not offer VIRTIO_DMAHEAP_F_UUID: the guest cannot give buffers UUIDs for other
    /// devices (ASSIGN_UUID).
    #[arg(long)]
    pub no_uuid: bool,

    /// Unix socket (created with mode 0600; an existing file is replaced) on which other
    /// host processes, e.g. the back ends of other devices of the VM, resolve a buffer's
    /// UUID (ASSIGN_UUID) to a file that maps exactly the buffer: send the 16 bytes of the
    /// UUID, get {le32 status (0, or an errno: ENOENT), le32 0, le64 len} and, on success,
    /// one fd (SCM_RIGHTS).
    #[arg(long, value_name = "PATH", conflicts_with = "no_uuid")]
    pub export_socket: Option<PathBuf>,

    /// Also register UUIDs with the front end's shared-object table (vhost-user protocol
    /// feature SHARED_OBJECT: SHARED_OBJECT_ADD/REMOVE, GET_SHARED_OBJECT). Off by default:
    /// with QEMU 11.1.3 a lookup by another back end kills the VM.
    #[arg(long, conflicts_with = "no_uuid")]
    pub shared_object_table: bool,

    /// Also accept the debug commands `buffers`, `peek ID OFF LEN` and `poke ID OFF HEX`
    /// on the control socket (they read and write guest buffers: tests only).
    #[arg(long, requires = "control_socket")]
    pub control_debug: bool,

    /// System call filter installed on every daemon thread once start-up is done: `on`
    /// (a call outside the allowlist kills the daemon), `log` (allowed, but logged to the
    /// kernel log as an audit record), `off`. See SECURITY.md.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: crate::sandbox::SeccompMode,

    /// After start-up (heaps opened, sockets bound), switch to this user (name or numeric
    /// uid) and its primary group, dropping supplementary groups. Needs root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
}

/// Output of the `stats` subcommand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsFormat {
    /// A table per heap, then the limits.
    #[default]
    Text,
    /// The daemon's JSON reply as it is.
    Json,
    /// Prometheus text exposition format 0.0.4.
    Prometheus,
}

/// Client subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a running daemon's per-heap bytes, buffers and mappings.
    ///
    /// As a table (default), the daemon's JSON reply, or in the Prometheus text format for
    /// node_exporter's textfile collector (metric names: packaging/metrics/README.md).
    /// With --format prometheus, a daemon that does not answer still gives a valid page
    /// (vhost_user_dmaheap_up 0) and exit status 1.
    Stats {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Output format.
        #[arg(long, value_name = "FORMAT", default_value = "text")]
        format: StatsFormat,
        /// Print the raw JSON reply (same as --format json).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Add the label NAME="VALUE" to every Prometheus sample (repeatable), e.g.
        /// `--label vm=web1` when several daemons write into one textfile directory.
        #[arg(long, value_name = "NAME=VALUE")]
        label: Vec<String>,
        /// Write the output to FILE instead of stdout, atomically (a temporary file in the
        /// same directory renamed over FILE), so that a reader never sees half a page.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Give up after this many seconds without a reply.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
    },
    /// Send one command line to the control socket and print the reply (exit status 1 on
    /// an `error` reply). Commands: stats, prepare-reset; with --control-debug: buffers,
    /// peek ID OFF LEN, poke ID OFF HEX.
    Ctl {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Give up after this many seconds without a reply.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
        /// The command and its arguments.
        #[arg(required = true, num_args = 1.., trailing_var_arg = true)]
        command: Vec<String>,
    },
}
