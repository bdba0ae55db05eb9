//! Hardware health on the simulated site: 8 fake H100s, 8 NVMe drives (two of them worn or failing), the
//! fake sysfs power tree; every series on /metrics, XIDs as events, failed and degraded components with
//! their reasons, and a driver that disappears under the running agent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_proto::control::{Command, HealthReport, HealthState, Response};
use cairn_sim::nvme_fixtures::DriveCondition;
use cairn_sim::{Site, SiteOptions};
use std::process::Command as Process;
use std::time::{Duration, Instant};

fn health(site: &Site) -> HealthReport {
    match cairn_agent::control::request(
        &site.env.control_socket,
        Command::Health,
        Duration::from_secs(5),
    )
    .unwrap()
    {
        Response::Health(h) => h,
        other => panic!("{other:?}"),
    }
}

fn wait_health(site: &Site, what: &str, ok: impl Fn(&HealthReport) -> bool) -> HealthReport {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = health(site);
        if ok(&h) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {h:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn component<'a>(h: &'a HealthReport, name: &str) -> &'a cairn_proto::control::ComponentHealth {
    h.components
        .iter()
        .find(|c| c.component == name)
        .unwrap_or_else(|| panic!("no component {name}: {h:#?}"))
}

fn fetch(url: &str) -> String {
    let out = Process::new("curl").args(["-fsS", url]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn health_model_metrics_xids_worn_drives_and_a_vanishing_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = SiteOptions::default();
    opts.tree.nvme_conditions = vec![(2, DriveCondition::Worn), (5, DriveCondition::Failing)];
    let site = Site::up(&tmp.path().join("site"), &opts).unwrap();

    // Drives: the worn one degraded, the failing one failed, each with the reason a tech can act on.
    let h = wait_health(&site, "the drives judged", |h| {
        h.components.iter().any(|c| c.component == "nvme5")
    });
    let worn = component(&h, "nvme2");
    assert_eq!(worn.state, HealthState::Degraded, "{worn:?}");
    assert!(
        worn.reasons
            .iter()
            .any(|r| r.contains("95 % of rated endurance")),
        "{worn:?}"
    );
    let failing = component(&h, "nvme5");
    assert_eq!(failing.state, HealthState::Failed, "{failing:?}");
    assert!(
        failing
            .reasons
            .iter()
            .any(|r| r.contains("spare capacity below")),
        "{failing:?}"
    );
    assert_eq!(component(&h, "nvme0").state, HealthState::Ok);
    for i in 0..8 {
        assert_eq!(component(&h, &format!("gpu {i}")).state, HealthState::Ok);
    }

    // Every family of series is on /metrics, for all 8 GPUs and all 8 drives.
    let metrics = fetch(&site.env.metrics_url);
    for (name, n) in [
        ("DCGM_FI_DEV_GPU_TEMP{", 8),
        ("DCGM_FI_DEV_MEMORY_TEMP{", 8),
        ("DCGM_FI_DEV_POWER_USAGE{", 8),
        ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{", 8),
        ("DCGM_FI_DEV_GPU_UTIL{", 8),
        ("DCGM_FI_DEV_MEM_COPY_UTIL{", 8),
        ("DCGM_FI_DEV_ENC_UTIL{", 8),
        ("DCGM_FI_DEV_DEC_UTIL{", 8),
        ("DCGM_FI_DEV_FB_USED{", 8),
        ("DCGM_FI_DEV_FB_FREE{", 8),
        ("DCGM_FI_DEV_SM_CLOCK{", 8),
        ("DCGM_FI_DEV_MEM_CLOCK{", 8),
        ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL{", 8),
        ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL{", 8),
        ("DCGM_FI_DEV_XID_ERRORS{", 8),
        ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{", 8),
        ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER{", 8),
        ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{", 8),
        ("smartctl_device{", 8),
        ("smartctl_device_critical_warning{", 8),
        ("smartctl_device_percentage_used{", 8),
        ("smartctl_device_available_spare{", 8),
        ("smartctl_device_media_errors{", 8),
        ("smartctl_device_temperature{", 8),
        ("node_rapl_package_joules_total{", 2),
        ("node_rapl_dram_joules_total{", 2),
        ("node_hwmon_temp_celsius{", 2),
        ("node_hwmon_fan_rpm{", 4),
        ("node_hwmon_power_watt{", 1),
        ("cairn_health_state{", 4),
    ] {
        let found = metrics.lines().filter(|l| l.starts_with(name)).count();
        assert!(found >= n, "{name}: {found} series, expected at least {n}");
    }
    assert!(metrics
        .contains("cairn_health_state{component=\"nvme5\",kind=\"nvme\",state=\"failed\"} 1"));

    // XID 79 on GPU 3: an event, and the GPU failed, within a poll or two (1 s polling).
    site.set_gpus("profile = \"h100x8\"\n[gpu.3]\nxid = [79]\n")
        .unwrap();
    let h = wait_health(&site, "GPU 3 failed", |h| {
        h.components
            .iter()
            .any(|c| c.component == "gpu 3" && c.state == HealthState::Failed)
    });
    assert!(component(&h, "gpu 3").reasons[0].contains("XID 79"));
    let xid = h.events.iter().find(|e| e.kind == "xid").unwrap();
    assert_eq!(xid.component, "gpu 3");
    assert!(xid.message.contains("fallen off the bus"), "{xid:?}");
    assert!(h.events.iter().any(|e| e.kind == "health"
        && e.component == "gpu 3"
        && e.message.starts_with("ok → failed")));
    assert_eq!(component(&h, "gpu 2").state, HealthState::Ok);

    // cairnctl health says the same in words, and exits 1 while something is failed.
    let out = Process::new(cairn_sim::process::bin_dir().join("cairnctl"))
        .arg("health")
        .env("CAIRN_CONFIG", &site.env.cairn_config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("gpu 3") && text.contains("FAILED") && text.contains("XID 79"),
        "{text}"
    );

    // The driver goes away under the running agent: the library file is removed and NVML starts failing.
    // The agent stays up and says NVML is unavailable.
    std::fs::remove_file(site.dir.join("lib/libnvidia-ml.so.1")).unwrap();
    site.set_gpus("driver_loaded = false\n").unwrap();
    let h = wait_health(&site, "NVML unavailable", |h| {
        h.components.iter().any(|c| {
            c.component == "gpus"
                && c.state == HealthState::Unknown
                && c.reasons.iter().any(|r| r.contains("NVML unavailable"))
        })
    });
    assert!(
        !h.components.iter().any(|c| c.component == "gpu 0"),
        "{h:#?}"
    );
    assert!(cairn_sim::process::is_running(
        site.env.cairnd_pid,
        "cairnd"
    ));
    let s = site.status().unwrap();
    assert!(matches!(
        s.gpus,
        cairn_proto::control::ComponentStatus::Unavailable { .. }
    ));
}
