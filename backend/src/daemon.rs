//! The daemon: opens the heaps, listens on the vhost-user socket, serves one front end at
//! a time (fresh device state for each), and exits cleanly on SIGTERM/SIGINT.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;

use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{getsockopt, listen, sockopt, Backlog, SockType};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{Config, SocketSpec};
use crate::control::{self, ControlError};
use crate::core::{unpredictable_id_start, Device, DeviceHandle, Heap};
use crate::host::ProviderError;
use crate::vhost::{VhuDmaheap, WorkerTimer};

/// Daemon errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A heap could not be opened.
    #[error("heap {name}: cannot open {source_desc}")]
    Heap {
        /// Heap name.
        name: String,
        /// Its source.
        source_desc: String,
        /// Cause.
        #[source]
        source: ProviderError,
    },
    /// Signal setup failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    /// Creating the vhost-user socket failed.
    #[error("cannot listen on the vhost-user socket")]
    Listen(#[source] vhost::vhost_user::Error),
    /// --socket-fd is not a stream socket.
    #[error("--socket-fd {0} is not a Unix stream socket")]
    SocketFd(i32, #[source] nix::Error),
    /// The socket passed by the service manager is not a listening Unix stream socket.
    #[error("socket activation")]
    Activation(#[source] crate::systemd::ActivationError),
    /// The control socket failed.
    #[error("control socket")]
    Control(#[source] ControlError),
    /// The export socket failed.
    #[error("export socket")]
    ExportSocket(#[source] crate::export_socket::ExportSocketError),
    /// vhost-user daemon failure.
    #[error("vhost-user daemon: {0}")]
    Vhost(vhost_user_backend::Error),
    /// Thread spawning failed.
    #[error("cannot spawn a thread")]
    Thread(#[source] io::Error),
    /// The idle timer or the worker's eventfds could not be set up or registered.
    #[error("vring worker events")]
    WorkerEvents(#[source] io::Error),
    /// Dropping privileges, enforcing the Landlock ruleset or installing the syscall filter
    /// failed.
    #[error("sandbox")]
    Sandbox(#[source] crate::sandbox::SandboxError),
}

fn open_listener(spec: &SocketSpec) -> Result<Listener, DaemonError> {
    match spec {
        SocketSpec::Path(p) => Listener::new(p, true).map_err(DaemonError::Listen),
        SocketSpec::Fd(fd) => {
            // SAFETY: the fd is only borrowed for the checks below, while it is open (the
            // caller handed it to us; an fd that is not open fails getsockopt).
            let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
            let ty = getsockopt(&borrowed, sockopt::SockType)
                .map_err(|e| DaemonError::SocketFd(*fd, e))?;
            if ty != SockType::Stream {
                return Err(DaemonError::SocketFd(*fd, nix::Error::ENOTSOCK));
            }
            // Harmless if the caller already listens; makes a merely bound socket usable.
            let backlog = Backlog::new(16).map_err(|e| DaemonError::SocketFd(*fd, e))?;
            listen(&borrowed, backlog).map_err(|e| DaemonError::SocketFd(*fd, e))?;
            // SAFETY: the caller passed ownership of this open, listening stream socket to
            // the daemon with --socket-fd; nothing else in the process uses it.
            Ok(unsafe { Listener::from_raw_fd(*fd) })
        }
        SocketSpec::Activated(a) => {
            crate::systemd::check_listening(a.fd).map_err(DaemonError::Activation)?;
            info!(
                "using the socket passed by the service manager (fd {}, name {:?})",
                a.fd,
                a.name.as_deref().unwrap_or("unknown")
            );
            // SAFETY: the service manager passed this listening Unix stream socket (checked
            // above) to this process (LISTEN_PID) for it alone; nothing else here uses it.
            Ok(unsafe { Listener::from_raw_fd(a.fd) })
        }
    }
}

fn spawn_signal_thread(cleanup: Vec<PathBuf>, signals: SigSet) -> Result<(), DaemonError> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            match signals.wait() {
                Ok(sig) => info!("{sig}: shutting down"),
                Err(e) => error!("waiting for signals failed ({e}): shutting down"),
            }
            for p in &cleanup {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(0);
        })
        .map(|_| ())
        .map_err(DaemonError::Thread)
}

/// Runs the daemon until a signal ends the process (or a fatal error).
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    // Block the signals in every thread (threads inherit the mask); one thread waits.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(DaemonError::Signals)?;

    // Every buffer shared by UUID holds an fd (its export): use the whole fd allowance.
    crate::core::export::raise_nofile_limit();
    if cfg.fallback_memfd {
        warn!(
            "no --heap given and no /dev/dma_heap/system on this host: exporting a memfd \
             heap named \"system\" (not a real dma-buf heap)"
        );
    }
    let mut heaps: Vec<Heap> = Vec::new();
    for spec in &cfg.heaps {
        let heap = spec.open().map_err(|source| DaemonError::Heap {
            name: spec.params.name.clone(),
            source_desc: spec.source.to_string(),
            source,
        })?;
        info!(
            "heap {} (id {}): {}, cache {}, max-size {}, align {}, max-bytes {:?}, arena-size {}",
            spec.params.name,
            heaps.len(),
            heap.provider.describe(),
            spec.params.cache,
            spec.params.max_size,
            spec.params.min_align,
            spec.params.max_bytes,
            spec.params.arena_size
        );
        heaps.push(heap);
    }
    // Buffer ids are unique for the daemon's lifetime, across connections and resets, and
    // start at an unpredictable value, so that a stale FREE of the guest from an earlier
    // daemon process cannot free a buffer of this one.
    let ids = Arc::new(AtomicU64::new(unpredictable_id_start()));
    let mut device = Device::new(heaps, cfg.limits.clone(), ids);
    for (i, spec) in cfg.heaps.iter().enumerate() {
        if let Some(r) = device.heap_range(i) {
            info!(
                "heap {}: window range {:#x}+{:#x}",
                spec.params.name, r.offset, r.len
            );
        }
    }
    device.set_uuid_offered(cfg.uuid);
    device.set_shared_object_table(cfg.shared_object_table);
    let handle = Arc::new(DeviceHandle::new(device).map_err(DaemonError::WorkerEvents)?);
    // Before the sandbox, which allows arming a timerfd but not creating one.
    let timer = Arc::new(WorkerTimer::new().map_err(DaemonError::WorkerEvents)?);

    let mut listener = open_listener(&cfg.socket)?;
    let mut cleanup = Vec::new();
    if let SocketSpec::Path(p) = &cfg.socket {
        cleanup.push(p.clone());
    }
    let export = match &cfg.export_socket {
        Some(path) => {
            let listener = crate::export_socket::bind(path).map_err(DaemonError::ExportSocket)?;
            cleanup.push(path.clone());
            Some(listener)
        }
        None => None,
    };
    let control = match &cfg.control_socket {
        Some(path) => {
            let listener = control::bind(path).map_err(DaemonError::Control)?;
            cleanup.push(path.clone());
            Some(listener)
        }
        None => None,
    };
    // The last start-up open is done and no other thread runs yet: drop privileges and
    // take the file system away (Landlock restricts this thread and every thread it starts
    // from now on; see sandbox).
    let sandbox = crate::sandbox::Sandbox {
        reopen_dir: handle.reopen_dir(),
        removable: cleanup.clone(),
        ..cfg.sandbox.clone()
    };
    let restricted = crate::sandbox::restrict(&sandbox).map_err(DaemonError::Sandbox)?;
    if let Some(listener) = export {
        // Lookups read the export table only: never the device lock.
        let table = handle.export_table();
        let lookup: crate::export_socket::Lookup = Arc::new(move |uuid| table.lookup(uuid));
        crate::export_socket::serve(listener, lookup).map_err(DaemonError::ExportSocket)?;
    }
    if let Some(listener) = control {
        control::serve(listener, handle.clone(), cfg.control_debug)
            .map_err(DaemonError::Control)?;
    }
    spawn_signal_thread(cleanup, signals)?;
    // Install the syscall filter on every thread.
    restricted.install_filter().map_err(DaemonError::Sandbox)?;
    info!(
        "listening ({:?}); window {} bytes, max {} mappings, {} buffers, {} bytes",
        cfg.socket,
        cfg.limits.shm_size,
        cfg.limits.max_mappings,
        cfg.limits.max_buffers,
        cfg.limits.max_bytes
    );

    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(VhuDmaheap::new(
            handle.clone(),
            timer.clone(),
            mem.clone(),
            cfg.poll_max,
        ));
        let mut daemon = VhostUserDaemon::new("vhost-user-dmaheap".into(), backend.clone(), mem)
            .map_err(DaemonError::Vhost)?;
        // One vring worker serves the request queue; the timer and operator requests wake
        // it too.
        if let Some(h) = daemon.get_epoll_handlers().first() {
            backend
                .register_worker_events(h)
                .map_err(DaemonError::WorkerEvents)?;
        }
        daemon.start(&mut listener).map_err(DaemonError::Vhost)?;
        // The device state is fresh: everything was dropped when the previous front end
        // left.
        handle.connect();
        info!("front end connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("front end disconnected"),
            Err(e) => error!("front end connection ended: {e}"),
        }
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        // Joins the vring worker: nothing can send to the (gone) front end any more.
        drop(daemon);
        drop(backend);
        // The front end took its mappings with it: release every host buffer now.
        handle.disconnect();
        let st = handle.stats();
        info!(
            "released everything of the front end ({} buffers, {} host bytes left)",
            st.total.buffers, st.total.host_bytes
        );
    }
}
