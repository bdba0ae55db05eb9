//! Signed telemetry batches: what `cairnd` posts to its fleet, and how anyone verifies and reads it.
//!
//! `POST /v1/telemetry` ([`TELEMETRY_PATH`], mTLS) carries one COSE_Sign1 message (RFC 9052 §4.2) with
//! `Content-Type: application/cose; cose-type="cose-sign1"` ([`TELEMETRY_MEDIA_TYPE`]). The signing key is
//! the device's TPM-resident ECDSA P-256 telemetry key, whose public point the fleet recorded at onboarding;
//! the fleet answers with a JSON [`BatchAck`]. Everything below is exact: another implementation can verify
//! and decode a batch from this description alone.
//!
//! # The envelope: COSE_Sign1
//!
//! ```text
//! 18([                                       ; the COSE_Sign1 tag (18) is required
//!   bstr .cbor {                             ; protected header
//!     1: -7,                                 ; alg: ES256 (ECDSA with P-256 and SHA-256)
//!     ? 2: ["cairn-content-encoding"],       ; crit: present exactly when the payload is compressed
//!     3: "application/vnd.cairn.telemetry-batch+cbor",   ; content type of the batch, once decompressed
//!     4: bstr .size 32,                      ; kid: SHA-256 of the telemetry key's uncompressed point
//!                                            ;      0x04 || x || y (65 bytes)
//!     ? "cairn-content-encoding": "zstd",    ; the payload is one zstd frame (RFC 8878) of the batch
//!   },
//!   {},                                      ; unprotected header: must be empty
//!   bstr,                                    ; payload: the batch, raw or compressed; never detached (nil)
//!   bstr .size 64,                           ; signature: r || s, 32 bytes each, big-endian (RFC 9053 §2.1)
//! ])
//! ```
//!
//! The protected header holds exactly these entries and no others (no IV, no counter signature, no other
//! label); a message with anything else is refused. All lengths are definite.
//!
//! **Verifying.** Build the RFC 9052 §4.4 `Sig_structure` as deterministic CBOR,
//! `["Signature1", protected, h'', payload]`: the protected header and the payload are the two byte strings
//! exactly as received (the payload still compressed, if it is), the external AAD is empty. Look up the
//! telemetry key whose kid (SHA-256 of its 65-byte point) equals the kid in the header, and verify the
//! signature as ECDSA P-256 over SHA-256 of those bytes (a "fixed", not DER, signature). Only then
//! decompress and decode. [`SignedBatch::parse`] returns `to_be_signed` (the Sig_structure), the signature
//! and the kid for exactly that, and [`SignedBatch::batch`] decodes afterwards. The device signs the same way:
//! [`sign_batch`] hands the Sig_structure to a signer, which in `cairnd` hashes it and has the TPM sign the
//! digest.
//!
//! **Compression.** [`sign_batch`] compresses a batch of 512 bytes or more with zstd (level 3) and keeps the
//! result only when it saves at least an eighth and at least 64 bytes (a few records stay raw; minutes of
//! telemetry shrink about five times). A reader decompresses one zstd frame, with a window of at most 2^25
//! bytes, and refuses output larger than [`MAX_PAYLOAD_BYTES`] (a small payload can expand without bound) or
//! bytes after the frame.
//!
//! # The batch (the payload, decompressed)
//!
//! One CBOR map with exactly eight unsigned-integer keys, in this order:
//!
//! ```text
//! batch = {
//!   0: 1,              ; format version
//!   1: tstr,           ; device_id, as the fleet issued it
//!   2: tstr,           ; boot_id: the id of the sender's sequence stream (seq never restarts within one)
//!   3: uint,           ; first_seq
//!   4: uint,           ; last_seq, >= first_seq
//!   5: [* tstr],       ; string table: every name, label, component, kind, severity and message once
//!   6: [* series],     ; series table
//!   7: [* record],     ; the records, seq strictly increasing
//! }
//! sid    = uint        ; an index into the string table
//! series = [name: sid, counter: bool, labels: [* sid]]    ; labels: key, value, key, value, ... (kept in order)
//! record = sample / event                                 ; told apart by their length, 4 or 6
//! sample = [dseq: uint, dat: int, series: uint, value: int / float]    ; series: an index into the series table
//! event  = [dseq: uint, dat: int, component: sid, kind: sid, severity: sid, message: sid]
//! ```
//!
//! - **seq**: the first record's seq is `first_seq + dseq`; each later record's is the previous seq plus its
//!   `dseq`, which must be at least 1. No seq may exceed `last_seq`. The batch accounts for every seq in
//!   `first_seq..=last_seq`: a seq without a record was dropped on the device (quota thinning), so a batch
//!   may even have no record.
//! - **time**: `at_unix_ms` (milliseconds since the Unix epoch) is `dat` for the first record and the previous
//!   record's time plus `dat` (which may be negative: clocks step) for the others; it must stay within
//!   `0..=2^64-1`.
//! - **value**: a float of any width (NaN and infinities included), or an integer within `-2^53..=2^53`
//!   (exactly representable as a double; others are refused). The encoder writes integral values in that
//!   range, except -0.0, as integers, and floats in the shortest width that keeps every bit.
//! - **bool**: the simple values `false` (0xf4) and `true` (0xf5). Strings are UTF-8 text strings.
//!
//! Readers enforce these limits, and [`sign_batch`] refuses a batch that breaks them, so a device splits its
//! spool into batches the fleet accepts: [`MAX_SIGNED_BYTES`] for the whole message, [`MAX_PAYLOAD_BYTES`] for
//! the batch CBOR, [`MAX_RECORDS`] records, [`MAX_STRINGS`] strings, [`MAX_SERIES`] series, [`MAX_LABELS`]
//! labels per series, [`MAX_STRING_BYTES`] bytes per string, and [`MAX_DECODED_BYTES`] for the decoded
//! batch in memory, where each record counts 64 bytes plus, for every string it carries (a sample's name,
//! label keys and values; an event's four strings), its length plus 24: the string table makes repeated
//! strings cheap on the wire but not once decoded.
//!
//! # Example
//!
//! A batch from device `d1`, boot `b1`, covering seqs 7 to 9: a gauge `up{gpu="0"}` = 1 at seq 7, time 1000
//! ms, and a critical `xid` event for `gpu0` at seq 9, 500 ms later (seq 8 was dropped), encodes as
//!
//! ```text
//! a8                                      map(8)
//!    00 01                                0: 1
//!    01 62 6431                           1: "d1"
//!    02 62 6231                           2: "b1"
//!    03 07                                3: 7
//!    04 09                                4: 9
//!    05 87 62 7570 63 677075 61 30        5: ["up", "gpu", "0",
//!          64 67707530 63 786964                "gpu0", "xid",
//!          68 637269746963616c                  "critical",
//!          66 584944203739                      "XID 79"]
//!    06 81 83 00 f4 82 01 02              6: [[0, false, [1, 2]]]
//!    07 82 84 00 1903e8 00 01             7: [[0, 1000, 0, 1],
//!          86 02 1901f4 03 04 05 06              [2, 500, 3, 4, 5, 6]]
//! ```
//!
//! (the test `example_matches_the_module_docs` keeps this honest).

use coset::cbor::value::Value;
use coset::{
    iana, ContentType, CoseSign1, CoseSign1Builder, Header as CoseHeader, HeaderBuilder, Label,
    ProtectedHeader, RegisteredLabel, RegisteredLabelWithPrivate, TaggedCborSerializable as _,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Read as _;

use ciborium_ll::{Decoder, Encoder, Header};

/// `POST /v1/telemetry` (mTLS): the body is one signed batch ([`sign_batch`]), answered by [`BatchAck`].
pub const TELEMETRY_PATH: &str = "/v1/telemetry";
/// The request's `Content-Type`.
pub const TELEMETRY_MEDIA_TYPE: &str = "application/cose; cose-type=\"cose-sign1\"";
/// The COSE content type (header 3) of the payload once decompressed.
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.cairn.telemetry-batch+cbor";
/// The protected-header label (text) that, with the value [`ZSTD`], marks a compressed payload. It is also
/// listed as critical (header 2), so a reader that does not know it refuses the message.
pub const CONTENT_ENCODING_LABEL: &str = "cairn-content-encoding";
/// The one content encoding: a zstd frame (RFC 8878).
pub const ZSTD: &str = "zstd";
/// Version of the batch format (map key 0).
pub const BATCH_FORMAT_VERSION: u64 = 1;
/// Length of a kid: SHA-256 of the telemetry key's uncompressed point.
pub const KID_BYTES: usize = 32;

/// Largest signed message (the HTTP body).
pub const MAX_SIGNED_BYTES: usize = 16 << 20;
/// Largest batch CBOR, after decompression.
pub const MAX_PAYLOAD_BYTES: usize = 32 << 20;
/// Most records in a batch (about 44 minutes of 1,000 series scraped every 10 s).
pub const MAX_RECORDS: usize = 1 << 18;
/// Most entries in the string table.
pub const MAX_STRINGS: usize = 1 << 16;
/// Most entries in the series table.
pub const MAX_SERIES: usize = 1 << 16;
/// Most label pairs of one series.
pub const MAX_LABELS: usize = 64;
/// Longest string (bytes of UTF-8), for every string in a batch.
pub const MAX_STRING_BYTES: usize = 4096;
/// Most memory a decoded batch may take, as the module docs count it.
pub const MAX_DECODED_BYTES: usize = 256 << 20;
/// The zstd window a reader accepts, as a power of two (32 MiB).
pub const MAX_WINDOW_LOG: u32 = 25;
/// Longest protected header a reader accepts.
const MAX_PROTECTED_BYTES: usize = 1024;
/// The zstd level the signer uses: fast on a device, most of the gain of the higher levels.
const ZSTD_LEVEL: i32 = 3;
/// Decoded-size accounting (see the module docs).
const RECORD_COST: usize = 64;
const STRING_COST: usize = 24;

/// One record of a batch: what the device measured or saw, numbered in the device's spool.
#[derive(Debug, Clone, PartialEq)]
pub struct WireRecord {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub body: WireBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WireBody {
    /// One value of one series (Prometheus-style name and labels; `counter` for a monotonic counter).
    Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
        counter: bool,
    },
    /// A health transition, an XID, … as the agent's health model reports it.
    Event {
        component: String,
        kind: String,
        severity: String,
        message: String,
    },
}

/// A run of the device's spool: every seq in `first_seq..=last_seq` is accounted for, by a record or by its
/// absence (thinned on the device). Records' seqs are strictly increasing.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub device_id: String,
    pub boot_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: Vec<WireRecord>,
}

/// The fleet's answer to a batch it verified and stored (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchAck {
    pub device_id: String,
    pub boot_id: String,
    /// Every seq of this boot up to here is stored (or was accounted for as dropped): the device may forget
    /// them.
    pub acked_up_to: u64,
    /// How many records of this batch the fleet already had (a retry after a lost answer).
    pub duplicates: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the {what} is {len} bytes, more than the {max} allowed")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the batch has {count} {what}, more than the {max} allowed")]
    TooMany {
        what: &'static str,
        count: u64,
        max: usize,
    },
    #[error("the telemetry batch ends early: the item at byte {offset} runs past its end")]
    Truncated { offset: usize },
    #[error("the telemetry batch is malformed at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error("the telemetry batch is format version {0}, and this build reads version 1 only")]
    Version(u64),
    #[error("record {index} is out of sequence: {reason}")]
    Sequence { index: usize, reason: String },
    #[error("the signed telemetry message is malformed: {0}")]
    Cose(String),
    #[error("the signed telemetry message's protected header is not acceptable: {0}")]
    Header(String),
    #[error("the telemetry payload does not decompress: {0}")]
    Decompress(String),
    #[error("the telemetry payload decompresses to more than the {max} bytes allowed")]
    DecompressedTooLarge { max: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum SignError<E> {
    #[error("the batch cannot be signed: {0}")]
    Invalid(#[from] BatchError),
    #[error(
        "the key id is {0} bytes; it must be the 32-byte SHA-256 of the telemetry key's uncompressed point"
    )]
    KidLength(usize),
    #[error("the signed telemetry message could not be encoded: {0}")]
    Encode(String),
    #[error("the telemetry key did not sign the batch: {0}")]
    Signer(E),
}

// ---------------------------------------------------------------------------------------------------------
// Encoding

/// A `Vec` as a ciborium writer that cannot fail, whichever of ciborium-io's features are on.
struct Out<'a>(&'a mut Vec<u8>);

impl ciborium_io::Write for Out<'_> {
    type Error = Infallible;

    fn write_all(&mut self, data: &[u8]) -> Result<(), Infallible> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

struct Enc<'a>(Encoder<Out<'a>>);

impl Enc<'_> {
    fn head(&mut self, header: Header) {
        let Ok(()) = self.0.push(header);
    }

    fn uint(&mut self, n: u64) {
        self.head(Header::Positive(n));
    }

    fn array(&mut self, n: usize) {
        self.head(Header::Array(Some(n)));
    }

    fn int(&mut self, n: i128) {
        // Differences of two u64 always fit CBOR's integer range, -2^64..2^64-1.
        if n >= 0 {
            self.uint(u64::try_from(n).unwrap_or(u64::MAX));
        } else {
            self.head(Header::Negative(u64::try_from(-1 - n).unwrap_or(u64::MAX)));
        }
    }

    fn text(&mut self, s: &str) {
        let Ok(()) = self.0.text(s, None);
    }

    fn value(&mut self, v: f64) {
        if v.fract() == 0.0 && v.abs() <= EXACT_INT && !(v == 0.0 && v.is_sign_negative()) {
            if v >= 0.0 {
                self.uint(v as u64);
            } else {
                self.head(Header::Negative((-v - 1.0) as u64));
            }
        } else {
            self.head(Header::Float(v));
        }
    }
}

/// 2^53: integers up to this magnitude are exact doubles.
const EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// What a record points to once its strings are interned.
enum Ref {
    Sample { series: u32, value: f64 },
    Event { strings: [u32; 4] },
}

struct Interned<'a> {
    strings: Vec<&'a str>,
    series: Vec<(u32, bool, Vec<u32>)>,
    refs: Vec<Ref>,
}

fn intern(b: &Batch) -> Interned<'_> {
    type SeriesKey<'a> = (&'a str, &'a [(String, String)], bool);
    let mut string_ids: HashMap<&str, u32> = HashMap::new();
    let mut strings: Vec<&str> = Vec::new();
    let mut series_ids: HashMap<SeriesKey<'_>, u32> = HashMap::new();
    let mut series = Vec::new();
    let mut refs = Vec::with_capacity(b.records.len());
    let mut sid = |s| -> u32 {
        *string_ids.entry(s).or_insert_with(|| {
            strings.push(s);
            (strings.len() - 1) as u32
        })
    };
    for record in &b.records {
        refs.push(match &record.body {
            WireBody::Sample {
                name,
                labels,
                value,
                counter,
            } => {
                let key = (name.as_str(), labels.as_slice(), *counter);
                let series = match series_ids.get(&key) {
                    Some(id) => *id,
                    None => {
                        let name = sid(name.as_str());
                        let label_ids = labels
                            .iter()
                            .flat_map(|(k, v)| [sid(k.as_str()), sid(v.as_str())])
                            .collect();
                        series.push((name, *counter, label_ids));
                        let id = (series.len() - 1) as u32;
                        series_ids.insert(key, id);
                        id
                    }
                };
                Ref::Sample {
                    series,
                    value: *value,
                }
            }
            WireBody::Event {
                component,
                kind,
                severity,
                message,
            } => Ref::Event {
                strings: [
                    sid(component.as_str()),
                    sid(kind.as_str()),
                    sid(severity.as_str()),
                    sid(message.as_str()),
                ],
            },
        });
    }
    Interned {
        strings,
        series,
        refs,
    }
}

/// The batch as CBOR (see the module docs). It does not check the batch: [`validate_batch`] does, and
/// [`sign_batch`] calls it; a batch that breaks the rules encodes to bytes [`decode_batch`] refuses.
pub fn encode_batch(b: &Batch) -> Vec<u8> {
    encode_interned(b, &intern(b))
}

fn encode_interned(b: &Batch, t: &Interned<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + b.records.len() * 8);
    let mut e = Enc(Encoder::from(Out(&mut buf)));
    e.head(Header::Map(Some(8)));
    e.uint(0);
    e.uint(BATCH_FORMAT_VERSION);
    e.uint(1);
    e.text(&b.device_id);
    e.uint(2);
    e.text(&b.boot_id);
    e.uint(3);
    e.uint(b.first_seq);
    e.uint(4);
    e.uint(b.last_seq);
    e.uint(5);
    e.array(t.strings.len());
    for s in &t.strings {
        e.text(s);
    }
    e.uint(6);
    e.array(t.series.len());
    for (name, counter, labels) in &t.series {
        e.array(3);
        e.uint(u64::from(*name));
        e.head(Header::Simple(if *counter {
            ciborium_ll::simple::TRUE
        } else {
            ciborium_ll::simple::FALSE
        }));
        e.array(labels.len());
        for l in labels {
            e.uint(u64::from(*l));
        }
    }
    e.uint(7);
    e.array(b.records.len());
    let mut prev: Option<(u64, u64)> = None;
    for (record, r) in b.records.iter().zip(&t.refs) {
        let (dseq, dat) = match prev {
            None => (
                record.seq.wrapping_sub(b.first_seq),
                i128::from(record.at_unix_ms),
            ),
            Some((seq, at)) => (
                record.seq.wrapping_sub(seq),
                i128::from(record.at_unix_ms) - i128::from(at),
            ),
        };
        prev = Some((record.seq, record.at_unix_ms));
        match r {
            Ref::Sample { series, value } => {
                e.array(4);
                e.uint(dseq);
                e.int(dat);
                e.uint(u64::from(*series));
                e.value(*value);
            }
            Ref::Event { strings } => {
                e.array(6);
                e.uint(dseq);
                e.int(dat);
                for s in strings {
                    e.uint(u64::from(*s));
                }
            }
        }
    }
    buf
}

fn string_cost(s: &str) -> usize {
    s.len() + STRING_COST
}

fn sample_cost(name: &str, labels: &[(String, String)]) -> usize {
    string_cost(name)
        + labels
            .iter()
            .map(|(k, v)| string_cost(k) + string_cost(v))
            .sum::<usize>()
}

fn check_string(what: &'static str, s: &str) -> Result<(), BatchError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(BatchError::TooLarge {
            what,
            len: s.len(),
            max: MAX_STRING_BYTES,
        });
    }
    Ok(())
}

/// Checks what a reader checks, on the batch itself: sequence, counts, string lengths and decoded size. The
/// table sizes and the encoded size are checked by [`sign_batch`] once it has encoded the batch.
pub fn validate_batch(b: &Batch) -> Result<(), BatchError> {
    check_string("device id", &b.device_id)?;
    check_string("boot id", &b.boot_id)?;
    if b.first_seq > b.last_seq {
        return Err(BatchError::Sequence {
            index: 0,
            reason: format!(
                "the batch runs from seq {} back to {}",
                b.first_seq, b.last_seq
            ),
        });
    }
    if b.records.len() > MAX_RECORDS {
        return Err(BatchError::TooMany {
            what: "records",
            count: b.records.len() as u64,
            max: MAX_RECORDS,
        });
    }
    let mut prev: Option<u64> = None;
    let mut decoded = 0usize;
    for (index, record) in b.records.iter().enumerate() {
        let in_order = match prev {
            None => record.seq >= b.first_seq,
            Some(p) => record.seq > p,
        };
        if !in_order || record.seq > b.last_seq {
            return Err(BatchError::Sequence {
                index,
                reason: format!(
                    "seq {} does not follow {} within {}..={}",
                    record.seq,
                    prev.map_or_else(|| "the start".to_owned(), |p| p.to_string()),
                    b.first_seq,
                    b.last_seq
                ),
            });
        }
        prev = Some(record.seq);
        decoded += RECORD_COST
            + match &record.body {
                WireBody::Sample { name, labels, .. } => {
                    check_string("metric name", name)?;
                    if labels.len() > MAX_LABELS {
                        return Err(BatchError::TooMany {
                            what: "labels in a series",
                            count: labels.len() as u64,
                            max: MAX_LABELS,
                        });
                    }
                    for (k, v) in labels {
                        check_string("label name", k)?;
                        check_string("label value", v)?;
                    }
                    sample_cost(name, labels)
                }
                WireBody::Event {
                    component,
                    kind,
                    severity,
                    message,
                } => {
                    check_string("event component", component)?;
                    check_string("event kind", kind)?;
                    check_string("event severity", severity)?;
                    check_string("event message", message)?;
                    [component, kind, severity, message]
                        .iter()
                        .map(|s| string_cost(s))
                        .sum()
                }
            };
        if decoded > MAX_DECODED_BYTES {
            return Err(BatchError::TooLarge {
                what: "decoded batch",
                len: decoded,
                max: MAX_DECODED_BYTES,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Decoding

fn describe(h: &Header) -> &'static str {
    match h {
        Header::Positive(_) => "an unsigned integer",
        Header::Negative(_) => "a negative integer",
        Header::Float(_) => "a float",
        Header::Simple(_) => "a simple value",
        Header::Tag(_) => "a tag",
        Header::Break => "a break",
        Header::Bytes(_) => "a byte string",
        Header::Text(_) => "a text string",
        Header::Array(_) => "an array",
        Header::Map(_) => "a map",
    }
}

/// A bounds-checked CBOR reader over a slice: definite lengths only, every length checked against a limit
/// and against what is left before anything is allocated.
struct Rd<'a> {
    dec: Decoder<&'a [u8]>,
    len: usize,
}

impl<'a> Rd<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Rd {
            dec: Decoder::from(bytes),
            len: bytes.len(),
        }
    }

    fn offset(&mut self) -> usize {
        self.dec.offset()
    }

    fn left(&mut self) -> usize {
        self.len.saturating_sub(self.dec.offset())
    }

    fn head(&mut self) -> Result<(usize, Header), BatchError> {
        let at = self.dec.offset();
        match self.dec.pull() {
            Ok(h) => Ok((at, h)),
            Err(ciborium_ll::Error::Io(_)) => Err(BatchError::Truncated { offset: at }),
            Err(ciborium_ll::Error::Syntax(offset)) => Err(BatchError::Malformed {
                offset,
                reason: "this is not well-formed CBOR".to_owned(),
            }),
        }
    }

    fn unexpected<T>(at: usize, what: &str, want: &str, got: &Header) -> Result<T, BatchError> {
        let reason = match got {
            Header::Array(None) | Header::Map(None) | Header::Bytes(None) | Header::Text(None) => {
                format!("{what} has an indefinite length, and only definite lengths are accepted")
            }
            _ => format!("{what} should be {want}, not {}", describe(got)),
        };
        Err(BatchError::Malformed { offset: at, reason })
    }

    fn uint(&mut self, what: &str) -> Result<u64, BatchError> {
        match self.head()? {
            (_, Header::Positive(n)) => Ok(n),
            (at, h) => Self::unexpected(at, what, "an unsigned integer", &h),
        }
    }

    fn int(&mut self, what: &str) -> Result<i128, BatchError> {
        match self.head()? {
            (_, Header::Positive(n)) => Ok(i128::from(n)),
            (_, Header::Negative(n)) => Ok(-1 - i128::from(n)),
            (at, h) => Self::unexpected(at, what, "an integer", &h),
        }
    }

    fn index(&mut self, what: &str, len: usize) -> Result<usize, BatchError> {
        let at = self.offset();
        let n = self.uint(what)?;
        match usize::try_from(n) {
            Ok(i) if i < len => Ok(i),
            _ => Err(BatchError::Malformed {
                offset: at,
                reason: format!("{what} {n} points past the end of its table ({len} entries)"),
            }),
        }
    }

    fn bool(&mut self, what: &str) -> Result<bool, BatchError> {
        match self.head()? {
            (_, Header::Simple(ciborium_ll::simple::FALSE)) => Ok(false),
            (_, Header::Simple(ciborium_ll::simple::TRUE)) => Ok(true),
            (at, h) => Self::unexpected(at, what, "true or false", &h),
        }
    }

    fn number(&mut self, what: &str) -> Result<f64, BatchError> {
        const EXACT: u64 = 1 << 53;
        match self.head()? {
            (_, Header::Float(v)) => Ok(v),
            (_, Header::Positive(n)) if n <= EXACT => Ok(n as f64),
            (_, Header::Negative(n)) if n < EXACT => Ok(-(n as f64) - 1.0),
            (at, Header::Positive(_) | Header::Negative(_)) => Err(BatchError::Malformed {
                offset: at,
                reason: format!("{what} is an integer beyond ±2^53, which a double cannot hold"),
            }),
            (at, h) => Self::unexpected(at, what, "a number", &h),
        }
    }

    /// An array header of at most `max` items; `what` names the items.
    fn array(&mut self, what: &'static str, max: usize) -> Result<usize, BatchError> {
        match self.head()? {
            (_, Header::Array(Some(n))) if n <= max => Ok(n),
            (_, Header::Array(Some(n))) => Err(BatchError::TooMany {
                what,
                count: n as u64,
                max,
            }),
            (at, h) => Self::unexpected(at, what, "an array", &h),
        }
    }

    fn exact_array(&mut self, what: &str, n: usize) -> Result<(), BatchError> {
        match self.head()? {
            (_, Header::Array(Some(m))) if m == n => Ok(()),
            (at, h) => Self::unexpected(at, what, &format!("an array of {n}"), &h),
        }
    }

    fn body(
        &mut self,
        at: usize,
        n: usize,
        max: usize,
        what: &'static str,
    ) -> Result<Vec<u8>, BatchError> {
        if n > max {
            return Err(BatchError::TooLarge { what, len: n, max });
        }
        if n > self.left() {
            return Err(BatchError::Truncated { offset: at });
        }
        let mut buf = vec![0; n];
        ciborium_io::Read::read_exact(&mut self.dec, &mut buf)
            .map_err(|_| BatchError::Truncated { offset: at })?;
        Ok(buf)
    }

    fn text(&mut self, what: &'static str, max: usize) -> Result<String, BatchError> {
        match self.head()? {
            (at, Header::Text(Some(n))) => {
                let bytes = self.body(at, n, max, what)?;
                String::from_utf8(bytes).map_err(|_| BatchError::Malformed {
                    offset: at,
                    reason: format!("the {what} is not UTF-8"),
                })
            }
            (at, h) => Self::unexpected(at, what, "a text string", &h),
        }
    }

    fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, BatchError> {
        match self.head()? {
            (at, Header::Bytes(Some(n))) => self.body(at, n, max, what),
            (at, h) => Self::unexpected(at, what, "a byte string", &h),
        }
    }

    fn key(&mut self, want: u64) -> Result<(), BatchError> {
        let at = self.offset();
        let key = self.uint("a batch map key")?;
        if key != want {
            return Err(BatchError::Malformed {
                offset: at,
                reason: format!("the batch map has key {key} where key {want} belongs (keys are 0 to 7, in order)"),
            });
        }
        Ok(())
    }

    fn end(&mut self, what: &str) -> Result<(), BatchError> {
        let at = self.offset();
        if at != self.len {
            return Err(BatchError::Malformed {
                offset: at,
                reason: format!(
                    "{} bytes follow the end of the {what}",
                    self.len.saturating_sub(at)
                ),
            });
        }
        Ok(())
    }
}

struct SeriesDef {
    name: String,
    counter: bool,
    labels: Vec<(String, String)>,
    cost: usize,
}

/// Decodes a batch (the payload, decompressed), enforcing every limit of the module docs.
pub fn decode_batch(bytes: &[u8]) -> Result<Batch, BatchError> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(BatchError::TooLarge {
            what: "telemetry batch",
            len: bytes.len(),
            max: MAX_PAYLOAD_BYTES,
        });
    }
    let mut r = Rd::new(bytes);
    match r.head()? {
        (_, Header::Map(Some(8))) => {}
        (at, h) => return Rd::unexpected(at, "the batch", "a map of 8 entries", &h),
    }
    r.key(0)?;
    let version = r.uint("the format version")?;
    if version != BATCH_FORMAT_VERSION {
        return Err(BatchError::Version(version));
    }
    r.key(1)?;
    let device_id = r.text("device id", MAX_STRING_BYTES)?;
    r.key(2)?;
    let boot_id = r.text("boot id", MAX_STRING_BYTES)?;
    r.key(3)?;
    let first_seq = r.uint("first_seq")?;
    r.key(4)?;
    let last_seq = r.uint("last_seq")?;
    if first_seq > last_seq {
        return Err(BatchError::Sequence {
            index: 0,
            reason: format!("the batch runs from seq {first_seq} back to {last_seq}"),
        });
    }

    r.key(5)?;
    let n = r.array("strings", MAX_STRINGS)?;
    let mut strings = Vec::with_capacity(n.min(r.left()));
    for _ in 0..n {
        strings.push(r.text("string", MAX_STRING_BYTES)?);
    }

    r.key(6)?;
    let n = r.array("series", MAX_SERIES)?;
    let mut series = Vec::with_capacity(n.min(r.left() / 4));
    for _ in 0..n {
        r.exact_array("a series", 3)?;
        let name = strings[r.index("a series' name", strings.len())?].clone();
        let counter = r.bool("a series' counter flag")?;
        let at = r.offset();
        let n = r.array("label strings in a series", 2 * MAX_LABELS)?;
        if n % 2 != 0 {
            return Err(BatchError::Malformed {
                offset: at,
                reason: format!("a series has {n} label strings, not key-value pairs"),
            });
        }
        let mut labels = Vec::with_capacity(n / 2);
        for _ in 0..n / 2 {
            let k = r.index("a label key", strings.len())?;
            let v = r.index("a label value", strings.len())?;
            labels.push((strings[k].clone(), strings[v].clone()));
        }
        let cost = sample_cost(&name, &labels);
        series.push(SeriesDef {
            name,
            counter,
            labels,
            cost,
        });
    }

    r.key(7)?;
    let n = r.array("records", MAX_RECORDS)?;
    // A record takes at least 5 bytes: never reserve more than the input could hold.
    let mut records = Vec::with_capacity(n.min(r.left() / 5));
    let mut prev: Option<(u64, u64)> = None;
    let mut decoded = 0usize;
    for index in 0..n {
        let at = r.offset();
        let len = match r.head()? {
            (_, Header::Array(Some(len @ (4 | 6)))) => len,
            (at, h) => {
                return Rd::unexpected(
                    at,
                    "a record",
                    "an array of 4 (a sample) or 6 (an event)",
                    &h,
                )
            }
        };
        let dseq = r.uint("a record's seq step")?;
        let seq = match prev {
            None => first_seq.checked_add(dseq),
            Some(_) if dseq == 0 => None,
            Some((p, _)) => p.checked_add(dseq),
        };
        let Some(seq) = seq.filter(|seq| *seq <= last_seq) else {
            let from = prev.map_or_else(
                || format!("first_seq {first_seq}"),
                |(p, _)| format!("seq {p}"),
            );
            return Err(BatchError::Sequence {
                index,
                reason: format!(
                    "a step of {dseq} from {from} does not advance within {first_seq}..={last_seq}"
                ),
            });
        };
        let dat = r.int("a record's time step")?;
        let at_unix_ms =
            u64::try_from(prev.map_or(0, |(_, t)| i128::from(t)) + dat).map_err(|_| {
                BatchError::Malformed {
                    offset: at,
                    reason: format!("record {index}'s time leaves 0..=2^64-1"),
                }
            })?;
        prev = Some((seq, at_unix_ms));
        let body = if len == 4 {
            let s = &series[r.index("a sample's series", series.len())?];
            let value = r.number("a sample's value")?;
            decoded += s.cost;
            WireBody::Sample {
                name: s.name.clone(),
                labels: s.labels.clone(),
                value,
                counter: s.counter,
            }
        } else {
            let mut take = |what| -> Result<String, BatchError> {
                let s = strings[r.index(what, strings.len())?].clone();
                decoded += string_cost(&s);
                Ok(s)
            };
            WireBody::Event {
                component: take("an event's component")?,
                kind: take("an event's kind")?,
                severity: take("an event's severity")?,
                message: take("an event's message")?,
            }
        };
        decoded += RECORD_COST;
        if decoded > MAX_DECODED_BYTES {
            return Err(BatchError::TooLarge {
                what: "decoded batch",
                len: decoded,
                max: MAX_DECODED_BYTES,
            });
        }
        records.push(WireRecord {
            seq,
            at_unix_ms,
            body,
        });
    }
    r.end("batch")?;
    Ok(Batch {
        device_id,
        boot_id,
        first_seq,
        last_seq,
        records,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Signing and verifying

/// The payload to sign: the zstd frame of `raw` when it saves an eighth and 64 bytes, else `raw`.
fn choose_payload(raw: Vec<u8>) -> (Vec<u8>, bool) {
    if raw.len() < 512 {
        return (raw, false);
    }
    match zstd::bulk::compress(&raw, ZSTD_LEVEL) {
        Ok(z) if z.len() + 64 <= raw.len() && z.len() <= raw.len() - raw.len() / 8 => (z, true),
        _ => (raw, false),
    }
}

fn protected_header(kid: &[u8], compressed: bool) -> CoseHeader {
    let mut h = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .content_type(BATCH_CONTENT_TYPE.to_owned())
        .key_id(kid.to_vec());
    if compressed {
        h = h
            .add_critical_label(RegisteredLabel::Text(CONTENT_ENCODING_LABEL.to_owned()))
            .text_value(
                CONTENT_ENCODING_LABEL.to_owned(),
                Value::Text(ZSTD.to_owned()),
            );
    }
    h.build()
}

fn sign_payload<E>(
    payload: Vec<u8>,
    compressed: bool,
    kid: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
) -> Result<Vec<u8>, SignError<E>> {
    if kid.len() != KID_BYTES {
        return Err(SignError::KidLength(kid.len()));
    }
    // The envelope adds well under 256 bytes to the payload.
    if payload.len() > MAX_SIGNED_BYTES - 256 {
        return Err(BatchError::TooLarge {
            what: "payload to sign",
            len: payload.len(),
            max: MAX_SIGNED_BYTES - 256,
        }
        .into());
    }
    CoseSign1Builder::new()
        .protected(protected_header(kid, compressed))
        .payload(payload)
        .try_create_signature(&[], |tbs| sign(tbs).map(|sig| sig.to_vec()))
        .map_err(SignError::Signer)?
        .build()
        .to_tagged_vec()
        .map_err(|e| SignError::Encode(e.to_string()))
}

/// Signs a batch for `POST /v1/telemetry`: checks it ([`validate_batch`] and the table limits), encodes it,
/// compresses it when that pays, and has `sign` sign the COSE Sig_structure. `kid` is the SHA-256 of the
/// telemetry key's uncompressed point; `sign` returns the ECDSA P-256 signature over SHA-256 of its input
/// as r || s (cairnd hashes the input and has the TPM sign the digest). The result is the request body.
pub fn sign_batch<E>(
    b: &Batch,
    kid: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
) -> Result<Vec<u8>, SignError<E>> {
    if kid.len() != KID_BYTES {
        return Err(SignError::KidLength(kid.len()));
    }
    validate_batch(b)?;
    let interned = intern(b);
    for (what, count, max) in [
        ("strings", interned.strings.len(), MAX_STRINGS),
        ("series", interned.series.len(), MAX_SERIES),
    ] {
        if count > max {
            return Err(BatchError::TooMany {
                what,
                count: count as u64,
                max,
            }
            .into());
        }
    }
    let raw = encode_interned(b, &interned);
    if raw.len() > MAX_PAYLOAD_BYTES {
        return Err(BatchError::TooLarge {
            what: "telemetry batch",
            len: raw.len(),
            max: MAX_PAYLOAD_BYTES,
        }
        .into());
    }
    let (payload, compressed) = choose_payload(raw);
    sign_payload(payload, compressed, kid, sign)
}

/// A signed batch, parsed but not yet verified. Verify `signature` over `to_be_signed` with the telemetry
/// key whose kid is `kid` (ECDSA P-256, SHA-256, fixed r || s), then call [`SignedBatch::batch`].
#[derive(Clone, PartialEq, Eq)]
pub struct SignedBatch {
    /// SHA-256 of the signing key's uncompressed point (32 bytes).
    pub kid: Vec<u8>,
    /// The COSE Sig_structure: the bytes the signature covers.
    pub to_be_signed: Vec<u8>,
    /// r || s, 64 bytes.
    pub signature: Vec<u8>,
    payload: Vec<u8>,
    compressed: bool,
}

impl std::fmt::Debug for SignedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedBatch")
            .field("kid", &crate::fleet::to_hex(&self.kid))
            .field("to_be_signed_bytes", &self.to_be_signed.len())
            .field("signature", &crate::fleet::to_hex(&self.signature))
            .field("payload_bytes", &self.payload.len())
            .field("compressed", &self.compressed)
            .finish()
    }
}

fn cose<T>(reason: impl Into<String>) -> Result<T, BatchError> {
    Err(BatchError::Cose(reason.into()))
}

fn bad_header<T>(reason: impl Into<String>) -> Result<T, BatchError> {
    Err(BatchError::Header(reason.into()))
}

/// Checks the protected header; returns the kid and whether the payload is compressed.
fn check_protected(h: &CoseHeader) -> Result<(Vec<u8>, bool), BatchError> {
    if h.alg != Some(RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES256)) {
        return bad_header(format!("the algorithm is {:?}, not ES256 (-7)", h.alg));
    }
    if h.key_id.len() != KID_BYTES {
        return bad_header(format!(
            "the kid is {} bytes, not the 32 of a SHA-256",
            h.key_id.len()
        ));
    }
    if h.content_type != Some(ContentType::Text(BATCH_CONTENT_TYPE.to_owned())) {
        return bad_header(format!(
            "the content type is {:?}, not {BATCH_CONTENT_TYPE:?}",
            h.content_type
        ));
    }
    if !h.iv.is_empty() || !h.partial_iv.is_empty() || !h.counter_signatures.is_empty() {
        return bad_header("it carries an IV or a counter signature");
    }
    let compressed = match h.rest.as_slice() {
        [] => false,
        [(Label::Text(label), Value::Text(encoding))] if label == CONTENT_ENCODING_LABEL => {
            if encoding != ZSTD {
                return bad_header(format!(
                    "the content encoding is {encoding:?}, and only \"zstd\" is known"
                ));
            }
            true
        }
        _ => return bad_header(
            "it carries labels other than alg, crit, content type, kid and cairn-content-encoding",
        ),
    };
    let crit_ok = if compressed {
        h.crit == [RegisteredLabel::Text(CONTENT_ENCODING_LABEL.to_owned())]
    } else {
        h.crit.is_empty()
    };
    if !crit_ok {
        return bad_header("crit must list cairn-content-encoding exactly when it is present");
    }
    Ok((h.key_id.clone(), compressed))
}

impl SignedBatch {
    /// Parses a signed batch and checks its shape and headers (not the signature: that needs the key).
    pub fn parse(bytes: &[u8]) -> Result<Self, BatchError> {
        if bytes.len() > MAX_SIGNED_BYTES {
            return Err(BatchError::TooLarge {
                what: "signed telemetry message",
                len: bytes.len(),
                max: MAX_SIGNED_BYTES,
            });
        }
        // The shape is fixed, so read it directly; coset only parses the (small) protected header and builds
        // the Sig_structure.
        let shape = |e: BatchError| BatchError::Cose(e.to_string());
        let mut r = Rd::new(bytes);
        match r.head().map_err(shape)? {
            (_, Header::Tag(18)) => {}
            (_, h) => {
                return cose(format!(
                    "it starts with {}, not the COSE_Sign1 tag (18)",
                    describe(&h)
                ))
            }
        }
        r.exact_array("COSE_Sign1", 4).map_err(shape)?;
        let protected = r
            .bytes("protected header", MAX_PROTECTED_BYTES)
            .map_err(shape)?;
        match r.head().map_err(shape)? {
            (_, Header::Map(Some(0))) => {}
            (_, Header::Map(_)) => return cose("the unprotected header is not empty"),
            (_, h) => {
                return cose(format!(
                    "the unprotected header is {}, not a map",
                    describe(&h)
                ))
            }
        }
        let payload = match r.head().map_err(shape)? {
            (at, Header::Bytes(Some(n))) => {
                r.body(at, n, MAX_SIGNED_BYTES, "payload").map_err(shape)?
            }
            (_, Header::Simple(ciborium_ll::simple::NULL)) => {
                return cose("the payload is detached, and only an attached payload is accepted")
            }
            (_, h) => {
                return cose(format!(
                    "the payload is {}, not a byte string",
                    describe(&h)
                ))
            }
        };
        let signature = r.bytes("signature", 64).map_err(shape)?;
        if signature.len() != 64 {
            return cose(format!(
                "the signature is {} bytes, not the 64 of an ES256 r || s",
                signature.len()
            ));
        }
        r.end("COSE_Sign1").map_err(shape)?;

        let protected = ProtectedHeader::from_cbor_bstr(Value::Bytes(protected))
            .map_err(|e| BatchError::Header(e.to_string()))?;
        let (kid, compressed) = check_protected(&protected.header)?;
        let message = CoseSign1 {
            protected,
            unprotected: CoseHeader::default(),
            payload: Some(payload),
            signature,
        };
        let to_be_signed = message.tbs_data(&[]);
        let CoseSign1 {
            payload, signature, ..
        } = message;
        Ok(SignedBatch {
            kid,
            to_be_signed,
            signature,
            payload: payload.unwrap_or_default(),
            compressed,
        })
    }

    /// Whether the payload is a zstd frame.
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// The payload as signed (compressed or not).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Decompresses (at most [`MAX_PAYLOAD_BYTES`]) and decodes the batch. Call it after the signature
    /// verified.
    pub fn batch(&self) -> Result<Batch, BatchError> {
        if self.compressed {
            decode_batch(&decompress(&self.payload)?)
        } else {
            decode_batch(&self.payload)
        }
    }
}

/// One zstd frame, its window at most 2^[`MAX_WINDOW_LOG`], its output at most [`MAX_PAYLOAD_BYTES`], and
/// nothing after it.
fn decompress(frame: &[u8]) -> Result<Vec<u8>, BatchError> {
    let fail = |e: std::io::Error| BatchError::Decompress(e.to_string());
    let mut decoder = zstd::stream::read::Decoder::with_buffer(frame)
        .map_err(fail)?
        .single_frame();
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(fail)?;
    let mut out = Vec::new();
    (&mut decoder)
        .take(MAX_PAYLOAD_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(fail)?;
    if out.len() > MAX_PAYLOAD_BYTES {
        return Err(BatchError::DecompressedTooLarge {
            max: MAX_PAYLOAD_BYTES,
        });
    }
    let rest = decoder.finish();
    if !rest.is_empty() {
        return Err(BatchError::Decompress(format!(
            "{} bytes follow the zstd frame",
            rest.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coset::CborSerializable as _;
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
        ECDSA_P256_SHA256_FIXED_SIGNING,
    };
    use std::time::Instant;

    /// A small deterministic PRNG (xorshift64*), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    fn sample(
        seq: u64,
        at: u64,
        name: &str,
        labels: &[(&str, &str)],
        value: f64,
        counter: bool,
    ) -> WireRecord {
        WireRecord {
            seq,
            at_unix_ms: at,
            body: WireBody::Sample {
                name: s(name),
                labels: labels.iter().map(|(k, v)| (s(k), s(v))).collect(),
                value,
                counter,
            },
        }
    }

    fn event(
        seq: u64,
        at: u64,
        component: &str,
        kind: &str,
        severity: &str,
        message: &str,
    ) -> WireRecord {
        WireRecord {
            seq,
            at_unix_ms: at,
            body: WireBody::Event {
                component: s(component),
                kind: s(kind),
                severity: s(severity),
                message: s(message),
            },
        }
    }

    /// Equality that compares values bit for bit (NaN == NaN, -0.0 != 0.0).
    fn assert_same(a: &Batch, b: &Batch) {
        assert_eq!(a.device_id, b.device_id);
        assert_eq!(a.boot_id, b.boot_id);
        assert_eq!((a.first_seq, a.last_seq), (b.first_seq, b.last_seq));
        assert_eq!(a.records.len(), b.records.len());
        for (x, y) in a.records.iter().zip(&b.records) {
            assert_eq!((x.seq, x.at_unix_ms), (y.seq, y.at_unix_ms));
            match (&x.body, &y.body) {
                (
                    WireBody::Sample {
                        name,
                        labels,
                        value,
                        counter,
                    },
                    WireBody::Sample {
                        name: n2,
                        labels: l2,
                        value: v2,
                        counter: c2,
                    },
                ) => {
                    assert_eq!((name, labels, counter), (n2, l2, c2));
                    assert_eq!(value.to_bits(), v2.to_bits(), "{value} vs {v2}");
                }
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    fn mixed_batch() -> Batch {
        let gpu0 = [
            ("gpu", "0"),
            ("UUID", "GPU-8f6e2c1a-11aa-4b2c-9d3e-0123456789ab"),
            ("modelName", "NVIDIA H100 80GB HBM3"),
        ];
        let values = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            72.5,
            0.1,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE / 4.0, // subnormal
            f64::MAX,
            f64::MIN,
            EXACT_INT,
            -EXACT_INT,
            EXACT_INT + 2.0,
            1.0e19,
            123_456_789_012.0,
            f64::from_bits(0x7ff8_0000_0000_0001), // a NaN with a payload
            f32::MAX as f64,
            65504.0,
        ];
        let mut records = Vec::new();
        let mut seq = 100;
        let mut at = 1_700_000_000_000u64;
        for (i, v) in values.iter().enumerate() {
            records.push(sample(seq, at, "DCGM_FI_DEV_GPU_TEMP", &gpu0, *v, false));
            seq += 1 + (i as u64 % 3); // gaps: thinned on the device
            at = if i == 5 { at - 20_000 } else { at + 10_000 }; // the clock steps back once
        }
        records.push(sample(
            seq,
            at,
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            &gpu0,
            9.87e11,
            true,
        ));
        seq += 1;
        records.push(sample(
            seq,
            at,
            "température_°C",
            &[("capteur", "entrée d'air ❄"), ("机架", "第三排"), ("", "")],
            21.25,
            false,
        ));
        seq += 1;
        records.push(sample(seq, at, "no_labels", &[], 3.0, false));
        seq += 1;
        records.push(event(
            seq,
            at,
            "gpu0",
            "xid",
            "critical",
            "XID 79: GPU has fallen off the bus ⚠",
        ));
        seq += 1;
        records.push(event(seq, 0, "", "", "", ""));
        seq += 1;
        records.push(sample(
            seq,
            u64::MAX,
            "DCGM_FI_DEV_GPU_TEMP",
            &gpu0,
            40.0,
            false,
        ));
        Batch {
            device_id: s("dev-0f3a"),
            boot_id: s("6c1b0d2e-5f0a-4e7b-9a51-2f3c4d5e6f70"),
            first_seq: 97,
            last_seq: seq + 5,
            records,
        }
    }

    #[test]
    fn round_trip_of_samples_and_events() {
        let b = mixed_batch();
        validate_batch(&b).unwrap();
        let bytes = encode_batch(&b);
        assert_same(&decode_batch(&bytes).unwrap(), &b);
        // Deterministic: the same batch encodes to the same bytes.
        assert_eq!(encode_batch(&b), bytes);

        let empty = Batch {
            device_id: s("d"),
            boot_id: s("b"),
            first_seq: 5,
            last_seq: 9,
            records: vec![],
        };
        assert_same(&decode_batch(&encode_batch(&empty)).unwrap(), &empty);
    }

    #[test]
    fn values_take_their_shortest_exact_form() {
        let len = |v: f64| {
            let b = Batch {
                device_id: s("d"),
                boot_id: s("b"),
                first_seq: 0,
                last_seq: 0,
                records: vec![sample(0, 0, "m", &[], v, false)],
            };
            encode_batch(&b).len()
        };
        // The value is the last item, and 0 takes one byte.
        let width = |v: f64| len(v) - len(0.0) + 1;
        assert_eq!(width(5.0), 1);
        assert_eq!(width(100.0), 2);
        assert_eq!(width(4e9), 5);
        assert_eq!(width(1.5), 3); // half
        assert_eq!(width(f64::NAN), 3);
        assert_eq!(width(-0.0), 3);
        assert_eq!(width(0.1), 9);
        assert_eq!(width(EXACT_INT + 2.0), 9);
    }

    fn example() -> Batch {
        Batch {
            device_id: s("d1"),
            boot_id: s("b1"),
            first_seq: 7,
            last_seq: 9,
            records: vec![
                sample(7, 1000, "up", &[("gpu", "0")], 1.0, false),
                event(9, 1500, "gpu0", "xid", "critical", "XID 79"),
            ],
        }
    }

    #[test]
    fn example_matches_the_module_docs() {
        let hex = crate::fleet::to_hex(&encode_batch(&example()));
        let doc: String = [
            "a8",
            "0001",
            "01626431",
            "02626231",
            "0307",
            "0409",
            "0587",
            "627570",
            "63677075",
            "6130",
            "6467707530",
            "63786964",
            "68637269746963616c",
            "66584944203739",
            "06",
            "8183",
            "00",
            "f4",
            "820102",
            "07",
            "82",
            "84",
            "00",
            "1903e8",
            "00",
            "01",
            "86",
            "02",
            "1901f4",
            "03",
            "04",
            "05",
            "06",
        ]
        .concat();
        assert_eq!(hex, doc);
    }

    fn software_key() -> (EcdsaKeyPair, Vec<u8>, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = key.public_key().as_ref().to_vec();
        assert_eq!((point.len(), point[0]), (65, 4));
        let kid = ring::digest::digest(&ring::digest::SHA256, &point)
            .as_ref()
            .to_vec();
        (key, point, kid)
    }

    fn signer(key: &EcdsaKeyPair) -> impl FnOnce(&[u8]) -> Result<[u8; 64], String> + '_ {
        move |tbs| {
            let sig = key
                .sign(&SystemRandom::new(), tbs)
                .map_err(|e| e.to_string())?;
            <[u8; 64]>::try_from(sig.as_ref()).map_err(|_| s("not 64 bytes"))
        }
    }

    fn verify(point: &[u8], m: &SignedBatch) -> bool {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(&m.to_be_signed, &m.signature)
            .is_ok()
    }

    /// `n` scrapes of the realistic site below, as one batch.
    fn site_batch(n: usize) -> Batch {
        let site = Site::new();
        let mut rng = Rng(7);
        let mut records = Vec::new();
        let mut seq = 0;
        for k in 0..n {
            site.scrape(k, &mut seq, &mut rng, &mut records);
        }
        Batch {
            device_id: s("dev-0f3a"),
            boot_id: s("6c1b0d2e-5f0a-4e7b-9a51-2f3c4d5e6f70"),
            first_seq: 0,
            last_seq: records.last().map_or(0, |r| r.seq),
            records,
        }
    }

    #[test]
    fn signed_with_a_p256_key_and_verified_over_to_be_signed() {
        let (key, point, kid) = software_key();
        for b in [example(), site_batch(3)] {
            let signed = sign_batch(&b, &kid, signer(&key)).unwrap();
            let m = SignedBatch::parse(&signed).unwrap();
            assert_eq!(m.kid, kid);
            assert_eq!(m.signature.len(), 64);
            assert!(verify(&point, &m));
            assert_same(&m.batch().unwrap(), &b);
            // The Sig_structure is RFC 9052's: ["Signature1", protected, h'', payload].
            assert!(m.to_be_signed.starts_with(&[0x84, 0x6a]));
            assert!(m.to_be_signed[2..].starts_with(b"Signature1"));
            assert!(m.to_be_signed.ends_with(m.payload()));
        }
    }

    #[test]
    fn the_envelope_is_the_documented_one() {
        let (key, _, kid) = software_key();
        let signed = sign_batch(&site_batch(3), &kid, signer(&key)).unwrap();
        let m = SignedBatch::parse(&signed).unwrap();
        assert!(m.compressed());
        // Read back with coset alone, as another implementation would.
        let cose = CoseSign1::from_tagged_slice(&signed).unwrap();
        let h = &cose.protected.header;
        assert_eq!(
            h.alg,
            Some(RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES256))
        );
        assert_eq!(h.key_id, kid);
        assert_eq!(
            h.content_type,
            Some(ContentType::Text(s(BATCH_CONTENT_TYPE)))
        );
        assert_eq!(
            h.crit,
            vec![RegisteredLabel::Text(s(CONTENT_ENCODING_LABEL))]
        );
        assert_eq!(
            h.rest,
            vec![(Label::Text(s(CONTENT_ENCODING_LABEL)), Value::Text(s(ZSTD)))]
        );
        assert!(cose.unprotected.is_empty());
        assert_eq!(cose.tbs_data(&[]), m.to_be_signed);
        let raw = zstd::stream::decode_all(cose.payload.as_deref().unwrap()).unwrap();
        assert_eq!(raw, encode_batch(&site_batch(3)));

        let small = sign_batch(&example(), &kid, signer(&key)).unwrap();
        let cose = CoseSign1::from_tagged_slice(&small).unwrap();
        assert!(cose.protected.header.crit.is_empty() && cose.protected.header.rest.is_empty());
        assert_eq!(cose.payload.unwrap(), encode_batch(&example()));
    }

    #[test]
    fn a_tampered_message_does_not_verify() {
        let (key, point, kid) = software_key();
        for b in [example(), site_batch(3)] {
            let signed = sign_batch(&b, &kid, signer(&key)).unwrap();
            let m = SignedBatch::parse(&signed).unwrap();
            let payload_at = signed.len() - 2 - 64 - m.payload().len();
            assert_eq!(
                &signed[payload_at..payload_at + m.payload().len()],
                m.payload()
            );
            let mut flipped = 0;
            for i in (payload_at..payload_at + m.payload().len()).step_by(7) {
                let mut bad = signed.clone();
                bad[i] ^= 0x10;
                let m = SignedBatch::parse(&bad).unwrap();
                assert!(!verify(&point, &m), "a flip at byte {i} still verifies");
                flipped += 1;
            }
            assert!(flipped > 5);
            // The signature and the protected header are covered too.
            for i in [signed.len() - 1, signed.len() - 40, 6, 12, 30] {
                let mut bad = signed.clone();
                bad[i] ^= 0x01;
                if let Ok(m) = SignedBatch::parse(&bad) {
                    assert!(!verify(&point, &m), "a flip at byte {i} still verifies");
                }
            }
        }
    }

    #[test]
    fn a_wrong_kid_is_detectable() {
        let (key, point, kid) = software_key();
        let (other, other_point, other_kid) = software_key();
        // Signed by the right key but naming another: the kid is not the fleet's record for this device.
        let m =
            SignedBatch::parse(&sign_batch(&example(), &other_kid, signer(&key)).unwrap()).unwrap();
        assert_ne!(m.kid, kid);
        assert_eq!(m.kid, other_kid);
        assert!(
            !verify(&other_point, &m),
            "the key the kid names did not sign"
        );
        // Signed by another key under this device's kid: the kid matches, the signature does not.
        let m = SignedBatch::parse(&sign_batch(&example(), &kid, signer(&other)).unwrap()).unwrap();
        assert_eq!(m.kid, kid);
        assert!(!verify(&point, &m));
        // A kid that is not a SHA-256 is refused on both sides.
        assert!(matches!(
            sign_batch(&example(), &kid[..31], signer(&key)),
            Err(SignError::KidLength(31))
        ));
    }

    #[test]
    fn a_signer_error_is_passed_on() {
        let err =
            sign_batch(&example(), &[0; 32], |_| Err::<[u8; 64], _>(s("TPM busy"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the telemetry key did not sign the batch: TPM busy"
        );
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        let (key, _, kid) = software_key();
        let messages = [
            sign_batch(&example(), &kid, signer(&key)).unwrap(),
            sign_batch(&site_batch(2), &kid, signer(&key)).unwrap(),
        ];
        let raws = [encode_batch(&example()), encode_batch(&mixed_batch())];
        for m in &messages {
            for n in 0..m.len() {
                assert!(
                    SignedBatch::parse(&m[..n]).is_err(),
                    "a prefix of {n} bytes parsed"
                );
            }
            let mut longer = m.clone();
            longer.push(0);
            assert!(SignedBatch::parse(&longer).is_err());
        }
        for raw in &raws {
            for n in 0..raw.len() {
                assert!(
                    decode_batch(&raw[..n]).is_err(),
                    "a prefix of {n} bytes decoded"
                );
            }
        }
        let mut rng = Rng(0x5eed);
        for _ in 0..10_000 {
            let len = rng.below(200) as usize;
            let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = SignedBatch::parse(&junk).map(|m| m.batch());
            let _ = decode_batch(&junk);
        }
        // Valid prefixes with junk after them reach deeper into the decoders.
        for _ in 0..10_000 {
            let base = &messages[rng.below(2) as usize];
            let mut bad = base.clone();
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(bad.len() as u64) as usize;
                bad[i] = rng.next() as u8;
            }
            if let Ok(m) = SignedBatch::parse(&bad) {
                let _ = m.batch();
            }
            let raw = &raws[rng.below(2) as usize];
            let mut bad = raw.clone();
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(bad.len() as u64) as usize;
                bad[i] = rng.next() as u8;
            }
            let _ = decode_batch(&bad);
        }
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        let (key, _, kid) = software_key();
        let zeros = vec![0u8; MAX_PAYLOAD_BYTES + 4096];
        let bomb = zstd::bulk::compress(&zeros, 1).unwrap();
        assert!(bomb.len() < 4096, "{} bytes", bomb.len());
        let signed = sign_payload(bomb, true, &kid, signer(&key)).unwrap();
        let m = SignedBatch::parse(&signed).unwrap();
        assert_eq!(
            m.batch(),
            Err(BatchError::DecompressedTooLarge {
                max: MAX_PAYLOAD_BYTES
            })
        );

        // Bytes after the frame, and a frame that is not one.
        let mut frame = zstd::bulk::compress(&encode_batch(&example()), 3).unwrap();
        frame.extend_from_slice(b"extra");
        let m =
            SignedBatch::parse(&sign_payload(frame, true, &kid, signer(&key)).unwrap()).unwrap();
        assert!(
            matches!(m.batch(), Err(BatchError::Decompress(_))),
            "{:?}",
            m.batch()
        );
        let m = SignedBatch::parse(
            &sign_payload(b"not zstd".to_vec(), true, &kid, signer(&key)).unwrap(),
        )
        .unwrap();
        assert!(matches!(m.batch(), Err(BatchError::Decompress(_))));
    }

    /// Batch CBOR written by hand, for what the encoder never writes.
    fn raw(f: impl FnOnce(&mut Enc<'_>)) -> Vec<u8> {
        let mut buf = Vec::new();
        f(&mut Enc(Encoder::from(Out(&mut buf))));
        buf
    }

    fn head(e: &mut Enc<'_>, first: u64, last: u64, strings: &[&str]) {
        e.head(Header::Map(Some(8)));
        for (k, v) in [(0, 1), (1, 0), (2, 0), (3, first), (4, last)] {
            e.uint(k);
            if k == 1 || k == 2 {
                e.text("x");
            } else {
                e.uint(v);
            }
        }
        e.uint(5);
        e.array(strings.len());
        for s in strings {
            e.text(s);
        }
    }

    #[test]
    fn amplification_through_the_tables_is_bounded() {
        // One series with 64 labels of 4 KiB each, referenced by every record: a 1.3 MB batch that would
        // decode to tens of gigabytes.
        let big = "x".repeat(MAX_STRING_BYTES);
        let bytes = raw(|e| {
            head(e, 0, u64::MAX, &[&big]);
            e.uint(6);
            e.array(1);
            e.array(3);
            e.uint(0);
            e.head(Header::Simple(ciborium_ll::simple::FALSE));
            e.array(2 * MAX_LABELS);
            for _ in 0..2 * MAX_LABELS {
                e.uint(0);
            }
            e.uint(7);
            e.array(MAX_RECORDS);
            for _ in 0..MAX_RECORDS {
                e.array(4);
                e.uint(1);
                e.uint(0);
                e.uint(0);
                e.uint(0);
            }
        });
        assert!(bytes.len() < 2 << 20);
        let started = Instant::now();
        let err = decode_batch(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                BatchError::TooLarge {
                    what: "decoded batch",
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed().as_secs() < 10);

        // A count the input cannot hold is refused before anything is reserved.
        let bytes = raw(|e| {
            head(e, 0, 9, &[]);
            e.uint(6);
            e.array(0);
            e.uint(7);
            e.array(MAX_RECORDS + 1);
        });
        assert!(matches!(
            decode_batch(&bytes),
            Err(BatchError::TooMany {
                what: "records",
                ..
            })
        ));
        let bytes = raw(|e| {
            head(e, 0, 9, &[]);
            e.uint(6);
            e.array(0);
            e.uint(7);
            e.array(MAX_RECORDS);
        });
        assert!(matches!(
            decode_batch(&bytes),
            Err(BatchError::Truncated { .. })
        ));
        let bytes = raw(|e| {
            e.head(Header::Map(Some(8)));
            e.uint(0);
            e.uint(1);
            e.uint(1);
            e.head(Header::Text(Some(MAX_STRING_BYTES + 1)));
        });
        assert!(matches!(
            decode_batch(&bytes),
            Err(BatchError::TooLarge {
                what: "device id",
                ..
            })
        ));
    }

    #[test]
    fn what_the_decoder_refuses() {
        let refuse = |bytes: Vec<u8>, needle: &str| {
            let err = decode_batch(&bytes).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} does not say {needle:?}");
        };
        let good = encode_batch(&example());
        // Version 2.
        let mut v2 = good.clone();
        v2[2] = 2;
        refuse(v2, "format version 2");
        // Keys out of order.
        let mut swapped = good.clone();
        swapped[3] = 2;
        refuse(swapped, "key 2 where key 1 belongs");
        // Trailing bytes.
        let mut longer = good.clone();
        longer.push(0);
        refuse(longer, "1 bytes follow the end of the batch");
        // A step of 0, and a seq past last_seq.
        let step = |first: u64, dseq: u64, last: u64| {
            raw(|e| {
                head(e, 0, last, &["m"]);
                e.uint(6);
                e.array(1);
                e.array(3);
                e.uint(0);
                e.head(Header::Simple(ciborium_ll::simple::TRUE));
                e.array(0);
                e.uint(7);
                e.array(2);
                for d in [first, dseq] {
                    e.array(4);
                    e.uint(d);
                    e.uint(0);
                    e.uint(0);
                    e.uint(1);
                }
            })
        };
        assert!(decode_batch(&step(0, 1, 1)).is_ok());
        assert!(decode_batch(&step(0, u64::MAX, u64::MAX)).is_ok());
        refuse(step(0, 0, 1), "record 1 is out of sequence");
        refuse(step(0, 2, 1), "record 1 is out of sequence");
        refuse(step(1, u64::MAX, u64::MAX), "record 1 is out of sequence");
        refuse(step(2, 0, 1), "record 0 is out of sequence");
        // An integer value a double cannot hold, a time before the epoch, an index past its table.
        let record = |f: &dyn Fn(&mut Enc<'_>)| {
            raw(|e| {
                head(e, 0, 0, &["m"]);
                e.uint(6);
                e.array(1);
                e.array(3);
                e.uint(0);
                e.head(Header::Simple(ciborium_ll::simple::FALSE));
                e.array(0);
                e.uint(7);
                e.array(1);
                f(e);
            })
        };
        refuse(
            record(&|e| {
                e.array(4);
                e.uint(0);
                e.uint(0);
                e.uint(0);
                e.uint((1 << 53) + 1);
            }),
            "beyond ±2^53",
        );
        refuse(
            record(&|e| {
                e.array(4);
                e.uint(0);
                e.int(-1);
                e.uint(0);
                e.uint(0);
            }),
            "time leaves",
        );
        refuse(
            record(&|e| {
                e.array(4);
                e.uint(0);
                e.uint(0);
                e.uint(1);
                e.uint(0);
            }),
            "a sample's series 1 points past the end of its table (1 entries)",
        );
        refuse(
            record(&|e| {
                e.array(5);
            }),
            "should be an array of 4 (a sample) or 6 (an event)",
        );
        refuse(
            record(&|e| {
                e.head(Header::Array(None));
            }),
            "indefinite length",
        );
        // Not UTF-8.
        let mut bad = good.clone();
        let at = bad.windows(2).position(|w| w == b"d1").unwrap();
        bad[at] = 0xff;
        refuse(bad, "not UTF-8");
    }

    #[test]
    fn what_the_signer_refuses() {
        let (key, _, kid) = software_key();
        let mut b = example();
        b.records.swap(0, 1);
        assert!(matches!(
            sign_batch(&b, &kid, signer(&key)),
            Err(SignError::Invalid(BatchError::Sequence { index: 1, .. }))
        ));
        let mut b = example();
        b.last_seq = 8;
        assert!(matches!(
            sign_batch(&b, &kid, signer(&key)),
            Err(SignError::Invalid(_))
        ));
        let mut b = example();
        b.first_seq = 8;
        assert!(matches!(
            sign_batch(&b, &kid, signer(&key)),
            Err(SignError::Invalid(_))
        ));
        let mut b = example();
        b.device_id = "x".repeat(MAX_STRING_BYTES + 1);
        assert!(matches!(
            sign_batch(&b, &kid, signer(&key)),
            Err(SignError::Invalid(BatchError::TooLarge {
                what: "device id",
                ..
            }))
        ));
    }

    #[test]
    fn what_the_envelope_check_refuses() {
        let (key, _, kid) = software_key();
        let good = sign_batch(&example(), &kid, signer(&key)).unwrap();
        let mut cose = CoseSign1::from_tagged_slice(&good).unwrap();
        let reencode = |c: CoseSign1| c.to_tagged_vec().unwrap();
        let refuse = |bytes: Vec<u8>, needle: &str| {
            let err = SignedBatch::parse(&bytes).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} does not say {needle:?}");
        };
        // Untagged.
        refuse(cose.clone().to_vec().unwrap(), "not the COSE_Sign1 tag");
        // Something in the unprotected header.
        let mut c = cose.clone();
        c.unprotected.key_id = kid.clone();
        refuse(reencode(c), "unprotected header is not empty");
        // Detached payload.
        let mut c = cose.clone();
        c.payload = None;
        refuse(reencode(c), "detached");
        // A DER signature.
        let mut c = cose.clone();
        c.signature.push(0);
        refuse(reencode(c), "signature is 65 bytes");
        // Headers.
        let with = |h: CoseHeader| {
            let mut c = cose.clone();
            c.protected = ProtectedHeader {
                original_data: None,
                header: h,
            };
            reencode(c)
        };
        let base = || protected_header(&kid, false);
        refuse(
            with(CoseHeader {
                alg: Some(RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES384)),
                ..base()
            }),
            "not ES256",
        );
        refuse(
            with(CoseHeader {
                key_id: kid[..20].to_vec(),
                ..base()
            }),
            "kid is 20 bytes",
        );
        refuse(
            with(CoseHeader {
                content_type: Some(ContentType::Text(s("application/json"))),
                ..base()
            }),
            "content type",
        );
        refuse(
            with(CoseHeader {
                iv: vec![1; 12],
                ..base()
            }),
            "IV",
        );
        let mut h = base();
        h.rest.push((
            Label::Text(s(CONTENT_ENCODING_LABEL)),
            Value::Text(s("gzip")),
        ));
        h.crit
            .push(RegisteredLabel::Text(s(CONTENT_ENCODING_LABEL)));
        refuse(with(h), "\"gzip\"");
        let mut h = base();
        h.rest
            .push((Label::Text(s(CONTENT_ENCODING_LABEL)), Value::Text(s(ZSTD))));
        refuse(with(h), "crit must list");
        let mut h = base();
        h.rest.push((Label::Int(-65537), Value::Bool(true)));
        refuse(with(h), "labels other than");
        // The good one still parses after all this.
        cose.signature = cose.signature.clone();
        assert!(SignedBatch::parse(&reencode(cose)).is_ok());
    }

    #[test]
    fn compression_is_chosen_only_when_it_pays() {
        let (key, _, kid) = software_key();
        let small =
            SignedBatch::parse(&sign_batch(&example(), &kid, signer(&key)).unwrap()).unwrap();
        assert!(!small.compressed());
        let b = site_batch(6);
        let raw_len = encode_batch(&b).len();
        let big = SignedBatch::parse(&sign_batch(&b, &kid, signer(&key)).unwrap()).unwrap();
        assert!(big.compressed());
        assert!(
            big.payload().len() * 2 < raw_len,
            "{} of {raw_len}",
            big.payload().len()
        );

        let mut rng = Rng(3);
        let noise: Vec<u8> = (0..100_000).map(|_| rng.next() as u8).collect();
        assert_eq!(choose_payload(noise.clone()), (noise, false));
        let text = b"DCGM_FI_DEV_GPU_TEMP ".repeat(100);
        let (z, compressed) = choose_payload(text.clone());
        assert!(compressed && z.len() < text.len() / 8);
        assert_eq!(choose_payload(b"tiny".to_vec()), (b"tiny".to_vec(), false));
    }

    #[test]
    fn batch_ack_is_strict_json() {
        let ack = BatchAck {
            device_id: s("dev-0f3a"),
            boot_id: s("b"),
            acked_up_to: 41,
            duplicates: 0,
        };
        let json = serde_json::to_string(&ack).unwrap();
        assert_eq!(
            json,
            r#"{"device_id":"dev-0f3a","boot_id":"b","acked_up_to":41,"duplicates":0}"#
        );
        assert_eq!(serde_json::from_str::<BatchAck>(&json).unwrap(), ack);
        assert!(serde_json::from_str::<BatchAck>(&json.replace('}', r#","extra":1}"#)).is_err());
    }

    /// A realistic site for sizes: one 8-GPU node as cairnd and the exporters it replaces would report it.
    /// 8 GPUs × 25 dcgm-exporter series (its labels), 64 CPUs × 8 modes of node_cpu_seconds_total,
    /// 16 NVMe drives × 12 smartctl series, 96 IPMI sensors: 1,000 series.
    struct Site {
        series: Vec<SiteSeries>,
    }

    struct SiteSeries {
        name: String,
        labels: Vec<(String, String)>,
        counter: bool,
        kind: Walk,
        source: usize,
    }

    #[derive(Clone, Copy)]
    enum Walk {
        /// An integer that changes now and then (clocks, memory, temperatures, utilisation).
        Int { base: u64, spread: u64, every: u64 },
        /// A fractional gauge (watts, volts).
        Frac { base: f64, spread: f64 },
        /// An integer counter growing by about `rate` per scrape.
        IntCounter { start: u64, rate: u64 },
        /// A float counter growing by about `rate` per scrape, hundredths (CPU seconds).
        FracCounter { start: f64, rate: f64 },
        /// Zero, forever (most error counters).
        Zero,
    }

    const DCGM: &[(&str, bool, Walk)] = &[
        (
            "DCGM_FI_DEV_SM_CLOCK",
            false,
            Walk::Int {
                base: 1755,
                spread: 225,
                every: 6,
            },
        ),
        (
            "DCGM_FI_DEV_MEM_CLOCK",
            false,
            Walk::Int {
                base: 2619,
                spread: 0,
                every: 1,
            },
        ),
        (
            "DCGM_FI_DEV_MEMORY_TEMP",
            false,
            Walk::Int {
                base: 45,
                spread: 20,
                every: 3,
            },
        ),
        (
            "DCGM_FI_DEV_GPU_TEMP",
            false,
            Walk::Int {
                base: 40,
                spread: 35,
                every: 2,
            },
        ),
        (
            "DCGM_FI_DEV_POWER_USAGE",
            false,
            Walk::Frac {
                base: 120.0,
                spread: 580.0,
            },
        ),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            true,
            Walk::IntCounter {
                start: 912_345_678_901,
                rate: 4_000_000,
            },
        ),
        ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", true, Walk::Zero),
        (
            "DCGM_FI_DEV_GPU_UTIL",
            false,
            Walk::Int {
                base: 0,
                spread: 100,
                every: 1,
            },
        ),
        (
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            false,
            Walk::Int {
                base: 0,
                spread: 60,
                every: 1,
            },
        ),
        ("DCGM_FI_DEV_ENC_UTIL", false, Walk::Zero),
        ("DCGM_FI_DEV_DEC_UTIL", false, Walk::Zero),
        ("DCGM_FI_DEV_XID_ERRORS", false, Walk::Zero),
        (
            "DCGM_FI_DEV_FB_FREE",
            false,
            Walk::Int {
                base: 1_000,
                spread: 79_000,
                every: 4,
            },
        ),
        (
            "DCGM_FI_DEV_FB_USED",
            false,
            Walk::Int {
                base: 1_000,
                spread: 79_000,
                every: 4,
            },
        ),
        (
            "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
            true,
            Walk::IntCounter { start: 3, rate: 0 },
        ),
        ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", true, Walk::Zero),
        ("DCGM_FI_DEV_RETIRED_SBE", true, Walk::Zero),
        ("DCGM_FI_DEV_RETIRED_DBE", true, Walk::Zero),
        ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", true, Walk::Zero),
        ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", true, Walk::Zero),
        ("DCGM_FI_DEV_ROW_REMAP_PENDING", false, Walk::Zero),
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", false, Walk::Zero),
        (
            "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
            false,
            Walk::Int {
                base: 0,
                spread: 4,
                every: 30,
            },
        ),
        (
            "DCGM_FI_PROF_SM_ACTIVE",
            false,
            Walk::Frac {
                base: 0.0,
                spread: 1.0,
            },
        ),
        (
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
            false,
            Walk::Frac {
                base: 0.0,
                spread: 1.0,
            },
        ),
    ];

    const SMART: &[(&str, bool, Walk)] = &[
        (
            "smartctl_device_temperature",
            false,
            Walk::Int {
                base: 30,
                spread: 25,
                every: 6,
            },
        ),
        (
            "smartctl_device_percentage_used",
            false,
            Walk::Int {
                base: 3,
                spread: 0,
                every: 1,
            },
        ),
        (
            "smartctl_device_available_spare",
            false,
            Walk::Int {
                base: 100,
                spread: 0,
                every: 1,
            },
        ),
        (
            "smartctl_device_power_on_seconds",
            true,
            Walk::IntCounter {
                start: 51_840_000,
                rate: 10,
            },
        ),
        (
            "smartctl_device_data_units_written",
            true,
            Walk::IntCounter {
                start: 1_234_567_890,
                rate: 2_000,
            },
        ),
        (
            "smartctl_device_data_units_read",
            true,
            Walk::IntCounter {
                start: 2_345_678_901,
                rate: 5_000,
            },
        ),
        (
            "smartctl_device_host_writes",
            true,
            Walk::IntCounter {
                start: 9_876_543_210,
                rate: 20_000,
            },
        ),
        (
            "smartctl_device_host_reads",
            true,
            Walk::IntCounter {
                start: 8_765_432_109,
                rate: 50_000,
            },
        ),
        ("smartctl_device_media_errors", true, Walk::Zero),
        (
            "smartctl_device_num_err_log_entries",
            true,
            Walk::IntCounter { start: 12, rate: 0 },
        ),
        ("smartctl_device_critical_warning", false, Walk::Zero),
        (
            "smartctl_device_smart_status",
            false,
            Walk::Int {
                base: 1,
                spread: 0,
                every: 1,
            },
        ),
    ];

    const CPU_MODES: &[&str] = &[
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ];

    impl Site {
        fn new() -> Self {
            let mut series = Vec::new();
            let host = ("Hostname", "gpu-node-017.rack-b3.site-ams2".to_owned());
            for gpu in 0u64..8 {
                let labels = vec![
                    ("gpu", gpu.to_string()),
                    (
                        "UUID",
                        format!(
                            "GPU-{:08x}-{:04x}-4b2c-9d3e-{:012x}",
                            0x8f6e_2c1a + gpu * 7919,
                            0x11aa + gpu,
                            0x0123_4567_89ab + gpu * 104_729
                        ),
                    ),
                    (
                        "pci_bus_id",
                        format!(
                            "00000000:{:02X}:00.0",
                            [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb][gpu as usize]
                        ),
                    ),
                    ("device", format!("nvidia{gpu}")),
                    ("modelName", "NVIDIA H100 80GB HBM3".to_owned()),
                    host.clone(),
                ];
                for (name, counter, kind) in DCGM {
                    series.push(SiteSeries::new(name, &labels, *counter, *kind, 0));
                }
            }
            for cpu in 0..64 {
                for (m, mode) in CPU_MODES.iter().enumerate() {
                    let rate = [3.1, 0.01, 0.9, 5.5, 0.2, 0.0, 0.05, 0.0][m];
                    series.push(SiteSeries::new(
                        "node_cpu_seconds_total",
                        &[("cpu", cpu.to_string()), ("mode", (*mode).to_owned())],
                        true,
                        Walk::FracCounter {
                            start: 1_234_567.89 * (m as f64 + 1.0),
                            rate,
                        },
                        1,
                    ));
                }
            }
            for drive in 0u64..16 {
                let labels = vec![
                    ("device", format!("nvme{drive}n1")),
                    ("model_name", "SAMSUNG MZQL27T6HBLA-00A07".to_owned()),
                    (
                        "serial_number",
                        format!("S6CKNE0T{:06}", 123_456 + drive * 37),
                    ),
                    ("firmware_version", "GDC5902Q".to_owned()),
                ];
                for (name, counter, kind) in SMART {
                    series.push(SiteSeries::new(name, &labels, *counter, *kind, 2));
                }
            }
            for sensor in 0..96 {
                let (kind, unit, walk) = match sensor % 3 {
                    0 => (
                        "Fan",
                        "RPM",
                        Walk::Int {
                            base: 3000,
                            spread: 9000,
                            every: 2,
                        },
                    ),
                    1 => (
                        "Voltage",
                        "Volts",
                        Walk::Frac {
                            base: 11.8,
                            spread: 0.4,
                        },
                    ),
                    _ => (
                        "Temperature",
                        "degrees C",
                        Walk::Int {
                            base: 22,
                            spread: 50,
                            every: 3,
                        },
                    ),
                };
                series.push(SiteSeries::new(
                    "ipmi_sensor_value",
                    &[
                        ("id", sensor.to_string()),
                        ("name", format!("{kind} {}", sensor / 3)),
                        ("type", kind.to_owned()),
                        ("unit", unit.to_owned()),
                    ],
                    false,
                    walk,
                    3,
                ));
            }
            assert_eq!(series.len(), 1000);
            Site { series }
        }

        /// Scrape `k` (every 10 s): one sample of every series, seqs continuing from `out`.
        fn scrape(&self, k: usize, seq: &mut u64, rng: &mut Rng, out: &mut Vec<WireRecord>) {
            let k = k as u64;
            let base = 1_763_800_000_000 + k * 10_000;
            let jitter: Vec<u64> = (0..4).map(|_| rng.below(40)).collect();
            for s in &self.series {
                let value = match s.kind {
                    Walk::Int {
                        base,
                        spread,
                        every,
                    } => {
                        let phase = (k / every) as f64;
                        (base
                            + ((phase * 0.37).sin().abs() * spread as f64) as u64
                            + rng.below(2) * (spread / 50)) as f64
                    }
                    Walk::Frac { base, spread } => {
                        let x = base
                            + spread * ((k as f64 * 0.05).sin() * 0.5 + 0.5)
                            + rng.below(1000) as f64 / 1000.0;
                        (x * 1000.0).round() / 1000.0
                    }
                    Walk::IntCounter { start, rate } => {
                        (start
                            + k * rate
                            + if rate > 0 {
                                rng.below(rate / 10 + 1)
                            } else {
                                0
                            }) as f64
                    }
                    Walk::FracCounter { start, rate } => {
                        ((start + k as f64 * rate * 10.0 + rng.below(10) as f64 / 100.0) * 100.0)
                            .round()
                            / 100.0
                    }
                    Walk::Zero => 0.0,
                };
                out.push(WireRecord {
                    seq: *seq,
                    at_unix_ms: base + jitter[s.source],
                    body: WireBody::Sample {
                        name: s.name.clone(),
                        labels: s.labels.clone(),
                        value,
                        counter: s.counter,
                    },
                });
                *seq += 1;
            }
        }
    }

    impl SiteSeries {
        fn new<K: AsRef<str>>(
            name: &str,
            labels: &[(K, String)],
            counter: bool,
            kind: Walk,
            source: usize,
        ) -> Self {
            SiteSeries {
                name: name.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.as_ref().to_owned(), v.clone()))
                    .collect(),
                counter,
                kind,
                source,
            }
        }
    }

    /// Sizes and speeds for the realistic site: 1,000 series × 8,640 samples (a day at 10 s), cut into
    /// batches of several sizes. `cargo test -p cairn-proto --release -- --ignored --nocapture telemetry`
    #[test]
    #[ignore = "a measurement: run it in release"]
    fn telemetry_sizes_and_speeds() {
        let site = Site::new();
        let (key, point, kid) = software_key();
        const SCRAPES: usize = 8640;
        println!(
            "1,000 series × {SCRAPES} scrapes = {} samples",
            1000 * SCRAPES
        );
        println!("scrapes/batch  records/batch  raw B/sample  zstd B/sample  signed B/sample  encode Mrec/s  zstd MB/s(in)  unzstd MB/s(out)  decode Mrec/s  sign+parse+verify ms/batch");
        for per_batch in [6usize, 60, 240] {
            let mut rng = Rng(11);
            let (mut raw_total, mut z_total, mut signed_total, mut n_total) =
                (0usize, 0usize, 0usize, 0usize);
            let (mut t_enc, mut t_z, mut t_unz, mut t_dec, mut t_sig) =
                (0f64, 0f64, 0f64, 0f64, 0f64);
            let mut first_seq = 0;
            let mut k = 0;
            let mut batches = 0;
            while k < SCRAPES {
                let mut records = Vec::with_capacity(per_batch * 1000);
                let mut seq = first_seq;
                for j in k..(k + per_batch).min(SCRAPES) {
                    site.scrape(j, &mut seq, &mut rng, &mut records);
                }
                k += per_batch;
                let b = Batch {
                    device_id: s("dev-0f3a"),
                    boot_id: s("6c1b0d2e-5f0a-4e7b-9a51-2f3c4d5e6f70"),
                    first_seq,
                    last_seq: records.last().map_or(first_seq, |r| r.seq),
                    records,
                };
                first_seq = b.last_seq + 1;
                let t = Instant::now();
                let raw = encode_batch(&b);
                t_enc += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let z = zstd::bulk::compress(&raw, ZSTD_LEVEL).unwrap();
                t_z += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let back = decompress(&z).unwrap();
                t_unz += t.elapsed().as_secs_f64();
                assert_eq!(back, raw);
                let t = Instant::now();
                let decoded = decode_batch(&raw).unwrap();
                t_dec += t.elapsed().as_secs_f64();
                assert_eq!(decoded.records.len(), b.records.len());
                let t = Instant::now();
                let signed = sign_batch(&b, &kid, signer(&key)).unwrap();
                let m = SignedBatch::parse(&signed).unwrap();
                assert!(verify(&point, &m));
                t_sig += t.elapsed().as_secs_f64();
                n_total += b.records.len();
                raw_total += raw.len();
                z_total += z.len();
                signed_total += signed.len();
                batches += 1;
            }
            let n = n_total as f64;
            println!(
                "{per_batch:>13}  {:>13}  {:>12.2}  {:>13.2}  {:>15.2}  {:>13.1}  {:>13.0}  {:>16.0}  {:>13.2}  {:>8.2}",
                per_batch * 1000,
                raw_total as f64 / n,
                z_total as f64 / n,
                signed_total as f64 / n,
                n / t_enc / 1e6,
                raw_total as f64 / t_z / 1e6,
                raw_total as f64 / t_unz / 1e6,
                n / t_dec / 1e6,
                t_sig * 1e3 / batches as f64,
            );
        }
    }
}
