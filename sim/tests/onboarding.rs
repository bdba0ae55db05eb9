//! Zero-touch onboarding end to end on the simulated site: cairnd, swtpm (with a simulated measured boot and
//! its event log) and `cairn-fleet serve` as separate processes, talking HTTPS and mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_sim::{Site, SiteOptions, Trust};
use cairn_tpm::EkAlgorithm;
use std::process::Command;
use std::time::Duration;

const ONBOARD: Duration = Duration::from_secs(30);

fn bin(name: &str) -> std::path::PathBuf {
    cairn_sim::process::bin_dir().join(name)
}

fn cairnctl(site: &Site, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("cairnctl"))
        .args(args)
        .env("CAIRN_CONFIG", &site.env.cairn_config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn fleet(site: &Site, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("cairn-fleet"))
        .args(args)
        .arg("--state")
        .arg(&site.env.fleet_state)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn the_device(site: &Site) -> serde_json::Value {
    let doc = site.fleet_devices().unwrap();
    let devices = doc["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{doc}");
    devices[0].clone()
}

fn up(opts: SiteOptions) -> (tempfile::TempDir, Site) {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::up(&tmp.path().join("site"), &opts).unwrap();
    (tmp, site)
}

#[test]
fn ek_certificate_device_onboards_and_resumes_after_restarts_without_re_enrolling() {
    let (_tmp, mut site) = up(SiteOptions::default());
    let s = site
        .wait_onboarding("onboarded", ONBOARD)
        .unwrap_or_else(|| panic!("not onboarded: {:?}", site.status()));
    let id = s.onboarding.device_id.clone().unwrap();
    let dev = the_device(&site);
    assert_eq!(dev["id"], id.as_str());
    assert_eq!(dev["state"], "onboarded");
    assert_eq!(dev["vouched_by"], "EK certificate");
    assert_eq!(
        dev["reference"], "cairn 0.1.0",
        "the fleet records which known image the device booted"
    );
    // The telemetry key is bound to the identity too.
    assert_eq!(dev["telemetry_key"].as_str().unwrap().len(), 130);
    let serial = dev["cert_serial"].clone();

    let (ok, out) = cairnctl(&site, &["status"]);
    assert!(
        ok && out.contains("onboarded") && out.contains(&id),
        "{out}"
    );

    // On demand, over mTLS: trusted again, same certificate.
    let (ok, out) = cairnctl(&site, &["attest"]);
    assert!(ok, "{out}");
    assert!(out.contains("onboarded"), "{out}");
    assert_eq!(the_device(&site)["cert_serial"], serial);

    // cairnd restarted: it is still onboarded at once, and re-attests without enrolling again.
    site.stop_cairnd();
    site.start_cairnd().unwrap();
    assert_eq!(site.status().unwrap().onboarding.state, "onboarded");
    let (ok, out) = cairnctl(&site, &["attest"]);
    assert!(ok, "{out}");
    assert_eq!(
        the_device(&site)["cert_serial"],
        serial,
        "re-enrolled after a restart"
    );

    // The fleet restarted: it lost no device, and the device's certificate still works.
    site.stop_fleet();
    // With the server down, the admin command reads the store itself.
    assert_eq!(the_device(&site)["state"], "onboarded");
    // The device cannot reach it: it says so and schedules a retry, keeping its certificate.
    let (ok, out) = cairnctl(&site, &["attest"]);
    assert!(
        !ok && out.contains("retrying") && out.contains("next try"),
        "{out}"
    );
    site.start_fleet().unwrap();
    let (ok, out) = cairnctl(&site, &["attest"]);
    assert!(ok, "{out}");
    assert_eq!(the_device(&site)["cert_serial"], serial);

    // A certificate the fleet refuses at the handshake (expired, or as here not one it issued for this key)
    // cannot be told apart from a network fault by the route: the agent enrols again and gets a new one.
    let cert = site.dir.join("agent/data/identity/rsa2048/device.crt");
    std::fs::copy(site.env.fleet_state.join("ca.pem"), &cert).unwrap();
    let (ok, out) = cairnctl(&site, &["attest"]);
    assert!(ok, "{out}");
    assert_ne!(
        the_device(&site)["cert_serial"],
        serial,
        "no new certificate"
    );
    let pem = std::fs::read_to_string(&cert).unwrap();
    assert_ne!(
        pem,
        std::fs::read_to_string(site.env.fleet_state.join("ca.pem")).unwrap()
    );
}

#[test]
fn allow_listed_ecc_device_onboards_and_a_tampered_boot_is_refused() {
    let (_tmp, site) = up(SiteOptions {
        ek_algorithm: EkAlgorithm::EccP256,
        trust: Trust::AllowList,
        ..SiteOptions::default()
    });
    site.wait_onboarding("onboarded", ONBOARD)
        .unwrap_or_else(|| panic!("not onboarded: {:?}", site.status()));
    assert_eq!(the_device(&site)["vouched_by"], "allow-list");
    assert_eq!(the_device(&site)["ek_algorithm"], "ecc-p256");

    // Something measures itself into PCR 4 that the event log does not show.
    let out = Command::new("tpm2_pcrextend")
        .args([
            "-T",
            &site.env.tpm_tcti,
            &format!("4:sha256={}", "cd".repeat(32)),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, out) = cairnctl(&site, &["attest"]);
    assert!(!ok, "attest succeeded after tampering: {out}");
    assert!(
        out.contains("refused") && out.contains("event_log"),
        "{out}"
    );
    let dev = the_device(&site);
    assert_eq!(dev["state"], "refused");
    assert_eq!(dev["reason"]["code"], "event_log");
    let (_, table) = fleet(&site, &["devices"]);
    assert!(
        table.contains("refused") && table.contains("event_log"),
        "{table}"
    );
}

#[test]
fn unknown_tpm_waits_for_approval_then_onboards() {
    let (_tmp, site) = up(SiteOptions {
        trust: Trust::Operator,
        ..SiteOptions::default()
    });
    let s = site
        .wait_onboarding("awaiting_approval", ONBOARD)
        .unwrap_or_else(|| panic!("not pending: {:?}", site.status()));
    let id = s.onboarding.device_id.unwrap();
    assert_eq!(the_device(&site)["state"], "pending");
    // A restart while waiting resumes waiting, as the same device.
    let mut site = site;
    site.stop_cairnd();
    site.start_cairnd().unwrap();
    let s = site.status().unwrap();
    assert_eq!(s.onboarding.state, "awaiting_approval");
    assert_eq!(s.onboarding.device_id.as_deref(), Some(id.as_str()));
    let (ok, out) = fleet(&site, &["devices", "approve", &id]);
    assert!(ok, "{out}");
    let (ok, out) = cairnctl(&site, &["attest"]);
    assert!(ok, "{out}");
    assert_eq!(the_device(&site)["vouched_by"], "operator");
    // Approving a device the fleet has never seen is an error that says so.
    let (ok, out) = fleet(&site, &["devices", "approve", "000bdeadbeef"]);
    assert!(!ok && out.contains("not known"), "{out}");
}
