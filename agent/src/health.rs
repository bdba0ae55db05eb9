//! The health model: each component judged ok / degraded / failed (or unknown, with why), against thresholds
//! from the configuration; every change of state becomes an event with a timestamp.

use crate::config::HealthConfig;
use crate::hardware::gpu::GpuReading;
use crate::hardware::nvme::{warning, NvmeDrive};
use crate::hardware::power::PowerReading;
use crate::telemetry::{Event, Severity, Sink};
use cairn_proto::control::{ComponentHealth, HealthState};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

/// One component's verdict from one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub component: String,
    pub kind: &'static str,
    pub state: HealthState,
    pub reasons: Vec<String>,
}

impl Judgement {
    pub fn new(component: impl Into<String>, kind: &'static str) -> Self {
        Judgement {
            component: component.into(),
            kind,
            state: HealthState::Ok,
            reasons: Vec::new(),
        }
    }

    /// Records a finding; the component's state is the worst of its findings.
    pub fn find(&mut self, state: HealthState, reason: impl Into<String>) {
        if rank(state) > rank(self.state) {
            self.state = state;
        }
        self.reasons.push(reason.into());
    }
}

/// Failed outranks unknown: a GPU that is lost is failed even if some of its readings are missing.
fn rank(s: HealthState) -> u8 {
    match s {
        HealthState::Ok => 0,
        HealthState::Unknown => 1,
        HealthState::Degraded => 2,
        HealthState::Failed => 3,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The current state of every component, and what changed.
#[derive(Debug, Default)]
pub struct HealthBoard {
    components: BTreeMap<String, ComponentHealth>,
}

impl HealthBoard {
    /// Replaces the judgements of one kind ("gpu", "nvme", …): new components appear, missing ones are
    /// reported gone, and every change of state is sent to `sink` as an event.
    pub fn update(&mut self, kind: &'static str, judgements: Vec<Judgement>, sink: &dyn Sink) {
        let at_unix_ms = now_ms();
        let seen: Vec<String> = judgements.iter().map(|j| j.component.clone()).collect();
        for j in judgements {
            let changed = match self.components.get(&j.component) {
                Some(old) => old.state != j.state,
                None => j.state != HealthState::Ok,
            };
            let since_unix = match self.components.get(&j.component) {
                Some(old) if !changed => old.since_unix,
                _ => at_unix_ms / 1000,
            };
            if changed {
                let from = self
                    .components
                    .get(&j.component)
                    .map_or("new", |o| o.state.as_str());
                let why = if j.reasons.is_empty() {
                    String::new()
                } else {
                    format!(": {}", j.reasons.join("; "))
                };
                sink.event(Event {
                    at_unix_ms,
                    component: j.component.clone(),
                    kind: "health".into(),
                    severity: severity(j.state),
                    message: format!("{} → {}{why}", from, j.state.as_str()),
                });
            }
            self.components.insert(
                j.component.clone(),
                ComponentHealth {
                    component: j.component,
                    kind: kind.into(),
                    state: j.state,
                    reasons: j.reasons,
                    since_unix,
                },
            );
        }
        let gone: Vec<String> = self
            .components
            .values()
            .filter(|c| c.kind == kind && !seen.contains(&c.component))
            .map(|c| c.component.clone())
            .collect();
        for component in gone {
            let was = self.components.remove(&component).map(|c| c.state);
            // A placeholder that was not ok going away (NVML back, UPS reachable again) is a recovery.
            let (severity, message) = match was {
                Some(HealthState::Ok) | None => (Severity::Warning, "no longer seen".to_owned()),
                Some(s) => (
                    Severity::Info,
                    format!("{} → resolved (no longer reported)", s.as_str()),
                ),
            };
            sink.event(Event {
                at_unix_ms,
                component,
                kind: "health".into(),
                severity,
                message,
            });
        }
    }

    pub fn report(&self) -> Vec<ComponentHealth> {
        self.components.values().cloned().collect()
    }
}

/// What an XID means, in words, for the ones the health model acts on by default.
pub fn xid_meaning(xid: u64) -> &'static str {
    match xid {
        13 => "graphics engine exception (often the application)",
        31 => "GPU memory page fault (often the application)",
        43 => "GPU stopped processing (often the application)",
        45 => "preemptive cleanup after another error",
        48 => "double-bit ECC error",
        61 | 62 => "internal micro-controller error",
        63 => "ECC page retirement or row remapping recorded",
        64 => "ECC page retirement or row remapping failed",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        _ => "see NVIDIA's XID catalogue",
    }
}

/// Clock throttle reasons that mean the GPU is protecting itself (NVML's nvmlClocksThrottleReason* bits):
/// hardware slowdown, software and hardware thermal slowdown, power brake.
const THROTTLE_PROTECTIVE: [(u64, &str); 4] = [
    (0x08, "hardware slowdown"),
    (0x20, "software thermal slowdown"),
    (0x40, "hardware thermal slowdown"),
    (0x80, "power brake slowdown"),
];

/// GPUs. XIDs in `gpu_failed_xids` are remembered in `sticky` (GPU uuid → reasons): such a GPU needs a reset
/// or replacement, so it stays failed until cairnd restarts even though NVML reports each XID once.
pub fn judge_gpus(
    reading: &Result<GpuReading, String>,
    t: &HealthConfig,
    sticky: &mut BTreeMap<String, BTreeSet<String>>,
) -> Vec<Judgement> {
    let reading = match reading {
        Ok(r) => r,
        Err(reason) => {
            let mut j = Judgement::new("gpus", "gpu");
            j.find(HealthState::Unknown, reason.clone());
            return vec![j];
        }
    };
    let key = |uuid: &str, index: u32| {
        if uuid.is_empty() {
            format!("#{index}")
        } else {
            uuid.to_owned()
        }
    };
    for x in &reading.xids {
        if t.gpu_failed_xids.contains(&x.xid) {
            sticky
                .entry(key(&x.uuid, x.gpu))
                .or_default()
                .insert(format!(
                    "XID {} ({}): drain the GPU and reset it, or replace it",
                    x.xid,
                    xid_meaning(x.xid)
                ));
        }
    }
    reading
        .gpus
        .iter()
        .map(|g| {
            let mut j = Judgement::new(format!("gpu {}", g.index), "gpu");
            if let Some(p) = &g.problem {
                let state = if p.contains("lost") {
                    HealthState::Failed
                } else {
                    HealthState::Unknown
                };
                j.find(state, p.clone());
            }
            for reason in sticky.get(&key(&g.uuid, g.index)).into_iter().flatten() {
                j.find(HealthState::Failed, reason.clone());
            }
            if let Some(c) = g.temperature_c {
                if c >= t.gpu_temperature_c {
                    j.find(
                        HealthState::Degraded,
                        format!("{c} °C (threshold {} °C): check cooling", t.gpu_temperature_c),
                    );
                }
            }
            if let Some(c) = g.memory_temperature_c {
                if c >= t.gpu_memory_temperature_c {
                    j.find(
                        HealthState::Degraded,
                        format!(
                            "memory {c} °C (threshold {} °C): check cooling",
                            t.gpu_memory_temperature_c
                        ),
                    );
                }
            }
            // The aggregate count lives as long as the board: a GPU that once had a double-bit error and was
            // repaired by row remapping would otherwise be failed forever. Live DBEs arrive as XID 48/94/95.
            if let Some(n) = g.ecc_dbe_total.filter(|&n| n > 0) {
                j.find(
                    HealthState::Degraded,
                    format!("{n} uncorrectable (double-bit) ECC errors over the GPU's life: watch for XIDs 48/94/95"),
                );
            }
            if let Some(r) = &g.remapped_rows {
                if r.failure {
                    j.find(
                        HealthState::Failed,
                        "row remapping failed (no spare rows left): replace the GPU",
                    );
                } else if r.pending {
                    j.find(
                        HealthState::Degraded,
                        "a row remapping is pending: reset the GPU to apply it",
                    );
                }
            }
            if let Some(n) = g.retired_pages_dbe.filter(|&n| n > 0) {
                j.find(
                    HealthState::Degraded,
                    format!("{n} memory pages retired after double-bit errors"),
                );
            }
            if let Some(mask) = g.throttle_reasons {
                let active: Vec<&str> = THROTTLE_PROTECTIVE
                    .iter()
                    .filter(|(bit, _)| mask & bit != 0)
                    .map(|(_, what)| *what)
                    .collect();
                if !active.is_empty() {
                    j.find(
                        HealthState::Degraded,
                        format!("clocks throttled: {}", active.join(", ")),
                    );
                }
            }
            j
        })
        .collect()
}

/// Power and cooling: hwmon sensors against the limits their drivers report, RAPL and the BMC readable, and
/// the UPS (on battery: degraded; low battery or little runtime left: failed).
pub fn judge_power(p: &PowerReading, t: &HealthConfig) -> Vec<Judgement> {
    let mut out = Vec::new();
    for chip in &p.hwmon {
        let name = chip.chip_name.clone().unwrap_or_else(|| chip.dir.clone());
        let mut j = Judgement::new(format!("hwmon {name} ({})", chip.dir), "power");
        for temp in &chip.temperatures {
            let Some(v) = temp.input_celsius else {
                continue;
            };
            let what = temp.label.clone().unwrap_or_else(|| temp.sensor.clone());
            if let Some(crit) = temp.crit_celsius.filter(|&c| v >= c) {
                j.find(
                    HealthState::Failed,
                    format!("{what} at {v} °C, at or above its critical limit {crit} °C"),
                );
            } else if let Some(max) = temp.max_celsius.filter(|&m| v >= m) {
                j.find(
                    HealthState::Degraded,
                    format!("{what} at {v} °C, at or above its limit {max} °C"),
                );
            }
        }
        out.push(j);
    }
    for zone in &p.rapl {
        if let Err(e) = &zone.energy {
            let mut j = Judgement::new(format!("rapl {}", zone.zone), "power");
            j.find(HealthState::Unknown, e.clone());
            out.push(j);
        }
    }
    if let Some(Err(e)) = &p.psu {
        let mut j = Judgement::new("psu", "power");
        j.find(
            HealthState::Unknown,
            format!("BMC power reading failed: {e}"),
        );
        out.push(j);
    }
    match &p.ups {
        None => {}
        Some(Err(e)) => {
            let mut j = Judgement::new("ups", "power");
            j.find(HealthState::Unknown, e.clone());
            out.push(j);
        }
        Some(Ok(ups)) => {
            let mut j = Judgement::new(format!("ups {}", ups.ups), "power");
            let runtime = ups.battery_runtime_secs;
            if ups.has_flag("FSD") {
                j.find(
                    HealthState::Failed,
                    "the UPS has ordered a forced shutdown: the site is about to lose power",
                );
            }
            if ups.low_battery() {
                j.find(
                    HealthState::Failed,
                    "the UPS reports low battery: shutdown is near",
                );
            }
            if ups.on_battery() {
                match runtime {
                    Some(r) if r < t.ups_runtime_secs as f64 => j.find(
                        HealthState::Failed,
                        format!(
                            "on battery with {r:.0} s of runtime left (threshold {} s)",
                            t.ups_runtime_secs
                        ),
                    ),
                    Some(r) => j.find(
                        HealthState::Degraded,
                        format!("on battery, {r:.0} s of runtime left"),
                    ),
                    None => j.find(HealthState::Degraded, "on battery"),
                }
            }
            if ups.has_flag("RB") {
                j.find(
                    HealthState::Degraded,
                    "the UPS asks for its battery to be replaced",
                );
            }
            if ups.has_flag("OVER") {
                j.find(HealthState::Degraded, "the UPS is overloaded");
            }
            out.push(j);
        }
    }
    out
}

/// NVMe drives: the drive's own critical warnings first (they are the manufacturer's judgement), then wear,
/// spare and temperature against the configured thresholds.
pub fn judge_nvme(drives: &[NvmeDrive], t: &HealthConfig) -> Vec<Judgement> {
    drives
        .iter()
        .map(|d| {
            let mut j = Judgement::new(d.name.clone(), "nvme");
            let log = match &d.smart {
                Ok(log) => log,
                Err(e) => {
                    j.find(HealthState::Unknown, format!("SMART log unreadable: {e}"));
                    return j;
                }
            };
            let cw = log.critical_warning;
            for (bit, state, what) in [
                (warning::SPARE_BELOW_THRESHOLD, HealthState::Failed, "the drive reports its spare capacity below its threshold: replace it"),
                (warning::TEMPERATURE, HealthState::Degraded, "the drive reports a temperature outside its limits: check airflow"),
                (warning::RELIABILITY_DEGRADED, HealthState::Failed, "the drive reports its reliability degraded (media or internal errors): back up and replace it"),
                (warning::READ_ONLY, HealthState::Failed, "the drive has gone read-only: replace it"),
                (warning::VOLATILE_BACKUP_FAILED, HealthState::Failed, "the drive's volatile memory backup failed: writes may be lost on power loss"),
                (warning::PMR_UNRELIABLE, HealthState::Degraded, "the drive's persistent memory region is unreliable"),
            ] {
                if cw & bit != 0 {
                    j.find(state, what);
                }
            }
            if log.percentage_used >= 100 {
                j.find(
                    HealthState::Failed,
                    format!("{} % of rated endurance used: replace the drive", log.percentage_used),
                );
            } else if log.percentage_used >= t.nvme_percentage_used {
                j.find(
                    HealthState::Degraded,
                    format!(
                        "{} % of rated endurance used (threshold {} %): plan a replacement",
                        log.percentage_used, t.nvme_percentage_used
                    ),
                );
            }
            if cw & warning::SPARE_BELOW_THRESHOLD == 0 {
                let floor = u16::from(log.available_spare_threshold)
                    + u16::from(t.nvme_spare_margin_percent);
                if u16::from(log.available_spare) < log.available_spare_threshold.into() {
                    j.find(
                        HealthState::Failed,
                        format!(
                            "available spare {} % is below the drive's threshold {} %: replace it",
                            log.available_spare, log.available_spare_threshold
                        ),
                    );
                } else if u16::from(log.available_spare) < floor {
                    j.find(
                        HealthState::Degraded,
                        format!(
                            "available spare {} % is close to the drive's threshold {} %",
                            log.available_spare, log.available_spare_threshold
                        ),
                    );
                }
            }
            if log.media_errors > 0 {
                j.find(
                    HealthState::Degraded,
                    format!("{} unrecovered media errors", log.media_errors),
                );
            }
            if let Some(c) = log.temperature_celsius() {
                if c >= i32::try_from(t.nvme_temperature_c).unwrap_or(i32::MAX) {
                    j.find(
                        HealthState::Degraded,
                        format!("{c} °C (threshold {} °C): check airflow", t.nvme_temperature_c),
                    );
                }
            }
            j
        })
        .collect()
}

fn severity(s: HealthState) -> Severity {
    match s {
        HealthState::Ok => Severity::Info,
        HealthState::Degraded | HealthState::Unknown => Severity::Warning,
        HealthState::Failed => Severity::Critical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::nvme::parse_smart_log;
    use crate::telemetry::LocalSink;

    fn drive(cw: u8, temp_c: u16, spare: u8, threshold: u8, used: u8, media: u8) -> NvmeDrive {
        let mut b = [0u8; 512];
        b[0] = cw;
        b[1..3].copy_from_slice(&(temp_c + 273).to_le_bytes());
        b[3] = spare;
        b[4] = threshold;
        b[5] = used;
        b[160] = media;
        NvmeDrive {
            name: "nvme0".into(),
            model: "m".into(),
            serial: "s".into(),
            firmware: "f".into(),
            smart: Ok(parse_smart_log(&b).unwrap()),
            smartctl_exit_status: 0,
        }
    }

    fn one(d: NvmeDrive) -> Judgement {
        judge_nvme(&[d], &HealthConfig::default()).remove(0)
    }

    #[test]
    fn nvme_rules() {
        let healthy = one(drive(0, 35, 100, 10, 3, 0));
        assert_eq!((healthy.state, healthy.reasons.len()), (HealthState::Ok, 0));
        let worn = one(drive(0, 35, 100, 10, 95, 0));
        assert_eq!(worn.state, HealthState::Degraded);
        assert!(worn.reasons[0].contains("95 %"), "{worn:?}");
        assert_eq!(
            one(drive(0, 35, 100, 10, 100, 0)).state,
            HealthState::Failed
        );
        let failing = one(drive(0x05, 71, 5, 10, 40, 37));
        assert_eq!(failing.state, HealthState::Failed);
        let text = failing.reasons.join(" | ");
        assert!(
            text.contains("spare capacity below") && text.contains("reliability"),
            "{text}"
        );
        assert!(
            text.contains("37 unrecovered media errors") && text.contains("71 °C"),
            "{text}"
        );
        let close = one(drive(0, 35, 15, 10, 3, 0));
        assert_eq!(close.state, HealthState::Degraded, "{close:?}");
        let hot = one(drive(0x02, 82, 100, 10, 3, 0));
        assert_eq!(hot.state, HealthState::Degraded);
        let mut unreadable = drive(0, 35, 100, 10, 3, 0);
        unreadable.smart = Err("permission denied".into());
        assert_eq!(one(unreadable).state, HealthState::Unknown);
    }

    #[test]
    fn transitions_become_events_and_steady_states_do_not() {
        let sink = LocalSink::default();
        let mut board = HealthBoard::default();
        let ok = |c: &str| Judgement::new(c, "gpu");
        board.update("gpu", vec![ok("gpu 0"), ok("gpu 1")], &sink);
        assert!(
            sink.recent_events().is_empty(),
            "ok at first sight is no event"
        );
        let mut hot = ok("gpu 1");
        hot.find(HealthState::Degraded, "92 °C");
        board.update("gpu", vec![ok("gpu 0"), hot.clone()], &sink);
        board.update("gpu", vec![ok("gpu 0"), hot], &sink);
        let events = sink.recent_events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].component, "gpu 1");
        assert_eq!(events[0].message, "ok → degraded: 92 °C");
        assert_eq!(events[0].severity, Severity::Warning);
        let mut lost = ok("gpu 1");
        lost.find(HealthState::Unknown, "no temperature");
        lost.find(HealthState::Failed, "lost");
        assert_eq!(lost.state, HealthState::Failed, "failed outranks unknown");
        // A component that was not ok going away is a recovery; one that was ok going away is a warning.
        board.update("gpu", vec![ok("gpu 0")], &sink);
        let last = sink.recent_events().pop().unwrap();
        assert_eq!(
            (last.message.as_str(), last.severity),
            ("degraded → resolved (no longer reported)", Severity::Info)
        );
        board.update("gpu", vec![], &sink);
        let last = sink.recent_events().pop().unwrap();
        assert_eq!(
            (last.message.as_str(), last.severity),
            ("no longer seen", Severity::Warning)
        );
        assert!(board.report().is_empty());
    }
}
