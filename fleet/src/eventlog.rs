//! Replaying a device's measured-boot event log (parsed by [`cairn_proto::eventlog`]) to the PCR values it
//! predicts, and comparing them with the PCR values of a verified quote. A log that replays to the quoted
//! values is the log of the boot the TPM measured; the events then say what booted.
//!
//! Replay uses each event's digest, never its data: what an event's digest should be for its data depends on
//! the event type (a PE image's Authenticode hash, a variable's UEFI_VARIABLE_DATA, …) and is the caller's
//! policy, like which PCR values are acceptable at all.

use cairn_proto::eventlog::{EventLog, EV_NO_ACTION, TPM_ALG_SHA256};
use std::collections::BTreeMap;

/// The highest PCR index of a PC Client TPM.
pub const MAX_PCR: u32 = 23;

/// Why a log could not be replayed, or does not match a quote: a code to store and show, and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "the event log has no SHA-256 bank (it declares {}); the fleet replays SHA-256 only, so enable the \
         SHA-256 PCR bank in the device's firmware TPM settings",
        algorithms(.declared)
    )]
    NoSha256Bank { declared: Vec<(u16, u16)> },
    #[error("event {event} of the event log is for PCR {pcr}; a TPM has PCRs 0 to {MAX_PCR} only")]
    PcrOutOfRange { event: usize, pcr: u32 },
    #[error(
        "event {event} of the event log (PCR {pcr}, type {event_type:#010x}) has no 32-byte SHA-256 digest, \
         so the SHA-256 bank cannot be replayed"
    )]
    MissingDigest {
        event: usize,
        pcr: u32,
        event_type: u32,
    },
    #[error(
        "event {event} of the event log is a StartupLocality event after {reason}, so PCR 0's starting value \
         is ambiguous"
    )]
    StartupLocality { event: usize, reason: &'static str },
    #[error(
        "the event log does not replay to the quoted value of PCR {}: the log is incomplete or altered, or \
         something extended these PCRs without logging it. Do not trust what the log says booted; fetch the \
         log and a quote again, and if they still disagree, treat the device as compromised and re-image it",
        indices(.pcrs)
    )]
    Mismatch { pcrs: Vec<u8> },
    #[error(
        "the event log touches PCR {} but the quote covers PCR {}, so the quote says nothing about the log; \
         quote the PCRs the log measures (0 to 7 for firmware)",
        indices(.touched),
        indices(.quoted)
    )]
    NothingCompared { touched: Vec<u8>, quoted: Vec<u8> },
}

impl ReplayError {
    /// A stable machine-readable code (for the fleet's records and the protocol's error bodies).
    pub fn code(&self) -> &'static str {
        match self {
            ReplayError::NoSha256Bank { .. } => "eventlog_no_sha256_bank",
            ReplayError::PcrOutOfRange { .. } => "eventlog_pcr_out_of_range",
            ReplayError::MissingDigest { .. } => "eventlog_missing_digest",
            ReplayError::StartupLocality { .. } => "eventlog_startup_locality",
            ReplayError::Mismatch { .. } => "eventlog_pcr_mismatch",
            ReplayError::NothingCompared { .. } => "eventlog_nothing_compared",
        }
    }
}

fn algorithms(declared: &[(u16, u16)]) -> String {
    if declared.is_empty() {
        return "no algorithms".into();
    }
    let parts: Vec<String> = declared
        .iter()
        .map(|(alg, size)| format!("{alg:#06x} with {size}-byte digests"))
        .collect();
    parts.join(", ")
}

fn indices(pcrs: &[u8]) -> String {
    if pcrs.is_empty() {
        return "(none)".into();
    }
    let parts: Vec<String> = pcrs.iter().map(u8::to_string).collect();
    parts.join(", ")
}

/// SHA-256 of `data` (for the simulated firmware, which measures event data this way).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn extend(pcr: &[u8; 32], digest: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(pcr);
    ctx.update(digest);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Replays the SHA-256 bank: each PCR starts at 32 zero bytes (PCR 0 starts at 0…03 or 0…04 when a
/// StartupLocality event says locality 3 or 4), and each event other than EV_NO_ACTION extends
/// PCR = SHA-256(PCR || digest). Returns the final value of every PCR the log extended.
///
/// Refused: a log without a SHA-256 bank of 32-byte digests, an event for a PCR above 23, an extending event
/// without a SHA-256 digest, and a StartupLocality event that is not the only one or comes after PCR 0 was
/// extended.
pub fn replay_sha256(log: &EventLog) -> Result<BTreeMap<u8, [u8; 32]>, ReplayError> {
    if !log
        .algorithms
        .iter()
        .any(|&(alg, size)| alg == TPM_ALG_SHA256 && size == 32)
    {
        return Err(ReplayError::NoSha256Bank {
            declared: log.algorithms.clone(),
        });
    }
    let mut pcrs: BTreeMap<u8, [u8; 32]> = BTreeMap::new();
    let mut pcr0_start = [0u8; 32];
    let mut locality_seen = false;
    for (event, ev) in log.events.iter().enumerate() {
        if ev.pcr > MAX_PCR {
            return Err(ReplayError::PcrOutOfRange { event, pcr: ev.pcr });
        }
        let pcr = ev.pcr as u8;
        if ev.event_type == EV_NO_ACTION {
            if let Some(locality) = ev.startup_locality() {
                if locality_seen {
                    return Err(ReplayError::StartupLocality {
                        event,
                        reason: "another one",
                    });
                }
                if pcrs.contains_key(&0) {
                    return Err(ReplayError::StartupLocality {
                        event,
                        reason: "PCR 0 was extended",
                    });
                }
                locality_seen = true;
                if locality == 3 || locality == 4 {
                    pcr0_start[31] = locality;
                }
            }
            continue;
        }
        let digest = match ev.digest(TPM_ALG_SHA256) {
            Some(d) if d.len() == 32 => d,
            _ => {
                return Err(ReplayError::MissingDigest {
                    event,
                    pcr: ev.pcr,
                    event_type: ev.event_type,
                })
            }
        };
        let value = pcrs
            .entry(pcr)
            .or_insert(if pcr == 0 { pcr0_start } else { [0u8; 32] });
        *value = extend(value, digest);
    }
    Ok(pcrs)
}

/// Compares a replay with quoted SHA-256 PCR values (index → value, from a verified quote): every PCR the log
/// extended and the quote covers must match. PCRs only one side has are not compared, but at least one PCR
/// must be on both, or the comparison would vouch for nothing.
pub fn check_against_quote(
    replayed: &BTreeMap<u8, [u8; 32]>,
    quoted: &BTreeMap<u8, Vec<u8>>,
) -> Result<(), ReplayError> {
    let mut compared = 0usize;
    let mut differ = Vec::new();
    for (pcr, value) in replayed {
        if let Some(q) = quoted.get(pcr) {
            compared += 1;
            if q.as_slice() != value.as_slice() {
                differ.push(*pcr);
            }
        }
    }
    if !differ.is_empty() {
        return Err(ReplayError::Mismatch { pcrs: differ });
    }
    if compared == 0 {
        return Err(ReplayError::NothingCompared {
            touched: replayed.keys().copied().collect(),
            quoted: quoted.keys().copied().collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::eventlog::{
        Event, EV_EFI_ACTION, EV_POST_CODE, EV_SEPARATOR, TPM_ALG_SHA1, TPM_ALG_SHA384,
    };

    fn counter(i: u8) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[31] = i;
        d
    }

    fn ev(pcr: u32, event_type: u32, sha256: Vec<u8>) -> Event {
        Event {
            pcr,
            event_type,
            digests: vec![(TPM_ALG_SHA1, vec![0xaa; 20]), (TPM_ALG_SHA256, sha256)],
            data: b"data is not replayed".to_vec(),
        }
    }

    fn log(events: Vec<Event>) -> EventLog {
        EventLog {
            algorithms: vec![(TPM_ALG_SHA1, 20), (TPM_ALG_SHA256, 32)],
            events,
        }
    }

    fn hex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn replay_matches_a_tpm() {
        // Known answer from swtpm: 40 extends of PCR 4 with the digests 0…01 to 0…28 (`tpm2_pcrextend`).
        let events = (1..=40).map(|i| ev(4, EV_POST_CODE, counter(i))).collect();
        let pcrs = replay_sha256(&log(events)).unwrap();
        assert_eq!(pcrs.len(), 1);
        assert_eq!(
            pcrs[&4],
            hex("c8c71389c8140f73cee5e415db2e1d244b52b0d1255b4d055a8d3682ff15b0ee")
        );
    }

    #[test]
    fn replay_extends_in_order_per_pcr_and_skips_no_action() {
        let sep = sha256(&[0; 4]);
        let events = vec![
            ev(0, EV_POST_CODE, counter(1)),
            ev(7, EV_SEPARATOR, sep.to_vec()),
            ev(0, EV_NO_ACTION, counter(9)),
            ev(3, EV_NO_ACTION, counter(9)),
            ev(0, EV_SEPARATOR, sep.to_vec()),
        ];
        let pcrs = replay_sha256(&log(events)).unwrap();
        assert_eq!(pcrs.keys().copied().collect::<Vec<_>>(), vec![0, 7]);
        assert_eq!(pcrs[&0], extend(&extend(&[0; 32], &counter(1)), &sep));
        assert_eq!(pcrs[&7], sha256(&[[0u8; 32].as_slice(), &sep].concat()));
    }

    #[test]
    fn startup_locality_3_or_4_sets_pcr_0s_start() {
        let algs = log(vec![]).algorithms;
        for (locality, last) in [(0u8, 0u8), (1, 0), (3, 3), (4, 4)] {
            let l = log(vec![
                Event::startup_locality_event(locality, &algs),
                ev(0, EV_POST_CODE, counter(1)),
                ev(1, EV_POST_CODE, counter(1)),
            ]);
            assert_eq!(l.startup_locality(), Some(locality));
            let pcrs = replay_sha256(&l).unwrap();
            let mut start = [0u8; 32];
            start[31] = last;
            assert_eq!(pcrs[&0], extend(&start, &counter(1)), "locality {locality}");
            assert_eq!(
                pcrs[&1],
                extend(&[0; 32], &counter(1)),
                "locality {locality}"
            );
        }
        // Known answer: locality 3, one extend of 32 zero bytes = SHA-256(0…03 || 0…00).
        let l = log(vec![
            Event::startup_locality_event(3, &algs),
            ev(0, EV_POST_CODE, vec![0; 32]),
        ]);
        let mut input = [0u8; 64];
        input[31] = 3;
        assert_eq!(replay_sha256(&l).unwrap()[&0], sha256(&input));
    }

    #[test]
    fn a_late_or_second_startup_locality_is_refused() {
        let algs = log(vec![]).algorithms;
        let late = log(vec![
            ev(0, EV_POST_CODE, counter(1)),
            Event::startup_locality_event(3, &algs),
        ]);
        let err = replay_sha256(&late).unwrap_err();
        assert_eq!(
            err,
            ReplayError::StartupLocality {
                event: 1,
                reason: "PCR 0 was extended"
            }
        );
        let twice = log(vec![
            Event::startup_locality_event(0, &algs),
            Event::startup_locality_event(3, &algs),
        ]);
        assert_eq!(
            replay_sha256(&twice).unwrap_err().code(),
            "eventlog_startup_locality"
        );
    }

    #[test]
    fn a_log_without_a_sha256_bank_is_refused() {
        let mut l = log(vec![ev(0, EV_POST_CODE, counter(1))]);
        l.algorithms = vec![(TPM_ALG_SHA1, 20), (TPM_ALG_SHA384, 48)];
        let err = replay_sha256(&l).unwrap_err();
        assert_eq!(err.code(), "eventlog_no_sha256_bank");
        assert!(
            err.to_string()
                .contains("0x0004 with 20-byte digests, 0x000c with 48-byte digests"),
            "{err}"
        );
        l.algorithms = vec![(TPM_ALG_SHA256, 20)];
        assert_eq!(
            replay_sha256(&l).unwrap_err().code(),
            "eventlog_no_sha256_bank"
        );
    }

    #[test]
    fn an_event_without_a_sha256_digest_or_beyond_pcr_23_is_refused() {
        let mut no_digest = ev(5, EV_EFI_ACTION, counter(1));
        no_digest.digests.truncate(1);
        let err =
            replay_sha256(&log(vec![ev(0, EV_POST_CODE, counter(1)), no_digest])).unwrap_err();
        assert_eq!(
            err,
            ReplayError::MissingDigest {
                event: 1,
                pcr: 5,
                event_type: EV_EFI_ACTION
            }
        );
        let short = ev(5, EV_EFI_ACTION, vec![1; 20]);
        assert_eq!(
            replay_sha256(&log(vec![short])).unwrap_err().code(),
            "eventlog_missing_digest"
        );
        // An EV_NO_ACTION event needs no digest.
        let mut info = ev(0, EV_NO_ACTION, counter(1));
        info.digests.clear();
        assert!(replay_sha256(&log(vec![info])).unwrap().is_empty());

        assert!(replay_sha256(&log(vec![ev(23, EV_POST_CODE, counter(1))])).is_ok());
        for pcr in [24, 256, u32::MAX] {
            let err = replay_sha256(&log(vec![ev(pcr, EV_POST_CODE, counter(1))])).unwrap_err();
            assert_eq!(err, ReplayError::PcrOutOfRange { event: 0, pcr });
        }
    }

    #[test]
    fn check_against_quote_lists_every_differing_pcr() {
        let replayed = replay_sha256(&log(vec![
            ev(0, EV_POST_CODE, counter(1)),
            ev(4, EV_POST_CODE, counter(2)),
            ev(7, EV_POST_CODE, counter(3)),
            ev(9, EV_POST_CODE, counter(4)),
        ]))
        .unwrap();
        let mut quoted: BTreeMap<u8, Vec<u8>> = (0..8u8).map(|i| (i, vec![0; 32])).collect();
        for (i, v) in &replayed {
            quoted.insert(*i, v.to_vec());
        }
        quoted.remove(&9);
        // PCR 9 is not quoted and PCRs 1-3, 5, 6 are not in the log: neither is compared.
        assert_eq!(check_against_quote(&replayed, &quoted), Ok(()));

        quoted.insert(4, vec![0xee; 32]);
        quoted.insert(7, replayed[&7][..31].to_vec()); // a short value never matches
        let err = check_against_quote(&replayed, &quoted).unwrap_err();
        assert_eq!(err, ReplayError::Mismatch { pcrs: vec![4, 7] });
        assert_eq!(err.code(), "eventlog_pcr_mismatch");
        let text = err.to_string();
        assert!(text.contains("PCR 4, 7:"), "{text}");
        assert!(text.contains("re-image"), "{text}");
    }

    #[test]
    fn check_against_quote_refuses_an_empty_overlap() {
        let replayed = replay_sha256(&log(vec![ev(9, EV_POST_CODE, counter(4))])).unwrap();
        let quoted: BTreeMap<u8, Vec<u8>> = (0..8u8).map(|i| (i, vec![0; 32])).collect();
        let err = check_against_quote(&replayed, &quoted).unwrap_err();
        assert_eq!(err.code(), "eventlog_nothing_compared");
        assert!(
            err.to_string()
                .contains("touches PCR 9 but the quote covers PCR 0, 1"),
            "{err}"
        );
        let err = check_against_quote(&BTreeMap::new(), &quoted).unwrap_err();
        assert!(err.to_string().contains("touches PCR (none)"), "{err}");
    }
}
