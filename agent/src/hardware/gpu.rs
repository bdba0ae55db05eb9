//! GPUs through NVML. NVML missing, the driver not loaded, or one GPU lost are normal states of a field
//! machine: they become a reason in the status, never a crash. NVML is initialised once and, while it is
//! absent, retried with a capped backoff; if it can no longer count the GPUs it is shut down and initialised
//! again, with new XID event sets.
//!
//! NVML is used from a thread of its own ([`NvmlGpus`] asks it and waits for the answer): an event set borrows
//! the NVML handle, so both live on that thread's stack, and a hung driver blocks that thread, not the agent's
//! poller, which gives up after [`ANSWER_TIMEOUT`] and says so.
//!
//! Each poll reads every GPU's telemetry (dcgm-exporter's default set, see [`samples`]) and collects the XIDs
//! that happened since the previous poll: one event set per GPU, registered for critical XID errors and drained
//! with short waits, so each XID is reported once, in the reading that follows it, and a GPU that falls off the
//! bus takes down only its own set. A metric the driver or the GPU does not provide (an old driver without the
//! symbol, a GPU without the feature) is `None` and never a problem; a lost GPU is.

use crate::telemetry::{MetricKind, Sample};
use cairn_proto::control::{GpuFacts, GpuSummary};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE,
    NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_REMAPPED_UNC,
};
use nvml_wrapper::{Device, EventSet, Nvml};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The one question the agent asks about GPUs, so tests can answer it without NVML.
pub trait GpuSource: Send {
    /// What the GPUs look like now and which XIDs happened since the previous read, or why the GPUs cannot be
    /// looked at.
    fn read(&mut self) -> Result<GpuReading, String>;
}

/// One poll of the GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    /// The summary the status shows.
    pub facts: GpuFacts,
    /// Per GPU, in NVML index order.
    pub gpus: Vec<GpuMetrics>,
    /// XIDs NVML delivered since the previous read, each once, in delivery order.
    pub xids: Vec<XidEvent>,
}

/// An XID error NVML delivered for a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidEvent {
    pub gpu: u32,
    /// Empty if the GPU was lost before its UUID could be read.
    pub uuid: String,
    /// The XID number; 999 when NVML delivered an XID event without one.
    pub xid: u64,
}

/// The row remapper's state (Ampere and later): spare memory rows used in place of failing ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemappedRows {
    /// Rows remapped for correctable errors.
    pub correctable: u64,
    /// Rows remapped for uncorrectable errors.
    pub uncorrectable: u64,
    /// A remap waits for a GPU reset to take effect.
    pub pending: bool,
    /// A remap failed: no spare row was left.
    pub failure: bool,
}

/// Everything read from one GPU in one poll. Each reading is `None` when the driver or the GPU does not provide
/// it (an old driver, a feature the model lacks) or when the GPU could not be read (`problem` then says why).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuMetrics {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub temperature_c: Option<u32>,
    /// HBM temperature (`NVML_FI_DEV_MEMORY_TEMP`); GPUs with GDDR memory have none.
    pub memory_temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    /// Energy consumed since the driver was loaded, in millijoules.
    pub energy_mj: Option<u64>,
    /// Utilisation over NVML's last sample period, in percent: compute, memory copy, video encoder, decoder.
    pub util_gpu: Option<u32>,
    pub util_mem_copy: Option<u32>,
    pub util_enc: Option<u32>,
    pub util_dec: Option<u32>,
    pub fb_used_mib: Option<u64>,
    pub fb_free_mib: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    /// Aggregate (lifetime) ECC error counts: corrected single-bit and uncorrected double-bit.
    pub ecc_sbe_total: Option<u64>,
    pub ecc_dbe_total: Option<u64>,
    /// `nvmlClocksThrottleReasons` bitmask (the bits nvml-wrapper knows); 0 when the clocks are not held back.
    pub throttle_reasons: Option<u64>,
    pub pcie_replays: Option<u64>,
    /// Pages retired for single-bit and double-bit errors (page retirement: before Ampere).
    pub retired_pages_sbe: Option<u64>,
    pub retired_pages_dbe: Option<u64>,
    pub remapped_rows: Option<RemappedRows>,
    /// The last XID seen on this GPU since the agent started; `Some(0)` while XIDs are watched and none came.
    pub last_xid: Option<u64>,
    pub problem: Option<String>,
}

impl GpuMetrics {
    /// The status summary of this GPU.
    pub fn summary(&self) -> GpuSummary {
        GpuSummary {
            index: self.index,
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            pci_bus_id: self.pci_bus_id.clone(),
            temperature_c: self.temperature_c,
            power_w: self.power_w,
            problem: self.problem.clone(),
        }
    }
}

const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long [`NvmlGpus::read`] waits for NVML before reporting the driver hung. Generous: initialising NVML on
/// eight GPUs without persistence mode takes seconds.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a read still waits for an answer asked for by an earlier read that gave up.
const LATE_ANSWER_WAIT: Duration = Duration::from_millis(100);
/// Each poll waits this long on each GPU's XID event set when it has nothing to deliver.
const XID_WAIT_MS: u32 = 5;
/// XIDs taken from one GPU in one poll at most; the rest wait for the next poll.
const XIDS_PER_POLL: usize = 64;
/// What NVML reports for an XID event whose number it does not know.
const XID_UNKNOWN: u64 = 999;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
enum GpuError {
    #[error("NVML unavailable ({library}): {reason}")]
    Unavailable { library: String, reason: String },
    #[error(
        "NVML ({library}) cannot count GPUs: {reason}; it is initialised again at the next poll"
    )]
    Count { library: String, reason: String },
    #[error(
        "NVML ({library}) has not answered for {secs} s: the NVIDIA driver may be hung; look for NVRM and Xid \
         lines in the kernel log (`dmesg`) and reboot the machine if this persists"
    )]
    Hung { library: String, secs: u64 },
    #[error("cannot start the thread that talks to NVML ({library}): {source}")]
    Spawn {
        library: String,
        source: std::io::Error,
    },
    #[error(
        "the thread that talks to NVML ({library}) stopped; it is started again at the next poll"
    )]
    WorkerGone { library: String },
}

/// The GPUs of this machine through the NVML library at `library`.
#[derive(Debug)]
pub struct NvmlGpus {
    library: PathBuf,
    worker: Option<Worker>,
}

/// The NVML thread, as seen from [`NvmlGpus`].
#[derive(Debug)]
struct Worker {
    ask: mpsc::Sender<()>,
    answers: mpsc::Receiver<Answer>,
    /// When the question not yet answered was asked.
    asked_at: Option<Instant>,
}

type Answer = Result<GpuReading, String>;

impl NvmlGpus {
    pub fn new(library: PathBuf) -> Self {
        NvmlGpus {
            library,
            worker: None,
        }
    }

    fn library_name(&self) -> String {
        self.library.display().to_string()
    }
}

impl GpuSource for NvmlGpus {
    fn read(&mut self) -> Result<GpuReading, String> {
        let library = self.library_name();
        if self.worker.is_none() {
            let worker = Worker::start(self.library.clone())
                .map_err(|source| GpuError::Spawn {
                    library: library.clone(),
                    source,
                })
                .map_err(|e| e.to_string())?;
            self.worker = Some(worker);
        }
        let outcome = match self.worker.as_mut() {
            Some(worker) => worker.answer(),
            None => Err(None),
        };
        match outcome {
            Ok(answer) => answer,
            Err(Some(secs)) => Err(GpuError::Hung { library, secs }.to_string()),
            Err(None) => {
                // The thread ended (a panic inside NVML's caller): a new one starts at the next read.
                self.worker = None;
                Err(GpuError::WorkerGone { library }.to_string())
            }
        }
    }
}

impl Worker {
    fn start(library: PathBuf) -> std::io::Result<Worker> {
        let (ask, asks) = mpsc::channel();
        let (tell, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || serve(&library, &asks, &tell))?;
        Ok(Worker {
            ask,
            answers,
            asked_at: None,
        })
    }

    /// The answer to the question asked now, or to an earlier one that is still outstanding. `Err(Some(secs))`:
    /// no answer for that long; `Err(None)`: the thread is gone.
    fn answer(&mut self) -> Result<Answer, Option<u64>> {
        let (asked_at, wait) = match self.asked_at {
            Some(at) => (at, LATE_ANSWER_WAIT),
            None => {
                self.ask.send(()).map_err(|_| None)?;
                let now = Instant::now();
                self.asked_at = Some(now);
                (now, ANSWER_TIMEOUT)
            }
        };
        match self.answers.recv_timeout(wait) {
            Ok(answer) => {
                self.asked_at = None;
                Ok(answer)
            }
            Err(RecvTimeoutError::Timeout) => Err(Some(asked_at.elapsed().as_secs())),
            Err(RecvTimeoutError::Disconnected) => Err(None),
        }
    }
}

/// The NVML thread: answers each question with a reading, until [`NvmlGpus`] is dropped.
fn serve(library: &Path, asks: &mpsc::Receiver<()>, tell: &mpsc::Sender<Answer>) {
    let mut init = Init::new();
    // The last XID of each GPU outlives NVML sessions: dcgm-exporter's gauge, too, keeps it until a restart.
    let mut last_xids = HashMap::new();
    while asks.recv().is_ok() {
        let nvml = match init.nvml(library) {
            Ok(n) => n,
            Err(e) => {
                if tell.send(Err(e)).is_err() {
                    return;
                }
                continue;
            }
        };
        let mut session = Session::new(&nvml, library);
        loop {
            let (answer, healthy) = session.read(&mut last_xids);
            if tell.send(answer).is_err() {
                return;
            }
            if !healthy {
                // The event sets, then NVML, are shut down; the next question initialises NVML again.
                break;
            }
            if asks.recv().is_err() {
                return;
            }
        }
    }
}

/// NVML initialisation with a capped backoff while it fails.
struct Init {
    last_error: String,
    next_try: Instant,
    backoff: Duration,
}

impl Init {
    fn new() -> Self {
        Init {
            last_error: String::new(),
            next_try: Instant::now(),
            backoff: RETRY_MIN,
        }
    }

    fn nvml(&mut self, library: &Path) -> Result<Nvml, String> {
        if Instant::now() < self.next_try {
            return Err(self.last_error.clone());
        }
        match Nvml::builder().lib_path(library.as_os_str()).init() {
            Ok(n) => {
                tracing::info!(library = %library.display(), "NVML initialised");
                self.backoff = RETRY_MIN;
                Ok(n)
            }
            Err(e) => {
                self.last_error = GpuError::Unavailable {
                    library: library.display().to_string(),
                    reason: describe(&e),
                }
                .to_string();
                self.next_try = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                Err(self.last_error.clone())
            }
        }
    }
}

/// One NVML initialisation and what hangs off it.
struct Session<'n> {
    nvml: &'n Nvml,
    library: String,
    gpus: Vec<Watch<'n>>,
}

/// What a session keeps per GPU between polls.
#[derive(Default)]
struct Watch<'n> {
    identity: Option<Identity>,
    events: Events<'n>,
    /// The last reason XID events could not be watched, logged once.
    events_error: Option<String>,
}

#[derive(Clone)]
struct Identity {
    name: String,
    uuid: String,
    pci_bus_id: String,
}

#[derive(Default)]
enum Events<'n> {
    /// Not registered (yet, or since the set failed): registered at the next poll.
    #[default]
    Off,
    On(EventSet<'n>),
    /// The driver or the GPU has no XID events.
    Unsupported,
}

impl<'n> Session<'n> {
    fn new(nvml: &'n Nvml, library: &Path) -> Self {
        Session {
            nvml,
            library: library.display().to_string(),
            gpus: Vec::new(),
        }
    }

    /// A reading, and whether the session is still usable.
    fn read(&mut self, last_xids: &mut HashMap<String, u64>) -> (Answer, bool) {
        let nvml = self.nvml;
        let driver_version = nvml
            .sys_driver_version()
            .unwrap_or_else(|_| "unknown".into());
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                let error = GpuError::Count {
                    library: self.library.clone(),
                    reason: describe(&e),
                };
                return (Err(error.to_string()), false);
            }
        };
        self.gpus.resize_with(count as usize, Watch::default);
        let mut xids = Vec::new();
        let gpus: Vec<GpuMetrics> = (0..count)
            .zip(self.gpus.iter_mut())
            .map(|(index, watch)| watch.read(nvml, index, &mut xids, last_xids))
            .collect();
        let facts = GpuFacts {
            driver_version,
            gpus: gpus.iter().map(GpuMetrics::summary).collect(),
        };
        (Ok(GpuReading { facts, gpus, xids }), true)
    }
}

impl<'n> Watch<'n> {
    fn read(
        &mut self,
        nvml: &'n Nvml,
        index: u32,
        xids: &mut Vec<XidEvent>,
        last_xids: &mut HashMap<String, u64>,
    ) -> GpuMetrics {
        let mut probe = Probe::default();
        let device = probe.get("NVML handle", || nvml.device_by_index(index));
        if self.identity.is_none() {
            if let Some(d) = &device {
                self.identity = identify(d, &mut probe);
            }
        }
        let identity = self.identity.clone();
        let mut m = GpuMetrics {
            index,
            ..GpuMetrics::default()
        };
        if let Some(id) = identity {
            m.name = id.name;
            m.uuid = id.uuid;
            m.pci_bus_id = id.pci_bus_id;
        }
        let key = if m.uuid.is_empty() {
            format!("#{index}")
        } else {
            m.uuid.clone()
        };
        if let Some(d) = &device {
            self.watch_xids(nvml, d, index, &mut probe);
        }
        self.drain_xids(&m, &key, xids, last_xids, &mut probe);
        if let Some(d) = &device {
            read_metrics(d, &mut probe, &mut m);
        }
        m.last_xid = last_xids
            .get(&key)
            .copied()
            .or_else(|| matches!(self.events, Events::On(_)).then_some(0));
        m.problem = probe.problem;
        m
    }

    /// Registers the GPU for critical XID events if it is not yet.
    fn watch_xids(&mut self, nvml: &'n Nvml, device: &Device<'n>, index: u32, probe: &mut Probe) {
        if !matches!(self.events, Events::Off) || probe.lost {
            return;
        }
        let registered = nvml.create_event_set().and_then(|set| {
            device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| e.error)
        });
        match registered {
            Ok(set) => {
                self.events = Events::On(set);
                self.events_error = None;
            }
            Err(e) if absent(&e) => {
                tracing::info!(gpu = index, reason = %describe(&e), "XID events unavailable on this GPU");
                self.events = Events::Unsupported;
            }
            Err(e) => {
                // Only a lost GPU is the GPU's problem; anything else is a gap in watching it, logged.
                if matches!(e, NvmlError::GpuLost) {
                    probe.note("XID events", &e);
                }
                self.log_events_error(index, &e);
            }
        }
    }

    /// Takes the XIDs NVML has for this GPU.
    fn drain_xids(
        &mut self,
        m: &GpuMetrics,
        key: &str,
        xids: &mut Vec<XidEvent>,
        last_xids: &mut HashMap<String, u64>,
        probe: &mut Probe,
    ) {
        let Events::On(set) = &self.events else {
            return;
        };
        let mut failed = None;
        for _ in 0..XIDS_PER_POLL {
            match set.wait(XID_WAIT_MS) {
                Ok(event) => {
                    let Some(xid) = event.event_data else {
                        continue;
                    };
                    let xid = match xid {
                        XidError::Value(v) => v,
                        XidError::Unknown => XID_UNKNOWN,
                    };
                    tracing::warn!(gpu = m.index, uuid = %m.uuid, xid, "GPU reported an XID error");
                    last_xids.insert(key.to_owned(), xid);
                    xids.push(XidEvent {
                        gpu: m.index,
                        uuid: m.uuid.clone(),
                        xid,
                    });
                }
                Err(NvmlError::Timeout) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // The set is dropped (freed) and registered again at the next poll, once the GPU answers.
            if matches!(e, NvmlError::GpuLost) {
                probe.note("XID events", &e);
            }
            self.log_events_error(m.index, &e);
            self.events = Events::Off;
        }
    }

    fn log_events_error(&mut self, index: u32, e: &NvmlError) {
        let reason = describe(e);
        if self.events_error.as_deref() != Some(reason.as_str()) {
            tracing::warn!(gpu = index, reason = %reason, "cannot watch XID events on this GPU; retrying at the next poll");
            self.events_error = Some(reason);
        }
    }
}

/// Name, UUID and PCI bus id, cached once all three are known: they do not change while NVML is up, and a
/// lost GPU keeps its labels.
fn identify(d: &Device, probe: &mut Probe) -> Option<Identity> {
    let name = probe.get("name", || d.name());
    let uuid = probe.get("UUID", || d.uuid());
    let pci_bus_id = probe.get("PCI bus id", || d.pci_info().map(|p| p.bus_id));
    Some(Identity {
        name: name?,
        uuid: uuid?,
        pci_bus_id: pci_bus_id?,
    })
}

fn read_metrics(d: &Device, probe: &mut Probe, m: &mut GpuMetrics) {
    m.temperature_c = probe.get("temperature", || d.temperature(TemperatureSensor::Gpu));
    m.power_w = probe
        .get("power draw", || d.power_usage())
        .map(|mw| f64::from(mw) / 1000.0);
    m.energy_mj = probe.get("energy counter", || d.total_energy_consumption());
    if let Some(u) = probe.get("utilisation", || d.utilization_rates()) {
        m.util_gpu = Some(u.gpu);
        m.util_mem_copy = Some(u.memory);
    }
    m.util_enc = probe
        .get("encoder utilisation", || d.encoder_utilization())
        .map(|u| u.utilization);
    m.util_dec = probe
        .get("decoder utilisation", || d.decoder_utilization())
        .map(|u| u.utilization);
    if let Some(mem) = probe.get("memory usage", || d.memory_info()) {
        m.fb_used_mib = Some(mem.used / MIB);
        m.fb_free_mib = Some(mem.free / MIB);
    }
    m.sm_clock_mhz = probe.get("SM clock", || d.clock_info(Clock::SM));
    m.mem_clock_mhz = probe.get("memory clock", || d.clock_info(Clock::Memory));
    m.ecc_sbe_total = probe.get("corrected ECC error count", || {
        d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate)
    });
    m.ecc_dbe_total = probe.get("uncorrected ECC error count", || {
        d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)
    });
    m.throttle_reasons = probe
        .get("clock throttle reasons", || d.current_throttle_reasons())
        .map(|r| r.bits());
    m.pcie_replays = probe
        .get("PCIe replay counter", || d.pcie_replay_counter())
        .map(u64::from);
    m.retired_pages_sbe = probe
        .get("retired pages", || {
            d.retired_pages(RetirementCause::MultipleSingleBitEccErrors)
        })
        .map(|p| p.len() as u64);
    m.retired_pages_dbe = probe
        .get("retired pages", || {
            d.retired_pages(RetirementCause::DoubleBitEccError)
        })
        .map(|p| p.len() as u64);
    read_fields(d, probe, m);
}

/// Memory temperature and remapped rows: NVML field values (nvml-wrapper 0.13 has no call of its own for
/// either), one driver call for all five.
fn read_fields(d: &Device, probe: &mut Probe, m: &mut GpuMetrics) {
    const IDS: [u32; 5] = [
        NVML_FI_DEV_MEMORY_TEMP,
        NVML_FI_DEV_REMAPPED_COR,
        NVML_FI_DEV_REMAPPED_UNC,
        NVML_FI_DEV_REMAPPED_PENDING,
        NVML_FI_DEV_REMAPPED_FAILURE,
    ];
    let ids: Vec<FieldId> = IDS.iter().map(|&id| FieldId(id)).collect();
    let Some(samples) = probe.get("field values", || d.field_values_for(&ids)) else {
        return;
    };
    let mut values = [None; IDS.len()];
    for (slot, sample) in values.iter_mut().zip(samples) {
        match sample.and_then(|s| s.value) {
            Ok(v) => *slot = as_u64(v),
            // Per field, anything but a lost GPU means "not provided".
            Err(e @ NvmlError::GpuLost) => probe.note("field values", &e),
            Err(_) => {}
        }
    }
    let [temp, cor, unc, pending, failure] = values;
    m.memory_temperature_c = temp.and_then(|t| u32::try_from(t).ok());
    if let (Some(correctable), Some(uncorrectable), Some(pending), Some(failure)) =
        (cor, unc, pending, failure)
    {
        m.remapped_rows = Some(RemappedRows {
            correctable,
            uncorrectable,
            pending: pending != 0,
            failure: failure != 0,
        });
    }
}

fn as_u64(v: SampleValue) -> Option<u64> {
    match v {
        SampleValue::U32(x) => Some(u64::from(x)),
        SampleValue::U64(x) => Some(x),
        SampleValue::I64(x) => u64::try_from(x).ok(),
        SampleValue::F64(x) if x.is_finite() && x >= 0.0 => Some(x as u64),
        SampleValue::F64(_) => None,
    }
}

/// Collects one GPU's readings: what is missing stays `None`; a lost GPU stops the queries and becomes the
/// problem; any other error becomes the problem, the first one.
#[derive(Debug, Default)]
struct Probe {
    lost: bool,
    problem: Option<String>,
}

impl Probe {
    fn get<T>(
        &mut self,
        what: &'static str,
        query: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Option<T> {
        if self.lost {
            return None;
        }
        match query() {
            Ok(v) => Some(v),
            Err(e) => {
                self.note(what, &e);
                None
            }
        }
    }

    fn note(&mut self, what: &str, e: &NvmlError) {
        match e {
            e if absent(e) => {}
            NvmlError::GpuLost => {
                self.lost = true;
                self.problem = Some(describe(e));
            }
            e => {
                self.problem
                    .get_or_insert_with(|| format!("cannot read its {what}: {}", describe(e)));
            }
        }
    }
}

/// Errors that mean "this driver or this GPU does not provide that": the reading is left out, not a problem.
fn absent(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::FunctionNotFound
            | NvmlError::NoData
            | NvmlError::NotFound
    )
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

/// One dcgm-exporter series: name, type, help, and the value it takes from a GPU's readings.
struct Series {
    name: &'static str,
    kind: MetricKind,
    help: &'static str,
    value: fn(&GpuMetrics) -> Option<f64>,
}

const fn gauge(
    name: &'static str,
    help: &'static str,
    value: fn(&GpuMetrics) -> Option<f64>,
) -> Series {
    Series {
        name,
        kind: MetricKind::Gauge,
        help,
        value,
    }
}

const fn counter(
    name: &'static str,
    help: &'static str,
    value: fn(&GpuMetrics) -> Option<f64>,
) -> Series {
    Series {
        name,
        kind: MetricKind::Counter,
        help,
        value,
    }
}

fn from_u32(v: Option<u32>) -> Option<f64> {
    v.map(f64::from)
}

fn from_u64(v: Option<u64>) -> Option<f64> {
    v.map(|x| x as f64)
}

fn flag(v: bool) -> f64 {
    f64::from(u8::from(v))
}

/// dcgm-exporter's names, types and units (its default counters, plus the ECC, retired-page, pending-remap and
/// throttle fields it names but leaves out by default), so existing dashboards and alerts work unchanged.
const SERIES: &[Series] = &[
    gauge(
        "DCGM_FI_DEV_SM_CLOCK",
        "SM clock frequency (in MHz).",
        |g| from_u32(g.sm_clock_mhz),
    ),
    gauge(
        "DCGM_FI_DEV_MEM_CLOCK",
        "Memory clock frequency (in MHz).",
        |g| from_u32(g.mem_clock_mhz),
    ),
    gauge(
        "DCGM_FI_DEV_MEMORY_TEMP",
        "Memory (HBM) temperature (in C).",
        |g| from_u32(g.memory_temperature_c),
    ),
    gauge("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |g| {
        from_u32(g.temperature_c)
    }),
    gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |g| {
        g.power_w
    }),
    counter(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Energy consumed since the driver was loaded (in mJ).",
        |g| from_u64(g.energy_mj),
    ),
    counter(
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "PCIe replays (retried transfers) since the driver was loaded.",
        |g| from_u64(g.pcie_replays),
    ),
    gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |g| {
        from_u32(g.util_gpu)
    }),
    gauge(
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory copy utilization (in %).",
        |g| from_u32(g.util_mem_copy),
    ),
    gauge(
        "DCGM_FI_DEV_ENC_UTIL",
        "Video encoder utilization (in %).",
        |g| from_u32(g.util_enc),
    ),
    gauge(
        "DCGM_FI_DEV_DEC_UTIL",
        "Video decoder utilization (in %).",
        |g| from_u32(g.util_dec),
    ),
    gauge(
        "DCGM_FI_DEV_XID_ERRORS",
        "Number of the last XID error the GPU reported (0: none since the agent started).",
        |g| from_u64(g.last_xid),
    ),
    gauge(
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        |g| from_u64(g.fb_free_mib),
    ),
    gauge(
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        |g| from_u64(g.fb_used_mib),
    ),
    counter(
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        "Single-bit (corrected) ECC errors over the GPU's lifetime.",
        |g| from_u64(g.ecc_sbe_total),
    ),
    counter(
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        "Double-bit (uncorrected) ECC errors over the GPU's lifetime.",
        |g| from_u64(g.ecc_dbe_total),
    ),
    counter(
        "DCGM_FI_DEV_RETIRED_SBE",
        "Pages retired for single-bit ECC errors.",
        |g| from_u64(g.retired_pages_sbe),
    ),
    counter(
        "DCGM_FI_DEV_RETIRED_DBE",
        "Pages retired for double-bit ECC errors.",
        |g| from_u64(g.retired_pages_dbe),
    ),
    counter(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "Memory rows remapped for correctable errors.",
        |g| g.remapped_rows.map(|r| r.correctable as f64),
    ),
    counter(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Memory rows remapped for uncorrectable errors.",
        |g| g.remapped_rows.map(|r| r.uncorrectable as f64),
    ),
    gauge(
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "1 if a row remap waits for a GPU reset.",
        |g| g.remapped_rows.map(|r| flag(r.pending)),
    ),
    gauge(
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "1 if a row remap failed (no spare row left).",
        |g| g.remapped_rows.map(|r| flag(r.failure)),
    ),
    gauge(
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "Bitmask of the reasons the clocks are held back (nvmlClocksThrottleReasons).",
        |g| from_u64(g.throttle_reasons),
    ),
];

/// dcgm-exporter's labels for one GPU.
fn labels(gpu: &GpuMetrics, hostname: &str) -> Vec<(&'static str, String)> {
    vec![
        ("gpu", gpu.index.to_string()),
        ("UUID", gpu.uuid.clone()),
        ("pci_bus_id", gpu.pci_bus_id.clone()),
        ("device", format!("nvidia{}", gpu.index)),
        ("modelName", gpu.name.clone()),
        ("Hostname", hostname.to_owned()),
    ]
}

/// The reading as dcgm-exporter series, grouped by series, GPUs in index order. A reading a GPU does not have
/// is left out, not rendered as 0.
pub fn samples(reading: &GpuReading, hostname: &str) -> Vec<Sample> {
    let labels: Vec<_> = reading.gpus.iter().map(|g| labels(g, hostname)).collect();
    let mut out = Vec::new();
    for series in SERIES {
        for (gpu, labels) in reading.gpus.iter().zip(&labels) {
            if let Some(value) = (series.value)(gpu) {
                out.push(Sample {
                    name: series.name,
                    help: series.help,
                    kind: series.kind,
                    labels: labels.clone(),
                    value,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn full(index: u32) -> GpuMetrics {
        GpuMetrics {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index),
            temperature_c: Some(33),
            memory_temperature_c: Some(38),
            power_w: Some(72.5),
            energy_mj: Some(123_456_789),
            util_gpu: Some(40),
            util_mem_copy: Some(12),
            util_enc: Some(0),
            util_dec: Some(3),
            fb_used_mib: Some(512),
            fb_free_mib: Some(80_000),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: Some(2619),
            ecc_sbe_total: Some(4),
            ecc_dbe_total: Some(1),
            throttle_reasons: Some(0x48),
            pcie_replays: Some(7),
            retired_pages_sbe: Some(2),
            retired_pages_dbe: Some(1),
            remapped_rows: Some(RemappedRows {
                correctable: 3,
                uncorrectable: 1,
                pending: true,
                failure: false,
            }),
            last_xid: Some(79),
            problem: None,
        }
    }

    fn reading(gpus: Vec<GpuMetrics>) -> GpuReading {
        GpuReading {
            facts: GpuFacts {
                driver_version: "550.54.15".into(),
                gpus: gpus.iter().map(GpuMetrics::summary).collect(),
            },
            gpus,
            xids: Vec::new(),
        }
    }

    fn find<'a>(s: &'a [Sample], name: &str, gpu: u32) -> Option<&'a Sample> {
        s.iter()
            .find(|x| x.name == name && x.labels[0].1 == gpu.to_string())
    }

    #[test]
    fn every_series_has_dcgm_exporter_labels_kind_and_unit() {
        let s = samples(&reading(vec![full(0), full(1)]), "node-7");
        assert_eq!(s.len(), SERIES.len() * 2);
        let x = find(&s, "DCGM_FI_DEV_SM_CLOCK", 1).unwrap();
        assert_eq!(
            x.labels,
            vec![
                ("gpu", "1".to_owned()),
                ("UUID", "GPU-1".to_owned()),
                ("pci_bus_id", "00000000:19:00.0".to_owned()),
                ("device", "nvidia1".to_owned()),
                ("modelName", "NVIDIA H100 80GB HBM3".to_owned()),
                ("Hostname", "node-7".to_owned()),
            ]
        );
        let expect: &[(&str, MetricKind, f64)] = &[
            ("DCGM_FI_DEV_SM_CLOCK", MetricKind::Gauge, 1980.0),
            ("DCGM_FI_DEV_MEM_CLOCK", MetricKind::Gauge, 2619.0),
            ("DCGM_FI_DEV_MEMORY_TEMP", MetricKind::Gauge, 38.0),
            ("DCGM_FI_DEV_GPU_TEMP", MetricKind::Gauge, 33.0),
            ("DCGM_FI_DEV_POWER_USAGE", MetricKind::Gauge, 72.5),
            (
                "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                MetricKind::Counter,
                123_456_789.0,
            ),
            ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", MetricKind::Counter, 7.0),
            ("DCGM_FI_DEV_GPU_UTIL", MetricKind::Gauge, 40.0),
            ("DCGM_FI_DEV_MEM_COPY_UTIL", MetricKind::Gauge, 12.0),
            ("DCGM_FI_DEV_ENC_UTIL", MetricKind::Gauge, 0.0),
            ("DCGM_FI_DEV_DEC_UTIL", MetricKind::Gauge, 3.0),
            ("DCGM_FI_DEV_XID_ERRORS", MetricKind::Gauge, 79.0),
            ("DCGM_FI_DEV_FB_FREE", MetricKind::Gauge, 80_000.0),
            ("DCGM_FI_DEV_FB_USED", MetricKind::Gauge, 512.0),
            ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", MetricKind::Counter, 4.0),
            ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", MetricKind::Counter, 1.0),
            ("DCGM_FI_DEV_RETIRED_SBE", MetricKind::Counter, 2.0),
            ("DCGM_FI_DEV_RETIRED_DBE", MetricKind::Counter, 1.0),
            (
                "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
                MetricKind::Counter,
                3.0,
            ),
            (
                "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
                MetricKind::Counter,
                1.0,
            ),
            ("DCGM_FI_DEV_ROW_REMAP_PENDING", MetricKind::Gauge, 1.0),
            ("DCGM_FI_DEV_ROW_REMAP_FAILURE", MetricKind::Gauge, 0.0),
            (
                "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
                MetricKind::Gauge,
                72.0,
            ),
        ];
        assert_eq!(expect.len(), SERIES.len());
        for &(name, kind, value) in expect {
            let x = find(&s, name, 0).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!((x.kind, x.value), (kind, value), "{name}");
            assert!(!x.help.is_empty(), "{name}");
        }
        // Grouped by series, GPUs in order: a renderer writes each HELP/TYPE once.
        assert_eq!(s[0].name, s[1].name);
        assert_eq!(s[1].labels[0].1, "1");
    }

    #[test]
    fn units_are_dcgm_exporters() {
        let s = samples(&reading(vec![full(0)]), "h");
        let help = |n: &str| find(&s, n, 0).unwrap().help;
        for (name, unit) in [
            ("DCGM_FI_DEV_SM_CLOCK", "MHz"),
            ("DCGM_FI_DEV_MEM_CLOCK", "MHz"),
            ("DCGM_FI_DEV_GPU_TEMP", "in C"),
            ("DCGM_FI_DEV_MEMORY_TEMP", "in C"),
            ("DCGM_FI_DEV_POWER_USAGE", "in W"),
            ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "in mJ"),
            ("DCGM_FI_DEV_GPU_UTIL", "in %"),
            ("DCGM_FI_DEV_FB_FREE", "in MiB"),
            ("DCGM_FI_DEV_FB_USED", "in MiB"),
        ] {
            assert!(help(name).contains(unit), "{name}: {}", help(name));
        }
    }

    #[test]
    fn missing_readings_are_left_out_not_zero() {
        let lost = GpuMetrics {
            index: 1,
            uuid: "GPU-1".into(),
            last_xid: Some(79),
            problem: Some(describe(&NvmlError::GpuLost)),
            ..GpuMetrics::default()
        };
        let s = samples(&reading(vec![full(0), lost]), "h");
        let of_1: Vec<&str> = s
            .iter()
            .filter(|x| x.labels[0].1 == "1")
            .map(|x| x.name)
            .collect();
        assert_eq!(of_1, vec!["DCGM_FI_DEV_XID_ERRORS"]);
        assert!(samples(&reading(Vec::new()), "h").is_empty());
    }

    #[test]
    fn summary_keeps_the_status_fields() {
        let g = full(3);
        let s = g.summary();
        assert_eq!(
            (s.index, s.uuid.as_str(), s.temperature_c, s.power_w),
            (3, "GPU-3", Some(33), Some(72.5))
        );
        assert_eq!(s.problem, None);
    }

    #[test]
    fn a_missing_symbol_leaves_the_reading_out_and_is_no_problem() {
        let mut p = Probe::default();
        let v: Option<u32> = p.get("energy counter", || {
            Err(NvmlError::FailedToLoadSymbol(
                "nvmlDeviceGetTotalEnergyConsumption".into(),
            ))
        });
        assert_eq!(v, None);
        let v: Option<u32> = p.get("memory temperature", || Err(NvmlError::NotSupported));
        assert_eq!(v, None);
        assert_eq!(p.get("SM clock", || Ok(1980)), Some(1980));
        assert!(p.problem.is_none() && !p.lost);
    }

    #[test]
    fn a_lost_gpu_is_the_problem_and_stops_the_queries() {
        let mut p = Probe::default();
        let _: Option<u32> = p.get("temperature", || Err(NvmlError::Unknown));
        assert!(p.problem.as_deref().unwrap().contains("temperature"));
        let _: Option<u32> = p.get("power draw", || Err(NvmlError::GpuLost));
        assert!(p.lost);
        assert!(p.problem.as_deref().unwrap().contains("reseat or replace"));
        let mut asked = false;
        let v: Option<u32> = p.get("SM clock", || {
            asked = true;
            Ok(1)
        });
        assert_eq!(v, None);
        assert!(!asked);
    }

    #[test]
    fn field_values_convert() {
        assert_eq!(as_u64(SampleValue::U32(7)), Some(7));
        assert_eq!(as_u64(SampleValue::U64(1 << 40)), Some(1 << 40));
        assert_eq!(as_u64(SampleValue::I64(-1)), None);
        assert_eq!(as_u64(SampleValue::F64(41.0)), Some(41));
        assert_eq!(as_u64(SampleValue::F64(f64::NAN)), None);
    }

    #[test]
    fn an_absent_library_is_said_in_words() {
        let mut gpus = NvmlGpus::new("/nonexistent/libnvidia-ml.so.1".into());
        let e = gpus.read().unwrap_err();
        assert!(
            e.starts_with("NVML unavailable (/nonexistent/libnvidia-ml.so.1)"),
            "{e}"
        );
        assert!(e.contains("not installed"), "{e}");
        // Within the backoff the same reason comes back at once.
        assert_eq!(gpus.read().unwrap_err(), e);
    }
}
