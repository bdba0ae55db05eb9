//! The update channel: a TUF repository read with tough, over the fleet's TLS or from a directory.
//!
//! tough does the TUF work (root rotation, thresholds, expiry, rollback and freeze protection through its
//! datastore, target lengths and hashes); this module gives it a transport and reads cairn's targets.

use super::UpdateError;
use crate::uplink::FleetClient;
use cairn_proto::fleet::to_hex;
use cairn_proto::update::{self, ImageVersion, Release, CHUNK_BYTES};
use std::path::Path;
use tough::async_trait;
use tough::{IntoVec, RepositoryLoader, TargetName, Transport, TransportError, TransportErrorKind};
use url::Url;

/// The largest metadata or target file accepted over the fleet transport; tough applies its own, tighter
/// limits per file on top (targets by their signed length).
const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;

/// tough's stream type (not exported by name).
type TransportStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<tough::Bytes, TransportError>> + Send>>;

/// Fetches `<fleet>/v1/update/…` through the fleet client (its CA, its timeout).
#[derive(Debug, Clone)]
struct FleetTransport(FleetClient);

#[async_trait]
impl Transport for FleetTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match self.0.update_file(url.path(), MAX_FILE_BYTES).await {
            Ok(Some(bytes)) => Ok(Box::pin(futures::stream::once(async move { Ok(bytes) }))),
            Ok(None) => Err(TransportError::new(TransportErrorKind::FileNotFound, url)),
            Err(e) => Err(TransportError::new_with_cause(
                TransportErrorKind::Other,
                url,
                crate::error_chain(&e),
            )),
        }
    }
}

/// Where the repository is.
#[derive(Debug, Clone)]
pub enum Source {
    Fleet { client: FleetClient, base: Url },
    Directory(Url),
}

impl Source {
    /// The SHA-256 of the repository's current `timestamp.json`, unverified: a cheap way to see that the fleet
    /// signed something new (a publish, a wider wave, a refresh), which then gets a full, verified check.
    /// None when it cannot be read (the full check reports why).
    pub async fn timestamp_digest(&self) -> Option<[u8; 32]> {
        let bytes = match self {
            Source::Fleet { client, base } => {
                let url = base.join("metadata/timestamp.json").ok()?;
                client
                    .update_file(url.path(), 64 * 1024)
                    .await
                    .ok()??
                    .to_vec()
            }
            Source::Directory(base) => {
                let url = base.join("metadata/timestamp.json").ok()?;
                std::fs::read(url.to_file_path().ok()?).ok()?
            }
        };
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        Some(out)
    }
}

/// A loaded, verified view of the repository (one TUF refresh).
#[derive(Debug)]
pub struct Channel {
    repo: tough::Repository,
}

// tough's messages already carry their sources: the chain would repeat them.
fn tuf(e: tough::error::Error) -> UpdateError {
    UpdateError::Channel(e.to_string())
}

impl Channel {
    /// Refreshes the TUF metadata (timestamp → snapshot → targets, rotating the root if it changed) against
    /// the trusted state in `datastore`, which survives reboots so an attacker cannot replay older metadata.
    pub async fn open(
        root_file: &Path,
        source: &Source,
        datastore: &Path,
    ) -> Result<Channel, UpdateError> {
        let root = std::fs::read(root_file).map_err(|source| UpdateError::Io {
            path: root_file.to_owned(),
            source,
        })?;
        std::fs::create_dir_all(datastore).map_err(|source| UpdateError::Io {
            path: datastore.to_owned(),
            source,
        })?;
        let join = |base: &Url, sub: &str| {
            base.join(sub)
                .map_err(|e| UpdateError::Channel(format!("{base} cannot take {sub}: {e}")))
        };
        let loader = match source {
            Source::Fleet { client, base } => {
                RepositoryLoader::new(&root, join(base, "metadata/")?, join(base, "targets/")?)
                    .transport(FleetTransport(client.clone()))
            }
            Source::Directory(base) => {
                RepositoryLoader::new(&root, join(base, "metadata/")?, join(base, "targets/")?)
            }
        };
        let repo = loader.datastore(datastore).load().await.map_err(tuf)?;
        Ok(Channel { repo })
    }

    /// The versions the repository offers, newest first.
    pub fn versions(&self) -> Vec<ImageVersion> {
        let mut v: Vec<ImageVersion> = self
            .repo
            .all_targets()
            .filter_map(|(name, _)| update::release_target_version(name.raw()))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    async fn target(&self, name: &str) -> Result<Vec<u8>, UpdateError> {
        let target = TargetName::new(name).map_err(tuf)?;
        match self.repo.read_target(&target).await.map_err(tuf)? {
            Some(stream) => stream.into_vec().await.map_err(tuf),
            None => Err(UpdateError::Channel(format!(
                "the repository lists no {name}"
            ))),
        }
    }

    pub async fn release(&self, version: &ImageVersion) -> Result<Release, UpdateError> {
        let bytes = self.target(&update::release_target(version)).await?;
        Release::from_json(&bytes).map_err(|e| UpdateError::Release {
            version: *version,
            reason: e.to_string(),
        })
    }

    /// One chunk, checked by TUF (its compressed bytes) and then by its plain SHA-256. Returns the plain bytes
    /// and how many were downloaded.
    pub async fn chunk(&self, sha256: &str) -> Result<(Vec<u8>, u64), UpdateError> {
        let name = update::chunk_target(sha256);
        let compressed = self.target(&name).await?;
        let plain = zstd::bulk::decompress(&compressed, CHUNK_BYTES as usize)
            .map_err(|e| UpdateError::Channel(format!("{name} does not decompress: {e}")))?;
        if to_hex(ring::digest::digest(&ring::digest::SHA256, &plain).as_ref()) != sha256 {
            return Err(UpdateError::Channel(format!(
                "{name} decompresses to other bytes than its name says"
            )));
        }
        Ok((plain, compressed.len() as u64))
    }
}

/// A [`super::writer::ChunkSource`] for a blocking writer thread.
#[derive(Debug)]
pub struct Blocking {
    pub channel: std::sync::Arc<Channel>,
    pub runtime: tokio::runtime::Handle,
}

impl super::writer::ChunkSource for Blocking {
    fn fetch(&self, sha256: &str) -> Result<(Vec<u8>, u64), UpdateError> {
        self.runtime.block_on(self.channel.chunk(sha256))
    }
}
