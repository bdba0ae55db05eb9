//! sysfs, read under a configurable root: `/` on a device, a fake tree in tests and the simulated site.
//! Reads are bounded and every error names the path.

use cairn_proto::control::{NvmeSummary, SensorFacts};
use std::io::Read;
use std::path::{Path, PathBuf};

/// sysfs attributes are short; anything longer than this is not an attribute we understand.
const MAX_ATTR_BYTES: u64 = 4096;

#[derive(Debug, Clone)]
pub struct SysRoot {
    root: PathBuf,
}

impl SysRoot {
    pub fn new(root: PathBuf) -> Self {
        SysRoot { root }
    }

    pub(crate) fn class(&self, class: &str) -> PathBuf {
        self.root.join("sys/class").join(class)
    }

    /// One attribute file, trimmed.
    pub fn attr(&self, path: &Path) -> Result<String, String> {
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_ATTR_BYTES).read_to_string(&mut text))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(text.trim().to_owned())
    }

    /// Entries of a sysfs class directory whose names start with `prefix`, sorted. A missing class directory
    /// is an empty list: the machine simply has none of those devices.
    fn entries(&self, class: &str, prefix: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.class(class))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn read(&self) -> Result<SensorFacts, String> {
        if !self.root.join("sys").is_dir() {
            return Err(format!(
                "{} has no sys/ directory (check hardware.sys_root)",
                self.root.display()
            ));
        }
        let hwmon_chips = self
            .entries("hwmon", "hwmon")
            .iter()
            .filter_map(|p| self.attr(&p.join("name")).ok())
            .collect();
        let rapl_zones = self
            .entries("powercap", "intel-rapl:")
            .iter()
            .filter_map(|p| self.attr(&p.join("name")).ok())
            .collect();
        let nvme_drives = self
            .entries("nvme", "nvme")
            .iter()
            .map(|p| NvmeSummary {
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                model: self.attr(&p.join("model")).unwrap_or_default(),
                serial: self.attr(&p.join("serial")).unwrap_or_default(),
            })
            .collect();
        Ok(SensorFacts {
            hwmon_chips,
            rapl_zones,
            nvme_drives,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_small_tree_and_tolerates_missing_classes() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        std::fs::create_dir_all(r.join("sys/class/hwmon/hwmon0")).unwrap();
        std::fs::write(r.join("sys/class/hwmon/hwmon0/name"), "coretemp\n").unwrap();
        std::fs::create_dir_all(r.join("sys/class/nvme/nvme0")).unwrap();
        std::fs::write(
            r.join("sys/class/nvme/nvme0/model"),
            "Samsung SSD 990 PRO 2TB   \n",
        )
        .unwrap();
        let facts = SysRoot::new(r.to_owned()).read().unwrap();
        assert_eq!(facts.hwmon_chips, ["coretemp"]);
        assert!(facts.rapl_zones.is_empty());
        assert_eq!(facts.nvme_drives[0].model, "Samsung SSD 990 PRO 2TB");
        assert_eq!(
            facts.nvme_drives[0].serial, "",
            "missing attribute reads as empty"
        );
    }

    #[test]
    fn missing_root_names_the_key() {
        let err = SysRoot::new("/nonexistent/root".into()).read().unwrap_err();
        assert!(
            err.contains("hardware.sys_root") && err.contains("/nonexistent/root"),
            "{err}"
        );
    }
}
