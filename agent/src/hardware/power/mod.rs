//! Power: what the machine draws and what feeds it, from four sources, each optional and each a reason rather
//! than a crash when it cannot be read.
//!
//! - [`rapl`]: CPU package / DRAM energy counters (powercap sysfs), turned into monotonic joules across
//!   wrap-arounds and average watts between polls;
//! - [`hwmon`]: temperatures, fans and power meters of the hardware-monitoring chips;
//! - [`ipmi`]: whole-system (PSU input) power from the BMC, DCMI Get Power Reading through `/dev/ipmi0`,
//!   behind [`ipmi::IpmiTransport`];
//! - [`nut`]: the UPS, through a Network UPS Tools server (`upsd`), when one is configured.
//!
//! sysfs and `/dev` are read under `hardware.sys_root`. [`PowerCollector`] owns the state between polls (the
//! RAPL counters, the open IPMI device) and produces a [`PowerReading`]: the facts the health model judges,
//! and, through [`samples`], the series node_exporter, ipmi_exporter and nut_exporter publish for the same
//! signals.

pub mod hwmon;
pub mod ipmi;
pub mod nut;
pub mod rapl;

use crate::telemetry::Sample;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use hwmon::{Fan, HwmonChip, PowerMeter, Temperature};
pub use ipmi::{DcmiPowerReading, IpmiTransport, LinuxIpmi};
pub use nut::{UpsConfig, UpsStatus};
pub use rapl::{Rapl, RaplEnergy, RaplZone};

/// sysfs attributes are short; anything longer than this is not an attribute we understand.
const MAX_ATTR_BYTES: u64 = 4096;

/// How long one IPMI request may take before the poll gives up on it. The kernel driver retries on its own
/// and answers with an error completion code when the BMC does not respond, normally well within this.
pub const IPMI_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable only by root on this kernel (RAPL energy counters are restricted since the 2020 side-channel fix, CVE-2020-8694): run cairnd as root, or grant read access to energy_uj with a udev rule")]
    RaplPermission { path: PathBuf },
    #[error("{path} holds {value:?}, not a decimal number: check that hardware.sys_root points at a real sysfs")]
    Parse { path: PathBuf, value: String },
    #[error("cannot open the IPMI device {path}: cairnd needs root and the ipmi_devintf driver to talk to the BMC")]
    IpmiOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a character device, so it is not the IPMI driver: remove it, or check hardware.sys_root")]
    IpmiNotDevice { path: PathBuf },
    #[error(
        "the IPMI ioctl {op} on {path} failed: check the kernel log for ipmi_si / ipmi_devintf"
    )]
    IpmiIoctl {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the BMC did not answer IPMI request netfn {netfn:#04x} cmd {cmd:#04x} on {path} within {timeout:?}: it may be busy or resetting; if this persists, check the BMC (ipmitool mc info, its web interface)")]
    IpmiTimeout {
        path: PathBuf,
        netfn: u8,
        cmd: u8,
        timeout: Duration,
    },
    #[error(
        "the BMC rejected DCMI Get Power Reading with completion code {code:#04x} ({meaning}){fix}"
    )]
    DcmiCompletion {
        code: u8,
        meaning: &'static str,
        fix: &'static str,
    },
    #[error("the BMC's answer to DCMI Get Power Reading is malformed ({problem}, {len} bytes): check the BMC firmware")]
    DcmiMalformed { problem: &'static str, len: usize },
    #[error("UPS configuration: {problem}")]
    UpsConfig { problem: String },
    #[error(
        "cannot resolve the NUT server address {server}: check the UPS server setting (host:port)"
    )]
    NutResolve {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the NUT server {server}: check that upsd listens there (LISTEN in upsd.conf) and that no firewall is in the way")]
    NutConnect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the NUT server {server} did not answer within {timeout:?}: check that upsd is running and is not overloaded")]
    NutTimeout { server: String, timeout: Duration },
    #[error("lost the connection to the NUT server {server}")]
    NutIo {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the NUT server {server} refused LIST VAR {ups} with ERR {code}: {fix}")]
    NutRefused {
        server: String,
        ups: String,
        code: String,
        fix: &'static str,
    },
    #[error("{server} does not answer like a NUT server ({problem}): check that the UPS server setting points at upsd (port 3493)")]
    NutProtocol { server: String, problem: String },
}

/// One sysfs attribute, read with a bound, lossily decoded and trimmed.
pub(crate) fn read_attr(path: &Path) -> Result<String, PowerError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_ATTR_BYTES).read_to_end(&mut bytes))
        .map_err(|source| PowerError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}

/// An unsigned decimal attribute.
pub(crate) fn read_u64(path: &Path) -> Result<u64, PowerError> {
    let text = read_attr(path)?;
    text.parse().map_err(|_| PowerError::Parse {
        path: path.to_owned(),
        value: text,
    })
}

/// Everything the power sources said at one poll. `None` for the PSU and the UPS means the source is not
/// there (no BMC device, no UPS configured), which is normal; `Some(Err(reason))` means it is there and could
/// not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerReading {
    pub rapl: Vec<RaplZone>,
    pub hwmon: Vec<HwmonChip>,
    pub psu: Option<Result<DcmiPowerReading, String>>,
    pub ups: Option<Result<UpsStatus, String>>,
}

impl PowerReading {
    /// Whole-system input power the BMC measures, when it has an active measurement.
    pub fn psu_watts(&self) -> Option<f64> {
        match &self.psu {
            Some(Ok(r)) if r.active => Some(f64::from(r.current_watts)),
            _ => None,
        }
    }
}

/// The series for one reading, grouped by metric name (one family after the other).
pub fn samples(reading: &PowerReading) -> Vec<Sample> {
    let mut out = rapl::samples(&reading.rapl);
    out.extend(hwmon::samples(&reading.hwmon));
    if let Some(Ok(psu)) = &reading.psu {
        out.extend(ipmi::samples(psu));
    }
    if let Some(Ok(ups)) = &reading.ups {
        out.extend(nut::samples(ups));
    }
    // Stable: within a family the order of the sources is kept.
    out.sort_by(|a, b| a.name.cmp(b.name));
    out
}

/// Reads all power sources; owns what has to live between polls.
pub struct PowerCollector {
    root: PathBuf,
    rapl: Rapl,
    ipmi: Option<Box<dyn IpmiTransport>>,
    /// A transport handed in by a test or the simulated site is kept whatever happens; the device is reopened
    /// after a failure.
    ipmi_injected: bool,
    ups: Option<UpsConfig>,
}

impl std::fmt::Debug for PowerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerCollector")
            .field("root", &self.root)
            .field("rapl", &self.rapl)
            .field("ipmi_open", &self.ipmi.is_some())
            .field("ups", &self.ups)
            .finish()
    }
}

impl PowerCollector {
    /// `sys_root` is `hardware.sys_root`; `ups` the NUT server to ask, if the site has one.
    pub fn new(sys_root: PathBuf, ups: Option<UpsConfig>) -> Self {
        PowerCollector {
            root: sys_root,
            rapl: Rapl::new(),
            ipmi: None,
            ipmi_injected: false,
            ups,
        }
    }

    /// Uses `transport` for the BMC instead of `<root>/dev/ipmi0`.
    pub fn with_ipmi(mut self, transport: Box<dyn IpmiTransport>) -> Self {
        self.ipmi = Some(transport);
        self.ipmi_injected = true;
        self
    }

    pub fn ipmi_device(&self) -> PathBuf {
        self.root.join("dev/ipmi0")
    }

    pub fn read(&mut self) -> PowerReading {
        self.read_at(Instant::now())
    }

    /// [`read`](Self::read) with the time of the poll given, for RAPL watts in tests.
    pub fn read_at(&mut self, at: Instant) -> PowerReading {
        PowerReading {
            rapl: self.rapl.read_at(&self.root, at),
            hwmon: hwmon::read(&self.root),
            psu: self.read_psu(),
            ups: self
                .ups
                .as_ref()
                .map(|c| nut::read_ups(c).map_err(|e| crate::error_chain(&e))),
        }
    }

    fn read_psu(&mut self) -> Option<Result<DcmiPowerReading, String>> {
        if self.ipmi.is_none() {
            let path = self.ipmi_device();
            // No device node: no BMC, or the IPMI drivers are not loaded. Both are normal.
            if std::fs::symlink_metadata(&path).is_err() {
                return None;
            }
            match LinuxIpmi::open(&path, IPMI_TIMEOUT) {
                Ok(dev) => self.ipmi = Some(Box::new(dev)),
                Err(e) => return Some(Err(crate::error_chain(&e))),
            }
        }
        let transport = self.ipmi.as_mut()?;
        let result = ipmi::read_power(transport.as_mut());
        if let Err(e) = &result {
            let device_failed = !matches!(
                e,
                PowerError::DcmiCompletion { .. } | PowerError::DcmiMalformed { .. }
            );
            if device_failed && !self.ipmi_injected {
                self.ipmi = None;
            }
        }
        Some(result.map_err(|e| crate::error_chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_bounded_trimmed_and_name_their_path() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("energy_uj");
        std::fs::write(&p, " 12345\n").unwrap();
        assert_eq!(read_u64(&p).unwrap(), 12345);
        std::fs::write(&p, "x".repeat(10_000)).unwrap();
        assert_eq!(read_attr(&p).unwrap().len(), MAX_ATTR_BYTES as usize);
        std::fs::write(&p, "12a\n").unwrap();
        let err = crate::error_chain(&read_u64(&p).unwrap_err());
        assert!(
            err.contains("energy_uj") && err.contains("\"12a\""),
            "{err}"
        );
        let missing = tmp.path().join("missing");
        let err = crate::error_chain(&read_attr(&missing).unwrap_err());
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn an_empty_root_reads_as_nothing_there() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = PowerCollector::new(tmp.path().to_owned(), None);
        let r = c.read();
        assert_eq!(
            r,
            PowerReading {
                rapl: vec![],
                hwmon: vec![],
                psu: None,
                ups: None
            }
        );
        assert!(samples(&r).is_empty());
        assert_eq!(r.psu_watts(), None);
    }

    /// A BMC that answers from a list, then fails.
    struct Bmc(Vec<Vec<u8>>);

    impl IpmiTransport for Bmc {
        fn request(&mut self, netfn: u8, cmd: u8, _: &[u8]) -> Result<Vec<u8>, PowerError> {
            if self.0.is_empty() {
                return Err(PowerError::IpmiTimeout {
                    path: "/dev/ipmi0".into(),
                    netfn,
                    cmd,
                    timeout: IPMI_TIMEOUT,
                });
            }
            Ok(self.0.remove(0))
        }
    }

    fn dcmi(watts: u16, state: u8) -> Vec<u8> {
        let mut r = vec![0x00, 0xDC];
        for v in [watts, watts - 10, watts + 10, watts] {
            r.extend(v.to_le_bytes());
        }
        r.extend([0; 8]);
        r.push(state);
        r
    }

    #[test]
    fn the_collector_moves_to_the_hardware_thread() {
        fn send<T: Send>() {}
        send::<PowerCollector>();
    }

    #[test]
    fn psu_power_through_a_transport() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c =
            PowerCollector::new(tmp.path().to_owned(), None).with_ipmi(Box::new(Bmc(vec![
                dcmi(1480, 0x40),
                dcmi(1480, 0x00),
                vec![0xC1],
            ])));
        let r = c.read();
        assert_eq!(r.psu_watts(), Some(1480.0));
        let s = samples(&r);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].name, s[0].value),
            ("ipmi_dcmi_power_consumption_watts", 1480.0)
        );
        let r = c.read();
        assert!(matches!(
            r.psu,
            Some(Ok(DcmiPowerReading { active: false, .. }))
        ));
        assert_eq!(r.psu_watts(), None, "not measuring");
        assert!(samples(&r).is_empty());
        let reason = c.read().psu.unwrap().unwrap_err();
        assert!(reason.contains("0xc1"), "{reason}");
        let reason = c.read().psu.unwrap().unwrap_err();
        assert!(reason.contains("did not answer"), "{reason}");
        assert!(c.read().psu.is_some(), "an injected transport is kept");
    }

    #[test]
    fn a_regular_file_as_the_ipmi_device_is_a_reason() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("dev")).unwrap();
        std::fs::write(tmp.path().join("dev/ipmi0"), b"").unwrap();
        let mut c = PowerCollector::new(tmp.path().to_owned(), None);
        let reason = c.read().psu.unwrap().unwrap_err();
        assert!(
            reason.contains("dev/ipmi0") && reason.contains("not a character device"),
            "{reason}"
        );
    }

    #[test]
    fn samples_are_grouped_by_family() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        for (hw, name) in [("hwmon0", "coretemp"), ("hwmon1", "nct6798")] {
            let d = r.join("sys/class/hwmon").join(hw);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), name).unwrap();
            std::fs::write(d.join("temp1_input"), "40000").unwrap();
            std::fs::write(d.join("fan1_input"), "1000").unwrap();
        }
        let s = samples(&PowerCollector::new(r.to_owned(), None).read());
        let names: Vec<&str> = s.iter().map(|s| s.name).collect();
        let mut families = names.clone();
        families.dedup();
        let mut unique = families.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(families.len(), unique.len(), "{names:?}");
    }
}
