//! The telemetry spool: samples and events wait here, on disk, until the fleet acknowledges them, through uplink
//! outages of hours or days, within a disk budget. The only module that touches sled.
//!
//! Files: `DIR/CURRENT` names the sled generation in use, `DIR/gen-N/` (see compaction below). In sled's
//! default tree:
//! - `c` + last seq (u64 BE) → a chunk: the records of one group commit (split past [`CHUNK_MAX_BYTES`]),
//!   in sequence order, each sequence above the previous chunk's key and at most this chunk's key. sled 0.34
//!   stores one small key per record at 200+ bytes each and does not reclaim them when they are deleted (space
//!   grew without bound in a churn test); one key per chunk stays at 1.2–2.6× the payload and reopens in
//!   milliseconds. A sample takes about 13 bytes in a chunk.
//! - `s` + series id (u64 BE) → a series: metric name and labels, written once; samples refer to it by id.
//!   A series is deleted once the fleet has acknowledged every record that may refer to it.
//! - `meta` → the counters below, rewritten in every batch so they always agree with the chunks (sled applies a
//!   batch atomically, also across a crash).
//!
//! Sequences: every record gets the next sequence number, never reused, also across a kill -9: sequences are
//! handed out only below a reserved high-water mark that is durable before any of them is used, and a reopened
//! spool starts above it. So there are gaps after a restart (and after thinning): the fleet must expect them.
//!
//! Group commit: `append` only buffers. A flusher thread writes the buffer as one sled batch and fsyncs (sled's
//! `flush`) once `flush_interval` has passed since the first buffered record, or at once when `flush_records`
//! are buffered; `flush` forces it. `pending` serves only durable records, so the fleet never sees a record a
//! restart could lose.
//!
//! Quota: when the bytes used (stored bytes × [`DISK_FACTOR_PERCENT`]) exceed the budget, the spool frees down
//! to 90% of it: first it thins old samples (keeps every `thin_keep_every`-th of each series, oldest first,
//! each record at most once), then drops the oldest samples, and events only when no sample is left. What
//! survives of consecutive chunks is merged. Every pass is counted in [`SpoolStats::drops`] and reported as a
//! `telemetry_drop` event in the spool itself.
//!
//! Compaction: sled 0.34 does not give back the space of rewritten chunks (its files grew past 6× the stored
//! bytes under thinning). When its files pass the budget, the spool copies every key into a fresh generation,
//! switches `CURRENT` atomically and removes the old one; appends wait (beyond the buffer) while it copies.

use crate::telemetry::{Event, MetricKind, Sample, Severity};
use serde::{Deserialize, Serialize};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The default disk budget: 1 GiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 1 << 30;

/// How far sled's files may exceed the bytes the spool stores, in percent: the quota keeps the stored bytes
/// times this under the budget, so that sled's files *and* a compacted copy being written beside them fit in
/// it. Measured with sled 0.34 and compressed chunks: 1.2-2.6× the stored bytes in steady use, about as much
/// for a fresh copy. At 6×, the files may grow to budget - copy (0.57 of the budget at most) before a
/// compaction brings them back to the size of a copy.
pub const DISK_FACTOR_PERCENT: u64 = 800;

/// The smallest budget the spool can keep: sled's files grow a 512 KiB segment at a time, and a compaction
/// needs room for a copy beside them.
pub const MIN_BUDGET_BYTES: u64 = 8 << 20;

/// sled 0.34's segment size (its default, which the spool keeps): its files grow by this much at a time.
const SLED_SEGMENT_BYTES: u64 = 512 << 10;

/// What a compacted copy of the spool takes on disk, in percent of the stored bytes, until a compaction has
/// measured it (the largest ratio seen with sled 0.34, at small budgets where sled's segments dominate).
const COPY_FACTOR_PERCENT: u64 = 260;

/// The event kind the spool reports its own drops with.
pub const DROP_EVENT_KIND: &str = "telemetry_drop";

/// The component the spool's own events are about.
pub const SPOOL_COMPONENT: &str = "telemetry_spool";

/// A chunk is closed once its encoding reaches this size (one record may take it past).
pub const CHUNK_MAX_BYTES: usize = 48 * 1024;

/// The file in the spool's directory that names the sled generation in use (`gen-N`).
pub const CURRENT_FILE: &str = "CURRENT";

/// Compaction runs only when sled's files exceed the stored bytes by this much (percent), so that it can
/// win space back.
const COMPACT_MIN_AMP_PERCENT: u64 = 160;

/// The quota merges what survives of small chunks up to this size.
pub const MERGE_TARGET_BYTES: usize = 16 * 1024;

/// Sequences reserved (made durable) ahead of use at a time. A crash leaves at most this many unused.
const SEQ_BLOCK: u64 = 1 << 16;

/// The quota frees down to this share of the budget, so that passes are rare.
const LOW_WATER_PERCENT: u64 = 90;

/// Chunks rewritten or removed per sled batch by acknowledgements and the quota.
const CHUNKS_PER_BATCH: usize = 64;

/// Version of the chunk, series and meta encodings.
const FORMAT_VERSION: u64 = 1;

const META_KEY: &[u8] = b"meta";
const CHUNK_PREFIX: u8 = b'c';
const SERIES_PREFIX: u8 = b's';

/// What a record carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordBody {
    Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
        /// Prometheus counter (else gauge).
        counter: bool,
    },
    Event(Event),
}

impl From<&Sample> for RecordBody {
    fn from(s: &Sample) -> Self {
        RecordBody::Sample {
            name: s.name.to_owned(),
            labels: s
                .labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            value: s.value,
            counter: s.kind == MetricKind::Counter,
        }
    }
}

impl From<Event> for RecordBody {
    fn from(e: Event) -> Self {
        RecordBody::Event(e)
    }
}

/// One spooled record: its sequence number (monotonic, never reused), when it was taken, and what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub body: RecordBody,
}

impl Record {
    /// The size of the record written out on its own (every string in full, numbers at 8 bytes): what
    /// `pending`'s `max_bytes` counts. An upper bound for any reasonable wire encoding before compression.
    pub fn approx_bytes(&self) -> usize {
        16 + match &self.body {
            RecordBody::Sample { name, labels, .. } => {
                9 + name.len()
                    + labels
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 2)
                        .sum::<usize>()
            }
            RecordBody::Event(e) => 10 + e.component.len() + e.kind.len() + e.message.len(),
        }
    }
}

/// How the spool behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Disk the spool may use, as [`SpoolStats::bytes_used`] counts it.
    pub budget_bytes: u64,
    /// Longest a record waits in memory before the group commit makes it durable.
    pub flush_interval: Duration,
    /// Commit at once when this many records are buffered. Appenders wait for a commit at 4× this.
    pub flush_records: usize,
    /// Thinning keeps every this-many-th sample of each series (1 or 0: no thinning, drop at once).
    pub thin_keep_every: u32,
    /// Memory sled may use as its page cache (sled's own default is 1 GiB).
    pub cache_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            budget_bytes: DEFAULT_BUDGET_BYTES,
            flush_interval: Duration::from_millis(100),
            flush_records: 10_000,
            thin_keep_every: 10,
            cache_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What the quota has removed since the spool was created (persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolDrops {
    /// Samples removed by thinning.
    pub thinned_samples: u64,
    /// Samples removed whole (after thinning was not enough).
    pub dropped_samples: u64,
    /// Events removed (only when no sample was left to remove).
    pub dropped_events: u64,
    /// Chunks that could not be decoded and were discarded with their records.
    pub corrupt_chunks: u64,
}

/// The spool at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolStats {
    /// Records not acknowledged yet: stored and still buffered.
    pub depth: u64,
    /// Of those, records still in memory, waiting for the group commit.
    pub buffered: u64,
    /// When the oldest unacknowledged stored record was taken.
    pub oldest_unacked_at_unix_ms: Option<u64>,
    /// What the quota compares with the budget: stored bytes times [`DISK_FACTOR_PERCENT`].
    pub bytes_used: u64,
    /// Bytes of chunks, series and keys the spool stores.
    pub bytes_stored: u64,
    /// The size of sled's files (lags deletions; 0 if it could not be read).
    pub bytes_on_disk: u64,
    /// Times since open that sled's files were rewritten to reclaim space (see [`Spool`]).
    pub compactions: u64,
    pub budget_bytes: u64,
    pub drops: SpoolDrops,
    /// Every record appended with a sequence at or below this is durable.
    pub durable_seq: u64,
    /// The fleet has acknowledged everything at or below this.
    pub acked_seq: u64,
    /// The sequence the next record gets.
    pub next_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "could not open the telemetry spool in {path}: check that the directory can be created and written by \
         cairnd, that the disk has space, and that no other cairnd uses it"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("could not {action} the telemetry spool in {path}: check the disk's free space and health (dmesg)")]
    Storage {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error("could not {action} the telemetry spool's directory {path}: check that it is writable by cairnd and the disk has space")]
    Files {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the telemetry spool in {path} was written by a newer cairnd (format {version}): run that version, or \
         move the directory aside to start a new spool"
    )]
    NewerFormat { path: PathBuf, version: u64 },
    #[error(
        "the telemetry spool in {path} is damaged ({what}): move the directory aside to start a new spool; the \
         telemetry in it that the fleet has not acknowledged is lost"
    )]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "could not reserve sequence numbers in the telemetry spool in {path}: appends outrun the group commit; \
         retry"
    )]
    Busy { path: PathBuf },
}

impl SpoolError {
    /// The spool's own files are damaged (not the disk full or a newer cairnd's format): the spool cannot be
    /// opened again as it is.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            SpoolError::Corrupt { .. }
                | SpoolError::Open {
                    source: sled::Error::Corruption { .. },
                    ..
                }
                | SpoolError::Storage {
                    source: sled::Error::Corruption { .. },
                    ..
                }
        )
    }
}

/// A damaged spool [`Spool::open_or_set_aside`] moved out of the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    /// Where the damaged spool now is (one copy is kept, for diagnosis; the next one replaces it).
    pub moved_to: PathBuf,
    /// Why it could not be opened.
    pub reason: String,
}

/// The persistent spool. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Spool {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .field("durable_seq", &self.durable_seq())
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir` and starts its flusher thread. Reads only the counters, the series
    /// and the last chunk's key, whatever the backlog.
    pub fn open(dir: &Path, cfg: SpoolConfig) -> Result<Spool, SpoolError> {
        let inner = Arc::new(Inner::open(dir, cfg)?);
        let flusher = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("cairn-spool-flush".into())
                .spawn(move || inner.run_flusher())
                .map_err(|e| SpoolError::Storage {
                    path: dir.to_path_buf(),
                    action: "start the flusher thread of",
                    source: sled::Error::Io(e),
                })?
        };
        Ok(Spool {
            inner,
            flusher: Some(flusher),
        })
    }

    /// Opens the spool; if its files are damaged, moves the directory to `<dir>.damaged` (replacing an older
    /// damaged copy) and starts a new, empty spool there, so the box keeps its telemetry from now on instead
    /// of running without a spool until someone logs in. What the damaged spool held unacknowledged is lost,
    /// and the caller must say so. Any other error (disk full, a newer format) leaves the directory alone.
    pub fn open_or_set_aside(
        dir: &Path,
        cfg: SpoolConfig,
    ) -> Result<(Spool, Option<SetAside>), SpoolError> {
        let err = match Spool::open(dir, cfg.clone()) {
            Ok(s) => return Ok((s, None)),
            Err(e) if e.is_damage() => e,
            Err(e) => return Err(e),
        };
        let mut reason = err.to_string();
        let mut cur = std::error::Error::source(&err);
        while let Some(inner) = cur {
            reason.push_str(": ");
            reason.push_str(&inner.to_string());
            cur = inner.source();
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "spool".into());
        let moved_to = dir.with_file_name(format!("{name}.damaged"));
        let files = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| SpoolError::Files {
                path,
                action,
                source,
            }
        };
        if moved_to.exists() {
            std::fs::remove_dir_all(&moved_to)
                .map_err(files("remove the older damaged copy of", &moved_to))?;
        }
        std::fs::rename(dir, &moved_to).map_err(files("move aside the damaged", dir))?;
        if let Some(parent) = dir.parent() {
            // The rename must be on the disk before the new spool's first record is.
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(files("sync the directory holding", dir))?;
        }
        let spool = Spool::open(dir, cfg)?;
        Ok((spool, Some(SetAside { moved_to, reason })))
    }

    /// Buffers one record and returns its sequence number. Durable after the next group commit.
    pub fn append(&self, at_unix_ms: u64, body: RecordBody) -> Result<u64, SpoolError> {
        self.inner.push(vec![(at_unix_ms, body)]).map(|r| r.start)
    }

    /// Buffers records with consecutive sequence numbers, in order.
    pub fn append_many(&self, items: Vec<(u64, RecordBody)>) -> Result<Range<u64>, SpoolError> {
        self.inner.push(items)
    }

    /// Commits everything buffered and fsyncs; returns the highest durable sequence.
    pub fn flush(&self) -> Result<u64, SpoolError> {
        self.inner.commit(0)
    }

    /// Every record appended with a sequence at or below this is durable.
    pub fn durable_seq(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    /// Durable, unacknowledged records above `after_seq`, oldest first: at most `max_records`, and at most
    /// `max_bytes` by [`Record::approx_bytes`] (but always one, if there is one, so a large record cannot stall
    /// the uplink).
    pub fn pending(
        &self,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, SpoolError> {
        self.inner.pending(after_seq, max_records, max_bytes)
    }

    /// The fleet has everything up to `up_to_seq` (clamped to the durable sequence): deletes it. Idempotent.
    /// Not fsynced by itself: an acknowledgement lost in a crash only means records are sent again.
    pub fn ack(&self, up_to_seq: u64) -> Result<(), SpoolError> {
        self.inner.ack(up_to_seq)
    }

    pub fn stats(&self) -> SpoolStats {
        self.inner.stats()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.inner.lock_state().shutdown = true;
        self.inner.wake.notify_all();
        if let Some(handle) = self.flusher.take() {
            // The flusher commits what is left before it returns.
            let _ = handle.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The state behind the spool.

struct Inner {
    dir: PathBuf,
    cfg: SpoolConfig,
    /// Everything that uses sled holds this: commits, reads, acknowledgements, the quota, compaction.
    store: Mutex<Store>,
    /// The append buffer; never held while waiting for sled.
    state: Mutex<State>,
    wake: Condvar,
    durable: AtomicU64,
}

struct State {
    /// (seq, at_unix_ms, body), in sequence order.
    buffer: Vec<(u64, u64, RecordBody)>,
    next_seq: u64,
    /// Sequences up to here are durably reserved and may be handed out.
    reserved_hi: u64,
    /// When the buffer last went from empty to not empty.
    buffered_since: Option<Instant>,
    shutdown: bool,
}

struct Store {
    db: sled::Db,
    /// The generation in use: sled's files are in `gen-N` (see [`CURRENT_FILE`]).
    gen: u64,
    compactions: u64,
    /// sled's file size right after the last compaction: the next waits until the files have grown by a
    /// sixteenth of the budget past it, so a budget below what sled needs anyway (a few segments) cannot make
    /// the spool compact at every commit.
    compacted_size: u64,
    /// The size of a compacted copy in percent of the stored bytes: [`COPY_FACTOR_PERCENT`], or more if a
    /// compaction measured more.
    copy_factor_percent: u64,
    meta: Meta,
    series: SeriesTable,
    /// Highest sequence whose records are in sled (durable after the next sled flush).
    applied_hi: u64,
}

/// The persisted counters; rewritten whole in every batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Meta {
    reserved_hi: u64,
    acked: u64,
    thinned_up_to: u64,
    samples_dropped_up_to: u64,
    series_next: u64,
    stored_records: u64,
    stored_bytes: u64,
    drops: SpoolDrops,
}

impl Meta {
    fn fields(&self) -> [u64; 11] {
        [
            self.reserved_hi,
            self.acked,
            self.thinned_up_to,
            self.samples_dropped_up_to,
            self.series_next,
            self.stored_records,
            self.stored_bytes,
            self.drops.thinned_samples,
            self.drops.dropped_samples,
            self.drops.dropped_events,
            self.drops.corrupt_chunks,
        ]
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        put_varint(&mut out, FORMAT_VERSION);
        for f in self.fields() {
            put_varint(&mut out, f);
        }
        out
    }

    /// Fields a newer version appends are ignored; a newer format version is refused by the caller.
    fn decode(bytes: &[u8]) -> Result<(u64, Meta), DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.varint()?;
        if version != FORMAT_VERSION {
            return Ok((version, Meta::default()));
        }
        let mut f = [0u64; 11];
        for v in &mut f {
            *v = r.varint()?;
        }
        let [reserved_hi, acked, thinned_up_to, samples_dropped_up_to, series_next, stored_records, stored_bytes, thinned_samples, dropped_samples, dropped_events, corrupt_chunks] =
            f;
        Ok((
            version,
            Meta {
                reserved_hi,
                acked,
                thinned_up_to,
                samples_dropped_up_to,
                series_next,
                stored_records,
                stored_bytes,
                drops: SpoolDrops {
                    thinned_samples,
                    dropped_samples,
                    dropped_events,
                    corrupt_chunks,
                },
            },
        ))
    }
}

impl Inner {
    fn open(dir: &Path, cfg: SpoolConfig) -> Result<Inner, SpoolError> {
        let path = dir.to_path_buf();
        let files = |action: &'static str| {
            let path = path.clone();
            move |source| SpoolError::Files {
                path,
                action,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(files("create"))?;
        let gen = read_current(dir)?.unwrap_or(0);
        let db = open_sled(&gen_dir(dir, gen), &cfg).map_err(|source| SpoolError::Open {
            path: path.clone(),
            source,
        })?;
        write_current(dir, gen).map_err(files("write CURRENT in"))?;
        remove_other_gens(dir, gen);
        let storage = |action: &'static str| {
            let path = path.clone();
            move |source| SpoolError::Storage {
                path,
                action,
                source,
            }
        };
        let corrupt = |what: String| SpoolError::Corrupt {
            path: path.clone(),
            what,
        };

        let mut meta = match db.get(META_KEY).map_err(storage("read"))? {
            None => Meta::default(),
            Some(v) => {
                let (version, meta) = Meta::decode(&v)
                    .map_err(|e| corrupt(format!("its counters do not decode: {e}")))?;
                if version != FORMAT_VERSION {
                    return Err(SpoolError::NewerFormat {
                        path: path.clone(),
                        version,
                    });
                }
                meta
            }
        };

        let mut series = SeriesTable::default();
        for kv in db.scan_prefix([SERIES_PREFIX]) {
            let (k, v) = kv.map_err(storage("read"))?;
            let id =
                key_u64(&k).ok_or_else(|| corrupt(format!("a series key of {} bytes", k.len())))?;
            let def = SeriesDef::decode(&v)
                .map_err(|e| corrupt(format!("series {id} does not decode: {e}")))?;
            series.insert(id, def, 0);
            meta.series_next = meta.series_next.max(id + 1);
        }

        let last_chunk = match db.scan_prefix([CHUNK_PREFIX]).next_back() {
            None => 0,
            Some(kv) => {
                let (k, _) = kv.map_err(storage("read"))?;
                key_u64(&k).ok_or_else(|| corrupt(format!("a chunk key of {} bytes", k.len())))?
            }
        };
        let high = meta.reserved_hi.max(last_chunk).max(meta.acked);
        // Every series may be used by any stored record: keep each until the fleet acknowledges past `high`.
        series.touch_all(high);
        let next_seq = high + 1;
        meta.reserved_hi = high + SEQ_BLOCK;
        db.insert(META_KEY, meta.encode())
            .map_err(storage("write"))?;
        db.flush().map_err(storage("flush"))?;

        Ok(Inner {
            dir: path,
            cfg,
            store: Mutex::new(Store {
                db,
                gen,
                compactions: 0,
                compacted_size: 0,
                copy_factor_percent: COPY_FACTOR_PERCENT,
                meta,
                series,
                applied_hi: high,
            }),
            state: Mutex::new(State {
                buffer: Vec::new(),
                next_seq,
                reserved_hi: meta.reserved_hi,
                buffered_since: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            durable: AtomicU64::new(high),
        })
    }

    // A panic while holding a lock leaves the data consistent (sled batches are atomic; buffers are only
    // swapped), so a poisoned lock is used as is.
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn storage(&self, action: &'static str) -> impl FnOnce(sled::Error) -> SpoolError + '_ {
        move |source| SpoolError::Storage {
            path: self.dir.clone(),
            action,
            source,
        }
    }

    fn hard_cap(&self) -> usize {
        self.cfg.flush_records.max(1).saturating_mul(4)
    }

    fn push(&self, items: Vec<(u64, RecordBody)>) -> Result<Range<u64>, SpoolError> {
        let n = items.len() as u64;
        let mut committed = 0;
        loop {
            let mut st = self.lock_state();
            if n == 0 {
                return Ok(st.next_seq..st.next_seq);
            }
            let fits = st.next_seq.saturating_add(n - 1) <= st.reserved_hi;
            let room = st.buffer.len() < self.hard_cap() || committed > 0;
            if fits && room {
                let start = st.next_seq;
                st.next_seq += n;
                let was_empty = st.buffer.is_empty();
                st.buffer.extend(
                    items
                        .into_iter()
                        .zip(start..)
                        .map(|((at, body), seq)| (seq, at, body)),
                );
                if was_empty {
                    st.buffered_since = Some(Instant::now());
                }
                let full = st.buffer.len() >= self.cfg.flush_records;
                drop(st);
                if was_empty || full {
                    self.wake.notify_all();
                }
                return Ok(start..start + n);
            }
            drop(st);
            // Other appenders may take the sequences a commit reserves; a few rounds settle it.
            if committed == 8 {
                return Err(SpoolError::Busy {
                    path: self.dir.clone(),
                });
            }
            self.commit(n)?;
            committed += 1;
        }
    }

    /// The group commit: writes the buffer as one atomic batch, fsyncs, then enforces the quota. Reserves
    /// sequences for at least `want` more records.
    fn commit(&self, want: u64) -> Result<u64, SpoolError> {
        let mut store = self.lock_store();
        let (items, hi, next) = {
            let mut st = self.lock_state();
            st.buffered_since = None;
            (std::mem::take(&mut st.buffer), st.next_seq - 1, st.next_seq)
        };
        if let Err(e) = self.write_items(&mut store, &items, hi, next, want) {
            // Nothing of it reached sled: put it back in front of what was appended since.
            let mut st = self.lock_state();
            let newer = std::mem::replace(&mut st.buffer, items);
            st.buffer.extend(newer);
            st.buffered_since.get_or_insert_with(Instant::now);
            return Err(e);
        }
        self.sync(&mut store)?;
        self.enforce_quota(&mut store)?;
        self.maybe_compact(&mut store);
        Ok(self.durable.load(Ordering::Acquire))
    }

    /// fsyncs, then publishes what that made durable: the applied records and the reserved sequences.
    fn sync(&self, store: &mut Store) -> Result<(), SpoolError> {
        store.db.flush().map_err(self.storage("flush"))?;
        self.durable.fetch_max(store.applied_hi, Ordering::AcqRel);
        let mut st = self.lock_state();
        st.reserved_hi = st.reserved_hi.max(store.meta.reserved_hi);
        Ok(())
    }

    fn write_items(
        &self,
        store: &mut Store,
        items: &[(u64, u64, RecordBody)],
        hi: u64,
        next: u64,
        want: u64,
    ) -> Result<(), SpoolError> {
        let mut meta = store.meta;
        if meta.reserved_hi < next.saturating_add(want).saturating_add(SEQ_BLOCK / 2) {
            meta.reserved_hi = next.saturating_add(want).saturating_add(SEQ_BLOCK);
        }
        let mut batch = sled::Batch::default();
        let mut new_series = NewSeries::default();
        let mut chunk = ChunkWriter::default();
        let mut chunks = Vec::new();
        for (seq, at, body) in items {
            let raw = match body {
                RecordBody::Sample {
                    name,
                    labels,
                    value,
                    counter,
                } => {
                    let series =
                        store
                            .series
                            .intern(name, labels, *seq, &mut meta, &mut new_series);
                    RawBody::Sample {
                        series,
                        counter: *counter,
                        value: *value,
                    }
                }
                RecordBody::Event(e) => RawBody::Event(e.clone()),
            };
            chunk.push(&RawRecord {
                seq: *seq,
                at: *at,
                body: raw,
            });
            if chunk.len() >= CHUNK_MAX_BYTES {
                chunks.push(std::mem::take(&mut chunk).finish());
            }
        }
        if chunk.count > 0 {
            chunks.push(chunk.finish());
        }
        for (id, def, _) in &new_series.defs {
            let value = def.encode();
            meta.stored_bytes += 9 + value.len() as u64;
            batch.insert(&series_key(*id)[..], value);
        }
        for (last_seq, count, value) in chunks {
            meta.stored_records += count;
            meta.stored_bytes += 9 + value.len() as u64;
            batch.insert(&chunk_key(last_seq)[..], value);
        }
        batch.insert(META_KEY, meta.encode());
        store.db.apply_batch(batch).map_err(self.storage("write"))?;
        store.meta = meta;
        store.series.adopt(new_series);
        store.applied_hi = store.applied_hi.max(hi);
        Ok(())
    }

    fn run_flusher(&self) {
        loop {
            let shutdown = {
                let mut st = self.lock_state();
                loop {
                    if st.shutdown {
                        break;
                    }
                    match st.buffered_since {
                        None => st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
                        Some(since) => {
                            let elapsed = since.elapsed();
                            if st.buffer.len() >= self.cfg.flush_records
                                || elapsed >= self.cfg.flush_interval
                            {
                                break;
                            }
                            st = self
                                .wake
                                .wait_timeout(st, self.cfg.flush_interval - elapsed)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    }
                }
                st.shutdown
            };
            if let Err(e) = self.commit(0) {
                tracing::warn!(error = %crate::error_chain(&e), "telemetry spool commit failed; retrying");
                if shutdown {
                    return;
                }
                let st = self.lock_state();
                let _ = self
                    .wake
                    .wait_timeout(st, self.cfg.flush_interval.max(Duration::from_millis(100)));
            }
            if shutdown {
                return;
            }
        }
    }

    fn pending(
        &self,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, SpoolError> {
        let mut store = self.lock_store();
        let durable = self.durable.load(Ordering::Acquire);
        let start = after_seq.max(store.meta.acked).saturating_add(1);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if start > durable || max_records == 0 {
            return Ok(out);
        }
        let mut corrupt = Vec::new();
        'chunks: for kv in store.db.range(chunk_key(start)..=chunk_key(u64::MAX)) {
            if out.len() >= max_records {
                break;
            }
            let (k, v) = kv.map_err(self.storage("read"))?;
            let records = match decode_chunk(&v) {
                Ok(r) => r,
                Err(e) => {
                    corrupt.push((k, e.to_string()));
                    continue;
                }
            };
            let mut resolved = Vec::new();
            for r in records {
                if r.seq < start || r.seq > durable {
                    continue;
                }
                match store.series.resolve(r) {
                    Ok(rec) => resolved.push(rec),
                    Err(e) => {
                        corrupt.push((k, e.to_string()));
                        continue 'chunks;
                    }
                }
            }
            for rec in resolved {
                let size = rec.approx_bytes();
                if out.len() >= max_records || (!out.is_empty() && bytes + size > max_bytes) {
                    break 'chunks;
                }
                bytes += size;
                out.push(rec);
            }
            if key_u64(&k).is_some_and(|last| last >= durable) {
                break;
            }
        }
        if !corrupt.is_empty() {
            self.discard_corrupt(&mut store, corrupt)?;
        }
        Ok(out)
    }

    /// Removes chunks that do not decode (sled checks its own checksums, so this means a bug or a damaged
    /// disk), counts them and says so, rather than stall the uplink on them forever.
    fn discard_corrupt(
        &self,
        store: &mut Store,
        corrupt: Vec<(sled::IVec, String)>,
    ) -> Result<(), SpoolError> {
        let mut meta = store.meta;
        let mut batch = sled::Batch::default();
        for (k, why) in &corrupt {
            tracing::error!(dir = %self.dir.display(), key = ?&k[..], reason = %why, "discarding a damaged telemetry spool chunk");
            meta.drops.corrupt_chunks += 1;
            batch.remove(k.clone());
        }
        batch.insert(META_KEY, meta.encode());
        store.db.apply_batch(batch).map_err(self.storage("write"))?;
        store.meta = meta;
        self.report(format!(
            "the telemetry spool discarded {} damaged chunk(s) it could not decode: the records in them are \
             lost; check the disk's health",
            corrupt.len()
        ));
        Ok(())
    }

    fn ack(&self, up_to: u64) -> Result<(), SpoolError> {
        let mut store = self.lock_store();
        let up_to = up_to.min(self.durable.load(Ordering::Acquire));
        let old = store.meta.acked;
        if up_to <= old {
            return Ok(());
        }
        let mut meta = store.meta;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut corrupt = Vec::new();
        for kv in store.db.range(chunk_key(old + 1)..=chunk_key(u64::MAX)) {
            let (k, v) = kv.map_err(self.storage("read"))?;
            let last = key_u64(&k).unwrap_or(u64::MAX);
            let acked_here = match decode_chunk(&v) {
                Ok(records) => records
                    .iter()
                    .filter(|r| r.seq > old && r.seq <= up_to)
                    .count() as u64,
                // Removed below anyway if wholly acknowledged; discarded after the loop if not.
                Err(e) if last > up_to => {
                    corrupt.push((k, e.to_string()));
                    break;
                }
                Err(_) => 0,
            };
            meta.stored_records = meta.stored_records.saturating_sub(acked_here);
            if last > up_to {
                break;
            }
            meta.stored_bytes = meta.stored_bytes.saturating_sub((k.len() + v.len()) as u64);
            batch.remove(k);
            in_batch += 1;
            if in_batch == CHUNKS_PER_BATCH {
                meta.acked = last;
                batch.insert(META_KEY, meta.encode());
                store
                    .db
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(self.storage("write"))?;
                store.meta = meta;
                in_batch = 0;
            }
        }
        meta.acked = up_to;
        for id in store.series.unused_since(up_to) {
            batch.remove(&series_key(id)[..]);
            if let Some(def) = store.series.remove(id) {
                meta.stored_bytes = meta
                    .stored_bytes
                    .saturating_sub(9 + def.encode().len() as u64);
            }
        }
        batch.insert(META_KEY, meta.encode());
        store.db.apply_batch(batch).map_err(self.storage("write"))?;
        store.meta = meta;
        if !corrupt.is_empty() {
            self.discard_corrupt(&mut store, corrupt)?;
        }
        Ok(())
    }

    fn stats(&self) -> SpoolStats {
        let (meta, oldest, on_disk, compactions) = {
            let store = self.lock_store();
            let acked = store.meta.acked;
            // The first chunk past the acknowledgement may hold nothing newer (thinning can empty a chunk's
            // tail), so look a few chunks further.
            let oldest = store
                .db
                .range(chunk_key(acked + 1)..=chunk_key(u64::MAX))
                .take(8)
                .filter_map(|kv| kv.ok())
                .filter_map(|(_, v)| decode_chunk(&v).ok())
                .find_map(|records| records.into_iter().find(|r| r.seq > acked))
                .map(|r| r.at);
            let on_disk = store.db.size_on_disk().unwrap_or(0);
            (store.meta, oldest, on_disk, store.compactions)
        };
        let (buffered, next_seq) = {
            let st = self.lock_state();
            (st.buffer.len() as u64, st.next_seq)
        };
        SpoolStats {
            depth: meta.stored_records + buffered,
            buffered,
            oldest_unacked_at_unix_ms: oldest,
            bytes_used: bytes_used(meta.stored_bytes),
            bytes_stored: meta.stored_bytes,
            bytes_on_disk: on_disk,
            compactions,
            budget_bytes: self.cfg.budget_bytes,
            drops: meta.drops,
            durable_seq: self.durable.load(Ordering::Acquire),
            acked_seq: meta.acked,
            next_seq,
        }
    }

    /// Appends an event of the spool's own to the buffer (without waiting for room: it is called with the
    /// store locked, and one record cannot hurt).
    fn report(&self, message: String) {
        let now = now_unix_ms();
        let event = Event {
            at_unix_ms: now,
            component: SPOOL_COMPONENT.to_owned(),
            kind: DROP_EVENT_KIND.to_owned(),
            severity: Severity::Warning,
            message,
        };
        tracing::warn!(dir = %self.dir.display(), "{}", event.message);
        let mut st = self.lock_state();
        if st.next_seq > st.reserved_hi {
            tracing::warn!(
                "no sequence reserved for the telemetry spool's drop event; it is only logged"
            );
            return;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        if st.buffer.is_empty() {
            st.buffered_since = Some(Instant::now());
        }
        st.buffer.push((seq, now, RecordBody::Event(event)));
        drop(st);
        self.wake.notify_all();
    }

    // -----------------------------------------------------------------------------------------------------
    // Compaction.

    /// Rewrites sled's files when they exceed the budget and are well above what the spool stores: sled 0.34
    /// does not reclaim the space of chunks rewritten by thinning (its files grew past 6× the stored bytes in a
    /// test), so without this the budget would not bound the disk. Failures only cost space: logged, retried
    /// at a later commit.
    /// Compacts before the files and a copy of them could no longer fit in the budget together: the copy is
    /// written beside the old generation, so waiting until the files reach the budget would pass it.
    fn maybe_compact(&self, store: &mut Store) {
        let on_disk = store.db.size_on_disk().unwrap_or(0);
        let stored = store.meta.stored_bytes;
        let could_win = stored.saturating_mul(COMPACT_MIN_AMP_PERCENT) / 100;
        let copy = stored.saturating_mul(store.copy_factor_percent) / 100;
        // Room for what a commit and a quota pass may add meanwhile, in whole sled segments.
        let margin = (self.cfg.budget_bytes / 16).max(2 * SLED_SEGMENT_BYTES);
        let grown = store.compacted_size + self.cfg.budget_bytes / 16;
        if on_disk.saturating_add(copy).saturating_add(margin) <= self.cfg.budget_bytes
            || on_disk <= could_win
            || on_disk <= grown
        {
            return;
        }
        let started = Instant::now();
        match self.compact(store) {
            Ok(()) => tracing::info!(
                dir = %self.dir.display(),
                before = on_disk,
                after = store.db.size_on_disk().unwrap_or(0),
                stored = store.meta.stored_bytes,
                ms = started.elapsed().as_millis() as u64,
                "compacted the telemetry spool"
            ),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "could not compact the telemetry spool")
            }
        }
    }

    /// Copies every key into a fresh sled in `gen-(N+1)`, makes it durable, switches `CURRENT` to it (an atomic
    /// rename), then removes the old generation. A crash before the switch leaves the old generation in use
    /// and the new one is removed on open; after it, the reverse.
    fn compact(&self, store: &mut Store) -> Result<(), SpoolError> {
        let gen = store.gen + 1;
        let path = gen_dir(&self.dir, gen);
        let copy = || -> Result<sled::Db, SpoolError> {
            let _ = std::fs::remove_dir_all(&path);
            let new = open_sled(&path, &self.cfg).map_err(|source| SpoolError::Open {
                path: path.clone(),
                source,
            })?;
            let mut batch = sled::Batch::default();
            let mut n = 0usize;
            for kv in store.db.iter() {
                let (k, v) = kv.map_err(self.storage("read"))?;
                batch.insert(k, v);
                n += 1;
                if n.is_multiple_of(CHUNKS_PER_BATCH) {
                    new.apply_batch(std::mem::take(&mut batch))
                        .map_err(self.storage("compact"))?;
                }
            }
            new.apply_batch(batch).map_err(self.storage("compact"))?;
            new.flush().map_err(self.storage("compact"))?;
            write_current(&self.dir, gen).map_err(|source| SpoolError::Files {
                path: self.dir.clone(),
                action: "write CURRENT in",
                source,
            })?;
            Ok(new)
        };
        let new = match copy() {
            Ok(new) => new,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                return Err(e);
            }
        };
        let old = std::mem::replace(&mut store.db, new);
        store.gen = gen;
        drop(old);
        remove_other_gens(&self.dir, gen);
        store.compactions += 1;
        store.compacted_size = store.db.size_on_disk().unwrap_or(0);
        if let Some(ratio) = (store.compacted_size * 100).checked_div(store.meta.stored_bytes) {
            // A tenth more than measured: the next copy holds other records.
            store.copy_factor_percent = store.copy_factor_percent.max(ratio + ratio / 10);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------------------
    // The quota.

    fn enforce_quota(&self, store: &mut Store) -> Result<(), SpoolError> {
        let used = bytes_used(store.meta.stored_bytes);
        if used <= self.cfg.budget_bytes {
            return Ok(());
        }
        let target = self.cfg.budget_bytes / 100 * LOW_WATER_PERCENT;
        let mut need = (used - target).div_ceil(DISK_FACTOR_PERCENT) * 100;
        let before = store.meta.drops;
        let mut oldest_touched = u64::MAX;
        let mut newest_touched = 0;
        let mut phases: Vec<Phase> = Vec::with_capacity(3);
        if self.cfg.thin_keep_every > 1 {
            phases.push(Phase::Thin);
        }
        phases.extend([Phase::DropSamples, Phase::DropEvents]);
        for phase in phases {
            if need == 0 {
                break;
            }
            let (lo, hi) = self.sweep(store, phase, &mut need)?;
            oldest_touched = oldest_touched.min(lo);
            newest_touched = newest_touched.max(hi);
        }
        let after = store.meta.drops;
        if after == before {
            return Ok(());
        }
        self.sync(store)?;
        let thinned = after.thinned_samples - before.thinned_samples;
        let samples = after.dropped_samples - before.dropped_samples;
        let events = after.dropped_events - before.dropped_events;
        if thinned + samples + events > 0 {
            self.report(format!(
                "the telemetry spool went over its budget of {} bytes (using {used}): it thinned {thinned} \
                 samples to every {}th of each series, dropped {samples} samples and {events} events, between \
                 sequences {oldest_touched} and {newest_touched}; the uplink has been down too long or the \
                 budget is too small",
                self.cfg.budget_bytes,
                self.cfg.thin_keep_every.max(1),
            ));
        }
        Ok(())
    }

    /// One phase of the quota, oldest chunks first, until `need` stored bytes are freed or the phase has
    /// nothing left to remove. What survives of consecutive chunks is merged into chunks of about
    /// [`MERGE_TARGET_BYTES`] (many small keys cost sled far more than their bytes). Returns the range of
    /// sequences it removed.
    fn sweep(
        &self,
        store: &mut Store,
        phase: Phase,
        need: &mut u64,
    ) -> Result<(u64, u64), SpoolError> {
        let acked = store.meta.acked;
        let from = match phase {
            Phase::Thin => acked.max(store.meta.thinned_up_to),
            Phase::DropSamples => acked.max(store.meta.samples_dropped_up_to),
            Phase::DropEvents => acked,
        };
        let keep_every = u64::from(self.cfg.thin_keep_every.max(1));
        let (start_stored, start_need) = (store.meta.stored_bytes, *need);
        let mut seen: HashMap<u64, u64> = HashMap::new();
        let mut meta = store.meta;
        let mut batch = sled::Batch::default();
        let mut touched = 0;
        let (mut lo, mut hi) = (u64::MAX, 0);
        let mut corrupt = Vec::new();
        // The survivors of the chunks in `group`, written under the last one's key when big enough.
        let mut merged = ChunkWriter::default();
        let mut group: Vec<sled::IVec> = Vec::new();
        for kv in store
            .db
            .range(chunk_key(from.saturating_add(1))..=chunk_key(u64::MAX))
        {
            if *need == 0 {
                break;
            }
            let (k, v) = kv.map_err(self.storage("read"))?;
            let Some(last) = key_u64(&k) else { continue };
            let records = match decode_chunk(&v) {
                Ok(r) => r,
                Err(e) => {
                    corrupt.push((k, e.to_string()));
                    continue;
                }
            };
            // Dropping a record frees about this much; the quota stops as soon as it has freed enough.
            let per_record = (k.len() + v.len()) as u64 / records.len().max(1) as u64;
            let done_up_to = match phase {
                Phase::Thin => meta.thinned_up_to,
                Phase::DropSamples => meta.samples_dropped_up_to,
                Phase::DropEvents => 0,
            };
            let mut stopped = false;
            for r in records.into_iter().filter(|r| r.seq > acked) {
                if r.seq <= done_up_to || *need == 0 {
                    stopped |= *need == 0;
                    merged.push(&r);
                    continue;
                }
                let keep = match (&r.body, phase) {
                    (RawBody::Event(_), Phase::DropEvents) => {
                        meta.drops.dropped_events += 1;
                        false
                    }
                    (RawBody::Event(_), _) => true,
                    (RawBody::Sample { series, .. }, Phase::Thin) => {
                        let n = seen.entry(*series).or_insert(0);
                        *n += 1;
                        let keep = (*n - 1).is_multiple_of(keep_every);
                        if !keep {
                            meta.drops.thinned_samples += 1;
                        }
                        keep
                    }
                    (RawBody::Sample { .. }, _) => {
                        meta.drops.dropped_samples += 1;
                        false
                    }
                };
                if keep {
                    merged.push(&r);
                } else {
                    meta.stored_records = meta.stored_records.saturating_sub(1);
                    *need = need.saturating_sub(per_record);
                    lo = lo.min(r.seq);
                    hi = hi.max(r.seq);
                }
                mark(phase, &mut meta, r.seq);
            }
            if !stopped {
                // The whole chunk is done: the next pass starts after it, not inside it again.
                mark(phase, &mut meta, last);
            }
            meta.stored_bytes = meta.stored_bytes.saturating_sub((k.len() + v.len()) as u64);
            group.push(k);
            touched += 1;
            if merged.count == 0 || merged.len() >= MERGE_TARGET_BYTES {
                write_group(&mut batch, &mut merged, &mut group, &mut meta);
                // Merging many small chunks frees bytes of its own (they compress better together); without
                // this credit a later phase would drop records for room the merge already made, and under load,
                // when the flusher writes few large chunks, that was every event in the spool.
                let freed = start_stored.saturating_sub(meta.stored_bytes);
                *need = (*need).min(start_need.saturating_sub(freed));
                // Batches end only between groups, so the counters always match the chunks.
                if touched >= CHUNKS_PER_BATCH {
                    batch.insert(META_KEY, meta.encode());
                    store
                        .db
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(self.storage("write"))?;
                    store.meta = meta;
                    touched = 0;
                }
            }
        }
        write_group(&mut batch, &mut merged, &mut group, &mut meta);
        let freed = start_stored.saturating_sub(meta.stored_bytes);
        *need = (*need).min(start_need.saturating_sub(freed));
        batch.insert(META_KEY, meta.encode());
        store.db.apply_batch(batch).map_err(self.storage("write"))?;
        store.meta = meta;
        if !corrupt.is_empty() {
            self.discard_corrupt(store, corrupt)?;
        }
        Ok((lo, hi))
    }
}

/// Records that a quota phase has been through everything up to `seq`.
fn mark(phase: Phase, meta: &mut Meta, seq: u64) {
    match phase {
        Phase::Thin => meta.thinned_up_to = meta.thinned_up_to.max(seq),
        Phase::DropSamples => {
            meta.samples_dropped_up_to = meta.samples_dropped_up_to.max(seq);
            meta.thinned_up_to = meta.thinned_up_to.max(seq);
        }
        Phase::DropEvents => {}
    }
}

/// Replaces the chunks of `group` by one holding `merged` (under the last chunk's key, which bounds every
/// sequence in it), or removes them if nothing survived.
fn write_group(
    batch: &mut sled::Batch,
    merged: &mut ChunkWriter,
    group: &mut Vec<sled::IVec>,
    meta: &mut Meta,
) {
    let Some(last) = group.pop() else { return };
    for k in group.drain(..) {
        batch.remove(k);
    }
    let merged = std::mem::take(merged);
    if merged.count == 0 {
        batch.remove(last);
    } else {
        let (_, _, value) = merged.finish();
        meta.stored_bytes += (last.len() + value.len()) as u64;
        batch.insert(last, value);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Thin,
    DropSamples,
    DropEvents,
}

fn bytes_used(stored: u64) -> u64 {
    stored.saturating_mul(DISK_FACTOR_PERCENT) / 100
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens sled in `path`. sled releases its file lock from a background thread shortly after the last handle
/// is dropped, so a reopen right after a close (a restart within the process, a test) waits for it, briefly.
fn open_sled(path: &Path, cfg: &SpoolConfig) -> Result<sled::Db, sled::Error> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let result = sled::Config::new()
            .path(path)
            .cache_capacity(cfg.cache_bytes)
            .mode(sled::Mode::LowSpace)
            // Durability is ours to decide: the group commit flushes.
            .flush_every_ms(None)
            .open();
        match result {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn gen_dir(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("gen-{gen}"))
}

/// The generation `CURRENT` names, if the file exists.
fn read_current(dir: &Path) -> Result<Option<u64>, SpoolError> {
    let path = dir.join(CURRENT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .strip_prefix("gen-")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| SpoolError::Corrupt {
                path: dir.to_path_buf(),
                what: format!("{} says {:?}, not gen-N", path.display(), text.trim()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SpoolError::Files {
            path: dir.to_path_buf(),
            action: "read CURRENT in",
            source,
        }),
    }
}

/// Points `CURRENT` at `gen`, durably: a temporary file, fsync, rename, fsync of the directory.
fn write_current(dir: &Path, gen: u64) -> std::io::Result<()> {
    use std::io::Write;
    let text = format!("gen-{gen}\n");
    let path = dir.join(CURRENT_FILE);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let tmp = dir.join(format!("{CURRENT_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes generations other than `keep`: leftovers of a compaction that crashed, or the one it replaced.
fn remove_other_gens(dir: &Path, keep: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let keep = format!("gen-{keep}");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("gen-") && name != keep {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove an old telemetry spool generation");
            }
        }
    }
}

fn chunk_key(last_seq: u64) -> [u8; 9] {
    prefixed(CHUNK_PREFIX, last_seq)
}

fn series_key(id: u64) -> [u8; 9] {
    prefixed(SERIES_PREFIX, id)
}

fn prefixed(prefix: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

fn key_u64(k: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = k.get(1..9)?.try_into().ok()?;
    (k.len() == 9).then(|| u64::from_be_bytes(bytes))
}

// ---------------------------------------------------------------------------------------------------------
// Series: a metric name and its labels, stored once, referred to by id.

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesDef {
    name: String,
    labels: Vec<(String, String)>,
}

impl SeriesDef {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.name.len() + 32 * self.labels.len());
        put_varint(&mut out, FORMAT_VERSION);
        put_str(&mut out, &self.name);
        put_varint(&mut out, self.labels.len() as u64);
        for (k, v) in &self.labels {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<SeriesDef, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.varint()? != FORMAT_VERSION {
            return Err(DecodeError("unknown series format"));
        }
        let name = r.string()?;
        let n = r.varint()?;
        let mut labels = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            labels.push((r.string()?, r.string()?));
        }
        r.end()?;
        Ok(SeriesDef { name, labels })
    }
}

fn series_hash(hasher: &RandomState, name: &str, labels: &[(String, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = hasher.build_hasher();
    name.hash(&mut h);
    labels.hash(&mut h);
    h.finish()
}

struct SeriesEntry {
    def: SeriesDef,
    /// The highest sequence that may refer to this series.
    last_use: u64,
}

#[derive(Default)]
struct SeriesTable {
    hasher: RandomState,
    by_id: HashMap<u64, SeriesEntry>,
    /// Hash of (name, labels) → ids with that hash.
    index: HashMap<u64, Vec<u64>>,
}

/// Series defined by a commit that is not applied yet.
#[derive(Default)]
struct NewSeries {
    /// (id, definition, last use).
    defs: Vec<(u64, SeriesDef, u64)>,
    index: HashMap<u64, Vec<usize>>,
}

impl SeriesTable {
    fn insert(&mut self, id: u64, def: SeriesDef, last_use: u64) {
        let h = series_hash(&self.hasher, &def.name, &def.labels);
        self.index.entry(h).or_default().push(id);
        self.by_id.insert(id, SeriesEntry { def, last_use });
    }

    fn touch_all(&mut self, seq: u64) {
        for e in self.by_id.values_mut() {
            e.last_use = e.last_use.max(seq);
        }
    }

    /// The id of a series, defining it in `new` (with an id from `meta`) if it is not known yet.
    fn intern(
        &mut self,
        name: &str,
        labels: &[(String, String)],
        seq: u64,
        meta: &mut Meta,
        new: &mut NewSeries,
    ) -> u64 {
        let h = series_hash(&self.hasher, name, labels);
        if let Some(ids) = self.index.get(&h) {
            for id in ids {
                if let Some(e) = self.by_id.get_mut(id) {
                    if e.def.name == name && e.def.labels == labels {
                        e.last_use = e.last_use.max(seq);
                        return *id;
                    }
                }
            }
        }
        if let Some(slots) = new.index.get(&h) {
            for &i in slots {
                if let Some((id, def, last_use)) = new.defs.get_mut(i) {
                    if def.name == name && def.labels == labels {
                        *last_use = seq;
                        return *id;
                    }
                }
            }
        }
        let id = meta.series_next;
        meta.series_next += 1;
        new.index.entry(h).or_default().push(new.defs.len());
        new.defs.push((
            id,
            SeriesDef {
                name: name.to_owned(),
                labels: labels.to_vec(),
            },
            seq,
        ));
        id
    }

    /// Takes over the series of an applied commit.
    fn adopt(&mut self, new: NewSeries) {
        for (id, def, last_use) in new.defs {
            self.insert(id, def, last_use);
        }
    }

    fn remove(&mut self, id: u64) -> Option<SeriesDef> {
        let e = self.by_id.remove(&id)?;
        let h = series_hash(&self.hasher, &e.def.name, &e.def.labels);
        if let Some(ids) = self.index.get_mut(&h) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.index.remove(&h);
            }
        }
        Some(e.def)
    }

    fn unused_since(&self, acked: u64) -> Vec<u64> {
        self.by_id
            .iter()
            .filter(|(_, e)| e.last_use <= acked)
            .map(|(id, _)| *id)
            .collect()
    }

    fn resolve(&self, r: RawRecord) -> Result<Record, DecodeError> {
        let body = match r.body {
            RawBody::Event(e) => RecordBody::Event(e),
            RawBody::Sample {
                series,
                counter,
                value,
            } => {
                let def = &self
                    .by_id
                    .get(&series)
                    .ok_or(DecodeError("a sample refers to an unknown series"))?
                    .def;
                RecordBody::Sample {
                    name: def.name.clone(),
                    labels: def.labels.clone(),
                    value,
                    counter,
                }
            }
        };
        Ok(Record {
            seq: r.seq,
            at_unix_ms: r.at,
            body,
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// Chunks: an encoding byte ([`CHUNK_RAW`] or [`CHUNK_ZSTD`]: then the raw length and one zstd frame of the
// rest), first seq, first at, count, then per record: seq delta, zigzag at delta, tag, and either series id +
// value (samples: a zigzag varint when the value is an integer that an f64 holds exactly, else the f64's bits)
// or the event's fields. Varints (LEB128) throughout. A site's samples take 5-7 bytes raw, 1-3 compressed.

#[derive(Debug, Clone, PartialEq)]
enum RawBody {
    Sample {
        series: u64,
        counter: bool,
        value: f64,
    },
    Event(Event),
}

#[derive(Debug, Clone, PartialEq)]
struct RawRecord {
    seq: u64,
    at: u64,
    body: RawBody,
}

const TAG_GAUGE: u8 = 0;
const TAG_COUNTER: u8 = 1;
const TAG_EVENT: u8 = 2;
const TAG_GAUGE_INT: u8 = 3;
const TAG_COUNTER_INT: u8 = 4;

/// A chunk stored as written.
const CHUNK_RAW: u8 = 1;
/// A chunk stored as its raw length and one zstd frame of the raw chunk's body (everything after this byte).
const CHUNK_ZSTD: u8 = 2;
/// zstd level for chunks: level 1 gets most of the gain at a fraction of the CPU of higher levels.
const CHUNK_ZSTD_LEVEL: i32 = 1;
/// A chunk's raw body may be at most this large (a bound on what a damaged length can make the decoder
/// allocate; chunks close at [`CHUNK_MAX_BYTES`] plus one record).
const CHUNK_MAX_RAW_BYTES: u64 = 64 << 20;

/// The value as an integer when the varint form is exact (integral, within f64's exact range, not -0.0).
fn as_exact_int(v: f64) -> Option<i64> {
    const EXACT: f64 = (1u64 << 53) as f64;
    (v.fract() == 0.0 && v.abs() <= EXACT && !(v == 0.0 && v.is_sign_negative()))
        .then_some(v as i64)
}

#[derive(Default)]
struct ChunkWriter {
    body: Vec<u8>,
    count: u64,
    first_seq: u64,
    first_at: u64,
    prev_seq: u64,
    prev_at: u64,
}

impl ChunkWriter {
    fn len(&self) -> usize {
        self.body.len()
    }

    fn push(&mut self, r: &RawRecord) {
        if self.count == 0 {
            self.first_seq = r.seq;
            self.first_at = r.at;
            self.prev_seq = r.seq;
            self.prev_at = r.at;
        }
        self.count += 1;
        let out = &mut self.body;
        put_varint(out, r.seq.wrapping_sub(self.prev_seq));
        put_varint(out, zigzag(r.at.wrapping_sub(self.prev_at) as i64));
        self.prev_seq = r.seq;
        self.prev_at = r.at;
        match &r.body {
            RawBody::Sample {
                series,
                counter,
                value,
            } => match as_exact_int(*value) {
                Some(i) => {
                    out.push(if *counter {
                        TAG_COUNTER_INT
                    } else {
                        TAG_GAUGE_INT
                    });
                    put_varint(out, *series);
                    put_varint(out, zigzag(i));
                }
                None => {
                    out.push(if *counter { TAG_COUNTER } else { TAG_GAUGE });
                    put_varint(out, *series);
                    out.extend_from_slice(&value.to_le_bytes());
                }
            },
            RawBody::Event(e) => {
                out.push(TAG_EVENT);
                put_varint(out, zigzag(e.at_unix_ms.wrapping_sub(r.at) as i64));
                put_str(out, &e.component);
                put_str(out, &e.kind);
                out.push(match e.severity {
                    Severity::Info => 0,
                    Severity::Warning => 1,
                    Severity::Critical => 2,
                });
                put_str(out, &e.message);
            }
        }
    }

    /// (last seq, record count, encoded chunk): compressed when that saves at least an eighth.
    fn finish(self) -> (u64, u64, Vec<u8>) {
        let mut raw = Vec::with_capacity(self.body.len() + 24);
        put_varint(&mut raw, self.first_seq);
        put_varint(&mut raw, self.first_at);
        put_varint(&mut raw, self.count);
        raw.extend_from_slice(&self.body);
        let mut out = Vec::with_capacity(raw.len() / 3 + 16);
        if raw.len() >= 256 {
            if let Ok(frame) = zstd::bulk::compress(&raw, CHUNK_ZSTD_LEVEL) {
                if frame.len() + frame.len() / 8 < raw.len() {
                    out.push(CHUNK_ZSTD);
                    put_varint(&mut out, raw.len() as u64);
                    out.extend_from_slice(&frame);
                    return (self.prev_seq, self.count, out);
                }
            }
        }
        out.push(CHUNK_RAW);
        out.extend_from_slice(&raw);
        (self.prev_seq, self.count, out)
    }
}

fn decode_chunk(bytes: &[u8]) -> Result<Vec<RawRecord>, DecodeError> {
    match bytes.first() {
        Some(&CHUNK_RAW) => decode_chunk_body(&bytes[1..]),
        Some(&CHUNK_ZSTD) => {
            let mut r = Reader::new(&bytes[1..]);
            let len = r.varint()?;
            if len > CHUNK_MAX_RAW_BYTES {
                return Err(DecodeError("chunk larger than any the spool writes"));
            }
            let frame = r.rest();
            let raw = zstd::bulk::decompress(frame, len as usize)
                .map_err(|_| DecodeError("chunk does not decompress"))?;
            if raw.len() as u64 != len {
                return Err(DecodeError(
                    "chunk decompresses to another length than it says",
                ));
            }
            decode_chunk_body(&raw)
        }
        Some(_) => Err(DecodeError("unknown chunk encoding")),
        None => Err(DecodeError("truncated")),
    }
}

fn decode_chunk_body(bytes: &[u8]) -> Result<Vec<RawRecord>, DecodeError> {
    let mut r = Reader::new(bytes);
    let mut seq = r.varint()?;
    let mut at = r.varint()?;
    let count = r.varint()?;
    // Each record takes at least 3 bytes: a count beyond that is damage, not a reason to allocate.
    if count > bytes.len() as u64 {
        return Err(DecodeError("record count larger than the chunk"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let delta = r.varint()?;
        if i > 0 && delta == 0 {
            return Err(DecodeError("sequences not increasing"));
        }
        seq = seq
            .checked_add(delta)
            .ok_or(DecodeError("sequence overflow"))?;
        at = at.wrapping_add(unzigzag(r.varint()?) as u64);
        let body = match r.u8()? {
            tag @ (TAG_GAUGE | TAG_COUNTER) => RawBody::Sample {
                series: r.varint()?,
                counter: tag == TAG_COUNTER,
                value: r.f64()?,
            },
            tag @ (TAG_GAUGE_INT | TAG_COUNTER_INT) => RawBody::Sample {
                series: r.varint()?,
                counter: tag == TAG_COUNTER_INT,
                value: unzigzag(r.varint()?) as f64,
            },
            TAG_EVENT => {
                let event_at = at.wrapping_add(unzigzag(r.varint()?) as u64);
                let component = r.string()?;
                let kind = r.string()?;
                let severity = match r.u8()? {
                    0 => Severity::Info,
                    1 => Severity::Warning,
                    2 => Severity::Critical,
                    _ => return Err(DecodeError("unknown severity")),
                };
                RawBody::Event(Event {
                    at_unix_ms: event_at,
                    component,
                    kind,
                    severity,
                    message: r.string()?,
                })
            }
            _ => return Err(DecodeError("unknown record tag")),
        };
        out.push(RawRecord { seq, at, body });
    }
    r.end()?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
struct DecodeError(&'static str);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError("varint too long"))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError("truncated"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError("truncated"))?;
        self.pos = end;
        Ok(s)
    }

    fn f64(&mut self) -> Result<f64, DecodeError> {
        let b: [u8; 8] = self
            .bytes(8)?
            .try_into()
            .map_err(|_| DecodeError("truncated"))?;
        Ok(f64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let n = usize::try_from(self.varint()?).map_err(|_| DecodeError("string too long"))?;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError("string not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(series: usize, value: f64) -> RecordBody {
        RecordBody::Sample {
            name: "DCGM_FI_DEV_GPU_TEMP".into(),
            labels: vec![
                ("gpu".into(), series.to_string()),
                (
                    "UUID".into(),
                    format!("GPU-{series:08x}-1d2c-4b7e-9f00-000000000000"),
                ),
            ],
            value,
            counter: series % 2 == 1,
        }
    }

    fn event(n: u64) -> RecordBody {
        RecordBody::Event(Event {
            at_unix_ms: 1_700_000_000_000 + n,
            component: format!("gpu{n}"),
            kind: "xid".into(),
            severity: Severity::Critical,
            message: format!("XID 79 number {n}"),
        })
    }

    fn quick() -> SpoolConfig {
        SpoolConfig {
            flush_interval: Duration::from_millis(5),
            ..SpoolConfig::default()
        }
    }

    fn all_pending(spool: &Spool) -> Vec<Record> {
        spool.pending(0, usize::MAX, usize::MAX).unwrap()
    }

    #[test]
    fn append_flush_pending_ack_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), quick()).unwrap();
        let a = spool.append(1000, sample(0, 1.5)).unwrap();
        let b = spool.append(1001, event(1)).unwrap();
        let r = spool
            .append_many(vec![(1002, sample(1, -2.0)), (990, sample(0, f64::NAN))])
            .unwrap();
        assert!(a < b && b < r.start && r.end - r.start == 2);
        let durable = spool.flush().unwrap();
        assert!(durable >= r.end - 1);

        let got = all_pending(&spool);
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[0],
            Record {
                seq: a,
                at_unix_ms: 1000,
                body: sample(0, 1.5)
            }
        );
        assert_eq!(
            got[1],
            Record {
                seq: b,
                at_unix_ms: 1001,
                body: event(1)
            }
        );
        assert_eq!(got[2].body, sample(1, -2.0));
        assert_eq!(got[3].at_unix_ms, 990, "timestamps may go backwards");
        match &got[3].body {
            RecordBody::Sample { value, .. } => assert!(value.is_nan()),
            other => panic!("expected a sample, got {other:?}"),
        }
        let stats = spool.stats();
        assert_eq!(stats.depth, 4);
        assert_eq!(stats.oldest_unacked_at_unix_ms, Some(1000));

        spool.ack(b).unwrap();
        spool.ack(a).unwrap(); // older acknowledgements change nothing
        let got = all_pending(&spool);
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![r.start, r.start + 1]
        );
        assert_eq!(spool.stats().depth, 2);
        assert_eq!(spool.stats().acked_seq, b);

        spool.ack(u64::MAX).unwrap(); // clamped to what is durable
        assert!(all_pending(&spool).is_empty());
        let stats = spool.stats();
        assert_eq!((stats.depth, stats.acked_seq), (0, durable));
        assert_eq!(stats.oldest_unacked_at_unix_ms, None);
        // Every series is unused once everything is acknowledged.
        assert!(spool.inner.lock_store().series.by_id.is_empty());
    }

    #[test]
    fn a_spool_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Spool>();
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), quick()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let spool = Arc::clone(&spool);
                std::thread::spawn(move || {
                    (0..2000u64)
                        .map(|i| spool.append(i, sample(t, i as f64)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        spool.flush().unwrap();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 8000, "no sequence handed out twice");
        let stored: Vec<u64> = all_pending(&spool).iter().map(|r| r.seq).collect();
        assert_eq!(stored, seqs);
    }

    #[test]
    fn the_group_commit_makes_appends_durable_without_flush() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), quick()).unwrap();
        let seq = spool.append(1, sample(3, 3.0)).unwrap();
        assert!(spool.pending(0, 10, 10_000).unwrap().is_empty() || spool.durable_seq() >= seq);
        let deadline = Instant::now() + Duration::from_secs(5);
        while spool.durable_seq() < seq {
            assert!(Instant::now() < deadline, "the flusher never committed");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(spool.pending(0, 10, 10_000).unwrap().len(), 1);
    }

    #[test]
    fn sequences_and_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (last, expected) = {
            let spool = Spool::open(dir.path(), quick()).unwrap();
            let r = spool
                .append_many(
                    (0..100)
                        .map(|i| (i, sample(i as usize % 7, i as f64)))
                        .collect(),
                )
                .unwrap();
            spool.flush().unwrap();
            spool.ack(r.start + 9).unwrap();
            // Appended but never flushed explicitly: Drop commits it.
            let last = spool.append(500, event(5)).unwrap();
            (last, all_pending(&spool))
        };
        let spool = Spool::open(dir.path(), quick()).unwrap();
        let after = all_pending(&spool);
        assert_eq!(after.len(), 91);
        assert_eq!(&after[..90], &expected[..90]);
        assert_eq!(after[90].seq, last);
        let stats = spool.stats();
        assert_eq!(stats.depth, 91);
        assert!(stats.durable_seq >= last);
        let next = spool.append(600, sample(1, 1.0)).unwrap();
        assert!(
            next > last,
            "sequence {next} reused after reopen (last was {last})"
        );

        // Everything acknowledged, then reopened: sequences still go up.
        spool.flush().unwrap();
        spool.ack(next).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path(), quick()).unwrap();
        assert!(all_pending(&spool).is_empty());
        assert_eq!(spool.stats().acked_seq, next);
        assert!(spool.append(700, sample(1, 1.0)).unwrap() > next);
    }

    #[test]
    fn pending_respects_limits_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            flush_records: 7, // many small chunks
            ..quick()
        };
        let spool = Spool::open(dir.path(), cfg).unwrap();
        for i in 0..200u64 {
            let body = if i.is_multiple_of(10) {
                event(i)
            } else {
                sample(i as usize % 5, i as f64)
            };
            spool.append(i, body).unwrap();
        }
        spool.flush().unwrap();
        let all = all_pending(&spool);
        assert_eq!(all.len(), 200);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(
            all.iter().map(|r| r.at_unix_ms).collect::<Vec<_>>(),
            (0..200).collect::<Vec<_>>()
        );

        let page = spool.pending(0, 13, usize::MAX).unwrap();
        assert_eq!(page, all[..13]);
        let next = spool.pending(page[12].seq, 13, usize::MAX).unwrap();
        assert_eq!(next, all[13..26]);

        let budget = all[..5].iter().map(Record::approx_bytes).sum::<usize>();
        assert_eq!(spool.pending(0, 100, budget).unwrap(), all[..5]);
        assert_eq!(spool.pending(0, 100, budget - 1).unwrap(), all[..4]);
        // One record always comes, however small the byte limit.
        assert_eq!(spool.pending(0, 100, 1).unwrap(), all[..1]);
        assert!(spool.pending(0, 0, usize::MAX).unwrap().is_empty());
        assert!(spool
            .pending(all[199].seq, 10, usize::MAX)
            .unwrap()
            .is_empty());

        // Acknowledging into the middle of a chunk: the rest of it still comes.
        spool.ack(all[100].seq).unwrap();
        assert_eq!(
            spool.pending(0, usize::MAX, usize::MAX).unwrap(),
            all[101..]
        );
        assert_eq!(
            spool.pending(all[50].seq, 3, usize::MAX).unwrap(),
            all[101..104]
        );
        assert_eq!(spool.stats().depth, 99);
    }

    fn drops(spool: &Spool) -> SpoolDrops {
        spool.stats().drops
    }

    fn drop_events(records: &[Record]) -> Vec<&Event> {
        records
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::Event(e) if e.kind == DROP_EVENT_KIND => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn quota_thins_samples_first_then_drops_them_and_keeps_events() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            budget_bytes: 200_000,
            flush_records: 400,
            thin_keep_every: 4,
            ..quick()
        };
        let spool = Spool::open(dir.path(), cfg).unwrap();
        let mut events = Vec::new();
        let mut poll = 0u64;
        let mut feed = |spool: &Spool, polls: u64| {
            for _ in 0..polls {
                let items = (0..40)
                    .map(|s| (poll * 1000, sample(s, poll as f64)))
                    .collect();
                spool.append_many(items).unwrap();
                if poll.is_multiple_of(10) {
                    events.push(spool.append(poll * 1000, event(poll)).unwrap());
                }
                spool.flush().unwrap();
                poll += 1;
            }
        };

        // Until the budget is reached, nothing is touched.
        feed(&spool, 30);
        assert_eq!(drops(&spool), SpoolDrops::default());
        // Over it: thinning only, for a while.
        while drops(&spool).thinned_samples == 0 {
            feed(&spool, 10);
        }
        let d = drops(&spool);
        assert_eq!((d.dropped_samples, d.dropped_events), (0, 0));
        let stats = spool.stats();
        assert!(stats.bytes_used <= stats.budget_bytes, "{stats:?}");
        let records = all_pending(&spool);
        let reports = drop_events(&records);
        assert_eq!(reports.len(), 1, "one pass, one report");
        assert_eq!(reports[0].severity, Severity::Warning);
        assert!(
            reports[0]
                .message
                .contains(&format!("thinned {}", d.thinned_samples)),
            "{}",
            reports[0].message
        );
        // The oldest samples were thinned to every 4th of each series.
        let gpu0: Vec<f64> = records
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::Sample { labels, value, .. } if labels[0].1 == "0" => Some(*value),
                _ => None,
            })
            .collect();
        assert_eq!(&gpu0[..3], &[0.0, 4.0, 8.0], "{gpu0:?}");

        // Keep feeding: once everything is thinned, the oldest samples go, and still no event.
        while drops(&spool).dropped_samples == 0 {
            feed(&spool, 20);
        }
        assert_eq!(drops(&spool).dropped_events, 0);
        // The flusher may add a drop report between two reads: take a view in which the depth held still.
        // Buffered records count in the depth but are not pending until flushed.
        let (records, stats) = loop {
            spool.flush().unwrap();
            let before = spool.stats().depth;
            let records = all_pending(&spool);
            let stats = spool.stats();
            if stats.depth == before && stats.buffered == 0 {
                break (records, stats);
            }
        };
        let kept_events: Vec<u64> = records
            .iter()
            .filter(|r| matches!(&r.body, RecordBody::Event(e) if e.kind == "xid"))
            .map(|r| r.seq)
            .collect();
        assert_eq!(
            kept_events, events,
            "every event is kept while samples can go"
        );
        assert!(stats.bytes_used <= stats.budget_bytes, "{stats:?}");
        assert_eq!(stats.depth, records.len() as u64);
        // Every pass reported itself, and the counts add up.
        let reports = drop_events(&records);
        assert!(reports.len() >= 2);
        assert!(reports
            .iter()
            .any(|e| e.message.contains("dropped") && !e.message.contains("dropped 0 samples")));

        // Reopened, the counts are still there.
        let before = drops(&spool);
        drop(spool);
        let spool = Spool::open(
            dir.path(),
            SpoolConfig {
                budget_bytes: 200_000,
                ..quick()
            },
        )
        .unwrap();
        assert_eq!(drops(&spool), before);
    }

    #[test]
    fn events_go_last_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            budget_bytes: 60_000,
            ..quick()
        };
        let spool = Spool::open(dir.path(), cfg).unwrap();
        spool
            .append_many((0..200).map(|i| (i, sample(i as usize % 3, 0.0))).collect())
            .unwrap();
        let mut n = 0;
        while drops(&spool).dropped_events == 0 {
            spool.append(n, event(n)).unwrap();
            n += 1;
            if n.is_multiple_of(50) {
                spool.flush().unwrap();
            }
            assert!(n < 100_000);
        }
        spool.flush().unwrap();
        let d = drops(&spool);
        assert_eq!(
            d.thinned_samples + d.dropped_samples,
            200,
            "all samples went first: {d:?}"
        );
        let records = all_pending(&spool);
        assert!(records
            .iter()
            .all(|r| matches!(r.body, RecordBody::Event(_))));
        // The oldest events went; the newest are there.
        let xids: Vec<u64> = records
            .iter()
            .filter_map(|r| match &r.body {
                RecordBody::Event(e) if e.kind == "xid" => Some(r.at_unix_ms),
                _ => None,
            })
            .collect();
        assert_eq!(*xids.last().unwrap(), n - 1);
        assert!(xids[0] > 0);
        assert!(!drop_events(&records).is_empty());
        assert!(spool.stats().bytes_used <= 60_000);
    }

    #[test]
    fn the_room_a_merge_makes_is_not_freed_again_by_dropping_events() {
        // One chunk per event, as when the flusher keeps up: the quota's merge of those small chunks alone
        // frees most of what it needs, so it must drop only a few events, not all of them.
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            budget_bytes: 60_000,
            ..quick()
        };
        let spool = Spool::open(dir.path(), cfg).unwrap();
        let mut n = 0;
        while drops(&spool).dropped_events == 0 && drops(&spool).thinned_samples == 0 {
            spool.append(n, event(n)).unwrap();
            spool.flush().unwrap();
            n += 1;
            assert!(n < 100_000);
        }
        let kept = all_pending(&spool)
            .iter()
            .filter(|r| matches!(&r.body, RecordBody::Event(e) if e.kind == "xid"))
            .count() as u64;
        assert!(
            kept * 2 > n,
            "kept {kept} of {n} events: {:?}",
            drops(&spool)
        );
        assert!(spool.stats().bytes_used <= 60_000);
    }

    #[test]
    fn a_damaged_chunk_is_discarded_counted_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), quick()).unwrap();
        let a = spool.append(1, sample(1, 1.0)).unwrap();
        spool.flush().unwrap();
        let b = spool.append(2, sample(1, 2.0)).unwrap();
        spool.flush().unwrap();
        spool
            .inner
            .lock_store()
            .db
            .insert(chunk_key(a), &[1u8, 200, 1][..])
            .unwrap();
        let got = all_pending(&spool);
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![b]);
        assert_eq!(drops(&spool).corrupt_chunks, 1);
        spool.flush().unwrap();
        let got = all_pending(&spool);
        assert_eq!(got.len(), 2);
        assert!(drop_events(&got)[0].message.contains("damaged"));
    }

    #[test]
    fn a_newer_format_is_refused_with_a_sentence() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(dir.path(), quick()).unwrap());
        {
            let db = open_sled(&gen_dir(dir.path(), 0), &quick()).unwrap();
            let mut v = Vec::new();
            put_varint(&mut v, FORMAT_VERSION + 1);
            db.insert(META_KEY, v).unwrap();
            db.flush().unwrap();
        }
        let e = Spool::open(dir.path(), quick()).unwrap_err();
        assert!(matches!(e, SpoolError::NewerFormat { .. }));
        assert!(e.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn a_damaged_spool_is_set_aside_and_a_new_one_started_but_a_newer_one_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let damage = |marker: u8| {
            let spool = Spool::open(&dir, quick()).unwrap();
            spool.append(1, event(u64::from(marker))).unwrap();
            spool.flush().unwrap();
            drop(spool);
            let db = open_sled(&gen_dir(&dir, 0), &quick()).unwrap();
            // A varint that never ends: the counters no longer decode.
            db.insert(META_KEY, vec![0x80]).unwrap();
            db.flush().unwrap();
        };
        damage(1);
        assert!(Spool::open(&dir, quick()).unwrap_err().is_damage());
        let (spool, aside) = Spool::open_or_set_aside(&dir, quick()).unwrap();
        let aside = aside.expect("the damaged spool was set aside");
        assert_eq!(aside.moved_to, root.path().join("spool.damaged"));
        assert!(
            aside.reason.contains("damaged") && aside.reason.contains("counters"),
            "{}",
            aside.reason
        );
        assert!(
            aside.moved_to.join("CURRENT").exists(),
            "kept for diagnosis"
        );
        let stats = spool.stats();
        assert_eq!((stats.depth, stats.durable_seq), (0, 0), "a new spool");
        spool.append(2, event(7)).unwrap();
        assert_eq!(spool.flush().unwrap(), 1);
        drop(spool);
        // Healthy now: opened as it is, nothing moved.
        let (spool, aside) = Spool::open_or_set_aside(&dir, quick()).unwrap();
        assert!(aside.is_none());
        assert_eq!(spool.stats().depth, 1);
        drop(spool);
        // A second damage replaces the first copy rather than piling up copies.
        std::fs::remove_dir_all(&dir).unwrap();
        damage(2);
        let (_spool, aside) = Spool::open_or_set_aside(&dir, quick()).unwrap();
        assert!(aside.is_some());
        let copies = std::fs::read_dir(root.path()).unwrap().count();
        assert_eq!(copies, 2, "spool and one spool.damaged");

        // A newer cairnd's spool is not damage: refused, and left where it is for that cairnd.
        let newer = root.path().join("newer");
        drop(Spool::open(&newer, quick()).unwrap());
        {
            let db = open_sled(&gen_dir(&newer, 0), &quick()).unwrap();
            let mut v = Vec::new();
            put_varint(&mut v, FORMAT_VERSION + 1);
            db.insert(META_KEY, v).unwrap();
            db.flush().unwrap();
        }
        let e = Spool::open_or_set_aside(&newer, quick()).unwrap_err();
        assert!(matches!(e, SpoolError::NewerFormat { .. }));
        assert!(!root.path().join("newer.damaged").exists());
    }

    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }

    fn gens(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("gen-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn compaction_keeps_sled_files_within_the_budget_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MIN_BUDGET_BYTES;
        let cfg = SpoolConfig {
            budget_bytes: budget,
            thin_keep_every: 4,
            ..quick()
        };
        let spool = Spool::open(dir.path(), cfg.clone()).unwrap();
        let series = site_series();
        let mut max_disk = 0;
        let mut poll = 0u64;
        // Everything in the directory, sampled all along: also while a compaction writes its copy.
        let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let watcher = {
            let (dir, watching) = (dir.path().to_path_buf(), watching.clone());
            std::thread::spawn(move || {
                let mut peak = 0;
                while watching.load(Ordering::Relaxed) {
                    peak = peak.max(dir_bytes(&dir));
                    std::thread::sleep(Duration::from_millis(1));
                }
                peak
            })
        };
        while spool.stats().compactions < 2 {
            let items = series
                .iter()
                .take(200)
                .map(|(name, labels)| {
                    let body = RecordBody::Sample {
                        name: name.clone(),
                        labels: labels.clone(),
                        value: poll as f64,
                        counter: false,
                    };
                    (poll, body)
                })
                .collect();
            spool.append_many(items).unwrap();
            spool.append(poll, event(poll)).unwrap();
            spool.flush().unwrap();
            max_disk = max_disk.max(spool.stats().bytes_on_disk);
            poll += 1;
            assert!(poll < 20_000, "never compacted: {:?}", spool.stats());
        }
        watching.store(false, Ordering::Relaxed);
        let peak = watcher.join().unwrap();
        let stats = spool.stats();
        println!("after {poll} polls: {stats:?}, largest sled files {max_disk}, peak of the directory {peak}");
        assert!(max_disk < budget, "{max_disk}");
        assert!(peak <= budget, "the spool's directory reached {peak} bytes");
        assert_eq!(gens(dir.path()), vec![format!("gen-{}", 2)]);
        let records = all_pending(&spool);
        assert_eq!(records.len() as u64, stats.depth);
        let xids = records
            .iter()
            .filter(|r| matches!(&r.body, RecordBody::Event(e) if e.kind == "xid"))
            .count();
        assert_eq!(xids as u64, poll, "every event is still there");
        drop(spool);
        let spool = Spool::open(dir.path(), cfg).unwrap();
        assert_eq!(all_pending(&spool), records);
    }

    #[test]
    fn leftovers_of_an_interrupted_compaction_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let seq = {
            let spool = Spool::open(dir.path(), quick()).unwrap();
            spool.append(5, event(5)).unwrap()
        };
        // A compaction that died before switching CURRENT: a half-written next generation.
        std::fs::create_dir(dir.path().join("gen-1")).unwrap();
        std::fs::write(dir.path().join("gen-1/db"), b"half a copy").unwrap();
        let spool = Spool::open(dir.path(), quick()).unwrap();
        assert_eq!(gens(dir.path()), vec!["gen-0".to_owned()]);
        assert_eq!(all_pending(&spool)[0].seq, seq);
        drop(spool);
        std::fs::write(dir.path().join(CURRENT_FILE), "gen-x\n").unwrap();
        let e = Spool::open(dir.path(), quick()).unwrap_err();
        assert!(e.to_string().contains("CURRENT"), "{e}");
    }

    #[test]
    fn encodings_round_trip() {
        let records = vec![
            RawRecord {
                seq: 7,
                at: 5,
                body: RawBody::Sample {
                    series: 300,
                    counter: true,
                    value: 1e300,
                },
            },
            RawRecord {
                seq: 9,
                at: 1,
                body: RawBody::Sample {
                    series: 0,
                    counter: false,
                    value: -0.0,
                },
            },
            RawRecord {
                seq: u64::MAX,
                at: u64::MAX,
                body: RawBody::Event(Event {
                    at_unix_ms: 0,
                    component: "ü".into(),
                    kind: String::new(),
                    severity: Severity::Info,
                    message: "m".repeat(300),
                }),
            },
        ];
        let mut w = ChunkWriter::default();
        for r in &records {
            w.push(r);
        }
        let (last, count, bytes) = w.finish();
        assert_eq!((last, count), (u64::MAX, 3));
        assert_eq!(decode_chunk(&bytes).unwrap(), records);
        for cut in 0..bytes.len() {
            assert!(decode_chunk(&bytes[..cut]).is_err());
        }

        // Integral values go as varints, everything else bit for bit; a chunk that compresses is stored as zstd.
        let values = [
            0.0,
            -0.0,
            42.0,
            -7.0,
            9_007_199_254_740_992.0,
            9_007_199_254_740_994.0,
            0.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ];
        let many: Vec<RawRecord> = (0..2000u64)
            .map(|i| RawRecord {
                seq: 100 + i,
                at: 1_790_000_000_000 + i / 100 * 10_000,
                body: RawBody::Sample {
                    series: i % 100,
                    counter: i % 3 == 0,
                    value: values[i as usize % values.len()],
                },
            })
            .collect();
        let mut w = ChunkWriter::default();
        for r in &many {
            w.push(r);
        }
        let raw_len = w.len();
        let (_, count, bytes) = w.finish();
        assert_eq!(count, 2000);
        assert_eq!(bytes[0], CHUNK_ZSTD);
        assert!(bytes.len() * 4 < raw_len, "{} vs {raw_len}", bytes.len());
        let back = decode_chunk(&bytes).unwrap();
        assert_eq!(back.len(), many.len());
        for (a, b) in back.iter().zip(&many) {
            let (RawBody::Sample { value: va, .. }, RawBody::Sample { value: vb, .. }) =
                (&a.body, &b.body)
            else {
                panic!("not a sample")
            };
            assert_eq!(va.to_bits(), vb.to_bits(), "value of seq {}", b.seq);
            assert_eq!((a.seq, a.at), (b.seq, b.at));
        }
        for cut in (0..bytes.len()).step_by(7) {
            assert!(decode_chunk(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A length that lies, an unknown encoding, a frame that is not zstd: refused, not a panic.
        let mut lying = vec![CHUNK_ZSTD];
        put_varint(&mut lying, 10);
        lying.extend_from_slice(&bytes[2..]);
        assert!(decode_chunk(&lying).is_err());
        let mut huge = vec![CHUNK_ZSTD];
        put_varint(&mut huge, u64::MAX);
        assert!(decode_chunk(&huge).is_err());
        assert!(decode_chunk(&[9, 0, 0, 0]).is_err());
        assert!(decode_chunk(&[CHUNK_ZSTD, 4, 1, 2, 3, 4]).is_err());
        let def = SeriesDef {
            name: "n".into(),
            labels: vec![("a".into(), "b".into())],
        };
        assert_eq!(SeriesDef::decode(&def.encode()).unwrap(), def);
        let meta = Meta {
            reserved_hi: 1 << 40,
            acked: 3,
            stored_bytes: 99,
            ..Meta::default()
        };
        assert_eq!(
            Meta::decode(&meta.encode()).unwrap(),
            (FORMAT_VERSION, meta)
        );
    }

    /// A realistic site: ~1000 series of exporter-style names and labels, polled every 10 s.
    pub(crate) fn site_series() -> Vec<(String, Vec<(String, String)>)> {
        let mut out = Vec::new();
        let gpu_metrics = [
            "DCGM_FI_DEV_GPU_TEMP",
            "DCGM_FI_DEV_POWER_USAGE",
            "DCGM_FI_DEV_GPU_UTIL",
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "DCGM_FI_DEV_FB_USED",
            "DCGM_FI_DEV_FB_FREE",
            "DCGM_FI_DEV_SM_CLOCK",
            "DCGM_FI_DEV_MEM_CLOCK",
            "DCGM_FI_DEV_XID_ERRORS",
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        ];
        for node in 0..8 {
            for gpu in 0..8 {
                for m in gpu_metrics {
                    out.push((
                        m.to_owned(),
                        vec![
                            ("gpu".into(), gpu.to_string()),
                            (
                                "UUID".into(),
                                format!("GPU-{node:02x}{gpu:02x}c3f1-8e2a-4b7e-9f00-5a1d2c3b4e5f"),
                            ),
                            (
                                "pci_bus_id".into(),
                                format!("00000000:{:02X}:00.0", 0x18 + gpu * 0x10),
                            ),
                            ("device".into(), format!("nvidia{gpu}")),
                            ("modelName".into(), "NVIDIA H100 80GB HBM3".into()),
                            ("Hostname".into(), format!("gpu-node-{node:02}")),
                        ],
                    ));
                }
            }
        }
        let node_metrics = [
            "node_hwmon_temp_celsius",
            "node_hwmon_fan_rpm",
            "node_rapl_package_joules_total",
        ];
        while out.len() < 1000 {
            let i = out.len();
            out.push((
                node_metrics[i % 3].to_owned(),
                vec![
                    ("chip".into(), format!("platform_nct6775_{}", i % 7)),
                    ("sensor".into(), format!("temp{}", i % 13)),
                    ("instance".into(), format!("gpu-node-{:02}:9100", i % 8)),
                ],
            ));
        }
        out
    }

    /// A long outage under the quota: 10M samples into a 32 MiB budget, thinning then dropping. Prints sled's
    /// file size as it goes and checks it never passes the budget by more than one commit's worth. About a
    /// minute in debug: `cargo test -p cairn-agent --lib spool::tests::soak -- --ignored --nocapture`
    /// (`CAIRN_SPOOL_SOAK_RECORDS`, `CAIRN_SPOOL_SOAK_BUDGET`, `CAIRN_SPOOL_SOAK_THIN` change it).
    #[test]
    #[ignore = "a minute long; run by hand"]
    fn soak_under_quota() {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let n = env("CAIRN_SPOOL_SOAK_RECORDS", 10_000_000) as usize;
        let budget = env("CAIRN_SPOOL_SOAK_BUDGET", 32 << 20);
        let cfg = SpoolConfig {
            budget_bytes: budget,
            thin_keep_every: env("CAIRN_SPOOL_SOAK_THIN", 10) as u32,
            ..SpoolConfig::default()
        };
        let series = site_series();
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), cfg).unwrap();
        let mut max_disk = 0;
        for i in 0..n {
            let (name, labels) = &series[i % series.len()];
            let poll = (i / series.len()) as u64;
            let body = RecordBody::Sample {
                name: name.clone(),
                labels: labels.clone(),
                value: i as f64,
                counter: false,
            };
            spool.append(poll * 10_000, body).unwrap();
            if i % 1000 == 999 {
                spool.flush().unwrap();
                max_disk = max_disk.max(spool.stats().bytes_on_disk);
            }
            if i % (n / 10).max(1) == (n / 10).max(1) - 1 {
                let s = spool.stats();
                println!(
                    "{i}: depth {} stored {} sled files {} ({:.2}x) compactions {} {:?}",
                    s.depth,
                    s.bytes_stored,
                    s.bytes_on_disk,
                    s.bytes_on_disk as f64 / s.bytes_stored as f64,
                    s.compactions,
                    s.drops
                );
            }
        }
        println!("budget {budget}, largest sled files {max_disk}");
        assert!(max_disk <= budget + budget / 10, "{max_disk} > {budget}");
    }

    /// Measures, prints, asserts nothing about time: append throughput with group commit, bytes per sample,
    /// and reopen time with a 1M-record backlog. Meaningful in release:
    /// `cargo test --release -p cairn-agent --lib spool::tests::large -- --nocapture`
    #[test]
    fn large_backlog_reopens_fast() {
        let n: usize = std::env::var("CAIRN_SPOOL_BENCH_RECORDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let series = site_series();
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolConfig::default()).unwrap();
        let t0 = 1_700_000_000_000u64;
        let start = Instant::now();
        for i in 0..n {
            let (name, labels) = &series[i % series.len()];
            let poll = (i / series.len()) as u64;
            let body = RecordBody::Sample {
                name: name.clone(),
                labels: labels.clone(),
                value: (poll as f64 * 0.37 + i as f64).sin() * 100.0,
                counter: false,
            };
            spool.append(t0 + poll * 10_000, body).unwrap();
        }
        let durable = spool.flush().unwrap();
        let secs = start.elapsed().as_secs_f64();
        let stats = spool.stats();
        assert_eq!(stats.depth, n as u64);
        assert!(durable >= stats.next_seq - 1);
        println!(
            "spool: {n} samples of {} series appended one by one and durable in {secs:.2} s: {:.0} records/s",
            series.len(),
            n as f64 / secs
        );
        println!(
            "spool: stored {} bytes ({:.1} per sample), sled files {} bytes ({:.1} per sample), quota counts {} bytes",
            stats.bytes_stored,
            stats.bytes_stored as f64 / n as f64,
            stats.bytes_on_disk,
            stats.bytes_on_disk as f64 / n as f64,
            stats.bytes_used
        );
        drop(spool);

        let start = Instant::now();
        let spool = Spool::open(dir.path(), SpoolConfig::default()).unwrap();
        let opened = start.elapsed();
        let first = spool.pending(0, 1000, usize::MAX).unwrap();
        let stats = spool.stats();
        println!(
            "spool: reopened with {} records in {:.1} ms; first 1000 pending in {:.1} ms total",
            stats.depth,
            opened.as_secs_f64() * 1000.0,
            start.elapsed().as_secs_f64() * 1000.0
        );
        assert_eq!(first.len(), 1000.min(n));
        if let Some(r) = first.first() {
            println!(
                "spool: for comparison, one such record is {} bytes as serde_json, {} by approx_bytes",
                serde_json::to_vec(r).unwrap().len(),
                r.approx_bytes()
            );
        }
        assert_eq!(stats.depth, n as u64);

        let start = Instant::now();
        let before = spool.stats().bytes_on_disk;
        spool.inner.compact(&mut spool.inner.lock_store()).unwrap();
        println!(
            "spool: compacted {} stored bytes in {:.1} ms: sled files {before} -> {} bytes",
            stats.bytes_stored,
            start.elapsed().as_secs_f64() * 1000.0,
            spool.stats().bytes_on_disk
        );
        assert_eq!(spool.pending(0, 1000, usize::MAX).unwrap(), first);

        let start = Instant::now();
        spool.ack(stats.durable_seq).unwrap();
        spool.flush().unwrap();
        println!(
            "spool: acknowledged {n} records in {:.1} ms; sled files now {} bytes",
            start.elapsed().as_secs_f64() * 1000.0,
            spool.stats().bytes_on_disk
        );
        assert_eq!(spool.stats().depth, 0);
    }
}
