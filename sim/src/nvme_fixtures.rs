//! Fixture NVMe logs: SMART / Health Information log pages (log 02h, NVMe Base Specification 2.0, figure 207)
//! built byte by byte in the real layout, for the fake drives of the simulated site and the tests.
//!
//! The agent's `DevSmart` reads `<root>/dev/nvmeN`: a character device is asked with the NVMe admin ioctl, a
//! regular file is taken as the 512 raw bytes the drive would have returned. [`write_dev`] writes that file.
//! The layout is written here independently of the agent's parser, so each checks the other.

use std::path::Path;

/// Size of the log page.
pub const LOG_LEN: usize = 512;

/// The state a fake drive reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriveCondition {
    /// Spare 100 % (threshold 10 %), 3 % used, 35 °C, a year powered on, no errors.
    #[default]
    Healthy,
    /// Near its rated endurance: 95 % used, spare 12 % (threshold 10 %), no warning yet.
    Worn,
    /// Critical warning bits 0 (spare below threshold) and 2 (reliability degraded): spare 5 % under a 10 %
    /// threshold, 37 media errors, 71 °C.
    Failing,
    /// Critical warning bit 1 (temperature): 82 °C, 14 minutes above the warning threshold.
    Hot,
}

// Critical warning bits (byte 0).
const SPARE_BELOW_THRESHOLD: u8 = 1 << 0;
const TEMPERATURE_WARNING: u8 = 1 << 1;
const RELIABILITY_DEGRADED: u8 = 1 << 2;

/// Celsius to the log's kelvin, as drives and smartctl convert (273, not 273.15).
const fn kelvin(celsius: u16) -> u16 {
    celsius + 273
}

/// The fields of a log page this module sets; everything else (reserved bytes, thermal management counters)
/// stays zero.
struct Fields {
    critical_warning: u8,
    temperature_c: u16,
    available_spare: u8,
    available_spare_threshold: u8,
    percentage_used: u8,
    data_units_read: u128,
    data_units_written: u128,
    host_read_commands: u128,
    host_write_commands: u128,
    controller_busy_time: u128,
    power_cycles: u128,
    power_on_hours: u128,
    unsafe_shutdowns: u128,
    media_errors: u128,
    num_err_log_entries: u128,
    warning_temp_time: u32,
    critical_comp_time: u32,
    /// Temperature sensors 1 and 2, Celsius; 3 to 8 are not implemented (0).
    sensors_c: [u16; 2],
}

impl Fields {
    fn healthy() -> Self {
        Fields {
            critical_warning: 0,
            temperature_c: 35,
            available_spare: 100,
            available_spare_threshold: 10,
            percentage_used: 3,
            data_units_read: 48_211_907,
            data_units_written: 73_554_210,
            host_read_commands: 1_902_334_118,
            host_write_commands: 2_688_017_456,
            controller_busy_time: 4_210,
            power_cycles: 41,
            power_on_hours: 8_760,
            unsafe_shutdowns: 3,
            media_errors: 0,
            num_err_log_entries: 0,
            warning_temp_time: 0,
            critical_comp_time: 0,
            sensors_c: [35, 41],
        }
    }

    fn of(kind: DriveCondition) -> Self {
        let healthy = Fields::healthy();
        match kind {
            DriveCondition::Healthy => healthy,
            DriveCondition::Worn => Fields {
                temperature_c: 38,
                available_spare: 12,
                percentage_used: 95,
                data_units_read: 1_204_883_019,
                data_units_written: 13_671_875_000,
                power_cycles: 212,
                power_on_hours: 43_800,
                unsafe_shutdowns: 17,
                num_err_log_entries: 4,
                sensors_c: [38, 44],
                ..healthy
            },
            DriveCondition::Failing => Fields {
                critical_warning: SPARE_BELOW_THRESHOLD | RELIABILITY_DEGRADED,
                temperature_c: 71,
                available_spare: 5,
                percentage_used: 61,
                power_on_hours: 26_280,
                unsafe_shutdowns: 29,
                media_errors: 37,
                num_err_log_entries: 112,
                warning_temp_time: 3,
                sensors_c: [71, 77],
                ..healthy
            },
            DriveCondition::Hot => Fields {
                critical_warning: TEMPERATURE_WARNING,
                temperature_c: 82,
                warning_temp_time: 14,
                sensors_c: [82, 88],
                ..healthy
            },
        }
    }

    fn to_log(&self) -> [u8; LOG_LEN] {
        let mut b = [0u8; LOG_LEN];
        b[0] = self.critical_warning;
        b[1..3].copy_from_slice(&kelvin(self.temperature_c).to_le_bytes());
        b[3] = self.available_spare;
        b[4] = self.available_spare_threshold;
        b[5] = self.percentage_used;
        // Byte 6, the endurance group critical warning summary, stays 0: no endurance groups.
        let counters = [
            self.data_units_read,
            self.data_units_written,
            self.host_read_commands,
            self.host_write_commands,
            self.controller_busy_time,
            self.power_cycles,
            self.power_on_hours,
            self.unsafe_shutdowns,
            self.media_errors,
            self.num_err_log_entries,
        ];
        for (i, v) in counters.iter().enumerate() {
            let at = 32 + 16 * i;
            b[at..at + 16].copy_from_slice(&v.to_le_bytes());
        }
        b[192..196].copy_from_slice(&self.warning_temp_time.to_le_bytes());
        b[196..200].copy_from_slice(&self.critical_comp_time.to_le_bytes());
        for (i, c) in self.sensors_c.iter().enumerate() {
            let at = 200 + 2 * i;
            b[at..at + 2].copy_from_slice(&kelvin(*c).to_le_bytes());
        }
        b
    }
}

/// The SMART / Health Information log page a drive in `kind` condition returns.
pub fn smart_log(kind: DriveCondition) -> [u8; LOG_LEN] {
    Fields::of(kind).to_log()
}

/// Writes `<root>/dev/<controller>` as a fixture NVMe log of a drive in `kind` condition.
pub fn write_dev(root: &Path, controller: &str, kind: DriveCondition) -> std::io::Result<()> {
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev)?;
    std::fs::write(dev.join(controller), smart_log(kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_agent::hardware::nvme::{parse_smart_log, warning};

    #[test]
    fn every_condition_parses_with_the_agent_parser_to_what_it_promises() {
        let healthy = parse_smart_log(&smart_log(DriveCondition::Healthy)).unwrap();
        assert_eq!(healthy.critical_warning, 0);
        assert_eq!(
            (healthy.available_spare, healthy.available_spare_threshold),
            (100, 10)
        );
        assert_eq!(healthy.percentage_used, 3);
        assert_eq!(healthy.temperature_celsius(), Some(35));
        assert_eq!(healthy.power_on_hours, 8_760);
        assert_eq!(healthy.temperature_sensors, vec![308, 314]);

        let worn = parse_smart_log(&smart_log(DriveCondition::Worn)).unwrap();
        assert_eq!(worn.critical_warning, 0);
        assert_eq!((worn.percentage_used, worn.available_spare), (95, 12));

        let failing = parse_smart_log(&smart_log(DriveCondition::Failing)).unwrap();
        assert_eq!(
            failing.critical_warning,
            warning::SPARE_BELOW_THRESHOLD | warning::RELIABILITY_DEGRADED
        );
        assert!(failing.available_spare < failing.available_spare_threshold);
        assert_eq!(failing.media_errors, 37);
        assert_eq!(failing.temperature_celsius(), Some(71));

        let hot = parse_smart_log(&smart_log(DriveCondition::Hot)).unwrap();
        assert_eq!(hot.critical_warning, warning::TEMPERATURE);
        assert_eq!(hot.temperature_celsius(), Some(82));
        assert_eq!(hot.warning_temp_time, 14);
    }

    #[test]
    fn reserved_bytes_stay_zero() {
        for kind in [
            DriveCondition::Healthy,
            DriveCondition::Worn,
            DriveCondition::Failing,
            DriveCondition::Hot,
        ] {
            let log = smart_log(kind);
            assert!(log[7..32].iter().all(|b| *b == 0), "{kind:?}");
            assert!(log[232..].iter().all(|b| *b == 0), "{kind:?}");
        }
    }
}
