//! The boot health gate: decides whether this boot of the image is good enough to keep.
//!
//! `cairnctl gate` runs it from `cairn-health-gate.service`, ordered before `boot-complete.target`; when it
//! passes, `systemd-bless-boot` marks the boot entry good, and when it fails the entry's tries run out and
//! systemd-boot falls back to the other slot. It checks only what this box can see by itself — never the
//! uplink, because a site losing its network must not roll back a good image.

use crate::config::GateConfig;
use cairn_proto::control::{ComponentStatus, Status};
use std::path::Path;

/// One check and its outcome; `detail` says what was seen, or the cause and the next step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub passed: bool,
    pub checks: Vec<Check>,
}

/// Whether a verdict can still change by waiting: the agent has not looked at a component the gate needs.
pub fn settled(gate: &GateConfig, status: &Status) -> bool {
    let unknown = |c: bool, needed: bool| needed && c;
    !(unknown(
        matches!(status.tpm, ComponentStatus::Unknown),
        gate.require_tpm,
    ) || unknown(
        matches!(status.gpus, ComponentStatus::Unknown),
        gate.expect_gpus > 0,
    ) || unknown(
        matches!(status.sensors, ComponentStatus::Unknown),
        gate.expect_nvme > 0,
    ))
}

/// Judges one boot. `mountinfo` is `/proc/self/mountinfo`; `status` is the agent's answer, or why there was
/// none.
pub fn judge(gate: &GateConfig, mountinfo: &str, status: Result<&Status, String>) -> Verdict {
    let mut checks = vec![data_mount(&gate.data_mount, mountinfo)];
    match status {
        Err(why) => checks.push(Check {
            name: "agent",
            passed: false,
            detail: format!(
                "cairnd did not answer: {why}; see `journalctl -u cairnd` for why it is not running"
            ),
        }),
        Ok(s) => {
            checks.push(Check {
                name: "agent",
                passed: true,
                detail: format!("cairnd {} answers (pid {})", s.agent.version, s.agent.pid),
            });
            if gate.require_tpm {
                checks.push(tpm(s));
            }
            if gate.expect_gpus > 0 {
                checks.push(gpus(gate.expect_gpus, s));
            }
            if gate.expect_nvme > 0 {
                checks.push(nvme(gate.expect_nvme, s));
            }
        }
    }
    Verdict {
        passed: checks.iter().all(|c| c.passed),
        checks,
    }
}

/// The data partition must be its own mount, not a directory on the read-only root: otherwise the agent
/// would keep identity and spool in a tmpfs overlay or fail to write them.
fn data_mount(mount_point: &Path, mountinfo: &str) -> Check {
    let found = mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        if fields.get(4).map(|p| unescape(p)) != Some(mount_point.display().to_string()) {
            return None;
        }
        Some((
            fields.get(dash + 1)?.to_string(),
            fields.get(dash + 2)?.to_string(),
        ))
    });
    match found {
        Some((fstype, source)) => Check {
            name: "data partition",
            passed: true,
            detail: format!(
                "{source} ({fstype}) is mounted on {}",
                mount_point.display()
            ),
        },
        None => Check {
            name: "data partition",
            passed: false,
            detail: format!(
                "nothing is mounted on {}: the data partition was not created or not unlocked; see \
                 `journalctl -u systemd-repart -u systemd-cryptsetup@cairn-data`",
                mount_point.display()
            ),
        },
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn tpm(s: &Status) -> Check {
    let (passed, detail) = match &s.tpm {
        ComponentStatus::Ok { facts, .. } => (
            true,
            format!(
                "{} TPM, firmware {}",
                facts.manufacturer, facts.firmware_version
            ),
        ),
        ComponentStatus::Unavailable { reason, .. } => (false, reason.clone()),
        ComponentStatus::Unknown => (false, "the agent has not probed the TPM yet".into()),
    };
    Check {
        name: "tpm",
        passed,
        detail,
    }
}

fn gpus(expected: u32, s: &Status) -> Check {
    let seen = s.gpus.facts().map_or(0, |f| f.gpus.len());
    let why = match &s.gpus {
        ComponentStatus::Unavailable { reason, .. } => format!(": {reason}"),
        _ => String::new(),
    };
    Check {
        name: "gpus",
        passed: seen >= expected as usize,
        detail: format!("{seen} of {expected} expected GPUs visible{why}"),
    }
}

fn nvme(expected: u32, s: &Status) -> Check {
    let seen = s.sensors.facts().map_or(0, |f| f.nvme_drives.len());
    Check {
        name: "ssds",
        passed: seen >= expected as usize,
        detail: format!("{seen} of {expected} expected NVMe drives visible"),
    }
}

/// The verdict in words, one line per check, for the journal and the console.
pub fn render(v: &Verdict) -> String {
    let mut out = String::new();
    for c in &v.checks {
        let mark = if c.passed { "ok  " } else { "FAIL" };
        out.push_str(&format!("{mark} {:<15} {}\n", c.name, c.detail));
    }
    out.push_str(if v.passed {
        "health gate passed: this boot will be marked good\n"
    } else {
        "health gate failed: this boot will not be marked good; after its tries run out the other slot boots\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::control::{AgentStatus, GpuFacts, OnboardingStatus, TpmFacts};

    const MOUNTINFO: &str = "\
22 1 253:0 / / ro,relatime shared:1 - erofs /dev/mapper/root ro
30 22 0:25 / /run rw,nosuid shared:12 - tmpfs tmpfs rw
41 22 253:1 / /var rw,relatime shared:20 - ext4 /dev/mapper/cairn-data rw
";

    fn status() -> Status {
        Status {
            agent: AgentStatus {
                version: "1.0.0".into(),
                pid: 42,
                uptime_secs: 3,
                config_sources: vec![],
                data_dir: "/var/lib/cairn".into(),
            },
            onboarding: OnboardingStatus::default(),
            tpm: ComponentStatus::Ok {
                facts: TpmFacts {
                    tcti: "device:/dev/tpmrm0".into(),
                    manufacturer: "IBM".into(),
                    firmware_version: "1.2".into(),
                    ek_certificates: vec![],
                },
                checked_unix: 1,
            },
            gpus: ComponentStatus::Unknown,
            sensors: ComponentStatus::Unknown,
            fleet: ComponentStatus::Unavailable {
                reason: "no uplink".into(),
                checked_unix: 1,
            },
            health: vec![],
        }
    }

    #[test]
    fn a_healthy_boot_passes_without_the_uplink() {
        let v = judge(&GateConfig::default(), MOUNTINFO, Ok(&status()));
        assert!(v.passed, "{}", render(&v));
        assert_eq!(v.checks.len(), 3);
        assert!(v.checks[0].detail.contains("/dev/mapper/cairn-data (ext4)"));
    }

    #[test]
    fn no_data_partition_fails_and_names_the_units_to_look_at() {
        let only_root = MOUNTINFO.lines().take(2).collect::<Vec<_>>().join("\n");
        let v = judge(&GateConfig::default(), &only_root, Ok(&status()));
        assert!(!v.passed);
        assert!(!v.checks[0].passed);
        assert!(v.checks[0].detail.contains("nothing is mounted on /var"));
        assert!(v.checks[0].detail.contains("systemd-repart"));
    }

    #[test]
    fn a_silent_agent_fails() {
        let v = judge(
            &GateConfig::default(),
            MOUNTINFO,
            Err("connection refused".into()),
        );
        assert!(!v.passed);
        assert!(v.checks[1].detail.contains("connection refused"));
    }

    #[test]
    fn an_unusable_tpm_fails_with_the_agents_reason() {
        let mut s = status();
        s.tpm = ComponentStatus::Unavailable {
            reason: "no TPM at /dev/tpmrm0: enable the TPM in firmware setup".into(),
            checked_unix: 1,
        };
        let v = judge(&GateConfig::default(), MOUNTINFO, Ok(&s));
        assert!(!v.passed);
        assert!(render(&v).contains("FAIL tpm"));
        assert!(render(&v).contains("enable the TPM in firmware setup"));
    }

    #[test]
    fn missing_gpus_fail_and_are_waited_for_until_probed() {
        let gate = GateConfig {
            expect_gpus: 2,
            ..GateConfig::default()
        };
        let mut s = status();
        assert!(!settled(&gate, &s), "GPUs not probed yet: keep waiting");
        s.gpus = ComponentStatus::Ok {
            facts: GpuFacts {
                driver_version: "550".into(),
                gpus: vec![],
            },
            checked_unix: 1,
        };
        assert!(settled(&gate, &s));
        let v = judge(&gate, MOUNTINFO, Ok(&s));
        assert!(!v.passed);
        assert_eq!(v.checks[3].detail, "0 of 2 expected GPUs visible");
    }

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        let info = "41 22 253:1 / /srv/my\\040data rw - ext4 /dev/sdb1 rw\n";
        let c = data_mount(Path::new("/srv/my data"), info);
        assert!(c.passed, "{}", c.detail);
    }
}
