//! The fleet's device records: one JSON file in the state directory, rewritten atomically on every change,
//! and a lock file so only one process (the running server, or an admin command when none runs) owns them.

use cairn_proto::fleet::{Hex, PcrValue};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEVICES_FILE: &str = "devices.json";
pub const LOCK_FILE: &str = "fleet.lock";
const STORE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the device store {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the device store {path} is not valid ({reason}); restore it from backup, or move it away to start with no devices")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write the device store {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock the fleet state directory {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a device stands with the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Nothing vouches for its EK yet; waits for `cairn-fleet devices approve`.
    Pending,
    /// Vouched for; a challenge is out and the device has not attested yet.
    Enrolling,
    /// Attested; its certificate is honoured.
    Onboarded,
    /// Its last evidence failed; its certificate is not honoured until it attests successfully again.
    Refused,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Enrolling => "enrolling",
            DeviceState::Onboarded => "onboarded",
            DeviceState::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    pub code: String,
    pub message: String,
    pub at_unix: u64,
}

/// The TPM counters of the last accepted quote: clock must grow, reset/restart counts never go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteCounters {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// The EK's TPM name, hex.
    pub id: String,
    pub state: DeviceState,
    pub ek_algorithm: String,
    /// TPM2B_PUBLIC.
    pub ek_public: Hex,
    /// What vouched for the EK: "EK certificate", "allow-list", "operator"; None while pending.
    pub vouched_by: Option<String>,
    /// TPM2B_PUBLIC of the AK proven by credential activation (None before the first activation).
    pub ak_public: Option<Hex>,
    pub hostname: String,
    pub agent_version: String,
    /// The last refusal, kept after the device recovers so an operator can see what happened.
    pub reason: Option<Reason>,
    /// PCR values fixed at first attestation for PCRs no reference value covers.
    pub pinned_pcrs: Vec<PcrValue>,
    /// The reference entry its last good attestation matched (the image it booted); None without one.
    #[serde(default)]
    pub reference: Option<String>,
    pub last_quote: Option<QuoteCounters>,
    /// Uncompressed P-256 points of the AK-certified keys.
    pub device_key: Option<Hex>,
    pub telemetry_key: Option<Hex>,
    /// Serial of the one device certificate honoured now.
    pub cert_serial: Option<Hex>,
    /// When that certificate expires; it is renewed at a re-attestation past half its life.
    #[serde(default)]
    pub cert_not_after_unix: Option<u64>,
    pub first_seen_unix: u64,
    pub last_seen_unix: u64,
    pub last_trusted_unix: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    devices: Vec<DeviceRecord>,
}

/// Exclusive ownership of a state directory; released on drop (or when the process dies).
#[derive(Debug)]
pub struct StoreLock {
    _lock: Flock<std::fs::File>,
}

/// Takes the state directory's lock; Ok(None) when another process (normally the server) holds it.
pub fn try_lock(state: &Path) -> Result<Option<StoreLock>, StoreError> {
    let path = state.join(LOCK_FILE);
    let lerr = |source| StoreError::Lock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lerr)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(StoreLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(lerr(std::io::Error::from(e))),
    }
}

#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    pub devices: BTreeMap<String, DeviceRecord>,
}

impl Store {
    /// Reads the store in `state` (empty if there is none yet). The caller holds the lock.
    pub fn open(state: &Path, _lock: &StoreLock) -> Result<Store, StoreError> {
        let path = state.join(DEVICES_FILE);
        let devices = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.version != STORE_VERSION {
                    return Err(StoreError::Corrupt {
                        path,
                        reason: format!(
                            "version {} is not the version {STORE_VERSION} this fleet reads",
                            file.version
                        ),
                    });
                }
                file.devices
                    .into_iter()
                    .map(|d| (d.id.clone(), d))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(Store { path, devices })
    }

    /// The state directory this store lives in.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Writes the whole store to a temporary file, syncs it, and renames it over the old one, so a crash
    /// leaves either the old or the new store, never half of one.
    pub fn save(&self) -> Result<(), StoreError> {
        let werr = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let file = StoreFile {
            version: STORE_VERSION,
            devices: self.devices.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
        cairn_proto::atomic_file::write(&self.path, &bytes, 0o644).map_err(werr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            state: DeviceState::Pending,
            ek_algorithm: "rsa2048".into(),
            ek_public: Hex(vec![1, 2]),
            vouched_by: None,
            ak_public: None,
            hostname: "h".into(),
            agent_version: "0".into(),
            reason: None,
            pinned_pcrs: vec![PcrValue {
                index: 4,
                sha256: Hex(vec![9; 32]),
            }],
            reference: None,
            last_quote: None,
            device_key: None,
            telemetry_key: None,
            cert_serial: None,
            cert_not_after_unix: None,
            first_seen_unix: 1,
            last_seen_unix: 2,
            last_trusted_unix: None,
        }
    }

    #[test]
    fn round_trip_and_lock_exclusion() {
        let dir = tempfile::tempdir().unwrap();
        let lock = try_lock(dir.path()).unwrap().unwrap();
        assert!(try_lock(dir.path()).unwrap().is_none(), "second lock taken");
        let mut store = Store::open(dir.path(), &lock).unwrap();
        assert!(store.devices.is_empty());
        store.devices.insert("a".into(), record("a"));
        store.save().unwrap();
        let again = Store::open(dir.path(), &lock).unwrap();
        assert_eq!(again.devices["a"], record("a"));
        drop(lock);
        assert!(try_lock(dir.path()).unwrap().is_some(), "lock not released");
    }

    #[test]
    fn corrupt_store_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let lock = try_lock(dir.path()).unwrap().unwrap();
        for bad in [&b"{"[..], b"{\"version\":2,\"devices\":[]}", b"[]"] {
            std::fs::write(dir.path().join(DEVICES_FILE), bad).unwrap();
            let err = Store::open(dir.path(), &lock).unwrap_err().to_string();
            assert!(err.contains("devices.json"), "{err}");
            assert!(err.contains("move it away"), "{err}");
        }
    }
}
