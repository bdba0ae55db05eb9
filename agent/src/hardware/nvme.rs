//! NVMe drive health: the SMART / Health Information log (log page 02h, NVMe Base Specification 2.0
//! §5.16.1.3) of every NVMe controller, parsed with bounds checks and published as the series
//! smartctl_exporter (prometheus-community) publishes for the same drives, so existing dashboards and alert
//! rules work unchanged.
//!
//! The hardware edge is [`SmartSource`]. Its production implementation, [`DevSmart`], opens
//! `<root>/dev/<controller>` (`/dev/nvme0`, the controller's character device) and sends Get Log Page through
//! the kernel's NVMe admin passthrough ioctl, which needs root (CAP_SYS_ADMIN). When that path is a regular
//! file instead of a character device it is a *fixture NVMe log*: the 512 raw bytes of a log page, read as if
//! the drive had returned them. Fixture NVMe logs are this edge's fake; tests and the simulated site write
//! them with `cairn_sim::nvme_fixtures`.

use crate::hardware::sysfs::SysRoot;
use crate::telemetry::Sample;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Size of the SMART / Health Information log page.
pub const SMART_LOG_LEN: usize = 512;
/// Log identifier of the SMART / Health Information log page.
pub const SMART_LOG_ID: u8 = 0x02;

/// Bits of [`SmartLog::critical_warning`] (NVMe Base Specification 2.0, figure 207, byte 0).
pub mod warning {
    /// Available spare has fallen below the available spare threshold.
    pub const SPARE_BELOW_THRESHOLD: u8 = 1 << 0;
    /// A temperature is at or above an over-temperature threshold, or at or below an under-temperature one.
    pub const TEMPERATURE: u8 = 1 << 1;
    /// NVM subsystem reliability is degraded by media errors or an internal error.
    pub const RELIABILITY_DEGRADED: u8 = 1 << 2;
    /// All media have been placed in read-only mode.
    pub const READ_ONLY: u8 = 1 << 3;
    /// The volatile memory backup device has failed.
    pub const VOLATILE_BACKUP_FAILED: u8 = 1 << 4;
    /// The persistent memory region has become read-only or unreliable.
    pub const PMR_UNRELIABLE: u8 = 1 << 5;
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("an NVMe SMART / Health log is 512 bytes, this one is {size}: it is not log page 02h")]
    WrongSize { size: usize },
    #[error(
        "{name:?} is not an NVMe controller name: expected nvme followed by its number, e.g. nvme0"
    )]
    InvalidController { name: String },
    #[error("there is no NVMe controller device {path}: check that the nvme driver is loaded, or hardware.sys_root")]
    NoDevice { path: PathBuf },
    #[error("reading the SMART log from {path} needs root (CAP_SYS_ADMIN for NVMe admin commands): run cairnd as root")]
    PermissionDenied { path: PathBuf },
    #[error("cannot open the NVMe controller device {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither an NVMe controller character device nor a fixture NVMe log file: remove it, or check hardware.sys_root")]
    NotDevice { path: PathBuf },
    #[error("the NVMe Get Log Page ioctl (SMART / Health, 02h) on {path} failed: check the kernel log for this controller")]
    Ioctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} rejected Get Log Page (SMART / Health, 02h) with NVMe status {status:#06x}: the controller may be failing, check the kernel log and `nvme error-log`")]
    CommandStatus { path: PathBuf, status: i32 },
    #[error("fixture NVMe log {path} is {size} bytes, a SMART / Health log is 512: write it with cairn_sim::nvme_fixtures::write_dev")]
    FixtureSize { path: PathBuf, size: u64 },
    #[error("cannot read fixture NVMe log {path}")]
    FixtureRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NvmeError {
    /// The error as smartctl's exit status would report it: bit 1 (2) when the device could not be opened,
    /// bit 2 (4) when the log command failed or its data is not a valid log.
    pub fn smartctl_exit_status(&self) -> u8 {
        match self {
            NvmeError::InvalidController { .. }
            | NvmeError::NoDevice { .. }
            | NvmeError::PermissionDenied { .. }
            | NvmeError::Open { .. }
            | NvmeError::NotDevice { .. } => EXIT_OPEN_FAILED,
            NvmeError::WrongSize { .. }
            | NvmeError::Ioctl { .. }
            | NvmeError::CommandStatus { .. }
            | NvmeError::FixtureSize { .. }
            | NvmeError::FixtureRead { .. } => EXIT_COMMAND_FAILED,
        }
    }
}

/// smartctl exit status bit 1: the device could not be opened.
const EXIT_OPEN_FAILED: u8 = 1 << 1;
/// smartctl exit status bit 2: a SMART command to the device failed, or its data had a checksum error.
const EXIT_COMMAND_FAILED: u8 = 1 << 2;

/// The SMART / Health Information log of one controller (NVMe Base Specification 2.0, figure 207). Counters
/// are the log's 128-bit little-endian values as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartLog {
    /// Byte 0: bit field, see [`warning`].
    pub critical_warning: u8,
    /// Bytes 2:1: composite temperature, kelvin.
    pub temperature_k: u16,
    /// Byte 3: remaining spare capacity, normalised percent (0 to 100).
    pub available_spare: u8,
    /// Byte 4: spare percentage below which critical warning bit 0 is raised.
    pub available_spare_threshold: u8,
    /// Byte 5: vendor estimate of life used, percent; may exceed 100 (up to 255).
    pub percentage_used: u8,
    /// Byte 6: critical warnings summarised over the endurance groups.
    pub endurance_group_critical_warning: u8,
    /// Bytes 47:32: thousands of 512-byte units read (rounded up); 0 means not reported.
    pub data_units_read: u128,
    /// Bytes 63:48: thousands of 512-byte units written (rounded up); 0 means not reported.
    pub data_units_written: u128,
    /// Bytes 79:64.
    pub host_read_commands: u128,
    /// Bytes 95:80.
    pub host_write_commands: u128,
    /// Bytes 111:96: minutes the controller was busy with I/O.
    pub controller_busy_time: u128,
    /// Bytes 127:112.
    pub power_cycles: u128,
    /// Bytes 143:128: whole hours; vendors may exclude non-operational power states.
    pub power_on_hours: u128,
    /// Bytes 159:144.
    pub unsafe_shutdowns: u128,
    /// Bytes 175:160: unrecovered data integrity errors.
    pub media_errors: u128,
    /// Bytes 191:176: Error Information log entries over the controller's life.
    pub num_err_log_entries: u128,
    /// Bytes 195:192: minutes at or above the warning composite temperature threshold.
    pub warning_temp_time: u32,
    /// Bytes 199:196: minutes at or above the critical composite temperature threshold.
    pub critical_comp_time: u32,
    /// Bytes 215:200: temperature sensors 1 to 8 in kelvin, the implemented ones (non-zero) in order.
    pub temperature_sensors: Vec<u16>,
}

impl SmartLog {
    /// The composite temperature in whole degrees Celsius as smartctl and nvme-cli report it (kelvin − 273),
    /// or `None` when the drive reports 0 K (no reading).
    pub fn temperature_celsius(&self) -> Option<i32> {
        (self.temperature_k != 0).then(|| i32::from(self.temperature_k) - 273)
    }
}

// Byte offsets in the log page (NVMe Base Specification 2.0, figure 207).
const OFF_CRITICAL_WARNING: usize = 0;
const OFF_TEMPERATURE: usize = 1;
const OFF_AVAILABLE_SPARE: usize = 3;
const OFF_SPARE_THRESHOLD: usize = 4;
const OFF_PERCENTAGE_USED: usize = 5;
const OFF_ENDURANCE_GROUP_WARNING: usize = 6;
const OFF_DATA_UNITS_READ: usize = 32;
const OFF_DATA_UNITS_WRITTEN: usize = 48;
const OFF_HOST_READ_COMMANDS: usize = 64;
const OFF_HOST_WRITE_COMMANDS: usize = 80;
const OFF_CONTROLLER_BUSY_TIME: usize = 96;
const OFF_POWER_CYCLES: usize = 112;
const OFF_POWER_ON_HOURS: usize = 128;
const OFF_UNSAFE_SHUTDOWNS: usize = 144;
const OFF_MEDIA_ERRORS: usize = 160;
const OFF_ERR_LOG_ENTRIES: usize = 176;
const OFF_WARNING_TEMP_TIME: usize = 192;
const OFF_CRITICAL_COMP_TIME: usize = 196;
const OFF_TEMPERATURE_SENSORS: usize = 200;
const TEMPERATURE_SENSORS: usize = 8;

/// `N` bytes of the log at `offset`, or a size error when the log is too short for them.
fn field<const N: usize>(log: &[u8], offset: usize) -> Result<[u8; N], NvmeError> {
    log.get(offset..)
        .and_then(|rest| rest.first_chunk::<N>())
        .copied()
        .ok_or(NvmeError::WrongSize { size: log.len() })
}

fn byte(log: &[u8], offset: usize) -> Result<u8, NvmeError> {
    field::<1>(log, offset).map(|[b]| b)
}

fn le_u16(log: &[u8], offset: usize) -> Result<u16, NvmeError> {
    field(log, offset).map(u16::from_le_bytes)
}

fn le_u32(log: &[u8], offset: usize) -> Result<u32, NvmeError> {
    field(log, offset).map(u32::from_le_bytes)
}

fn le_u128(log: &[u8], offset: usize) -> Result<u128, NvmeError> {
    field(log, offset).map(u128::from_le_bytes)
}

/// Parses a SMART / Health Information log page. It must be exactly [`SMART_LOG_LEN`] bytes. Every value is
/// taken as the drive reports it (an all-0xff page parses to maximal values); judging them is the health
/// model's job.
pub fn parse_smart_log(bytes: &[u8]) -> Result<SmartLog, NvmeError> {
    if bytes.len() != SMART_LOG_LEN {
        return Err(NvmeError::WrongSize { size: bytes.len() });
    }
    let mut temperature_sensors = Vec::with_capacity(TEMPERATURE_SENSORS);
    for i in 0..TEMPERATURE_SENSORS {
        let kelvin = le_u16(bytes, OFF_TEMPERATURE_SENSORS + 2 * i)?;
        if kelvin != 0 {
            temperature_sensors.push(kelvin);
        }
    }
    Ok(SmartLog {
        critical_warning: byte(bytes, OFF_CRITICAL_WARNING)?,
        temperature_k: le_u16(bytes, OFF_TEMPERATURE)?,
        available_spare: byte(bytes, OFF_AVAILABLE_SPARE)?,
        available_spare_threshold: byte(bytes, OFF_SPARE_THRESHOLD)?,
        percentage_used: byte(bytes, OFF_PERCENTAGE_USED)?,
        endurance_group_critical_warning: byte(bytes, OFF_ENDURANCE_GROUP_WARNING)?,
        data_units_read: le_u128(bytes, OFF_DATA_UNITS_READ)?,
        data_units_written: le_u128(bytes, OFF_DATA_UNITS_WRITTEN)?,
        host_read_commands: le_u128(bytes, OFF_HOST_READ_COMMANDS)?,
        host_write_commands: le_u128(bytes, OFF_HOST_WRITE_COMMANDS)?,
        controller_busy_time: le_u128(bytes, OFF_CONTROLLER_BUSY_TIME)?,
        power_cycles: le_u128(bytes, OFF_POWER_CYCLES)?,
        power_on_hours: le_u128(bytes, OFF_POWER_ON_HOURS)?,
        unsafe_shutdowns: le_u128(bytes, OFF_UNSAFE_SHUTDOWNS)?,
        media_errors: le_u128(bytes, OFF_MEDIA_ERRORS)?,
        num_err_log_entries: le_u128(bytes, OFF_ERR_LOG_ENTRIES)?,
        warning_temp_time: le_u32(bytes, OFF_WARNING_TEMP_TIME)?,
        critical_comp_time: le_u32(bytes, OFF_CRITICAL_COMP_TIME)?,
        temperature_sensors,
    })
}

/// The one question the agent asks an NVMe controller, so tests and the simulated site can answer it
/// without hardware.
pub trait SmartSource: Send {
    /// The raw SMART / Health Information log page of `controller` (`nvme0`).
    fn read(&mut self, controller: &str) -> Result<[u8; SMART_LOG_LEN], NvmeError>;
}

/// SMART logs from `<dev_root>/dev/<controller>`. `dev_root` is the same root as `hardware.sys_root`: `/` on
/// a device. A character device there is asked with the admin passthrough ioctl (blocking: up to the
/// driver's admin timeout for a drive that does not answer, so call it off the async runtime); a regular file
/// is a fixture NVMe log.
#[derive(Debug, Clone)]
pub struct DevSmart {
    pub dev_root: PathBuf,
}

impl DevSmart {
    pub fn new(dev_root: PathBuf) -> Self {
        DevSmart { dev_root }
    }
}

/// `nvme` followed by one or more digits: a controller, never a namespace (`nvme0n1`) or a path.
fn is_controller_name(name: &str) -> bool {
    name.strip_prefix("nvme")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl SmartSource for DevSmart {
    fn read(&mut self, controller: &str) -> Result<[u8; SMART_LOG_LEN], NvmeError> {
        if !is_controller_name(controller) {
            return Err(NvmeError::InvalidController {
                name: controller.to_owned(),
            });
        }
        let path = self.dev_root.join("dev").join(controller);
        // O_NONBLOCK so that a FIFO left at the path cannot hang the collector in open(2); the NVMe driver
        // ignores the flag and regular files are unaffected by it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => NvmeError::NoDevice { path: path.clone() },
                std::io::ErrorKind::PermissionDenied => {
                    NvmeError::PermissionDenied { path: path.clone() }
                }
                _ => NvmeError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        // The type of what was opened (fstat), not of what the path named a moment earlier.
        let meta = file.metadata().map_err(|source| NvmeError::Open {
            path: path.clone(),
            source,
        })?;
        let kind = meta.file_type();
        if kind.is_char_device() {
            admin_get_smart_log(&file, &path)
        } else if kind.is_file() {
            read_fixture(file, meta.len(), &path)
        } else {
            Err(NvmeError::NotDevice { path })
        }
    }
}

/// A fixture NVMe log: exactly 512 bytes, read whole.
fn read_fixture(mut file: File, size: u64, path: &Path) -> Result<[u8; SMART_LOG_LEN], NvmeError> {
    if size != SMART_LOG_LEN as u64 {
        return Err(NvmeError::FixtureSize {
            path: path.to_owned(),
            size,
        });
    }
    let mut log = [0u8; SMART_LOG_LEN];
    file.read_exact(&mut log)
        .map_err(|source| NvmeError::FixtureRead {
            path: path.to_owned(),
            source,
        })?;
    Ok(log)
}

/// `struct nvme_admin_cmd` (an alias of `struct nvme_passthru_cmd`) from linux/nvme_ioctl.h.
#[repr(C)]
#[derive(Debug, Default)]
struct NvmeAdminCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<NvmeAdminCmd>() == 72);

/// `NVME_IOCTL_ADMIN_CMD`: `_IOWR('N', 0x41, struct nvme_admin_cmd)`, encoded for the target architecture.
const NVME_IOCTL_ADMIN_CMD: libc::Ioctl = libc::_IOWR::<NvmeAdminCmd>(b'N' as u32, 0x41);

/// Admin opcode Get Log Page.
const OPCODE_GET_LOG_PAGE: u8 = 0x02;
/// The controller-wide (all namespaces) SMART log.
const NSID_ALL: u32 = 0xffff_ffff;
/// Number of dwords to transfer, zero-based; its lower 16 bits go to CDW10 bits 31:16 (NUMDL), the upper
/// ones (0 here) to CDW11 (NUMDU).
const NUMD: u32 = (SMART_LOG_LEN / 4 - 1) as u32;

/// The data buffer, dword aligned as the NVMe data pointer requires (the kernel would otherwise bounce it).
#[repr(C, align(8))]
struct LogBuffer([u8; SMART_LOG_LEN]);

/// Get Log Page, log 02h, all namespaces, through the admin passthrough ioctl. Retain Asynchronous Event is
/// left clear, as smartctl does: reading the log acknowledges a pending SMART / Health event so the drive can
/// raise the next one. The timeout is the driver's admin default: a shorter one would make the kernel reset
/// a controller that is merely slow.
fn admin_get_smart_log(file: &File, path: &Path) -> Result<[u8; SMART_LOG_LEN], NvmeError> {
    let mut buf = LogBuffer([0u8; SMART_LOG_LEN]);
    let mut cmd = NvmeAdminCmd {
        opcode: OPCODE_GET_LOG_PAGE,
        nsid: NSID_ALL,
        addr: buf.0.as_mut_ptr() as usize as u64,
        data_len: SMART_LOG_LEN as u32,
        cdw10: ((NUMD & 0xffff) << 16) | u32::from(SMART_LOG_ID),
        cdw11: NUMD >> 16,
        ..NvmeAdminCmd::default()
    };
    // SAFETY: `file` is open for the duration of the call, so its descriptor is valid. NVME_IOCTL_ADMIN_CMD
    // takes a pointer to a `struct nvme_admin_cmd`; `cmd` has that exact layout (repr(C), 72 bytes, checked
    // above) and lives across the call. The kernel writes at most `data_len` = 512 bytes to `addr`, which
    // points to `buf`, a live, exclusively borrowed 512-byte buffer that outlives the call; it writes nothing
    // else of ours except `cmd.result`.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            NVME_IOCTL_ADMIN_CMD,
            std::ptr::addr_of_mut!(cmd),
        )
    };
    if rc < 0 {
        let source = std::io::Error::last_os_error();
        return Err(match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => NvmeError::PermissionDenied {
                path: path.to_owned(),
            },
            _ => NvmeError::Ioctl {
                path: path.to_owned(),
                source,
            },
        });
    }
    if rc > 0 {
        return Err(NvmeError::CommandStatus {
            path: path.to_owned(),
            status: rc,
        });
    }
    Ok(buf.0)
}

/// One NVMe controller: its identity from sysfs and its SMART log or why it could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct NvmeDrive {
    /// The controller, `nvme0`.
    pub name: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    /// The parsed log, or the reason it is missing as one line (error and causes).
    pub smart: Result<SmartLog, String>,
    /// How smartctl's exit status would describe reading this drive: 0 read, 2 (bit 1) the device could not
    /// be opened, 4 (bit 2) the log command failed or returned something that is not a log.
    pub smartctl_exit_status: u8,
}

/// Every NVMe controller under `<sys>/sys/class/nvme` (`sys` is `hardware.sys_root`), in controller-number
/// order, with its SMART log from `source`. No NVMe class directory means no drives. sysfs attributes that
/// cannot be read are empty strings.
pub fn read_all(sys: &Path, source: &mut dyn SmartSource) -> Vec<NvmeDrive> {
    let class = sys.join("sys/class/nvme");
    let mut controllers: Vec<(u64, String)> = std::fs::read_dir(&class)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| is_controller_name(n))
                .filter_map(|n| Some((n.get(4..)?.parse().ok()?, n)))
                .collect()
        })
        .unwrap_or_default();
    controllers.sort();
    let attrs = SysRoot::new(sys.to_owned());
    controllers
        .into_iter()
        .map(|(_, name)| {
            let dir = class.join(&name);
            let attr = |a: &str| attrs.attr(&dir.join(a)).unwrap_or_default();
            let (smart, smartctl_exit_status) =
                match source.read(&name).and_then(|log| parse_smart_log(&log)) {
                    Ok(log) => (Ok(log), 0),
                    Err(e) => (Err(crate::error_chain(&e)), e.smartctl_exit_status()),
                };
            NvmeDrive {
                model: attr("model"),
                serial: attr("serial"),
                firmware: attr("firmware_rev"),
                name,
                smart,
                smartctl_exit_status,
            }
        })
        .collect()
}

const HELP_DEVICE: &str =
    "NVMe controller identity, labelled as smartctl_exporter labels it; always 1";
const HELP_EXIT_STATUS: &str = "How smartctl's exit status would describe reading the SMART log: 0 read, 2 device could not be opened, 4 log command failed or returned no valid log";
const HELP_CRITICAL_WARNING: &str = "NVMe critical warning bits: 0 spare below threshold, 1 temperature, 2 reliability degraded, 3 read-only, 4 volatile memory backup failed, 5 persistent memory region unreliable";
const HELP_PERCENTAGE_USED: &str =
    "Vendor estimate of the drive's life used, percent; may exceed 100";
const HELP_AVAILABLE_SPARE: &str = "Remaining spare capacity, normalised percent (0 to 100)";
const HELP_SPARE_THRESHOLD: &str =
    "Available spare percentage below which the drive raises critical warning bit 0";
const HELP_MEDIA_ERRORS: &str =
    "Unrecovered data integrity errors (uncorrectable ECC, CRC, LBA tag mismatch) over the drive's life";
const HELP_ERR_LOG_ENTRIES: &str = "Error Information log entries over the controller's life";
const HELP_TEMPERATURE: &str =
    "Drive temperature in degrees Celsius; current is the composite temperature";
const HELP_POWER_ON: &str =
    "Time the drive has been powered on, in seconds (the drive counts whole hours)";
const HELP_POWER_CYCLES: &str = "Power cycles over the drive's life";
const HELP_BYTES_READ: &str =
    "Bytes the host has read, from the drive's data units of 1000 x 512 bytes (rounded up by the drive)";
const HELP_BYTES_WRITTEN: &str = "Bytes the host has written, from the drive's data units of 1000 x 512 bytes (rounded up by the drive)";

/// Bytes in one NVMe data unit: a thousand 512-byte units.
const DATA_UNIT_BYTES: f64 = 512_000.0;

/// The drives as smartctl_exporter publishes them (names, label sets and metric types as it has them, its
/// quirks included: critical warning, percentage used and the spare values are counters there, so they are
/// here). Every drive has its `smartctl_device` info series and `smartctl_device_smartctl_exit_status`; the
/// health series exist only for drives whose log was read. Samples are grouped by name, drives in order.
pub fn samples(drives: &[NvmeDrive]) -> Vec<Sample> {
    let dev = |d: &NvmeDrive| vec![("device", d.name.clone())];
    let read: Vec<(&NvmeDrive, &SmartLog)> = drives
        .iter()
        .filter_map(|d| d.smart.as_ref().ok().map(|s| (d, s)))
        .collect();
    let mut out = Vec::with_capacity(drives.len() * 2 + read.len() * 11);

    for d in drives {
        out.push(Sample::gauge(
            "smartctl_device",
            HELP_DEVICE,
            info_labels(d),
            1.0,
        ));
    }
    for d in drives {
        out.push(Sample::gauge(
            "smartctl_device_smartctl_exit_status",
            HELP_EXIT_STATUS,
            dev(d),
            f64::from(d.smartctl_exit_status),
        ));
    }

    type Field = fn(&SmartLog) -> f64;
    let counters: [(&'static str, &'static str, Field); 8] = [
        (
            "smartctl_device_critical_warning",
            HELP_CRITICAL_WARNING,
            |s| f64::from(s.critical_warning),
        ),
        (
            "smartctl_device_percentage_used",
            HELP_PERCENTAGE_USED,
            |s| f64::from(s.percentage_used),
        ),
        (
            "smartctl_device_available_spare",
            HELP_AVAILABLE_SPARE,
            |s| f64::from(s.available_spare),
        ),
        (
            "smartctl_device_available_spare_threshold",
            HELP_SPARE_THRESHOLD,
            |s| f64::from(s.available_spare_threshold),
        ),
        ("smartctl_device_media_errors", HELP_MEDIA_ERRORS, |s| {
            s.media_errors as f64
        }),
        (
            "smartctl_device_num_err_log_entries",
            HELP_ERR_LOG_ENTRIES,
            |s| s.num_err_log_entries as f64,
        ),
        ("smartctl_device_power_on_seconds", HELP_POWER_ON, |s| {
            s.power_on_hours as f64 * 3600.0
        }),
        (
            "smartctl_device_power_cycle_count",
            HELP_POWER_CYCLES,
            |s| s.power_cycles as f64,
        ),
    ];
    for (name, help, value) in counters {
        for (d, s) in &read {
            out.push(Sample::counter(name, help, dev(d), value(s)));
        }
    }

    for (d, s) in &read {
        if let Some(celsius) = s.temperature_celsius() {
            let mut labels = dev(d);
            labels.push(("temperature_type", "current".to_owned()));
            out.push(Sample::gauge(
                "smartctl_device_temperature",
                HELP_TEMPERATURE,
                labels,
                f64::from(celsius),
            ));
        }
    }

    // A data unit count of 0 means the drive does not report it: no series rather than a false 0.
    type Units = fn(&SmartLog) -> u128;
    let bytes: [(&'static str, &'static str, Units); 2] = [
        ("smartctl_device_bytes_read", HELP_BYTES_READ, |s| {
            s.data_units_read
        }),
        ("smartctl_device_bytes_written", HELP_BYTES_WRITTEN, |s| {
            s.data_units_written
        }),
    ];
    for (name, help, units) in bytes {
        for (d, s) in &read {
            let units = units(s);
            if units != 0 {
                out.push(Sample::counter(
                    name,
                    help,
                    dev(d),
                    units as f64 * DATA_UNIT_BYTES,
                ));
            }
        }
    }
    out
}

/// The `smartctl_device` labels smartctl_exporter sets for an NVMe drive. Those it leaves empty for NVMe
/// (ATA, SATA, SCSI versions, form factor) are left out, which Prometheus treats the same.
fn info_labels(d: &NvmeDrive) -> Vec<(&'static str, String)> {
    let or_unknown = |s: &str| {
        if s.is_empty() {
            "unknown".to_owned()
        } else {
            s.to_owned()
        }
    };
    vec![
        ("device", d.name.clone()),
        ("interface", "nvme".to_owned()),
        ("protocol", "NVMe".to_owned()),
        ("model_family", "unknown".to_owned()),
        ("model_name", or_unknown(&d.model)),
        ("serial_number", d.serial.clone()),
        ("ata_additional_product_id", "unknown".to_owned()),
        ("firmware_version", d.firmware.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::MetricKind;

    /// A log with a distinct value in every field, written by hand at the specification's offsets.
    fn distinct_log() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0] = 0x15;
        b[1..3].copy_from_slice(&0x0134u16.to_le_bytes());
        b[3] = 97;
        b[4] = 11;
        b[5] = 23;
        b[6] = 0x04;
        // Bytes 7..32 are reserved; fill them so a parser reading the wrong place would notice.
        b[7..32].fill(0xee);
        for (i, off) in (32..192).step_by(16).enumerate() {
            let v =
                0x0101_0101_0101_0101_0000_0000_0000_0000u128 * (i as u128 + 1) + 1000 + i as u128;
            b[off..off + 16].copy_from_slice(&v.to_le_bytes());
        }
        b[192..196].copy_from_slice(&0x0a0b_0c0du32.to_le_bytes());
        b[196..200].copy_from_slice(&0x1a1b_1c1du32.to_le_bytes());
        let sensors: [u16; 8] = [301, 0, 303, 304, 0, 0, 307, 0];
        for (i, k) in sensors.iter().enumerate() {
            b[200 + 2 * i..202 + 2 * i].copy_from_slice(&k.to_le_bytes());
        }
        b[216..512].fill(0xdd);
        b
    }

    fn counter_value(i: u128) -> u128 {
        0x0101_0101_0101_0101_0000_0000_0000_0000u128 * (i + 1) + 1000 + i
    }

    #[test]
    fn parses_every_field_at_its_offset() {
        let log = parse_smart_log(&distinct_log()).unwrap();
        assert_eq!(
            log,
            SmartLog {
                critical_warning: 0x15,
                temperature_k: 0x0134,
                available_spare: 97,
                available_spare_threshold: 11,
                percentage_used: 23,
                endurance_group_critical_warning: 0x04,
                data_units_read: counter_value(0),
                data_units_written: counter_value(1),
                host_read_commands: counter_value(2),
                host_write_commands: counter_value(3),
                controller_busy_time: counter_value(4),
                power_cycles: counter_value(5),
                power_on_hours: counter_value(6),
                unsafe_shutdowns: counter_value(7),
                media_errors: counter_value(8),
                num_err_log_entries: counter_value(9),
                warning_temp_time: 0x0a0b_0c0d,
                critical_comp_time: 0x1a1b_1c1d,
                temperature_sensors: vec![301, 303, 304, 307],
            }
        );
        assert_eq!(log.temperature_celsius(), Some(0x0134 - 273));
    }

    #[test]
    fn counters_use_all_128_bits_little_endian() {
        let mut b = [0u8; 512];
        // Only the most significant byte of Media Errors set: 2^120.
        b[175] = 1;
        // Power On Hours straddling the 64-bit boundary.
        b[128..144].copy_from_slice(&((1u128 << 64) + 5).to_le_bytes());
        let log = parse_smart_log(&b).unwrap();
        assert_eq!(log.media_errors, 1u128 << 120);
        assert_eq!(log.power_on_hours, (1u128 << 64) + 5);
        assert_eq!(log.num_err_log_entries, 0);
        assert_eq!(log.unsafe_shutdowns, 0);
    }

    #[test]
    fn refuses_any_size_but_512_and_names_it() {
        for size in [0usize, 1, 511, 513, 4096] {
            let err = parse_smart_log(&vec![0u8; size]).unwrap_err();
            assert!(matches!(err, NvmeError::WrongSize { size: s } if s == size));
            assert!(
                err.to_string().contains(&format!("this one is {size}")),
                "{err}"
            );
        }
    }

    #[test]
    fn all_ones_parses_to_maximal_values_and_finite_samples() {
        let log = parse_smart_log(&[0xff; 512]).unwrap();
        assert_eq!(log.critical_warning, 0xff);
        assert_eq!(log.temperature_k, u16::MAX);
        assert_eq!(log.percentage_used, 255);
        assert_eq!(log.data_units_written, u128::MAX);
        assert_eq!(log.media_errors, u128::MAX);
        assert_eq!(log.critical_comp_time, u32::MAX);
        assert_eq!(log.temperature_sensors, vec![u16::MAX; 8]);
        let drive = NvmeDrive {
            name: "nvme0".into(),
            model: String::new(),
            serial: String::new(),
            firmware: String::new(),
            smart: Ok(log),
            smartctl_exit_status: 0,
        };
        let s = samples(&[drive]);
        assert!(s.iter().all(|s| s.value.is_finite()), "{s:?}");
        assert_eq!(value(&s, "smartctl_device_temperature"), 65535.0 - 273.0);
    }

    #[test]
    fn zero_kelvin_and_zero_data_units_are_not_reported() {
        let log = parse_smart_log(&[0u8; 512]).unwrap();
        assert_eq!(log.temperature_celsius(), None);
        assert!(log.temperature_sensors.is_empty());
        let s = samples(&[drive("nvme0", Ok(log), 0)]);
        for absent in [
            "smartctl_device_temperature",
            "smartctl_device_bytes_read",
            "smartctl_device_bytes_written",
        ] {
            assert!(s.iter().all(|x| x.name != absent), "{absent} present");
        }
        assert_eq!(value(&s, "smartctl_device_media_errors"), 0.0);
    }

    fn drive(name: &str, smart: Result<SmartLog, String>, exit: u8) -> NvmeDrive {
        NvmeDrive {
            name: name.into(),
            model: "SAMSUNG MZQL23T8HCLS-00A07".into(),
            serial: "S64HNE0T000001".into(),
            firmware: "GDC5602Q".into(),
            smart,
            smartctl_exit_status: exit,
        }
    }

    fn value(samples: &[Sample], name: &str) -> f64 {
        let found: Vec<&Sample> = samples.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0].value
    }

    /// Hand-built "worn" log: 95 % used, spare 12 % over a 10 % threshold, 38 °C.
    fn worn() -> SmartLog {
        let mut b = [0u8; 512];
        b[1..3].copy_from_slice(&311u16.to_le_bytes());
        b[3] = 12;
        b[4] = 10;
        b[5] = 95;
        b[32..48].copy_from_slice(&9_000_000u128.to_le_bytes());
        b[48..64].copy_from_slice(&61_000_000u128.to_le_bytes());
        b[112..128].copy_from_slice(&210u128.to_le_bytes());
        b[128..144].copy_from_slice(&43_800u128.to_le_bytes());
        parse_smart_log(&b).unwrap()
    }

    /// Hand-built "failing" log: spare below threshold and reliability degraded, 37 media errors, 71 °C.
    fn failing() -> SmartLog {
        let mut b = [0u8; 512];
        b[0] = warning::SPARE_BELOW_THRESHOLD | warning::RELIABILITY_DEGRADED;
        b[1..3].copy_from_slice(&344u16.to_le_bytes());
        b[3] = 5;
        b[4] = 10;
        b[5] = 60;
        b[160..176].copy_from_slice(&37u128.to_le_bytes());
        b[176..192].copy_from_slice(&112u128.to_le_bytes());
        parse_smart_log(&b).unwrap()
    }

    #[test]
    fn samples_have_smartctl_exporter_names_labels_and_types() {
        let drives = [
            drive("nvme0", Ok(worn()), 0),
            drive("nvme1", Ok(failing()), 0),
        ];
        let s = samples(&drives);
        let of = |name: &str, dev: &str| -> &Sample {
            s.iter()
                .find(|x| x.name == name && x.labels[0] == ("device", dev.to_owned()))
                .unwrap_or_else(|| panic!("{name}{{device={dev}}} missing"))
        };

        let info = of("smartctl_device", "nvme0");
        assert_eq!(info.kind, MetricKind::Gauge);
        assert_eq!(info.value, 1.0);
        let labels: Vec<(&str, &str)> = info.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            labels,
            [
                ("device", "nvme0"),
                ("interface", "nvme"),
                ("protocol", "NVMe"),
                ("model_family", "unknown"),
                ("model_name", "SAMSUNG MZQL23T8HCLS-00A07"),
                ("serial_number", "S64HNE0T000001"),
                ("ata_additional_product_id", "unknown"),
                ("firmware_version", "GDC5602Q"),
            ]
        );

        let expect = [
            (
                "smartctl_device_smartctl_exit_status",
                MetricKind::Gauge,
                0.0,
                0.0,
            ),
            (
                "smartctl_device_critical_warning",
                MetricKind::Counter,
                0.0,
                5.0,
            ),
            (
                "smartctl_device_percentage_used",
                MetricKind::Counter,
                95.0,
                60.0,
            ),
            (
                "smartctl_device_available_spare",
                MetricKind::Counter,
                12.0,
                5.0,
            ),
            (
                "smartctl_device_available_spare_threshold",
                MetricKind::Counter,
                10.0,
                10.0,
            ),
            (
                "smartctl_device_media_errors",
                MetricKind::Counter,
                0.0,
                37.0,
            ),
            (
                "smartctl_device_num_err_log_entries",
                MetricKind::Counter,
                0.0,
                112.0,
            ),
            (
                "smartctl_device_power_on_seconds",
                MetricKind::Counter,
                43_800.0 * 3600.0,
                0.0,
            ),
            (
                "smartctl_device_power_cycle_count",
                MetricKind::Counter,
                210.0,
                0.0,
            ),
            ("smartctl_device_temperature", MetricKind::Gauge, 38.0, 71.0),
        ];
        for (name, kind, worn_value, failing_value) in expect {
            for (dev, want) in [("nvme0", worn_value), ("nvme1", failing_value)] {
                let x = of(name, dev);
                assert_eq!(x.kind, kind, "{name}");
                assert_eq!(x.value, want, "{name}{{device={dev}}}");
                let keys: Vec<&str> = x.labels.iter().map(|(k, _)| *k).collect();
                if name == "smartctl_device_temperature" {
                    assert_eq!(keys, ["device", "temperature_type"]);
                    assert_eq!(x.labels[1].1, "current");
                } else {
                    assert_eq!(keys, ["device"], "{name}");
                }
            }
        }
        let read = of("smartctl_device_bytes_read", "nvme0");
        assert_eq!(read.kind, MetricKind::Counter);
        assert_eq!(read.value, 9_000_000.0 * 512_000.0);
        assert_eq!(
            of("smartctl_device_bytes_written", "nvme0").value,
            61_000_000.0 * 512_000.0
        );
        assert!(
            !s.iter()
                .any(|x| x.name.starts_with("smartctl_device_bytes") && x.labels[0].1 == "nvme1"),
            "the failing log reports no data units"
        );
    }

    #[test]
    fn samples_are_grouped_by_name() {
        let drives = [
            drive("nvme0", Ok(worn()), 0),
            drive("nvme1", Ok(failing()), 0),
            drive("nvme2", Err("cannot open".into()), 2),
        ];
        let s = samples(&drives);
        let mut seen: Vec<&str> = Vec::new();
        for x in &s {
            if seen.last() != Some(&x.name) {
                assert!(!seen.contains(&x.name), "{} split", x.name);
                seen.push(x.name);
            }
        }
    }

    #[test]
    fn an_unread_drive_has_only_its_identity_and_exit_status() {
        let mut d = drive("nvme3", Err("no device".into()), EXIT_OPEN_FAILED);
        d.model = String::new();
        let s = samples(&[d]);
        let names: Vec<&str> = s.iter().map(|x| x.name).collect();
        assert_eq!(
            names,
            ["smartctl_device", "smartctl_device_smartctl_exit_status"]
        );
        assert_eq!(s[1].value, 2.0);
        assert!(s[0].labels.contains(&("model_name", "unknown".to_owned())));
    }

    #[test]
    fn dev_smart_reads_a_fixture_log_and_refuses_a_short_one() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("dev")).unwrap();
        std::fs::write(tmp.path().join("dev/nvme0"), distinct_log()).unwrap();
        std::fs::write(tmp.path().join("dev/nvme1"), [0u8; 100]).unwrap();
        let mut src = DevSmart::new(tmp.path().to_owned());

        assert_eq!(src.read("nvme0").unwrap(), distinct_log());

        let err = src.read("nvme1").unwrap_err();
        assert!(
            matches!(err, NvmeError::FixtureSize { size: 100, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("dev/nvme1") && msg.contains("100 bytes"),
            "{msg}"
        );
        assert_eq!(err.smartctl_exit_status(), EXIT_COMMAND_FAILED);

        let err = src.read("nvme7").unwrap_err();
        assert!(matches!(err, NvmeError::NoDevice { .. }), "{err:?}");
        assert!(err.to_string().contains("dev/nvme7"), "{err}");
        assert_eq!(err.smartctl_exit_status(), EXIT_OPEN_FAILED);
    }

    #[test]
    fn dev_smart_refuses_names_that_are_not_controllers() {
        let mut src = DevSmart::new("/nonexistent".into());
        for name in [
            "",
            "nvme",
            "nvme0n1",
            "../etc/passwd",
            "nvme0/../../x",
            "sda",
        ] {
            let err = src.read(name).unwrap_err();
            assert!(
                matches!(err, NvmeError::InvalidController { .. }),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn dev_smart_refuses_a_directory_and_a_fifo_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("dev/nvme0")).unwrap();
        let fifo = tmp.path().join("dev/nvme1");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut src = DevSmart::new(tmp.path().to_owned());
        for name in ["nvme0", "nvme1"] {
            let err = src.read(name).unwrap_err();
            assert!(
                matches!(err, NvmeError::NotDevice { .. }),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn a_character_device_gets_the_ioctl_and_its_refusal_is_named() {
        // /dev/null is a character device that knows no NVMe ioctl: the admin command path runs and fails
        // with ENOTTY, as it would on a driver without passthrough.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("dev")).unwrap();
        std::os::unix::fs::symlink("/dev/null", tmp.path().join("dev/nvme0")).unwrap();
        let err = DevSmart::new(tmp.path().to_owned())
            .read("nvme0")
            .unwrap_err();
        match &err {
            NvmeError::Ioctl { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOTTY), "{err:?}")
            }
            other => panic!("expected the ioctl to be refused, got {other:?}"),
        }
        assert!(err.to_string().contains("dev/nvme0"), "{err}");
        assert_eq!(err.smartctl_exit_status(), EXIT_COMMAND_FAILED);
    }

    #[test]
    fn ioctl_request_and_command_match_the_kernel_header() {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xC048_4E41_u32 as libc::Ioctl);
        assert_eq!(NUMD, 127);
        assert_eq!(
            ((NUMD & 0xffff) << 16) | u32::from(SMART_LOG_ID),
            0x007f_0002
        );
    }

    struct Fixed(Vec<(&'static str, Result<[u8; 512], ()>)>);
    impl SmartSource for Fixed {
        fn read(&mut self, controller: &str) -> Result<[u8; 512], NvmeError> {
            match self.0.iter().find(|(n, _)| *n == controller) {
                Some((_, Ok(b))) => Ok(*b),
                _ => Err(NvmeError::PermissionDenied {
                    path: PathBuf::from("/dev").join(controller),
                }),
            }
        }
    }

    #[test]
    fn read_all_enumerates_controllers_in_number_order() {
        let tmp = tempfile::tempdir().unwrap();
        let class = tmp.path().join("sys/class/nvme");
        for n in ["nvme10", "nvme2", "nvme0"] {
            std::fs::create_dir_all(class.join(n)).unwrap();
            std::fs::write(class.join(n).join("model"), format!("Model {n}   \n")).unwrap();
            std::fs::write(class.join(n).join("firmware_rev"), "FW1\n").unwrap();
        }
        // Not controllers: a namespace-like name and a subsystem.
        std::fs::create_dir_all(class.join("nvme0n1")).unwrap();
        std::fs::create_dir_all(class.join("nvme-subsys0")).unwrap();
        let mut src = Fixed(vec![
            ("nvme0", Ok(distinct_log())),
            ("nvme10", Ok([0; 512])),
        ]);
        let drives = read_all(tmp.path(), &mut src);
        let names: Vec<&str> = drives.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0", "nvme2", "nvme10"]);
        assert_eq!(drives[0].model, "Model nvme0");
        assert_eq!(drives[0].firmware, "FW1");
        assert_eq!(drives[0].serial, "", "missing attribute reads as empty");
        assert_eq!(drives[0].smart.as_ref().unwrap().critical_warning, 0x15);
        assert_eq!(drives[0].smartctl_exit_status, 0);
        let err = drives[1].smart.as_ref().unwrap_err();
        assert!(
            err.contains("needs root") && err.contains("/dev/nvme2"),
            "{err}"
        );
        assert_eq!(drives[1].smartctl_exit_status, EXIT_OPEN_FAILED);
        assert!(drives[2].smart.is_ok());
    }

    #[test]
    fn read_all_without_nvme_class_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let mut src = Fixed(vec![]);
        assert!(read_all(tmp.path(), &mut src).is_empty());
    }
}
