//! The update channel's release manifest: one signed TUF target per image version.
//!
//! A release names its four pieces (root filesystem, its verity tree, kernel, initrd) as lists of fixed-size
//! chunks by SHA-256. Each chunk is its own TUF target, zstd-compressed, named by the hash of its plain bytes,
//! so a device fetches only the chunks it does not already hold (in its running slot or, after a power cut, in
//! the half-written one), and a chunk shared by two versions is stored once.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// Where the fleet serves its update repository: `<UPDATE_PATH>metadata/…` and `<UPDATE_PATH>targets/…`.
pub const UPDATE_PATH: &str = "/v1/update/";
/// Plain bytes per chunk (the last chunk of a piece may be shorter).
pub const CHUNK_BYTES: u64 = 1 << 20;
/// The manifest layout this code reads and writes.
pub const RELEASE_SCHEMA: u32 = 1;
/// Waves run 0..=MAX_WAVE; a release with `max_wave = MAX_WAVE` is for every device.
pub const MAX_WAVE: u32 = 9;

// Target names are flat: with consistent snapshots tough prefixes the whole name with its hash.

/// `release-cairn-<version>.json`, the TUF target holding a [`Release`].
pub fn release_target(version: &ImageVersion) -> String {
    format!("release-cairn-{version}.json")
}

/// The version a release target name is for, if the name is one.
pub fn release_target_version(name: &str) -> Option<ImageVersion> {
    name.strip_prefix("release-cairn-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// `chunk-<sha256>.zst`, the TUF target holding one compressed chunk.
pub fn chunk_target(sha256: &str) -> String {
    format!("chunk-{sha256}.zst")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub schema: u32,
    pub version: ImageVersion,
    /// The dm-verity root hash of `root`, written into the boot entry.
    pub roothash: String,
    /// The kernel release (`uname -r`) the image boots.
    pub kernel: String,
    pub root: Piece,
    pub verity: Piece,
    pub vmlinuz: Piece,
    pub initrd: Piece,
    /// Devices whose `update.wave` is at most this take the release; publishing again with a higher value
    /// widens the rollout.
    pub max_wave: u32,
    /// Signed permission to install this version over a newer one. Without it a device refuses a lower version.
    pub allow_downgrade: bool,
}

/// One file of a release as a list of chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Piece {
    pub bytes: u64,
    /// SHA-256 of the whole file, checked once more after it is written.
    pub sha256: String,
    /// SHA-256 of each chunk's plain bytes, in order.
    pub chunks: Vec<String>,
}

impl Piece {
    /// The plain length of chunk `index`.
    pub fn chunk_len(&self, index: usize) -> u64 {
        let start = index as u64 * CHUNK_BYTES;
        self.bytes.saturating_sub(start).min(CHUNK_BYTES)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("the release manifest is not valid JSON for schema {RELEASE_SCHEMA}: {0}")]
    Json(#[from] serde_path_to_error::Error<serde_json::Error>),
    #[error("the release manifest has schema {found}; this agent reads schema {RELEASE_SCHEMA}: update the agent first")]
    Schema { found: u32 },
    #[error("the release manifest's {field} is not 64 lowercase hex digits")]
    Hash { field: String },
    #[error("the release manifest's {piece} has {found} chunks for {bytes} bytes; {expected} were expected")]
    ChunkCount {
        piece: &'static str,
        bytes: u64,
        found: usize,
        expected: u64,
    },
    #[error("the release manifest's max_wave is {0}; waves run 0 to {MAX_WAVE}")]
    Wave(u32),
    #[error("the release manifest's kernel {0:?} is not a plain kernel release name")]
    Kernel(String),
}

impl Release {
    /// Parses and checks a manifest: every hash well-formed, chunk counts matching the sizes.
    pub fn from_json(bytes: &[u8]) -> Result<Release, ReleaseError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let release: Release = serde_path_to_error::deserialize(de)?;
        release.check()?;
        Ok(release)
    }

    pub fn pieces(&self) -> [(&'static str, &Piece); 4] {
        [
            ("root", &self.root),
            ("verity", &self.verity),
            ("vmlinuz", &self.vmlinuz),
            ("initrd", &self.initrd),
        ]
    }

    fn check(&self) -> Result<(), ReleaseError> {
        if self.schema != RELEASE_SCHEMA {
            return Err(ReleaseError::Schema { found: self.schema });
        }
        if self.max_wave > MAX_WAVE {
            return Err(ReleaseError::Wave(self.max_wave));
        }
        check_hash("roothash", &self.roothash)?;
        let plain = |c: char| c.is_ascii_alphanumeric() || "._-+".contains(c);
        if self.kernel.is_empty() || !self.kernel.chars().all(plain) {
            return Err(ReleaseError::Kernel(self.kernel.clone()));
        }
        for (name, piece) in self.pieces() {
            check_hash(&format!("{name}.sha256"), &piece.sha256)?;
            let expected = piece.bytes.div_ceil(CHUNK_BYTES);
            if piece.chunks.len() as u64 != expected {
                return Err(ReleaseError::ChunkCount {
                    piece: name,
                    bytes: piece.bytes,
                    found: piece.chunks.len(),
                    expected,
                });
            }
            for (i, chunk) in piece.chunks.iter().enumerate() {
                check_hash(&format!("{name}.chunks[{i}]"), chunk)?;
            }
        }
        Ok(())
    }
}

fn check_hash(field: &str, value: &str) -> Result<(), ReleaseError> {
    if value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ReleaseError::Hash {
            field: field.to_string(),
        })
    }
}

/// An image version, `MAJOR.MINOR.PATCH`, ordered numerically (1.10.0 is newer than 1.9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ImageVersion(pub u32, pub u32, pub u32);

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an image version: expected MAJOR.MINOR.PATCH, e.g. 1.4.0")]
pub struct VersionError(String);

impl FromStr for ImageVersion {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError(s.to_string());
        let mut parts = s.split('.');
        let mut next = || -> Result<u32, VersionError> {
            let p = parts.next().ok_or_else(bad)?;
            // No signs, no leading zeros: one spelling per version, so names in the repository are unique.
            if p.is_empty()
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let v = ImageVersion(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl fmt::Display for ImageVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Serialize for ImageVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where an update stands, as `cairnctl update status` shows it and the agent keeps it on disk (so a power
/// cut in the middle of writing resumes, and the outcome of a trial boot is known after it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateStatus {
    /// The version and slot this boot runs.
    pub running: Option<ImageVersion>,
    pub slot: String,
    pub phase: UpdatePhase,
    /// The version being written, staged or tried, and its slot.
    pub target: Option<ImageVersion>,
    pub target_slot: Option<String>,
    pub chunks_done: u64,
    pub chunks_total: u64,
    /// Chunks copied from what the device already holds, and chunks (and compressed bytes) downloaded.
    pub chunks_local: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub last_check_unix: Option<u64>,
    /// Why the last check or write did not finish (the next check retries).
    pub last_error: Option<String>,
    /// Versions tried and fallen back from: never offered again.
    pub failed: Vec<ImageVersion>,
    pub last_outcome: Option<UpdateOutcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePhase {
    /// Nothing to do, or no update channel.
    #[default]
    Idle,
    /// Writing the inactive slot (resumed after a restart).
    Writing,
    /// Written and checked, its boot entry in place; waiting for the maintenance window to reboot.
    Staged,
    /// Rebooted into the new slot, whose boot the health gate has not blessed yet.
    Trying,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateOutcome {
    pub version: ImageVersion,
    pub succeeded: bool,
    pub message: String,
    pub at_unix: u64,
}

/// Compares versions the way an update decides: only a newer version is an upgrade.
pub fn is_upgrade(running: &ImageVersion, offered: &ImageVersion) -> bool {
    offered.cmp(running) == Ordering::Greater
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(bytes: u64) -> Piece {
        let n = bytes.div_ceil(CHUNK_BYTES) as usize;
        Piece {
            bytes,
            sha256: "a".repeat(64),
            chunks: vec!["b".repeat(64); n],
        }
    }

    fn release() -> Release {
        Release {
            schema: RELEASE_SCHEMA,
            version: "1.2.3".parse().unwrap(),
            roothash: "c".repeat(64),
            kernel: "6.1.0-57-cloud-amd64".into(),
            root: piece(3 * CHUNK_BYTES + 5),
            verity: piece(CHUNK_BYTES),
            vmlinuz: piece(10),
            initrd: piece(0),
            max_wave: MAX_WAVE,
            allow_downgrade: false,
        }
    }

    #[test]
    fn versions_order_numerically_and_have_one_spelling() {
        let v = |s: &str| s.parse::<ImageVersion>().unwrap();
        assert!(v("1.10.0") > v("1.9.0"));
        assert!(is_upgrade(&v("1.0.0"), &v("1.0.1")));
        assert!(!is_upgrade(&v("2.0.0"), &v("2.0.0")));
        assert!(!is_upgrade(&v("2.0.0"), &v("1.99.99")));
        for bad in [
            "1.0",
            "1.0.0.0",
            "01.0.0",
            "1.-1.0",
            "1.0.x",
            "",
            "1..0",
            "+1.0.0",
            "99999999999.0.0",
        ] {
            let err = bad.parse::<ImageVersion>().unwrap_err().to_string();
            assert!(err.contains("MAJOR.MINOR.PATCH"), "{bad}: {err}");
        }
        assert_eq!(
            release_target_version(&release_target(&v("3.1.4"))),
            Some(v("3.1.4"))
        );
        assert_eq!(release_target_version("release-cairn-3.1.json"), None);
        assert_eq!(release_target_version("chunk-cairn-3.1.4.json"), None);
    }

    #[test]
    fn a_good_manifest_round_trips_and_chunk_lengths_cover_the_file() {
        let r = release();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(Release::from_json(&json).unwrap(), r);
        assert_eq!(r.root.chunk_len(0), CHUNK_BYTES);
        assert_eq!(r.root.chunk_len(3), 5);
        assert_eq!(
            (0..r.root.chunks.len())
                .map(|i| r.root.chunk_len(i))
                .sum::<u64>(),
            r.root.bytes
        );
    }

    #[test]
    fn bad_manifests_are_refused_with_the_field_named() {
        use serde_json::json;
        let cases = [
            ("/schema", json!(2), "schema 2"),
            ("/roothash", json!("AB"), "roothash"),
            ("/root/chunks/1", json!("zz"), "root.chunks[1]"),
            ("/verity/sha256", json!("0"), "verity.sha256"),
            ("/root/bytes", json!(5 * CHUNK_BYTES), "root has 4 chunks"),
            ("/max_wave", json!(10), "max_wave is 10"),
            ("/kernel", json!("../../x"), "kernel"),
            ("/version", json!("1.2"), "version"),
            ("/extra", json!(true), "unknown field `extra`"),
        ];
        for (pointer, value, needle) in cases {
            let mut v = serde_json::to_value(release()).unwrap();
            match v.pointer_mut(pointer) {
                Some(slot) => *slot = value,
                None => {
                    v.as_object_mut()
                        .unwrap()
                        .insert(pointer[1..].to_string(), value);
                }
            }
            let err = Release::from_json(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
    }
}
