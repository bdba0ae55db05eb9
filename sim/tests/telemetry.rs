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
