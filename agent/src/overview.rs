//! The site overview in words for the person at the box: one line per part, each not-ok line with its cause
//! and the next step. The console, the local status page and `cairnctl overview` show what this builds; the
//! advice lives here so all three say the same thing.

use crate::hardware::network::Port;
use cairn_proto::control::{
    ComponentHealth, ComponentStatus, Event, HealthState, Status, TelemetryStatus, WorkloadsReport,
};
use cairn_proto::overview::{device_code, Level, Line, Overview};
use cairn_proto::update::{UpdatePhase, UpdateStatus};

/// Where the runbooks are, as the console names them (the image ships them under /usr/share/doc/cairn).
const RUNBOOKS: &str = "/usr/share/doc/cairn/runbooks";

/// What the overview is made from: one snapshot of each part of the agent.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub now_unix: u64,
    pub status: Status,
    pub events: Vec<Event>,
    pub telemetry: TelemetryStatus,
    pub workloads: WorkloadsReport,
    pub update: UpdateStatus,
    pub ports: Vec<Port>,
    pub page_urls: Vec<String>,
    /// What the image says this box has (the gate's `expect_gpus` / `expect_nvme`).
    pub expect_gpus: u32,
    pub expect_ssds: u32,
}

/// What the overview reads besides the control context's snapshots: fixed at start from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub sys_root: std::path::PathBuf,
    pub expect_gpus: u32,
    pub expect_ssds: u32,
    pub page: crate::config::PageConfig,
}

impl Sources {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Sources {
            sys_root: c.hardware.sys_root.clone(),
            expect_gpus: c.gate.expect_gpus,
            expect_ssds: c.gate.expect_nvme,
            page: c.page.clone(),
        }
    }

    /// Where the local page can be reached: every address of its interfaces, then its extra addresses.
    pub fn page_urls(&self) -> Vec<String> {
        let url = |ip: std::net::IpAddr, port: u16| {
            let host = match ip {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            };
            if port == 80 {
                format!("http://{host}/")
            } else {
                format!("http://{host}:{port}/")
            }
        };
        let mut urls: Vec<String> = self
            .page
            .interfaces
            .iter()
            .flat_map(|i| crate::hardware::network::addresses(i))
            .map(|ip| url(ip, self.page.port))
            .collect();
        urls.extend(self.page.listen.iter().map(|a| url(a.ip(), a.port())));
        urls
    }
}

/// The overview as of now, from everything the control socket can see.
pub fn snapshot(ctx: &crate::control::Context) -> Overview {
    let status = ctx.board.snapshot();
    let uplink = ctx.uplink.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let src = &ctx.overview;
    build(&Inputs {
        now_unix: crate::status::now_unix(),
        events: ctx.sink.recent_events(),
        telemetry: crate::forward::status(ctx.spool.as_deref(), &uplink),
        workloads: ctx
            .workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        update: ctx.update.snapshot(),
        ports: crate::hardware::network::ports(&crate::hardware::sysfs::SysRoot::new(
            src.sys_root.clone(),
        )),
        page_urls: src.page_urls(),
        expect_gpus: src.expect_gpus,
        expect_ssds: src.expect_ssds,
        status,
    })
}

/// How many events the overview carries: what fits under the lines on a console.
const EVENTS: usize = 8;

pub fn build(i: &Inputs) -> Overview {
    let mut lines = Vec::new();
    let code = i.status.onboarding.device_id.as_deref().map(device_code);
    onboarding(i, code.as_deref(), &mut lines);
    attestation(i, code.as_deref(), &mut lines);
    tpm(i, &mut lines);
    update(i, &mut lines);
    gpus(i, &mut lines);
    ssds(i, &mut lines);
    power(i, &mut lines);
    workloads(i, &mut lines);
    network(i, &mut lines);
    uplink(i, &mut lines);
    telemetry(i, &mut lines);
    let verdict = lines.iter().map(|l| l.level).max().unwrap_or(Level::Ok);
    let faults = lines.iter().filter(|l| l.level == Level::Fault).count();
    let watch = lines.iter().filter(|l| l.level == Level::Attention).count();
    let headline = match (faults, watch) {
        (0, 0) => "All good: nothing to do".to_owned(),
        (0, 1) => "Working: 1 thing to watch".to_owned(),
        (0, n) => format!("Working: {n} things to watch"),
        (1, _) => "1 problem needs attention: follow the red line".to_owned(),
        (n, _) => format!("{n} problems need attention: follow the red lines from the top"),
    };
    let version = i
        .update
        .running
        .as_ref()
        .map_or_else(|| i.status.agent.version.clone(), |r| r.to_string());
    let slot = (!i.update.slot.is_empty()).then(|| i.update.slot.clone());
    // A check that repeats the same words (an attempt every few seconds while pending) shows once, latest.
    let mut events: Vec<Event> = Vec::new();
    for e in &i.events {
        match events.last_mut() {
            Some(last)
                if last.component == e.component
                    && last.kind == e.kind
                    && last.message == e.message =>
            {
                *last = e.clone();
            }
            _ => events.push(e.clone()),
        }
    }
    let start = events.len().saturating_sub(EVENTS);
    Overview {
        generated_unix: i.now_unix,
        device_id: i.status.onboarding.device_id.clone(),
        code,
        site: i.status.onboarding.site.clone(),
        version,
        slot,
        verdict,
        headline,
        lines,
        page_urls: i.page_urls.clone(),
        events: events.split_off(start),
    }
}

fn push(lines: &mut Vec<Line>, topic: &str, level: Level, text: String, next: Option<String>) {
    lines.push(Line {
        topic: topic.to_owned(),
        level,
        text,
        next_step: next,
    });
}

fn ago(now: u64, at: u64) -> String {
    let s = now.saturating_sub(at);
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

fn duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

fn give_code(code: Option<&str>) -> String {
    code.map_or_else(
        || "call ops with the device id on this screen".to_owned(),
        |c| format!("call ops and give them code {c}"),
    )
}

fn onboarding(i: &Inputs, code: Option<&str>, lines: &mut Vec<Line>) {
    let o = &i.status.onboarding;
    let fleet = o.fleet_url.as_deref().unwrap_or("the fleet");
    let (level, text, next) = match o.state.as_str() {
        "onboarded" => (Level::Ok, format!("onboarded to {fleet}"), None),
        "awaiting_approval" => (
            Level::Fault,
            "device not yet approved by the fleet".to_owned(),
            Some(match code {
                Some(c) => format!("give ops code {c}; the box carries on by itself once they approve it"),
                None => "call ops to approve this device".to_owned(),
            }),
        ),
        "unprovisioned" => (
            Level::Fault,
            "no fleet address: the box does not know where to report".to_owned(),
            Some("insert the provisioning USB stick from ops (it holds cairn-provision.toml) and wait a minute".to_owned()),
        ),
        "retrying" if looks_like_network(&o.detail) => (
            Level::Fault,
            format!("cannot reach {fleet} to onboard: {}", o.detail),
            Some("check the network cable and that the site has internet; the box retries by itself".to_owned()),
        ),
        "retrying" => (
            Level::Fault,
            format!("cannot onboard: {}", o.detail),
            Some(format!(
                "this is not the network: {}; the box retries by itself",
                give_code(code)
            )),
        ),
        "refused" => (
            Level::Attention,
            format!("stopped: {fleet} refused this box's evidence (see Attestation)"),
            Some("follow the Attestation line".to_owned()),
        ),
        "" | "starting" => (
            Level::Attention,
            "starting".to_owned(),
            Some("wait a minute".to_owned()),
        ),
        other => (
            Level::Attention,
            format!("{}: {}", other.replace('_', " "), o.detail),
            Some("wait: this takes under a minute".to_owned()),
        ),
    };
    push(lines, "Onboarding", level, text, next);
}

/// Whether an error is the network's (cable, DNS, routing, firewall, the fleet not answering) rather than
/// the box's own (a missing file, a TPM error): only then is the cable worth checking.
fn looks_like_network(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    [
        "connect",
        "timed out",
        "timeout",
        "unreachable",
        "refused",
        "reset by peer",
        "dns",
        "resolve",
        "lookup",
        "no route",
        "broken pipe",
        "network",
        "tls handshake",
        "eof",
    ]
    .iter()
    .any(|w| r.contains(w))
        && !r.contains("could not be read")
}

/// What a field tech can do about a refusal, by the fleet's code.
fn refusal_advice(code: &str, give: &str) -> String {
    match code {
        "pcr_reference" | "pcr_changed" => format!(
            "the software that booted is not one the fleet knows: do not reinstall or change firmware settings; {give}"
        ),
        "device_refused" => format!("ops has blocked this box: {give} before moving it"),
        "certificate_not_honoured" | "credential_not_activated" => {
            format!("the box's TPM identity no longer matches the fleet's record: {give}")
        }
        "clock_regressed" => {
            format!("the TPM clock went backwards (was the TPM reset in firmware setup?): {give}")
        }
        "nonce_unknown" | "nonce_expired" => {
            "a slow or interrupted exchange: the box retries by itself; if this stays for an hour, check the uplink"
                .to_owned()
        }
        _ => format!("{give} and tell them refusal {code}"),
    }
}

fn attestation(i: &Inputs, code: Option<&str>, lines: &mut Vec<Line>) {
    let o = &i.status.onboarding;
    let give = give_code(code);
    if o.state == "refused" {
        let refusal = o.code.as_deref().unwrap_or("unknown");
        push(
            lines,
            "Attestation",
            Level::Fault,
            format!("refused by the fleet ({refusal}): {}", o.detail),
            Some(refusal_advice(refusal, &give)),
        );
        return;
    }
    match o.last_trusted_unix {
        Some(t) => push(
            lines,
            "Attestation",
            Level::Ok,
            format!("trusted: TPM evidence accepted {}", ago(i.now_unix, t)),
            None,
        ),
        None => push(
            lines,
            "Attestation",
            Level::Attention,
            "not attested yet".to_owned(),
            Some("follows onboarding by itself".to_owned()),
        ),
    }
}

fn tpm(i: &Inputs, lines: &mut Vec<Line>) {
    match &i.status.tpm {
        ComponentStatus::Ok { facts, .. } => push(
            lines,
            "TPM",
            Level::Ok,
            format!(
                "TPM 2.0 {} firmware {}",
                facts.manufacturer, facts.firmware_version
            ),
            None,
        ),
        ComponentStatus::Unknown => push(
            lines,
            "TPM",
            Level::Attention,
            "not checked yet".to_owned(),
            Some("wait a minute".to_owned()),
        ),
        ComponentStatus::Unavailable { reason, .. } => {
            let missing = ["No such file", "not found", "Connection refused", "no TPM"]
                .iter()
                .any(|w| reason.contains(w));
            let text = if missing {
                format!("TPM not found ({reason})")
            } else {
                format!("TPM not usable: {reason}")
            };
            push(
                lines,
                "TPM",
                Level::Fault,
                text,
                Some(
                    "enable the TPM in firmware setup (TPM 2.0, fTPM or PTT), save and restart the box"
                        .to_owned(),
                ),
            );
        }
    }
}

fn update(i: &Inputs, lines: &mut Vec<Line>) {
    let u = &i.update;
    let running = u
        .running
        .as_ref()
        .map_or_else(|| i.status.agent.version.clone(), |r| r.to_string());
    let slot = if u.slot.is_empty() {
        String::new()
    } else {
        format!(" in slot {}", u.slot)
    };
    let target = u.target.as_ref().map(|t| t.to_string()).unwrap_or_default();
    let (level, text, next) = match u.phase {
        UpdatePhase::Writing => {
            let pct = (u.chunks_done * 100).checked_div(u.chunks_total).unwrap_or(0);
            (
                Level::Attention,
                format!("running {running}{slot}; writing {target}: {pct} %"),
                Some("keep the box powered; it restarts by itself when the update is ready".to_owned()),
            )
        }
        UpdatePhase::Staged => (
            Level::Attention,
            format!("running {running}{slot}; {target} is ready"),
            Some("nothing to do: the box restarts into it in its maintenance window".to_owned()),
        ),
        UpdatePhase::Trying => (
            Level::Attention,
            format!("trying {running}{slot}: not confirmed yet"),
            Some("keep the box powered; it confirms the update or goes back by itself".to_owned()),
        ),
        UpdatePhase::Idle => match &u.last_outcome {
            Some(o) if !o.succeeded => (
                Level::Attention,
                format!(
                    "update to {} failed and the box went back to {running}{slot}: {}",
                    o.version, o.message
                ),
                Some("nothing to do at the box: it runs the earlier version and ops has been told; do not power-cycle it to retry".to_owned()),
            ),
            _ if u.slot.is_empty() => (
                Level::Ok,
                format!("running {running} (not an A/B image: no updates)"),
                None,
            ),
            _ => match &u.last_error {
                Some(e) => (
                    Level::Attention,
                    format!("running {running}{slot}; the last update check failed: {e}"),
                    Some("nothing to do: the box checks again by itself".to_owned()),
                ),
                None => (Level::Ok, format!("running {running}{slot}"), None),
            },
        },
    };
    push(lines, "Update", level, text, next);
}

/// Components of one kind that are not ok, worst first.
fn troubled<'a>(i: &'a Inputs, kind: &str) -> Vec<&'a ComponentHealth> {
    let mut v: Vec<&ComponentHealth> = i
        .status
        .health
        .iter()
        .filter(|c| c.kind == kind && c.state != HealthState::Ok)
        .collect();
    v.sort_by_key(|c| match c.state {
        HealthState::Failed => 0,
        HealthState::Degraded => 1,
        _ => 2,
    });
    v
}

fn component_line(c: &ComponentHealth, what: &str, fix_failed: String) -> (Level, String, String) {
    let reasons = if c.reasons.is_empty() {
        c.state.as_str().to_owned()
    } else {
        c.reasons.join("; ")
    };
    match c.state {
        HealthState::Failed => (
            Level::Fault,
            format!("{what} failed: {reasons}"),
            fix_failed,
        ),
        HealthState::Degraded => (
            Level::Attention,
            format!("{what} degraded: {reasons}"),
            "keep the box running; check that its fans turn and its air intake is clear".to_owned(),
        ),
        _ => (
            Level::Attention,
            format!("{what} cannot be read: {reasons}"),
            "if this stays after a restart, call ops".to_owned(),
        ),
    }
}

fn gpus(i: &Inputs, lines: &mut Vec<Line>) {
    let facts = match &i.status.gpus {
        ComponentStatus::Ok { facts, .. } => facts,
        ComponentStatus::Unknown => {
            if i.expect_gpus > 0 {
                push(
                    lines,
                    "GPUs",
                    Level::Attention,
                    "not checked yet".into(),
                    Some("wait a minute".into()),
                );
            }
            return;
        }
        ComponentStatus::Unavailable { reason, .. } => {
            if i.expect_gpus > 0 {
                push(
                    lines,
                    "GPUs",
                    Level::Fault,
                    format!("GPU driver not usable: {reason}"),
                    Some("restart the box once; if this stays, call ops".into()),
                );
            }
            return;
        }
    };
    let total = facts.gpus.len();
    let bad = troubled(i, "gpu");
    if (total as u32) < i.expect_gpus {
        push(
            lines,
            "GPUs",
            Level::Fault,
            format!("only {total} of {} GPUs found", i.expect_gpus),
            Some(format!(
                "power off, check that every GPU is seated and its power cables are in, then power on ({RUNBOOKS}/replace-gpu-or-ssd.md)"
            )),
        );
    }
    for c in &bad {
        let gpu = facts
            .gpus
            .iter()
            .find(|g| format!("gpu {}", g.index) == c.component);
        let which = gpu.map_or_else(
            || c.component.to_uppercase(),
            |g| {
                if g.pci_bus_id.is_empty() {
                    format!("GPU {}", g.index)
                } else {
                    format!("GPU {} (PCI {})", g.index, g.pci_bus_id)
                }
            },
        );
        let fix = format!(
            "the box keeps running its other GPUs; call ops to arrange a replacement of {which} ({RUNBOOKS}/replace-gpu-or-ssd.md)"
        );
        let (level, text, next) = component_line(c, &which, fix);
        push(lines, "GPUs", level, text, Some(next));
    }
    if bad.is_empty() && total as u32 >= i.expect_gpus && total > 0 {
        let name = facts.gpus.first().map(|g| g.name.as_str()).unwrap_or("");
        push(
            lines,
            "GPUs",
            Level::Ok,
            format!("{total} of {total} ok ({name})"),
            None,
        );
    }
}

fn ssds(i: &Inputs, lines: &mut Vec<Line>) {
    let drives = i
        .status
        .sensors
        .facts()
        .map(|s| s.nvme_drives.clone())
        .unwrap_or_default();
    let total = drives.len();
    if (total as u32) < i.expect_ssds {
        push(
            lines,
            "SSDs",
            Level::Fault,
            format!("only {total} of {} SSDs found", i.expect_ssds),
            Some(format!(
                "power off, reseat the missing SSD, then power on ({RUNBOOKS}/replace-gpu-or-ssd.md)"
            )),
        );
    }
    let bad = troubled(i, "nvme");
    for c in &bad {
        let drive = drives.iter().find(|d| d.name == c.component);
        let which = drive.map_or_else(
            || format!("SSD {}", c.component),
            |d| format!("SSD {} (serial {})", d.name, d.serial),
        );
        let fix = format!(
            "call ops to arrange a replacement of {which}; keep the box running until then ({RUNBOOKS}/replace-gpu-or-ssd.md)"
        );
        let (level, text, mut next) = component_line(c, &which, fix);
        if c.state == HealthState::Degraded && c.reasons.iter().any(|r| r.contains("endurance")) {
            next = format!("ask ops for a replacement SSD for {which}; it still works");
        }
        push(lines, "SSDs", level, text, Some(next));
    }
    if bad.is_empty() && total > 0 && total as u32 >= i.expect_ssds {
        push(
            lines,
            "SSDs",
            Level::Ok,
            format!("{total} of {total} ok"),
            None,
        );
    }
}

fn power(i: &Inputs, lines: &mut Vec<Line>) {
    let bad = troubled(i, "power");
    for c in &bad {
        let on_battery = c.reasons.iter().any(|r| r.contains("on battery"));
        let fix = if on_battery {
            "mains power is off: restore power to the box (it is running on its UPS)".to_owned()
        } else if c.component.starts_with("psu") {
            "check that both power cords are in and switched on; if so, call ops for a new power supply".to_owned()
        } else {
            "check the room temperature and the box's fans; if it stays, call ops".to_owned()
        };
        let (level, text, mut next) = component_line(c, &c.component, fix.clone());
        if on_battery {
            next = fix;
        }
        push(lines, "Power", level, text, Some(next));
    }
    let watched = i.status.health.iter().filter(|c| c.kind == "power").count();
    if bad.is_empty() && watched > 0 {
        push(
            lines,
            "Power",
            Level::Ok,
            format!("ok ({watched} sensors)"),
            None,
        );
    }
}

fn workloads(i: &Inputs, lines: &mut Vec<Line>) {
    let w = &i.workloads;
    match w.state.as_str() {
        "" | "off" => return,
        "error" => {
            push(
                lines,
                "Workloads",
                Level::Fault,
                format!("cannot run workloads: {}", w.detail),
                Some(format!(
                    "restart the box once; if this stays, call ops ({RUNBOOKS}/workload-failed.md)"
                )),
            );
            return;
        }
        _ => {}
    }
    let desired: Vec<_> = w
        .workloads
        .iter()
        .filter(|x| !x.desired_version.is_empty())
        .collect();
    let up = desired
        .iter()
        .filter(|x| matches!(x.state.as_str(), "running" | "completed"))
        .count();
    let failed: Vec<_> = desired.iter().filter(|x| x.state == "failed").collect();
    for f in &failed {
        push(
            lines,
            "Workloads",
            Level::Fault,
            format!("{} failed: {}", f.name, f.reason),
            Some(format!(
                "nothing to fix at the box unless a GPU or SSD line is red too; ops has been told ({RUNBOOKS}/workload-failed.md)"
            )),
        );
    }
    if let Some(r) = &w.refused {
        push(
            lines,
            "Workloads",
            Level::Attention,
            format!("the fleet's newest workload set was refused: {r}"),
            Some(
                "nothing to do at the box: the last good set keeps running; ops has been told"
                    .into(),
            ),
        );
    }
    if failed.is_empty() {
        // "waiting" with nothing desired yet: the set has not come (not onboarded, or not fetched yet).
        let waiting = w.state == "waiting" && desired.is_empty();
        let level = if up == desired.len() && !waiting {
            Level::Ok
        } else {
            Level::Attention
        };
        let next = (level != Level::Ok).then(|| {
            if waiting {
                "wait: the fleet's workloads come once the box is onboarded".to_owned()
            } else {
                "wait: workloads are starting".to_owned()
            }
        });
        let text = if desired.is_empty() {
            format!("none yet ({})", w.detail)
        } else {
            format!("{up} of {} up", desired.len())
        };
        push(lines, "Workloads", level, text, next);
    }
}

fn network(i: &Inputs, lines: &mut Vec<Line>) {
    if i.ports.is_empty() {
        return;
    }
    let with_link: Vec<_> = i.ports.iter().filter(|p| p.link).collect();
    if with_link.is_empty() {
        for p in &i.ports {
            push(
                lines,
                "Network",
                Level::Fault,
                format!("no network link on port {} ({})", p.number, p.interface),
                Some(if p.disabled {
                    "the port is switched off in software: restart the box; if this stays, call ops"
                        .into()
                } else {
                    "check the cable: both ends firmly in, and the switch or router on".into()
                }),
            );
        }
        return;
    }
    let up: Vec<String> = with_link
        .iter()
        .map(|p| format!("port {} ({})", p.number, p.interface))
        .collect();
    push(
        lines,
        "Network",
        Level::Ok,
        format!("link on {}", up.join(", ")),
        None,
    );
}

fn uplink(i: &Inputs, lines: &mut Vec<Line>) {
    let no_link = !i.ports.is_empty() && i.ports.iter().all(|p| !p.link);
    let since = i
        .events
        .iter()
        .rev()
        .find(|e| e.kind == "uplink")
        .filter(|e| e.severity != cairn_proto::control::Severity::Info)
        .map(|e| format!(" since {}", ago(i.now_unix, e.at_unix_ms / 1000)))
        .unwrap_or_default();
    match &i.status.fleet {
        ComponentStatus::Ok { facts, .. } => push(
            lines,
            "Uplink",
            Level::Ok,
            format!(
                "fleet reachable ({} ms round trip)",
                facts.round_trip_us / 1000
            ),
            None,
        ),
        ComponentStatus::Unknown => {}
        ComponentStatus::Unavailable { reason, .. } => push(
            lines,
            "Uplink",
            Level::Fault,
            format!("cannot reach the fleet{since}: {reason}"),
            Some(if no_link {
                "fix the network link first (see Network)".into()
            } else if looks_like_network(reason) {
                "check the site's internet connection (router on, outbound HTTPS allowed); telemetry is kept on the box meanwhile".into()
            } else {
                format!(
                    "this is not the network: the box's fleet settings are broken; {}",
                    give_code(
                        i.status
                            .onboarding
                            .device_id
                            .as_deref()
                            .map(device_code)
                            .as_deref()
                    )
                )
            }),
        ),
    }
}

fn telemetry(i: &Inputs, lines: &mut Vec<Line>) {
    let t = &i.telemetry;
    if let Some(w) = &t.waiting_for {
        if t.budget_bytes == 0 {
            push(
                lines,
                "Telemetry",
                Level::Fault,
                format!("not stored: {w}"),
                Some("restart the box once; if this stays, call ops".into()),
            );
            return;
        }
    }
    let full = (t.bytes_used * 100)
        .checked_div(t.budget_bytes)
        .unwrap_or(0);
    let age = t.oldest_unsent_age_secs.map(duration);
    let text = match (t.depth, &age) {
        (0, _) => "all sent".to_owned(),
        (n, Some(a)) => format!("{n} records kept on the box, oldest {a}; storage {full} % full"),
        (n, None) => format!("{n} records kept on the box; storage {full} % full"),
    };
    let waiting_long = t.oldest_unsent_age_secs.unwrap_or(0) > 300;
    let (level, next) = if full >= 90 {
        (
            Level::Fault,
            Some("storage is nearly full, so the oldest samples are being thinned: restore the uplink (see Uplink); events are kept".into()),
        )
    } else if waiting_long || t.dropped_events > 0 {
        (
            Level::Attention,
            Some("nothing is lost: it is sent when the uplink is back".into()),
        )
    } else {
        (Level::Ok, None)
    };
    push(lines, "Telemetry", level, text, next);
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::control::{
        AgentStatus, FleetFacts, GpuFacts, GpuSummary, NvmeSummary, OnboardingStatus, SensorFacts,
        TpmFacts, WorkloadStatus,
    };

    fn healthy() -> Inputs {
        let ok = |facts| ComponentStatus::Ok {
            facts,
            checked_unix: 1,
        };
        let gpus = (0..8)
            .map(|index| GpuSummary {
                index,
                name: "NVIDIA H100".into(),
                uuid: format!("GPU-{index}"),
                pci_bus_id: format!("0000:{:02x}:00.0", index + 0x10),
                temperature_c: Some(40),
                power_w: Some(100.0),
                problem: None,
            })
            .collect();
        let drives = (0..2)
            .map(|n| NvmeSummary {
                name: format!("nvme{n}"),
                model: "M".into(),
                serial: format!("S{n}"),
            })
            .collect();
        Inputs {
            now_unix: 100_000,
            status: Status {
                agent: AgentStatus {
                    version: "1.0.0".into(),
                    pid: 1,
                    uptime_secs: 5,
                    config_sources: vec![],
                    data_dir: "/var/lib/cairn".into(),
                },
                onboarding: OnboardingStatus {
                    state: "onboarded".into(),
                    device_id: Some("000b1234".into()),
                    fleet_url: Some("https://fleet.example".into()),
                    last_trusted_unix: Some(99_960),
                    site: Some("rack 3".into()),
                    ..Default::default()
                },
                tpm: ok(TpmFacts {
                    tcti: "device:/dev/tpmrm0".into(),
                    manufacturer: "IBM".into(),
                    firmware_version: "1.2".into(),
                    ek_certificates: vec![],
                }),
                gpus: ComponentStatus::Ok {
                    facts: GpuFacts {
                        driver_version: "550".into(),
                        gpus,
                    },
                    checked_unix: 1,
                },
                sensors: ComponentStatus::Ok {
                    facts: SensorFacts {
                        hwmon_chips: vec![],
                        rapl_zones: vec![],
                        nvme_drives: drives,
                    },
                    checked_unix: 1,
                },
                fleet: ComponentStatus::Ok {
                    facts: FleetFacts {
                        url: "https://fleet.example".into(),
                        protocol_version: 1,
                        fleet_version: "1".into(),
                        round_trip_us: 3000,
                    },
                    checked_unix: 1,
                },
                health: vec![health("psu", "power", HealthState::Ok, &[])],
            },
            events: vec![],
            telemetry: TelemetryStatus {
                depth: 0,
                oldest_unsent_age_secs: None,
                bytes_used: 1000,
                budget_bytes: 1 << 30,
                durable_seq: 5,
                acked_seq: 5,
                thinned_samples: 0,
                dropped_samples: 0,
                dropped_events: 0,
                last_upload_unix: None,
                last_upload: None,
                waiting_for: None,
            },
            workloads: WorkloadsReport {
                state: "applied".into(),
                workloads: vec![WorkloadStatus {
                    name: "camera".into(),
                    desired_version: "1".into(),
                    state: "running".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            update: UpdateStatus::default(),
            ports: vec![Port {
                number: 1,
                interface: "eno1".into(),
                link: true,
                disabled: false,
            }],
            page_urls: vec![],
            expect_gpus: 8,
            expect_ssds: 2,
        }
    }

    fn health(
        component: &str,
        kind: &str,
        state: HealthState,
        reasons: &[&str],
    ) -> ComponentHealth {
        ComponentHealth {
            component: component.into(),
            kind: kind.into(),
            state,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            since_unix: 1,
        }
    }

    /// The one red line, which must name the cause and carry a next step.
    fn fault(i: &Inputs, topic: &str) -> Line {
        let o = build(i);
        assert_eq!(o.verdict, Level::Fault, "{o:#?}");
        let l = o
            .lines
            .iter()
            .find(|l| l.level == Level::Fault && l.topic == topic)
            .unwrap_or_else(|| panic!("no red {topic} line in {:#?}", o.lines))
            .clone();
        assert!(
            l.next_step.as_deref().is_some_and(|n| n.len() > 10),
            "{l:?}"
        );
        l
    }

    #[test]
    fn a_healthy_box_is_all_green() {
        let o = build(&healthy());
        assert_eq!(o.verdict, Level::Ok, "{:#?}", o.lines);
        assert_eq!(o.headline, "All good: nothing to do");
        assert!(o.lines.iter().all(|l| l.next_step.is_none()));
        assert_eq!(o.code.as_deref(), Some(device_code("000b1234").as_str()));
        assert_eq!(o.site.as_deref(), Some("rack 3"));
        let topics: Vec<_> = o.lines.iter().map(|l| l.topic.as_str()).collect();
        for t in [
            "Onboarding",
            "Attestation",
            "TPM",
            "Update",
            "GPUs",
            "SSDs",
            "Power",
            "Workloads",
            "Network",
            "Uplink",
            "Telemetry",
        ] {
            assert!(topics.contains(&t), "{t} missing from {topics:?}");
        }
    }

    #[test]
    fn no_link_says_which_port_and_to_check_the_cable() {
        let mut i = healthy();
        i.ports = vec![
            Port {
                number: 1,
                interface: "eno1".into(),
                link: false,
                disabled: false,
            },
            Port {
                number: 2,
                interface: "eno2".into(),
                link: false,
                disabled: false,
            },
        ];
        i.status.fleet = ComponentStatus::Unavailable {
            reason: "connect timed out".into(),
            checked_unix: 1,
        };
        let l = fault(&i, "Network");
        assert_eq!(l.text, "no network link on port 1 (eno1)");
        assert!(l.next_step.unwrap().contains("check the cable"));
        let up = fault(&i, "Uplink");
        assert!(up.next_step.unwrap().contains("network link first"));
    }

    #[test]
    fn a_broken_setting_is_not_blamed_on_the_cable() {
        let mut i = healthy();
        let reason = "fleet CA file /usr/lib/cairn/fleet-ca.pem could not be read: No such file or directory";
        i.status.onboarding.state = "retrying".into();
        i.status.onboarding.detail = reason.into();
        i.status.fleet = ComponentStatus::Unavailable {
            reason: reason.into(),
            checked_unix: 1,
        };
        let o = fault(&i, "Onboarding");
        assert_eq!(o.text, format!("cannot onboard: {reason}"));
        assert!(o.next_step.unwrap().starts_with("this is not the network"));
        assert!(fault(&i, "Uplink")
            .next_step
            .unwrap()
            .starts_with("this is not the network"));

        i.status.onboarding.detail = "connect to fleet.example:8443 timed out".into();
        let o = fault(&i, "Onboarding");
        assert!(
            o.next_step
                .as_deref()
                .unwrap()
                .contains("check the network cable"),
            "{o:?}"
        );
    }

    #[test]
    fn a_missing_tpm_says_to_enable_it_in_firmware_setup() {
        let mut i = healthy();
        i.status.tpm = ComponentStatus::Unavailable {
            reason: "cannot open /dev/tpmrm0: No such file or directory".into(),
            checked_unix: 1,
        };
        let l = fault(&i, "TPM");
        assert!(l.text.starts_with("TPM not found"), "{l:?}");
        assert!(l
            .next_step
            .unwrap()
            .contains("enable the TPM in firmware setup"));
    }

    #[test]
    fn an_unapproved_device_gives_its_code() {
        let mut i = healthy();
        i.status.onboarding.state = "awaiting_approval".into();
        i.status.onboarding.last_trusted_unix = None;
        let l = fault(&i, "Onboarding");
        assert_eq!(l.text, "device not yet approved by the fleet");
        let code = device_code("000b1234");
        assert!(l
            .next_step
            .unwrap()
            .starts_with(&format!("give ops code {code}")));
    }

    #[test]
    fn no_provisioning_says_to_insert_the_stick() {
        let mut i = healthy();
        i.status.onboarding.state = "unprovisioned".into();
        assert!(fault(&i, "Onboarding")
            .next_step
            .unwrap()
            .contains("USB stick"));
    }

    #[test]
    fn a_refusal_is_explained_by_its_code() {
        let mut i = healthy();
        i.status.onboarding.state = "refused".into();
        i.status.onboarding.code = Some("pcr_reference".into());
        i.status.onboarding.detail = "PCR 4 matches no known image".into();
        let l = fault(&i, "Attestation");
        assert!(
            l.text.contains("pcr_reference") && l.text.contains("PCR 4"),
            "{l:?}"
        );
        let next = l.next_step.unwrap();
        assert!(
            next.contains("not one the fleet knows") && next.contains("give them code"),
            "{next}"
        );
    }

    #[test]
    fn a_failed_gpu_is_named_with_its_bus_and_the_next_step() {
        let mut i = healthy();
        i.status.health.push(health(
            "gpu 3",
            "gpu",
            HealthState::Failed,
            &["XID 79: the GPU has fallen off the bus"],
        ));
        let l = fault(&i, "GPUs");
        assert_eq!(
            l.text,
            "GPU 3 (PCI 0000:13:00.0) failed: XID 79: the GPU has fallen off the bus"
        );
        assert!(l.next_step.unwrap().contains("replace-gpu-or-ssd.md"));
        assert!(build(&i).headline.starts_with("1 problem"));
    }

    #[test]
    fn a_missing_gpu_is_a_fault_against_what_the_image_expects() {
        let mut i = healthy();
        if let ComponentStatus::Ok { facts, .. } = &mut i.status.gpus {
            facts.gpus.truncate(7);
        }
        assert_eq!(fault(&i, "GPUs").text, "only 7 of 8 GPUs found");
    }

    #[test]
    fn a_failing_ssd_is_named_by_serial() {
        let mut i = healthy();
        i.status.health.push(health(
            "nvme1",
            "nvme",
            HealthState::Failed,
            &["critical warning: spare below threshold"],
        ));
        let l = fault(&i, "SSDs");
        assert!(l.text.starts_with("SSD nvme1 (serial S1) failed"), "{l:?}");
    }

    #[test]
    fn on_battery_says_to_restore_mains_power() {
        let mut i = healthy();
        i.status.health.push(health(
            "ups ups0",
            "power",
            HealthState::Failed,
            &["on battery, 300 s of runtime left"],
        ));
        assert!(fault(&i, "Power")
            .next_step
            .unwrap()
            .contains("restore power"));
    }

    #[test]
    fn a_failed_workload_is_named() {
        let mut i = healthy();
        i.workloads.workloads[0].state = "failed".into();
        i.workloads.workloads[0].reason = "exited 3 times in 60 s".into();
        assert_eq!(
            fault(&i, "Workloads").text,
            "camera failed: exited 3 times in 60 s"
        );
    }

    #[test]
    fn a_rolled_back_update_says_there_is_nothing_to_do() {
        let mut i = healthy();
        i.update.running = Some("2.0.0".parse().unwrap());
        i.update.slot = "b".into();
        i.update.last_outcome = Some(cairn_proto::update::UpdateOutcome {
            version: "3.0.0".parse().unwrap(),
            succeeded: false,
            message: "its boots did not pass the health gate after 2 tries".into(),
            at_unix: 1,
        });
        let o = build(&i);
        let l = o.lines.iter().find(|l| l.topic == "Update").unwrap();
        assert_eq!(l.level, Level::Attention);
        assert!(
            l.text.contains("update to 3.0.0 failed") && l.text.contains("back to 2.0.0 in slot b"),
            "{l:?}"
        );
        assert!(l.next_step.as_deref().unwrap().contains("nothing to do"));
        assert_eq!(o.version, "2.0.0");
    }

    #[test]
    fn a_long_outage_with_a_full_spool_is_red_and_says_since_when() {
        let mut i = healthy();
        i.status.fleet = ComponentStatus::Unavailable {
            reason: "connection refused".into(),
            checked_unix: 1,
        };
        i.events.push(Event {
            at_unix_ms: (100_000 - 3 * 3600) * 1000,
            component: "uplink".into(),
            kind: "uplink".into(),
            severity: cairn_proto::control::Severity::Warning,
            message: "fleet unreachable".into(),
        });
        i.telemetry.depth = 5000;
        i.telemetry.oldest_unsent_age_secs = Some(3 * 3600);
        i.telemetry.budget_bytes = 1_000_000_000;
        i.telemetry.bytes_used = 950_000_000;
        let up = fault(&i, "Uplink");
        assert_eq!(
            up.text,
            "cannot reach the fleet since 3 h ago: connection refused"
        );
        assert!(up.next_step.unwrap().contains("internet connection"));
        let t = fault(&i, "Telemetry");
        assert!(
            t.text.contains("5000 records") && t.text.contains("95 % full"),
            "{t:?}"
        );
    }
}
