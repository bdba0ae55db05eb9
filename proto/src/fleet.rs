//! The device ↔ fleet protocol (HTTPS, agent-initiated, outbound only). Paths carry the major version
//! (`/v1/...`); bodies are JSON for now, CBOR/COSE where a payload must be signed.

use serde::{Deserialize, Serialize};

/// Major version of the fleet protocol; it is also the first path segment (`/v1`).
pub const FLEET_PROTOCOL_VERSION: u32 = 1;

/// `GET /v1/info`: who the fleet is and which protocol versions it speaks. Needs no client certificate, so a
/// device can check it reached the right fleet before it has an identity.
pub const INFO_PATH: &str = "/v1/info";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetInfo {
    pub name: String,
    pub version: String,
    pub protocol_versions: Vec<u32>,
}

/// Error body of every non-2xx fleet answer: a machine-readable code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetError {
    pub code: String,
    pub message: String,
}

/// `POST /v1/enroll` (no client certificate): "this is my TPM and my AK". Answered by [`EnrollResponse`].
pub const ENROLL_PATH: &str = "/v1/enroll";
/// `POST /v1/activate` (no client certificate): the activated credential, a quote and the AK-certified keys.
/// Answered by [`Verdict`]; a trusted verdict carries the device certificate.
pub const ACTIVATE_PATH: &str = "/v1/activate";
/// `POST /v1/challenge` (mTLS, empty body): a fresh nonce for re-attestation. Answered by [`Challenge`].
pub const CHALLENGE_PATH: &str = "/v1/challenge";
/// `POST /v1/attest` (mTLS): a quote over the challenge's nonce. Answered by [`Verdict`].
pub const ATTEST_PATH: &str = "/v1/attest";

/// Bytes on the wire, as lowercase hex (TPM structures are small; the event log is the largest field).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Hex(pub Vec<u8>);

impl std::fmt::Debug for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hex({})", self.to_hex())
    }
}

impl Hex {
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Parses hex (either case); None if the text is not an even number of hex digits.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        from_hex(&s)
            .map(Hex)
            .ok_or_else(|| serde::de::Error::custom("expected an even number of hex digits"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// "rsa2048" or "ecc-p256": which TCG default EK template `ek_public` comes from.
    pub ek_algorithm: String,
    /// TPM2B_PUBLIC of the EK.
    pub ek_public: Hex,
    /// The EK certificate from the TPM's NV (DER), when the TPM carries one.
    pub ek_certificate: Option<Hex>,
    /// TPM2B_PUBLIC of the AK.
    pub ak_public: Hex,
    pub hostname: String,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum EnrollResponse {
    /// The EK is known to be good: prove the AK sits beside it and attest.
    Challenge {
        device_id: String,
        challenge: Challenge,
    },
    /// Neither a trusted EK certificate nor the allow-list vouches for this TPM; an operator must approve it.
    Pending {
        device_id: String,
        message: String,
        retry_after_secs: u64,
    },
    Refused {
        device_id: String,
        code: String,
        message: String,
        retry_after_secs: u64,
    },
}

/// A single-use nonce. At enrolment it comes with a credential only the TPM holding the EK can activate,
/// and only for the AK it was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    pub id: String,
    pub nonce: Hex,
    pub expires_in_secs: u64,
    pub credential: Option<Credential>,
}

/// TPM2_MakeCredential's output, each the contents of its TPM2B without the size prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub id_object: Hex,
    pub encrypted_secret: Hex,
}

/// A quote over the challenge's nonce, the PCR values it covers, and the measured-boot event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// TPMS_ATTEST.
    pub quote: Hex,
    /// TPMT_SIGNATURE by the AK.
    pub signature: Hex,
    /// SHA-256 bank values of the quoted PCRs.
    pub pcrs: Vec<PcrValue>,
    /// The TCG PC Client event log, when the device has one.
    pub event_log: Option<Hex>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcrValue {
    pub index: u8,
    pub sha256: Hex,
}

/// A TPM key the AK vouches for with TPM2_Certify over the challenge's nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifiedKey {
    /// TPM2B_PUBLIC.
    pub public: Hex,
    /// TPMS_ATTEST of type certify.
    pub certify_info: Hex,
    /// TPMT_SIGNATURE by the AK.
    pub signature: Hex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    pub device_id: String,
    pub challenge_id: String,
    /// The credential as TPM2_ActivateCredential returned it.
    pub activated_credential: Hex,
    pub evidence: Evidence,
    /// The key the fleet issues the mTLS certificate for.
    pub device_key: CertifiedKey,
    /// The key that signs telemetry.
    pub telemetry_key: CertifiedKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    pub challenge_id: String,
    pub evidence: Evidence,
}

/// The fleet's answer to evidence. Both sides keep the code and the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case", deny_unknown_fields)]
pub enum Verdict {
    Trusted {
        device_id: String,
        /// PEM of a new device certificate: at activation, and when a re-attestation renews it.
        certificate_pem: Option<String>,
        /// Attest again after this long.
        reattest_after_secs: u64,
    },
    Refused {
        device_id: String,
        code: String,
        message: String,
        retry_after_secs: u64,
    },
}
