//! cairn-fleet: the reference fleet backend. Exit codes: 0 clean stop, 1 failure, 2 usage.

use cairn_fleet::server::{Fleet, ServeOptions};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(version, about = "The cairn reference fleet backend")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the fleet protocol over HTTPS until SIGTERM or SIGINT.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8443 (port 0 picks a free port; see --ready-file).
        #[arg(long)]
        listen: SocketAddr,
        /// Directory holding the fleet's state: its CA, devices, telemetry. Created if missing.
        #[arg(long)]
        state: PathBuf,
        /// Extra DNS name or IP for the server certificate (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Once listening, write the URL here (for scripts that start the fleet on port 0).
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
    },
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let Args {
        command:
            Cmd::Serve {
                listen,
                state,
                names,
                ready_file,
            },
    } = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn-fleet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let fleet = match Fleet::bind(&ServeOptions {
            listen,
            state: state.clone(),
            names,
        })
        .await
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("cairn-fleet: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        };
        let url = format!("https://{}", fleet.local_addr);
        tracing::info!(%url, state = %state.display(), "cairn-fleet serving");
        if let Some(path) = ready_file {
            if let Err(e) = std::fs::write(&path, format!("{url}\n")) {
                eprintln!("cairn-fleet: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                eprintln!("cairn-fleet: cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let server = tokio::spawn(fleet.serve());
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        server.abort();
        tracing::info!("cairn-fleet stopped");
        ExitCode::SUCCESS
    })
}
