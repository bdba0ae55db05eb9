//! Writing one piece of a release (root, verity tree, kernel, initrd) into its place, chunk by chunk.
//!
//! Each chunk comes from the first place that has it: the destination itself (a write cut short by a power
//! loss resumes where it stopped), a file the device already holds (the running slot: a delta update copies
//! what did not change), or the update channel. Every chunk is hashed before it is written, and the whole
//! piece is read back and hashed once more at the end.

use super::UpdateError;
use cairn_proto::fleet::to_hex;
use cairn_proto::update::{Piece, CHUNK_BYTES};
use ring::digest::{digest, Context, SHA256};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Downloads one chunk's plain bytes (already checked against its hash by the caller).
pub trait ChunkSource {
    fn fetch(&self, sha256: &str) -> Result<(Vec<u8>, u64), UpdateError>;
}

/// Where known chunks can be copied from.
#[derive(Debug, Default)]
pub struct LocalChunks {
    by_hash: HashMap<String, (PathBuf, u64)>,
}

impl LocalChunks {
    /// Indexes a file the device holds, whose chunk hashes are listed (the running release's manifest).
    /// A listed chunk is read back and checked before it is used, so a wrong list costs a download only.
    pub fn add_listed(&mut self, path: &Path, chunks: &[String]) {
        for (i, sha) in chunks.iter().enumerate() {
            self.by_hash
                .entry(sha.clone())
                .or_insert_with(|| (path.to_owned(), i as u64 * CHUNK_BYTES));
        }
    }

    /// Indexes the first `max_bytes` of a file by hashing it (when no manifest lists it). Unreadable files
    /// add nothing: they only make the download bigger.
    pub fn add_hashed(&mut self, path: &Path, max_bytes: u64) {
        let Ok(f) = File::open(path) else { return };
        let mut buf = vec![0u8; CHUNK_BYTES as usize];
        let mut offset = 0;
        while offset < max_bytes {
            let n = match read_at_full(&f, &mut buf, offset) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let sha = to_hex(digest(&SHA256, &buf[..n]).as_ref());
            self.by_hash
                .entry(sha)
                .or_insert_with(|| (path.to_owned(), offset));
            offset += n as u64;
            if n < buf.len() {
                break;
            }
        }
    }

    fn read(&self, sha: &str, len: usize, buf: &mut [u8]) -> bool {
        let Some((path, offset)) = self.by_hash.get(sha) else {
            return false;
        };
        let Ok(f) = File::open(path) else {
            return false;
        };
        matches!(read_at_full(&f, &mut buf[..len], *offset), Ok(n) if n == len)
            && to_hex(digest(&SHA256, &buf[..len]).as_ref()) == sha
    }
}

fn read_at_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Counts for the status and the bench.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Chunks found already written in the destination (resumed).
    pub present: u64,
    pub local: u64,
    pub fetched: u64,
    /// Compressed bytes downloaded.
    pub bytes_fetched: u64,
}

impl Progress {
    pub fn done(&self) -> u64 {
        self.present + self.local + self.fetched
    }
}

/// How often progress is made durable (and reported): a power cut loses at most this many chunks of work.
const SYNC_EVERY: usize = 16;

/// Writes `piece` into `dest` (a block device, or a file created if missing) and checks it whole.
/// `on_progress` is called after every durable step, with the counts so far for this piece.
pub fn write_piece(
    name: &str,
    piece: &Piece,
    dest: &Path,
    local: &LocalChunks,
    source: &dyn ChunkSource,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Progress, UpdateError> {
    let io = |source| UpdateError::Io {
        path: dest.to_owned(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dest)
        .map_err(io)?;
    let is_file = f.metadata().map_err(io)?.is_file();
    if !is_file {
        let size = device_size(&f).map_err(io)?;
        if size < piece.bytes {
            return Err(UpdateError::TooSmall {
                path: dest.to_owned(),
                size,
                needed: piece.bytes,
            });
        }
    }
    let mut progress = Progress::default();
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    for (i, sha) in piece.chunks.iter().enumerate() {
        let len = piece.chunk_len(i) as usize;
        let offset = i as u64 * CHUNK_BYTES;
        let here = read_at_full(&f, &mut buf[..len], offset).map_err(io)?;
        if here == len && to_hex(digest(&SHA256, &buf[..len]).as_ref()) == *sha {
            progress.present += 1;
        } else if local.read(sha, len, &mut buf) {
            f.write_all_at(&buf[..len], offset).map_err(io)?;
            progress.local += 1;
        } else {
            let (data, compressed) = match source.fetch(sha) {
                Ok(d) => d,
                Err(e) => {
                    // What was written so far is kept and counted: the next attempt starts from it.
                    f.sync_data().map_err(io)?;
                    on_progress(progress);
                    return Err(e);
                }
            };
            if data.len() != len {
                return Err(UpdateError::Chunk {
                    piece: name.to_string(),
                    index: i,
                    reason: format!("{} bytes where {len} were expected", data.len()),
                });
            }
            f.write_all_at(&data, offset).map_err(io)?;
            progress.fetched += 1;
            progress.bytes_fetched += compressed;
        }
        if (i + 1) % SYNC_EVERY == 0 {
            f.sync_data().map_err(io)?;
            on_progress(progress);
        }
    }
    if is_file {
        f.set_len(piece.bytes).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    on_progress(progress);

    // Read it all back: what the next boot will see is what was meant, not what the page cache says.
    let mut whole = Context::new(&SHA256);
    let mut offset = 0;
    while offset < piece.bytes {
        let want = (piece.bytes - offset).min(CHUNK_BYTES) as usize;
        let n = read_at_full(&f, &mut buf[..want], offset).map_err(io)?;
        if n != want {
            break;
        }
        whole.update(&buf[..n]);
        offset += n as u64;
    }
    let got = to_hex(whole.finish().as_ref());
    if offset != piece.bytes || got != piece.sha256 {
        return Err(UpdateError::Verify {
            piece: name.to_string(),
            path: dest.to_owned(),
        });
    }
    Ok(progress)
}

fn device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Store(HashMap<String, Vec<u8>>, RefCell<Vec<String>>);

    impl ChunkSource for Store {
        fn fetch(&self, sha: &str) -> Result<(Vec<u8>, u64), UpdateError> {
            self.1.borrow_mut().push(sha.to_string());
            let data = self.0.get(sha).cloned().ok_or_else(|| UpdateError::Chunk {
                piece: "test".into(),
                index: 0,
                reason: "not in the store".into(),
            })?;
            let n = data.len() as u64;
            Ok((data, n))
        }
    }

    fn piece_of(data: &[u8]) -> (Piece, HashMap<String, Vec<u8>>) {
        let mut store = HashMap::new();
        let chunks = data
            .chunks(CHUNK_BYTES as usize)
            .map(|c| {
                let sha = to_hex(digest(&SHA256, c).as_ref());
                store.insert(sha.clone(), c.to_vec());
                sha
            })
            .collect();
        let piece = Piece {
            bytes: data.len() as u64,
            sha256: to_hex(digest(&SHA256, data).as_ref()),
            chunks,
        };
        (piece, store)
    }

    fn data(seed: u8, chunks: usize) -> Vec<u8> {
        (0..chunks * CHUNK_BYTES as usize + 100)
            .map(|i| ((i / 4096) as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn fetches_what_is_missing_copies_what_is_local_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let old = data(1, 5);
        let mut new = old.clone();
        new[2 * CHUNK_BYTES as usize + 7] ^= 0xff; // one changed chunk
        let old_path = dir.path().join("slot-a");
        std::fs::write(&old_path, &old).unwrap();
        let (piece, store) = piece_of(&new);
        let store = Store(store, RefCell::new(vec![]));
        let mut local = LocalChunks::default();
        local.add_hashed(&old_path, old.len() as u64);
        let dest = dir.path().join("slot-b");
        let p = write_piece("root", &piece, &dest, &local, &store, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), new);
        assert_eq!((p.present, p.local, p.fetched), (0, 5, 1), "{p:?}");
        assert_eq!(store.1.borrow().as_slice(), &[piece.chunks[2].clone()]);

        // A second run (a restart after a power cut) finds everything in place and fetches nothing.
        let p = write_piece(
            "root",
            &piece,
            &dest,
            &LocalChunks::default(),
            &store,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((p.present, p.fetched), (6, 0));
        assert_eq!(store.1.borrow().len(), 1);
    }

    #[test]
    fn a_wrong_chunk_or_a_damaged_write_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let new = data(2, 2);
        let (piece, mut chunks) = piece_of(&new);
        // The store answers the first chunk with the bytes of another length.
        chunks.insert(piece.chunks[0].clone(), vec![0; 10]);
        let store = Store(chunks, RefCell::new(vec![]));
        let err = write_piece(
            "verity",
            &piece,
            &dir.path().join("d"),
            &LocalChunks::default(),
            &store,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("chunk 0 of verity"), "{err}");

        // A local index that lies (the file changed since) costs a download, not a bad slot.
        let (piece, chunks) = piece_of(&new);
        let liar = dir.path().join("liar");
        std::fs::write(&liar, vec![7u8; new.len()]).unwrap();
        let mut local = LocalChunks::default();
        local.add_listed(&liar, &piece.chunks);
        let store = Store(chunks, RefCell::new(vec![]));
        let p = write_piece(
            "root",
            &piece,
            &dir.path().join("e"),
            &local,
            &store,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((p.local, p.fetched), (0, 3));
    }
}
