//! The desired workload set on the device: verified against the fleet's signer key, refused when older
//! than the one in force, kept on disk (`<data>/workloads/desired.cose`) so workloads come back after a
//! reboot with no uplink, and its artifacts unpacked where units bind them from.

use cairn_proto::workload_set::{self, VerifiedRecipe, WorkloadSet};
use std::path::{Path, PathBuf};

/// A verified set, in start order.
#[derive(Debug, Clone)]
pub struct Desired {
    pub serial: u64,
    pub recipes: Vec<VerifiedRecipe>,
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("cannot read the workload signer key {path}; install the fleet's workload-signer.pub there (workloads.signer_key)")]
    KeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workload signer key {path} is not a PEM public key; install the fleet's workload-signer.pub there")]
    KeyPem { path: PathBuf },
    #[error("workload signer key {path} is not usable")]
    Key {
        path: PathBuf,
        #[source]
        source: workload_set::SetError,
    },
    #[error(transparent)]
    Set(#[from] workload_set::SetError),
    #[error("the workload set has serial {got}, not above the {have} in force: an old set replayed, or the fleet's serial went back; sign the set with a higher --serial")]
    Stale { got: u64, have: u64 },
    #[error("the workload set is for devices {devices:?}, not this one ({device})")]
    NotForUs {
        devices: Vec<String>,
        device: String,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the signer's point from a SubjectPublicKeyInfo PEM.
pub fn load_signer(path: &Path) -> Result<[u8; 65], DesiredError> {
    let pem = std::fs::read(path).map_err(|source| DesiredError::KeyRead {
        path: path.to_owned(),
        source,
    })?;
    let der = match rustls_pemfile::read_one(&mut pem.as_slice()) {
        Ok(Some(rustls_pemfile::Item::SubjectPublicKeyInfo(d))) => d.to_vec(),
        _ => {
            return Err(DesiredError::KeyPem {
                path: path.to_owned(),
            })
        }
    };
    workload_set::point_from_spki(&der).map_err(|source| DesiredError::Key {
        path: path.to_owned(),
        source,
    })
}

/// The set store under `<data>/workloads`.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    signer: [u8; 65],
}

impl Store {
    pub fn new(data_dir: &Path, signer: [u8; 65]) -> Self {
        Store {
            dir: data_dir.join("workloads"),
            signer,
        }
    }

    fn set_path(&self) -> PathBuf {
        self.dir.join("desired.cose")
    }

    pub fn artifacts_root(&self) -> PathBuf {
        self.dir.join("artifacts")
    }

    /// Where one recipe version's artifacts live (bound read-only into its unit).
    pub fn artifact_dir(&self, name: &str, digest: &str) -> PathBuf {
        self.artifacts_root()
            .join(name)
            .join(&digest[..16.min(digest.len())])
    }

    /// The set kept from before, verified again: a file changed on disk is refused like one from the wire.
    /// None when there is no kept set.
    pub fn load(&self) -> Result<Option<Desired>, DesiredError> {
        let bytes = match std::fs::read(self.set_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(DesiredError::KeyRead {
                    path: self.set_path(),
                    source,
                })
            }
        };
        let (set, recipes) = workload_set::verify(&bytes, &self.signer)?;
        self.unpack(&recipes)?;
        Ok(Some(Desired {
            serial: set.serial,
            recipes,
        }))
    }

    /// Checks a set from the fleet against the one in force (`have`), and keeps it when it is good.
    pub fn accept(
        &self,
        bytes: &[u8],
        device: &str,
        have: Option<u64>,
    ) -> Result<Desired, DesiredError> {
        let (set, recipes) = workload_set::verify(bytes, &self.signer)?;
        check_new(&set, device, have)?;
        self.unpack(&recipes)?;
        write_atomic(&self.set_path(), bytes)?;
        Ok(Desired {
            serial: set.serial,
            recipes,
        })
    }

    /// Writes each recipe version's artifacts, unless they are there intact (0755: the unit's dynamic user
    /// reads them).
    fn unpack(&self, recipes: &[VerifiedRecipe]) -> Result<(), DesiredError> {
        use std::os::unix::fs::PermissionsExt;
        for r in recipes {
            let dir = self.artifact_dir(&r.recipe.name, &r.digest);
            let done = dir.join(".complete");
            // An artifact changed or damaged on disk is written again from the verified set.
            if done.exists()
                && r.artifacts
                    .iter()
                    .all(|a| std::fs::read(dir.join(&a.name)).is_ok_and(|d| d == a.data))
            {
                continue;
            }
            let err = |path: &Path| {
                let path = path.to_owned();
                move |source| DesiredError::Write { path, source }
            };
            std::fs::create_dir_all(&dir).map_err(err(&dir))?;
            for p in [&self.dir, &self.artifacts_root(), &dir] {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
                    .map_err(err(p))?;
            }
            if let Some(parent) = dir.parent() {
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                    .map_err(err(parent))?;
            }
            for a in &r.artifacts {
                let path = dir.join(&a.name);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(err(parent))?;
                }
                write_atomic(&path, &a.data)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .map_err(err(&path))?;
            }
            write_atomic(&done, b"")?;
        }
        Ok(())
    }

    /// Removes artifact directories no recipe in `keep` (name, digest) uses.
    pub fn prune(&self, keep: &[(String, String)]) {
        let Ok(names) = std::fs::read_dir(self.artifacts_root()) else {
            return;
        };
        for n in names.flatten() {
            let name = n.file_name().to_string_lossy().into_owned();
            let Ok(versions) = std::fs::read_dir(n.path()) else {
                continue;
            };
            for v in versions.flatten() {
                let short = v.file_name().to_string_lossy().into_owned();
                if !keep
                    .iter()
                    .any(|(k, d)| *k == name && d.starts_with(&short))
                {
                    let _ = std::fs::remove_dir_all(v.path());
                }
            }
        }
    }
}

fn check_new(set: &WorkloadSet, device: &str, have: Option<u64>) -> Result<(), DesiredError> {
    if !workload_set::is_for(set, device) {
        return Err(DesiredError::NotForUs {
            devices: set.devices.clone(),
            device: device.to_owned(),
        });
    }
    if let Some(have) = have.filter(|&h| set.serial <= h) {
        return Err(DesiredError::Stale {
            got: set.serial,
            have,
        });
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DesiredError> {
    use std::io::Write;
    let err = |source| DesiredError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("part");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    // The rename is durable only once the directory is: without this a power cut can bring back the old set.
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cairn_proto::workload_set::{Artifact, SetRecipe};
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn key() -> EcdsaKeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
    }

    fn signed(k: &EcdsaKeyPair, serial: u64, devices: &[&str]) -> Vec<u8> {
        let data = b"#!/bin/sh\nexec sleep 100\n".to_vec();
        let set = WorkloadSet {
            serial,
            issued_at: 0,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            recipes: vec![SetRecipe {
                file: "a.toml".into(),
                toml: "name = \"a\"\nversion = \"1\"\n[run.command]\nargv = [\"a.sh\"]\nartifact = \"a.sh\"\n".into(),
                artifacts: vec![Artifact {
                    name: "a.sh".into(),
                    sha256: cairn_proto::fleet::to_hex(
                        ring::digest::digest(&ring::digest::SHA256, &data).as_ref(),
                    ),
                    data,
                }],
            }],
        };
        workload_set::sign(&set, k).unwrap()
    }

    #[test]
    fn a_good_set_is_kept_unpacked_and_reloaded_and_replays_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let point: [u8; 65] = k.public_key().as_ref().try_into().unwrap();
        let store = Store::new(dir.path(), point);
        assert!(store.load().unwrap().is_none());
        let d = store.accept(&signed(&k, 5, &[]), "dev", None).unwrap();
        assert_eq!(d.serial, 5);
        let art = store.artifact_dir("a", &d.recipes[0].digest).join("a.sh");
        let mode = std::fs::metadata(&art).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(store.load().unwrap().unwrap().serial, 5);

        for (bytes, want) in [
            (signed(&k, 5, &[]), "not above"),
            (signed(&k, 4, &[]), "not above"),
            (signed(&k, 9, &["other"]), "not this one"),
            (signed(&key(), 9, &[]), "not by the fleet's workload signer"),
        ] {
            let err = store.accept(&bytes, "dev", Some(5)).unwrap_err();
            assert!(crate::error_chain(&err).contains(want), "{want}: {err}");
        }
        // The kept set is still the good one.
        assert_eq!(store.load().unwrap().unwrap().serial, 5);
        assert!(store
            .accept(&signed(&k, 6, &["dev"]), "dev", Some(5))
            .is_ok());

        // An artifact altered on disk is written again from the verified set at load.
        std::fs::write(&art, b"#!/bin/sh\nexec evil\n").unwrap();
        let again = store.load().unwrap().unwrap();
        let want = &again.recipes[0].artifacts[0].data;
        assert_eq!(&std::fs::read(&art).unwrap(), want);

        // A kept file altered on disk is refused at load.
        let path = dir.path().join("workloads/desired.cose");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(5).position(|w| w == b"sleep").unwrap();
        bytes[at] = b'S';
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            store.load(),
            Err(DesiredError::Set(workload_set::SetError::BadSignature))
        ));

        store.prune(&[]);
        assert!(!art.exists());
    }

    #[test]
    fn the_signer_key_must_be_a_p256_public_key_pem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pub");
        assert!(matches!(
            load_signer(&path),
            Err(DesiredError::KeyRead { .. })
        ));
        std::fs::write(&path, "not pem").unwrap();
        assert!(matches!(
            load_signer(&path),
            Err(DesiredError::KeyPem { .. })
        ));
    }
}
