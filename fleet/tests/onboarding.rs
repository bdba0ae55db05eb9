#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The fleet's enrolment and attestation policy against real TPMs (swtpm), for both EK algorithms: every
//! refusal the issue names, and a fleet restart that loses nothing.

use cairn_fleet::admin::{AdminRequest, AdminResponse};
use cairn_fleet::attestation::{Attestor, Policy};
use cairn_fleet::pki;
use cairn_fleet::store::{self, DeviceState, Store};
use cairn_proto::fleet::{
    ActivateRequest, AttestRequest, CertifiedKey, Challenge, EnrollRequest, EnrollResponse,
    Evidence, Hex, PcrValue, Verdict,
};
use cairn_tpm::swtpm::Swtpm;
use cairn_tpm::{AkBlob, EkAlgorithm, Tpm};
use std::path::Path;
use std::time::Duration;

const LOCALCA_ROOT: &str = "/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem";
const LOCALCA_ISSUER: &str = "/var/lib/swtpm-localca/issuercert.pem";

fn pem_certs(path: &str) -> Vec<Vec<u8>> {
    let pem = std::fs::read(path).unwrap();
    rustls_pemfile::certs(&mut pem.as_slice())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

fn tpm2b(tpmt: &[u8]) -> Vec<u8> {
    let mut v = (tpmt.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(tpmt);
    v
}

/// A device as the agent drives its TPM, minus the agent.
struct Device {
    _sw: Swtpm,
    tpm: Tpm,
    alg: EkAlgorithm,
    ak: AkBlob,
    device_key: AkBlob,
    telemetry_key: AkBlob,
}

impl Device {
    fn new(dir: &Path, alg: EkAlgorithm) -> Device {
        let sw = Swtpm::start(dir).unwrap();
        let tpm = Tpm::new(sw.tcti()).unwrap();
        let ak = tpm.create_ak(alg).unwrap();
        let device_key = tpm.create_signing_key(alg).unwrap();
        let telemetry_key = tpm.create_signing_key(alg).unwrap();
        Device {
            _sw: sw,
            tpm,
            alg,
            ak,
            device_key,
            telemetry_key,
        }
    }

    fn enroll_request(&self) -> EnrollRequest {
        EnrollRequest {
            ek_algorithm: self.alg.as_str().into(),
            ek_public: Hex(self.tpm.ek_public(self.alg).unwrap()),
            ek_certificate: self.tpm.ek_certificate(self.alg).unwrap().map(Hex),
            ak_public: Hex(tpm2b(&self.ak.public)),
            hostname: "test".into(),
            agent_version: "0".into(),
        }
    }

    fn evidence(&self, nonce: &[u8]) -> Evidence {
        let q = self
            .tpm
            .quote(self.alg, &self.ak, nonce, &[0, 1, 2, 3, 4, 5, 6, 7])
            .unwrap();
        Evidence {
            quote: Hex(q.message),
            signature: Hex(q.signature),
            pcrs: q
                .pcr_values
                .into_iter()
                .map(|(index, v)| PcrValue {
                    index,
                    sha256: Hex(v),
                })
                .collect(),
            event_log: None,
        }
    }

    fn certified(&self, key: &AkBlob, nonce: &[u8]) -> CertifiedKey {
        let c = self.tpm.certify(self.alg, &self.ak, key, nonce).unwrap();
        CertifiedKey {
            public: Hex(tpm2b(&key.public)),
            certify_info: Hex(c.message),
            signature: Hex(c.signature),
        }
    }

    fn activate_request(&self, device_id: &str, ch: &Challenge) -> ActivateRequest {
        let cred = ch.credential.as_ref().unwrap();
        let secret = self
            .tpm
            .activate_credential(
                self.alg,
                &self.ak,
                &cred.id_object.0,
                &cred.encrypted_secret.0,
            )
            .unwrap();
        ActivateRequest {
            device_id: device_id.into(),
            challenge_id: ch.id.clone(),
            activated_credential: Hex(secret),
            evidence: self.evidence(&ch.nonce.0),
            device_key: self.certified(&self.device_key, &ch.nonce.0),
            telemetry_key: self.certified(&self.telemetry_key, &ch.nonce.0),
        }
    }

    fn extend(&self, pcr: u8) {
        let out = std::process::Command::new("tpm2_pcrextend")
            .args([
                "-T",
                self.tpm.tcti(),
                &format!("{pcr}:sha256={}", "ab".repeat(32)),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    attestor: Option<Attestor>,
    lock: Option<store::StoreLock>,
    policy: Policy,
}

impl Fleet {
    fn new(policy: Policy) -> Fleet {
        let mut f = Fleet {
            dir: tempfile::tempdir().unwrap(),
            attestor: None,
            lock: None,
            policy,
        };
        f.start();
        f
    }

    fn start(&mut self) {
        let lock = store::try_lock(self.dir.path()).unwrap().unwrap();
        let store = Store::open(self.dir.path(), &lock).unwrap();
        let pki = pki::load_or_create(self.dir.path(), &["localhost".into()]).unwrap();
        self.attestor = Some(Attestor::new(self.policy.clone(), store, pki));
        self.lock = Some(lock);
    }

    fn restart(&mut self) {
        self.attestor = None;
        self.lock = None;
        self.start();
    }

    fn a(&mut self) -> &mut Attestor {
        self.attestor.as_mut().unwrap()
    }

    fn state(&mut self, id: &str) -> (DeviceState, Option<String>) {
        let d = self.a().devices().find(|d| d.id == id).unwrap().clone();
        (d.state, d.reason.map(|r| r.code))
    }

    /// Enrol and activate; returns the device id and the verdict.
    fn onboard(&mut self, dev: &Device) -> (String, Verdict) {
        let (id, ch) = match self.a().enroll(&dev.enroll_request()).unwrap() {
            EnrollResponse::Challenge {
                device_id,
                challenge,
            } => (device_id, challenge),
            other => panic!("not challenged: {other:?}"),
        };
        let v = self.a().activate(&dev.activate_request(&id, &ch)).unwrap();
        (id, v)
    }

    fn reattest(&mut self, id: &str, dev: &Device) -> Verdict {
        let ch = self.a().reattestation_challenge(id).unwrap();
        self.a()
            .attest(
                id,
                &AttestRequest {
                    challenge_id: ch.id.clone(),
                    evidence: dev.evidence(&ch.nonce.0),
                },
            )
            .unwrap()
    }
}

fn refused_code(v: &Verdict) -> &str {
    match v {
        Verdict::Refused { code, .. } => code,
        Verdict::Trusted { .. } => panic!("trusted, expected a refusal"),
    }
}

fn assert_trusted(v: &Verdict) {
    assert!(matches!(v, Verdict::Trusted { .. }), "{v:?}");
}

fn allow(dev: &Device) -> Policy {
    let ek = cairn_fleet::ek::EkPublic::parse(&dev.tpm.ek_public(dev.alg).unwrap()).unwrap();
    let mut p = Policy::default();
    p.allow_list.insert(cairn_proto::fleet::to_hex(&ek.name()));
    p
}

fn both(test: impl Fn(EkAlgorithm)) {
    test(EkAlgorithm::Rsa2048);
    test(EkAlgorithm::EccP256);
}

#[test]
fn allowed_device_onboards_reattests_and_survives_a_fleet_restart() {
    both(|alg| {
        let tmp = tempfile::tempdir().unwrap();
        let dev = Device::new(tmp.path(), alg);
        let mut fleet = Fleet::new(allow(&dev));
        let (id, v) = fleet.onboard(&dev);
        let Verdict::Trusted {
            certificate_pem: Some(pem),
            ..
        } = &v
        else {
            panic!("{alg}: {v:?}")
        };
        assert!(pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(fleet.state(&id).0, DeviceState::Onboarded);
        assert_trusted(&fleet.reattest(&id, &dev));

        fleet.restart();
        assert_eq!(
            fleet.state(&id).0,
            DeviceState::Onboarded,
            "{alg}: lost on restart"
        );
        assert_trusted(&fleet.reattest(&id, &dev));
    });
}

#[test]
fn ek_certificate_from_the_manufacturer_ca_vouches_for_the_tpm() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(tmp.path(), EkAlgorithm::Rsa2048);
    let mut fleet = Fleet::new(Policy {
        manufacturer_roots: pem_certs(LOCALCA_ROOT),
        intermediates: pem_certs(LOCALCA_ISSUER),
        ..Policy::default()
    });
    let (id, v) = fleet.onboard(&dev);
    assert_trusted(&v);
    let rec = fleet.a().devices().find(|d| d.id == id).unwrap().clone();
    assert_eq!(rec.vouched_by.as_deref(), Some("EK certificate"));
}

#[test]
fn unknown_ek_waits_for_an_operator() {
    both(|alg| {
        let tmp = tempfile::tempdir().unwrap();
        let dev = Device::new(tmp.path(), alg);
        // An unrelated root: the swtpm EK certificate does not chain to it.
        let other = rcgen::CertificateParams::new(vec!["other-ca".to_string()])
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let mut fleet = Fleet::new(Policy {
            manufacturer_roots: vec![other.der().to_vec()],
            ..Policy::default()
        });
        let resp = fleet.a().enroll(&dev.enroll_request()).unwrap();
        let EnrollResponse::Pending {
            device_id, message, ..
        } = resp
        else {
            panic!("{alg}: not pending: {resp:?}")
        };
        assert!(message.contains("cairn-fleet devices approve"), "{message}");
        assert_eq!(
            fleet.state(&device_id),
            (DeviceState::Pending, Some("pending_approval".into()))
        );
        // Still pending on a retry; onboarded once approved.
        assert!(matches!(
            fleet.a().enroll(&dev.enroll_request()).unwrap(),
            EnrollResponse::Pending { .. }
        ));
        let r = fleet.a().admin(&AdminRequest::Approve {
            id: device_id.clone(),
        });
        assert!(matches!(r, AdminResponse::Done { .. }), "{r:?}");
        let (_, v) = fleet.onboard(&dev);
        assert_trusted(&v);
    });
}

#[test]
fn replayed_and_expired_nonces_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(tmp.path(), EkAlgorithm::Rsa2048);
    let mut policy = allow(&dev);
    // Long enough that an activation against swtpm on a loaded 2-core CI machine still answers in time.
    let ttl = Duration::from_secs(5);
    policy.nonce_ttl = ttl;
    let mut fleet = Fleet::new(policy);
    let EnrollResponse::Challenge {
        device_id,
        challenge,
    } = fleet.a().enroll(&dev.enroll_request()).unwrap()
    else {
        panic!()
    };
    let req = dev.activate_request(&device_id, &challenge);
    assert_trusted(&fleet.a().activate(&req).unwrap());
    // The same request again: the challenge was single-use.
    assert_eq!(
        refused_code(&fleet.a().activate(&req).unwrap()),
        "nonce_unknown"
    );
    assert_eq!(
        fleet.state(&device_id),
        (DeviceState::Onboarded, Some("nonce_unknown".into())),
        "a replay must not demote a device it cannot be attributed to"
    );

    // A re-attestation answered after the challenge expired.
    let issued = std::time::Instant::now();
    let ch = fleet.a().reattestation_challenge(&device_id).unwrap();
    let evidence = dev.evidence(&ch.nonce.0);
    std::thread::sleep((ttl + Duration::from_millis(200)).saturating_sub(issued.elapsed()));
    let v = fleet
        .a()
        .attest(
            &device_id,
            &AttestRequest {
                challenge_id: ch.id,
                evidence: evidence.clone(),
            },
        )
        .unwrap();
    assert_eq!(refused_code(&v), "nonce_expired");
    // And a quote made for one nonce, sent against another challenge.
    let ch2 = fleet.a().reattestation_challenge(&device_id).unwrap();
    let v = fleet
        .a()
        .attest(
            &device_id,
            &AttestRequest {
                challenge_id: ch2.id,
                evidence,
            },
        )
        .unwrap();
    assert_eq!(refused_code(&v), "wrong_nonce");
}

#[test]
fn pcr_changed_after_enrolment_is_refused_and_the_certificate_stops_being_honoured() {
    both(|alg| {
        let tmp = tempfile::tempdir().unwrap();
        let dev = Device::new(tmp.path(), alg);
        let mut fleet = Fleet::new(allow(&dev));
        let (id, v) = fleet.onboard(&dev);
        assert_trusted(&v);
        let rec = fleet.a().devices().find(|d| d.id == id).unwrap().clone();
        let serial = rec.cert_serial.clone().unwrap().0;
        assert_eq!(fleet.a().device_for_serial(&serial).unwrap(), id);

        dev.extend(2);
        let v = fleet.reattest(&id, &dev);
        assert_eq!(refused_code(&v), "pcr_changed", "{alg}");
        let Verdict::Refused { message, .. } = &v else {
            unreachable!()
        };
        assert!(message.contains("[2]"), "{message}");
        assert_eq!(
            fleet.state(&id),
            (DeviceState::Refused, Some("pcr_changed".into()))
        );
        let r = fleet.a().device_for_serial(&serial).unwrap_err();
        assert_eq!(r.code, "device_refused");
        // Enrolling again does not wash the change away: the pins stay.
        let (_, v) = fleet.onboard(&dev);
        assert_eq!(refused_code(&v), "pcr_changed");
    });
}

#[test]
fn a_boot_of_a_known_image_is_named_and_one_of_an_unknown_image_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(tmp.path(), EkAlgorithm::EccP256);
    // The "firmware" measures one boot application into PCR 4, as an image build predicts it.
    dev.extend(4);
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(&[0u8; 32]);
    h.update(&[0xab; 32]);
    let pcr4 = cairn_proto::fleet::to_hex(h.finish().as_ref());
    let mut policy = allow(&dev);
    policy.reference = cairn_fleet::reference::Reference::parse(
        format!(
            r#"{{"version":1,"accepted":[{{"name":"cairn 0.9.0","sha256":{{"4":"{}"}}}},{{"name":"cairn 1.0.0","sha256":{{"4":"{pcr4}"}}}}]}}"#,
            "11".repeat(32)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut fleet = Fleet::new(policy);
    let (id, v) = fleet.onboard(&dev);
    assert_trusted(&v);
    let rec = fleet.a().devices().find(|d| d.id == id).unwrap().clone();
    assert_eq!(rec.reference.as_deref(), Some("cairn 1.0.0"));
    assert!(
        !rec.pinned_pcrs.iter().any(|p| p.index == 4),
        "a PCR the reference covers is not pinned: {:?}",
        rec.pinned_pcrs
    );

    // Another boot loader or kernel: PCR 4 matches no image the fleet knows.
    dev.extend(4);
    let v = fleet.reattest(&id, &dev);
    assert_eq!(refused_code(&v), "pcr_reference");
    let Verdict::Refused { message, .. } = &v else {
        unreachable!()
    };
    assert!(
        message.contains("[4]") && message.contains("does not know"),
        "{message}"
    );
    assert_eq!(
        fleet.state(&id),
        (DeviceState::Refused, Some("pcr_reference".into()))
    );
}

#[test]
fn ak_from_another_tpm_cannot_activate() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = Device::new(&tmp.path().join("a"), EkAlgorithm::Rsa2048);
    let attacker = Device::new(&tmp.path().join("b"), EkAlgorithm::Rsa2048);
    let mut fleet = Fleet::new(allow(&victim));
    // The victim's EK (public knowledge) with the attacker's AK.
    let mut req = victim.enroll_request();
    req.ak_public = Hex(tpm2b(&attacker.ak.public));
    let EnrollResponse::Challenge {
        device_id,
        challenge,
    } = fleet.a().enroll(&req).unwrap()
    else {
        panic!()
    };
    let cred = challenge.credential.clone().unwrap();
    // The attacker's TPM cannot open a credential sealed to the victim's EK.
    assert!(attacker
        .tpm
        .activate_credential(
            attacker.alg,
            &attacker.ak,
            &cred.id_object.0,
            &cred.encrypted_secret.0
        )
        .is_err());
    // Nor can the victim's TPM release it for an AK that is not its own name... it is sealed to the
    // attacker's AK name, and the victim's AK has another name.
    assert!(victim
        .tpm
        .activate_credential(
            victim.alg,
            &victim.ak,
            &cred.id_object.0,
            &cred.encrypted_secret.0
        )
        .is_err());
    // So the attacker can only guess.
    let mut forged = attacker.activate_request_unchecked(&device_id, &challenge);
    forged.activated_credential = Hex(vec![0; 32]);
    let v = fleet.a().activate(&forged).unwrap();
    assert_eq!(refused_code(&v), "credential_not_activated");
    assert_eq!(fleet.state(&device_id).0, DeviceState::Refused);
}

impl Device {
    /// Everything but the activation (for forgeries).
    fn activate_request_unchecked(&self, device_id: &str, ch: &Challenge) -> ActivateRequest {
        ActivateRequest {
            device_id: device_id.into(),
            challenge_id: ch.id.clone(),
            activated_credential: Hex(Vec::new()),
            evidence: self.evidence(&ch.nonce.0),
            device_key: self.certified(&self.device_key, &ch.nonce.0),
            telemetry_key: self.certified(&self.telemetry_key, &ch.nonce.0),
        }
    }
}

#[test]
fn ak_without_the_restricted_attribute_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(tmp.path(), EkAlgorithm::EccP256);
    let mut fleet = Fleet::new(allow(&dev));
    let mut req = dev.enroll_request();
    // TPMA_OBJECT is at offset 2 (size) + 2 (type) + 2 (nameAlg); restricted is bit 16.
    req.ak_public.0[6 + 1] &= !0x01;
    let resp = fleet.a().enroll(&req).unwrap();
    let EnrollResponse::Refused {
        code,
        message,
        device_id,
        ..
    } = resp
    else {
        panic!("{resp:?}")
    };
    assert_eq!(code, "ak_attributes");
    assert!(message.contains("restricted"), "{message}");
    // The EK is public, so this request proves nothing about the device: recorded, state not demoted.
    assert_eq!(
        fleet.state(&device_id),
        (DeviceState::Enrolling, Some("ak_attributes".into()))
    );
}

#[test]
fn quote_signed_by_the_wrong_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(&tmp.path().join("a"), EkAlgorithm::Rsa2048);
    let other = Device::new(&tmp.path().join("b"), EkAlgorithm::Rsa2048);
    let mut fleet = Fleet::new(allow(&dev));
    let (id, v) = fleet.onboard(&dev);
    assert_trusted(&v);
    let ch = fleet.a().reattestation_challenge(&id).unwrap();
    let v = fleet
        .a()
        .attest(
            &id,
            &AttestRequest {
                challenge_id: ch.id,
                evidence: other.evidence(&ch.nonce.0),
            },
        )
        .unwrap();
    assert_eq!(refused_code(&v), "bad_signature");
    // A device key certified by another TPM's AK is refused at activation too.
    let EnrollResponse::Challenge {
        device_id,
        challenge,
    } = fleet.a().enroll(&dev.enroll_request()).unwrap()
    else {
        panic!()
    };
    let mut req = dev.activate_request(&device_id, &challenge);
    req.device_key = other.certified(&other.device_key, &challenge.nonce.0);
    assert_eq!(
        refused_code(&fleet.a().activate(&req).unwrap()),
        "bad_signature"
    );
}

#[test]
fn event_log_that_does_not_replay_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(tmp.path(), EkAlgorithm::Rsa2048);
    let mut fleet = Fleet::new(allow(&dev));
    let (id, v) = fleet.onboard(&dev);
    assert_trusted(&v);
    // A log of a boot that never happened on this TPM (its PCRs are still zero).
    let stages = cairn_sim_stages();
    let ch = fleet.a().reattestation_challenge(&id).unwrap();
    let mut evidence = dev.evidence(&ch.nonce.0);
    evidence.event_log = Some(Hex(stages));
    let v = fleet
        .a()
        .attest(
            &id,
            &AttestRequest {
                challenge_id: ch.id,
                evidence,
            },
        )
        .unwrap();
    assert_eq!(refused_code(&v), "event_log");
    // Garbage is refused as unreadable, not a panic.
    let ch = fleet.a().reattestation_challenge(&id).unwrap();
    let mut evidence = dev.evidence(&ch.nonce.0);
    evidence.event_log = Some(Hex(vec![1, 2, 3]));
    let v = fleet
        .a()
        .attest(
            &id,
            &AttestRequest {
                challenge_id: ch.id,
                evidence,
            },
        )
        .unwrap();
    assert_eq!(refused_code(&v), "event_log");
}

/// An event log with one SHA-256 event extending PCR 4.
fn cairn_sim_stages() -> Vec<u8> {
    use cairn_proto::eventlog::{encode, Event, EventLog, TPM_ALG_SHA256};
    encode(&EventLog {
        algorithms: vec![(TPM_ALG_SHA256, 32)],
        events: vec![Event {
            pcr: 4,
            event_type: 0x8000_0003,
            digests: vec![(TPM_ALG_SHA256, vec![0x42; 32])],
            data: b"kernel".to_vec(),
        }],
    })
}

#[test]
fn clock_going_backwards_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(tmp.path(), EkAlgorithm::Rsa2048);
    let mut fleet = Fleet::new(allow(&dev));
    let (id, v) = fleet.onboard(&dev);
    assert_trusted(&v);
    // Pretend the fleet saw a later clock than the TPM's now: its next quote looks rolled back.
    fleet.attestor = None;
    let path = fleet.dir.path().join(store::DEVICES_FILE);
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let q = &mut doc["devices"][0]["last_quote"];
    q["clock"] = serde_json::json!(q["clock"].as_u64().unwrap() + 1_000_000_000);
    std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
    fleet.restart();
    assert_eq!(refused_code(&fleet.reattest(&id, &dev)), "clock_regressed");
}

#[test]
fn certificate_is_renewed_past_half_life_and_enrolment_challenges_do_not_attest() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::new(tmp.path(), EkAlgorithm::Rsa2048);
    let mut fleet = Fleet::new(allow(&dev));
    let (id, v) = fleet.onboard(&dev);
    assert_trusted(&v);
    let serial = |fleet: &mut Fleet| {
        fleet
            .a()
            .devices()
            .find(|d| d.id == id)
            .unwrap()
            .cert_serial
            .clone()
            .unwrap()
    };
    let first = serial(&mut fleet);
    // A fresh certificate is not renewed.
    let Verdict::Trusted {
        certificate_pem, ..
    } = fleet.reattest(&id, &dev)
    else {
        panic!()
    };
    assert!(certificate_pem.is_none());
    assert_eq!(serial(&mut fleet), first);

    // One about to expire is: the next trusted verdict carries a new one, and only it is honoured.
    fleet.attestor = None;
    let path = fleet.dir.path().join(store::DEVICES_FILE);
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    doc["devices"][0]["cert_not_after_unix"] = serde_json::json!(soon);
    std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
    fleet.restart();
    let Verdict::Trusted {
        certificate_pem: Some(pem),
        ..
    } = fleet.reattest(&id, &dev)
    else {
        panic!("not renewed")
    };
    assert!(pem.contains("BEGIN CERTIFICATE"));
    let second = serial(&mut fleet);
    assert_ne!(second, first);
    assert_eq!(
        fleet.a().device_for_serial(&first.0).unwrap_err().code,
        "certificate_not_honoured"
    );
    assert_eq!(fleet.a().device_for_serial(&second.0).unwrap(), id);

    // An enrolment challenge (with a credential) cannot be answered on the re-attestation route.
    let EnrollResponse::Challenge { challenge, .. } =
        fleet.a().enroll(&dev.enroll_request()).unwrap()
    else {
        panic!()
    };
    let v = fleet
        .a()
        .attest(
            &id,
            &AttestRequest {
                challenge_id: challenge.id.clone(),
                evidence: dev.evidence(&challenge.nonce.0),
            },
        )
        .unwrap();
    assert_eq!(refused_code(&v), "nonce_unknown");
}
