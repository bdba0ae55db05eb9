//! Whole-system power from the BMC: DCMI Get Power Reading (DCMI 1.5 §6.6.1; NetFn 0x2C Group Extension,
//! command 0x02, group extension 0xDC, mode 0x01 "system power statistics") sent to the BMC on the system
//! interface through the Linux IPMI driver (`/dev/ipmi0`, `IPMICTL_SEND_COMMAND` / `IPMICTL_RECEIVE_MSG_TRUNC`
//! from linux/ipmi.h).
//!
//! The hardware edge is [`IpmiTransport`]; [`LinuxIpmi`] is the device, tests use a fake. Responses are parsed
//! with bounds checks: a short, foreign or failed answer is an error naming what was wrong, never a panic.

use super::PowerError;
use crate::telemetry::Sample;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// NetFn Group Extension (request). Responses carry NetFn + 1.
pub const NETFN_GROUP_EXTENSION: u8 = 0x2C;
/// DCMI Get Power Reading.
pub const CMD_GET_POWER_READING: u8 = 0x02;
/// The group extension identification of DCMI.
pub const DCMI_GROUP: u8 = 0xDC;
/// Mode 0x01: system power statistics.
pub const MODE_SYSTEM_POWER_STATISTICS: u8 = 0x01;
/// A Get Power Reading response: completion code through power reading state.
const POWER_READING_LEN: usize = 19;

/// One request/response exchange with the BMC. The response is the response data as the Linux driver
/// returns it: the completion code first, then the command's data.
pub trait IpmiTransport: Send {
    fn request(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>, PowerError>;
}

/// The request data of Get Power Reading: group extension, mode, mode attributes, reserved.
pub fn power_reading_request() -> [u8; 4] {
    [DCMI_GROUP, MODE_SYSTEM_POWER_STATISTICS, 0x00, 0x00]
}

/// The BMC's power statistics (DCMI 1.5 table 6-16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DcmiPowerReading {
    pub current_watts: u16,
    /// Minimum, maximum and average over the statistics period.
    pub minimum_watts: u16,
    pub maximum_watts: u16,
    pub average_watts: u16,
    /// The BMC's clock when it took the reading, seconds since the epoch (BMC clocks are often wrong).
    pub timestamp: u32,
    /// The statistics reporting period, milliseconds.
    pub period_ms: u32,
    /// Power reading state bit 6: the BMC is measuring. When it is not, the values mean nothing.
    pub active: bool,
}

/// What an IPMI completion code means (IPMI 2.0 table 5-2), and what to do about it.
fn completion(code: u8) -> (&'static str, &'static str) {
    match code {
        0xC0 => ("node busy", ": retried at the next poll"),
        0xC1 => (
            "invalid command",
            ": this BMC does not implement DCMI power readings",
        ),
        0xC3 => ("timeout while processing", ": retried at the next poll"),
        0xC9 => ("parameter out of range", ""),
        0xCC => ("invalid data field in request", ""),
        0xCE => (
            "response could not be provided",
            ": retried at the next poll",
        ),
        0xD4 => ("insufficient privilege level", ""),
        0xD5 => (
            "not supported in present state",
            ": power measurement may be disabled in the BMC settings",
        ),
        0xD6 => (
            "parameter is illegal because the command sub-function is disabled",
            ": enable power monitoring in the BMC settings",
        ),
        0xFF => ("unspecified error", ""),
        _ => ("unknown completion code", ""),
    }
}

/// Parses a Get Power Reading response (completion code first).
pub fn parse_power_reading(resp: &[u8]) -> Result<DcmiPowerReading, PowerError> {
    let len = resp.len();
    let Some(&code) = resp.first() else {
        return Err(PowerError::DcmiMalformed {
            problem: "no completion code",
            len,
        });
    };
    if code != 0 {
        let (meaning, fix) = completion(code);
        return Err(PowerError::DcmiCompletion { code, meaning, fix });
    }
    if resp.get(1) != Some(&DCMI_GROUP) {
        return Err(PowerError::DcmiMalformed {
            problem: "not a DCMI group extension response",
            len,
        });
    }
    let Some(b) = resp.get(..POWER_READING_LEN) else {
        return Err(PowerError::DcmiMalformed {
            problem: "shorter than the 19 bytes of a power reading",
            len,
        });
    };
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Ok(DcmiPowerReading {
        current_watts: u16_at(2),
        minimum_watts: u16_at(4),
        maximum_watts: u16_at(6),
        average_watts: u16_at(8),
        timestamp: u32_at(10),
        period_ms: u32_at(14),
        active: b[18] & 0x40 != 0,
    })
}

/// Asks the BMC for its power reading.
pub fn read_power(t: &mut dyn IpmiTransport) -> Result<DcmiPowerReading, PowerError> {
    let resp = t.request(
        NETFN_GROUP_EXTENSION,
        CMD_GET_POWER_READING,
        &power_reading_request(),
    )?;
    parse_power_reading(&resp)
}

/// `ipmi_dcmi_power_consumption_watts`, as ipmi_exporter's dcmi collector: only while the BMC measures.
pub fn samples(r: &DcmiPowerReading) -> Vec<Sample> {
    if !r.active {
        return Vec::new();
    }
    vec![Sample::gauge(
        "ipmi_dcmi_power_consumption_watts",
        "Current power consumption in Watts.",
        vec![],
        f64::from(r.current_watts),
    )]
}

/// linux/ipmi.h, as the kernel lays it out for this architecture.
mod sys {
    use libc::{c_int, c_long, c_short, c_uchar, c_uint, c_ushort};

    pub const IPMI_SYSTEM_INTERFACE_ADDR_TYPE: c_int = 0x0c;
    pub const IPMI_BMC_CHANNEL: c_short = 0x0f;
    pub const IPMI_RESPONSE_RECV_TYPE: c_int = 1;
    pub const IPMI_MAX_ADDR_SIZE: usize = 32;
    /// The driver's largest message; a bigger receive buffer is never filled.
    pub const IPMI_MAX_MSG_LENGTH: usize = 272;

    #[repr(C)]
    pub struct IpmiSystemInterfaceAddr {
        pub addr_type: c_int,
        pub channel: c_short,
        pub lun: c_uchar,
    }

    /// `struct ipmi_addr`: big enough for any address the driver returns.
    #[repr(C)]
    pub struct IpmiAddr {
        pub addr_type: c_int,
        pub channel: c_short,
        pub data: [u8; IPMI_MAX_ADDR_SIZE],
    }

    #[repr(C)]
    pub struct IpmiMsg {
        pub netfn: c_uchar,
        pub cmd: c_uchar,
        pub data_len: c_ushort,
        pub data: *mut c_uchar,
    }

    #[repr(C)]
    pub struct IpmiReq {
        pub addr: *mut c_uchar,
        pub addr_len: c_uint,
        pub msgid: c_long,
        pub msg: IpmiMsg,
    }

    #[repr(C)]
    pub struct IpmiRecv {
        pub recv_type: c_int,
        pub addr: *mut c_uchar,
        pub addr_len: c_uint,
        pub msgid: c_long,
        pub msg: IpmiMsg,
    }

    // asm-generic/ioctl.h, and the architectures that differ from it.
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc64"
    ))]
    mod ioc {
        pub const SIZE_BITS: u32 = 13;
        pub const READ: u32 = 2;
        pub const WRITE: u32 = 4;
    }
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc64"
    )))]
    mod ioc {
        pub const SIZE_BITS: u32 = 14;
        pub const READ: u32 = 2;
        pub const WRITE: u32 = 1;
    }

    const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
        const IPMI_IOC_MAGIC: u32 = b'i' as u32;
        (dir << (16 + ioc::SIZE_BITS)) | ((size as u32) << 16) | (IPMI_IOC_MAGIC << 8) | nr
    }

    /// `_IOR(IPMI_IOC_MAGIC, 13, struct ipmi_req)`.
    pub const IPMICTL_SEND_COMMAND: u32 = ioc(ioc::READ, 13, std::mem::size_of::<IpmiReq>());
    /// `_IOWR(IPMI_IOC_MAGIC, 11, struct ipmi_recv)`.
    pub const IPMICTL_RECEIVE_MSG_TRUNC: u32 =
        ioc(ioc::READ | ioc::WRITE, 11, std::mem::size_of::<IpmiRecv>());
}

/// The BMC through the Linux IPMI driver's character device.
#[derive(Debug)]
pub struct LinuxIpmi {
    file: std::fs::File,
    path: PathBuf,
    timeout: Duration,
    next_msgid: libc::c_long,
}

impl LinuxIpmi {
    /// Opens the device (`/dev/ipmi0`); `timeout` bounds each request.
    pub fn open(path: &Path, timeout: Duration) -> Result<Self, PowerError> {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(path).map_err(|source| PowerError::IpmiOpen {
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_char_device() {
            return Err(PowerError::IpmiNotDevice {
                path: path.to_owned(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| PowerError::IpmiOpen {
                path: path.to_owned(),
                source,
            })?;
        Ok(LinuxIpmi {
            file,
            path: path.to_owned(),
            timeout,
            next_msgid: 1,
        })
    }

    fn ioctl_error(&self, op: &'static str) -> PowerError {
        PowerError::IpmiIoctl {
            path: self.path.clone(),
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    /// Waits until a message is queued, or the deadline passes (false).
    fn wait_readable(&self, deadline: Instant) -> Result<bool, PowerError> {
        use std::os::unix::io::AsRawFd;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            let mut fds = [libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: `fds` is a valid array of one pollfd that outlives the call, and its length is 1.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(PowerError::IpmiIoctl {
                    path: self.path.clone(),
                    op: "poll",
                    source: e,
                });
            }
            if n > 0 {
                return Ok(true);
            }
        }
    }
}

impl IpmiTransport for LinuxIpmi {
    fn request(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>, PowerError> {
        use std::os::unix::io::AsRawFd;
        let fd = self.file.as_raw_fd();
        let msgid = self.next_msgid;
        self.next_msgid = self.next_msgid.wrapping_add(1).max(1);

        let mut addr = sys::IpmiSystemInterfaceAddr {
            addr_type: sys::IPMI_SYSTEM_INTERFACE_ADDR_TYPE,
            channel: sys::IPMI_BMC_CHANNEL,
            lun: 0,
        };
        let mut payload = data.to_vec();
        let data_len = u16::try_from(payload.len()).map_err(|_| PowerError::IpmiIoctl {
            path: self.path.clone(),
            op: "IPMICTL_SEND_COMMAND",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let mut req = sys::IpmiReq {
            addr: (&raw mut addr).cast(),
            addr_len: std::mem::size_of::<sys::IpmiSystemInterfaceAddr>() as libc::c_uint,
            msgid,
            msg: sys::IpmiMsg {
                netfn,
                cmd,
                data_len,
                data: payload.as_mut_ptr(),
            },
        };
        // SAFETY: `req` points at `addr` (addr_len bytes) and `payload` (data_len bytes), all alive and
        // unaliased for the call; the driver copies them in before returning and keeps no pointer.
        let rc = unsafe { libc::ioctl(fd, sys::IPMICTL_SEND_COMMAND as libc::Ioctl, &raw mut req) };
        if rc < 0 {
            return Err(self.ioctl_error("IPMICTL_SEND_COMMAND"));
        }

        let deadline = Instant::now() + self.timeout;
        loop {
            if !self.wait_readable(deadline)? {
                return Err(PowerError::IpmiTimeout {
                    path: self.path.clone(),
                    netfn,
                    cmd,
                    timeout: self.timeout,
                });
            }
            let mut raddr = sys::IpmiAddr {
                addr_type: 0,
                channel: 0,
                data: [0; sys::IPMI_MAX_ADDR_SIZE],
            };
            let mut buf = vec![0u8; sys::IPMI_MAX_MSG_LENGTH];
            let mut recv = sys::IpmiRecv {
                recv_type: 0,
                addr: (&raw mut raddr).cast(),
                addr_len: std::mem::size_of::<sys::IpmiAddr>() as libc::c_uint,
                msgid: 0,
                msg: sys::IpmiMsg {
                    netfn: 0,
                    cmd: 0,
                    data_len: sys::IPMI_MAX_MSG_LENGTH as libc::c_ushort,
                    data: buf.as_mut_ptr(),
                },
            };
            // SAFETY: `recv` points at `raddr` (addr_len bytes) and `buf` (data_len bytes), both alive,
            // writable and unaliased for the call; the driver writes at most those lengths and updates them.
            let rc = unsafe {
                libc::ioctl(
                    fd,
                    sys::IPMICTL_RECEIVE_MSG_TRUNC as libc::Ioctl,
                    &raw mut recv,
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // Someone else's message was taken first, or a spurious wake-up.
                    Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                    // Truncated to our buffer: bigger than any IPMI message, so not ours.
                    Some(libc::EMSGSIZE) => continue,
                    _ => {
                        return Err(PowerError::IpmiIoctl {
                            path: self.path.clone(),
                            op: "IPMICTL_RECEIVE_MSG_TRUNC",
                            source: e,
                        })
                    }
                }
            }
            // Events, commands and late answers to requests that timed out are not this response.
            if recv.recv_type != sys::IPMI_RESPONSE_RECV_TYPE
                || recv.msgid != msgid
                || recv.msg.cmd != cmd
                || (recv.msg.netfn | 1) != (netfn | 1)
            {
                continue;
            }
            let n = usize::from(recv.msg.data_len).min(buf.len());
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records requests; answers with canned responses.
    struct Fake {
        sent: Vec<(u8, u8, Vec<u8>)>,
        answer: Result<Vec<u8>, fn() -> PowerError>,
    }

    impl IpmiTransport for Fake {
        fn request(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>, PowerError> {
            self.sent.push((netfn, cmd, data.to_vec()));
            match &self.answer {
                Ok(v) => Ok(v.clone()),
                Err(f) => Err(f()),
            }
        }
    }

    fn response(state: u8) -> Vec<u8> {
        let mut r = vec![0x00, 0xDC];
        r.extend(412u16.to_le_bytes()); // current
        r.extend(250u16.to_le_bytes()); // minimum
        r.extend(1_210u16.to_le_bytes()); // maximum
        r.extend(398u16.to_le_bytes()); // average
        r.extend(1_700_000_000u32.to_le_bytes());
        r.extend(3_600_000u32.to_le_bytes());
        r.push(state);
        r
    }

    #[test]
    fn the_request_is_dcmi_get_power_reading() {
        let mut f = Fake {
            sent: vec![],
            answer: Ok(response(0x40)),
        };
        let r = read_power(&mut f).unwrap();
        assert_eq!(f.sent, vec![(0x2C, 0x02, vec![0xDC, 0x01, 0x00, 0x00])]);
        assert_eq!(
            r,
            DcmiPowerReading {
                current_watts: 412,
                minimum_watts: 250,
                maximum_watts: 1210,
                average_watts: 398,
                timestamp: 1_700_000_000,
                period_ms: 3_600_000,
                active: true
            }
        );
        let s = samples(&r);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "ipmi_dcmi_power_consumption_watts");
        assert!(s[0].labels.is_empty());
        assert_eq!(s[0].value, 412.0);
    }

    #[test]
    fn an_inactive_measurement_is_a_fact_without_a_series() {
        let r = parse_power_reading(&response(0x00)).unwrap();
        assert!(!r.active);
        assert!(samples(&r).is_empty());
        // Other state bits do not make it active; trailing bytes are ignored.
        let mut long = response(0xBF);
        long.extend([1, 2, 3]);
        assert!(!parse_power_reading(&long).unwrap().active);
    }

    #[test]
    fn bad_responses_are_errors_not_panics() {
        let msg = |r: &[u8]| crate::error_chain(&parse_power_reading(r).unwrap_err());
        assert!(msg(&[]).contains("no completion code"));
        let m = msg(&[0xC1]);
        assert!(
            m.contains("0xc1") && m.contains("does not implement DCMI"),
            "{m}"
        );
        assert!(msg(&[0xD4, 0xDC]).contains("insufficient privilege"));
        assert!(msg(&[0x7E]).contains("unknown completion code"));
        assert!(msg(&[0x00]).contains("not a DCMI"));
        assert!(msg(&[0x00, 0xDD, 0, 0]).contains("not a DCMI"));
        let full = response(0x40);
        for n in 2..full.len() {
            let m = msg(&full[..n]);
            assert!(
                m.contains("shorter") && m.contains(&format!("{n} bytes")),
                "{m}"
            );
        }
    }

    #[test]
    fn transport_errors_pass_through() {
        let mut f = Fake {
            sent: vec![],
            answer: Err(|| PowerError::IpmiTimeout {
                path: "/dev/ipmi0".into(),
                netfn: 0x2C,
                cmd: 0x02,
                timeout: Duration::from_secs(3),
            }),
        };
        let m = crate::error_chain(&read_power(&mut f).unwrap_err());
        assert!(
            m.contains("/dev/ipmi0") && m.contains("0x2c") && m.contains("0x02"),
            "{m}"
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn ioctl_numbers_match_linux_ipmi_h_on_x86_64() {
        assert_eq!(std::mem::size_of::<sys::IpmiReq>(), 40);
        assert_eq!(std::mem::size_of::<sys::IpmiRecv>(), 48);
        assert_eq!(sys::IPMICTL_SEND_COMMAND, 0x8028_690d);
        assert_eq!(sys::IPMICTL_RECEIVE_MSG_TRUNC, 0xc030_690b);
    }

    #[test]
    fn opening_what_is_not_a_device_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("ipmi0");
        let m = crate::error_chain(&LinuxIpmi::open(&p, Duration::from_secs(1)).unwrap_err());
        assert!(m.contains("ipmi0") && m.contains("cannot open"), "{m}");
        std::fs::write(&p, b"").unwrap();
        let m = crate::error_chain(&LinuxIpmi::open(&p, Duration::from_secs(1)).unwrap_err());
        assert!(m.contains("not a character device"), "{m}");
    }

    /// A character device that is not the IPMI driver refuses the ioctl: an error, not a hang or a crash.
    #[test]
    fn a_foreign_character_device_refuses_the_ioctl() {
        let mut dev = LinuxIpmi::open(Path::new("/dev/null"), Duration::from_millis(200)).unwrap();
        let m = crate::error_chain(&read_power(&mut dev).unwrap_err());
        assert!(
            m.contains("IPMICTL_SEND_COMMAND") && m.contains("/dev/null"),
            "{m}"
        );
    }
}
