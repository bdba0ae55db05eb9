//! The site overview: what the console, the local status page and `cairnctl overview` show a person at the
//! box. One list of lines in words, each with a level and, when something is wrong, the next step. The agent
//! builds it (`cairn_agent::overview`); everything that shows it only lays it out.

use crate::control::Event;
use serde::{Deserialize, Serialize};

/// How a line should look: green, yellow or red.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    /// Working, or on its way (waiting for the fleet, writing an update), but worth a look.
    Attention,
    /// Broken, or blocking the box: the line says the cause and `next_step` what to do.
    Fault,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Attention => "attention",
            Level::Fault => "fault",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// Short fixed label: "Onboarding", "Attestation", "Update", "GPUs", "SSDs", "Power", "Workloads",
    /// "Network", "Uplink", "Telemetry", "TPM".
    pub topic: String,
    pub level: Level,
    /// What is, in words: "8 of 8 GPUs ok", "no network link on port 1 (eno1)".
    pub text: String,
    /// What a person at the box should do, for every line that is not ok.
    pub next_step: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overview {
    pub generated_unix: u64,
    /// The fleet's name for this device (the EK's TPM name, hex), once the TPM was read.
    pub device_id: Option<String>,
    /// The short code ops types to find or approve this device (see [`device_code`]).
    pub code: Option<String>,
    /// The site label from the provisioning file, if it gave one.
    pub site: Option<String>,
    /// The image (or agent) version this boot runs, and its slot when the image has slots.
    pub version: String,
    pub slot: Option<String>,
    /// The worst level of any line: what the box as a whole looks like from a metre away.
    pub verdict: Level,
    /// One sentence for the whole box, e.g. "All good" or "2 problems need attention".
    pub headline: String,
    pub lines: Vec<Line>,
    /// Where the local status page answers, e.g. "http://192.0.2.7/", when it is on.
    pub page_urls: Vec<String>,
    /// The most recent events, newest last.
    pub events: Vec<Event>,
}

/// Crockford's base32: no I, L, O or U, so a code read aloud or typed from a screen has no look-alikes.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The short code of a device: 40 bits of SHA-256 of its id, as two groups of four Crockford base32 characters
/// ("K7QF-2M9A"). Short enough to read over the phone; the fleet refuses a code that matches two devices.
pub fn device_code(device_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, device_id.trim().as_bytes());
    let bits = digest
        .as_ref()
        .iter()
        .take(5)
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let mut code = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            code.push('-');
        }
        let v = (bits >> (35 - 5 * i)) & 31;
        code.push(char::from(CROCKFORD[v as usize]));
    }
    code
}

/// A code as a person may have typed it, in the form [`device_code`] writes: upper case, look-alikes mapped
/// (I and L to 1, O to 0), the dash optional. `None` when it cannot be a code.
pub fn normalize_code(typed: &str) -> Option<String> {
    let mut chars = String::with_capacity(8);
    for c in typed.trim().chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        };
        if !CROCKFORD.contains(&(c as u8)) || !c.is_ascii() {
            return None;
        }
        chars.push(c);
    }
    if chars.len() != 8 {
        return None;
    }
    Some(format!("{}-{}", &chars[..4], &chars[4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_stable_and_reads_back_however_it_was_typed() {
        let id = "000b8f2a91c4d3e7";
        let code = device_code(id);
        assert_eq!(code.len(), 9);
        assert_eq!(code.as_bytes()[4], b'-');
        assert_eq!(code, device_code(id), "the same id gives the same code");
        assert_ne!(code, device_code("000b8f2a91c4d3e8"));
        assert_eq!(normalize_code(&code).as_deref(), Some(code.as_str()));
        let typed = code
            .to_lowercase()
            .replace('-', "")
            .replace('1', "l")
            .replace('0', "o");
        assert_eq!(normalize_code(&typed).as_deref(), Some(code.as_str()));
    }

    #[test]
    fn what_cannot_be_a_code_is_none() {
        for bad in [
            "",
            "K7QF-2M9",
            "K7QF-2M9AB",
            "K7QU-2M9A",
            "K7QF_2M9A",
            "Ä7QF-2M9A",
        ] {
            assert_eq!(normalize_code(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn levels_order_from_ok_to_fault() {
        assert!(Level::Ok < Level::Attention && Level::Attention < Level::Fault);
        assert_eq!(
            serde_json::to_string(&Level::Attention).unwrap(),
            "\"attention\""
        );
    }
}
