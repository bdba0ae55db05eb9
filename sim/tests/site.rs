//! The simulated site end to end, as `just sim-up` runs it: swtpm, fleet, fake GPUs and sysfs, cairnd.
//! Needs swtpm and promtool (`just deps`) and the workspace built (`just build`; `just test` does both).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_proto::control::ComponentStatus;
use cairn_sim::{Site, SiteOptions};
use std::process::Command;
use std::time::{Duration, Instant};

fn bin(name: &str) -> std::path::PathBuf {
    cairn_sim::process::bin_dir().join(name)
}

fn wait_until(what: &str, site: &Site, ok: impl Fn(&cairn_proto::control::Status) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = site.status() {
            if ok(&s) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}; last status: {:?}",
            site.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn site_comes_up_reports_everything_and_goes_down_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("site");
    let mut site = Site::up(&dir, &SiteOptions::default()).unwrap();

    // site.env carries every documented key.
    let env = std::fs::read_to_string(dir.join("site.env")).unwrap();
    for key in [
        "CAIRN_CONFIG",
        "CAIRND_PID",
        "FLEET_PID",
        "FLEET_URL",
        "FLEET_STATE",
        "SWTPM_PID",
        "TPM_TCTI",
        "METRICS_URL",
    ] {
        assert!(
            env.lines().any(|l| l.starts_with(&format!("{key}="))),
            "site.env lacks {key}:\n{env}"
        );
    }

    // `cairnctl status --json` answers from the running cairnd, found through the site's config.
    let out = Command::new(bin("cairnctl"))
        .args(["status", "--json"])
        .env("CAIRN_CONFIG", &site.env.cairn_config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["agent"]["pid"], site.env.cairnd_pid);
    assert_eq!(v["tpm"]["state"], "ok", "{v}");
    assert_eq!(v["tpm"]["facts"]["manufacturer"], "IBM");
    assert_eq!(v["tpm"]["facts"]["ek_certificates"][0], "rsa2048");
    assert_eq!(v["gpus"]["facts"]["gpus"].as_array().unwrap().len(), 8);
    assert_eq!(
        v["sensors"]["facts"]["nvme_drives"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    assert_eq!(
        v["sensors"]["facts"]["rapl_zones"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(v["fleet"]["state"], "ok", "{v}");
    assert_eq!(v["fleet"]["facts"]["url"], site.env.fleet_url.as_str());

    // While cairnd runs, the TPM is still reachable by others (it is opened per operation).
    let getcap = Command::new("tpm2_getcap")
        .arg("properties-fixed")
        .env("TPM2TOOLS_TCTI", &site.env.tpm_tcti)
        .output()
        .unwrap();
    assert!(
        getcap.status.success(),
        "tpm2_getcap blocked or failed: {}",
        String::from_utf8_lossy(&getcap.stderr)
    );

    // /metrics is valid exposition format. promtool's only complaints may be the upstream exporters' own
    // naming, kept for dashboard compatibility: dcgm-exporter's camelCase label `modelName`, and dcgm-exporter's
    // and smartctl_exporter's counter names (no _total, "_count" in a name, "counter" in a name).
    let metrics = fetch(&site.env.metrics_url);
    assert!(metrics.contains("cairn_gpus 8"), "{metrics}");
    assert_eq!(metrics.matches("DCGM_FI_DEV_GPU_TEMP{").count(), 8);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is missing: run `just deps` (Debian package prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let complaints =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool rejected /metrics: {complaints}"
    );
    for line in complaints.lines().filter(|l| !l.trim().is_empty()) {
        // Only naming lints, and only on the upstream exporters' names.
        let upstream = line.starts_with("DCGM_FI_DEV_") || line.starts_with("smartctl_device");
        let naming_lint = [
            "label names should be written in 'snake_case'",
            "counter metrics should have \"_total\" suffix",
            "metric name should not include type 'counter'",
            "non-histogram and non-summary metrics should not have \"_count\" suffix",
        ]
        .iter()
        .any(|lint| line.contains(lint));
        assert!(
            upstream && naming_lint,
            "unexpected promtool complaint: {line}"
        );
    }

    // A GPU falls off the bus: reported with its reason, the agent stays up.
    site.set_gpus("profile = \"h100x8\"\n[gpu.5]\nlost = true\n")
        .unwrap();
    wait_until("GPU 5 reported lost", &site, |s| {
        s.gpus.facts().is_some_and(|g| {
            g.gpus[5]
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("lost"))
        })
    });

    // The driver disappears: NVML unavailable, still no crash.
    site.set_gpus("driver_loaded = false\n").unwrap();
    // NVML stays initialised once loaded; a lost driver shows up on the next init (after a restart).
    site.stop_cairnd();
    site.start_cairnd().unwrap();
    let s = site.status().unwrap();
    match &s.gpus {
        ComponentStatus::Unavailable { reason, .. } => {
            assert!(reason.contains("driver is not loaded"), "{reason}")
        }
        other => panic!("GPUs should be unavailable: {other:?}"),
    }

    // Uplink outage and recovery.
    site.stop_fleet();
    wait_until(
        "fleet unreachable",
        &site,
        |s| matches!(&s.fleet, ComponentStatus::Unavailable { reason, .. } if reason.contains("connect")),
    );
    site.start_fleet().unwrap();
    wait_until("fleet reachable again", &site, |s| {
        matches!(s.fleet, ComponentStatus::Ok { .. })
    });

    // sim-down leaves nothing behind, and nothing had to be SIGKILLed.
    let pids = [site.env.cairnd_pid, site.env.fleet_pid, site.env.swtpm_pid];
    let killed = site.down();
    assert!(killed.is_empty(), "had to SIGKILL {killed:?}");
    assert!(
        site.running().is_empty(),
        "still running: {:?}",
        site.running()
    );
    for pid in pids {
        assert!(
            cairn_sim::process::program(pid).is_none(),
            "pid {pid} still exists"
        );
    }
}

#[test]
fn a_second_site_in_the_same_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::up(
        tmp.path(),
        &SiteOptions {
            gpu_profile: "l4x1".into(),
            ..SiteOptions::default()
        },
    )
    .unwrap();
    let err = Site::up(tmp.path(), &SiteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("already running"), "{err}");
    let s = site.status().unwrap();
    assert_eq!(s.gpus.facts().unwrap().gpus[0].name, "NVIDIA L4");
}

fn fetch(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(authority).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// `cairnctl quote` with the agent's config, while cairnd runs and after it stopped: tpm2_checkquote accepts
/// the files, the AK stays the same, and bad input is refused with words that say how to fix it.
#[test]
fn cairnctl_quote_verifies_with_tpm2_checkquote() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::up(
        &tmp.path().join("site"),
        &SiteOptions {
            gpu_profile: "l4x1".into(),
            ..SiteOptions::default()
        },
    )
    .unwrap();
    let config = site.env.cairn_config.clone();
    let quote = |out: &std::path::Path, nonce: &str| {
        Command::new(bin("cairnctl"))
            .args(["--config"])
            .arg(&config)
            .args([
                "quote",
                "--nonce",
                nonce,
                "--pcrs",
                "sha256:0,1,2,3,4,5,6,7",
                "--out",
            ])
            .arg(out)
            .output()
            .unwrap()
    };
    let check = |dir: &std::path::Path, nonce: &str| {
        Command::new("tpm2_checkquote")
            .current_dir(dir)
            .args([
                "-u",
                "ak.pub",
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-f",
                "quote.pcrs",
                "-g",
                "sha256",
                "-q",
                nonce,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    let nonce = "c0ffee0123456789abcdef0123456789";
    let first = tmp.path().join("q1");
    let out = quote(&first, nonce);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        check(&first, nonce),
        "tpm2_checkquote refused cairnctl's quote"
    );
    assert!(
        !check(&first, "00000000000000000000000000000000"),
        "wrong nonce accepted"
    );

    // Without cairnd: same TPM, same persisted AK.
    site.stop_cairnd();
    let second = tmp.path().join("q2");
    assert!(quote(&second, nonce).status.success());
    assert!(check(&second, nonce));
    assert_eq!(
        std::fs::read(first.join("ak.pub")).unwrap(),
        std::fs::read(second.join("ak.pub")).unwrap(),
        "AK changed between quotes"
    );

    let bad = quote(&tmp.path().join("q3"), "not-hex");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("nonce \"not-hex\" is not valid"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
