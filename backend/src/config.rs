//! Validated daemon configuration, built from the command line with `TryFrom`.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::args::DaemonArgs;
use crate::core::{heap_ranges, CacheMode, Heap, HeapParams, LayoutError, Limits, ARENA_MIN};
use crate::host::{DmaHeapProvider, HeapProvider, MemfdProvider, ProviderError, UdmabufProvider};

/// Where the host's dma-buf heaps live.
pub const DMA_HEAP_DIR: &str = "/dev/dma_heap";

/// Default largest arena.
pub const DEFAULT_ARENA_SIZE: u64 = 64 << 20;
const PAGE: u64 = 4096;

/// Configuration errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Neither or both socket options.
    #[error(
        "exactly one of --socket-path and --socket-fd is required (or a socket passed by \
         systemd: LISTEN_PID, LISTEN_FDS)"
    )]
    Socket,
    /// A socket option although the service manager passed a socket.
    #[error(
        "the service manager passed a socket (LISTEN_PID is this process, LISTEN_FDS=1): \
         remove --socket-path and --socket-fd, or the socket activation"
    )]
    SocketAndActivation,
    /// A size that does not parse.
    #[error("invalid size {0:?} (a number with an optional K, M, G or T suffix)")]
    Size(String),
    /// Window size not usable.
    #[error("--shm-size {0} must be a power of two of at least 2M")]
    ShmSize(u64),
    /// More mappings than the front end's memory table can hold.
    #[error(
        "--max-mappings {0} exceeds {MAX_MAPPINGS_LIMIT}: every mapping takes one of the \
         ~509 vhost-user memory slots, which guest RAM regions also use"
    )]
    TooManyMappings(usize),
    /// A zero cap.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// Malformed --heap.
    #[error("invalid --heap {spec:?}: {why}")]
    Heap {
        /// The argument.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A ring polling window above the limit.
    #[error("--poll-us {0} exceeds {max}", max = crate::vhost::POLL_LIMIT.as_micros())]
    PollTooLong(u64),
    /// More buffers than the config space's 32-bit `max_buffers` can state.
    #[error("--max-buffers {0} exceeds {max}, the largest the config space can state", max = u32::MAX)]
    TooManyBuffers(u64),
    /// Two heaps with one name.
    #[error("heap name {0:?} used twice")]
    DuplicateHeap(String),
    /// The window cannot be split between the cache attributes of the heaps.
    #[error("--shm-size too small for the heaps' cache attributes")]
    Layout(#[source] LayoutError),
}

/// Most live mappings an operator may allow. Each mapping becomes a RAM region that QEMU
/// pushes into every vhost-user back-end's memory table (509 slots in vhost-user-backend,
/// and in QEMU's own back-ends); guest RAM takes a few slots too, so keep headroom.
pub const MAX_MAPPINGS_LIMIT: usize = 480;

/// Where a heap's buffers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeapSource {
    /// `/dev/dma_heap/<host name>`.
    DmaHeap(String),
    /// memfd.
    Memfd,
    /// memfd + /dev/udmabuf.
    Udmabuf,
}

impl std::fmt::Display for HeapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DmaHeap(n) => write!(f, "dma-heap:{n}"),
            Self::Memfd => f.write_str("memfd"),
            Self::Udmabuf => f.write_str("udmabuf"),
        }
    }
}

/// One exported heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapSpec {
    /// Properties the guest sees.
    pub params: HeapParams,
    /// Buffer source.
    pub source: HeapSource,
}

impl HeapSpec {
    /// Opens the provider.
    pub fn open(&self) -> Result<Heap, ProviderError> {
        let provider: Box<dyn HeapProvider> = match &self.source {
            HeapSource::DmaHeap(n) => Box::new(DmaHeapProvider::open(n)?),
            HeapSource::Memfd => Box::new(MemfdProvider::with_udmabuf(
                &self.params.name,
                crate::host::udmabuf::open_udmabuf_dev(),
            )),
            HeapSource::Udmabuf => Box::new(UdmabufProvider::open(&self.params.name)?),
        };
        Ok(Heap {
            params: self.params.clone(),
            provider,
        })
    }
}

/// The vhost-user socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSpec {
    /// Bind and listen at this path.
    Path(PathBuf),
    /// An inherited listening socket.
    Fd(RawFd),
    /// The listening socket passed by the service manager (systemd socket activation).
    Activated(crate::systemd::Activation),
}

/// Validated daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// vhost-user socket.
    pub socket: SocketSpec,
    /// Exported heaps, in heap-id order.
    pub heaps: Vec<HeapSpec>,
    /// True when no --heap was given and no host system heap exists (memfd fallback).
    pub fallback_memfd: bool,
    /// Per-VM limits.
    pub limits: Limits,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Debug commands on the control socket.
    pub control_debug: bool,
    /// Offer `VIRTIO_DMAHEAP_F_UUID`.
    pub uuid: bool,
    /// Export socket path (UUID -> buffer file).
    pub export_socket: Option<PathBuf>,
    /// Register UUIDs with the front end's shared-object table.
    pub shared_object_table: bool,
    /// Longest ring polling window of the request worker.
    pub poll_max: std::time::Duration,
    /// Containment applied after start-up.
    pub sandbox: crate::sandbox::Sandbox,
}

/// Parses `123`, `4K`, `2M`, `4G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(err()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(mult).ok_or_else(err)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < crate::abi::VIRTIO_DMAHEAP_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.,".contains(&b))
}

/// The part of the window a heap's buffers lie in, for the checks of its options.
#[derive(Debug, Clone, Copy)]
struct RangeLimit {
    /// The heap range's length.
    len: u64,
    /// The window size.
    shm_size: u64,
    /// Cache attributes that share the window.
    attrs: usize,
}

impl RangeLimit {
    /// The whole window.
    fn window(shm_size: u64) -> Self {
        Self {
            len: shm_size,
            shm_size,
            attrs: 1,
        }
    }
}

impl std::fmt::Display for RangeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.attrs <= 1 {
            f.write_str("--shm-size")
        } else {
            write!(
                f,
                "the heap's range of {} bytes (--shm-size {} split evenly between {} cache \
                 attributes)",
                self.len, self.shm_size, self.attrs
            )
        }
    }
}

/// Parses one `--heap`; the sizes must fit `range` (whose length is also the default
/// max-size and bounds the default arena-size).
fn parse_heap(spec: &str, range: RangeLimit) -> Result<HeapSpec, ConfigError> {
    let bad = |why: String| ConfigError::Heap {
        spec: spec.to_string(),
        why,
    };
    let limit = range.len;
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=SOURCE[,OPT=VAL]...".into()))?;
    if !valid_name(name) {
        return Err(bad(format!(
            "name {name:?} must be 1-31 characters of [A-Za-z0-9_.,-]"
        )));
    }
    let mut parts = rest.split(',').peekable();
    let source = match parts.next().unwrap_or_default() {
        "memfd" => HeapSource::Memfd,
        "udmabuf" => HeapSource::Udmabuf,
        s => {
            // A host heap name may have commas (`linux,cma`): options always have `=`.
            let mut host = s.to_string();
            while let Some(more) = parts.next_if(|p| !p.contains('=')) {
                host = format!("{host},{more}");
            }
            match host.strip_prefix("dma-heap:") {
                Some(h) if valid_name(h) => HeapSource::DmaHeap(h.to_string()),
                _ => {
                    return Err(bad(format!(
                        "source {host:?} is not dma-heap:HOSTNAME, memfd or udmabuf"
                    )))
                }
            }
        }
    };
    let contiguous_default = match &source {
        HeapSource::DmaHeap(h) => h.contains("cma") || h.contains("reserved"),
        _ => false,
    };
    let mut params = HeapParams {
        name: name.to_string(),
        contiguous: contiguous_default,
        cache: CacheMode::Cached,
        min_align: PAGE,
        max_size: limit,
        max_bytes: None,
        arena_size: DEFAULT_ARENA_SIZE.min(limit),
    };
    for opt in parts {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| bad(format!("option {opt:?} is not OPT=VAL")))?;
        match k {
            "max-bytes" => params.max_bytes = Some(parse_size(v)?),
            "max-size" => params.max_size = parse_size(v)?,
            "align" => params.min_align = parse_size(v)?,
            "arena-size" => params.arena_size = parse_size(v)?,
            "cache" => {
                params.cache = match v {
                    "cached" => CacheMode::Cached,
                    "uncached" => CacheMode::Uncached,
                    "wc" => CacheMode::WriteCombined,
                    _ => return Err(bad(format!("cache={v}: expected cached|uncached|wc"))),
                }
            }
            "contiguous" => {
                params.contiguous = match v {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(bad(format!("contiguous={v}: expected yes|no"))),
                }
            }
            _ => return Err(bad(format!("unknown option {k:?}"))),
        }
    }
    if !params.min_align.is_power_of_two() || params.min_align < PAGE || params.min_align > limit {
        return Err(bad(format!(
            "align={} must be a power of two between 4K and {range}",
            params.min_align
        )));
    }
    if params.max_size == 0 || !params.max_size.is_multiple_of(PAGE) || params.max_size > limit {
        return Err(bad(format!(
            "max-size={} must be a nonzero multiple of 4K, at most {range}",
            params.max_size
        )));
    }
    if params.arena_size < ARENA_MIN
        || !params.arena_size.is_multiple_of(ARENA_MIN)
        || params.arena_size > limit
    {
        return Err(bad(format!(
            "arena-size={} must be a multiple of 2M, at most {range}",
            params.arena_size
        )));
    }
    // Buffers up to arena-size/8 share arenas; an alignment above that would make every
    // buffer of the heap waste most of an arena.
    if params.min_align > params.arena_size / 8 {
        return Err(bad(format!(
            "align={} must be at most arena-size/8 ({})",
            params.min_align,
            params.arena_size / 8
        )));
    }
    Ok(HeapSpec { params, source })
}

impl Config {
    /// Builds the configuration; `dma_heap_dir` is where host heaps live (for the default).
    pub fn from_args(args: DaemonArgs, dma_heap_dir: &Path) -> Result<Self, ConfigError> {
        Self::from_args_activated(args, dma_heap_dir, None)
    }

    /// [`Config::from_args`] with the socket the service manager passed, if any
    /// ([`crate::systemd::take_from_env`]). It is an error to name another socket as well:
    /// an operator who left `--socket-path` in a unit should learn which one is served.
    pub fn from_args_activated(
        args: DaemonArgs,
        dma_heap_dir: &Path,
        activation: Option<crate::systemd::Activation>,
    ) -> Result<Self, ConfigError> {
        let socket = match (args.socket_path, args.socket_fd, activation) {
            (None, None, Some(a)) => SocketSpec::Activated(a),
            (_, _, Some(_)) => return Err(ConfigError::SocketAndActivation),
            (Some(p), None, None) => SocketSpec::Path(p),
            (None, Some(fd), None) if fd >= 0 => SocketSpec::Fd(fd),
            _ => return Err(ConfigError::Socket),
        };
        let shm_size = parse_size(&args.shm_size)?;
        if !shm_size.is_power_of_two() || shm_size < ARENA_MIN {
            return Err(ConfigError::ShmSize(shm_size));
        }
        if args.max_mappings == 0 {
            return Err(ConfigError::Zero("--max-mappings"));
        }
        if args.max_mappings > MAX_MAPPINGS_LIMIT {
            return Err(ConfigError::TooManyMappings(args.max_mappings));
        }
        if args.max_buffers == 0 {
            return Err(ConfigError::Zero("--max-buffers"));
        }
        // The config space states the cap (spec 5.1); a larger one would read as 0 there.
        if u32::try_from(args.max_buffers).is_err() {
            return Err(ConfigError::TooManyBuffers(args.max_buffers));
        }
        let poll_max = std::time::Duration::from_micros(args.poll_us);
        if poll_max > crate::vhost::POLL_LIMIT {
            return Err(ConfigError::PollTooLong(args.poll_us));
        }
        let max_bytes = match &args.max_bytes {
            Some(s) => parse_size(s)?,
            None => shm_size,
        };
        if max_bytes == 0 {
            return Err(ConfigError::Zero("--max-bytes"));
        }
        let mut specs = Vec::new();
        let mut fallback_memfd = false;
        if args.heaps.is_empty() {
            specs.push(if dma_heap_dir.join("system").exists() {
                "system=dma-heap:system"
            } else {
                fallback_memfd = true;
                "system=memfd"
            });
        }
        specs.extend(args.heaps.iter().map(String::as_str));
        // The cache attributes decide the heap ranges, which bound the other sizes: parse
        // once against the window for the attributes, then again against each range.
        let caches = specs
            .iter()
            .map(|h| parse_heap(h, RangeLimit::window(shm_size)).map(|s| s.params.cache))
            .collect::<Result<Vec<_>, _>>()?;
        let ranges = heap_ranges(shm_size, &caches).map_err(ConfigError::Layout)?;
        let attrs = crate::core::layout::attributes(&caches).len();
        let mut heaps: Vec<HeapSpec> = Vec::new();
        for (h, r) in specs.iter().zip(&ranges) {
            let range = RangeLimit {
                len: r.len,
                shm_size,
                attrs,
            };
            let spec = parse_heap(h, range)?;
            if heaps.iter().any(|o| o.params.name == spec.params.name) {
                return Err(ConfigError::DuplicateHeap(spec.params.name));
            }
            heaps.push(spec);
        }
        Ok(Self {
            socket,
            heaps,
            fallback_memfd,
            limits: Limits {
                shm_size,
                max_mappings: args.max_mappings,
                max_buffers: args.max_buffers,
                max_bytes,
            },
            control_socket: args.control_socket,
            control_debug: args.control_debug,
            uuid: !args.no_uuid,
            export_socket: args.export_socket,
            shared_object_table: args.shared_object_table,
            poll_max,
            sandbox: crate::sandbox::Sandbox {
                seccomp: args.seccomp,
                user: args.user,
                reopen_dir: None,
                removable: Vec::new(),
            },
        })
    }
}

impl TryFrom<DaemonArgs> for Config {
    type Error = ConfigError;

    fn try_from(args: DaemonArgs) -> Result<Self, Self::Error> {
        Self::from_args(args, Path::new(DMA_HEAP_DIR))
    }
}

#[cfg(test)]
mod tests;
