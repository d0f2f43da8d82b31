//! `vhost-user-dmaheap`: the daemon and its client subcommands.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use log::error;

use vhost_user_dmaheap::args::{Args, Command, StatsFormat};
use vhost_user_dmaheap::config::{Config, DMA_HEAP_DIR};
use vhost_user_dmaheap::{control, daemon, systemd};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Before any thread starts (changing the environment is not thread-safe), and for the
    // subcommands too: nothing this process starts may take LISTEN_PID for its own.
    let activation = systemd::take_from_env();
    let args = Args::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match args.command {
        Some(Command::Stats {
            control_socket,
            format,
            json,
            label,
            output,
            timeout,
        }) => control::client_stats(
            &control_socket,
            &control::StatsOutput {
                format: if json { StatsFormat::Json } else { format },
                labels: &label,
                output: output.as_deref(),
            },
            Duration::from_secs(timeout),
        )
        .map_err(Into::into),
        Some(Command::Ctl {
            control_socket,
            timeout,
            command,
        }) => match control::request(
            &control_socket,
            &command.join(" "),
            Duration::from_secs(timeout),
        ) {
            Ok(reply) => {
                print!("{reply}");
                Ok(())
            }
            Err(control::ControlError::Reply(reply)) => {
                println!("{reply}");
                return ExitCode::FAILURE;
            }
            Err(e) => Err(e.into()),
        },
        None => activation
            .map_err(Into::into)
            .and_then(|act| {
                Config::from_args_activated(args.daemon, Path::new(DMA_HEAP_DIR), act)
                    .map_err(Into::into)
            })
            .and_then(|cfg| daemon::run(cfg).map_err(Into::into)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            error!("{msg}");
            ExitCode::FAILURE
        }
    }
}
