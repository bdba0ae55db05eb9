//! A fake sysfs tree with the entries the agent reads: hwmon chips, RAPL powercap zones, NVMe controllers and
//! network ports.
//! Values are shaped like a two-socket GPU server's.

use crate::nvme_fixtures::{self, DriveCondition};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct TreeProfile {
    pub nvme_drives: usize,
    pub sockets: usize,
    /// Drives (by index) whose fixture NVMe log (`dev/nvmeN`) is not healthy (the last entry for an index
    /// wins); the others are healthy.
    pub nvme_conditions: Vec<(usize, DriveCondition)>,
}

impl Default for TreeProfile {
    fn default() -> Self {
        TreeProfile {
            nvme_drives: 8,
            sockets: 2,
            nvme_conditions: Vec::new(),
        }
    }
}

fn put(root: &Path, rel: &str, value: &str) -> std::io::Result<()> {
    let p = root.join(rel);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(p, format!("{value}\n"))
}

/// The `device` link of hwmon chip `hw` to `sys/<device>`, as the kernel makes it (it names the chip).
fn device_link(root: &Path, hw: &str, device: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("sys").join(device))?;
    let link = root.join(hw).join("device");
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink(format!("../../../{device}"), link)
}

pub fn write(root: &Path, profile: &TreeProfile) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("dev"))?;
    for s in 0..profile.sockets {
        let hw = format!("sys/class/hwmon/hwmon{s}");
        put(root, &format!("{hw}/name"), "coretemp")?;
        put(
            root,
            &format!("{hw}/temp1_label"),
            &format!("Package id {s}"),
        )?;
        put(
            root,
            &format!("{hw}/temp1_input"),
            &(48_000 + 1_000 * s).to_string(),
        )?;
        put(root, &format!("{hw}/temp1_max"), "80000")?;
        put(root, &format!("{hw}/temp1_crit"), "90000")?;
        device_link(root, &hw, &format!("devices/platform/coretemp.{s}"))?;
        let z = format!("sys/class/powercap/intel-rapl:{s}");
        put(root, &format!("{z}/name"), &format!("package-{s}"))?;
        put(
            root,
            &format!("{z}/energy_uj"),
            &(12_345_678_901_u64 + s as u64).to_string(),
        )?;
        put(root, &format!("{z}/max_energy_range_uj"), "262143328850")?;
        let d = format!("sys/class/powercap/intel-rapl:{s}:0");
        put(root, &format!("{d}/name"), "dram")?;
        put(root, &format!("{d}/energy_uj"), "987654321")?;
        put(root, &format!("{d}/max_energy_range_uj"), "65712999613")?;
    }
    let psu = format!("sys/class/hwmon/hwmon{}", profile.sockets);
    put(root, &format!("{psu}/name"), "power_meter")?;
    put(root, &format!("{psu}/power1_input"), "1450000000")?;
    put(root, &format!("{psu}/power1_average"), "1432000000")?;
    device_link(root, &psu, "devices/LNXSYSTM:00/LNXSYBUS:00/ACPI000D:00")?;
    let fans = format!("sys/class/hwmon/hwmon{}", profile.sockets + 1);
    put(root, &format!("{fans}/name"), "nct6798")?;
    device_link(root, &fans, "devices/platform/nct6775.656")?;
    for f in 1..=4 {
        put(
            root,
            &format!("{fans}/fan{f}_input"),
            &(4_200 + 100 * f).to_string(),
        )?;
    }
    // Two network ports: port 1 cabled, port 2 empty (as on a box that uses one uplink).
    for (name, carrier, operstate, pci) in [
        ("eno1", "1", "up", "0000:02:00.0"),
        ("eno2", "0", "down", "0000:02:00.1"),
    ] {
        let c = format!("sys/class/net/{name}");
        put(root, &format!("{c}/carrier"), carrier)?;
        put(root, &format!("{c}/operstate"), operstate)?;
        put(root, &format!("{c}/flags"), "0x1003")?;
        device_link(root, &c, &format!("devices/pci0000:00/{pci}"))?;
    }
    for n in 0..profile.nvme_drives {
        let c = format!("sys/class/nvme/nvme{n}");
        put(root, &format!("{c}/model"), "SAMSUNG MZQL23T8HCLS-00A07")?;
        put(root, &format!("{c}/serial"), &format!("S64HNE0T{n:06}"))?;
        put(root, &format!("{c}/firmware_rev"), "GDC5602Q")?;
        put(root, &format!("{c}/state"), "live")?;
        let condition = profile
            .nvme_conditions
            .iter()
            .rev()
            .find(|(i, _)| *i == n)
            .map_or(DriveCondition::Healthy, |(_, k)| *k);
        nvme_fixtures::write_dev(root, &format!("nvme{n}"), condition)?;
    }
    Ok(())
}
