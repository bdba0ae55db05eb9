//! Store and forward on the simulated site: telemetry keeps flowing into the spool while the fleet is down,
//! and after it returns every sequence arrives exactly once, signed by the device's telemetry key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_proto::control::{Command, Response, TelemetryStatus};
use cairn_sim::{Site, SiteOptions};
use std::time::{Duration, Instant};

fn telemetry(site: &Site) -> TelemetryStatus {
    match cairn_agent::control::request(
        &site.env.control_socket,
        Command::Telemetry,
        Duration::from_secs(5),
    )
    .unwrap()
    {
        Response::Telemetry(t) => t,
        other => panic!("{other:?}"),
    }
}

/// The agent's recent events (kind, message), as `cairnctl health` shows them.
fn recent_events(site: &Site) -> Vec<(String, String)> {
    match cairn_agent::control::request(
        &site.env.control_socket,
        Command::Health,
        Duration::from_secs(5),
    )
    .unwrap()
    {
        Response::Health(h) => h.events.into_iter().map(|e| (e.kind, e.message)).collect(),
        other => panic!("{other:?}"),
    }
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fleet_view(site: &Site) -> serde_json::Value {
    let out = std::process::Command::new(cairn_sim::process::bin_dir().join("cairn-fleet"))
        .args(["telemetry", "--json", "--state"])
        .arg(&site.env.fleet_state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn an_outage_loses_nothing_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::up(&tmp.path().join("site"), &SiteOptions::default()).unwrap();
    site.wait_onboarding("onboarded", Duration::from_secs(30))
        .expect("onboarded");
    wait("a first upload", Duration::from_secs(20), || {
        telemetry(&site).acked_seq > 0
    });

    site.stop_fleet();
    let at_stop = telemetry(&site).acked_seq;
    // Ten polls of 8 GPUs, 8 drives and the power tree accumulate while nobody listens.
    std::thread::sleep(Duration::from_secs(10));
    let during = telemetry(&site);
    assert!(
        during.durable_seq > at_stop + 500,
        "the spool did not grow during the outage: {during:?}"
    );
    assert!(during.depth > 500, "{during:?}");
    // Caught up, the forwarder uploads every 10 s: its next attempt fails and says so.
    wait("a failed upload reported", Duration::from_secs(30), || {
        telemetry(&site)
            .last_upload
            .is_some_and(|u| !u.starts_with("ok"))
    });

    site.start_fleet().unwrap();
    let target = during.durable_seq;
    // Backoff is capped at 10 s in the simulated site.
    wait("the backlog drained", Duration::from_secs(40), || {
        telemetry(&site).acked_seq >= target
    });

    // The agent told its own story as events: attested, lost the fleet, failed an upload, got both back.
    let events = recent_events(&site);
    let has = |kind: &str, start: &str| {
        events
            .iter()
            .any(|(k, m)| k == kind && m.starts_with(start))
    };
    assert!(has("attestation", "onboarded"), "{events:?}");
    assert!(has("uplink", "fleet unreachable: "), "{events:?}");
    assert!(has("uplink", "fleet reachable again"), "{events:?}");
    assert!(
        has("agent_error", "telemetry upload failed: "),
        "{events:?}"
    );
    assert!(
        has("agent_error", "telemetry uploads work again"),
        "{events:?}"
    );
    // …and they reach the fleet like any other record.
    wait(
        "the outage's events at the fleet",
        Duration::from_secs(30),
        || {
            stored_records(&site).iter().any(|r| {
                matches!(&r.body, cairn_proto::telemetry::WireBody::Event { kind, message, .. }
                if kind == "uplink" && message == "fleet reachable again")
            })
        },
    );

    let view = fleet_view(&site);
    let devices = view.as_object().unwrap();
    assert_eq!(devices.len(), 1, "{view}");
    let dev = devices.values().next().unwrap();
    let boots = dev["ranges"].as_object().unwrap();
    assert_eq!(boots.len(), 1, "{view}");
    let ranges = boots.values().next().unwrap().as_array().unwrap();
    // One contiguous range from the first record: no gaps.
    assert_eq!(ranges.len(), 1, "gaps: {view}");
    let (first, last) = (
        ranges[0][0].as_u64().unwrap(),
        ranges[0][1].as_u64().unwrap(),
    );
    assert_eq!(first, 1);
    assert!(last >= target);
    // Every sequence once: nothing was thinned, so records stored = sequences covered.
    let stored = dev["samples"].as_u64().unwrap() + dev["events"].as_u64().unwrap();
    assert_eq!(stored, last - first + 1, "{view}");
    assert!(
        dev["refused"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k == "replayed"),
        "{view}"
    );
}

/// Every record the fleet stored for the site's one device, decoded from the signed batches it kept.
fn stored_records(site: &Site) -> Vec<cairn_proto::telemetry::WireRecord> {
    let root = site.env.fleet_state.join("telemetry");
    let mut out = Vec::new();
    for dev in std::fs::read_dir(&root).unwrap().flatten() {
        if !dev.file_type().unwrap().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dev.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "cose") {
                let bytes = std::fs::read(f.path()).unwrap();
                let signed = cairn_proto::telemetry::SignedBatch::parse(&bytes).unwrap();
                out.extend(signed.batch().unwrap().records);
            }
        }
    }
    out.sort_by_key(|r| r.seq);
    out
}

/// A repeatable pseudo-random number for series `i` at `step` (splitmix64).
fn noise(step: usize, i: usize) -> u64 {
    let mut z = ((step as u64) << 32 | i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A long outage: hours of a 500-series site pile up in the spool (written while cairnd is stopped, as fast
/// as the spool takes them), then cairnd runs on with the fleet still down and a GPU fault raises an event.
/// The spool's files never pass the budget by more than a commit, samples are thinned and counted, every
/// event survives; when the fleet returns, each event arrives exactly once.
#[test]
fn a_long_outage_stays_within_the_budget_thins_samples_and_keeps_every_event() {
    use cairn_agent::spool::{RecordBody, Spool, SpoolConfig, DROP_EVENT_KIND};
    use cairn_agent::telemetry::{Event, Severity};
    const BUDGET: u64 = 2 * cairn_agent::spool::MIN_BUDGET_BYTES;
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::up(
        &tmp.path().join("site"),
        &SiteOptions {
            extra_config: format!("[telemetry]\nbudget_bytes = {BUDGET}\n"),
            ..SiteOptions::default()
        },
    )
    .unwrap();
    site.wait_onboarding("onboarded", Duration::from_secs(30))
        .expect("onboarded");
    wait("a first upload", Duration::from_secs(20), || {
        telemetry(&site).acked_seq > 0
    });

    // The uplink goes; hours of telemetry accumulate.
    site.stop_fleet();
    site.stop_cairnd();
    let spool_dir = site.dir.join("agent/data/spool");
    let spool = Spool::open(
        &spool_dir,
        SpoolConfig {
            budget_bytes: BUDGET,
            ..SpoolConfig::default()
        },
    )
    .unwrap();
    let labels: Vec<Vec<(String, String)>> =
        (0..500).map(cairn_sim::telemetry_peer::labels).collect();
    const STEPS: usize = 1440; // 4 h at 10 s
    const EVENT_EVERY: usize = 30;
    let start = 1_790_000_000_000u64;
    // Everything in the spool's directory, sampled all along: also while a compaction writes its copy.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (dir, watching) = (spool_dir.clone(), watching.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(cairn_sim::telemetry_peer::dir_bytes(&dir));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    for step in 0..STEPS {
        let at = start + step as u64 * 10_000;
        let items = labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let body = RecordBody::Sample {
                    name: "DCGM_FI_DEV_GPU_TEMP".into(),
                    labels: l.clone(),
                    // Noisy real values, as power readings are: little for compression to win.
                    value: 300.0 + (noise(step, i) % 100_000) as f64 / 1000.0,
                    counter: false,
                };
                (at, body)
            })
            .collect();
        spool.append_many(items).unwrap();
        if step % EVENT_EVERY == 0 {
            spool
                .append(
                    at,
                    RecordBody::Event(Event {
                        at_unix_ms: at,
                        component: "gpu 1".into(),
                        kind: "health".into(),
                        severity: Severity::Warning,
                        message: format!("history event {step}"),
                    }),
                )
                .unwrap();
        }
        if step % 60 == 0 {
            spool.flush().unwrap();
        }
    }
    spool.flush().unwrap();
    let filled = spool.stats();
    drop(spool);
    assert!(
        filled.drops.thinned_samples > 0,
        "the history did not reach the budget: {filled:?}"
    );
    assert_eq!(filled.drops.dropped_events, 0, "{filled:?}");

    // cairnd runs on through the outage; a GPU falls off the bus meanwhile.
    site.start_cairnd().unwrap();
    site.set_gpus("profile = \"h100x8\"\n[gpu.3]\nxid = [79]\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(12));
    let during = telemetry(&site);
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let max_disk = watcher.join().unwrap();
    assert!(
        max_disk <= BUDGET,
        "the spool's files reached {max_disk} bytes against a budget of {BUDGET}"
    );
    assert!(during.bytes_used <= BUDGET, "{during:?}");
    assert!(
        during.thinned_samples >= filled.drops.thinned_samples,
        "{during:?}"
    );
    assert_eq!(during.dropped_events, 0, "{during:?}");

    site.start_fleet().unwrap();
    let target = during.durable_seq;
    wait("the backlog drained", Duration::from_secs(120), || {
        telemetry(&site).acked_seq >= target
    });
    let records = stored_records(&site);
    let mut seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), records.len(), "a record was stored twice");
    let events: Vec<(&str, &str)> = records
        .iter()
        .filter_map(|r| match &r.body {
            cairn_proto::telemetry::WireBody::Event { kind, message, .. } => {
                Some((kind.as_str(), message.as_str()))
            }
            _ => None,
        })
        .collect();
    for step in (0..STEPS).step_by(EVENT_EVERY) {
        let msg = format!("history event {step}");
        assert_eq!(
            events.iter().filter(|(_, m)| *m == msg).count(),
            1,
            "{msg} did not arrive exactly once"
        );
    }
    assert!(
        events.iter().any(|(k, m)| *k == "xid" && m.contains("79")),
        "the XID raised during the outage did not arrive"
    );
    let drops: Vec<_> = events
        .iter()
        .filter(|(k, _)| *k == DROP_EVENT_KIND)
        .collect();
    assert!(!drops.is_empty(), "the thinning was not reported");
    let samples = records.len() - events.len();
    println!(
        "history: {filled:?}\nlargest spool files: {max_disk} B; arrived: {samples} samples, {} events, {} drop reports",
        events.len(),
        drops.len()
    );
    assert!(
        (samples as u64) < (STEPS * 500) as u64,
        "nothing was thinned: {samples} samples arrived"
    );
}
