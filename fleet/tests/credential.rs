//! The fleet's software TPM2_MakeCredential against real (software) TPMs: a credential made for a device's
//! EK and AK name activates on that TPM with that AK, and on nothing else; and a swtpm's EK certificate
//! chains to the machine's swtpm-localca and certifies exactly that EK.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_fleet::credential::make_credential;
use cairn_fleet::ek::{check_ek_certificate, EkAlgorithm, EkPublic};
use cairn_tpm::swtpm::Swtpm;
use cairn_tpm::{AkBlob, Tpm};
use std::path::{Path, PathBuf};

/// A running swtpm and the TPM handle on it.
struct Device {
    _swtpm: Swtpm,
    tpm: Tpm,
}

fn device(dir: &Path) -> Device {
    let swtpm = Swtpm::start(dir).unwrap();
    let tpm = Tpm::new(swtpm.tcti()).unwrap();
    Device { _swtpm: swtpm, tpm }
}

/// The AK's TPM name: 0x000b || SHA-256(TPMT_PUBLIC).
fn ak_name(ak: &AkBlob) -> Vec<u8> {
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, &ak.public).as_ref());
    name
}

fn fleet_alg(alg: cairn_tpm::EkAlgorithm) -> EkAlgorithm {
    match alg {
        cairn_tpm::EkAlgorithm::Rsa2048 => EkAlgorithm::Rsa2048,
        cairn_tpm::EkAlgorithm::EccP256 => EkAlgorithm::EccP256,
    }
}

fn credential_activates_only_for_its_ak_on_its_tpm(alg: cairn_tpm::EkAlgorithm) {
    let tmp = tempfile::tempdir().unwrap();
    let a = device(&tmp.path().join("a"));
    let b = device(&tmp.path().join("b"));

    let ek = EkPublic::parse(&a.tpm.ek_public(alg).unwrap()).unwrap();
    assert_eq!(ek.algorithm(), fleet_alg(alg));
    let ak = a.tpm.create_ak(alg).unwrap();
    let secret = *b"a 32-byte secret from the fleet!";

    let made = make_credential(&ek, &ak_name(&ak), &secret).unwrap();
    let activate = |ak: &AkBlob, id_object: &[u8], encrypted_secret: &[u8]| {
        a.tpm
            .activate_credential(alg, ak, id_object, encrypted_secret)
    };
    assert_eq!(
        activate(&ak, &made.id_object, &made.encrypted_secret).unwrap(),
        secret
    );
    // A shorter credential, and the same one again with a fresh seed.
    let short = make_credential(&ek, &ak_name(&ak), b"hi").unwrap();
    assert_eq!(
        activate(&ak, &short.id_object, &short.encrypted_secret).unwrap(),
        b"hi"
    );

    // Made for another AK's name (of the same TPM): the TPM refuses it for this AK, and releases it to the
    // AK it was made for.
    let other_ak = a.tpm.create_ak(alg).unwrap();
    let for_other = make_credential(&ek, &ak_name(&other_ak), &secret).unwrap();
    activate(&ak, &for_other.id_object, &for_other.encrypted_secret).unwrap_err();
    assert_eq!(
        activate(&other_ak, &for_other.id_object, &for_other.encrypted_secret).unwrap(),
        secret
    );

    // Made for another TPM's EK, with the right AK name.
    let other_ek = EkPublic::parse(&b.tpm.ek_public(alg).unwrap()).unwrap();
    assert_ne!(other_ek.name(), ek.name());
    let other_tpm = make_credential(&other_ek, &ak_name(&ak), &secret).unwrap();
    activate(&ak, &other_tpm.id_object, &other_tpm.encrypted_secret).unwrap_err();

    // Tampering: the integrity HMAC, the encrypted credential, or the encrypted secret.
    for at in [2, made.id_object.len() - 1] {
        let mut id_object = made.id_object.clone();
        id_object[at] ^= 0x01;
        activate(&ak, &id_object, &made.encrypted_secret).unwrap_err();
    }
    let mut encrypted_secret = made.encrypted_secret.clone();
    let last = encrypted_secret.len() - 1;
    encrypted_secret[last] ^= 0x01;
    activate(&ak, &made.id_object, &encrypted_secret).unwrap_err();

    // The untouched blobs still activate: the refusals above were the tampering, not the TPM's state.
    assert_eq!(
        activate(&ak, &made.id_object, &made.encrypted_secret).unwrap(),
        secret
    );
}

#[test]
fn rsa2048_credential_activates_only_for_its_ak_on_its_tpm() {
    credential_activates_only_for_its_ak_on_its_tpm(cairn_tpm::EkAlgorithm::Rsa2048);
}

#[test]
fn ecc_p256_credential_activates_only_for_its_ak_on_its_tpm() {
    credential_activates_only_for_its_ak_on_its_tpm(cairn_tpm::EkAlgorithm::EccP256);
}

/// A `key = value` line of /etc/swtpm-localca.conf, the CA swtpm_setup issues EK certificates from.
fn localca_setting(key: &str) -> PathBuf {
    let conf = std::fs::read_to_string("/etc/swtpm-localca.conf")
        .expect("/etc/swtpm-localca.conf is missing: swtpm_setup has not set up its local CA");
    conf.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| PathBuf::from(v.trim()))
        .unwrap_or_else(|| panic!("/etc/swtpm-localca.conf has no {key}"))
}

fn pem_cert(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cert = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap_or_else(|| panic!("{} holds no certificate", path.display()))
        .unwrap();
    cert.to_vec()
}

/// (root, intermediate) of the swtpm-localca: its self-signed root, and the issuer that signs EK certificates.
fn swtpm_localca() -> (Vec<u8>, Vec<u8>) {
    let root = localca_setting("statedir").join("swtpm-localca-rootca-cert.pem");
    (pem_cert(&root), pem_cert(&localca_setting("issuercert")))
}

#[test]
fn swtpm_ek_certificate_chains_to_the_swtpm_localca_and_names_its_ek() {
    let tmp = tempfile::tempdir().unwrap();
    let a = device(&tmp.path().join("a"));
    let b = device(&tmp.path().join("b"));
    let rsa = cairn_tpm::EkAlgorithm::Rsa2048;
    let cert = a
        .tpm
        .ek_certificate(rsa)
        .unwrap()
        .expect("swtpm_setup --create-ek-cert stores an RSA-2048 EK certificate");
    let ek = EkPublic::parse(&a.tpm.ek_public(rsa).unwrap()).unwrap();
    let (root, intermediate) = swtpm_localca();
    let now = std::time::SystemTime::now();

    check_ek_certificate(
        &ek,
        &cert,
        std::slice::from_ref(&intermediate),
        std::slice::from_ref(&root),
        now,
    )
    .unwrap();
    // Trusting the issuing CA itself is enough too.
    check_ek_certificate(&ek, &cert, &[], std::slice::from_ref(&intermediate), now).unwrap();
    // Without the intermediate, the root alone does not reach the certificate.
    let err = check_ek_certificate(&ek, &cert, &[], std::slice::from_ref(&root), now).unwrap_err();
    assert_eq!(err.code(), "ek_cert_untrusted", "{err}");

    // Another TPM's EK does not get to use this certificate.
    let other_ek = EkPublic::parse(&b.tpm.ek_public(rsa).unwrap()).unwrap();
    let err = check_ek_certificate(
        &other_ek,
        &cert,
        std::slice::from_ref(&intermediate),
        std::slice::from_ref(&root),
        now,
    )
    .unwrap_err();
    assert_eq!(err.code(), "ek_cert_mismatch", "{err}");

    // An unrelated root (same name, other key) is no trust anchor for it.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "swtpm-localca-rootca");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let unrelated = params.self_signed(&key).unwrap().der().to_vec();
    let err = check_ek_certificate(
        &ek,
        &cert,
        std::slice::from_ref(&intermediate),
        &[unrelated],
        now,
    )
    .unwrap_err();
    assert_eq!(err.code(), "ek_cert_untrusted", "{err}");

    // swtpm has no certificate for a P-256 EK: such devices are vouched for by the fleet's allow-list.
    assert_eq!(
        a.tpm
            .ek_certificate(cairn_tpm::EkAlgorithm::EccP256)
            .unwrap(),
        None
    );
}
