#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! NVMe SMART / Health end to end over the fake tree the simulated site uses: the sysfs controllers and
//! fixture NVMe logs written by `sysfs_tree`, read by the agent's real `DevSmart` and `read_all`, turned into
//! smartctl_exporter series.

use cairn_agent::hardware::nvme::{self, warning, DevSmart, SmartSource};
use cairn_agent::telemetry::{MetricKind, Sample};
use cairn_sim::nvme_fixtures::DriveCondition;
use cairn_sim::sysfs_tree::{self, TreeProfile};

fn tree(conditions: Vec<(usize, DriveCondition)>) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let profile = TreeProfile {
        nvme_drives: 5,
        nvme_conditions: conditions,
        ..TreeProfile::default()
    };
    sysfs_tree::write(tmp.path(), &profile).unwrap();
    tmp
}

fn value(samples: &[Sample], name: &str, device: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.contains(&("device", device.to_owned())))
        .map(|s| s.value)
}

#[test]
fn default_tree_has_a_healthy_log_for_every_drive() {
    let tmp = tree(Vec::new());
    let drives = nvme::read_all(tmp.path(), &mut DevSmart::new(tmp.path().to_owned()));
    assert_eq!(drives.len(), 5);
    for d in &drives {
        let log = d.smart.as_ref().unwrap();
        assert_eq!(log.critical_warning, 0, "{}", d.name);
        assert_eq!(log.available_spare, 100);
        assert_eq!(d.smartctl_exit_status, 0);
        assert_eq!(d.model, "SAMSUNG MZQL23T8HCLS-00A07");
        assert_eq!(d.firmware, "GDC5602Q");
    }
    assert_eq!(drives[3].serial, "S64HNE0T000003");
}

#[test]
fn conditions_reach_the_samples() {
    let tmp = tree(vec![
        (1, DriveCondition::Worn),
        (2, DriveCondition::Failing),
        (3, DriveCondition::Hot),
    ]);
    // Drive 4 lost its device node: identity only, with a failed exit status.
    std::fs::remove_file(tmp.path().join("dev/nvme4")).unwrap();

    let drives = nvme::read_all(tmp.path(), &mut DevSmart::new(tmp.path().to_owned()));
    let names: Vec<&str> = drives.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["nvme0", "nvme1", "nvme2", "nvme3", "nvme4"]);

    let failing = drives[2].smart.as_ref().unwrap();
    assert_eq!(
        failing.critical_warning,
        warning::SPARE_BELOW_THRESHOLD | warning::RELIABILITY_DEGRADED
    );
    let err = drives[4].smart.as_ref().unwrap_err();
    assert!(err.contains("dev/nvme4"), "{err}");
    assert_eq!(drives[4].smartctl_exit_status, 2);

    let s = nvme::samples(&drives);
    let v = |name: &str, dev: &str| value(&s, name, dev);

    // Worn.
    assert_eq!(v("smartctl_device_percentage_used", "nvme1"), Some(95.0));
    assert_eq!(v("smartctl_device_available_spare", "nvme1"), Some(12.0));
    assert_eq!(v("smartctl_device_critical_warning", "nvme1"), Some(0.0));
    assert_eq!(
        v("smartctl_device_power_on_seconds", "nvme1"),
        Some(43_800.0 * 3600.0)
    );
    assert_eq!(
        v("smartctl_device_bytes_written", "nvme1"),
        Some(13_671_875_000.0 * 512_000.0)
    );
    // Failing.
    assert_eq!(v("smartctl_device_critical_warning", "nvme2"), Some(5.0));
    assert_eq!(v("smartctl_device_available_spare", "nvme2"), Some(5.0));
    assert_eq!(
        v("smartctl_device_available_spare_threshold", "nvme2"),
        Some(10.0)
    );
    assert_eq!(v("smartctl_device_media_errors", "nvme2"), Some(37.0));
    assert_eq!(v("smartctl_device_temperature", "nvme2"), Some(71.0));
    // Hot.
    assert_eq!(v("smartctl_device_critical_warning", "nvme3"), Some(2.0));
    assert_eq!(v("smartctl_device_temperature", "nvme3"), Some(82.0));
    // Healthy.
    assert_eq!(v("smartctl_device_temperature", "nvme0"), Some(35.0));
    assert_eq!(v("smartctl_device_power_cycle_count", "nvme0"), Some(41.0));
    // Unreadable.
    assert_eq!(
        v("smartctl_device_smartctl_exit_status", "nvme4"),
        Some(2.0)
    );
    assert_eq!(v("smartctl_device", "nvme4"), Some(1.0));
    assert_eq!(v("smartctl_device_media_errors", "nvme4"), None);

    let info = s
        .iter()
        .find(|x| x.name == "smartctl_device" && x.labels[0].1 == "nvme2")
        .unwrap();
    assert_eq!(info.kind, MetricKind::Gauge);
    for label in [
        ("interface", "nvme"),
        ("protocol", "NVMe"),
        ("model_name", "SAMSUNG MZQL23T8HCLS-00A07"),
        ("serial_number", "S64HNE0T000002"),
        ("firmware_version", "GDC5602Q"),
    ] {
        assert!(
            info.labels.contains(&(label.0, label.1.to_owned())),
            "{label:?} in {:?}",
            info.labels
        );
    }
}

#[test]
fn fixture_is_read_byte_for_byte() {
    let tmp = tree(vec![(0, DriveCondition::Hot)]);
    let raw = DevSmart::new(tmp.path().to_owned()).read("nvme0").unwrap();
    assert_eq!(
        raw,
        cairn_sim::nvme_fixtures::smart_log(DriveCondition::Hot)
    );
}
