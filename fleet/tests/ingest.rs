#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Telemetry ingest: only batches signed by the device's certified telemetry key are stored; forged,
//! tampered, misaddressed and replayed batches are refused (or, for replays, not stored twice) and counted.

use cairn_fleet::ingest::Ingest;
use cairn_proto::telemetry::{sign_batch, Batch, WireBody, WireRecord};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

struct Key(EcdsaKeyPair);

impl Key {
    fn new() -> Key {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        Key(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap(),
        )
    }
    fn point(&self) -> Vec<u8> {
        self.0.public_key().as_ref().to_vec()
    }
    fn kid(&self) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, &self.point())
            .as_ref()
            .to_vec()
    }
    fn sign(&self, b: &Batch) -> Vec<u8> {
        self.sign_with_kid(b, &self.kid())
    }
    fn sign_with_kid(&self, b: &Batch, kid: &[u8]) -> Vec<u8> {
        sign_batch(b, kid, |tbs| {
            let sig = self.0.sign(&SystemRandom::new(), tbs).unwrap();
            let mut out = [0u8; 64];
            out.copy_from_slice(sig.as_ref());
            Ok::<_, std::convert::Infallible>(out)
        })
        .unwrap()
    }
}

fn batch(device: &str, first: u64, last: u64) -> Batch {
    Batch {
        device_id: device.into(),
        boot_id: "boot-1".into(),
        first_seq: first,
        last_seq: last,
        records: (first..=last)
            .map(|seq| WireRecord {
                seq,
                at_unix_ms: 1_700_000_000_000 + seq,
                body: WireBody::Sample {
                    name: "DCGM_FI_DEV_GPU_TEMP".into(),
                    labels: vec![("gpu".into(), (seq % 8).to_string())],
                    value: 40.0 + seq as f64,
                    counter: false,
                },
            })
            .collect(),
    }
}

#[test]
fn only_the_certified_key_gets_in_and_nothing_is_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut ingest = Ingest::open(dir.path()).unwrap();
    let key = Key::new();
    let dev = "000bdevice";

    let ack = ingest
        .accept(dev, &key.point(), &key.sign(&batch(dev, 1, 100)))
        .unwrap()
        .unwrap();
    assert_eq!((ack.acked_up_to, ack.duplicates), (100, 0));

    // A retry after a lost answer overlapping the first: the new part is stored, the old part counted.
    let ack = ingest
        .accept(dev, &key.point(), &key.sign(&batch(dev, 51, 150)))
        .unwrap()
        .unwrap();
    assert_eq!((ack.acked_up_to, ack.duplicates), (150, 50));
    // A pure replay: acknowledged (so the device moves on), stored nothing, counted as replayed.
    let replay = key.sign(&batch(dev, 1, 100));
    let ack = ingest.accept(dev, &key.point(), &replay).unwrap().unwrap();
    assert_eq!(ack.duplicates, 100);

    // Forged: another key, claiming the certified key's id.
    let forger = Key::new();
    let r = ingest
        .accept(
            dev,
            &key.point(),
            &forger.sign_with_kid(&batch(dev, 151, 160), &key.kid()),
        )
        .unwrap()
        .unwrap_err();
    assert_eq!(r.code, "telemetry_bad_signature");
    // Signed by another key, honestly named.
    let r = ingest
        .accept(dev, &key.point(), &forger.sign(&batch(dev, 151, 160)))
        .unwrap()
        .unwrap_err();
    assert_eq!(r.code, "telemetry_wrong_key");
    // Tampered after signing: every single-byte change is refused.
    let good = key.sign(&batch(dev, 161, 170));
    for i in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        let r = ingest.accept(dev, &key.point(), &bad).unwrap().unwrap_err();
        assert!(
            [
                "telemetry_bad_signature",
                "telemetry_malformed",
                "telemetry_wrong_key"
            ]
            .contains(&r.code),
            "byte {i}: {r:?}"
        );
    }
    // Another device's batch through this device's connection.
    let r = ingest
        .accept(dev, &key.point(), &key.sign(&batch("000bother", 171, 180)))
        .unwrap()
        .unwrap_err();
    assert_eq!(r.code, "telemetry_wrong_device");
    // Garbage.
    let r = ingest
        .accept(dev, &key.point(), b"not cose")
        .unwrap()
        .unwrap_err();
    assert_eq!(r.code, "telemetry_malformed");

    // The books survive a restart: one range, each record once, every refusal counted.
    drop(ingest);
    let ingest = Ingest::open(dir.path()).unwrap();
    let t = &ingest.devices()[dev];
    assert_eq!(t.ranges["boot-1"], vec![(1, 150)]);
    assert_eq!((t.samples, t.duplicates), (150, 150));
    assert_eq!(t.refused["replayed"], 1);
    assert!(t.refused["telemetry_bad_signature"] >= 1);
    assert!(t.refused["telemetry_wrong_key"] >= 1);
    assert_eq!(t.refused["telemetry_wrong_device"], 1);
    // The verified batches are kept as received, signature included.
    let kept = std::fs::read_dir(dir.path().join("telemetry").join(dev))
        .unwrap()
        .count();
    assert_eq!(kept, 2);
}
