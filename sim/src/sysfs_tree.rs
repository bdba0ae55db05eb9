//! A fake sysfs tree with the entries the agent reads: hwmon chips, RAPL powercap zones and NVMe controllers.
//! Values are shaped like a two-socket GPU server's.

use std::path::Path;

#[derive(Debug, Clone)]
pub struct TreeProfile {
    pub nvme_drives: usize,
    pub sockets: usize,
}

impl Default for TreeProfile {
    fn default() -> Self {
        TreeProfile {
            nvme_drives: 8,
            sockets: 2,
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
    let fans = format!("sys/class/hwmon/hwmon{}", profile.sockets + 1);
    put(root, &format!("{fans}/name"), "nct6798")?;
    for f in 1..=4 {
        put(
            root,
            &format!("{fans}/fan{f}_input"),
            &(4_200 + 100 * f).to_string(),
        )?;
    }
    for n in 0..profile.nvme_drives {
        let c = format!("sys/class/nvme/nvme{n}");
        put(root, &format!("{c}/model"), "SAMSUNG MZQL23T8HCLS-00A07")?;
        put(root, &format!("{c}/serial"), &format!("S64HNE0T{n:06}"))?;
        put(root, &format!("{c}/firmware_rev"), "GDC5602Q")?;
        put(root, &format!("{c}/state"), "live")?;
    }
    Ok(())
}
