//! cairnctl: the local CLI. Talks to cairnd over its control socket.
//! Exit codes: 0 ok, 1 error, 2 usage, 69 cairnd not reachable, 78 configuration error.

use cairn_agent::control::{self, ControlError};
use cairn_agent::{config, view};
use cairn_proto::control::{Command, Response};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(version, about = "Look at and steer the local cairn agent")]
struct Args {
    /// The agent's configuration file (to find its control socket); default: the agent's own search.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Talk to this control socket instead of the configured one.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What the agent knows: TPM, GPUs, sensors, fleet, onboarding.
    Status {
        /// Machine-readable output (the control protocol's status object).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let socket = match args.socket {
        Some(s) => s,
        None => match config::load(&config::Sources::system(args.config)) {
            Ok(l) => l.config.agent.control_socket,
            Err(e) => {
                eprintln!("cairnctl: {}", cairn_agent::error_chain(&e));
                return ExitCode::from(config::EXIT_CONFIG as u8);
            }
        },
    };
    match args.command {
        Cmd::Status { json } => {
            match control::request(&socket, Command::Status, Duration::from_secs(10)) {
                Ok(Response::Status(status)) => {
                    if json {
                        match serde_json::to_string_pretty(&status) {
                            Ok(t) => println!("{t}"),
                            Err(e) => {
                                eprintln!("cairnctl: cannot print the status: {e}");
                                return ExitCode::FAILURE;
                            }
                        }
                    } else {
                        print!("{}", view::render(&status));
                    }
                    ExitCode::SUCCESS
                }
                Ok(other) => {
                    eprintln!("cairnctl: unexpected answer from cairnd: {other:?}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("cairnctl: {}", cairn_agent::error_chain(&e));
                    match e {
                        ControlError::Connect { .. } => ExitCode::from(EXIT_UNAVAILABLE),
                        _ => ExitCode::FAILURE,
                    }
                }
            }
        }
    }
}
