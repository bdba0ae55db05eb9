//! Quotes from a real (software) TPM, checked by an independent implementation: tpm2-tools'
//! `tpm2_checkquote` accepts them, and rejects a wrong nonce, a changed PCR and another TPM's AK.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_tpm::swtpm::Swtpm;
use cairn_tpm::{EkAlgorithm, QuoteFiles, Tpm};
use std::path::Path;
use std::process::Command;

fn write(dir: &Path, q: &QuoteFiles) {
    std::fs::write(dir.join("quote.msg"), &q.message).unwrap();
    std::fs::write(dir.join("quote.sig"), &q.signature).unwrap();
    std::fs::write(dir.join("quote.pcrs"), &q.pcrs).unwrap();
    std::fs::write(dir.join("ak.pub"), &q.ak_public).unwrap();
}

fn checkquote(dir: &Path, nonce_hex: &str) -> (bool, String) {
    let out = Command::new("tpm2_checkquote")
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
            nonce_hex,
        ])
        .output()
        .expect("tpm2_checkquote is missing: run `just deps` (Debian package tpm2-tools)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn quote_checks_with_tpm2_checkquote(alg: EkAlgorithm) {
    let tmp = tempfile::tempdir().unwrap();
    let sw = Swtpm::start(&tmp.path().join("tpm")).unwrap();
    let tpm = Tpm::new(sw.tcti()).unwrap();
    let ak = tpm.create_ak(alg).unwrap();
    let nonce = [
        0x5au8, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];
    let nonce_hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let q = tpm
        .quote(alg, &ak, &nonce, &[0, 1, 2, 3, 4, 5, 6, 7])
        .unwrap();
    assert_eq!(q.pcrs.len(), 668, "tpm2-tools layout for 8 PCRs");
    let out = tmp.path().join("q");
    std::fs::create_dir(&out).unwrap();
    write(&out, &q);
    let (ok, err) = checkquote(&out, &nonce_hex);
    assert!(ok, "tpm2_checkquote refused a good quote: {err}");

    // Wrong nonce.
    let (ok, _) = checkquote(&out, "00112233445566778899aabbccddeeff");
    assert!(!ok, "accepted a quote with the wrong nonce");

    // A PCR value changed in the file (the quote signed other values).
    let mut pcrs = q.pcrs.clone();
    pcrs[132 + 4 + 4 + 2] ^= 1; // first byte of PCR 0's digest
    std::fs::write(out.join("quote.pcrs"), &pcrs).unwrap();
    assert!(
        !checkquote(&out, &nonce_hex).0,
        "accepted tampered PCR values"
    );
    std::fs::write(out.join("quote.pcrs"), &q.pcrs).unwrap();

    // A flipped byte in the signed message.
    let mut msg = q.message.clone();
    let last = msg.len() - 1;
    msg[last] ^= 1;
    std::fs::write(out.join("quote.msg"), &msg).unwrap();
    assert!(
        !checkquote(&out, &nonce_hex).0,
        "accepted a tampered TPMS_ATTEST"
    );
    std::fs::write(out.join("quote.msg"), &q.message).unwrap();

    // The AK of another TPM does not verify this quote.
    let other_tmp = tempfile::tempdir().unwrap();
    let other = Swtpm::start(other_tmp.path()).unwrap();
    let other_ak = Tpm::new(other.tcti()).unwrap().create_ak(alg).unwrap();
    let other_q = Tpm::new(other.tcti())
        .unwrap()
        .quote(alg, &other_ak, &nonce, &[0])
        .unwrap();
    std::fs::write(out.join("ak.pub"), &other_q.ak_public).unwrap();
    assert!(
        !checkquote(&out, &nonce_hex).0,
        "accepted a quote under another TPM's AK"
    );

    // An AK blob cannot be loaded by a TPM that did not create it.
    assert!(Tpm::new(other.tcti())
        .unwrap()
        .quote(alg, &ak, &nonce, &[0])
        .is_err());
}

#[test]
fn quote_verifies_with_tpm2_checkquote_and_tampering_does_not_rsa_ek() {
    quote_checks_with_tpm2_checkquote(EkAlgorithm::Rsa2048);
}

#[test]
fn quote_verifies_with_tpm2_checkquote_and_tampering_does_not_ecc_ek() {
    quote_checks_with_tpm2_checkquote(EkAlgorithm::EccP256);
}

#[test]
fn ak_persists_across_tpm_restarts_and_handles_are_flushed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tpm");
    let sw = Swtpm::start(&dir).unwrap();
    let ak = Tpm::new(sw.tcti())
        .unwrap()
        .create_ak(EkAlgorithm::Rsa2048)
        .unwrap();
    drop(sw);
    let sw = Swtpm::start(&dir).unwrap();
    let tpm = Tpm::new(sw.tcti()).unwrap();
    // swtpm has 3 transient slots and no resource manager: ten quotes in a row prove nothing leaks.
    for i in 0..10u8 {
        let q = tpm
            .quote(EkAlgorithm::Rsa2048, &ak, &[i; 20], &[0, 7])
            .unwrap();
        assert_eq!(
            q.ak_public,
            tpm.quote(EkAlgorithm::Rsa2048, &ak, &[i; 20], &[0])
                .unwrap()
                .ak_public
        );
    }
    let out = Command::new("tpm2_getcap")
        .args(["handles-transient"])
        .env("TPM2TOOLS_TCTI", sw.tcti())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "transient handles left: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn certify_sign_and_failed_activation_leave_no_handles_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let sw = Swtpm::start(&tmp.path().join("tpm")).unwrap();
    let tpm = Tpm::new(sw.tcti()).unwrap();
    for alg in [EkAlgorithm::Rsa2048, EkAlgorithm::EccP256] {
        let ak = tpm.create_ak(alg).unwrap();
        let key = tpm.create_signing_key(alg).unwrap();
        // More rounds than swtpm has transient slots: a leak would fail the later ones.
        for i in 0..5u8 {
            let c = tpm.certify(alg, &ak, &key, &[i; 16]).unwrap();
            assert!(!c.message.is_empty() && !c.signature.is_empty());
            let (r, s) = tpm.sign_digest(alg, &key, &[i; 32]).unwrap();
            assert_ne!(r, [0; 32]);
            assert_ne!(s, [0; 32]);
            // Garbage the TPM refuses: the error path must flush too.
            assert!(tpm
                .activate_credential(alg, &ak, &[0; 50], &[1; 256])
                .is_err());
        }
        // The EK certificate: swtpm carries one for RSA-2048 only.
        let cert = tpm.ek_certificate(alg).unwrap();
        assert_eq!(cert.is_some(), alg == EkAlgorithm::Rsa2048, "{alg}");
    }
    let out = Command::new("tpm2_getcap")
        .args(["handles-transient"])
        .env("TPM2TOOLS_TCTI", sw.tcti())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "transient handles left: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("tpm2_getcap")
        .args(["handles-loaded-session"])
        .env("TPM2TOOLS_TCTI", sw.tcti())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "sessions left: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn more_than_eight_pcrs_are_read_in_chunks_and_still_check() {
    // TPM2_PCR_Read returns at most 8 digests: a quote over 11 PCRs needs two reads.
    let tmp = tempfile::tempdir().unwrap();
    let sw = Swtpm::start(&tmp.path().join("tpm")).unwrap();
    let tpm = Tpm::new(sw.tcti()).unwrap();
    let ak = tpm.create_ak(EkAlgorithm::Rsa2048).unwrap();
    let pcrs = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11];
    let q = tpm
        .quote(EkAlgorithm::Rsa2048, &ak, &[7; 16], &pcrs)
        .unwrap();
    assert_eq!(q.pcr_values.len(), pcrs.len());
    let out = tmp.path().join("q");
    std::fs::create_dir(&out).unwrap();
    write(&out, &q);
    let (ok, err) = checkquote(&out, &"07".repeat(16));
    assert!(ok, "tpm2_checkquote refused an 11-PCR quote: {err}");
    let values: Vec<(u8, [u8; 32])> = q
        .pcr_values
        .iter()
        .map(|(i, v)| (*i, v.as_slice().try_into().unwrap()))
        .collect();
    cairn_fleet_free_check(&q, &values);
}

/// The quote's own PCR digest over the values read must match (what the fleet recomputes).
fn cairn_fleet_free_check(q: &QuoteFiles, values: &[(u8, [u8; 32])]) {
    // TPMS_ATTEST ends with TPM2B_DIGEST pcrDigest: the last 32 bytes for SHA-256.
    let digest = &q.message[q.message.len() - 32..];
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            let mut stdin = c.stdin.take().unwrap();
            for (_, v) in values {
                stdin.write_all(v).unwrap();
            }
            drop(stdin);
            c.wait_with_output()
        })
        .unwrap();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&hex));
}
