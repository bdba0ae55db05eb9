//! cairn-sim: start, stop and poke a simulated site (see the `cairn_sim` crate docs).
//! `just sim-up DIR` and `just sim-down DIR` call this.

use cairn_sim::nvme_fixtures::DriveCondition;
use cairn_sim::{Site, SiteOptions, Trust};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    about = "Run a simulated cairn site: swtpm, reference fleet, fake GPUs and sysfs, cairnd"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a whole site in the background with all state under DIR, and write DIR/site.env.
    Up {
        dir: PathBuf,
        /// Fake GPU profile: h100x8, l4x1 or none.
        #[arg(long, default_value = "h100x8")]
        gpus: String,
        /// Number of fake NVMe drives.
        #[arg(long, default_value_t = 8)]
        nvme: usize,
        /// EK the device uses: rsa2048 or ecc-p256.
        #[arg(long, default_value = "rsa2048")]
        ek: cairn_tpm::EkAlgorithm,
        /// What vouches for the TPM: ek-cert (swtpm's local CA as manufacturer), allow-list, or operator
        /// (pending until `cairn-fleet devices approve`).
        #[arg(long, default_value = "ek-cert", value_parser = ["ek-cert", "allow-list", "operator"])]
        trust: String,
        /// Give NVMe drive N a worn-out SMART log (95 % used); repeatable.
        #[arg(long = "worn-drive", value_name = "N")]
        worn: Vec<usize>,
        /// Give NVMe drive N a failing SMART log (critical warnings, spare below threshold); repeatable.
        #[arg(long = "failing-drive", value_name = "N")]
        failing: Vec<usize>,
        /// Run workloads: boot a systemd container (systemd-nspawn; the first time builds its rootfs with
        /// mmdebstrap, about half a minute) and make a workload signer in DIR/signer.
        #[arg(long)]
        workloads: bool,
    },
    /// Stop everything `up` started in DIR.
    Down { dir: PathBuf },
    /// Stop the fleet (an uplink outage); its state stays.
    FleetStop { dir: PathBuf },
    /// Start the fleet again on its old address.
    FleetStart { dir: PathBuf },
}

fn main() -> ExitCode {
    let result = match Args::parse().command {
        Cmd::Up {
            dir,
            gpus,
            nvme,
            ek,
            trust,
            worn,
            failing,
            workloads,
        } => {
            let mut opts = SiteOptions {
                gpu_profile: gpus,
                ek_algorithm: ek,
                trust: match trust.as_str() {
                    "allow-list" => Trust::AllowList,
                    "operator" => Trust::Operator,
                    _ => Trust::EkCertificate,
                },
                workloads,
                ..SiteOptions::default()
            };
            opts.tree.nvme_drives = nvme;
            opts.tree.nvme_conditions = worn
                .into_iter()
                .map(|n| (n, DriveCondition::Worn))
                .chain(failing.into_iter().map(|n| (n, DriveCondition::Failing)))
                .collect();
            Site::up(&dir, &opts).map(|site| {
                print!(
                    "{}",
                    std::fs::read_to_string(site.dir.join("site.env")).unwrap_or_default()
                );
                site.detach();
            })
        }
        Cmd::Down { dir } => Site::load(&dir).map(|mut site| {
            let killed = site.down();
            if !killed.is_empty() {
                eprintln!("cairn-sim: had to SIGKILL {}", killed.join(", "));
            }
        }),
        Cmd::FleetStop { dir } => Site::load(&dir).map(|mut site| site.stop_fleet()),
        Cmd::FleetStart { dir } => Site::load(&dir).and_then(|mut site| site.start_fleet()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-sim: {}", cairn_agent::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
