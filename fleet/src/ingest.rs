//! Telemetry ingest: verify each signed batch against the telemetry key the device's AK certified at
//! onboarding, dedupe by (device, boot, sequence), keep the verified batch as received, and account for every
//! sequence range and every refusal. State lives under `<state>/telemetry/`: `index.json` (ranges and counts,
//! rewritten atomically) and one directory per device holding the verified COSE_Sign1 files.

use cairn_proto::fleet::to_hex;
use cairn_proto::telemetry::{BatchAck, SignedBatch, WireBody};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const INDEX_FILE: &str = "index.json";
const INDEX_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot read the telemetry index {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the telemetry index {path} is not valid ({reason}); restore it from backup or move it away")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write telemetry under {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a batch was not taken: a code for the counters and the answer, and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRefusal {
    pub code: &'static str,
    pub message: String,
}

/// What the fleet knows about one device's telemetry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTelemetry {
    /// Per boot id: the inclusive sequence ranges received, merged and sorted; gaps are missing data.
    pub ranges: BTreeMap<String, Vec<(u64, u64)>>,
    pub batches: u64,
    pub samples: u64,
    pub events: u64,
    /// Records received again (a retry after a lost answer): stored once.
    pub duplicates: u64,
    /// Refused or replayed batches, by code.
    pub refused: BTreeMap<String, u64>,
    pub last_batch_unix: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexFile {
    version: u32,
    devices: BTreeMap<String, DeviceTelemetry>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Adds `[a, b]` to sorted, merged inclusive ranges.
fn insert_range(ranges: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    ranges.push((a, b));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    *ranges = merged;
}

fn contains(ranges: &[(u64, u64)], seq: u64) -> bool {
    let i = ranges.partition_point(|&(_, e)| e < seq);
    ranges.get(i).is_some_and(|&(s, _)| s <= seq)
}

#[derive(Debug)]
pub struct Ingest {
    dir: PathBuf,
    devices: BTreeMap<String, DeviceTelemetry>,
    /// Where newly stored samples are re-exported (`serve --remote-write`), if anywhere.
    exporter: Option<crate::remote_write::Exporter>,
}

impl Ingest {
    /// Reads `<state>/telemetry/index.json` (empty when absent). The caller holds the state directory's lock.
    pub fn open(state: &Path) -> Result<Ingest, IngestError> {
        let dir = state.join("telemetry");
        let path = dir.join(INDEX_FILE);
        let devices = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: IndexFile =
                    serde_json::from_slice(&bytes).map_err(|e| IngestError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if f.version != INDEX_VERSION {
                    return Err(IngestError::Corrupt {
                        path,
                        reason: format!("version {} is not {INDEX_VERSION}", f.version),
                    });
                }
                f.devices
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(IngestError::Read { path, source }),
        };
        Ok(Ingest {
            dir,
            devices,
            exporter: None,
        })
    }

    /// Re-exports every sample stored from now on (duplicates never) through `exporter`.
    pub fn export_to(&mut self, exporter: crate::remote_write::Exporter) {
        self.exporter = Some(exporter);
    }

    pub fn devices(&self) -> &BTreeMap<String, DeviceTelemetry> {
        &self.devices
    }

    fn save(&self) -> Result<(), IngestError> {
        let werr = |source| IngestError::Write {
            path: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(werr)?;
        let bytes = serde_json::to_vec(&IndexFile {
            version: INDEX_VERSION,
            devices: self.devices.clone(),
        })
        .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
        write_durable(&self.dir.join(INDEX_FILE), &bytes).map_err(werr)
    }

    fn refuse(
        &mut self,
        device_id: &str,
        code: &'static str,
        message: String,
    ) -> Result<BatchRefusal, IngestError> {
        *self
            .devices
            .entry(device_id.to_owned())
            .or_default()
            .refused
            .entry(code.to_owned())
            .or_default() += 1;
        self.save()?;
        tracing::warn!(device = device_id, code, %message, "telemetry batch refused");
        Ok(BatchRefusal { code, message })
    }

    /// Verifies and stores one signed batch from `device_id` (authenticated by mTLS), whose telemetry key is
    /// `key_point` (0x04 || x || y). Ok(Err(refusal)) when the batch is refused; Err only when the fleet fails.
    pub fn accept(
        &mut self,
        device_id: &str,
        key_point: &[u8],
        body: &[u8],
    ) -> Result<Result<BatchAck, BatchRefusal>, IngestError> {
        let signed = match SignedBatch::parse(body) {
            Ok(s) => s,
            Err(e) => {
                return self
                    .refuse(device_id, "telemetry_malformed", e.to_string())
                    .map(Err)
            }
        };
        let kid = ring::digest::digest(&ring::digest::SHA256, key_point);
        if signed.kid != kid.as_ref() {
            return self
                .refuse(
                    device_id,
                    "telemetry_wrong_key",
                    "the batch is signed with another key than the telemetry key certified at onboarding".into(),
                )
                .map(Err);
        }
        let verified = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            key_point,
        )
        .verify(&signed.to_be_signed, &signed.signature);
        if verified.is_err() {
            return self
                .refuse(
                    device_id,
                    "telemetry_bad_signature",
                    "the batch's signature does not verify with the device's telemetry key (forged or altered)".into(),
                )
                .map(Err);
        }
        let batch = match signed.batch() {
            Ok(b) => b,
            Err(e) => {
                return self
                    .refuse(device_id, "telemetry_malformed", e.to_string())
                    .map(Err)
            }
        };
        if batch.device_id != device_id {
            return self
                .refuse(
                    device_id,
                    "telemetry_wrong_device",
                    format!(
                        "the batch names device {}, not the one its certificate names",
                        batch.device_id
                    ),
                )
                .map(Err);
        }
        let dev = self.devices.entry(device_id.to_owned()).or_default();
        let ranges = dev.ranges.entry(batch.boot_id.clone()).or_default();
        let mut duplicates = 0u64;
        let (mut samples, mut events) = (0u64, 0u64);
        for r in &batch.records {
            if contains(ranges, r.seq) {
                duplicates += 1;
            } else {
                match r.body {
                    WireBody::Sample { .. } => samples += 1,
                    WireBody::Event { .. } => events += 1,
                }
            }
        }
        let fresh = samples + events;
        if fresh > 0 || batch.records.is_empty() {
            // Kept as received: the signature stays checkable by anyone with the device's telemetry key.
            let dir = self.dir.join(device_id);
            let file = dir.join(format!(
                "{}-{:016x}-{:016x}.cose",
                to_hex(batch.boot_id.as_bytes()),
                batch.first_seq,
                batch.last_seq
            ));
            std::fs::create_dir_all(&dir)
                .and_then(|()| write_durable(&file, body))
                .map_err(|source| IngestError::Write { path: file, source })?;
        }
        // Remote write: what was known before this batch tells its fresh records from duplicates.
        let known = self.exporter.is_some().then(|| ranges.clone());
        insert_range(ranges, batch.first_seq, batch.last_seq);
        dev.batches += 1;
        dev.samples += samples;
        dev.events += events;
        dev.duplicates += duplicates;
        dev.last_batch_unix = Some(now_unix());
        if fresh == 0 && !batch.records.is_empty() {
            // A replay (or a retry after a lost answer): nothing is stored twice; the device still gets its ack.
            *dev.refused.entry("replayed".into()).or_default() += 1;
        }
        self.save()?;
        if let (Some(exporter), Some(known)) = (&self.exporter, known) {
            exporter.offer(
                device_id,
                batch.records.iter().filter(|r| !contains(&known, r.seq)),
            );
        }
        Ok(Ok(BatchAck {
            device_id: device_id.to_owned(),
            boot_id: batch.boot_id,
            acked_up_to: batch.last_seq,
            duplicates,
        }))
    }
}

fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    cairn_proto::atomic_file::write(path, bytes, 0o644)
}

/// The index as another process sees it (for `cairn-fleet telemetry` when no server runs).
pub fn read_index(state: &Path) -> Result<BTreeMap<String, DeviceTelemetry>, IngestError> {
    Ingest::open(state).map(|i| i.devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_answer_membership() {
        let mut r = Vec::new();
        insert_range(&mut r, 10, 19);
        insert_range(&mut r, 30, 39);
        insert_range(&mut r, 20, 25);
        assert_eq!(r, vec![(10, 25), (30, 39)]);
        insert_range(&mut r, 26, 29);
        assert_eq!(r, vec![(10, 39)]);
        assert!(contains(&r, 10) && contains(&r, 39) && !contains(&r, 9) && !contains(&r, 40));
        insert_range(&mut r, 0, 0);
        assert_eq!(r, vec![(0, 0), (10, 39)]);
    }
}
