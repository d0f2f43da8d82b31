// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! dmaheap-test-importer: a test-only vhost-user back end (device id 38, one queue) for
//! issue 13's end-to-end check (tests/sharing/run). The guest module
//! tests/guest/sharing/dmaheap_sharing.ko sends it a virtio-dmaheap buffer's UUID; it
//! resolves the UUID through vhost-user-dmaheap's export socket (`--export-socket`), maps
//! the fd, checks the bytes the guest wrote and writes bytes the guest then reads.
//! Protocol: tests/importer/importer_proto.h.
//!
//!     dmaheap-test-importer --socket-path VHOST_USER_SOCKET --export-socket PATH

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use dmaheap_test_importer::{backend, importer};
use log::{error, info};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Test importer of virtio-dmaheap buffers (device id 38).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The vhost-user socket to listen on (QEMU's chardev connects to it).
    #[arg(long)]
    socket_path: PathBuf,
    /// vhost-user-dmaheap's export socket.
    #[arg(long)]
    export_socket: PathBuf,
    /// Exit when the first front end disconnects (default: wait for the next one).
    #[arg(long)]
    once: bool,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot listen on the vhost-user socket")]
    Listen(#[source] vhost::vhost_user::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
}

fn run(args: Args) -> Result<(), Error> {
    let mut listener = Listener::new(&args.socket_path, true).map_err(Error::Listen)?;
    info!(
        "listening on {} (export socket {})",
        args.socket_path.display(),
        args.export_socket.display()
    );
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let importer = importer::Importer::new(args.export_socket.clone());
        let backend = Arc::new(backend::VhuImporter::new(importer, mem.clone()));
        let mut daemon = VhostUserDaemon::new("dmaheap-test-importer".into(), backend, mem)
            .map_err(Error::Daemon)?;
        daemon.start(&mut listener).map_err(Error::Daemon)?;
        info!("front end connected");
        match daemon.wait() {
            Ok(()) => info!("front end disconnected"),
            Err(e) => info!("front end gone: {e}"),
        }
        if args.once {
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                error!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
