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
