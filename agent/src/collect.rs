//! One poll of the hardware: read GPUs, drives and power, hand the samples and events to the telemetry sink,
//! judge health, and update the status board. Runs on the hardware thread (every call here may block).

use crate::config::{HealthConfig, PowerConfig};
use crate::hardware::gpu::{self, GpuSource};
use crate::hardware::nvme::{self, SmartSource};
use crate::hardware::power::PowerCollector;
use crate::hardware::sysfs::SysRoot;
use crate::health::{self, HealthBoard};
use crate::status::{component, StatusBoard};
use crate::telemetry::{Event, Severity, Sink};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Collector {
    pub gpus: Box<dyn GpuSource>,
    pub smart: Box<dyn SmartSource>,
    pub sys: SysRoot,
    pub sys_root: PathBuf,
    pub power: PowerCollector,
    pub thresholds: HealthConfig,
    pub nvme_interval: Duration,
    pub hostname: String,
    health: HealthBoard,
    sticky_xids: BTreeMap<String, BTreeSet<String>>,
    last_nvme: Option<Instant>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("sys_root", &self.sys_root)
            .finish_non_exhaustive()
    }
}

impl Collector {
    #[allow(clippy::too_many_arguments)] // one of each hardware edge, named at the one call site
    pub fn new(
        gpus: Box<dyn GpuSource>,
        smart: Box<dyn SmartSource>,
        sys_root: PathBuf,
        power: &PowerConfig,
        thresholds: HealthConfig,
        nvme_interval: Duration,
        hostname: String,
    ) -> Self {
        Collector {
            gpus,
            smart,
            sys: SysRoot::new(sys_root.clone()),
            power: PowerCollector::new(sys_root.clone(), power.ups()),
            sys_root,
            thresholds,
            nvme_interval,
            hostname,
            health: HealthBoard::default(),
            sticky_xids: BTreeMap::new(),
            last_nvme: None,
        }
    }

    /// One poll. XIDs become events in this very poll, and a GPU they fail is failed in this poll's report.
    pub fn poll(&mut self, board: &StatusBoard, sink: &dyn Sink) {
        let reading = self.gpus.read();
        match &reading {
            Ok(r) => {
                for x in &r.xids {
                    let critical = self.thresholds.gpu_failed_xids.contains(&x.xid);
                    sink.event(Event {
                        at_unix_ms: health::now_ms(),
                        component: format!("gpu {}", x.gpu),
                        kind: "xid".into(),
                        severity: if critical {
                            Severity::Critical
                        } else {
                            Severity::Warning
                        },
                        message: format!(
                            "XID {} on {}: {}",
                            x.xid,
                            x.uuid,
                            health::xid_meaning(x.xid)
                        ),
                    });
                }
                sink.samples("gpus", gpu::samples(r, &self.hostname));
            }
            Err(_) => sink.samples("gpus", Vec::new()),
        }
        let gpu_health = health::judge_gpus(&reading, &self.thresholds, &mut self.sticky_xids);
        self.health.update("gpu", gpu_health, sink);

        if self
            .last_nvme
            .is_none_or(|t| t.elapsed() >= self.nvme_interval)
        {
            let drives = nvme::read_all(&self.sys_root, self.smart.as_mut());
            sink.samples("nvme", nvme::samples(&drives));
            self.health
                .update("nvme", health::judge_nvme(&drives, &self.thresholds), sink);
            self.last_nvme = Some(Instant::now());
        }

        let power = self.power.read();
        sink.samples("power", crate::hardware::power::samples(&power));
        self.health
            .update("power", health::judge_power(&power, &self.thresholds), sink);

        let sensors = self.sys.read();
        let report = self.health.report();
        board.update(|s| {
            s.gpus = component(reading.map(|r| r.facts));
            s.sensors = component(sensors);
            s.health = report;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::gpu::{GpuMetrics, GpuReading, XidEvent};
    use crate::hardware::nvme::NvmeError;
    use crate::telemetry::LocalSink;
    use cairn_proto::control::{AgentStatus, GpuFacts, HealthState, OnboardingStatus};
    use std::sync::{Arc, Mutex};

    /// GPUs whose next reading a test sets.
    struct ScriptedGpus(Arc<Mutex<Result<GpuReading, String>>>);

    impl GpuSource for ScriptedGpus {
        fn read(&mut self) -> Result<GpuReading, String> {
            let mut next = self.0.lock().unwrap();
            let out = next.clone();
            // XIDs are delivered once.
            if let Ok(r) = &mut *next {
                r.xids.clear();
            }
            out
        }
    }

    struct NoDrives;
    impl SmartSource for NoDrives {
        fn read(&mut self, controller: &str) -> Result<[u8; 512], NvmeError> {
            panic!("no drive {controller} should be read")
        }
    }

    fn gpu(index: u32) -> GpuMetrics {
        GpuMetrics {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100".into(),
            temperature_c: Some(40),
            ..GpuMetrics::default()
        }
    }

    fn reading(xids: Vec<XidEvent>) -> GpuReading {
        let gpus = vec![gpu(0), gpu(1)];
        GpuReading {
            facts: GpuFacts {
                driver_version: "550".into(),
                gpus: gpus.iter().map(GpuMetrics::summary).collect(),
            },
            gpus,
            xids,
        }
    }

    fn setup() -> (
        Collector,
        Arc<Mutex<Result<GpuReading, String>>>,
        tempfile::TempDir,
    ) {
        let next = Arc::new(Mutex::new(Ok(reading(vec![]))));
        let root = tempfile::tempdir().unwrap();
        let c = Collector::new(
            Box::new(ScriptedGpus(next.clone())),
            Box::new(NoDrives),
            root.path().to_owned(),
            &PowerConfig::default(),
            HealthConfig::default(),
            Duration::from_secs(60),
            "host".into(),
        );
        (c, next, root)
    }

    fn board() -> StatusBoard {
        StatusBoard::new(
            AgentStatus {
                version: "t".into(),
                pid: 1,
                uptime_secs: 0,
                config_sources: vec![],
                data_dir: "/x".into(),
            },
            OnboardingStatus::default(),
        )
    }

    fn state(b: &StatusBoard, component: &str) -> HealthState {
        b.snapshot()
            .health
            .iter()
            .find(|c| c.component == component)
            .unwrap()
            .state
    }

    #[test]
    fn a_critical_xid_fails_its_gpu_in_the_same_poll_and_stays_failed() {
        let (mut c, next, _root) = setup();
        let (b, sink) = (board(), LocalSink::default());
        c.poll(&b, &sink);
        assert_eq!(state(&b, "gpu 1"), HealthState::Ok);
        *next.lock().unwrap() = Ok(reading(vec![XidEvent {
            gpu: 1,
            uuid: "GPU-1".into(),
            xid: 79,
        }]));
        c.poll(&b, &sink);
        assert_eq!(state(&b, "gpu 1"), HealthState::Failed);
        assert_eq!(state(&b, "gpu 0"), HealthState::Ok);
        let events = sink.recent_events();
        let xid = events.iter().find(|e| e.kind == "xid").unwrap();
        assert_eq!(xid.severity, Severity::Critical);
        assert!(xid.message.contains("XID 79") && xid.message.contains("fallen off the bus"));
        let transition = events.iter().find(|e| e.kind == "health").unwrap();
        assert_eq!(transition.component, "gpu 1");
        assert!(
            transition.message.starts_with("ok → failed"),
            "{}",
            transition.message
        );
        // NVML reports each XID once; the GPU still needs a reset, so it stays failed.
        c.poll(&b, &sink);
        assert_eq!(state(&b, "gpu 1"), HealthState::Failed);
        // A non-critical XID is an event, not a failure.
        *next.lock().unwrap() = Ok(reading(vec![XidEvent {
            gpu: 0,
            uuid: "GPU-0".into(),
            xid: 13,
        }]));
        c.poll(&b, &sink);
        assert_eq!(state(&b, "gpu 0"), HealthState::Ok);
        assert_eq!(
            sink.recent_events().last().unwrap().severity,
            Severity::Warning
        );
        // The samples went to the sink under "gpus".
        assert!(sink
            .all_samples()
            .iter()
            .any(|s| s.name == "DCGM_FI_DEV_XID_ERRORS" || s.name == "DCGM_FI_DEV_GPU_TEMP"));
    }

    #[test]
    fn nvml_unavailable_is_unknown_not_a_crash() {
        let (mut c, next, _root) = setup();
        let (b, sink) = (board(), LocalSink::default());
        *next.lock().unwrap() = Err(
            "NVML unavailable (libnvidia-ml.so.1): the NVIDIA driver library is not installed"
                .into(),
        );
        c.poll(&b, &sink);
        assert_eq!(state(&b, "gpus"), HealthState::Unknown);
        assert!(matches!(
            b.snapshot().gpus,
            cairn_proto::control::ComponentStatus::Unavailable { .. }
        ));
    }
}
