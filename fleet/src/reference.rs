//! Reference values: the PCR values a good boot of a known image produces. The image build emits this file;
//! until it does, tests and the simulated site write it. PCRs no accepted entry lists are pinned per device
//! at its first attestation instead (see `attestation`).
//!
//! ```json
//! { "version": 1,
//!   "accepted": [ { "name": "cairn 0.1.0", "sha256": { "4": "<64 hex digits>", "7": "…" } } ] }
//! ```

use cairn_proto::fleet::Hex;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const REFERENCE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("cannot read reference values {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reference values {path} are not valid: {reason}\n  fix: write {{\"version\": 1, \"accepted\": [{{\"name\": …, \"sha256\": {{\"PCR\": \"HEX\"}}}}]}}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceFile {
    version: u32,
    accepted: Vec<EntryFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    name: String,
    sha256: BTreeMap<String, Hex>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub sha256: BTreeMap<u8, [u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reference {
    pub accepted: Vec<Entry>,
}

/// Why quoted PCRs match no accepted entry: the entry that came closest and the PCRs where it differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub closest: String,
    pub differing: Vec<u8>,
}

impl Reference {
    pub fn load(path: &Path) -> Result<Reference, ReferenceError> {
        let text = std::fs::read(path).map_err(|source| ReferenceError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ReferenceError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    pub fn parse(text: &[u8]) -> Result<Reference, String> {
        let de = &mut serde_json::Deserializer::from_slice(text);
        let file: ReferenceFile =
            serde_path_to_error::deserialize(de).map_err(|e| format!("at {}: {}", e.path(), e))?;
        if file.version != REFERENCE_VERSION {
            return Err(format!(
                "version {} is not {REFERENCE_VERSION}",
                file.version
            ));
        }
        let mut accepted = Vec::new();
        for entry in file.accepted {
            let mut sha256 = BTreeMap::new();
            for (pcr, value) in entry.sha256 {
                let index =
                    pcr.parse::<u8>().ok().filter(|&i| i < 24).ok_or_else(|| {
                        format!("entry {:?}: PCR {pcr:?} is not 0 to 23", entry.name)
                    })?;
                let value: [u8; 32] = value
                    .0
                    .try_into()
                    .map_err(|_| format!("entry {:?}: PCR {index} is not 32 bytes", entry.name))?;
                sha256.insert(index, value);
            }
            if sha256.is_empty() {
                return Err(format!("entry {:?} lists no PCRs", entry.name));
            }
            accepted.push(Entry {
                name: entry.name,
                sha256,
            });
        }
        Ok(Reference { accepted })
    }

    /// The accepted entry the quoted values match, if any entry exists. Ok(None) when there are no entries.
    pub fn check(&self, quoted: &BTreeMap<u8, [u8; 32]>) -> Result<Option<&Entry>, Mismatch> {
        let mut closest: Option<Mismatch> = None;
        for entry in &self.accepted {
            let differing: Vec<u8> = entry
                .sha256
                .iter()
                .filter(|(i, v)| quoted.get(i) != Some(v))
                .map(|(i, _)| *i)
                .collect();
            if differing.is_empty() {
                return Ok(Some(entry));
            }
            if closest
                .as_ref()
                .is_none_or(|c| differing.len() < c.differing.len())
            {
                closest = Some(Mismatch {
                    closest: entry.name.clone(),
                    differing,
                });
            }
        }
        match closest {
            Some(m) => Err(m),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_entry_and_closest_mismatch() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let r = Reference::parse(
            format!(
                r#"{{"version":1,"accepted":[{{"name":"old","sha256":{{"4":"{a}","7":"{a}"}}}},{{"name":"new","sha256":{{"4":"{b}"}}}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let q = BTreeMap::from([(4u8, [0x22u8; 32]), (7, [0x11; 32])]);
        assert_eq!(r.check(&q).unwrap().unwrap().name, "new");
        let q = BTreeMap::from([(4u8, [0x33u8; 32]), (7, [0x11; 32])]);
        let m = r.check(&q).unwrap_err();
        assert_eq!(m.differing, vec![4]);
        assert!(Reference::default().check(&q).unwrap().is_none());
    }

    #[test]
    fn bad_files_are_explained() {
        for (text, needle) in [
            (r#"{"version":2,"accepted":[]}"#, "version 2"),
            (
                r#"{"version":1,"accepted":[{"name":"x","sha256":{"24":"00"}}]}"#,
                "PCR \"24\"",
            ),
            (
                r#"{"version":1,"accepted":[{"name":"x","sha256":{"1":"00"}}]}"#,
                "32 bytes",
            ),
            (
                r#"{"version":1,"accepted":[{"name":"x","sha256":{}}]}"#,
                "lists no PCRs",
            ),
            (r#"{"version":1,"accepted":[],"extra":1}"#, "extra"),
        ] {
            let err = Reference::parse(text.as_bytes()).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
