//! cairn-fleet: the reference fleet backend. Exit codes: 0 clean stop, 1 failure, 2 usage.

use cairn_fleet::admin::{self, AdminRequest, AdminResponse};
use cairn_fleet::attestation::Policy;
use cairn_fleet::error_chain;
use cairn_fleet::reference::Reference;
use cairn_fleet::remote_write::{self, Endpoint, ExportOptions, Exporter};
use cairn_fleet::server::{Fleet, ServeOptions};
use clap::{Parser, Subcommand};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
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
        /// Re-export every newly stored metric sample with Prometheus remote write to this URL, e.g.
        /// http://127.0.0.1:9090/api/v1/write (plain http only).
        #[arg(long, value_name = "URL", value_parser = parse_remote_write)]
        remote_write: Option<Box<Endpoint>>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Telemetry received per device: sequence ranges per boot (gaps visible), counts, refused batches by
    /// reason. Works whether or not `serve` runs on the same --state.
    Telemetry {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List devices, or approve or forget one. Works whether or not `serve` runs on the same --state.
    Devices {
        /// The fleet's state directory (the same as `serve --state`).
        #[arg(long, global = true)]
        state: Option<PathBuf>,
        /// Print JSON (one document) instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<DeviceAction>,
    },
    /// The workload signer and signed workload sets (see docs/workloads.md).
    Workloads {
        #[command(subcommand)]
        action: WorkloadsAction,
    },
    /// What a good boot of an image measures: writes the image's reference-measurements.json (PCR 4 from
    /// its boot loader and kernel), the --reference input of `serve`. image/build.sh runs it.
    Reference {
        /// The name devices that match are shown under, e.g. "cairn 1.0.0".
        #[arg(long)]
        name: String,
        /// The boot loader firmware starts (the ESP's EFI/BOOT/BOOTX64.EFI).
        #[arg(long, value_name = "EFI")]
        loader: PathBuf,
        /// The kernel the loader starts (an EFI-stub vmlinuz).
        #[arg(long, value_name = "EFI")]
        kernel: PathBuf,
        #[arg(long, value_name = "JSON")]
        out: PathBuf,
    },
    /// The OTA update channel: a TUF repository of image releases (see docs/image.md).
    Update {
        #[command(subcommand)]
        action: UpdateAction,
    },
}

#[derive(Subcommand)]
enum UpdateAction {
    /// Make the update signer DIR/update-signer.key (keep it with the fleet). The repository's root.json,
    /// made at the first publish, is what every image is built with.
    Keygen {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Make the repository's root.json, the trust anchor images are built with (image/build.sh
    /// --update-root), before anything is published. Publishing makes it too when it is missing.
    Init {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Publish an image (target/image/cairn-VERSION.json and the files beside it) as a release, or publish
    /// an existing release again with a new --max-wave or --allow-downgrade.
    Publish {
        /// The repository: STATE/update for `serve` to serve it. Created at the first publish.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The update signer (update-signer.key).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The image manifest from image/build.sh.
        #[arg(long, value_name = "JSON")]
        image: PathBuf,
        /// Devices whose update.wave is at most this take the release (0-9; 9 is every device).
        #[arg(long, default_value_t = cairn_proto::update::MAX_WAVE)]
        max_wave: u32,
        /// Allow devices running a newer version to install this one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Days the signed timestamp stays valid; devices take no update from an expired repository.
        #[arg(long, default_value_t = 30)]
        timestamp_days: i64,
        /// Releases to keep; older ones and the chunks only they use are removed.
        #[arg(long, default_value_t = 3)]
        keep: usize,
    },
    /// Sign the repository again as it stands with a fresh timestamp. Devices take no update from an expired
    /// timestamp: run this (e.g. from a daily timer) when nothing is published for a while.
    Refresh {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Days the new timestamp stays valid.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(i64).range(1..=3650))]
        timestamp_days: i64,
    },
}

/// A one-shot command's message on stdout, or its error (with causes) on stderr.
fn print_outcome<E: std::error::Error>(result: Result<String, E>) -> ExitCode {
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cairn-fleet: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn update(action: UpdateAction) -> ExitCode {
    use cairn_fleet::update_repo as ur;
    let result = match action {
        UpdateAction::Refresh {
            repo,
            key,
            timestamp_days,
        } => {
            let expires = chrono::Utc::now() + chrono::Duration::days(timestamp_days);
            let until = std::time::SystemTime::from(expires);
            return match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    print_outcome(runtime.block_on(ur::refresh(&repo, &key, until)).map(|v| {
                        format!(
                            "signed timestamp version {v} of {}, valid until {expires}",
                            repo.display()
                        )
                    }))
                }
                Err(e) => {
                    eprintln!("cairn-fleet: cannot start the async runtime: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        UpdateAction::Keygen { dir } => ur::keygen(&dir)
            .map(|key| format!("wrote {} (private: keep it with the fleet)", key.display())),
        UpdateAction::Init { repo, key } => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(ur::init(&repo, &key)).map(|(path, made)| {
                if made {
                    format!(
                        "wrote {} (build images with --update-root {})",
                        path.display(),
                        path.display()
                    )
                } else {
                    format!("{} already exists; kept it", path.display())
                }
            }),
            Err(e) => {
                eprintln!("cairn-fleet: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        },
        UpdateAction::Publish {
            repo,
            key,
            image,
            max_wave,
            allow_downgrade,
            timestamp_days,
            keep,
        } => {
            let publish = ur::Publish {
                repo: repo.clone(),
                key,
                image,
                max_wave,
                allow_downgrade,
                timestamp_days,
                keep,
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cairn-fleet: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(ur::publish(&publish)).map(|p| {
                let removed = if p.removed_versions.is_empty() {
                    String::new()
                } else {
                    let v: Vec<String> = p.removed_versions.iter().map(|v| v.to_string()).collect();
                    format!("; removed {}", v.join(", "))
                };
                format!(
                    "published {} as repository version {} in {}: {} chunks, {} new ({} bytes compressed){removed}; \
                     devices trust {}",
                    p.version,
                    p.targets_version,
                    repo.display(),
                    p.chunks,
                    p.new_chunks,
                    p.new_chunk_bytes,
                    ur::root_path(&repo).display()
                )
            })
        }
    };
    print_outcome(result)
}

#[derive(Subcommand)]
enum WorkloadsAction {
    /// Make the workload signer: DIR/workload-signer.key (keep it with the fleet) and
    /// DIR/workload-signer.pub (give it to every device as `workloads.signer_key`).
    Keygen {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Check recipes and sign them as one set. To roll it out, write it as STATE/workloads/default.cose (every
    /// device) or STATE/workloads/<device-id>.cose (one device).
    Sign {
        /// The signer's private key (workload-signer.key).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The set's serial: above the last set's, or devices refuse it as a replay.
        #[arg(long)]
        serial: u64,
        /// Device ids the set is for (repeatable); none means every device.
        #[arg(long = "device")]
        devices: Vec<String>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Recipe files; each command's artifact is read from beside its recipe.
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
    },
}

fn workloads(action: WorkloadsAction) -> ExitCode {
    use cairn_fleet::workloads as wl;
    let result = match action {
        WorkloadsAction::Keygen { dir } => wl::keygen(&dir).map(|(key, public)| {
            format!(
                "wrote {} (private: keep it with the fleet) and {} (give it to every device)",
                key.display(),
                public.display()
            )
        }),
        WorkloadsAction::Sign {
            key,
            serial,
            devices,
            out,
            recipes,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            wl::build_set(&recipes, serial, devices, now).and_then(|set| {
                let n = set.recipes.len();
                wl::sign_to(&set, &key, &out).map(|bytes| {
                    format!(
                        "signed {n} recipe(s) as set {serial} into {} ({bytes} bytes)",
                        out.display()
                    )
                })
            })
        }
    };
    print_outcome(result)
}

#[derive(Subcommand)]
enum DeviceAction {
    /// Vouch for a pending device's TPM; it onboards at its next attempt.
    Approve {
        /// The device id, or the code its console shows (e.g. K7QF-2M9A).
        id: String,
    },
    /// Drop a device's record (keys, pinned PCRs, certificate); it must enrol from scratch.
    Forget {
        /// The device id, or the code its console shows.
        id: String,
    },
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// PEM file of TPM manufacturer EK CA certificates (roots; repeatable). EKs whose certificate chains here enrol.
    #[arg(long = "ek-ca", value_name = "PEM")]
    ek_ca: Vec<PathBuf>,
    /// PEM file of intermediate EK CA certificates (repeatable).
    #[arg(long = "ek-intermediate", value_name = "PEM")]
    ek_intermediates: Vec<PathBuf>,
    /// File of allowed EK names (hex, one per line, # comments): the procurement list.
    #[arg(long, value_name = "FILE")]
    allow_list: Option<PathBuf>,
    /// Reference PCR values (JSON, see docs/protocol.md; `cairn-fleet reference` makes one per image),
    /// repeatable: a device matching any entry of any file passes. PCRs none lists are pinned when a device
    /// first attests them.
    #[arg(long, value_name = "FILE")]
    reference: Vec<PathBuf>,
    /// Seconds a challenge (nonce) stays valid.
    #[arg(long, default_value_t = 60)]
    nonce_ttl_secs: u64,
    /// Seconds after which a device must attest again.
    #[arg(long, default_value_t = 3600)]
    reattest_secs: u64,
    /// Seconds a refused or pending device is told to wait before trying again.
    #[arg(long, default_value_t = 60)]
    retry_after_secs: u64,
}

fn parse_remote_write(url: &str) -> Result<Box<Endpoint>, String> {
    Endpoint::parse(url)
        .map(Box::new)
        .map_err(|e| e.to_string())
}

fn read_pem_certs(path: &PathBuf) -> Result<Vec<Vec<u8>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut pem.as_slice())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn read_allow_list(path: &PathBuf) -> Result<BTreeSet<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let entry = line
            .split('#')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if entry.is_empty() {
            continue;
        }
        if entry.len() != 68
            || !entry.starts_with("000b")
            || cairn_proto::fleet::from_hex(&entry).is_none()
        {
            return Err(format!(
                "{} line {}: {entry:?} is not an EK name (000b followed by 64 hex digits, as `tpm2_readpublic` prints it)",
                path.display(),
                n + 1
            ));
        }
        out.insert(entry);
    }
    Ok(out)
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy, String> {
        let mut policy = Policy::default();
        for p in &self.ek_ca {
            policy.manufacturer_roots.extend(read_pem_certs(p)?);
        }
        for p in &self.ek_intermediates {
            policy.intermediates.extend(read_pem_certs(p)?);
        }
        if let Some(p) = &self.allow_list {
            policy.allow_list = read_allow_list(p)?;
        }
        for p in &self.reference {
            let r = Reference::load(p).map_err(|e| error_chain(&e))?;
            policy.reference.accepted.extend(r.accepted);
        }
        for (name, v) in [
            ("--nonce-ttl-secs", self.nonce_ttl_secs),
            ("--reattest-secs", self.reattest_secs),
            ("--retry-after-secs", self.retry_after_secs),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        policy.nonce_ttl = Duration::from_secs(self.nonce_ttl_secs);
        policy.reattest_after = Duration::from_secs(self.reattest_secs);
        policy.retry_after = Duration::from_secs(self.retry_after_secs);
        Ok(policy)
    }
}

fn telemetry(state: &std::path::Path, json: bool) -> ExitCode {
    let resp = match admin::run(state, &AdminRequest::Telemetry) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cairn-fleet: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let devices = match resp {
        AdminResponse::Telemetry { devices } => devices,
        AdminResponse::Error { message } => {
            eprintln!("cairn-fleet: {message}");
            return ExitCode::FAILURE;
        }
        other => {
            eprintln!("cairn-fleet: unexpected answer {other:?}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        return match serde_json::to_string_pretty(&devices) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cairn-fleet: {e}");
                ExitCode::FAILURE
            }
        };
    }
    for (id, d) in &devices {
        println!(
            "{id}\n  batches {}  samples {}  events {}  duplicates {}",
            d.batches, d.samples, d.events, d.duplicates
        );
        for (boot, ranges) in &d.ranges {
            let text: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            let gaps = ranges.len().saturating_sub(1);
            println!("  boot {boot}: {} ({gaps} gap(s))", text.join(", "));
        }
        for (code, n) in &d.refused {
            println!("  refused {code}: {n}");
        }
    }
    if let Some(x) = remote_write::read_stats(state) {
        println!(
            "remote write to {} (as of unix {})\n  exported {}  queued {}  dropped {}  invalid {}  rejected {}  requests {}  failed requests {}",
            x.url, x.updated_unix, x.exported, x.queued, x.dropped, x.invalid, x.rejected, x.requests, x.failed_requests
        );
        if let Some(e) = &x.last_error {
            println!(
                "  last error (unix {}): {e}",
                x.last_error_unix.unwrap_or(0)
            );
        }
    }
    ExitCode::SUCCESS
}

fn devices(state: &std::path::Path, json: bool, action: Option<DeviceAction>) -> ExitCode {
    let req = match action {
        None => AdminRequest::List,
        Some(DeviceAction::Approve { id }) => AdminRequest::Approve { id },
        Some(DeviceAction::Forget { id }) => AdminRequest::Forget { id },
    };
    let resp = match admin::run(state, &req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cairn-fleet: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&resp) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("cairn-fleet: {e}");
                return ExitCode::FAILURE;
            }
        }
        return match resp {
            AdminResponse::Error { .. } => ExitCode::FAILURE,
            _ => ExitCode::SUCCESS,
        };
    }
    match resp {
        AdminResponse::Devices { devices } => {
            println!(
                "{:<9} {:<68} {:<10} {:<9} {:<14} {:<14} LAST REASON",
                "CODE", "DEVICE", "STATE", "EK", "VOUCHED BY", "IMAGE"
            );
            for d in devices {
                let reason = d
                    .reason
                    .map(|r| format!("{}: {}", r.code, r.message))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<9} {:<68} {:<10} {:<9} {:<14} {:<14} {reason}",
                    cairn_proto::overview::device_code(&d.id),
                    d.id,
                    d.state.as_str(),
                    d.ek_algorithm,
                    d.vouched_by.unwrap_or_else(|| "-".into()),
                    d.reference.unwrap_or_else(|| "-".into()),
                );
            }
            ExitCode::SUCCESS
        }
        AdminResponse::Telemetry { .. } => {
            eprintln!("cairn-fleet: unexpected telemetry answer");
            ExitCode::FAILURE
        }
        AdminResponse::Done { message } => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        AdminResponse::Error { message } => {
            eprintln!("cairn-fleet: {message}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let (listen, state, names, ready_file, export_url, policy) = match Args::parse().command {
        Cmd::Telemetry { state, json } => return telemetry(&state, json),
        Cmd::Workloads { action } => return workloads(action),
        Cmd::Update { action } => return update(action),
        Cmd::Reference {
            name,
            loader,
            kernel,
            out,
        } => {
            return print_outcome(
                cairn_fleet::image_measure::write_reference(&name, &loader, &kernel, &out)
                    .map(|()| format!("wrote {}", out.display())),
            )
        }
        Cmd::Devices {
            state,
            json,
            action,
        } => {
            let Some(state) = state else {
                eprintln!("cairn-fleet: give the fleet's state directory with --state DIR");
                return ExitCode::from(2);
            };
            return devices(&state, json, action);
        }
        Cmd::Serve {
            listen,
            state,
            names,
            ready_file,
            remote_write,
            policy,
        } => (listen, state, names, ready_file, remote_write, policy),
    };
    let policy = match policy.policy() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cairn-fleet: {e}");
            return ExitCode::from(2);
        }
    };
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
            policy,
        })
        .await
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("cairn-fleet: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        };
        match export_url {
            Some(endpoint) => match Exporter::start(ExportOptions::new(*endpoint, Some(&state))) {
                Ok(exporter) => fleet.export_to(exporter),
                Err(e) => {
                    eprintln!("cairn-fleet: {}", error_chain(&e));
                    return ExitCode::FAILURE;
                }
            },
            None => remote_write::forget_stats(&state),
        }
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

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
