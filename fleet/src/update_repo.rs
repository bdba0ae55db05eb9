//! The OTA update channel: a TUF repository (tough) built from image build outputs.
//!
//! Layout of a repository directory:
//! - `root.json`: the trust anchor, baked into every image (`image/build.sh --update-root`);
//! - `metadata/`: `N.root.json`, `timestamp.json`, `N.snapshot.json`, `N.targets.json` (consistent snapshots);
//! - `targets/`: `<sha>.release-cairn-<version>.json` and `<sha>.chunk-<chunk-sha>.zst`.
//!
//! `cairn-fleet serve` serves `<state>/update/` under `/v1/update/`; any static HTTP server will do as well.
//! One Ed25519 key signs all four roles: a fleet that wants an offline root key splits them with tuftool.

use cairn_proto::update::{
    self, ImageVersion, Piece, Release, CHUNK_BYTES, MAX_WAVE, RELEASE_SCHEMA,
};
use chrono::{Duration, Utc};
use ring::digest::{Context, SHA256};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use tough::editor::signed::{PathExists, SignedRole};
use tough::editor::RepositoryEditor;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Target};
use tough::{ExpirationEnforcement, RepositoryLoader, TargetName};

pub const KEY_FILE: &str = "update-signer.key";
/// Under the fleet's state directory: `cairn-fleet serve` serves it under `/v1/update/`.
pub const DIR: &str = "update";
const SPEC_VERSION: &str = "1.0.0";
/// Chunks are zstd at this level: the root is erofs (lz4hc) and the kernel and initrd are compressed already,
/// so a higher level costs publishing time for little.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum UpdateRepoError {
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
    #[error("{path} already exists; remove it to make a new signer (every image must then carry the new root.json)")]
    Exists { path: PathBuf },
    #[error("{path} is not an Ed25519 PKCS#8 key; give the file `update keygen` wrote")]
    Key { path: PathBuf },
    #[error("{path} is not an image manifest from image/build.sh: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("{path} does not match its image manifest ({what}); rebuild the image")]
    Mismatch { path: PathBuf, what: String },
    #[error("version {version} is already published; publish a new version, or --max-wave to widen its rollout")]
    Published { version: ImageVersion },
    #[error("nothing is published in {repo} yet, so there is nothing to refresh; publish an image first")]
    Empty { repo: PathBuf },
    #[error("the TUF repository in {repo}: {reason}")]
    Tuf { repo: PathBuf, reason: String },
    #[error(transparent)]
    Release(#[from] update::ReleaseError),
}

fn tuf<E: std::fmt::Display>(repo: &Path) -> impl Fn(E) -> UpdateRepoError + '_ {
    move |e| UpdateRepoError::Tuf {
        repo: repo.to_owned(),
        reason: e.to_string(),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), UpdateRepoError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| UpdateRepoError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)
}

/// Makes the update signer, `dir/update-signer.key` (Ed25519 PKCS#8, 0600): it stays with the fleet.
pub fn keygen(dir: &Path) -> Result<PathBuf, UpdateRepoError> {
    let path = dir.join(KEY_FILE);
    if path.exists() {
        return Err(UpdateRepoError::Exists { path });
    }
    std::fs::create_dir_all(dir).map_err(|source| UpdateRepoError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| UpdateRepoError::Key { path: path.clone() })?;
    write_private(&path, pkcs8.as_ref())?;
    Ok(path)
}

/// Makes the repository's root.json (what images are built with) if it does not exist yet; publishing
/// does this too. Returns its path and whether it was made now.
pub async fn init(repo: &Path, key: &Path) -> Result<(PathBuf, bool), UpdateRepoError> {
    let keys = keys(key)?;
    let path = root_path(repo);
    if path.exists() {
        return Ok((path, false));
    }
    std::fs::create_dir_all(repo).map_err(|source| UpdateRepoError::Write {
        path: repo.to_owned(),
        source,
    })?;
    init_root(repo, key, &keys).await?;
    Ok((path, true))
}

/// What `publish` is asked to do.
#[derive(Debug, Clone)]
pub struct Publish {
    pub repo: PathBuf,
    pub key: PathBuf,
    /// `cairn-<version>.json` from `image/build.sh`; its pieces are read from beside it.
    pub image: PathBuf,
    pub max_wave: u32,
    pub allow_downgrade: bool,
    /// How long the timestamp stays valid: devices refuse an expired one, so re-publish (or `refresh`) before.
    pub timestamp_days: i64,
    /// Releases kept in the repository (newest first); older ones and their unshared chunks are removed.
    pub keep: usize,
}

/// What `publish` did, for the operator and the bench.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    pub version: ImageVersion,
    pub chunks: usize,
    pub new_chunks: usize,
    /// Compressed bytes of the chunks this version added (what a device without any of them would fetch
    /// beyond the chunks shared with older versions).
    pub new_chunk_bytes: u64,
    pub targets_version: u64,
    pub removed_versions: Vec<ImageVersion>,
}

/// The trust anchor devices are built with.
pub fn root_path(repo: &Path) -> PathBuf {
    repo.join("root.json")
}

fn keys(key: &Path) -> Result<Vec<Box<dyn KeySource>>, UpdateRepoError> {
    let bytes = std::fs::read(key).map_err(|source| UpdateRepoError::Read {
        path: key.to_owned(),
        source,
    })?;
    Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| UpdateRepoError::Key {
        path: key.to_owned(),
    })?;
    Ok(vec![Box::new(LocalKeySource {
        path: key.to_owned(),
    })])
}

async fn init_root(
    repo: &Path,
    key: &Path,
    keys: &[Box<dyn KeySource>],
) -> Result<(), UpdateRepoError> {
    let bytes = std::fs::read(key).map_err(|source| UpdateRepoError::Read {
        path: key.to_owned(),
        source,
    })?;
    let sign = tough::sign::parse_keypair(&bytes).map_err(|_| UpdateRepoError::Key {
        path: key.to_owned(),
    })?;
    use tough::sign::Sign;
    let tuf_key = sign.tuf_key();
    let key_id = tuf_key.key_id().map_err(tuf(repo))?;
    let role = || RoleKeys {
        keyids: vec![key_id.clone()],
        threshold: NonZeroU64::MIN,
        _extra: HashMap::new(),
    };
    let root = Root {
        spec_version: SPEC_VERSION.into(),
        consistent_snapshot: true,
        version: NonZeroU64::MIN,
        // The root outlives every image that carries it; rotating it is a new root.json signed by the old.
        expires: Utc::now() + Duration::days(3650),
        keys: HashMap::from([(key_id.clone(), tuf_key)]),
        roles: [
            RoleType::Root,
            RoleType::Snapshot,
            RoleType::Targets,
            RoleType::Timestamp,
        ]
        .into_iter()
        .map(|r| (r, role()))
        .collect(),
        _extra: HashMap::new(),
    };
    let signed = SignedRole::new(
        root.clone(),
        &KeyHolder::Root(root),
        keys,
        &SystemRandom::new(),
    )
    .await
    .map_err(tuf(repo))?;
    let meta = repo.join("metadata");
    std::fs::create_dir_all(&meta).map_err(|source| UpdateRepoError::Write {
        path: meta.clone(),
        source,
    })?;
    signed.write(&meta, true).await.map_err(tuf(repo))?;
    let path = root_path(repo);
    std::fs::write(&path, signed.buffer()).map_err(|source| UpdateRepoError::Write { path, source })
}

fn file_url(path: &Path) -> Result<url::Url, UpdateRepoError> {
    url::Url::from_directory_path(path).map_err(|()| UpdateRepoError::Tuf {
        repo: path.to_owned(),
        reason: "the path is not absolute".into(),
    })
}

/// The image manifest `image/build.sh` writes (only the fields publishing needs).
#[derive(serde::Deserialize)]
struct ImageManifest {
    version: ImageVersion,
    kernel: String,
    roothash: String,
    root: Sized,
    verity: Sized,
    kernel_sha256: String,
    initrd_sha256: String,
}

#[derive(serde::Deserialize)]
struct Sized {
    bytes: u64,
    sha256: String,
}

/// Splits one file into chunks, compressing each new one into `staging`.
fn chunk_file(
    path: &Path,
    expected_sha: &str,
    expected_bytes: Option<u64>,
    staging: &Path,
    known: &BTreeSet<String>,
    new: &mut BTreeMap<String, PathBuf>,
) -> Result<Piece, UpdateRepoError> {
    let read_err = |source| UpdateRepoError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read_err)?;
    let mut whole = Context::new(&SHA256);
    let mut chunks = Vec::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    loop {
        let n = read_full(&mut f, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        whole.update(data);
        bytes += n as u64;
        let sha = cairn_proto::fleet::to_hex(ring::digest::digest(&SHA256, data).as_ref());
        let name = update::chunk_target(&sha);
        if !known.contains(&name) && !new.contains_key(&name) {
            let out = staging.join(format!("{sha}.zst"));
            let z = zstd::bulk::compress(data, ZSTD_LEVEL).map_err(|source| {
                UpdateRepoError::Write {
                    path: out.clone(),
                    source,
                }
            })?;
            std::fs::write(&out, z).map_err(|source| UpdateRepoError::Write {
                path: out.clone(),
                source,
            })?;
            new.insert(name, out);
        }
        chunks.push(sha);
        if n < buf.len() {
            break;
        }
    }
    let sha256 = cairn_proto::fleet::to_hex(whole.finish().as_ref());
    if sha256 != expected_sha {
        return Err(UpdateRepoError::Mismatch {
            path: path.to_owned(),
            what: format!("SHA-256 {sha256}, manifest says {expected_sha}"),
        });
    }
    if let Some(expected) = expected_bytes.filter(|e| *e != bytes) {
        return Err(UpdateRepoError::Mismatch {
            path: path.to_owned(),
            what: format!("{bytes} bytes, manifest says {expected}"),
        });
    }
    Ok(Piece {
        bytes,
        sha256,
        chunks,
    })
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The repository as it stands, or None before the first publish; expired metadata is loaded too, since the
/// signer re-signs an expired repository (only devices must refuse one).
async fn load_signed(repo: &Path) -> Result<Option<tough::Repository>, UpdateRepoError> {
    let meta = repo.join("metadata");
    if !meta.join("timestamp.json").exists() {
        return Ok(None);
    }
    let root = std::fs::read(root_path(repo)).map_err(|source| UpdateRepoError::Read {
        path: root_path(repo),
        source,
    })?;
    let loaded = RepositoryLoader::new(&root, file_url(&meta)?, file_url(&repo.join("targets"))?)
        .expiration_enforcement(ExpirationEnforcement::Unsafe)
        .load()
        .await
        .map_err(tuf(repo))?;
    Ok(Some(loaded))
}

/// (targets, snapshot, timestamp) versions of a loaded repository.
fn role_versions(loaded: &tough::Repository) -> (u64, u64, u64) {
    (
        loaded.targets().signed.version.get(),
        loaded.snapshot().signed.version.get(),
        loaded.timestamp().signed.version.get(),
    )
}

/// Sets the next version of every role and their expiry (targets and snapshot a year, the timestamp
/// `timestamp_expires`), then signs; returns the signed repository and the new targets and timestamp versions.
async fn sign_next(
    repo: &Path,
    mut editor: RepositoryEditor,
    versions: (u64, u64, u64),
    timestamp_expires: chrono::DateTime<Utc>,
    keys: &[Box<dyn KeySource>],
) -> Result<(tough::editor::signed::SignedRepository, u64, u64), UpdateRepoError> {
    let next = |v: u64| NonZeroU64::new(v + 1).unwrap_or(NonZeroU64::MIN);
    let now = Utc::now();
    editor
        .targets_version(next(versions.0))
        .map_err(tuf(repo))?
        .targets_expires(now + Duration::days(365))
        .map_err(tuf(repo))?
        .snapshot_version(next(versions.1))
        .snapshot_expires(now + Duration::days(365))
        .timestamp_version(next(versions.2))
        .timestamp_expires(timestamp_expires);
    let signed = editor.sign(keys).await.map_err(tuf(repo))?;
    Ok((signed, next(versions.0).get(), next(versions.2).get()))
}

/// Builds the release of one image and signs a new repository version with it.
pub async fn publish(p: &Publish) -> Result<Published, UpdateRepoError> {
    let repo = p.repo.as_path();
    if p.max_wave > MAX_WAVE {
        return Err(update::ReleaseError::Wave(p.max_wave).into());
    }
    let image_bytes = std::fs::read(&p.image).map_err(|source| UpdateRepoError::Read {
        path: p.image.clone(),
        source,
    })?;
    let image: ImageManifest =
        serde_json::from_slice(&image_bytes).map_err(|e| UpdateRepoError::Image {
            path: p.image.clone(),
            reason: e.to_string(),
        })?;
    let name = p
        .image
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".json")
        .ok_or_else(|| UpdateRepoError::Image {
            path: p.image.clone(),
            reason: "the name does not end in .json".into(),
        })?;
    let beside = |ext: &str| p.image.with_file_name(format!("{stem}.{ext}"));

    let keys = keys(&p.key)?;
    std::fs::create_dir_all(repo).map_err(|source| UpdateRepoError::Write {
        path: repo.to_owned(),
        source,
    })?;
    if !root_path(repo).exists() {
        init_root(repo, &p.key, &keys).await?;
    }
    let meta = repo.join("metadata");
    let targets_dir = repo.join("targets");
    std::fs::create_dir_all(&targets_dir).map_err(|source| UpdateRepoError::Write {
        path: targets_dir.clone(),
        source,
    })?;

    // The repository as it stands: its targets, and every release in it.
    let mut releases: BTreeMap<ImageVersion, Release> = BTreeMap::new();
    let mut known = BTreeSet::new();
    let mut versions = (0u64, 0u64, 0u64);
    let existing = if let Some(loaded) = load_signed(repo).await? {
        versions = role_versions(&loaded);
        for (name, _) in loaded.all_targets() {
            known.insert(name.raw().to_string());
            if let Some(v) = update::release_target_version(name.raw()) {
                let bytes = read_target(&loaded, name).await.map_err(tuf(repo))?;
                releases.insert(v, Release::from_json(&bytes)?);
            }
        }
        Some(loaded)
    } else {
        None
    };

    // The new release, or a wider rollout of one already published.
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(repo)
        .map_err(|source| UpdateRepoError::Write {
            path: repo.to_owned(),
            source,
        })?;
    let mut new_chunks = BTreeMap::new();
    let release = match releases.get(&image.version) {
        Some(r) if r.max_wave == p.max_wave && r.allow_downgrade == p.allow_downgrade => {
            return Err(UpdateRepoError::Published {
                version: image.version,
            })
        }
        Some(r) => Release {
            max_wave: p.max_wave,
            allow_downgrade: p.allow_downgrade,
            ..r.clone()
        },
        None => {
            let mut piece = |ext: &str, sha: &str, bytes: Option<u64>| {
                chunk_file(
                    &beside(ext),
                    sha,
                    bytes,
                    staging.path(),
                    &known,
                    &mut new_chunks,
                )
            };
            let release = Release {
                schema: RELEASE_SCHEMA,
                version: image.version,
                roothash: image.roothash.clone(),
                kernel: image.kernel.clone(),
                root: piece("root.erofs", &image.root.sha256, Some(image.root.bytes))?,
                verity: piece(
                    "root.verity",
                    &image.verity.sha256,
                    Some(image.verity.bytes),
                )?,
                vmlinuz: piece("vmlinuz", &image.kernel_sha256, None)?,
                initrd: piece("initrd", &image.initrd_sha256, None)?,
                max_wave: p.max_wave,
                allow_downgrade: p.allow_downgrade,
            };
            // Round-trip through the parser devices use, so a manifest they would refuse is never published.
            Release::from_json(&serde_json::to_vec(&release).unwrap_or_default())?
        }
    };
    let chunk_count = release
        .pieces()
        .iter()
        .map(|(_, piece)| piece.chunks.len())
        .sum();
    releases.insert(release.version, release.clone());

    // Keep the newest `keep` releases; drop the rest and the chunks only they used.
    let keep = p.keep.max(1);
    let removed: Vec<ImageVersion> = releases.keys().rev().skip(keep).copied().collect();
    for v in &removed {
        releases.remove(v);
    }
    let wanted: BTreeSet<String> = releases
        .values()
        .flat_map(|r| {
            r.pieces()
                .into_iter()
                .flat_map(|(_, piece)| piece.chunks.iter().map(|c| update::chunk_target(c)))
                .collect::<Vec<_>>()
        })
        .chain(releases.keys().map(update::release_target))
        .collect();

    let mut editor = match existing {
        Some(loaded) => RepositoryEditor::from_repo(root_path(repo), loaded)
            .await
            .map_err(tuf(repo))?,
        None => RepositoryEditor::new(root_path(repo))
            .await
            .map_err(tuf(repo))?,
    };
    for name in known.iter().filter(|n| !wanted.contains(*n)) {
        editor
            .remove_target(&TargetName::new(name.as_str()).map_err(tuf(repo))?)
            .map_err(tuf(repo))?;
    }
    let release_file = staging.path().join("release.json");
    let release_json = serde_json::to_vec_pretty(&release).unwrap_or_default();
    std::fs::write(&release_file, &release_json).map_err(|source| UpdateRepoError::Write {
        path: release_file.clone(),
        source,
    })?;
    let mut files = vec![(update::release_target(&release.version), release_file)];
    files.extend(new_chunks.iter().map(|(n, path)| (n.clone(), path.clone())));
    let mut new_chunk_bytes = 0;
    for (name, path) in &files {
        let target = Target::from_path(path).await.map_err(tuf(repo))?;
        if name.starts_with("chunk-") {
            new_chunk_bytes += target.length;
        }
        editor
            .add_target(TargetName::new(name.as_str()).map_err(tuf(repo))?, target)
            .map_err(tuf(repo))?;
    }
    let expires = Utc::now() + Duration::days(p.timestamp_days.max(1));
    let (signed, targets_version, _) = sign_next(repo, editor, versions, expires, &keys).await?;
    // Targets first, metadata last: a device reading mid-publish sees the old version, whole.
    for (name, path) in &files {
        let name = TargetName::new(name.as_str()).map_err(tuf(repo))?;
        signed
            .copy_target(path, &targets_dir, PathExists::Skip, Some(&name))
            .await
            .map_err(tuf(repo))?;
    }
    signed.write(&meta).await.map_err(tuf(repo))?;
    prune(&targets_dir, &wanted)?;
    Ok(Published {
        version: release.version,
        chunks: chunk_count,
        new_chunks: new_chunks.len(),
        new_chunk_bytes,
        targets_version,
        removed_versions: removed,
    })
}

/// Signs the repository again as it stands, with a timestamp valid until `timestamp_expires`: devices take no
/// update from an expired timestamp, so a fleet that publishes nothing for a while refreshes it before then.
/// Returns the new timestamp version.
pub async fn refresh(
    repo: &Path,
    key: &Path,
    timestamp_expires: std::time::SystemTime,
) -> Result<u64, UpdateRepoError> {
    let keys = keys(key)?;
    let Some(loaded) = load_signed(repo).await? else {
        return Err(UpdateRepoError::Empty {
            repo: repo.to_owned(),
        });
    };
    let versions = role_versions(&loaded);
    let editor = RepositoryEditor::from_repo(root_path(repo), loaded)
        .await
        .map_err(tuf(repo))?;
    let expires = chrono::DateTime::<Utc>::from(timestamp_expires);
    let (signed, _, timestamp_version) = sign_next(repo, editor, versions, expires, &keys).await?;
    signed
        .write(repo.join("metadata"))
        .await
        .map_err(tuf(repo))?;
    Ok(timestamp_version)
}

async fn read_target(
    repo: &tough::Repository,
    name: &TargetName,
) -> Result<Vec<u8>, tough::error::Error> {
    use tough::IntoVec;
    match repo.read_target(name).await? {
        Some(stream) => stream.into_vec().await,
        None => Ok(Vec::new()),
    }
}

/// Deletes target files no longer listed (consistent-snapshot names: `<sha>.<name>`).
fn prune(targets_dir: &Path, wanted: &BTreeSet<String>) -> Result<(), UpdateRepoError> {
    let Ok(entries) = std::fs::read_dir(targets_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let Some((_, name)) = file.split_once('.') else {
            continue;
        };
        if !wanted.contains(name) {
            let path = entry.path();
            std::fs::remove_file(&path)
                .map_err(|source| UpdateRepoError::Write { path, source })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_lists_a_files_chunks_and_refuses_a_wrong_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(2 * CHUNK_BYTES + 7))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let sha = cairn_proto::fleet::to_hex(ring::digest::digest(&SHA256, &data).as_ref());
        let mut new = BTreeMap::new();
        let piece = chunk_file(
            &path,
            &sha,
            Some(data.len() as u64),
            dir.path(),
            &BTreeSet::new(),
            &mut new,
        )
        .unwrap();
        assert_eq!(piece.chunks.len(), 3);
        assert_eq!(new.len(), 3);
        let last = zstd::bulk::decompress(
            &std::fs::read(&new[&update::chunk_target(&piece.chunks[2])]).unwrap(),
            1 << 21,
        )
        .unwrap();
        assert_eq!(last, &data[2 * CHUNK_BYTES as usize..]);
        let err = chunk_file(
            &path,
            &"0".repeat(64),
            None,
            dir.path(),
            &BTreeSet::new(),
            &mut BTreeMap::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("does not match its image manifest"),
            "{err}"
        );
        let err = chunk_file(
            &path,
            &sha,
            Some(3),
            dir.path(),
            &BTreeSet::new(),
            &mut BTreeMap::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("manifest says 3"), "{err}");
    }
}
