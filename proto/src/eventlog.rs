//! The TCG PC Client "crypto agile" measured-boot event log, as firmware hands it to the OS and Linux shows it
//! in `/sys/kernel/security/tpm0/binary_bios_measurements` (TCG PC Client Platform Firmware Profile, §10).
//!
//! Layout, all integers little-endian:
//! - one TCG_PCR_EVENT in the old SHA-1 format (u32 pcrIndex = 0, u32 eventType = EV_NO_ACTION, 20-byte
//!   digest, u32 eventSize, event data) whose data is the TCG_EfiSpecIDEvent "Spec ID Event03": it lists the
//!   digest algorithms of the log and their sizes;
//! - then TCG_PCR_EVENT2 entries: u32 pcrIndex, u32 eventType, TPML_DIGEST_VALUES (u32 count, then per digest
//!   u16 algId and a digest of the size the Spec ID event declared), u32 eventSize, event data.
//!
//! The parser only checks the format; what the events mean (and whether the log replays to a TPM's PCRs) is
//! the fleet's business. It never panics and never allocates more than a constant factor of its input:
//! event data is capped at [`MAX_EVENT_DATA`], the number of events at [`MAX_EVENTS`].
//!
//! Trailing bytes: a log read from the firmware's reserved memory (ACPI TPM2/TCPA LASA and LAML) is that
//! region's full length, zero-padded after the last event. So the parser stops when only zero bytes remain
//! (an all-zero record would be an EV_PREBOOT_CERT in PCR 0 with no digests and no data, which measures
//! nothing). Any other trailing bytes must parse as events; they are refused otherwise.

use std::fmt;

pub const TPM_ALG_SHA1: u16 = 0x0004;
pub const TPM_ALG_SHA256: u16 = 0x000b;
pub const TPM_ALG_SHA384: u16 = 0x000c;
pub const TPM_ALG_SHA512: u16 = 0x000d;
pub const TPM_ALG_SM3_256: u16 = 0x0012;

// Event types (PC Client Platform Firmware Profile, table "Events").
pub const EV_PREBOOT_CERT: u32 = 0x0000_0000;
pub const EV_POST_CODE: u32 = 0x0000_0001;
pub const EV_NO_ACTION: u32 = 0x0000_0003;
pub const EV_SEPARATOR: u32 = 0x0000_0004;
pub const EV_ACTION: u32 = 0x0000_0005;
pub const EV_EVENT_TAG: u32 = 0x0000_0006;
pub const EV_S_CRTM_CONTENTS: u32 = 0x0000_0007;
pub const EV_S_CRTM_VERSION: u32 = 0x0000_0008;
pub const EV_CPU_MICROCODE: u32 = 0x0000_0009;
pub const EV_PLATFORM_CONFIG_FLAGS: u32 = 0x0000_000a;
pub const EV_TABLE_OF_DEVICES: u32 = 0x0000_000b;
pub const EV_COMPACT_HASH: u32 = 0x0000_000c;
pub const EV_IPL: u32 = 0x0000_000d;
pub const EV_IPL_PARTITION_DATA: u32 = 0x0000_000e;
pub const EV_NONHOST_CODE: u32 = 0x0000_000f;
pub const EV_NONHOST_CONFIG: u32 = 0x0000_0010;
pub const EV_NONHOST_INFO: u32 = 0x0000_0011;
pub const EV_OMIT_BOOT_DEVICE_EVENTS: u32 = 0x0000_0012;
pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
pub const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
pub const EV_EFI_BOOT_SERVICES_DRIVER: u32 = 0x8000_0004;
pub const EV_EFI_RUNTIME_SERVICES_DRIVER: u32 = 0x8000_0005;
pub const EV_EFI_GPT_EVENT: u32 = 0x8000_0006;
pub const EV_EFI_ACTION: u32 = 0x8000_0007;
pub const EV_EFI_PLATFORM_FIRMWARE_BLOB: u32 = 0x8000_0008;
pub const EV_EFI_HANDOFF_TABLES: u32 = 0x8000_0009;
pub const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000a;
pub const EV_EFI_HANDOFF_TABLES2: u32 = 0x8000_000b;
pub const EV_EFI_VARIABLE_BOOT2: u32 = 0x8000_000c;
pub const EV_EFI_HCRTM_EVENT: u32 = 0x8000_0010;
pub const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00e0;
pub const EV_EFI_SPDM_FIRMWARE_BLOB: u32 = 0x8000_00e1;
pub const EV_EFI_SPDM_FIRMWARE_CONFIG: u32 = 0x8000_00e2;

/// The most event data one event may carry. Real events are at most tens of KiB (a `db` full of certificates);
/// a larger size is a corrupt log.
pub const MAX_EVENT_DATA: usize = 1 << 20;
/// The most events a log may hold. A real boot logs hundreds.
pub const MAX_EVENTS: usize = 100_000;
/// The most digest algorithms the Spec ID event may declare (the TCG registry has fewer hash algorithms).
pub const MAX_ALGORITHMS: usize = 16;
/// The largest digest the Spec ID event may declare (SHA-512 and SHA3-512).
pub const MAX_DIGEST_SIZE: u16 = 64;

const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";
/// TCG_PCR_EVENT's digest is always SHA-1 sized.
const SHA1_DIGEST_SIZE: usize = 20;

/// A parsed crypto-agile event log: the digest algorithms its Spec ID event declares, and its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    /// (TPM algorithm id, digest size in bytes), in the Spec ID event's order.
    pub algorithms: Vec<(u16, u16)>,
    /// The TCG_PCR_EVENT2 entries after the Spec ID event, in log order. "Event N" in errors is `events[N]`.
    pub events: Vec<Event>,
}

/// One TCG_PCR_EVENT2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub event_type: u32,
    /// (TPM algorithm id, digest), in the log's order; each algorithm declared by the Spec ID event, at most once.
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

impl Event {
    /// The startup locality if this is an EV_NO_ACTION "StartupLocality" event in PCR 0 (the firmware's record
    /// of the locality TPM2_Startup ran at, which sets PCR 0's starting value).
    pub fn startup_locality(&self) -> Option<u8> {
        if self.pcr != 0 || self.event_type != EV_NO_ACTION {
            return None;
        }
        let rest = self.data.strip_prefix(STARTUP_LOCALITY_SIGNATURE)?;
        rest.first().copied()
    }

    /// A StartupLocality event (EV_NO_ACTION in PCR 0, zero digests for every algorithm of `algorithms`).
    pub fn startup_locality_event(locality: u8, algorithms: &[(u16, u16)]) -> Event {
        let mut data = STARTUP_LOCALITY_SIGNATURE.to_vec();
        data.push(locality);
        Event {
            pcr: 0,
            event_type: EV_NO_ACTION,
            digests: algorithms
                .iter()
                .map(|&(alg, size)| (alg, vec![0; usize::from(size)]))
                .collect(),
            data,
        }
    }

    /// This event's digest for `alg`, if it carries one.
    pub fn digest(&self, alg: u16) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, d)| d.as_slice())
    }
}

impl EventLog {
    /// The startup locality from the first EV_NO_ACTION "StartupLocality" event in PCR 0, if any. It applies to
    /// every bank, the SHA-256 one included: locality 3 or 4 makes PCR 0 start at 0…03 or 0…04 instead of zero.
    pub fn startup_locality(&self) -> Option<u8> {
        self.events.iter().find_map(Event::startup_locality)
    }
}

/// Where in a log a problem was found: the byte offset of the offending field, and which record holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// Byte offset of the field from the start of the log.
    pub offset: usize,
    /// `Some(n)` for `events[n]` (the n-th TCG_PCR_EVENT2, counting from 0); `None` for the Spec ID event.
    pub event: Option<usize>,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.event {
            None => write!(f, "the Spec ID event, at byte {}", self.offset),
            Some(n) => write!(f, "event {n}, at byte {}", self.offset),
        }
    }
}

/// Why an event log was refused: a code to store and show, and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogError {
    #[error(
        "the event log is truncated in {at}: its {field} needs {needed} bytes but only {available} remain \
         (send the whole of binary_bios_measurements)"
    )]
    Truncated {
        at: At,
        field: &'static str,
        needed: usize,
        available: usize,
    },
    #[error(
        "the event log does not start with a TCG \"Spec ID Event03\" event ({detail}), so it is not a TPM 2.0 \
         crypto-agile log; SHA-1-only (TPM 1.2 format) logs are not accepted"
    )]
    NotCryptoAgile { detail: String },
    #[error("the event log's Spec ID event is malformed in {at}: {detail}")]
    SpecId { at: At, detail: String },
    #[error(
        "the event log's {at} has a digest with algorithm {alg:#06x}, which its Spec ID event does not \
         declare, so its size is unknown"
    )]
    UndeclaredAlgorithm { at: At, alg: u16 },
    #[error("the event log's {at} has two digests with algorithm {alg:#06x}")]
    DuplicateDigest { at: At, alg: u16 },
    #[error(
        "the event log's {at} has {count} digests but its Spec ID event declares only {declared} algorithms"
    )]
    TooManyDigests { at: At, count: u32, declared: usize },
    #[error(
        "the event log's {at} declares {size} bytes of event data, more than the {max}-byte limit"
    )]
    EventTooLarge { at: At, size: u32, max: usize },
    #[error("the event log has more than {max} events (the next one is at byte {offset})")]
    TooManyEvents { offset: usize, max: usize },
}

impl EventLogError {
    /// A stable machine-readable code (for the fleet's records and the protocol's error bodies).
    pub fn code(&self) -> &'static str {
        match self {
            EventLogError::Truncated { .. } => "eventlog_truncated",
            EventLogError::NotCryptoAgile { .. } => "eventlog_not_crypto_agile",
            EventLogError::SpecId { .. } => "eventlog_spec_id",
            EventLogError::UndeclaredAlgorithm { .. } => "eventlog_undeclared_algorithm",
            EventLogError::DuplicateDigest { .. } => "eventlog_duplicate_digest",
            EventLogError::TooManyDigests { .. } => "eventlog_too_many_digests",
            EventLogError::EventTooLarge { .. } => "eventlog_event_too_large",
            EventLogError::TooManyEvents { .. } => "eventlog_too_many_events",
        }
    }
}

/// A bounds-checked little-endian reader; offsets are absolute (from the start of the log).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    event: Option<usize>,
}

impl<'a> Reader<'a> {
    fn at(&self) -> At {
        At {
            offset: self.pos,
            event: self.event,
        }
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], EventLogError> {
        let available = self.buf.len().saturating_sub(self.pos);
        if available < n {
            return Err(EventLogError::Truncated {
                at: self.at(),
                field,
                needed: n,
                available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, EventLogError> {
        Ok(self.bytes(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, EventLogError> {
        let b = self.bytes(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, EventLogError> {
        let b = self.bytes(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u32 size, then that many bytes, refusing sizes over [`MAX_EVENT_DATA`].
    fn event_data(&mut self) -> Result<&'a [u8], EventLogError> {
        let at = self.at();
        let size = self.u32("eventSize")?;
        if size as usize > MAX_EVENT_DATA {
            return Err(EventLogError::EventTooLarge {
                at,
                size,
                max: MAX_EVENT_DATA,
            });
        }
        self.bytes(size as usize, "event data")
    }
}

/// Parses the Spec ID event (a TCG_PCR_EVENT) and returns the declared algorithms.
fn spec_id(r: &mut Reader<'_>) -> Result<Vec<(u16, u16)>, EventLogError> {
    let pcr = r.u32("pcrIndex")?;
    let event_type = r.u32("eventType")?;
    if pcr != 0 || event_type != EV_NO_ACTION {
        return Err(EventLogError::NotCryptoAgile {
            detail: format!("its first event is of type {event_type:#010x} in PCR {pcr}, not EV_NO_ACTION in PCR 0"),
        });
    }
    let _sha1_digest = r.bytes(SHA1_DIGEST_SIZE, "SHA-1 digest")?;
    let data_start = r.pos + 4;
    let data = r.event_data()?;
    if !data.starts_with(SPEC_ID_SIGNATURE) {
        let shown = &data[..data.len().min(16)];
        return Err(EventLogError::NotCryptoAgile {
            detail: format!(
                "its first event's signature is {:?}",
                String::from_utf8_lossy(shown)
            ),
        });
    }
    // Read the Spec ID fields from the event data only, with offsets still counted from the log's start.
    let mut s = Reader {
        buf: &r.buf[..data_start + data.len()],
        pos: data_start + SPEC_ID_SIGNATURE.len(),
        event: None,
    };
    let _platform_class = s.u32("platformClass")?;
    let _version_minor = s.u8("specVersionMinor")?;
    let _version_major = s.u8("specVersionMajor")?;
    let _errata = s.u8("specErrata")?;
    let _uintn_size = s.u8("uintnSize")?;
    let count_at = s.at();
    let count = s.u32("numberOfAlgorithms")?;
    if count == 0 || count as usize > MAX_ALGORITHMS {
        return Err(EventLogError::SpecId {
            at: count_at,
            detail: format!(
                "it declares {count} digest algorithms; expected 1 to {MAX_ALGORITHMS}"
            ),
        });
    }
    let mut algorithms: Vec<(u16, u16)> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let at = s.at();
        let alg = s.u16("digestSizes.algorithmId")?;
        let size = s.u16("digestSizes.digestSize")?;
        if size == 0 || size > MAX_DIGEST_SIZE {
            return Err(EventLogError::SpecId {
                at,
                detail: format!(
                    "algorithm {alg:#06x} has {size}-byte digests; expected 1 to {MAX_DIGEST_SIZE}"
                ),
            });
        }
        if algorithms.iter().any(|&(a, _)| a == alg) {
            return Err(EventLogError::SpecId {
                at,
                detail: format!("algorithm {alg:#06x} is declared twice"),
            });
        }
        algorithms.push((alg, size));
    }
    let vendor_size = s.u8("vendorInfoSize")?;
    let _vendor_info = s.bytes(usize::from(vendor_size), "vendorInfo")?;
    let rest = s.buf.len() - s.pos;
    if rest != 0 {
        return Err(EventLogError::SpecId {
            at: s.at(),
            detail: format!("{rest} bytes follow the vendor info inside the event"),
        });
    }
    Ok(algorithms)
}

/// Parses a crypto-agile event log. See the module documentation for what is refused and why.
pub fn parse(bytes: &[u8]) -> Result<EventLog, EventLogError> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        event: None,
    };
    let algorithms = spec_id(&mut r)?;
    // Zero padding after the last event is not an event (module documentation).
    let content_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut events = Vec::new();
    while r.pos < content_end {
        if events.len() == MAX_EVENTS {
            return Err(EventLogError::TooManyEvents {
                offset: r.pos,
                max: MAX_EVENTS,
            });
        }
        r.event = Some(events.len());
        let pcr = r.u32("pcrIndex")?;
        let event_type = r.u32("eventType")?;
        let count_at = r.at();
        let count = r.u32("digests.count")?;
        if count as usize > algorithms.len() {
            return Err(EventLogError::TooManyDigests {
                at: count_at,
                count,
                declared: algorithms.len(),
            });
        }
        let mut digests: Vec<(u16, Vec<u8>)> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let at = r.at();
            let alg = r.u16("digest algorithm")?;
            let Some(&(_, size)) = algorithms.iter().find(|&&(a, _)| a == alg) else {
                return Err(EventLogError::UndeclaredAlgorithm { at, alg });
            };
            if digests.iter().any(|(a, _)| *a == alg) {
                return Err(EventLogError::DuplicateDigest { at, alg });
            }
            let digest = r.bytes(usize::from(size), "digest")?;
            digests.push((alg, digest.to_vec()));
        }
        let data = r.event_data()?.to_vec();
        events.push(Event {
            pcr,
            event_type,
            digests,
            data,
        });
    }
    Ok(EventLog { algorithms, events })
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Encodes a log: the Spec ID event for `log.algorithms` (platform class 0, spec version 2.0 errata 2, 64-bit
/// UINTN, no vendor info), then the events. It writes what it is given: digests must have their algorithm's
/// declared size and appear in `log.algorithms`, as in every parsed log, or the result will not parse.
pub fn encode(log: &EventLog) -> Vec<u8> {
    let mut spec = SPEC_ID_SIGNATURE.to_vec();
    put_u32(&mut spec, 0); // platformClass: client
    spec.extend_from_slice(&[0, 2, 2, 2]); // specVersionMinor, specVersionMajor, specErrata, uintnSize (UINT64)
    put_u32(&mut spec, log.algorithms.len() as u32);
    for &(alg, size) in &log.algorithms {
        spec.extend_from_slice(&alg.to_le_bytes());
        spec.extend_from_slice(&size.to_le_bytes());
    }
    spec.push(0); // vendorInfoSize

    let mut out = Vec::new();
    put_u32(&mut out, 0);
    put_u32(&mut out, EV_NO_ACTION);
    out.extend_from_slice(&[0; SHA1_DIGEST_SIZE]);
    put_u32(&mut out, spec.len() as u32);
    out.extend_from_slice(&spec);
    for e in &log.events {
        put_u32(&mut out, e.pcr);
        put_u32(&mut out, e.event_type);
        put_u32(&mut out, e.digests.len() as u32);
        for (alg, digest) in &e.digests {
            out.extend_from_slice(&alg.to_le_bytes());
            out.extend_from_slice(digest);
        }
        put_u32(&mut out, e.data.len() as u32);
        out.extend_from_slice(&e.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA1_ALGS: [(u16, u16); 2] = [(TPM_ALG_SHA1, 20), (TPM_ALG_SHA256, 32)];

    fn sample() -> EventLog {
        let algorithms = SHA1_ALGS.to_vec();
        let ev = |pcr: u32, event_type: u32, fill: u8, data: &[u8]| Event {
            pcr,
            event_type,
            digests: vec![
                (TPM_ALG_SHA1, vec![fill; 20]),
                (TPM_ALG_SHA256, vec![fill; 32]),
            ],
            data: data.to_vec(),
        };
        EventLog {
            events: vec![
                Event::startup_locality_event(3, &algorithms),
                ev(0, EV_S_CRTM_VERSION, 1, b"v\0e\0r\0"),
                ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, 2, &[9; 300]),
                ev(4, EV_SEPARATOR, 3, &[0; 4]),
                ev(5, EV_EFI_ACTION, 4, b""),
            ],
            algorithms,
        }
    }

    /// Byte offsets of the sample's fields, found by encoding prefixes of it.
    fn header_len(log: &EventLog) -> usize {
        encode(&EventLog {
            algorithms: log.algorithms.clone(),
            events: vec![],
        })
        .len()
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let log = sample();
        let bytes = encode(&log);
        assert_eq!(parse(&bytes).unwrap(), log);
        assert_eq!(parse(&bytes).unwrap().startup_locality(), Some(3));
        // A SHA-256-only log, and one with no events.
        let only = EventLog {
            algorithms: vec![(TPM_ALG_SHA256, 32)],
            events: vec![Event {
                pcr: 4,
                event_type: EV_EFI_BOOT_SERVICES_APPLICATION,
                digests: vec![(TPM_ALG_SHA256, vec![7; 32])],
                data: vec![1, 2, 3],
            }],
        };
        assert_eq!(parse(&encode(&only)).unwrap(), only);
        assert_eq!(only.startup_locality(), None);
        let empty = EventLog {
            algorithms: vec![(TPM_ALG_SHA256, 32)],
            events: vec![],
        };
        assert_eq!(parse(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn spec_id_layout_matches_the_tcg_structure() {
        let bytes = encode(&EventLog {
            algorithms: vec![(TPM_ALG_SHA256, 32)],
            events: vec![],
        });
        // TCG_PCR_EVENT header: PCR 0, EV_NO_ACTION, 20 zero bytes, size.
        assert_eq!(&bytes[0..8], &[0, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&bytes[8..28], &[0; 20]);
        let size = u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]) as usize;
        assert_eq!(size, 16 + 4 + 4 + 4 + 4 + 1);
        assert_eq!(&bytes[32..48], b"Spec ID Event03\0");
        assert_eq!(&bytes[52..56], &[0, 2, 2, 2]);
        assert_eq!(&bytes[56..60], &[1, 0, 0, 0]);
        assert_eq!(&bytes[60..64], &[0x0b, 0, 32, 0]);
        assert_eq!(bytes.len(), 32 + size);
    }

    #[test]
    fn every_truncation_is_refused_with_the_field_and_event() {
        let bytes = encode(&sample());
        let mut fields = std::collections::BTreeSet::new();
        for len in 0..bytes.len() {
            let cut = &bytes[..len];
            // Cuts that leave only zero bytes of a new event are padding, not truncation; see below.
            match parse(cut) {
                Err(EventLogError::Truncated {
                    at,
                    field,
                    needed,
                    available,
                }) => {
                    assert!(available < needed, "{len}: {available} >= {needed}");
                    assert!(at.offset <= len, "{len}: offset {}", at.offset);
                    fields.insert((at.event.is_some(), field));
                }
                Ok(log) => {
                    // Only when the cut falls on an event boundary or inside trailing zero bytes.
                    let whole = parse(&bytes).unwrap();
                    assert!(log.events.len() < whole.events.len(), "{len}");
                    assert_eq!(log.events[..], whole.events[..log.events.len()], "{len}");
                    assert!(
                        bytes[..len]
                            .iter()
                            .rposition(|&b| b != 0)
                            .map_or(0, |i| i + 1)
                            <= encode(&log).len(),
                        "{len}: accepted a cut inside an event"
                    );
                }
                Err(e) => panic!("{len}: unexpected {e}"),
            }
        }
        for field in [
            "pcrIndex",
            "eventType",
            "SHA-1 digest",
            "eventSize",
            "event data",
        ] {
            assert!(
                fields.contains(&(false, field)),
                "Spec ID {field} never truncated"
            );
        }
        // Inside the Spec ID event's data: shrink its declared size (past the signature) and cut there.
        let header = header_len(&sample());
        for size in 16..header - 32 {
            let mut cut = bytes[..32 + size].to_vec();
            cut[28..32].copy_from_slice(&(size as u32).to_le_bytes());
            match parse(&cut) {
                Err(EventLogError::Truncated {
                    at: At { event: None, .. },
                    field,
                    ..
                }) => {
                    fields.insert((false, field));
                }
                other => panic!("Spec ID data of {size} bytes: {other:?}"),
            }
        }
        for field in [
            "platformClass",
            "specVersionMinor",
            "specVersionMajor",
            "specErrata",
            "uintnSize",
            "numberOfAlgorithms",
            "digestSizes.algorithmId",
            "digestSizes.digestSize",
            "vendorInfoSize",
        ] {
            assert!(
                fields.contains(&(false, field)),
                "Spec ID {field} never truncated"
            );
        }
        for field in [
            "pcrIndex",
            "eventType",
            "digests.count",
            "digest algorithm",
            "digest",
            "eventSize",
            "event data",
        ] {
            assert!(
                fields.contains(&(true, field)),
                "event {field} never truncated"
            );
        }
    }

    #[test]
    fn a_truncation_names_the_event_and_offset() {
        let log = sample();
        let bytes = encode(&log);
        // Cut inside event 2's data (300 bytes of 9s).
        let start2 = encode(&EventLog {
            algorithms: log.algorithms.clone(),
            events: log.events[..2].to_vec(),
        })
        .len();
        let data2 = start2 + 12 + (2 + 20) + (2 + 32) + 4;
        let err = parse(&bytes[..data2 + 10]).unwrap_err();
        assert_eq!(
            err,
            EventLogError::Truncated {
                at: At {
                    offset: data2,
                    event: Some(2)
                },
                field: "event data",
                needed: 300,
                available: 10,
            }
        );
        assert_eq!(err.code(), "eventlog_truncated");
        let text = err.to_string();
        assert!(
            text.contains(&format!("event 2, at byte {data2}")),
            "{text}"
        );
    }

    #[test]
    fn a_log_without_a_spec_id_event_is_refused() {
        // A TPM 1.2 (SHA-1 only) log starts with a measured event.
        let mut bytes = encode(&sample());
        bytes[4] = EV_S_CRTM_VERSION as u8;
        let err = parse(&bytes).unwrap_err();
        assert_eq!(err.code(), "eventlog_not_crypto_agile", "{err}");
        // EV_NO_ACTION, but another signature.
        let mut bytes = encode(&sample());
        bytes[32..48].copy_from_slice(b"Spec ID Event00\0");
        let err = parse(&bytes).unwrap_err();
        assert_eq!(err.code(), "eventlog_not_crypto_agile", "{err}");
        assert!(err.to_string().contains("Spec ID Event00"), "{err}");
        // Not in PCR 0.
        let mut bytes = encode(&sample());
        bytes[0] = 1;
        assert_eq!(
            parse(&bytes).unwrap_err().code(),
            "eventlog_not_crypto_agile"
        );
        // Nothing at all.
        assert_eq!(parse(&[]).unwrap_err().code(), "eventlog_truncated");
    }

    #[test]
    fn a_malformed_spec_id_event_is_refused() {
        let with = |algorithms: Vec<(u16, u16)>| {
            encode(&EventLog {
                algorithms,
                events: vec![],
            })
        };
        for (algs, what) in [
            (vec![], "0 digest algorithms"),
            (vec![(TPM_ALG_SHA256, 0)], "0-byte"),
            (vec![(TPM_ALG_SHA256, 65)], "65-byte"),
            (vec![(TPM_ALG_SHA256, 32), (TPM_ALG_SHA256, 32)], "twice"),
            (vec![(TPM_ALG_SHA256, 32); 17], "17 digest algorithms"),
        ] {
            let err = parse(&with(algs)).unwrap_err();
            assert_eq!(err.code(), "eventlog_spec_id", "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        // Bytes after the vendor info, inside the Spec ID event.
        let mut bytes = with(vec![(TPM_ALG_SHA256, 32)]);
        bytes[28] += 1;
        bytes.push(0x55);
        let err = parse(&bytes).unwrap_err();
        assert_eq!(err.code(), "eventlog_spec_id", "{err}");
        assert!(err.to_string().contains("1 bytes follow"), "{err}");
        // Vendor info is skipped.
        let mut bytes = with(vec![(TPM_ALG_SHA256, 32)]);
        bytes[28] += 3;
        let last = bytes.len() - 1;
        bytes[last] = 3;
        bytes.extend_from_slice(b"abc");
        assert_eq!(
            parse(&bytes).unwrap().algorithms,
            vec![(TPM_ALG_SHA256, 32)]
        );
    }

    #[test]
    fn an_undeclared_or_repeated_digest_algorithm_is_refused() {
        let mut log = sample();
        log.events[3].digests[1].0 = TPM_ALG_SHA384;
        let err = parse(&encode(&log)).unwrap_err();
        assert!(
            matches!(
                err,
                EventLogError::UndeclaredAlgorithm {
                    at: At { event: Some(3), .. },
                    alg: TPM_ALG_SHA384
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("0x000c"), "{err}");

        let mut log = sample();
        log.events[1].digests[1] = (TPM_ALG_SHA1, vec![0; 20]);
        let err = parse(&encode(&log)).unwrap_err();
        assert_eq!(err.code(), "eventlog_duplicate_digest", "{err}");

        let mut log = sample();
        log.events[1].digests.push((TPM_ALG_SHA256, vec![0; 32]));
        let err = parse(&encode(&log)).unwrap_err();
        assert_eq!(err.code(), "eventlog_too_many_digests", "{err}");
    }

    #[test]
    fn a_huge_count_or_size_is_refused_before_reading_it() {
        let log = sample();
        let start1 = header_len(&log) + encode_len_of(&log, 1);
        // Event 1's digest count = u32::MAX.
        let mut bytes = encode(&log);
        bytes[start1 + 8..start1 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse(&bytes).unwrap_err().code(),
            "eventlog_too_many_digests"
        );
        // Event 1's data size over the cap.
        let size_at = start1 + 12 + 22 + 34;
        let mut bytes = encode(&log);
        bytes[size_at..size_at + 4].copy_from_slice(&(MAX_EVENT_DATA as u32 + 1).to_le_bytes());
        let err = parse(&bytes).unwrap_err();
        assert_eq!(
            err,
            EventLogError::EventTooLarge {
                at: At {
                    offset: size_at,
                    event: Some(1)
                },
                size: MAX_EVENT_DATA as u32 + 1,
                max: MAX_EVENT_DATA,
            }
        );
        // Exactly the cap is fine.
        let mut big = sample();
        big.events[2].data = vec![1; MAX_EVENT_DATA];
        assert_eq!(parse(&encode(&big)).unwrap(), big);
        // The Spec ID event's own size is capped too.
        let mut bytes = encode(&log);
        bytes[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse(&bytes).unwrap_err().code(),
            "eventlog_event_too_large"
        );
    }

    /// The encoded length of the first `n` events of `log`.
    fn encode_len_of(log: &EventLog, n: usize) -> usize {
        encode(&EventLog {
            algorithms: log.algorithms.clone(),
            events: log.events[..n].to_vec(),
        })
        .len()
            - header_len(log)
    }

    #[test]
    fn too_many_events_are_refused() {
        let algorithms = vec![(TPM_ALG_SHA256, 32)];
        let one = Event {
            pcr: 1,
            event_type: EV_POST_CODE,
            digests: vec![],
            data: vec![],
        };
        let mut log = EventLog {
            algorithms,
            events: vec![one; MAX_EVENTS],
        };
        assert_eq!(parse(&encode(&log)).unwrap().events.len(), MAX_EVENTS);
        log.events.push(log.events[0].clone());
        let err = parse(&encode(&log)).unwrap_err();
        assert_eq!(err.code(), "eventlog_too_many_events", "{err}");
    }

    #[test]
    fn trailing_zeros_are_padding_and_other_trailing_bytes_are_refused() {
        let log = sample();
        let mut bytes = encode(&log);
        bytes.extend_from_slice(&[0; 4096]);
        assert_eq!(parse(&bytes).unwrap(), log);
        // An event whose own last bytes are zero (a separator) is still read whole before padding.
        let mut sep = sample();
        sep.events.push(Event {
            pcr: 7,
            event_type: EV_SEPARATOR,
            digests: vec![(TPM_ALG_SHA256, vec![0; 32])],
            data: vec![0; 4],
        });
        let mut bytes = encode(&sep);
        bytes.extend_from_slice(&[0; 100]);
        assert_eq!(parse(&bytes).unwrap(), sep);

        for tail in [&[0xff][..], &[0, 0, 0, 0, 1], &[0xff; 64]] {
            let mut bytes = encode(&log);
            bytes.extend_from_slice(tail);
            let err = parse(&bytes).unwrap_err();
            assert!(
                err.to_string().contains("event 5,"),
                "tail {tail:?} gave {err}"
            );
        }
    }

    #[test]
    fn startup_locality_needs_the_signature_in_pcr_0() {
        let algs = [(TPM_ALG_SHA256, 32)];
        assert_eq!(
            Event::startup_locality_event(4, &algs).startup_locality(),
            Some(4)
        );
        let mut in_pcr1 = Event::startup_locality_event(3, &algs);
        in_pcr1.pcr = 1;
        assert_eq!(in_pcr1.startup_locality(), None);
        let mut measured = Event::startup_locality_event(3, &algs);
        measured.event_type = EV_POST_CODE;
        assert_eq!(measured.startup_locality(), None);
        let mut short = Event::startup_locality_event(3, &algs);
        short.data.pop();
        assert_eq!(short.startup_locality(), None);
    }
}
