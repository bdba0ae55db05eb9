//! The agent's configuration, layered: built-in defaults → `/usr/lib/cairn/cairnd.toml` (the image's) and its
//! `cairnd.toml.d/*.toml` → `/etc/cairn/cairnd.toml` and its `cairnd.toml.d/*.toml` (the site's) → `CAIRN_*`
//! environment variables. `--config PATH` replaces the file search with PATH (and `PATH.d/`).
//!
//! Every layer is checked on its own before it is merged, so an error names the file (or variable) and key
//! it came from. Unknown keys are errors: a typo must not silently fall back to a default.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Exit code for configuration errors (sysexits' EX_CONFIG), so `RestartPreventExitStatus=78` in the unit
/// stops systemd from restarting the agent in a loop over a file that will not fix itself.
pub const EXIT_CONFIG: i32 = 78;

/// The variable that names the config file, like `--config`. Not itself a configuration key.
pub const CONFIG_PATH_VAR: &str = "CAIRN_CONFIG";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentConfig,
    pub tpm: TpmConfig,
    pub fleet: FleetConfig,
    pub hardware: HardwareConfig,
    pub metrics: MetricsConfig,
    pub page: PageConfig,
    pub health: HealthConfig,
    pub power: PowerConfig,
    pub telemetry: TelemetryConfig,
    pub workloads: WorkloadsConfig,
    pub gate: GateConfig,
    pub update: UpdateConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Persistent state (identity, spool): the data partition.
    pub data_dir: PathBuf,
    /// The local control socket `cairnctl` talks to; created mode 0600.
    pub control_socket: PathBuf,
    /// A tracing filter: a level ("info") or per-target levels ("info,cairn_agent=debug").
    pub log_level: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TpmConfig {
    /// TCTI string: `device:/dev/tpmrm0` on hardware, `swtpm:host=…,port=…` for a software TPM.
    pub tcti: String,
    /// How often the TPM is re-checked. Each check opens and closes the TPM.
    pub probe_interval_secs: u64,
    /// Which TCG default EK the device's keys hang off: "rsa2048" or "ecc-p256".
    pub ek_algorithm: String,
    /// PCRs quoted for the fleet: `sha256:` and indices.
    pub pcrs: String,
    /// The measured-boot event log sent with each quote. Empty: `<sys_root>/sys/kernel/security/tpm0/binary_bios_measurements`.
    pub event_log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Base URL of the fleet backend; must be https.
    pub url: String,
    /// PEM file of the CA(s) the fleet's server certificate must chain to. Ships in the image.
    pub ca_file: PathBuf,
    pub check_interval_secs: u64,
    pub timeout_secs: u64,
    /// Provisioning files (USB stick, boot partition) whose `fleet_url` overrides `url`; the first one found wins.
    pub provisioning_paths: Vec<PathBuf>,
    /// Look up DNS SRV `_cairn-enroll._tcp.<domain>` for the search domains in `resolv_conf`.
    pub discover_srv: bool,
    pub resolv_conf: PathBuf,
    /// Onboarding retries back off from the first to the second value, with jitter.
    pub retry_min_secs: u64,
    pub retry_max_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardwareConfig {
    /// Root under which `sys/` and `dev/` are read: `/` on a device, a fake tree in tests.
    pub sys_root: PathBuf,
    /// The NVML library to load: a name the dynamic loader searches for, or a path.
    pub nvml_library: PathBuf,
    pub poll_interval_secs: u64,
    /// How often NVMe SMART logs are read (each is an admin command to the drive).
    pub nvme_interval_secs: u64,
}

/// The telemetry spool (`<data_dir>/spool`) and its uplink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Disk budget of the spool; over it, old samples are thinned, then dropped, events last.
    pub budget_bytes: u64,
    /// Group commit: records become durable at most this long after they are produced.
    pub flush_interval_ms: u64,
    /// Most records in one signed batch.
    pub batch_records: usize,
    /// Upload bandwidth cap in bytes per second; 0 for none.
    pub max_bytes_per_sec: u64,
    /// Once caught up, seconds between uploads (a backlog is sent without pause).
    pub upload_interval_secs: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            budget_bytes: 1 << 30,
            flush_interval_ms: 100,
            batch_records: 50_000,
            max_bytes_per_sec: 0,
            upload_interval_secs: 10,
        }
    }
}

/// Workloads: the signed set from the fleet, run as systemd units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadsConfig {
    /// The fleet's workload signer public key (PEM); without it the agent runs no workloads and says so.
    pub signer_key: PathBuf,
    /// D-Bus address of systemd's bus; "" is the system bus.
    pub dbus_address: String,
    /// Journal directory the units log to, for failure reports; "" is the host's journal.
    pub journal_dir: PathBuf,
    /// Seconds between asks to the fleet for a new set.
    pub fetch_interval_secs: u64,
    /// Seconds between full re-reads of unit state, besides the change signals systemd sends.
    pub resync_interval_secs: u64,
}

impl Default for WorkloadsConfig {
    fn default() -> Self {
        WorkloadsConfig {
            signer_key: "/etc/cairn/workload-signer.pub".into(),
            dbus_address: String::new(),
            journal_dir: PathBuf::new(),
            fetch_interval_secs: 60,
            resync_interval_secs: 30,
        }
    }
}

/// The boot health gate (`cairnctl gate`): what this box must see locally before a boot counts as good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Where the data partition is mounted; the gate fails when nothing is.
    pub data_mount: PathBuf,
    /// Fail when the agent cannot use the TPM.
    pub require_tpm: bool,
    /// Fail with fewer GPUs visible than this (the image for a GPU box sets it).
    pub expect_gpus: u32,
    /// Fail with fewer NVMe drives visible than this.
    pub expect_nvme: u32,
    /// How long to wait for the agent to answer and probe what the gate needs.
    pub timeout_secs: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            data_mount: "/var".into(),
            require_tpm: true,
            expect_gpus: 0,
            expect_nvme: 0,
            timeout_secs: 120,
        }
    }
}

/// OTA updates from a TUF repository into the inactive A/B slot (docs/image.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// The repository's trust anchor (its root.json), built into the image; without it the agent takes no
    /// updates and says so.
    pub root_file: PathBuf,
    /// Where the repository is: "" is the fleet's (`<fleet.url>/v1/update/`, over its TLS with fleet.ca_file),
    /// or a `file:///` directory holding `metadata/` and `targets/` (a USB stick).
    pub repository: String,
    /// Seconds between checks; the fleet or `cairnctl update check` can ask for one sooner.
    pub check_interval_secs: u64,
    /// Seconds between looks at the channel's signed timestamp alone (about 1 KB): when the fleet signed
    /// something new (a publish, a wider wave), the full check runs at once instead of at the next interval.
    pub watch_interval_secs: u64,
    /// Rebooting into a written update happens only inside this daily window, "HH:MM-HH:MM" in UTC
    /// (it may wrap midnight); "" is any time. Checking and writing happen at any time.
    pub window: String,
    /// This device's rollout wave, 0-9: it takes a release published with `max_wave` at or above it.
    /// The default, 9, takes only releases rolled out to every device; canary sites use 0.
    pub wave: u32,
    /// Boots a new slot gets to pass the health gate before systemd-boot falls back.
    pub boot_tries: u32,
    /// Reboot by itself (in the window) once an update is written; false leaves the reboot to an operator.
    pub reboot: bool,
    /// The mounted ESP (systemd-boot's entries and the slots' kernels).
    pub esp: PathBuf,
    /// Directory of partitions by GPT label (root-a, root-a-verity, root-b, root-b-verity).
    pub partitions: PathBuf,
    /// Where the running slot (`cairn.slot=`) and version (IMAGE_VERSION) are read.
    pub cmdline: PathBuf,
    pub os_release: PathBuf,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            root_file: "/usr/lib/cairn/update-root.json".into(),
            repository: String::new(),
            check_interval_secs: 4 * 3600,
            watch_interval_secs: 60,
            window: String::new(),
            wave: cairn_proto::update::MAX_WAVE,
            boot_tries: 3,
            reboot: true,
            esp: "/efi".into(),
            partitions: "/dev/disk/by-partlabel".into(),
            cmdline: "/proc/cmdline".into(),
            os_release: "/usr/lib/os-release".into(),
        }
    }
}

/// A daily window in minutes after midnight UTC, `start..end` (wrapping midnight when end < start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    /// "" is no window (any time).
    pub fn parse(s: &str) -> Result<Option<Window>, String> {
        if s.trim().is_empty() {
            return Ok(None);
        }
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && t.trim().len() == 5).then_some(h * 60 + m)
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} has no '-'"))?;
        match (minutes(a), minutes(b)) {
            (Some(start), Some(end)) if start != end => Ok(Some(Window { start, end })),
            (Some(_), Some(_)) => Err(format!("{s:?} starts where it ends")),
            _ => Err(format!("{s:?} is not HH:MM-HH:MM")),
        }
    }

    pub fn contains(&self, unix_secs: u64) -> bool {
        let m = ((unix_secs / 60) % (24 * 60)) as u32;
        if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }
}

/// Power sources beyond sysfs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowerConfig {
    /// The NUT server (upsd) to ask about the UPS, `host:port`; empty when the site has none.
    pub nut_server: String,
    /// The UPS's name on that server (`upsc -l`).
    pub nut_ups: String,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            nut_server: String::new(),
            nut_ups: "ups".into(),
        }
    }
}

impl PowerConfig {
    pub fn ups(&self) -> Option<crate::hardware::power::nut::UpsConfig> {
        (!self.nut_server.is_empty()).then(|| {
            crate::hardware::power::nut::UpsConfig::new(
                self.nut_server.clone(),
                self.nut_ups.clone(),
            )
        })
    }
}

/// Thresholds of the health model (docs/health.md lists every signal and rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// GPU core temperature at or above which the GPU is degraded.
    pub gpu_temperature_c: u32,
    /// GPU memory (HBM) temperature at or above which the GPU is degraded.
    pub gpu_memory_temperature_c: u32,
    /// XIDs that mean the GPU needs a reset or replacement: the GPU is failed until cairnd restarts.
    pub gpu_failed_xids: Vec<u64>,
    /// NVMe percentage used (of rated endurance) at or above which the drive is degraded.
    pub nvme_percentage_used: u8,
    /// NVMe available spare within this many points above the drive's own threshold: degraded.
    pub nvme_spare_margin_percent: u8,
    /// NVMe composite temperature at or above which the drive is degraded.
    pub nvme_temperature_c: u32,
    /// On battery with less estimated runtime than this, the UPS is failed (degraded above it).
    pub ups_runtime_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            gpu_temperature_c: 90,
            gpu_memory_temperature_c: 95,
            gpu_failed_xids: vec![48, 63, 64, 74, 79, 94, 95],
            nvme_percentage_used: 90,
            nvme_spare_margin_percent: 10,
            nvme_temperature_c: 70,
            ups_runtime_secs: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served. Loopback by default: exposing it is a site decision.
    pub listen: SocketAddr,
}

/// The read-only local status page (docs/runbooks/first-install.md): the overview in a browser on the
/// management network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PageConfig {
    /// Network interfaces it answers on, by name; it answers on no other. The default is the management port
    /// `mgmt0` (the image's link file names it); `[]` turns the page off.
    pub interfaces: Vec<String>,
    /// The port on those interfaces.
    pub port: u16,
    /// Further addresses to answer on, e.g. loopback behind a local proxy. Empty by default.
    pub listen: Vec<SocketAddr>,
}

impl Default for PageConfig {
    fn default() -> Self {
        PageConfig {
            interfaces: vec!["mgmt0".into()],
            port: 80,
            listen: Vec::new(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: "/var/lib/cairn".into(),
            control_socket: "/run/cairn/control.sock".into(),
            log_level: "info".into(),
        }
    }
}

impl Default for TpmConfig {
    fn default() -> Self {
        TpmConfig {
            tcti: "device:/dev/tpmrm0".into(),
            probe_interval_secs: 60,
            ek_algorithm: "rsa2048".into(),
            pcrs: "sha256:0,1,2,3,4,5,6,7".into(),
            event_log: PathBuf::new(),
        }
    }
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            url: "https://fleet.cairn.invalid:8443".into(),
            ca_file: "/usr/lib/cairn/fleet-ca.pem".into(),
            check_interval_secs: 30,
            timeout_secs: 10,
            provisioning_paths: vec![
                "/run/cairn/provision/cairn-provision.toml".into(),
                "/boot/cairn-provision.toml".into(),
                "/boot/efi/cairn-provision.toml".into(),
            ],
            discover_srv: true,
            resolv_conf: "/etc/resolv.conf".into(),
            retry_min_secs: 5,
            retry_max_secs: 300,
        }
    }
}

impl Default for HardwareConfig {
    fn default() -> Self {
        HardwareConfig {
            sys_root: "/".into(),
            nvml_library: "libnvidia-ml.so.1".into(),
            poll_interval_secs: 10,
            nvme_interval_secs: 60,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9558)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {problem}\n  fix: {fix}")]
    Invalid {
        origin: String,
        problem: String,
        fix: String,
    },
}

impl ConfigError {
    fn invalid(
        origin: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            origin: origin.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// Where configuration comes from. Production uses [`Sources::system`]; tests point the directories at
/// temporary ones and pass their own environment.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Explicit file (`--config` or `CAIRN_CONFIG`): replaces the directory search.
    pub explicit: Option<PathBuf>,
    pub vendor_dir: PathBuf,
    pub site_dir: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Sources {
    pub fn system(explicit: Option<PathBuf>) -> Self {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let explicit = explicit.or_else(|| {
            env.iter()
                .find(|(k, _)| k == CONFIG_PATH_VAR)
                .map(|(_, v)| PathBuf::from(v))
                .filter(|p| !p.as_os_str().is_empty())
        });
        Sources {
            explicit,
            vendor_dir: "/usr/lib/cairn".into(),
            site_dir: "/etc/cairn".into(),
            env,
        }
    }

    /// The files to read, in the order they apply. Missing optional files are skipped; a missing explicit
    /// file is an error (someone asked for it by name).
    fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut files = Vec::new();
        let mut add = |base: &Path, must_exist: bool| -> Result<(), ConfigError> {
            if base.is_file() {
                files.push(base.to_owned());
            } else if must_exist {
                return Err(ConfigError::Read {
                    path: base.to_owned(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
            let mut dropin = base.as_os_str().to_owned();
            dropin.push(".d");
            let dropin = PathBuf::from(dropin);
            if let Ok(entries) = std::fs::read_dir(&dropin) {
                let mut more: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                    .collect();
                more.sort();
                files.extend(more);
            }
            Ok(())
        };
        match &self.explicit {
            Some(path) => add(path, true)?,
            None => {
                add(&self.vendor_dir.join("cairnd.toml"), false)?;
                add(&self.site_dir.join("cairnd.toml"), false)?;
            }
        }
        Ok(files)
    }
}

/// A loaded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Files and variables applied, in order, for `cairnctl status` and the logs.
    pub sources: Vec<String>,
}

pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let mut merged = toml::Table::new();
    let mut applied = Vec::new();
    for path in sources.files()? {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let table = check_file(&path, &text)?;
        merge(&mut merged, table);
        applied.push(path.display().to_string());
    }
    for (var, value) in &sources.env {
        let Some(rest) = var.strip_prefix("CAIRN_") else {
            continue;
        };
        if var == CONFIG_PATH_VAR {
            continue;
        }
        let table = env_layer(var, rest, value)?;
        merge(&mut merged, table);
        applied.push(format!("${var}"));
    }
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            ConfigError::invalid(
                "merged configuration",
                format!("key `{}`: {}", e.path(), e.inner()),
                FIX_GENERIC,
            )
        })?;
    validate(&config)?;
    Ok(Loaded {
        config,
        sources: applied,
    })
}

const FIX_GENERIC: &str = "correct the value or remove the key; every key, its type and its default are in \
                           /usr/share/doc/cairn/cairnd.toml.example (agent/cairnd.toml.example in the source)";

pub(crate) use cairn_proto::recipe::line_of;

/// Parses one file and checks it alone against the schema, so its errors name it.
fn check_file(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let origin = |line: Option<usize>| match line {
        Some(l) => format!("configuration file {}, line {l}", path.display()),
        None => format!("configuration file {}", path.display()),
    };
    let line_of = |span| line_of(text, span);
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        ConfigError::invalid(
            origin(line_of(e.span())),
            format!("is not valid TOML: {}", e.message()),
            "fix the syntax at that line",
        )
    })?;
    serde_path_to_error::deserialize::<_, Config>(toml::Deserializer::new(text)).map_err(|e| {
        let line = line_of(e.inner().span());
        let problem = format!("key `{}`: {}", e.path(), e.inner().message());
        ConfigError::invalid(origin(line), problem, FIX_GENERIC)
    })?;
    Ok(table)
}

/// `CAIRN_<SECTION>_<KEY>=value`: the section is the first word, the key the rest (`CAIRN_FLEET_CA_FILE` is
/// `fleet.ca_file`). Values that parse as TOML (numbers, booleans, quoted strings) are taken as such, anything
/// else as a plain string.
fn env_layer(var: &str, rest: &str, value: &str) -> Result<toml::Table, ConfigError> {
    let origin = format!("environment variable {var}");
    let lower = rest.to_ascii_lowercase();
    let Some((section, key)) = lower.split_once('_') else {
        return Err(ConfigError::invalid(
            origin,
            "does not name a configuration key",
            "use CAIRN_<SECTION>_<KEY>, e.g. CAIRN_FLEET_URL, or unset it",
        ));
    };
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let value = parsed.unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let mut inner = toml::Table::new();
    inner.insert(key.to_owned(), value);
    let mut table = toml::Table::new();
    table.insert(section.to_owned(), toml::Value::Table(inner));
    serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())).map_err(
        |e| {
            ConfigError::invalid(
                origin,
                format!("key `{}`: {}", e.path(), e.inner().message()),
                FIX_GENERIC,
            )
        },
    )?;
    Ok(table)
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// `Targets` would read a bare word as a target name; here a bare word must be a level.
fn log_filter_is_valid(filter: &str) -> bool {
    let level = |l: &str| l.eq_ignore_ascii_case("off") || l.parse::<tracing::Level>().is_ok();
    !filter.trim().is_empty()
        && filter.split(',').all(|part| match part.split_once('=') {
            Some((target, l)) => !target.trim().is_empty() && level(l.trim()),
            None => level(part.trim()),
        })
}

impl Config {
    pub fn ek_algorithm(&self) -> Result<cairn_tpm::EkAlgorithm, String> {
        self.tpm.ek_algorithm.parse()
    }

    /// The event log path, defaulted under `hardware.sys_root`.
    pub fn event_log_path(&self) -> PathBuf {
        if self.tpm.event_log.as_os_str().is_empty() {
            self.hardware
                .sys_root
                .join("sys/kernel/security/tpm0/binary_bios_measurements")
        } else {
            self.tpm.event_log.clone()
        }
    }
}

/// Checks that cannot be expressed in types.
fn validate(c: &Config) -> Result<(), ConfigError> {
    let origin = "configuration";
    for (key, secs) in [
        ("tpm.probe_interval_secs", c.tpm.probe_interval_secs),
        ("fleet.check_interval_secs", c.fleet.check_interval_secs),
        ("fleet.timeout_secs", c.fleet.timeout_secs),
        ("hardware.poll_interval_secs", c.hardware.poll_interval_secs),
        ("hardware.nvme_interval_secs", c.hardware.nvme_interval_secs),
        ("telemetry.flush_interval_ms", c.telemetry.flush_interval_ms),
        (
            "telemetry.upload_interval_secs",
            c.telemetry.upload_interval_secs,
        ),
        ("fleet.retry_min_secs", c.fleet.retry_min_secs),
        ("gate.timeout_secs", c.gate.timeout_secs),
        ("update.check_interval_secs", c.update.check_interval_secs),
        ("update.watch_interval_secs", c.update.watch_interval_secs),
    ] {
        if secs == 0 {
            return Err(ConfigError::invalid(
                origin,
                format!("key `{key}` is 0"),
                "give it a number of seconds of at least 1",
            ));
        }
    }
    if let Err(e) = Window::parse(&c.update.window) {
        return Err(ConfigError::invalid(
            origin,
            format!("key `update.window`: {e}"),
            "give a daily window in UTC such as \"01:00-04:30\" (it may wrap midnight), or \"\" for any time",
        ));
    }
    if c.update.wave > cairn_proto::update::MAX_WAVE {
        return Err(ConfigError::invalid(
            origin,
            format!("key `update.wave` is {}", c.update.wave),
            "give a wave from 0 (first, canaries) to 9 (last, the default)",
        ));
    }
    if c.update.boot_tries == 0 || c.update.boot_tries > 9 {
        return Err(ConfigError::invalid(
            origin,
            format!("key `update.boot_tries` is {}", c.update.boot_tries),
            "give 1 to 9 boots (default 3)",
        ));
    }
    if !c.update.repository.is_empty() && !c.update.repository.starts_with("file:///") {
        return Err(ConfigError::invalid(
            origin,
            format!("key `update.repository` is {:?}", c.update.repository),
            "leave it empty for the fleet's repository, or give a file:/// directory",
        ));
    }
    for name in &c.page.interfaces {
        // The kernel's limit (IFNAMSIZ - 1) and what it forbids in a name.
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', ':'])
            || name.contains(char::is_whitespace)
        {
            return Err(ConfigError::invalid(
                origin,
                format!("key `page.interfaces` holds {name:?}, which cannot be an interface name"),
                "give interface names as `ip link` shows them, e.g. [\"mgmt0\"], or [] to turn the page off",
            ));
        }
    }
    if c.page.port == 0 && !c.page.interfaces.is_empty() {
        return Err(ConfigError::invalid(
            origin,
            "key `page.port` is 0",
            "give the port the page answers on, e.g. 80 (the default)",
        ));
    }
    if c.telemetry.batch_records == 0 {
        return Err(ConfigError::invalid(
            origin,
            "key `telemetry.batch_records` is 0",
            "give the most records one upload may carry, e.g. 50000 (the default)",
        ));
    }
    if c.telemetry.budget_bytes < crate::spool::MIN_BUDGET_BYTES {
        return Err(ConfigError::invalid(
            origin,
            format!(
                "key `telemetry.budget_bytes` = {} is below the smallest budget the spool can keep ({} bytes)",
                c.telemetry.budget_bytes,
                crate::spool::MIN_BUDGET_BYTES
            ),
            "give at least 8388608 (8 MiB); the default is 1073741824 (1 GiB)",
        ));
    }
    if let Some(ups) = c.power.ups() {
        if let Err(e) = ups.validate() {
            return Err(ConfigError::invalid(
                origin,
                format!("keys `power.nut_server`/`power.nut_ups`: {e}"),
                "give upsd's host:port and the UPS name `upsc -l` lists, or leave nut_server empty",
            ));
        }
    }
    if c.telemetry.batch_records > cairn_proto::telemetry::MAX_RECORDS {
        return Err(ConfigError::invalid(
            origin,
            format!(
                "key `telemetry.batch_records` = {} is more than a batch may carry ({})",
                c.telemetry.batch_records,
                cairn_proto::telemetry::MAX_RECORDS
            ),
            "use at most 262144 (default 50000)",
        ));
    }
    if c.health.nvme_percentage_used > 100 || c.health.nvme_spare_margin_percent > 100 {
        return Err(ConfigError::invalid(
            origin,
            "keys `health.nvme_percentage_used` and `health.nvme_spare_margin_percent` are percentages",
            "give values from 0 to 100",
        ));
    }
    if c.fleet.retry_max_secs < c.fleet.retry_min_secs {
        return Err(ConfigError::invalid(
            origin,
            format!(
                "key `fleet.retry_max_secs` ({}) is below `fleet.retry_min_secs` ({})",
                c.fleet.retry_max_secs, c.fleet.retry_min_secs
            ),
            "make the cap at least the first retry delay, e.g. 300",
        ));
    }
    if let Err(e) = c.ek_algorithm() {
        return Err(ConfigError::invalid(
            origin,
            format!("key `tpm.ek_algorithm`: {e}"),
            "use \"rsa2048\" or \"ecc-p256\"",
        ));
    }
    if let Err(e) = crate::attestation::parse_pcrs(&c.tpm.pcrs) {
        return Err(ConfigError::invalid(
            origin,
            format!("key `tpm.pcrs`: {e}"),
            "use e.g. \"sha256:0,1,2,3,4,5,6,7\"",
        ));
    }
    if !c.fleet.url.is_empty() {
        if let Err(e) = crate::uplink::FleetUrl::parse(&c.fleet.url) {
            return Err(ConfigError::invalid(
            origin,
            format!("key `fleet.url`: {e}"),
            "give the fleet's https URL, e.g. https://fleet.example.com:8443, or \"\" to rely on discovery",
        ));
        }
    }
    if !log_filter_is_valid(&c.agent.log_level) {
        return Err(ConfigError::invalid(
            origin,
            format!("key `agent.log_level` = {:?} is not a log filter", c.agent.log_level),
            "use a level (off, error, warn, info, debug, trace) or target=level pairs, e.g. \"info,cairn_agent=debug\"",
        ));
    }
    cairn_tpm::Tpm::new(&c.tpm.tcti).map_err(|e| {
        ConfigError::invalid(
            origin,
            format!("key `tpm.tcti`: {e}"),
            "use e.g. device:/dev/tpmrm0",
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        _tmp: tempfile::TempDir,
        vendor: PathBuf,
        site: PathBuf,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let vendor = tmp.path().join("usr-lib-cairn");
        let site = tmp.path().join("etc-cairn");
        std::fs::create_dir_all(vendor.join("cairnd.toml.d")).unwrap();
        std::fs::create_dir_all(site.join("cairnd.toml.d")).unwrap();
        Dirs {
            _tmp: tmp,
            vendor,
            site,
        }
    }

    fn sources(d: &Dirs, env: &[(&str, &str)]) -> Sources {
        Sources {
            explicit: None,
            vendor_dir: d.vendor.clone(),
            site_dir: d.site.clone(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn no_files_gives_the_built_in_defaults() {
        let d = dirs();
        let loaded = load(&sources(&d, &[])).unwrap();
        assert_eq!(loaded.config, Config::default());
        assert!(loaded.sources.is_empty());
    }

    #[test]
    fn layers_apply_in_order_and_keep_untouched_keys() {
        let d = dirs();
        std::fs::write(d.vendor.join("cairnd.toml"), "[fleet]\nurl = \"https://vendor:1\"\ntimeout_secs = 3\n[agent]\nlog_level = \"warn\"\n").unwrap();
        std::fs::write(
            d.vendor.join("cairnd.toml.d/10-a.toml"),
            "[fleet]\nurl = \"https://vendor-dropin:2\"\n",
        )
        .unwrap();
        std::fs::write(
            d.site.join("cairnd.toml"),
            "[fleet]\nurl = \"https://site:3\"\n[hardware]\npoll_interval_secs = 5\n",
        )
        .unwrap();
        std::fs::write(
            d.site.join("cairnd.toml.d/20-b.toml"),
            "[hardware]\npoll_interval_secs = 7\n",
        )
        .unwrap();
        std::fs::write(
            d.site.join("cairnd.toml.d/10-a.toml"),
            "[hardware]\npoll_interval_secs = 6\n",
        )
        .unwrap();
        std::fs::write(
            d.site.join("cairnd.toml.d/ignored.conf"),
            "not toml at all [",
        )
        .unwrap();

        let loaded = load(&sources(
            &d,
            &[("CAIRN_FLEET_URL", "https://env:4"), ("PATH", "/bin")],
        ))
        .unwrap();
        let c = &loaded.config;
        assert_eq!(c.fleet.url, "https://env:4", "env beats every file");
        assert_eq!(
            c.fleet.timeout_secs, 3,
            "a key set only by the vendor file survives"
        );
        assert_eq!(c.agent.log_level, "warn");
        assert_eq!(
            c.hardware.poll_interval_secs, 7,
            "drop-ins apply in name order, after their main file"
        );
        assert_eq!(c.tpm, TpmConfig::default());
        let names: Vec<&str> = loaded
            .sources
            .iter()
            .map(|s| s.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "cairnd.toml",
                "10-a.toml",
                "cairnd.toml",
                "10-a.toml",
                "20-b.toml",
                "$CAIRN_FLEET_URL"
            ]
        );
    }

    #[test]
    fn explicit_file_replaces_the_search() {
        let d = dirs();
        std::fs::write(
            d.site.join("cairnd.toml"),
            "[fleet]\nurl = \"https://site:3\"\n",
        )
        .unwrap();
        let explicit = d.vendor.join("mine.toml");
        std::fs::write(&explicit, "[hardware]\npoll_interval_secs = 2\n").unwrap();
        let mut s = sources(&d, &[]);
        s.explicit = Some(explicit);
        let c = load(&s).unwrap().config;
        assert_eq!(c.fleet.url, FleetConfig::default().url, "/etc was not read");
        assert_eq!(c.hardware.poll_interval_secs, 2);
    }

    #[test]
    fn missing_explicit_file_is_an_error_naming_it() {
        let d = dirs();
        let mut s = sources(&d, &[]);
        s.explicit = Some(d.site.join("nope.toml"));
        let err = load(&s).unwrap_err().to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }

    #[test]
    fn env_values_take_their_toml_type() {
        let d = dirs();
        let c = load(&sources(
            &d,
            &[
                ("CAIRN_HARDWARE_POLL_INTERVAL_SECS", "3"),
                ("CAIRN_TPM_TCTI", "swtpm:host=127.0.0.1,port=2321"),
                ("CAIRN_METRICS_LISTEN", "127.0.0.1:9999"),
                ("CAIRN_CONFIG", "/ignored/here"),
            ],
        ))
        .unwrap()
        .config;
        assert_eq!(c.hardware.poll_interval_secs, 3);
        assert_eq!(c.tpm.tcti, "swtpm:host=127.0.0.1,port=2321");
        assert_eq!(c.metrics.listen.port(), 9999);
    }

    fn file_error(text: &str) -> String {
        let d = dirs();
        std::fs::write(d.site.join("cairnd.toml"), text).unwrap();
        let err = load(&sources(&d, &[])).unwrap_err().to_string();
        assert!(
            err.contains("etc-cairn/cairnd.toml"),
            "error does not name the file: {err}"
        );
        assert!(err.contains("fix:"), "error gives no fix: {err}");
        err
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        let err = file_error("[fleet]\nurl = \"https://x:1\"\nurll = \"typo\"\n");
        assert!(
            err.contains("fleet.urll") || err.contains("`urll`"),
            "{err}"
        );
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_section_is_refused() {
        let err = file_error("[flet]\nurl = \"https://x:1\"\n");
        assert!(err.contains("flet"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = file_error("[hardware]\npoll_interval_secs = \"ten\"\n");
        assert!(err.contains("hardware.poll_interval_secs"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = file_error("[fleet]\nurl = \"unterminated\n");
        assert!(
            err.contains("not valid TOML") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused_after_merging() {
        for (text, key) in [
            ("[fleet]\nurl = \"http://plain:80\"\n", "fleet.url"),
            (
                "[hardware]\npoll_interval_secs = 0\n",
                "hardware.poll_interval_secs",
            ),
            ("[agent]\nlog_level = \"loud\"\n", "agent.log_level"),
            ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
            ("[tpm]\ntcti = \"carrier-pigeon\"\n", "tpm.tcti"),
            (
                "[telemetry]\nbudget_bytes = 1000000\n",
                "telemetry.budget_bytes",
            ),
            (
                "[telemetry]\nbatch_records = 0\n",
                "telemetry.batch_records",
            ),
            ("[update]\nwindow = \"25:00-03:00\"\n", "update.window"),
            ("[update]\nwindow = \"0100-0300\"\n", "update.window"),
            ("[update]\nwave = 10\n", "update.wave"),
            ("[page]\ninterfaces = [\"eth 0\"]\n", "page.interfaces"),
            ("[page]\nport = 0\n", "page.port"),
            ("[page]\nlisten = [\"nowhere\"]\n", "page.listen"),
            ("[update]\nboot_tries = 0\n", "update.boot_tries"),
            (
                "[update]\nrepository = \"http://x/\"\n",
                "update.repository",
            ),
            (
                "[update]\ncheck_interval_secs = 0\n",
                "update.check_interval_secs",
            ),
        ] {
            let d = dirs();
            std::fs::write(d.site.join("cairnd.toml"), text).unwrap();
            let err = load(&sources(&d, &[])).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave: {err}");
            assert!(err.contains("fix:"), "{err}");
        }
    }

    #[test]
    fn a_maintenance_window_may_wrap_midnight() {
        let at = |h: u64, m: u64| 86_400 * 20_000 + h * 3600 + m * 60;
        let w = Window::parse("01:00-04:30").unwrap().unwrap();
        assert!(w.contains(at(1, 0)) && w.contains(at(4, 29)));
        assert!(!w.contains(at(4, 30)) && !w.contains(at(0, 59)));
        let w = Window::parse("22:00-02:00").unwrap().unwrap();
        assert!(w.contains(at(23, 0)) && w.contains(at(1, 59)));
        assert!(!w.contains(at(2, 0)) && !w.contains(at(21, 59)));
        assert_eq!(Window::parse("").unwrap(), None);
        assert!(Window::parse("03:00-03:00").is_err());
    }

    #[test]
    fn bad_env_names_the_variable() {
        let d = dirs();
        for (var, value) in [
            ("CAIRN_FLEET_URLL", "https://x:1"),
            ("CAIRN_NOPE", "1"),
            ("CAIRN_HARDWARE_POLL_INTERVAL_SECS", "soon"),
        ] {
            let err = load(&sources(&d, &[(var, value)])).unwrap_err().to_string();
            assert!(err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn example_file_is_complete_and_loads() {
        let text = include_str!("../cairnd.toml.example");
        let d = dirs();
        std::fs::write(d.site.join("cairnd.toml"), text).unwrap();
        let loaded = load(&sources(&d, &[])).unwrap();
        // The example documents the defaults: loading it must change nothing.
        assert_eq!(loaded.config, Config::default());
        // Every key of the schema appears in the example.
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for (section, keys) in defaults.as_table().unwrap() {
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("\n{key} =")),
                    "example lacks {section}.{key}"
                );
            }
        }
    }
}
