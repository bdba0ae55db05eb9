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
