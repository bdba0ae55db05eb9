#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

//! The simulated measured boot against a real (software) TPM: the log it writes parses, replays to the PCRs
//! the TPM holds (and tpm2-tools' own `tpm2_eventlog` reads it the same way), and an unlogged extend or a
//! tampered digest is reported on its PCR. Needs swtpm and tpm2-tools (`just deps`).

use cairn_fleet::eventlog::{check_against_quote, replay_sha256, ReplayError};
use cairn_proto::eventlog::{
    self, EV_EFI_BOOT_SERVICES_APPLICATION, EV_EFI_VARIABLE_DRIVER_CONFIG,
};
use cairn_sim::measured_boot::{boot, default_boot, event_log};
use cairn_tpm::swtpm::Swtpm;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// PCRs 0-7 of the SHA-256 bank, read with `tpm2_pcrread -o` (the values back to back, in order).
fn pcrread(tcti: &str, dir: &Path) -> BTreeMap<u8, Vec<u8>> {
    let file = dir.join("pcrs.bin");
    let out = Command::new("tpm2_pcrread")
        .args(["-T", tcti, "sha256:0,1,2,3,4,5,6,7", "-o"])
        .arg(&file)
        .output()
        .expect("tpm2_pcrread is missing: run `just deps` (Debian package tpm2-tools)");
    assert!(
        out.status.success(),
        "tpm2_pcrread: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 8 * 32);
    bytes
        .chunks(32)
        .enumerate()
        .map(|(i, v)| (i as u8, v.to_vec()))
        .collect()
}

fn extend(tcti: &str, pcr: u8, digest_hex: &str) {
    let out = Command::new("tpm2_pcrextend")
        .args(["-T", tcti, &format!("{pcr}:sha256={digest_hex}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh swtpm with the default boot measured into it; returns it, its PCRs 0-7 and the log bytes.
fn booted(dir: &Path) -> (Swtpm, Vec<u8>) {
    let sw = Swtpm::start(&dir.join("tpm")).unwrap();
    let log = boot(sw.tcti(), &default_boot("1.0.0")).unwrap();
    (sw, log)
}

#[test]
fn the_boot_log_replays_to_the_tpms_pcrs() {
    let tmp = tempfile::tempdir().unwrap();
    let (sw, bytes) = booted(tmp.path());
    let quoted = pcrread(sw.tcti(), tmp.path());

    let log = eventlog::parse(&bytes).unwrap();
    assert_eq!(log, event_log(&default_boot("1.0.0")));
    assert_eq!(log.startup_locality(), Some(0));
    let replayed = replay_sha256(&log).unwrap();
    assert_eq!(
        replayed.keys().copied().collect::<Vec<_>>(),
        (0..8).collect::<Vec<u8>>()
    );
    for (pcr, value) in &replayed {
        assert_eq!(&quoted[pcr][..], &value[..], "PCR {pcr}");
        assert_ne!(value, &[0u8; 32], "PCR {pcr} was never extended");
    }
    check_against_quote(&replayed, &quoted).unwrap();

    // An independent reader: tpm2-tools parses the same log and replays the same PCRs. Without the
    // StartupLocality event: tpm2-tools 5.4 extends that EV_NO_ACTION event's zero digest into PCR 0 (the TPM,
    // above, shows it must not); locality 0 leaves PCR 0 starting at zero either way.
    let file = tmp.path().join("binary_bios_measurements");
    let mut without = log.clone();
    without.events.retain(|e| e.startup_locality().is_none());
    assert_eq!(without.events.len(), log.events.len() - 1);
    std::fs::write(&file, eventlog::encode(&without)).unwrap();
    let out = Command::new("tpm2_eventlog").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "tpm2_eventlog refused the log: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Its summary ends the output: "pcrs:", "  sha256:", then "    N  : 0xHEX" per PCR.
    let summary = text.rsplit_once("\npcrs:\n").expect("no pcrs summary").1;
    let theirs: BTreeMap<u8, String> = summary
        .lines()
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().parse().ok()?, v.trim().to_lowercase()))
        })
        .collect();
    let ours: BTreeMap<u8, String> = replayed
        .iter()
        .map(|(i, v)| {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            (*i, format!("0x{hex}"))
        })
        .collect();
    assert_eq!(theirs, ours, "tpm2_eventlog replays differently:\n{text}");
}

#[test]
fn an_unlogged_extend_after_boot_is_reported_on_pcr_4() {
    let tmp = tempfile::tempdir().unwrap();
    let (sw, bytes) = booted(tmp.path());
    extend(sw.tcti(), 4, &"ab".repeat(32));
    let quoted = pcrread(sw.tcti(), tmp.path());

    let replayed = replay_sha256(&eventlog::parse(&bytes).unwrap()).unwrap();
    let err = check_against_quote(&replayed, &quoted).unwrap_err();
    assert_eq!(err, ReplayError::Mismatch { pcrs: vec![4] });
    assert!(err.to_string().contains("PCR 4:"), "{err}");
}

#[test]
fn a_tampered_digest_is_reported_on_its_pcr_and_tampered_data_alone_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (sw, bytes) = booted(tmp.path());
    let quoted = pcrread(sw.tcti(), tmp.path());
    let log = eventlog::parse(&bytes).unwrap();

    // Flip one byte of the SecureBoot variable's digest (PCR 7), in the log's bytes.
    let i = log
        .events
        .iter()
        .position(|e| e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG)
        .unwrap();
    let digest = log.events[i].digests[0].1.clone();
    let at = bytes
        .windows(32)
        .position(|w| w == digest.as_slice())
        .unwrap();
    let mut tampered = bytes.clone();
    tampered[at] ^= 1;
    let err = check_against_quote(
        &replay_sha256(&eventlog::parse(&tampered).unwrap()).unwrap(),
        &quoted,
    )
    .unwrap_err();
    assert_eq!(err, ReplayError::Mismatch { pcrs: vec![7] });

    // Replay uses digests: other data under the same digest still replays (checking what a digest should be
    // for its data is the fleet's policy per event type), so only a changed digest is caught here.
    let mut relabelled = log.clone();
    let kernel = relabelled
        .events
        .iter_mut()
        .rfind(|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
        .unwrap();
    kernel.data = b"another image".to_vec();
    let replayed =
        replay_sha256(&eventlog::parse(&eventlog::encode(&relabelled)).unwrap()).unwrap();
    check_against_quote(&replayed, &quoted).unwrap();
}

#[test]
fn two_images_differ_in_pcr_4_only() {
    let a = replay_sha256(&event_log(&default_boot("1.0.0"))).unwrap();
    let b = replay_sha256(&event_log(&default_boot("1.0.1"))).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for pcr in a.keys() {
        assert_eq!(a[pcr] == b[pcr], *pcr != 4, "PCR {pcr}");
    }
}
