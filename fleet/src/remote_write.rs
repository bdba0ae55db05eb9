//! Re-export of verified metric samples with Prometheus remote write (protocol 1.0): every sample the ingest
//! path stores for the first time (never a duplicate) is queued here and POSTed to `serve --remote-write URL`
//! as a snappy-compressed protobuf `prometheus.WriteRequest`.
//!
//! **Series.** A sample's name becomes `__name__`; its labels pass through unchanged (an empty value is
//! dropped: to Prometheus it is the same as no label), and the fleet adds [`DEVICE_LABEL`] with the id of
//! the device that signed the batch. Not `device`: the agent already uses `device` the way node_exporter and
//! the DCGM exporter do (`device="nvme0"`, `device="nvidia0"`), and renaming those (`exported_device`)
//! would break every dashboard written for the upstream names. No `instance` either: to Prometheus it is the
//! scrape target's address, which a pushed sample does not have, and a sample that already carries one
//! (the agent's own, say) keeps it. Labels are sorted by name as bytes, `__name__` among them, as the
//! receiver requires. A sample the receiver could never take is counted `invalid` and not sent: a bad
//! metric or label name, a label name the device may not use (`__…` or [`DEVICE_LABEL`], which would let a
//! device speak for another), a repeated label name, a timestamp past 2^63 ms, or a second value for the
//! same series and millisecond. NaN is sent as Prometheus' ordinary NaN, never its staleness marker.
//!
//! **Queue and requests.** Bounded ([`ExportOptions::max_queue_samples`], [`ExportOptions::max_queue_bytes`]):
//! over either bound the oldest samples are dropped and counted. One task sends: it takes up to
//! [`ExportOptions::max_samples_per_request`] samples (and about [`ExportOptions::max_request_bytes`]) from
//! the front, and sends one request per device among them, each series once with its samples oldest first.
//! Per device, because Prometheus takes a request whole or not at all: a device's stale backlog (older than
//! the receiver's head, or out of order) then costs only that device's request. A transport error, a 5xx or
//! a 429 is retried with doubling backoff up to [`ExportOptions::max_backoff`], the spec's rule; any other
//! 4xx is not retried, and its samples are counted `rejected`. The queue lives in memory: samples queued when
//! the fleet stops are not exported (they stay in the stored batches).
//!
//! **Transport.** Plain `http://` only. The receiver is normally a Prometheus next to the fleet, or a TLS
//! proxy in front of a remote one; a fleet-side https client (rustls with the system roots) is a later step.
//!
//! **Snappy.** The body is a valid snappy *block* (the format the spec names, not the framed stream) made
//! only of literal elements: the uncompressed length as a varint, then the bytes in literals of at most 64
//! KiB. Every snappy decoder reads it; it is about 3 bytes per 64 KiB larger than the protobuf, which on the
//! LAN between a fleet and its Prometheus costs less than a compression dependency (and the code to vet) would.
//!
//! **Counters** ([`ExportStats`]) are kept in memory and written every few seconds to
//! `<state>/telemetry/export.json` ([`STATS_FILE`]), which `cairn-fleet telemetry` shows.

use cairn_proto::telemetry::{WireBody, WireRecord};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The label carrying the id of the device that signed a sample.
pub const DEVICE_LABEL: &str = "cairn_device";
/// The counters' file, under `<state>/telemetry/`.
pub const STATS_FILE: &str = "export.json";
/// The remote-write version header value of protocol 1.0.
pub const REMOTE_WRITE_VERSION: &str = "0.1.0";
/// Prometheus' ordinary NaN (`value.NormalNaN`); its staleness marker is another NaN, 0x7ff0000000000002.
const NORMAL_NAN: u64 = 0x7ff8_0000_0000_0001;
/// The longest literal element written (snappy allows up to 2^32; 64 KiB is what compressors emit).
const MAX_LITERAL: usize = 1 << 16;
/// The most of a refusal's body kept for `last_error`.
const MAX_ERROR_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the remote-write URL {url:?} is not valid ({reason}); give one like http://prometheus:9090/api/v1/write")]
    Url { url: String, reason: String },
    #[error("the remote-write URL {0:?} uses https, which the fleet does not speak yet; use http:// to a Prometheus on a trusted network, or a local TLS proxy")]
    Https(String),
    #[error("the remote-write exporter must start inside the fleet's tokio runtime")]
    NoRuntime,
}

/// Where requests go: a parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, ExportError> {
        let bad = |reason: &str| ExportError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(ExportError::Https(url.to_owned())),
            _ => return Err(bad("it must start with http://")),
        }
        let authority = uri.authority().ok_or_else(|| bad("it names no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user names and passwords in the URL are not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("it names no host"));
        }
        Ok(Endpoint {
            url: url.to_owned(),
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub endpoint: Endpoint,
    /// Most samples waiting; over it the oldest are dropped.
    pub max_queue_samples: usize,
    /// Most memory the waiting samples and their series take, as [`Queue`] counts it; over it the oldest go.
    pub max_queue_bytes: usize,
    pub max_samples_per_request: usize,
    /// A soft cap on a request's protobuf size (at least one sample is always sent).
    pub max_request_bytes: usize,
    /// One attempt (connect, send, read the answer) gives up after this long.
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Where the counters are written (`<state>/telemetry/export.json`); none in tests that do not care.
    pub stats_file: Option<PathBuf>,
    pub stats_interval: Duration,
}

impl ExportOptions {
    /// The defaults: 1,000,000 samples or 256 MiB queued, 5,000 samples or 4 MiB a request, 30 s per
    /// attempt, backoff from 100 ms to 30 s, counters under `state` every 2 s.
    pub fn new(endpoint: Endpoint, state: Option<&Path>) -> ExportOptions {
        ExportOptions {
            endpoint,
            max_queue_samples: 1_000_000,
            max_queue_bytes: 256 << 20,
            max_samples_per_request: 5_000,
            max_request_bytes: 4 << 20,
            timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            stats_file: state.map(stats_path),
            stats_interval: Duration::from_secs(2),
        }
    }
}

fn stats_path(state: &Path) -> PathBuf {
    state.join("telemetry").join(STATS_FILE)
}

/// What the exporter has done since the fleet started. Samples are counted once, in the first of `exported`,
/// `dropped`, `invalid` or `rejected` that applies; `queued` are still waiting (or in the request being sent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStats {
    pub url: String,
    pub queued: u64,
    /// Samples the receiver accepted.
    pub exported: u64,
    /// Samples dropped, oldest first, because the queue was full (the receiver was down or slow).
    pub dropped: u64,
    /// Samples never sent because the receiver could not take them (see the module docs).
    pub invalid: u64,
    /// Samples in requests the receiver refused with a 4xx other than 429 (too old, out of order, …).
    pub rejected: u64,
    /// Requests the receiver accepted.
    pub requests: u64,
    /// Attempts that failed: transport errors and 5xx/429 (both retried), and other 4xx.
    pub failed_requests: u64,
    pub last_error: Option<String>,
    pub last_error_unix: Option<u64>,
    pub last_success_unix: Option<u64>,
    pub updated_unix: u64,
}

/// The counters a serving fleet last wrote under `state`, if it exports.
pub fn read_stats(state: &Path) -> Option<ExportStats> {
    let bytes = std::fs::read(stats_path(state)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Removes counters a previous run left (a fleet serving without `--remote-write` exports nothing).
pub fn forget_stats(state: &Path) {
    let _ = std::fs::remove_file(stats_path(state));
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// Protobuf (hand-encoded: four messages, two wire types)

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// Field `field` with wire type 2 (length-delimited).
fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The `labels` fields (1) of a TimeSeries: each a `Label{string name = 1; string value = 2}`, in the order
/// given (the caller sorts them).
pub fn encode_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut label = Vec::new();
    for (name, value) in labels {
        label.clear();
        put_bytes(&mut label, 1, name.as_bytes());
        put_bytes(&mut label, 2, value.as_bytes());
        put_bytes(&mut out, 1, &label);
    }
    out
}

/// `Sample{double value = 1; int64 timestamp = 2}`, both fields always written.
fn sample_len(ts: i64) -> usize {
    1 + 8 + 1 + varint_len(ts as u64)
}

/// Appends one `timeseries` field (1) of a WriteRequest: the encoded labels, then the samples as field 2.
fn put_series(out: &mut Vec<u8>, labels: &[u8], samples: &[(f64, i64)]) {
    let len = labels.len()
        + samples
            .iter()
            .map(|&(_, ts)| {
                let n = sample_len(ts);
                1 + varint_len(n as u64) + n
            })
            .sum::<usize>();
    out.push(1 << 3 | 2);
    put_varint(out, len as u64);
    out.extend_from_slice(labels);
    for &(value, ts) in samples {
        out.push(2 << 3 | 2);
        put_varint(out, sample_len(ts) as u64);
        out.push(1 << 3 | 1);
        out.extend_from_slice(&value.to_bits().to_le_bytes());
        out.push(2 << 3);
        put_varint(out, ts as u64);
    }
}

/// One series of a request, as [`encode_write_request`] takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeSeries {
    /// Sorted by name (as bytes), `__name__` included.
    pub labels: Vec<(String, String)>,
    /// (value, milliseconds since the Unix epoch), oldest first.
    pub samples: Vec<(f64, i64)>,
}

/// `WriteRequest{repeated TimeSeries timeseries = 1}` as protobuf bytes (before snappy).
pub fn encode_write_request(series: &[TimeSeries]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in series {
        let labels = encode_labels(s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        put_series(&mut out, &labels, &s.samples);
    }
    out
}

/// `data` as a snappy block of literal elements only (see the module docs for why).
pub fn snappy_literal(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 10 + 3 * data.len().div_ceil(MAX_LITERAL));
    put_varint(&mut out, data.len() as u64);
    for chunk in data.chunks(MAX_LITERAL) {
        let n = chunk.len() - 1;
        if n < 60 {
            out.push((n as u8) << 2);
        } else if n < 1 << 8 {
            out.extend_from_slice(&[60 << 2, n as u8]);
        } else {
            // MAX_LITERAL - 1 fits two bytes.
            out.push(61 << 2);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        out.extend_from_slice(chunk);
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Series and the queue

/// A series as sent: its device and its encoded, sorted labels (device label included).
#[derive(Debug)]
struct Series {
    device: Arc<str>,
    labels: Box<[u8]>,
}

#[derive(Debug)]
struct Entry {
    series: Arc<Series>,
    value: f64,
    ts: i64,
    /// What this entry frees when it leaves the queue: itself, plus its series for the batch's last sample
    /// of that series (entries leave in order, so the series is freed with it).
    cost: usize,
}

const ENTRY_COST: usize = std::mem::size_of::<Entry>();
const SERIES_COST: usize = std::mem::size_of::<Series>() + 16;

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
        && s != DEVICE_LABEL
}

/// The series of a sample, or None when the receiver could not take it.
fn series_labels(device: &str, name: &str, labels: &[(String, String)]) -> Option<Vec<u8>> {
    if !valid_metric_name(name) {
        return None;
    }
    let mut all: Vec<(&str, &str)> = Vec::with_capacity(labels.len() + 2);
    all.push(("__name__", name));
    all.push((DEVICE_LABEL, device));
    for (k, v) in labels {
        if !valid_label_name(k) {
            return None;
        }
        if !v.is_empty() {
            all.push((k, v));
        }
    }
    all.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    if all.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    // A label with an empty value counts as absent; a repeated name with one empty value is still a repeat.
    let mut names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    Some(encode_labels(all))
}

/// The waiting samples, bounded by count and by memory; over a bound the oldest go.
#[derive(Debug, Default)]
struct Queue {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl Queue {
    /// Adds entries, then drops from the front until both bounds hold; returns how many were dropped.
    fn push(&mut self, entries: Vec<Entry>, max_samples: usize, max_bytes: usize) -> u64 {
        for e in entries {
            self.bytes += e.cost;
            self.entries.push_back(e);
        }
        let mut dropped = 0;
        while self.entries.len() > max_samples
            || (self.bytes > max_bytes && !self.entries.is_empty())
        {
            if let Some(e) = self.entries.pop_front() {
                self.bytes = self.bytes.saturating_sub(e.cost);
                dropped += 1;
            }
        }
        dropped
    }

    /// Up to `max_samples` entries from the front, stopping early once their encoding passes `max_bytes`.
    fn take(&mut self, max_samples: usize, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut seen: HashSet<*const Series> = HashSet::new();
        let mut size = 0usize;
        while out.len() < max_samples && (out.is_empty() || size < max_bytes) {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(e.cost);
            size += 20;
            if seen.insert(Arc::as_ptr(&e.series)) {
                size += e.series.labels.len() + 6;
            }
            out.push(e);
        }
        out
    }
}

/// The samples of `entries` (all of one device) as a WriteRequest: each series once, samples oldest first,
/// one value per millisecond (the last one offered). Returns the body and how many samples were left out.
fn build_request(entries: &[Entry]) -> (Vec<u8>, usize) {
    let mut index: HashMap<&[u8], usize> = HashMap::new();
    type Samples = Vec<(f64, i64)>;
    let mut series: Vec<(&[u8], Samples)> = Vec::new();
    for e in entries {
        let i = *index.entry(&e.series.labels).or_insert_with(|| {
            series.push((&e.series.labels, Vec::new()));
            series.len() - 1
        });
        if let Some(s) = series.get_mut(i) {
            s.1.push((e.value, e.ts));
        }
    }
    let mut out = Vec::new();
    let mut left_out = 0;
    for (labels, samples) in &mut series {
        samples.sort_by_key(|&(_, ts)| ts);
        // Stable sort: for one timestamp, the last value offered comes last; keep it.
        let before = samples.len();
        samples.reverse();
        samples.dedup_by_key(|&mut (_, ts)| ts);
        samples.reverse();
        left_out += before - samples.len();
        put_series(&mut out, labels, samples);
    }
    (out, left_out)
}

// ---------------------------------------------------------------------------------------------------------
// The exporter

#[derive(Debug)]
struct State {
    queue: Queue,
    stats: ExportStats,
}

#[derive(Debug)]
struct Inner {
    opts: ExportOptions,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Only counters and a queue live here; a panic elsewhere leaves them usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, message: String) {
        let mut st = self.state();
        st.stats.failed_requests += 1;
        st.stats.last_error = Some(message);
        st.stats.last_error_unix = Some(now_unix());
    }
}

/// Aborts the exporter's tasks when the last handle goes.
#[derive(Debug)]
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The handle the ingest path feeds. Cloning is cheap; the tasks stop when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Exporter {
    inner: Arc<Inner>,
    _tasks: Arc<Tasks>,
}

impl Exporter {
    /// Starts the sender (and the counters' writer) on the current tokio runtime.
    pub fn start(opts: ExportOptions) -> Result<Exporter, ExportError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                queue: Queue::default(),
                stats: ExportStats {
                    url: opts.endpoint.url.clone(),
                    ..ExportStats::default()
                },
            }),
            opts,
            wake: tokio::sync::Notify::new(),
        });
        let mut tasks = vec![rt.spawn(send_loop(inner.clone())).abort_handle()];
        if let Some(path) = inner.opts.stats_file.clone() {
            tasks.push(
                rt.spawn(write_stats_loop(inner.clone(), path))
                    .abort_handle(),
            );
        }
        tracing::info!(url = %inner.opts.endpoint.url, "exporting telemetry samples with Prometheus remote write");
        Ok(Exporter {
            inner,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// Queues the samples among `records`, from `device_id`, which the fleet has just stored for the first
    /// time. Never blocks on the network.
    pub fn offer<'a>(&self, device_id: &str, records: impl IntoIterator<Item = &'a WireRecord>) {
        let device: Arc<str> = Arc::from(device_id);
        type Key<'a> = (&'a str, &'a [(String, String)]);
        let mut series: HashMap<Key<'a>, Option<Arc<Series>>> = HashMap::new();
        let mut entries: Vec<Entry> = Vec::new();
        // The index of the last entry of each series, which carries the series' cost.
        let mut last: HashMap<*const Series, usize> = HashMap::new();
        let mut invalid = 0u64;
        for r in records {
            let WireBody::Sample {
                name,
                labels,
                value,
                ..
            } = &r.body
            else {
                continue;
            };
            let s = series
                .entry((name.as_str(), labels.as_slice()))
                .or_insert_with(|| {
                    series_labels(device_id, name, labels).map(|labels| {
                        Arc::new(Series {
                            device: device.clone(),
                            labels: labels.into_boxed_slice(),
                        })
                    })
                });
            let (Some(s), Ok(ts)) = (s, i64::try_from(r.at_unix_ms)) else {
                invalid += 1;
                continue;
            };
            let value = if value.is_nan() {
                f64::from_bits(NORMAL_NAN)
            } else {
                *value
            };
            last.insert(Arc::as_ptr(s), entries.len());
            entries.push(Entry {
                series: s.clone(),
                value,
                ts,
                cost: ENTRY_COST,
            });
        }
        for (_, i) in last {
            if let Some(e) = entries.get_mut(i) {
                e.cost += SERIES_COST + e.series.labels.len();
            }
        }
        if entries.is_empty() && invalid == 0 {
            return;
        }
        let offered = entries.len();
        let dropped = {
            let mut st = self.inner.state();
            let dropped = st.queue.push(
                entries,
                self.inner.opts.max_queue_samples,
                self.inner.opts.max_queue_bytes,
            );
            st.stats.dropped += dropped;
            st.stats.invalid += invalid;
            st.stats.queued = st.queue.entries.len() as u64;
            dropped
        };
        if invalid > 0 {
            tracing::warn!(
                device = device_id,
                invalid,
                "samples Prometheus cannot take were not exported"
            );
        }
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "remote-write queue full: dropped the oldest samples"
            );
        }
        if offered > 0 {
            self.inner.wake.notify_one();
        }
    }

    /// The counters now.
    pub fn stats(&self) -> ExportStats {
        let mut s = self.inner.state().stats.clone();
        s.updated_unix = now_unix();
        s
    }
}

/// What one attempt came to.
enum Outcome {
    Accepted,
    /// Retry after a backoff (transport error, 5xx, 429).
    Retry(String),
    /// Do not retry (another 4xx): the samples are lost.
    Refused(String),
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(ep: &Endpoint) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", ep.authority))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP handshake with {} failed: {e}", ep.authority))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "remote-write connection ended");
        }
    });
    Ok(sender)
}

async fn attempt(ep: &Endpoint, conn: &mut Option<Sender>, body: Bytes) -> Outcome {
    let mut sender = match conn.take() {
        Some(s) if !s.is_closed() => s,
        _ => match connect(ep).await {
            Ok(s) => s,
            Err(e) => return Outcome::Retry(e),
        },
    };
    if let Err(e) = sender.ready().await {
        return Outcome::Retry(format!("the connection to {} closed: {e}", ep.authority));
    }
    let req = hyper::Request::post(ep.path.as_str())
        .header(hyper::header::HOST, ep.authority.as_str())
        .header(hyper::header::CONTENT_ENCODING, "snappy")
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .header(
            hyper::header::USER_AGENT,
            concat!("cairn-fleet/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Prometheus-Remote-Write-Version", REMOTE_WRITE_VERSION)
        .body(Full::new(body));
    let req = match req {
        Ok(r) => r,
        Err(e) => return Outcome::Refused(format!("the request could not be built: {e}")),
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(format!("sending to {} failed: {e}", ep.url)),
    };
    let status = resp.status();
    let text: String = match Limited::new(resp.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes())
            .trim()
            .chars()
            .take(300)
            .collect(),
        Err(e) => return Outcome::Retry(format!("reading the answer from {} failed: {e}", ep.url)),
    };
    // The body was read whole: the connection can carry the next request.
    *conn = Some(sender);
    let what = || format!("{} answered {status}: {text}", ep.url);
    if status.is_success() {
        Outcome::Accepted
    } else if status.is_server_error() || status == hyper::StatusCode::TOO_MANY_REQUESTS {
        Outcome::Retry(what())
    } else {
        Outcome::Refused(what())
    }
}

async fn send_loop(inner: Arc<Inner>) {
    let opts = &inner.opts;
    let mut conn: Option<Sender> = None;
    let mut failing = false;
    loop {
        let chunk = inner
            .state()
            .queue
            .take(opts.max_samples_per_request, opts.max_request_bytes);
        if chunk.is_empty() {
            inner.wake.notified().await;
            continue;
        }
        // One request per device, in the order the devices first appear.
        let mut devices: Vec<(Arc<str>, Vec<Entry>)> = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        for e in chunk {
            let i = *index.entry(e.series.device.clone()).or_insert_with(|| {
                devices.push((e.series.device.clone(), Vec::new()));
                devices.len() - 1
            });
            if let Some((_, v)) = devices.get_mut(i) {
                v.push(e);
            }
        }
        for (device, entries) in devices {
            let (protobuf, left_out) = build_request(&entries);
            let sent = (entries.len() - left_out) as u64;
            drop(entries);
            let body = Bytes::from(snappy_literal(&protobuf));
            drop(protobuf);
            let mut backoff = opts.min_backoff;
            loop {
                let outcome = match tokio::time::timeout(
                    opts.timeout,
                    attempt(&opts.endpoint, &mut conn, body.clone()),
                )
                .await
                {
                    Ok(o) => o,
                    Err(_) => {
                        conn = None;
                        Outcome::Retry(format!(
                            "{} did not answer within {:?}",
                            opts.endpoint.url, opts.timeout
                        ))
                    }
                };
                match outcome {
                    Outcome::Accepted => {
                        let mut st = inner.state();
                        st.stats.exported += sent;
                        st.stats.invalid += left_out as u64;
                        st.stats.requests += 1;
                        st.stats.last_success_unix = Some(now_unix());
                        st.stats.queued = st.queue.entries.len() as u64;
                        if failing {
                            failing = false;
                            tracing::info!(url = %opts.endpoint.url, "remote write works again");
                        }
                        break;
                    }
                    Outcome::Refused(message) => {
                        tracing::warn!(device = %device, samples = sent, error = %message, "the remote-write receiver refused samples; they are not retried");
                        inner.error(message);
                        let mut st = inner.state();
                        st.stats.rejected += sent;
                        st.stats.invalid += left_out as u64;
                        st.stats.queued = st.queue.entries.len() as u64;
                        break;
                    }
                    Outcome::Retry(message) => {
                        if !failing {
                            failing = true;
                            tracing::warn!(error = %message, "remote write failed; retrying with backoff");
                        } else {
                            tracing::debug!(error = %message, "remote write failed again");
                        }
                        inner.error(message);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(opts.max_backoff);
                    }
                }
            }
        }
    }
}

async fn write_stats_loop(inner: Arc<Inner>, path: PathBuf) {
    let mut written: Option<ExportStats> = None;
    let mut tick = tokio::time::interval(inner.opts.stats_interval);
    loop {
        tick.tick().await;
        let mut stats = inner.state().stats.clone();
        if written.as_ref() == Some(&stats) {
            continue;
        }
        let snapshot = stats.clone();
        stats.updated_unix = now_unix();
        let result = async {
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let tmp = path.with_extension("tmp");
            let bytes = serde_json::to_vec_pretty(&stats).map_err(std::io::Error::other)?;
            tokio::fs::write(&tmp, bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        match result {
            Ok(()) => written = Some(snapshot),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the remote-write counters")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a snappy block of literal elements (what [`snappy_literal`] writes), refusing anything else.
    fn unsnappy(mut b: &[u8]) -> Vec<u8> {
        let mut len = 0u64;
        let mut shift = 0;
        loop {
            let (&byte, rest) = b.split_first().unwrap();
            b = rest;
            len |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte < 0x80 {
                break;
            }
        }
        let mut out = Vec::new();
        while let Some((&tag, rest)) = b.split_first() {
            b = rest;
            assert_eq!(tag & 3, 0, "only literals are written");
            let n = match tag >> 2 {
                n @ 0..=59 => n as usize,
                k => {
                    let extra = (k - 59) as usize;
                    let mut n = 0usize;
                    for (i, &x) in b[..extra].iter().enumerate() {
                        n |= (x as usize) << (8 * i);
                    }
                    b = &b[extra..];
                    n
                }
            } + 1;
            out.extend_from_slice(&b[..n]);
            b = &b[n..];
        }
        assert_eq!(out.len() as u64, len);
        out
    }

    #[test]
    fn snappy_literals_round_trip_at_every_tag_size() {
        for n in [
            0, 1, 59, 60, 61, 256, 257, 1000, 65535, 65536, 65537, 200_000,
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
            let s = snappy_literal(&data);
            assert_eq!(unsnappy(&s), data, "{n} bytes");
            assert!(s.len() <= data.len() + 5 + 3 * data.len().div_ceil(MAX_LITERAL));
        }
        // Hand-checked: length 3, one literal of 3 (tag (3-1)<<2).
        assert_eq!(snappy_literal(b"abc"), [3, 0x08, b'a', b'b', b'c']);
        // 61 bytes: tag 60<<2 then the length - 1 in one byte.
        assert_eq!(&snappy_literal(&[0; 61])[..3], [61, 0xf0, 60]);
    }

    #[test]
    fn protobuf_matches_a_hand_computed_request() {
        let req = encode_write_request(&[TimeSeries {
            labels: vec![("__name__".into(), "up".into()), ("job".into(), "x".into())],
            samples: vec![(1.0, 1000), (-0.5, 1_700_000_000_000)],
        }]);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[0x0a, 58][..],                                   // timeseries (field 1), 58 bytes
            &[0x0a, 14, 0x0a, 8], b"__name__", &[0x12, 2], b"up", // labels: Label{name, value}
            &[0x0a, 8, 0x0a, 3], b"job", &[0x12, 1], b"x",
            &[0x12, 12, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0x10, 0xe8, 0x07], // Sample{1.0, 1000}
            // Sample{-0.5, 1700000000000}: the timestamp is a 6-byte varint.
            &[0x12, 16, 0x09, 0, 0, 0, 0, 0, 0, 0xe0, 0xbf, 0x10, 0x80, 0xd0, 0x95, 0xff, 0xbc, 0x31],
        ]
        .concat();
        assert_eq!(req, expected);
        assert_eq!(encode_write_request(&[]), Vec::<u8>::new());
        for n in [0u64, 1, 127, 128, 16383, 16384, u64::MAX] {
            let mut v = Vec::new();
            put_varint(&mut v, n);
            assert_eq!(v.len(), varint_len(n), "{n}");
        }
    }

    fn record(seq: u64, name: &str, labels: &[(&str, &str)], value: f64) -> WireRecord {
        WireRecord {
            seq,
            at_unix_ms: 1000 + seq,
            body: WireBody::Sample {
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                value,
                counter: false,
            },
        }
    }

    #[test]
    fn labels_are_sorted_checked_and_marked_with_the_device() {
        let labels = |l: &[(&str, &str)]| -> Vec<(String, String)> {
            l.iter().map(|&(k, v)| (k.into(), v.into())).collect()
        };
        let got = series_labels(
            "d1",
            "up",
            &labels(&[("zone", "a"), ("Gpu", "0"), ("empty", "")]),
        );
        let want = encode_labels([
            ("Gpu", "0"),
            ("__name__", "up"),
            (DEVICE_LABEL, "d1"),
            ("zone", "a"),
        ]);
        assert_eq!(got, Some(want));
        for bad in [
            &[("bad-name", "x")][..],
            &[("__name__", "other")],
            &[(DEVICE_LABEL, "someone-else")],
            &[("gpu", "0"), ("gpu", "1")],
            &[("gpu", "0"), ("gpu", "")],
            &[("9gpu", "0")],
        ] {
            assert_eq!(series_labels("d1", "up", &labels(bad)), None, "{bad:?}");
        }
        assert_eq!(series_labels("d1", "1up", &[]), None);
        assert!(series_labels("d1", "node:cpu_seconds:rate5m", &[]).is_some());
    }

    fn queue_entries(n: usize, series: &Arc<Series>) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                series: series.clone(),
                value: i as f64,
                ts: i as i64,
                cost: ENTRY_COST,
            })
            .collect()
    }

    #[test]
    fn the_queue_drops_the_oldest_over_either_bound() {
        let s = Arc::new(Series {
            device: Arc::from("d1"),
            labels: encode_labels([("__name__", "up")]).into_boxed_slice(),
        });
        let mut q = Queue::default();
        assert_eq!(q.push(queue_entries(10, &s), 4, usize::MAX), 6);
        let values: Vec<f64> = q.entries.iter().map(|e| e.value).collect();
        assert_eq!(values, [6.0, 7.0, 8.0, 9.0]);
        assert_eq!(q.bytes, 4 * ENTRY_COST);
        assert_eq!(q.push(queue_entries(3, &s), 100, 5 * ENTRY_COST), 2);
        assert_eq!((q.entries.len(), q.bytes), (5, 5 * ENTRY_COST));
        let taken = q.take(3, usize::MAX);
        assert_eq!(taken.len(), 3);
        assert_eq!((q.entries.len(), q.bytes), (2, 2 * ENTRY_COST));
        // The byte cap of a request stops the take early, but one sample always goes.
        assert_eq!(q.take(100, 1).len(), 1);
        assert_eq!(q.take(100, usize::MAX).len(), 1);
        assert!(q.take(100, usize::MAX).is_empty() && q.bytes == 0);
    }

    #[test]
    fn requests_group_series_sort_time_and_keep_one_value_per_millisecond() {
        let a = Arc::new(Series {
            device: Arc::from("d1"),
            labels: encode_labels([("__name__", "a")]).into_boxed_slice(),
        });
        // The same series from another batch: another Arc, the same labels.
        let a2 = Arc::new(Series {
            device: Arc::from("d1"),
            labels: a.labels.clone(),
        });
        let b = Arc::new(Series {
            device: Arc::from("d1"),
            labels: encode_labels([("__name__", "b")]).into_boxed_slice(),
        });
        let e = |s: &Arc<Series>, value: f64, ts: i64| Entry {
            series: s.clone(),
            value,
            ts,
            cost: ENTRY_COST,
        };
        let (body, left_out) = build_request(&[
            e(&a, 1.0, 20),
            e(&b, 5.0, 10),
            e(&a2, 2.0, 10),
            e(&a, 3.0, 20),
        ]);
        assert_eq!(left_out, 1);
        let want = encode_write_request(&[
            TimeSeries {
                labels: vec![("__name__".into(), "a".into())],
                samples: vec![(2.0, 10), (3.0, 20)],
            },
            TimeSeries {
                labels: vec![("__name__".into(), "b".into())],
                samples: vec![(5.0, 10)],
            },
        ]);
        assert_eq!(body, want);
    }

    #[test]
    fn offering_counts_invalid_samples_and_charges_each_series_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut opts = ExportOptions::new(
            Endpoint::parse("http://127.0.0.1:9/api/v1/write").unwrap(),
            None,
        );
        opts.max_queue_samples = 3;
        let x = Exporter::start(opts).unwrap();
        let records = [
            record(1, "up", &[("gpu", "0")], 1.0),
            record(2, "up", &[("gpu", "0")], f64::NAN),
            record(3, "bad name", &[], 1.0),
            record(4, "up", &[("gpu", "1")], 1.0),
            record(5, "up", &[("gpu", "0")], 3.0),
        ];
        x.offer("d1", &records);
        let st = x.inner.state();
        assert_eq!(
            (st.stats.invalid, st.stats.dropped, st.stats.queued),
            (1, 1, 3)
        );
        let costs: Vec<usize> = st.queue.entries.iter().map(|e| e.cost).collect();
        // Left: seq 2 (gpu 0), 4 (gpu 1, its only sample), 5 (gpu 0's last: it carries the series).
        assert_eq!(costs[0], ENTRY_COST);
        assert!(costs[1] > ENTRY_COST && costs[2] > ENTRY_COST);
        assert_eq!(st.queue.entries[0].value.to_bits(), NORMAL_NAN);
        assert_eq!(st.queue.bytes, costs.iter().sum::<usize>());
    }

    #[test]
    fn endpoints_parse_or_say_what_is_wrong() {
        let e = Endpoint::parse("http://127.0.0.1:9090/api/v1/write").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("127.0.0.1", 9090, "/api/v1/write")
        );
        let e = Endpoint::parse("http://[::1]/w?x=1").unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.path.as_str(),
                e.authority.as_str()
            ),
            ("::1", 80, "/w?x=1", "[::1]")
        );
        assert!(matches!(
            Endpoint::parse("https://p:9090/api/v1/write"),
            Err(ExportError::Https(_))
        ));
        for bad in [
            "prometheus:9090",
            "ftp://p/",
            "http://u:pw@p/w",
            "not a url",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(ExportError::Url { .. })),
                "{bad}"
            );
        }
    }
}
