//! The local control protocol: one JSON request per line, one JSON response per line, over a Unix socket that
//! only root (or the daemon's own user) may open.

use serde::{Deserialize, Serialize};

/// Version of the control protocol. `cairnctl` sends it with every request; `cairnd` refuses any other.
pub const CONTROL_VERSION: u32 = 1;

/// Largest request or response line either side accepts, so a confused peer cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// The whole status of the agent, as `cairnctl status` shows it.
    Status,
    /// Attest to the fleet now (or enrol, if not onboarded yet) and answer with the outcome.
    Attest,
    /// The health model: every component's state and reasons, and the recent events.
    Health,
    /// The telemetry spool and its uplink.
    Telemetry,
    /// Desired workloads against what systemd runs.
    Workloads,
    /// Where the OTA update stands.
    UpdateStatus,
    /// Check the update channel now (outside the schedule); answers with the status once the check is done
    /// or a write has started.
    UpdateCheck,
    /// The site overview in words, as the console and the local status page show it.
    Overview,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Status(Box<Status>),
    Attest(OnboardingStatus),
    Health(HealthReport),
    Telemetry(TelemetryStatus),
    Workloads(WorkloadsReport),
    Update(crate::update::UpdateStatus),
    Overview(Box<crate::overview::Overview>),
    Error { message: String },
}

/// What the agent knows about itself and the site, at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub agent: AgentStatus,
    pub onboarding: OnboardingStatus,
    pub tpm: ComponentStatus<TpmFacts>,
    pub gpus: ComponentStatus<GpuFacts>,
    pub sensors: ComponentStatus<SensorFacts>,
    pub fleet: ComponentStatus<FleetFacts>,
    /// The health model's verdict on every component it judges.
    pub health: Vec<ComponentHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// The configuration files that were read, in the order they were applied.
    pub config_sources: Vec<String>,
    pub data_dir: String,
}

/// Where the device is in onboarding. `state` is one of: unprovisioned, contacting_fleet, enrolling,
/// awaiting_approval, attesting, onboarded, refused, retrying.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnboardingStatus {
    pub state: String,
    /// A sentence: the fleet's reason when refused, the error when retrying, what happens next otherwise.
    pub detail: String,
    /// The fleet's name for this device (its EK's TPM name, hex), once known.
    pub device_id: Option<String>,
    /// The fleet in use and how it was found ("configuration", "provisioning file …", "DNS SRV …").
    pub fleet_url: Option<String>,
    pub fleet_source: Option<String>,
    /// The provisioning file's `site` label, once one was read.
    #[serde(default)]
    pub site: Option<String>,
    /// The fleet's refusal code, when refused.
    pub code: Option<String>,
    /// When the next attempt or re-attestation is due.
    pub next_attempt_unix: Option<u64>,
    /// Consecutive failed attempts (drives the backoff).
    pub attempt: u32,
    /// When the fleet last said "trusted".
    pub last_trusted_unix: Option<u64>,
    pub since_unix: u64,
}

/// The state of one part of the site: whether it was looked at, what was found, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum ComponentStatus<T> {
    /// Not looked at yet (the agent has just started).
    Unknown,
    /// Looked at and working; `facts` says what was seen.
    Ok { facts: T, checked_unix: u64 },
    /// Looked at and not usable; `reason` is a sentence a person can act on.
    Unavailable { reason: String, checked_unix: u64 },
}

impl<T> ComponentStatus<T> {
    pub fn facts(&self) -> Option<&T> {
        match self {
            ComponentStatus::Ok { facts, .. } => Some(facts),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmFacts {
    pub tcti: String,
    pub manufacturer: String,
    pub firmware_version: String,
    /// Which EK certificates the TPM carries in NV ("rsa2048", "ecc-p256").
    pub ek_certificates: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuFacts {
    pub driver_version: String,
    pub gpus: Vec<GpuSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSummary {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub pci_bus_id: String,
    /// `None` when the GPU could not be read; `problem` then says why.
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorFacts {
    pub hwmon_chips: Vec<String>,
    pub rapl_zones: Vec<String>,
    pub nvme_drives: Vec<NvmeSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmeSummary {
    pub name: String,
    pub model: String,
    pub serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFacts {
    pub url: String,
    pub protocol_version: u32,
    pub fleet_version: String,
    pub round_trip_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_has_a_stable_wire_form() {
        let req = Request {
            version: CONTROL_VERSION,
            command: Command::Status,
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(text, r#"{"version":1,"command":"status"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
    }

    #[test]
    fn unknown_fields_and_commands_are_refused() {
        assert!(
            serde_json::from_str::<Request>(r#"{"version":1,"command":"status","x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"version":1,"command":"reboot"}"#).is_err());
    }

    #[test]
    fn component_status_is_tagged() {
        let s: ComponentStatus<TpmFacts> = ComponentStatus::Unavailable {
            reason: "no TPM".into(),
            checked_unix: 5,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "unavailable");
        assert_eq!(v["reason"], "no TPM");
    }
}

/// A component's health as the agent judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Ok,
    /// Still working, but past a warning threshold (hot, worn, on battery…).
    Degraded,
    /// Not working, or about to lose data (GPU lost, critical XID, drive failing…).
    Failed,
    /// Could not be looked at (no driver, no permission); the reason says why.
    Unknown,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Ok => "ok",
            HealthState::Degraded => "degraded",
            HealthState::Failed => "failed",
            HealthState::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentHealth {
    /// "gpu 3", "gpus" (when NVML is unavailable), "nvme0", "hwmon coretemp (hwmon0)", "rapl intel-rapl:0",
    /// "psu", "ups <name>".
    pub component: String,
    /// "gpu", "nvme" or "power".
    pub kind: String,
    pub state: HealthState,
    /// Why it is not ok, one sentence each; empty when ok.
    pub reasons: Vec<String>,
    /// When it entered this state.
    pub since_unix: u64,
}

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// Something that happened at a moment: a health transition or an XID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub at_unix_ms: u64,
    /// The component it is about, as the health model names it.
    pub component: String,
    /// "health" (a transition), "xid", …
    pub kind: String,
    pub severity: Severity,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    pub components: Vec<ComponentHealth>,
    /// The most recent events, oldest first (the agent keeps a bounded number).
    pub events: Vec<Event>,
}

/// The telemetry spool and its uplink, as `cairnctl telemetry` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryStatus {
    /// Records stored and not yet acknowledged by the fleet.
    pub depth: u64,
    /// Age of the oldest unacknowledged record.
    pub oldest_unsent_age_secs: Option<u64>,
    pub bytes_used: u64,
    pub budget_bytes: u64,
    pub durable_seq: u64,
    pub acked_seq: u64,
    pub thinned_samples: u64,
    pub dropped_samples: u64,
    pub dropped_events: u64,
    /// The last upload attempt: when, and "ok: …" or the error.
    pub last_upload_unix: Option<u64>,
    pub last_upload: Option<String>,
    /// Why nothing is sent right now, if so (not onboarded, spool unavailable…).
    pub waiting_for: Option<String>,
}

/// The workload set the agent holds and every workload's state, as `cairnctl workloads` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadsReport {
    /// off, waiting, applied or error: whether the agent can run workloads at all.
    pub state: String,
    /// A sentence: what is wrong and the fix, or where the set came from.
    pub detail: String,
    /// Serial of the set being applied (the last good one), if any.
    pub serial: Option<u64>,
    /// The last set the fleet sent that was refused, and why; the last good set stays in force.
    pub refused: Option<String>,
    pub workloads: Vec<WorkloadStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadStatus {
    pub name: String,
    /// The version the set asks for ("" for a unit the set no longer lists, being removed).
    pub desired_version: String,
    /// The version systemd runs, if any.
    pub running_version: Option<String>,
    pub unit: Option<String>,
    /// waiting, starting, running, replacing, restarting, completed, failed, stopping.
    pub state: String,
    /// systemd's ActiveState/SubState, e.g. "active/running".
    pub systemd: String,
    /// Restarts: systemd's (NRestarts) plus the agent's own after failed health checks.
    pub restarts: u32,
    /// ok, failing (n of m), unknown, or none (no check).
    pub health: String,
    /// Why it is in this state, as a sentence; what to do for failed.
    pub reason: String,
    /// The unit's last journal lines when it failed.
    pub journal: Vec<String>,
}
