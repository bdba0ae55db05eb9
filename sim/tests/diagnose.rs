//! `cairnctl diagnose` on a running simulated site, and with its agent stopped: the archive holds what ops
//! needs and none of the device's key material.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_sim::{Site, SiteOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn diagnose(site: &Site, out: &Path) -> serde_json::Value {
    let run = Command::new(cairn_sim::process::bin_dir().join("cairnctl"))
        .arg("--config")
        .arg(&site.env.cairn_config)
        .args(["diagnose", "--json", "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    serde_json::from_slice(&run.stdout).unwrap()
}

/// The archive's files by name (after the top directory), from its tar headers.
fn unpack(archive: &Path) -> Vec<(String, Vec<u8>)> {
    let tar = zstd::decode_all(std::fs::File::open(archive).unwrap()).unwrap();
    let mut files = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() && tar[at] != 0 {
        let h = &tar[at..at + 512];
        let field = |r: std::ops::Range<usize>| {
            String::from_utf8_lossy(&h[r])
                .trim_end_matches('\0')
                .to_owned()
        };
        let name = field(0..100);
        let size = usize::from_str_radix(field(124..135).trim(), 8).unwrap();
        let body = tar[at + 512..at + 512 + size].to_vec();
        files.push((name.split_once('/').unwrap().1.to_owned(), body));
        at += 512 + size.div_ceil(512) * 512;
    }
    files
}

fn key_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            key_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "priv") {
            out.push(p);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_diagnostics_archive_has_what_ops_needs_and_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::up(tmp.path(), &SiteOptions::default()).unwrap();
    site.wait_onboarding("onboarded", Duration::from_secs(60))
        .expect("the site onboards");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    let answer = diagnose(&site, &out);
    let archive = PathBuf::from(answer["archive"].as_str().unwrap());
    assert!(
        archive.starts_with(&out) && archive.to_string_lossy().ends_with(".tar.zst"),
        "{answer}"
    );
    assert_eq!(answer["not_collected"], serde_json::json!([]), "{answer}");
    let files = unpack(&archive);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "MANIFEST.txt",
        "overview.json",
        "status.json",
        "health.json",
        "telemetry.json",
        "workloads.json",
        "update.json",
        "config.toml",
        "journal.txt",
        "data-dir.txt",
        "versions.txt",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let text = |name: &str| {
        String::from_utf8(files.iter().find(|(n, _)| n == name).unwrap().1.clone()).unwrap()
    };
    let status: serde_json::Value = serde_json::from_str(&text("status.json")).unwrap();
    assert_eq!(status["status"]["onboarding"]["state"], "onboarded");
    assert!(text("config.toml").contains(&format!("tcti = \"{}\"", site.env.tpm_tcti)));
    assert!(
        text("data-dir.txt").contains("identity/rsa2048/ak.priv"),
        "{}",
        text("data-dir.txt")
    );
    assert!(text("versions.txt").contains("cairnd "));

    // No key material: the TPM-wrapped private blobs, in any spelling, nor any PEM private key.
    let mut keys = Vec::new();
    key_files(&site.dir.join("agent/data/identity"), &mut keys);
    assert!(keys.len() >= 3, "ak, device and telemetry keys: {keys:?}");
    let all: Vec<u8> = files.iter().flat_map(|(_, b)| b.clone()).collect();
    let all_text = String::from_utf8_lossy(&all);
    for k in &keys {
        let blob = std::fs::read(k).unwrap();
        let window = &blob[blob.len() / 2..blob.len() / 2 + 32];
        assert!(
            !all.windows(window.len()).any(|w| w == window),
            "bytes of {} in the archive",
            k.display()
        );
        assert!(
            !all_text.contains(&hex(window)),
            "hex of {} in the archive",
            k.display()
        );
    }
    assert!(!all_text.contains("PRIVATE KEY-----"));

    // With the agent down the archive is still written, and says what it could not ask.
    site.stop_cairnd();
    let answer = diagnose(&site, &out);
    let missing = answer["not_collected"].as_array().unwrap();
    assert!(
        missing.iter().any(|m| m
            .as_str()
            .unwrap()
            .starts_with("overview.json: cannot reach cairnd")),
        "{answer}"
    );
    let files = unpack(Path::new(answer["archive"].as_str().unwrap()));
    let manifest = String::from_utf8(files[0].1.clone()).unwrap();
    assert!(
        manifest.contains("Not collected:") && manifest.contains("is it running?"),
        "{manifest}"
    );
    assert!(files.iter().any(|(n, _)| n == "config.toml"));
}
