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
