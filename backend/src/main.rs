//! `vhost-user-dmaheap`: the daemon and its client subcommands.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use log::error;

use vhost_user_dmaheap::args::{Args, Command};
use vhost_user_dmaheap::config::Config;
use vhost_user_dmaheap::{control, daemon};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match args.command {
        Some(Command::Stats {
            control_socket,
            json,
            timeout,
        }) => control::client_stats(&control_socket, json, Duration::from_secs(timeout))
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
        None => Config::try_from(args.daemon)
            .map_err(Into::into)
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
