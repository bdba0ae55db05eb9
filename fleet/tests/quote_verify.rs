//! The fleet's quote verifier against quotes from a real (software) TPM: a good quote passes and each
//! tampering is refused with its own reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_fleet::quote::{verify, QuoteRefusal};
use cairn_tpm::swtpm::Swtpm;
use cairn_tpm::{EkAlgorithm, QuoteFiles, Tpm};

/// PCR values out of the tpm2-tools layout cairn-tpm writes (one TPML_DIGEST for up to 8 PCRs).
fn values(q: &QuoteFiles, pcrs: &[u8]) -> Vec<(u8, [u8; 32])> {
    pcrs.iter()
        .enumerate()
        .map(|(i, &pcr)| {
            let at = 132 + 4 + 4 + i * 66;
            assert_eq!(u16::from_le_bytes([q.pcrs[at], q.pcrs[at + 1]]), 32);
            (pcr, q.pcrs[at + 2..at + 34].try_into().unwrap())
        })
        .collect()
}

#[test]
fn good_quote_passes_and_every_tampering_is_refused_with_its_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let sw = Swtpm::start(tmp.path()).unwrap();
    let tpm = Tpm::new(sw.tcti()).unwrap();
    let ak = tpm.create_ak(EkAlgorithm::Rsa2048).unwrap();
    let pcrs = [0, 1, 2, 3, 4, 5, 6, 7];
    let nonce = [7u8; 32];
    let q = tpm.quote(EkAlgorithm::Rsa2048, &ak, &nonce, &pcrs).unwrap();
    let vals = values(&q, &pcrs);

    let ok = verify(&q.ak_public, &q.message, &q.signature, &nonce, &vals).unwrap();
    assert_eq!(ok.pcrs, pcrs);
    // A second quote: the TPM clock moves forward, the reset count stays.
    let q2 = tpm.quote(EkAlgorithm::Rsa2048, &ak, &nonce, &pcrs).unwrap();
    let ok2 = verify(
        &q2.ak_public,
        &q2.message,
        &q2.signature,
        &nonce,
        &values(&q2, &pcrs),
    )
    .unwrap();
    assert!(ok2.clock >= ok.clock && ok2.reset_count == ok.reset_count);

    let refuse = |ak_pub: &[u8], msg: &[u8], sig: &[u8], nonce: &[u8], vals: &[(u8, [u8; 32])]| {
        verify(ak_pub, msg, sig, nonce, vals).unwrap_err()
    };
    assert_eq!(
        refuse(&q.ak_public, &q.message, &q.signature, &[8u8; 32], &vals),
        QuoteRefusal::WrongNonce
    );

    let mut changed = vals.clone();
    changed[3].1[0] ^= 1;
    assert_eq!(
        refuse(&q.ak_public, &q.message, &q.signature, &nonce, &changed),
        QuoteRefusal::PcrDigest
    );
    assert_eq!(
        refuse(&q.ak_public, &q.message, &q.signature, &nonce, &vals[..7]).code(),
        "pcr_selection"
    );

    let mut msg = q.message.clone();
    let last = msg.len() - 1;
    msg[last] ^= 1;
    assert_eq!(
        refuse(&q.ak_public, &msg, &q.signature, &nonce, &vals),
        QuoteRefusal::BadSignature
    );

    // The AK public part with `restricted` cleared (byte 4..8 of TPMT_PUBLIC, after the TPM2B size).
    let mut unrestricted = q.ak_public.clone();
    let attrs = u32::from_be_bytes(unrestricted[6..10].try_into().unwrap()) & !(1 << 16);
    unrestricted[6..10].copy_from_slice(&attrs.to_be_bytes());
    assert_eq!(
        refuse(&unrestricted, &q.message, &q.signature, &nonce, &vals),
        QuoteRefusal::AkAttribute("restricted")
    );

    // Another TPM's AK: the signature does not verify.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Swtpm::start(other_dir.path()).unwrap();
    let other_tpm = Tpm::new(other.tcti()).unwrap();
    let other_ak = other_tpm.create_ak(EkAlgorithm::Rsa2048).unwrap();
    let other_q = other_tpm
        .quote(EkAlgorithm::Rsa2048, &other_ak, &nonce, &pcrs)
        .unwrap();
    assert_eq!(
        refuse(&other_q.ak_public, &q.message, &q.signature, &nonce, &vals),
        QuoteRefusal::BadSignature
    );

    // A quote signed by the right AK over a PCR that was extended afterwards: the device's new values no
    // longer match what was signed.
    let status = std::process::Command::new("tpm2_pcrextend")
        .arg("7:sha256=0000000000000000000000000000000000000000000000000000000000000001")
        .env("TPM2TOOLS_TCTI", sw.tcti())
        .status()
        .unwrap();
    assert!(status.success());
    let after = tpm.quote(EkAlgorithm::Rsa2048, &ak, &nonce, &pcrs).unwrap();
    assert_eq!(
        refuse(
            &q.ak_public,
            &q.message,
            &q.signature,
            &nonce,
            &values(&after, &pcrs)
        ),
        QuoteRefusal::PcrDigest
    );
    assert!(verify(
        &after.ak_public,
        &after.message,
        &after.signature,
        &nonce,
        &values(&after, &pcrs)
    )
    .is_ok());
}
