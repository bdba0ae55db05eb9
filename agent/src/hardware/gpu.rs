//! GPUs through NVML. NVML missing, the driver not loaded, or one GPU lost are normal states of a field
//! machine: they become a reason in the status, never a crash. NVML is initialised once and, while it is
//! absent, retried with a capped backoff.

use cairn_proto::control::{GpuFacts, GpuSummary};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The one question the agent asks about GPUs, so tests can answer it without NVML.
pub trait GpuSource: Send {
    /// What the GPUs look like now, or why they cannot be looked at.
    fn read(&mut self) -> Result<GpuFacts, String>;
}

const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct NvmlGpus {
    library: PathBuf,
    nvml: Option<Nvml>,
    last_error: String,
    next_try: Instant,
    backoff: Duration,
}

impl NvmlGpus {
    pub fn new(library: PathBuf) -> Self {
        NvmlGpus {
            library,
            nvml: None,
            last_error: String::new(),
            next_try: Instant::now(),
            backoff: RETRY_MIN,
        }
    }

    fn ensure_init(&mut self) -> Result<&Nvml, String> {
        if self.nvml.is_none() {
            if Instant::now() < self.next_try {
                return Err(self.last_error.clone());
            }
            match Nvml::builder().lib_path(self.library.as_os_str()).init() {
                Ok(n) => {
                    tracing::info!(library = %self.library.display(), "NVML initialised");
                    self.nvml = Some(n);
                    self.backoff = RETRY_MIN;
                }
                Err(e) => {
                    self.last_error = format!(
                        "NVML unavailable ({}): {}",
                        self.library.display(),
                        describe(&e)
                    );
                    self.next_try = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(RETRY_MAX);
                    return Err(self.last_error.clone());
                }
            }
        }
        self.nvml.as_ref().ok_or_else(|| self.last_error.clone())
    }
}

impl GpuSource for NvmlGpus {
    fn read(&mut self) -> Result<GpuFacts, String> {
        let library = self.library.display().to_string();
        let nvml = self.ensure_init()?;
        let driver_version = nvml
            .sys_driver_version()
            .unwrap_or_else(|_| "unknown".into());
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML ({library}) cannot count GPUs: {}", describe(&e)))?;
        let gpus = (0..count).map(|index| summary(nvml, index)).collect();
        Ok(GpuFacts {
            driver_version,
            gpus,
        })
    }
}

fn summary(nvml: &Nvml, index: u32) -> GpuSummary {
    let mut s = GpuSummary {
        index,
        name: String::new(),
        uuid: String::new(),
        pci_bus_id: String::new(),
        temperature_c: None,
        power_w: None,
        problem: None,
    };
    let device = match nvml.device_by_index(index) {
        Ok(d) => d,
        Err(e) => {
            s.problem = Some(describe(&e));
            return s;
        }
    };
    let mut first_error = None;
    let mut note = |e: NvmlError| {
        first_error.get_or_insert_with(|| describe(&e));
    };
    s.name = device.name().map_err(&mut note).unwrap_or_default();
    s.uuid = device.uuid().map_err(&mut note).unwrap_or_default();
    s.pci_bus_id = device
        .pci_info()
        .map(|p| p.bus_id)
        .map_err(&mut note)
        .unwrap_or_default();
    s.temperature_c = device
        .temperature(TemperatureSensor::Gpu)
        .map_err(&mut note)
        .ok();
    s.power_w = device
        .power_usage()
        .map(|mw| f64::from(mw) / 1000.0)
        .map_err(&mut note)
        .ok();
    s.problem = first_error;
    s
}

/// NVML errors in words a field tech or an operator can act on.
fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(_) => "the NVIDIA driver library is not installed".into(),
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".into(),
        NvmlError::GpuLost => "GPU is lost (fell off the bus): reseat or replace it".into(),
        NvmlError::FailedToLoadSymbol(s) => format!("the NVIDIA driver is too old (no {s})"),
        other => other.to_string(),
    }
}
