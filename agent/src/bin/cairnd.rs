//! cairnd: the cairn supervisor daemon. Parses arguments, loads the configuration, and hands over to
//! [`cairn_agent::daemon`]. Exit codes: 0 clean stop, 1 runtime failure, 78 configuration error.

use cairn_agent::{config, daemon, logging};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "The cairn supervisor daemon")]
struct Args {
    /// Read only this configuration file (and FILE.d/*.toml) instead of /usr/lib/cairn and /etc/cairn.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Load and check the configuration, print it as TOML, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let loaded = match config::load(&config::Sources::system(args.config)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cairnd: {}", cairn_agent::error_chain(&e));
            return ExitCode::from(config::EXIT_CONFIG as u8);
        }
    };
    if args.check_config {
        match toml::to_string(&loaded.config) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("cairnd: cannot print the configuration: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    logging::init(&loaded.config.agent.log_level);
    match daemon::run(loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", cairn_agent::error_chain(&e));
            eprintln!("cairnd: {}", cairn_agent::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
