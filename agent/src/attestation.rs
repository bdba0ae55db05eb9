//! The device's TPM keys, kept on the data partition, and quotes made with them. The AK, the device (mTLS) key
//! and the telemetry key are created once under the configured EK, on first use, and loaded again per
//! operation, so a reboot or an agent restart never changes them.
//! `cairnctl quote` uses this module directly (with or without cairnd running): the TPM is opened per
//! operation, so both can reach it.

use cairn_tpm::{AkBlob, EkAlgorithm, QuoteFiles, Tpm};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    #[error("cannot read the TPM key blob at {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot store the TPM key blob at {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {role} key at {dir} is incomplete ({missing} is missing); move the directory away to create new keys (the fleet must then re-enrol the device)")]
    Incomplete {
        role: KeyRole,
        dir: PathBuf,
        missing: String,
    },
    #[error(transparent)]
    Tpm(#[from] cairn_tpm::TpmError),
    #[error("nonce {0:?} is not valid: give 1 to {max} bytes as hex, e.g. 5a1122…", max = cairn_tpm::MAX_NONCE_BYTES)]
    Nonce(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("PCR selection {0:?} is not valid: give sha256:INDEX,INDEX,… with indices 0 to 23, e.g. sha256:0,1,2,3,4,5,6,7")]
    Pcrs(String),
}

/// The TPM-resident keys a device keeps, each created under the EK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// The attestation key: restricted, signs quotes and certifies the others.
    Ak,
    /// ECDSA P-256, certified by the AK; the fleet issues its X.509 certificate for mTLS.
    Device,
    /// ECDSA P-256, certified by the AK; signs telemetry batches.
    Telemetry,
}

impl KeyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Ak => "ak",
            KeyRole::Device => "device",
            KeyRole::Telemetry => "telemetry",
        }
    }
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRole::Ak => "attestation",
            KeyRole::Device => "device",
            KeyRole::Telemetry => "telemetry",
        })
    }
}

/// Where the keys made under one EK live: `<data_dir>/identity/<ek-algorithm>/{ak,device,telemetry}.{priv,pub}`.
/// Keys hang off their EK, so switching `tpm.ek_algorithm` uses another directory rather than unloadable blobs.
pub fn key_dir(data_dir: &Path, alg: EkAlgorithm) -> PathBuf {
    data_dir.join("identity").join(alg.as_str())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AttestationError> {
    cairn_proto::atomic_file::write(path, bytes, 0o600).map_err(|source| AttestationError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Loads a key, creating and storing it first if this device has none yet.
pub fn load_or_create(
    tpm: &Tpm,
    data_dir: &Path,
    alg: EkAlgorithm,
    role: KeyRole,
) -> Result<AkBlob, AttestationError> {
    let dir = key_dir(data_dir, alg);
    std::fs::create_dir_all(&dir).map_err(|source| AttestationError::Write {
        path: dir.clone(),
        source,
    })?;
    // cairnd and cairnctl may both reach here on a fresh device: without the lock each would create its own
    // key and the last writer would win, leaving the other holding a key the fleet never sees.
    let lock_path = dir.join(".lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| AttestationError::Write {
            path: lock_path.clone(),
            source,
        })?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, e)| AttestationError::Write {
            path: lock_path.clone(),
            source: std::io::Error::from(e),
        },
    )?;
    let priv_name = format!("{}.priv", role.as_str());
    let pub_name = format!("{}.pub", role.as_str());
    let (priv_path, pub_path) = (dir.join(&priv_name), dir.join(&pub_name));
    match (priv_path.exists(), pub_path.exists()) {
        (true, true) => {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|source| AttestationError::Read {
                    path: p.to_owned(),
                    source,
                })
            };
            Ok(AkBlob {
                private: read(&priv_path)?,
                public: read(&pub_path)?,
            })
        }
        (false, false) => {
            std::fs::create_dir_all(&dir).map_err(|source| AttestationError::Write {
                path: dir.clone(),
                source,
            })?;
            let key = match role {
                KeyRole::Ak => tpm.create_ak(alg)?,
                KeyRole::Device | KeyRole::Telemetry => tpm.create_signing_key(alg)?,
            };
            // Public first: a crash in between leaves "*.priv missing", which is reported, never half-used.
            write_private(&pub_path, &key.public)?;
            write_private(&priv_path, &key.private)?;
            Ok(key)
        }
        (false, true) => Err(AttestationError::Incomplete {
            role,
            dir,
            missing: priv_name,
        }),
        (true, false) => Err(AttestationError::Incomplete {
            role,
            dir,
            missing: pub_name,
        }),
    }
}

/// Loads the AK, creating and storing it first if this device has none yet.
pub fn load_or_create_ak(
    tpm: &Tpm,
    data_dir: &Path,
    alg: EkAlgorithm,
) -> Result<AkBlob, AttestationError> {
    load_or_create(tpm, data_dir, alg, KeyRole::Ak)
}

pub fn parse_nonce(hex: &str) -> Result<Vec<u8>, AttestationError> {
    let bad = || AttestationError::Nonce(hex.to_owned());
    let hex = hex.strip_prefix("0x").unwrap_or(hex);
    if hex.is_empty() || !hex.len().is_multiple_of(2) || hex.len() / 2 > cairn_tpm::MAX_NONCE_BYTES
    {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

/// `sha256:0,1,2`: the SHA-256 bank only (the bank cairn images extend).
pub fn parse_pcrs(spec: &str) -> Result<Vec<u8>, AttestationError> {
    let bad = || AttestationError::Pcrs(spec.to_owned());
    let list = spec.strip_prefix("sha256:").ok_or_else(bad)?;
    let mut pcrs: Vec<u8> = list
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u8>()
                .ok()
                .filter(|&i| i < 24)
                .ok_or_else(bad)
        })
        .collect::<Result<_, _>>()?;
    pcrs.sort_unstable();
    pcrs.dedup();
    Ok(pcrs)
}

/// Quotes with the device's AK and writes quote.msg, quote.sig, quote.pcrs and ak.pub into `out`.
pub fn quote_to_dir(
    tpm: &Tpm,
    data_dir: &Path,
    alg: EkAlgorithm,
    nonce: &[u8],
    pcrs: &[u8],
    out: &Path,
) -> Result<QuoteFiles, AttestationError> {
    let ak = load_or_create_ak(tpm, data_dir, alg)?;
    let q = tpm.quote(alg, &ak, nonce, pcrs)?;
    std::fs::create_dir_all(out).map_err(|source| AttestationError::Write {
        path: out.to_owned(),
        source,
    })?;
    for (name, bytes) in [
        ("quote.msg", &q.message),
        ("quote.sig", &q.signature),
        ("quote.pcrs", &q.pcrs),
        ("ak.pub", &q.ak_public),
    ] {
        let path = out.join(name);
        std::fs::write(&path, bytes).map_err(|source| AttestationError::Write { path, source })?;
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces() {
        assert_eq!(parse_nonce("0a0B").unwrap(), vec![10, 11]);
        assert_eq!(parse_nonce("0xff").unwrap(), vec![255]);
        for bad in ["", "abc", "zz", &"00".repeat(65)] {
            assert!(parse_nonce(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_nonce("zz").unwrap_err().to_string().contains("hex"));
    }

    #[test]
    fn pcr_selections() {
        assert_eq!(parse_pcrs("sha256:7,0,1,1").unwrap(), vec![0, 1, 7]);
        for bad in ["0,1", "sha1:0", "sha256:", "sha256:24", "sha256:a"] {
            let err = parse_pcrs(bad).unwrap_err().to_string();
            assert!(err.contains("sha256:0,1,2"), "{bad}: {err}");
        }
    }

    #[test]
    fn half_stored_ak_is_reported_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = key_dir(tmp.path(), EkAlgorithm::Rsa2048);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ak.pub"), b"x").unwrap();
        // The TCTI is never reached: the store is checked first.
        let tpm = Tpm::new("swtpm:host=127.0.0.1,port=1").unwrap();
        let err = load_or_create_ak(&tpm, tmp.path(), EkAlgorithm::Rsa2048)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ak.priv is missing"), "{err}");
    }
}
