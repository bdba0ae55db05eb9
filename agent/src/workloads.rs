//! Workloads in the daemon: loads the kept set, fetches new ones from the fleet over mTLS, and runs the
//! reconciler against systemd. Without the signer key it runs nothing and says so; without systemd it
//! keeps trying and says so; either way the rest of the agent is unaffected.

use crate::attestation::{self, KeyRole};
use crate::config::Config;
use crate::desired::{Desired, Store};
use crate::reconcile::{Inputs, Reconciler};
use crate::status::StatusBoard;
use crate::telemetry::{agent_event, Sink};
use crate::tpm_tls::TpmClientCert;
use crate::uplink::{FleetClient, SetAnswer};
use crate::workload_unit::GpuDevice;
use cairn_proto::control::{Severity, WorkloadsReport};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub type Report = Arc<Mutex<WorkloadsReport>>;

fn update(report: &Report, f: impl FnOnce(&mut WorkloadsReport)) {
    f(&mut report.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Runs until `shutdown`. Units keep running when the agent stops.
pub async fn run(
    config: Config,
    board: StatusBoard,
    events: Arc<dyn Sink>,
    report: Report,
    mut shutdown: watch::Receiver<bool>,
) {
    let wl = &config.workloads;
    let signer = match crate::desired::load_signer(&wl.signer_key) {
        Ok(s) => s,
        Err(e) => {
            update(&report, |r| {
                r.state = "off".into();
                r.detail = crate::error_chain(&e);
            });
            tracing::info!(reason = %crate::error_chain(&e), "workloads off");
            return;
        }
    };
    let store = Arc::new(Store::new(&config.agent.data_dir, signer));
    let (desired_tx, desired_rx) = watch::channel::<Option<Desired>>(None);
    match store.load() {
        Ok(Some(d)) => {
            update(&report, |r| {
                r.state = "applied".into();
                r.serial = Some(d.serial);
                r.detail = format!("set {} kept on disk, applied at start", d.serial);
            });
            let _ = desired_tx.send(Some(d));
        }
        Ok(None) => update(&report, |r| {
            r.state = "waiting".into();
            r.detail =
                "no workload set yet: the fleet sends one once the device is onboarded".into();
        }),
        Err(e) => {
            let why = crate::error_chain(&e);
            tracing::error!(reason = %why, "the kept workload set is not valid; running units are left alone");
            events.event(agent_event(
                "workloads",
                crate::reconcile::EVENT_KIND,
                Severity::Critical,
                format!("the kept workload set is refused: {why}"),
            ));
            update(&report, |r| {
                r.state = "error".into();
                r.detail = format!("the kept workload set is refused ({why}); running units are left alone until the fleet sends a good one");
            });
        }
    }

    // Connect to systemd, retrying: it may not be up yet, or the bus address may appear later.
    let address = (!wl.dbus_address.is_empty()).then(|| wl.dbus_address.clone());
    let journal = (!wl.journal_dir.as_os_str().is_empty()).then(|| wl.journal_dir.clone());
    let sd = loop {
        match crate::systemd::Dbus::connect(address.as_deref(), journal.clone()).await {
            Ok(sd) => break sd,
            Err(e) => {
                let why = crate::error_chain(&e);
                update(&report, |r| {
                    r.state = "error".into();
                    r.detail = format!("{why}; retrying every 10 s");
                });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    update(&report, |r| {
        if r.state == "error" && r.detail.contains("D-Bus") {
            r.state = if r.serial.is_some() {
                "applied"
            } else {
                "waiting"
            }
            .into();
            r.detail = "connected to systemd".into();
        }
    });

    let attested = {
        let board = board.clone();
        Box::new(move || board.snapshot().onboarding.state == "onboarded")
    };
    let reconciler = Reconciler::new(
        Arc::new(sd),
        Inputs {
            store: store.clone(),
            gpus: gpus(&board).await,
            attested,
            events: events.clone(),
            report: report.clone(),
            failed_grace: Duration::from_secs(3),
            resync: Duration::from_secs(wl.resync_interval_secs.max(1)),
        },
    );
    let task = tokio::spawn(reconciler.run(desired_rx, shutdown.clone()));

    let mut etag: Option<String> = None;
    loop {
        let fetched = fetch(&config, &board, etag.as_deref()).await;
        let serial = desired_tx.borrow().as_ref().map(|d| d.serial);
        match fetched {
            Fetch::NotYet(why) => update(&report, |r| {
                if r.serial.is_none() && r.state != "error" {
                    r.detail = why;
                }
            }),
            Fetch::Failed(why) => {
                tracing::debug!(reason = %why, "workload set fetch failed");
            }
            Fetch::Answer(SetAnswer::NotModified) => {}
            Fetch::Answer(SetAnswer::NoSet) => update(&report, |r| {
                if r.serial.is_none() {
                    r.detail = "the fleet has no workload set for this device".into();
                }
            }),
            Fetch::Answer(SetAnswer::Set { bytes, etag: tag }) => {
                etag = tag;
                let device = board.snapshot().onboarding.device_id.unwrap_or_default();
                match store.accept(&bytes, &device, serial) {
                    Ok(d) => {
                        let n = d.serial;
                        // The previous set's artifacts stay: its units run until their replacements are up.
                        let keep: Vec<(String, String)> = d
                            .recipes
                            .iter()
                            .chain(desired_tx.borrow().iter().flat_map(|p| p.recipes.iter()))
                            .map(|r| (r.recipe.name.clone(), r.digest.clone()))
                            .collect();
                        store.prune(&keep);
                        let count = d.recipes.len();
                        let _ = desired_tx.send(Some(d));
                        events.event(agent_event(
                            "workloads",
                            crate::reconcile::EVENT_KIND,
                            Severity::Info,
                            format!("workload set {n} accepted ({count} recipes)"),
                        ));
                        tracing::info!(serial = n, recipes = count, "workload set accepted");
                        update(&report, |r| {
                            r.state = "applied".into();
                            r.serial = Some(n);
                            r.refused = None;
                            r.detail = format!("set {n} from the fleet");
                        });
                    }
                    Err(e) => {
                        let why = crate::error_chain(&e);
                        tracing::warn!(reason = %why, "workload set refused");
                        events.event(agent_event(
                            "workloads",
                            crate::reconcile::EVENT_KIND,
                            Severity::Warning,
                            format!("workload set refused: {why}"),
                        ));
                        update(&report, |r| r.refused = Some(why));
                    }
                }
            }
        }
        let onboarded = board.snapshot().onboarding.state == "onboarded";
        let wait = if onboarded {
            Duration::from_secs(wl.fetch_interval_secs.max(1))
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
}

/// The site's GPUs as workloads get them: NVML's index is the device minor (`/dev/nvidia<index>`).
async fn gpus(board: &StatusBoard) -> Vec<GpuDevice> {
    // The hardware thread polls at start; give it a moment so GPU workloads do not wait a resync.
    for _ in 0..50 {
        match &board.snapshot().gpus {
            cairn_proto::control::ComponentStatus::Unknown => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => {
                return other
                    .facts()
                    .map(|f| {
                        f.gpus
                            .iter()
                            .map(|g| GpuDevice {
                                uuid: g.uuid.clone(),
                                minor: g.index,
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            }
        }
    }
    Vec::new()
}

enum Fetch {
    NotYet(String),
    Failed(String),
    Answer(SetAnswer),
}

async fn fetch(config: &Config, board: &StatusBoard, etag: Option<&str>) -> Fetch {
    let onboarding = board.snapshot().onboarding;
    let (Some(_), Some(url)) = (onboarding.device_id, onboarding.fleet_url) else {
        return Fetch::NotYet(
            "waiting for onboarding before asking the fleet for workloads".into(),
        );
    };
    let alg = match config.ek_algorithm() {
        Ok(a) => a,
        Err(e) => return Fetch::Failed(e),
    };
    let cert_path = attestation::key_dir(&config.agent.data_dir, alg).join("device.crt");
    let Ok(cert_pem) = std::fs::read_to_string(&cert_path) else {
        return Fetch::NotYet("the device has no fleet certificate yet".into());
    };
    let (tcti, data_dir) = (config.tpm.tcti.clone(), config.agent.data_dir.clone());
    let identity = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let tpm = cairn_tpm::Tpm::new(&tcti).map_err(|e| crate::error_chain(&e))?;
        let key = attestation::load_or_create(&tpm, &data_dir, alg, KeyRole::Device)
            .map_err(|e| crate::error_chain(&e))?;
        TpmClientCert::new(tpm, alg, key, &cert_pem)
    })
    .await;
    let identity = match identity {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => return Fetch::Failed(e),
        Err(e) => return Fetch::Failed(format!("the TPM task failed: {e}")),
    };
    let client = match FleetClient::with_client_cert(
        &url,
        &config.fleet.ca_file,
        Duration::from_secs(config.fleet.timeout_secs.max(30)),
        Arc::new(identity),
    ) {
        Ok(c) => c,
        Err(e) => return Fetch::Failed(crate::error_chain(&e)),
    };
    match client.workload_set(etag).await {
        Ok(a) => Fetch::Answer(a),
        Err(e) => Fetch::Failed(crate::error_chain(&e)),
    }
}
