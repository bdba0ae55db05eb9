//! The fleet's side of workloads: the workload signer key, signing a set of recipes, and serving the set a
//! device should run. Sets live as files in `<state>/workloads/`: `<device-id>.cose` for one device,
//! `default.cose` for the rest, re-read on every request so an operator replaces a file to roll out.

use cairn_proto::fleet::to_hex;
use cairn_proto::workload_set::{self, Artifact, SetRecipe, WorkloadSet};
use ring::digest::{digest, SHA256};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::path::{Path, PathBuf};

/// Under the fleet's state directory.
pub const DIR: &str = "workloads";
pub const DEFAULT_SET: &str = "default.cose";
pub const KEY_FILE: &str = "workload-signer.key";
pub const PUBLIC_FILE: &str = "workload-signer.pub";

#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; remove it to make a new signer (every device must then be given the new public key)")]
    Exists { path: PathBuf },
    #[error("{path} is not a PKCS#8 P-256 private key ({reason}); give the file `workloads keygen` wrote")]
    Key { path: PathBuf, reason: String },
    #[error("artifact {name} of {recipe} cannot be read")]
    Artifact {
        recipe: PathBuf,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Recipe(#[from] cairn_proto::recipe::RecipeError),
    #[error(transparent)]
    Set(#[from] workload_set::SetError),
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WorkloadsError> {
    cairn_proto::atomic_file::write(path, bytes, mode).map_err(|source| WorkloadsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Makes the workload signer: `dir/workload-signer.key` (PKCS#8 PEM, 0600, stays with the fleet) and
/// `dir/workload-signer.pub` (SubjectPublicKeyInfo PEM, given to every device as `workloads.signer_key`).
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf), WorkloadsError> {
    let key_path = dir.join(KEY_FILE);
    let pub_path = dir.join(PUBLIC_FILE);
    if key_path.exists() {
        return Err(WorkloadsError::Exists { path: key_path });
    }
    std::fs::create_dir_all(dir).map_err(|source| WorkloadsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
        WorkloadsError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        }
    })?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&pub_path, key.public_key_pem().as_bytes(), 0o644)?;
    Ok((key_path, pub_path))
}

/// Loads the signer key `workloads keygen` wrote.
pub fn load_key(path: &Path) -> Result<EcdsaKeyPair, WorkloadsError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| WorkloadsError::Key {
        path: path.to_owned(),
        reason,
    };
    let der = rcgen::KeyPair::from_pem(&text)
        .map_err(|e| bad(e.to_string()))?
        .serialize_der();
    EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &der,
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| bad(e.to_string()))
}

/// Reads recipe files (and the artifacts they name, beside them) into a set, checked as a device will.
pub fn build_set(
    recipes: &[PathBuf],
    serial: u64,
    devices: Vec<String>,
    issued_at: u64,
) -> Result<WorkloadSet, WorkloadsError> {
    let mut out = Vec::with_capacity(recipes.len());
    for path in recipes {
        let recipe = cairn_proto::recipe::load(path)?;
        let toml = std::fs::read_to_string(path).map_err(|source| WorkloadsError::Read {
            path: path.clone(),
            source,
        })?;
        let mut artifacts = Vec::new();
        if let cairn_proto::recipe::Run::Command {
            artifact: Some(name),
            ..
        } = &recipe.run
        {
            let file = path.parent().unwrap_or(Path::new(".")).join(name);
            let data = std::fs::read(&file).map_err(|source| WorkloadsError::Artifact {
                recipe: path.clone(),
                name: name.clone(),
                source,
            })?;
            artifacts.push(Artifact {
                name: name.clone(),
                sha256: to_hex(digest(&SHA256, &data).as_ref()),
                data,
            });
        }
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        out.push(SetRecipe {
            file,
            toml,
            artifacts,
        });
    }
    let set = WorkloadSet {
        serial,
        issued_at,
        devices,
        recipes: out,
    };
    workload_set::check(&set)?;
    Ok(set)
}

/// Signs `set` with the key at `key` and writes it to `out`.
pub fn sign_to(set: &WorkloadSet, key: &Path, out: &Path) -> Result<usize, WorkloadsError> {
    let bytes = workload_set::sign(set, &load_key(key)?)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| WorkloadsError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    write_file(out, &bytes, 0o644)?;
    Ok(bytes.len())
}

/// The set for `device` (its own file, else the default) and its ETag, or `None` when there is neither.
pub fn current_set(dir: &Path, device: &str) -> Result<Option<(Vec<u8>, String)>, WorkloadsError> {
    for name in [format!("{device}.cose"), DEFAULT_SET.to_owned()] {
        let path = dir.join(&name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let tag = format!("\"{}\"", to_hex(&digest(&SHA256, &bytes).as_ref()[..16]));
                return Ok(Some((bytes, tag)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(WorkloadsError::Read { path, source }),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keygen_sign_and_serve_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = keygen(dir.path()).unwrap();
        assert!(matches!(
            keygen(dir.path()),
            Err(WorkloadsError::Exists { .. })
        ));
        let pem = std::fs::read(&public).unwrap();
        let der = match rustls_pemfile::read_one(&mut pem.as_slice())
            .unwrap()
            .unwrap()
        {
            rustls_pemfile::Item::SubjectPublicKeyInfo(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        let point = workload_set::point_from_spki(&der).unwrap();

        let recipes = dir.path().join("r");
        std::fs::create_dir(&recipes).unwrap();
        std::fs::write(
            recipes.join("a.toml"),
            "name = \"a\"\nversion = \"1\"\n[run.command]\nargv = [\"a.sh\"]\nartifact = \"a.sh\"\n",
        )
        .unwrap();
        std::fs::write(recipes.join("a.sh"), "#!/bin/sh\n").unwrap();
        let set = build_set(&[recipes.join("a.toml")], 3, vec![], 1).unwrap();
        let sets = dir.path().join(DIR);
        assert!(current_set(&sets, "dev").unwrap().is_none());
        sign_to(&set, &key, &sets.join(DEFAULT_SET)).unwrap();
        let (bytes, tag) = current_set(&sets, "dev").unwrap().unwrap();
        let (back, recipes_back) = workload_set::verify(&bytes, &point).unwrap();
        assert_eq!((back.serial, recipes_back.len()), (3, 1));
        // A device's own file wins over the default.
        std::fs::write(sets.join("dev.cose"), b"x").unwrap();
        let (own, own_tag) = current_set(&sets, "dev").unwrap().unwrap();
        assert_eq!(own, b"x");
        assert_ne!(own_tag, tag);

        // A recipe that fails its checks is never signed.
        std::fs::write(recipes.join("a.toml"), "name = \"a\"\n").unwrap();
        let err = build_set(&[recipes.join("a.toml")], 4, vec![], 1).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }
}
