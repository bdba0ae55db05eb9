//! The one interface between what the agent measures and where it goes: `/metrics` today, the signed
//! telemetry spool (`forward::SpoolSink` writes to both). Collectors produce [`Sample`]s; the health model produces [`Event`]s;
//! both go to a [`Sink`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Prometheus metric type of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    Gauge,
    Counter,
}

impl MetricKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Gauge => "gauge",
            MetricKind::Counter => "counter",
        }
    }
}

/// One value of one series at the time it was read. Names and labels are those of the exporter operators
/// already use for the signal (dcgm-exporter, smartctl_exporter, node_exporter, ipmi_exporter, nut_exporter).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Sample {
    pub fn gauge(
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: f64,
    ) -> Self {
        Sample {
            name,
            help,
            kind: MetricKind::Gauge,
            labels,
            value,
        }
    }

    pub fn counter(
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: f64,
    ) -> Self {
        Sample {
            name,
            help,
            kind: MetricKind::Counter,
            labels,
            value,
        }
    }
}

pub use cairn_proto::control::{Event, Severity};

/// Where samples and events go. Implementations must not block the collectors for long.
pub trait Sink: Send + Sync {
    /// The latest full set of samples of one source ("gpus", "nvme", "power"); it replaces that source's
    /// previous set.
    fn samples(&self, source: &'static str, samples: Vec<Sample>);
    fn event(&self, event: Event);
}

/// Event kinds the agent raises about itself (the health model's are `health` and `xid`, the spool's
/// `telemetry_drop`).
pub mod kind {
    /// The outcome of one attestation or onboarding attempt.
    pub const ATTESTATION: &str = "attestation";
    /// The fleet became unreachable, or reachable again.
    pub const UPLINK: &str = "uplink";
    /// Something in the agent failed or recovered: a telemetry upload, the TPM check.
    pub const AGENT_ERROR: &str = "agent_error";
}

/// An event about the agent itself, timestamped now.
pub fn agent_event(
    component: &str,
    kind: &str,
    severity: Severity,
    message: impl Into<String>,
) -> Event {
    Event {
        at_unix_ms: crate::health::now_ms(),
        component: component.to_owned(),
        kind: kind.to_owned(),
        severity,
        message: message.into(),
    }
}

/// Raises an event only when a repeated check changes outcome (first failure, a new reason, recovery), so a
/// check that fails every second for a day is one event, not 86,400.
#[derive(Debug, Default)]
pub struct OnChange {
    last: Option<Result<(), String>>,
}

impl OnChange {
    /// The event to raise for this outcome, if it differs from the last; recovery is only worth saying after
    /// a failure.
    pub fn observe(
        &mut self,
        outcome: Result<(), &str>,
        component: &str,
        kind: &str,
        failed: &str,
        recovered: &str,
    ) -> Option<Event> {
        let now = outcome.map_err(str::to_owned);
        if self.last.as_ref() == Some(&now) {
            return None;
        }
        let before = self.last.replace(now.clone());
        match now {
            Err(reason) => Some(agent_event(
                component,
                kind,
                Severity::Warning,
                format!("{failed}: {reason}"),
            )),
            Ok(()) if matches!(before, Some(Err(_))) => {
                Some(agent_event(component, kind, Severity::Info, recovered))
            }
            Ok(()) => None,
        }
    }
}

/// How many events the agent keeps for `cairnctl health` (the spool keeps them all).
pub const RECENT_EVENTS: usize = 256;

/// The in-process sink: the latest samples of each source (what `/metrics` serves) and the recent events.
#[derive(Debug, Clone, Default)]
pub struct LocalSink {
    inner: Arc<Mutex<LocalInner>>,
}

#[derive(Debug, Default)]
struct LocalInner {
    sources: BTreeMap<&'static str, Vec<Sample>>,
    events: VecDeque<Event>,
}

impl LocalSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, LocalInner> {
        // A panicking writer leaves at worst one source stale.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every source's latest samples, in source order.
    pub fn all_samples(&self) -> Vec<Sample> {
        self.lock().sources.values().flatten().cloned().collect()
    }

    pub fn recent_events(&self) -> Vec<Event> {
        self.lock().events.iter().cloned().collect()
    }
}

impl Sink for LocalSink {
    fn samples(&self, source: &'static str, samples: Vec<Sample>) {
        self.lock().sources.insert(source, samples);
    }

    fn event(&self, event: Event) {
        let mut inner = self.lock();
        if inner.events.len() == RECENT_EVENTS {
            inner.events.pop_front();
        }
        inner.events.push_back(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_change_raises_first_failure_new_reason_and_recovery_once_each() {
        let mut c = OnChange::default();
        let mut observe = |o: Result<(), &str>| {
            c.observe(
                o,
                "fleet",
                kind::UPLINK,
                "fleet unreachable",
                "fleet reachable again",
            )
        };
        assert!(observe(Ok(())).is_none(), "success first is not news");
        let e = observe(Err("connection refused")).unwrap();
        assert_eq!(
            (e.component.as_str(), e.kind.as_str(), e.severity),
            ("fleet", "uplink", Severity::Warning)
        );
        assert_eq!(e.message, "fleet unreachable: connection refused");
        assert!(observe(Err("connection refused")).is_none());
        let e = observe(Err("timed out")).unwrap();
        assert_eq!(e.message, "fleet unreachable: timed out");
        let e = observe(Ok(())).unwrap();
        assert_eq!(
            (e.severity, e.message.as_str()),
            (Severity::Info, "fleet reachable again")
        );
        assert!(observe(Ok(())).is_none());
    }
}
