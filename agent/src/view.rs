//! The status in words, for people: what `cairnctl status` prints.

use cairn_proto::control::{
    ComponentStatus, HealthReport, HealthState, OnboardingStatus, Status, TelemetryStatus,
};
use std::fmt::Write;

fn line<T>(out: &mut String, label: &str, c: &ComponentStatus<T>, ok: impl Fn(&T) -> String) {
    let text = match c {
        ComponentStatus::Unknown => "not checked yet".to_owned(),
        ComponentStatus::Ok { facts, .. } => format!("ok — {}", ok(facts)),
        ComponentStatus::Unavailable { reason, .. } => format!("PROBLEM — {reason}"),
    };
    let _ = writeln!(out, "{label:<11}{text}");
}

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11}cairnd {} (pid {}, up {} s)",
        "agent", s.agent.version, s.agent.pid, s.agent.uptime_secs
    );
    out.push_str(&onboarding(&s.onboarding));
    line(&mut out, "tpm", &s.tpm, |t| {
        let certs = if t.ek_certificates.is_empty() {
            "no EK certificate".to_owned()
        } else {
            format!("EK certificates: {}", t.ek_certificates.join(", "))
        };
        format!(
            "{} firmware {}, {certs} ({})",
            t.manufacturer, t.firmware_version, t.tcti
        )
    });
    line(&mut out, "gpus", &s.gpus, |g| {
        let lost = g.gpus.iter().filter(|x| x.problem.is_some()).count();
        let mut names: Vec<&str> = g
            .gpus
            .iter()
            .map(|x| x.name.as_str())
            .filter(|n| !n.is_empty())
            .collect();
        names.dedup();
        let mut t = format!(
            "{} GPU(s) {} (driver {})",
            g.gpus.len(),
            names.join(", "),
            g.driver_version
        );
        if lost > 0 {
            let _ = write!(t, "; {lost} with problems");
        }
        t
    });
    if let Some(g) = s.gpus.facts() {
        for gpu in g.gpus.iter().filter(|x| x.problem.is_some()) {
            let bus = if gpu.pci_bus_id.is_empty() {
                String::new()
            } else {
                format!(" ({})", gpu.pci_bus_id)
            };
            let _ = writeln!(
                out,
                "{:<11}  GPU {}{bus}: {}",
                "",
                gpu.index,
                gpu.problem.as_deref().unwrap_or_default()
            );
        }
    }
    line(&mut out, "sensors", &s.sensors, |x| {
        format!(
            "{} NVMe drive(s), {} hwmon chip(s), {} RAPL zone(s)",
            x.nvme_drives.len(),
            x.hwmon_chips.len(),
            x.rapl_zones.len()
        )
    });
    line(&mut out, "fleet", &s.fleet, |f| {
        format!(
            "{} reachable, protocol v{}, {:.1} ms",
            f.url,
            f.protocol_version,
            f.round_trip_us as f64 / 1000.0
        )
    });
    out
}

/// The onboarding lines: state and reason, then device and fleet, then what happens when.
pub fn onboarding(o: &OnboardingStatus) -> String {
    let mut out = String::new();
    let code = o
        .code
        .as_deref()
        .map(|c| format!(" [{c}]"))
        .unwrap_or_default();
    let _ = writeln!(out, "{:<11}{}{code} — {}", "onboarding", o.state, o.detail);
    if let Some(id) = &o.device_id {
        let _ = writeln!(out, "{:<11}  device {id}", "");
    }
    if let Some(url) = &o.fleet_url {
        let source = o.fleet_source.as_deref().unwrap_or("configuration");
        let _ = writeln!(out, "{:<11}  fleet {url} (from {source})", "");
    }
    let now = crate::status::now_unix();
    let mut when = Vec::new();
    if let Some(t) = o.last_trusted_unix {
        when.push(format!("last trusted {} s ago", now.saturating_sub(t)));
    }
    if let Some(t) = o.next_attempt_unix {
        let what = if o.state == "onboarded" {
            "next attestation"
        } else {
            "next try"
        };
        when.push(format!("{what} in {} s", t.saturating_sub(now)));
    }
    if o.attempt > 0 {
        when.push(format!("{} failed attempt(s) in a row", o.attempt));
    }
    if !when.is_empty() {
        let _ = writeln!(out, "{:<11}  {}", "", when.join("; "));
    }
    out
}

/// One line for systemd's STATUS=: which parts are fine and which are not.
pub fn summary(s: &Status) -> String {
    fn word<T>(c: &ComponentStatus<T>) -> &'static str {
        match c {
            ComponentStatus::Unknown => "?",
            ComponentStatus::Ok { .. } => "ok",
            ComponentStatus::Unavailable { .. } => "PROBLEM",
        }
    }
    let gpus = s.gpus.facts().map_or(0, |g| g.gpus.len());
    format!(
        "{}; tpm {}; {gpus} GPUs {}; sensors {}; fleet {}",
        s.onboarding.state,
        word(&s.tpm),
        word(&s.gpus),
        word(&s.sensors),
        word(&s.fleet)
    )
}

/// `cairnctl health`: components worst first, then the recent events.
pub fn health(r: &HealthReport) -> String {
    let mut out = String::new();
    let mut components: Vec<_> = r.components.iter().collect();
    let order = |s: HealthState| match s {
        HealthState::Failed => 0,
        HealthState::Degraded => 1,
        HealthState::Unknown => 2,
        HealthState::Ok => 3,
    };
    components.sort_by(|a, b| {
        order(a.state)
            .cmp(&order(b.state))
            .then_with(|| a.component.cmp(&b.component))
    });
    if components.is_empty() {
        out.push_str("no components judged yet\n");
    }
    let now = crate::status::now_unix();
    for c in components {
        let state = match c.state {
            HealthState::Ok => "ok".to_owned(),
            other => other.as_str().to_uppercase(),
        };
        let _ = writeln!(
            out,
            "{:<28}{:<10}for {} s",
            c.component,
            state,
            now.saturating_sub(c.since_unix)
        );
        for reason in &c.reasons {
            let _ = writeln!(out, "{:<28}  {reason}", "");
        }
    }
    if !r.events.is_empty() {
        let _ = writeln!(out, "\nrecent events (oldest first):");
        for e in &r.events {
            let _ = writeln!(
                out,
                "  {:>6} s ago  {:<9} {:<18} {}: {}",
                now.saturating_sub(e.at_unix_ms / 1000),
                format!("{:?}", e.severity).to_lowercase(),
                e.component,
                e.kind,
                e.message
            );
        }
    }
    out
}

/// `cairnctl telemetry`.
pub fn telemetry(t: &TelemetryStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "spool      {} records unsent{}; {:.1} MiB of {:.0} MiB budget",
        t.depth,
        t.oldest_unsent_age_secs
            .map(|a| format!(", oldest {a} s old"))
            .unwrap_or_default(),
        t.bytes_used as f64 / (1 << 20) as f64,
        t.budget_bytes as f64 / (1 << 20) as f64
    );
    let _ = writeln!(
        out,
        "sequence   durable up to {}, acknowledged up to {}",
        t.durable_seq, t.acked_seq
    );
    let _ = writeln!(
        out,
        "drops      {} samples thinned, {} samples dropped, {} events dropped",
        t.thinned_samples, t.dropped_samples, t.dropped_events
    );
    match (&t.last_upload, t.last_upload_unix) {
        (Some(what), Some(at)) => {
            let _ = writeln!(
                out,
                "upload     {} s ago: {what}",
                crate::status::now_unix().saturating_sub(at)
            );
        }
        _ => {
            let _ = writeln!(out, "upload     none yet");
        }
    }
    if let Some(w) = &t.waiting_for {
        let _ = writeln!(out, "waiting    {w}");
    }
    out
}

/// `cairnctl workloads`: the set, then one block per workload.
pub fn workloads(w: &cairn_proto::control::WorkloadsReport) -> String {
    let mut out = format!(
        "workload set: {}{} — {}\n",
        w.state,
        w.serial
            .map(|s| format!(" (serial {s})"))
            .unwrap_or_default(),
        w.detail
    );
    if let Some(r) = &w.refused {
        out.push_str(&format!("last set refused: {r}\n"));
    }
    if w.workloads.is_empty() {
        out.push_str("no workloads\n");
    }
    for x in &w.workloads {
        let running = x.running_version.as_deref().unwrap_or("-");
        let desired = if x.desired_version.is_empty() {
            "(removed)"
        } else {
            x.desired_version.as_str()
        };
        out.push_str(&format!(
            "{:<24} {:<10} want {desired:<10} runs {running:<10} systemd {:<20} restarts {:<3} health {}\n  {}\n",
            x.name, x.state, x.systemd, x.restarts, x.health, x.reason
        ));
        for l in &x.journal {
            out.push_str(&format!("  | {l}\n"));
        }
    }
    out
}

/// `cairnctl update status`: where the update stands, with a progress bar while a slot is written.
pub fn update(u: &cairn_proto::update::UpdateStatus) -> String {
    use cairn_proto::update::UpdatePhase;
    let mut out = String::new();
    let running = u
        .running
        .map(|v| v.to_string())
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        out,
        "running    {running} (slot {})",
        if u.slot.is_empty() { "?" } else { &u.slot }
    );
    let target = match (u.target, &u.target_slot) {
        (Some(v), Some(s)) => format!("{v} into slot {s}"),
        _ => String::new(),
    };
    let phase = match u.phase {
        UpdatePhase::Idle => "idle".to_string(),
        UpdatePhase::Writing => format!("writing {target}"),
        UpdatePhase::Staged => {
            format!("staged {target}: waiting for the maintenance window to reboot")
        }
        UpdatePhase::Trying => format!("trying {target}: this boot must pass the health gate"),
    };
    let _ = writeln!(out, "update     {phase}");
    if u.chunks_total > 0 && u.phase != UpdatePhase::Idle {
        const WIDTH: u64 = 30;
        let filled = (u.chunks_done.min(u.chunks_total) * WIDTH / u.chunks_total) as usize;
        let _ = writeln!(
            out,
            "progress   [{}{}] {:>3}%  {}/{} chunks ({} local, {} downloaded, {:.1} MiB)",
            "#".repeat(filled),
            ".".repeat(WIDTH as usize - filled),
            u.chunks_done * 100 / u.chunks_total,
            u.chunks_done,
            u.chunks_total,
            u.chunks_local,
            u.chunks_fetched,
            u.bytes_fetched as f64 / 1_048_576.0
        );
    }
    if let Some(at) = u.last_check_unix {
        let _ = writeln!(out, "checked    {}", crate::view::ago_unix(at));
    }
    if let Some(e) = &u.last_error {
        let _ = writeln!(out, "problem    {e}");
    }
    if let Some(o) = &u.last_outcome {
        let _ = writeln!(
            out,
            "last       {} ({})",
            o.message,
            crate::view::ago_unix(o.at_unix)
        );
    }
    if !u.failed.is_empty() {
        let v: Vec<String> = u.failed.iter().map(|v| v.to_string()).collect();
        let _ = writeln!(
            out,
            "refused    {} (failed their trial boot; a newer release is needed)",
            v.join(", ")
        );
    }
    out
}

/// "3 min ago" for a Unix time.
pub fn ago_unix(at: u64) -> String {
    let secs = crate::status::now_unix().saturating_sub(at);
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

/// "2026-12-07 11:18:25" for a Unix time, in UTC (Howard Hinnant's days-to-civil algorithm).
pub fn utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod utc_tests {
    #[test]
    fn utc_matches_known_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_642_305), "2026-12-07 11:18:25");
    }
}
