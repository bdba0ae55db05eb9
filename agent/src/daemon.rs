//! cairnd's main loop: wires the parts, reports readiness to systemd, and shuts down cleanly on SIGTERM or
//! SIGINT. Each part runs as its own task; blocking hardware calls run on their own threads.

use crate::config::Loaded;
use crate::hardware::gpu::NvmlGpus;
use crate::hardware::nvme::DevSmart;
use crate::identity::TpmProbe;
use crate::status::{component, StatusBoard};
use crate::telemetry::{kind, OnChange};
use crate::uplink::FleetClient;
use crate::{control, metrics, notify};
use cairn_proto::control::{AgentStatus, FleetFacts};
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime or install signal handlers")]
    Runtime(#[source] std::io::Error),
}

pub fn run(loaded: Loaded) -> Result<(), DaemonError> {
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(run_async(loaded))
}

/// glibc gives each thread that allocates an arena of its own; with fifteen threads (tokio, sled, NVML,
/// hardware) that was half of cairnd's resident memory (measured: 12.4 MiB anonymous, 6.3 MiB with one arena).
/// Two arenas keep the agent's few allocating threads from contending.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before the runtime starts its threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

async fn run_async(loaded: Loaded) -> Result<(), DaemonError> {
    let config = loaded.config;
    std::fs::create_dir_all(&config.agent.data_dir).map_err(|source| DaemonError::DataDir {
        path: config.agent.data_dir.clone(),
        source,
    })?;

    let board = StatusBoard::new(
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: 0,
            config_sources: loaded.sources.clone(),
            data_dir: config.agent.data_dir.display().to_string(),
        },
        crate::onboarding::load_state(&config.agent.data_dir),
    );

    let sink = crate::telemetry::LocalSink::default();
    // The spool is where telemetry survives outages; without it the agent still runs and says why.
    // A damaged spool (sled can leave one after a power cut during its own recovery) is set aside and a new
    // one started, so the box does not go without telemetry until someone visits; the loss is reported.
    let mut set_aside = None;
    let spool = match crate::spool::Spool::open_or_set_aside(
        &config.agent.data_dir.join("spool"),
        crate::spool::SpoolConfig {
            budget_bytes: config.telemetry.budget_bytes,
            flush_interval: Duration::from_millis(config.telemetry.flush_interval_ms),
            ..crate::spool::SpoolConfig::default()
        },
    ) {
        Ok((s, aside)) => {
            set_aside = aside;
            Some(std::sync::Arc::new(s))
        }
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "telemetry spool unavailable; telemetry is not kept");
            None
        }
    };
    let uplink_state =
        std::sync::Arc::new(std::sync::Mutex::new(crate::forward::UplinkState::default()));
    let collector_sink = crate::forward::SpoolSink {
        local: sink.clone(),
        spool: spool.clone(),
    };
    // The agent's own events (attestation outcomes, its errors) go where the health model's go.
    let events: std::sync::Arc<dyn crate::telemetry::Sink> =
        std::sync::Arc::new(collector_sink.clone());
    if let Some(aside) = set_aside {
        let message = format!(
            "the telemetry spool was damaged and could not be opened ({}); it was moved to {} and a new spool \
             started: telemetry the fleet had not acknowledged before this start is lost",
            aside.reason,
            aside.moved_to.display()
        );
        tracing::error!("{message}");
        events.event(crate::telemetry::agent_event(
            "spool",
            crate::telemetry::kind::AGENT_ERROR,
            crate::telemetry::Severity::Critical,
            message,
        ));
    }

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;

    let listener = control::bind(&config.agent.control_socket)?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics.listen)
        .await
        .map_err(|source| DaemonError::Metrics {
            addr: config.metrics.listen,
            source,
        })?;

    // Hardware pollers: blocking calls (NVML, TPM, file reads), each on a thread of its own, stopped through a
    // channel whose sender is dropped at shutdown.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let hw = {
        let board = board.clone();
        let sink = collector_sink.clone();
        let interval = Duration::from_secs(config.hardware.poll_interval_secs);
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut collector = crate::collect::Collector::new(
            Box::new(NvmlGpus::new(config.hardware.nvml_library.clone())),
            Box::new(DevSmart::new(config.hardware.sys_root.clone())),
            config.hardware.sys_root.clone(),
            &config.power,
            config.health.clone(),
            Duration::from_secs(config.hardware.nvme_interval_secs),
            hostname,
        );
        let tpm_interval = Duration::from_secs(config.tpm.probe_interval_secs);
        let tpm: Option<Box<dyn TpmProbe>> = match cairn_tpm::Tpm::new(&config.tpm.tcti) {
            Ok(t) => Some(Box::new(t)),
            Err(e) => {
                let reason = crate::error_chain(&e);
                board.update(|s| s.tpm = component(Err(reason)));
                None
            }
        };
        let events = events.clone();
        std::thread::Builder::new()
            .name("hardware".into())
            .spawn(move || {
                let mut last_tpm: Option<std::time::Instant> = None;
                let mut tpm_outcome = OnChange::default();
                loop {
                    collector.poll(&board, &sink);
                    if let Some(tpm) = &tpm {
                        if last_tpm.is_none_or(|t| t.elapsed() >= tpm_interval) {
                            let facts = tpm.probe();
                            if let Err(e) = &facts {
                                tracing::warn!(reason = %e, "TPM check failed");
                            }
                            if let Some(event) = tpm_outcome.observe(
                                facts.as_ref().map(|_| ()).map_err(String::as_str),
                                "tpm",
                                kind::AGENT_ERROR,
                                "TPM check failed",
                                "TPM usable again",
                            ) {
                                events.event(event);
                            }
                            board.update(|s| s.tpm = component(facts));
                            last_tpm = Some(std::time::Instant::now());
                        }
                    }
                    match stop_rx.recv_timeout(interval) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        _ => return,
                    }
                }
            })
            .map_err(DaemonError::Runtime)?
    };

    let fleet_task = {
        let board = board.clone();
        let fleet = config.fleet.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let mut reachable = OnChange::default();
            let timeout = Duration::from_secs(fleet.timeout_secs);
            let mut client = None;
            let mut client_url = String::new();
            let mut was_ok = None;
            loop {
                // The fleet onboarding found (provisioning file, DNS SRV) wins over the configured one.
                let url = board
                    .snapshot()
                    .onboarding
                    .fleet_url
                    .unwrap_or_else(|| fleet.url.clone());
                if url != client_url {
                    client = None;
                    client_url.clone_from(&url);
                }
                // Built lazily and retried: a CA file that appears later (provisioning) is picked up.
                if client.is_none() {
                    client = Some(FleetClient::new(&url, &fleet.ca_file, timeout));
                }
                let result = match &client {
                    Some(Ok(c)) => c.info().await.map_err(|e| crate::error_chain(&e)),
                    Some(Err(e)) => Err(crate::error_chain(e)),
                    None => Err("fleet client not built".to_owned()),
                };
                if matches!(client, Some(Err(_))) {
                    client = None;
                }
                if let Some(event) = reachable.observe(
                    result.as_ref().map(|_| ()).map_err(String::as_str),
                    "fleet",
                    kind::UPLINK,
                    "fleet unreachable",
                    "fleet reachable again",
                ) {
                    events.event(event);
                }
                let ok = result.is_ok();
                if was_ok != Some(ok) {
                    match &result {
                        Ok(_) => tracing::info!(%url, "fleet reachable"),
                        Err(e) => {
                            tracing::warn!(%url, reason = %e, "fleet {url} unreachable: {e}")
                        }
                    }
                    was_ok = Some(ok);
                }
                let facts = result.map(|(info, rtt)| FleetFacts {
                    url: url.clone(),
                    protocol_version: cairn_proto::fleet::FLEET_PROTOCOL_VERSION,
                    fleet_version: info.version,
                    round_trip_us: rtt.as_micros() as u64,
                });
                board.update(|s| s.fleet = component(facts));
                tokio::time::sleep(Duration::from_secs(fleet.check_interval_secs)).await;
            }
        })
    };

    // Onboarding needs a usable TPM configuration; without one the agent still runs and says why.
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (attest_tx, onboarding_task) =
        match crate::onboarding::Onboarding::new(&config, board.clone(), events.clone()) {
            Ok(o) => {
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                (Some(tx), Some(tokio::spawn(o.run(rx, shutdown_rx))))
            }
            Err(reason) => {
                tracing::error!(%reason, "onboarding cannot start");
                board.update(|s| {
                    s.onboarding.state = "retrying".into();
                    s.onboarding.detail = format!("onboarding cannot start: {reason}");
                });
                (None, None)
            }
        };
    let forward_task = match &spool {
        Some(spool) => match crate::forward::Forwarder::new(
            &config,
            spool.clone(),
            board.clone(),
            uplink_state.clone(),
            events.clone(),
        ) {
            Ok(f) => Some(tokio::spawn(f.run(shutdown_tx.subscribe()))),
            Err(reason) => {
                tracing::error!(%reason, "telemetry uplink cannot start");
                None
            }
        },
        None => None,
    };
    let workloads_report = crate::workloads::Report::default();
    let workloads_task = tokio::spawn(crate::workloads::run(
        config.clone(),
        board.clone(),
        events.clone(),
        workloads_report.clone(),
        shutdown_tx.subscribe(),
    ));
    let update_status = crate::update::StatusHandle::default();
    let (update_tx, update_rx) = tokio::sync::mpsc::channel(1);
    let updater = std::sync::Arc::new(crate::update::Updater::new(
        &config.update,
        &config.agent.data_dir,
        std::sync::Arc::new(crate::update::slots::Esp {
            esp: config.update.esp.clone(),
            partitions: config.update.partitions.clone(),
            cmdline: config.update.cmdline.clone(),
            os_release: config.update.os_release.clone(),
        }),
        std::sync::Arc::new(crate::update::SystemdReboot),
        events.clone(),
        update_status.clone(),
    ));
    let update_task = {
        let (board, cfg, fleet) = (board.clone(), config.update.clone(), config.fleet.clone());
        let source = move || update_source(&cfg, &fleet, &board);
        tokio::spawn(crate::update::run(
            updater,
            source,
            update_rx,
            shutdown_tx.subscribe(),
            Duration::from_secs(config.update.check_interval_secs),
            Duration::from_secs(config.update.watch_interval_secs),
        ))
    };
    let control_ctx = control::Context {
        board: board.clone(),
        attest: attest_tx,
        sink: sink.clone(),
        spool: spool.clone(),
        uplink: uplink_state.clone(),
        workloads: workloads_report,
        update: update_status,
        update_check: Some(update_tx),
        overview: crate::overview::Sources::from_config(&config),
    };
    let page_task = tokio::spawn(crate::local_page::run(control_ctx.clone()));
    let control_task = tokio::spawn(control::serve(listener, control_ctx));
    let metrics_task = tokio::spawn(metrics::serve(
        metrics_listener,
        board.clone(),
        sink.clone(),
    ));

    // systemctl status shows this line; refreshed as the picture changes.
    let notify_task = {
        let board = board.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let line = crate::view::summary(&board.snapshot());
                if line != last {
                    notify::status(&line);
                    last = line;
                }
            }
        })
    };

    let watchdog_task = notify::watchdog_interval().map(|every| {
        tokio::spawn(async move {
            loop {
                notify::watchdog();
                tokio::time::sleep(every).await;
            }
        })
    });

    tracing::info!(
        socket = %config.agent.control_socket.display(),
        metrics = %config.metrics.listen,
        sources = ?loaded.sources,
        "cairnd ready"
    );
    notify::ready("running");

    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal = signal_name, "shutting down");
    notify::stopping(Duration::from_secs(1));

    control_task.abort();
    let _ = shutdown_tx.send(true);
    if let Some(t) = onboarding_task {
        // It stops between TPM commands; a blocking TPM call already running finishes on its own thread.
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let Some(t) = forward_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    // Workload units are systemd's: they keep running, and the next agent adopts them.
    let _ = tokio::time::timeout(Duration::from_secs(3), workloads_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), update_task).await;
    metrics_task.abort();
    page_task.abort();
    fleet_task.abort();
    notify_task.abort();
    if let Some(t) = watchdog_task {
        t.abort();
    }
    drop(stop_tx);
    // The hardware thread wakes at once on the closed channel unless it is inside a call (NVML, TPM): wait
    // for it so the TPM is never left mid-command.
    let _ = tokio::task::spawn_blocking(move || hw.join()).await;
    if let Some(spool) = &spool {
        // Whatever the collectors produced up to the last poll is made durable before exit.
        if let Err(e) = spool.flush() {
            tracing::warn!(error = %crate::error_chain(&e), "final spool flush failed");
        }
    }
    let _ = std::fs::remove_file(&config.agent.control_socket);
    tracing::info!("stopped");
    Ok(())
}

/// The update channel's location: a configured directory, or the fleet onboarding found (or the configured one).
fn update_source(
    cfg: &crate::config::UpdateConfig,
    fleet: &crate::config::FleetConfig,
    board: &StatusBoard,
) -> Result<crate::update::channel::Source, crate::update::UpdateError> {
    use crate::update::{channel::Source, UpdateError};
    if !cfg.repository.is_empty() {
        let url = url::Url::parse(&cfg.repository).map_err(|e| {
            UpdateError::Channel(format!("update.repository {:?}: {e}", cfg.repository))
        })?;
        return Ok(Source::Directory(url));
    }
    let url = board
        .snapshot()
        .onboarding
        .fleet_url
        .unwrap_or_else(|| fleet.url.clone());
    if url.is_empty() {
        return Err(UpdateError::NoFleet);
    }
    let base = url::Url::parse(&url)
        .and_then(|u| u.join(cairn_proto::update::UPDATE_PATH))
        .map_err(|e| UpdateError::Channel(format!("fleet URL {url:?}: {e}")))?;
    let client = FleetClient::new(
        &url,
        &fleet.ca_file,
        Duration::from_secs(fleet.timeout_secs.max(30)),
    )
    .map_err(|e| UpdateError::Channel(crate::error_chain(&e)))?;
    Ok(Source::Fleet { client, base })
}
