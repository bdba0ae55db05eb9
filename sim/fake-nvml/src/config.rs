//! The fake's input file: a GPU profile plus per-GPU faults.
//!
//! ```toml
//! profile = "h100x8"            # "l4x1" (default), "h100x8", or "none" (driver loaded, no GPU)
//! driver_loaded = true          # false: nvmlInit and nvmlDeviceGetCount fail with NVML_ERROR_DRIVER_NOT_LOADED
//! [gpu.3]
//! xid = [79]                    # XID errors, each delivered once through an NVML event set
//! ecc_single_bit = 12           # corrected (single-bit) ECC errors, aggregate
//! ecc_double_bit = 1            # uncorrected (double-bit) ECC errors, aggregate
//! temperature_c = 95            # overrides the profile's temperature
//! memory_temperature_c = 92     # overrides the HBM temperature (H100); reported on an L4 only when set
//! throttle_reasons = 0x48       # nvmlClocksThrottleReasons bitmask (0x8 HW slowdown, 0x40 HW thermal)
//! pcie_replays = 37             # PCIe replay counter
//! retired_pages_sbe = 2         # pages retired for single-bit errors; L4 and H100 remap rows instead,
//! retired_pages_dbe = 1         #   so page retirement is "not supported" unless one of these is set
//! remapped_rows_correctable = 3   # rows remapped for correctable errors
//! remapped_rows_uncorrectable = 1 # rows remapped for uncorrectable errors
//! remap_pending = true          # a remap waits for a GPU reset
//! remap_failure = true          # a remap failed (no spare row left)
//! lost = true                   # every query on this GPU returns NVML_ERROR_GPU_IS_LOST
//! ```
//!
//! XIDs are delivered in the order listed, each once per process: to the first event set registered for the GPU
//! that waits after the XID appears in the file; event sets created later do not see it again. Appending to the
//! list injects the new entries; a list that no longer starts with what was delivered is new as a whole.
//! A lost GPU's event set delivers its pending XIDs, then fails with NVML_ERROR_GPU_IS_LOST.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    L4x1,
    H100x8,
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeConfig {
    pub profile: Profile,
    pub driver_loaded: bool,
    pub driver_version: String,
    pub gpu: BTreeMap<String, GpuFault>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            profile: Profile::default(),
            driver_loaded: true,
            driver_version: "550.54.15".to_owned(),
            gpu: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuFault {
    pub xid: Vec<u64>,
    pub ecc_single_bit: u64,
    pub ecc_double_bit: u64,
    pub temperature_c: Option<u32>,
    pub memory_temperature_c: Option<u32>,
    pub throttle_reasons: Option<u64>,
    pub pcie_replays: u32,
    pub retired_pages_sbe: Option<u32>,
    pub retired_pages_dbe: Option<u32>,
    pub remapped_rows_correctable: u32,
    pub remapped_rows_uncorrectable: u32,
    pub remap_pending: bool,
    pub remap_failure: bool,
    pub lost: bool,
}

impl GpuFault {
    /// Whether the GPU reports page retirement: only when the file gives it retired pages.
    pub fn retires_pages(&self) -> bool {
        self.retired_pages_sbe.is_some() || self.retired_pages_dbe.is_some()
    }
}

/// The static description of one simulated GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuModel {
    pub name: &'static str,
    pub memory_total_bytes: u64,
    pub idle_power_mw: u32,
    pub base_temperature_c: u32,
    /// HBM temperature NVML reports through `NVML_FI_DEV_MEMORY_TEMP`; `None` where it has no sensor (GDDR).
    pub base_memory_temperature_c: Option<u32>,
    /// Video encoder and decoder utilisation (%) under the simulated load. An H100 has no NVENC: NVML reports
    /// its encoder as idle.
    pub encoder_util: u32,
    pub decoder_util: u32,
    pub sm_clock_mhz: u32,
    pub mem_clock_mhz: u32,
    pub pci_device_id: u32,
}

const L4: GpuModel = GpuModel {
    name: "NVIDIA L4",
    memory_total_bytes: 24_152_899_584,
    idle_power_mw: 16_000,
    base_temperature_c: 41,
    base_memory_temperature_c: None,
    encoder_util: 3,
    decoder_util: 7,
    sm_clock_mhz: 2040,
    mem_clock_mhz: 6251,
    pci_device_id: 0x27b8_10de,
};

const H100: GpuModel = GpuModel {
    name: "NVIDIA H100 80GB HBM3",
    memory_total_bytes: 85_520_809_984,
    idle_power_mw: 72_000,
    base_temperature_c: 33,
    base_memory_temperature_c: Some(38),
    encoder_util: 0,
    decoder_util: 0,
    sm_clock_mhz: 1980,
    mem_clock_mhz: 2619,
    pci_device_id: 0x2330_10de,
};

impl Profile {
    pub fn gpus(self) -> Vec<GpuModel> {
        match self {
            Profile::L4x1 => vec![L4],
            Profile::H100x8 => vec![H100; 8],
            Profile::None => Vec::new(),
        }
    }
}

impl FakeConfig {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn fault(&self, index: usize) -> Option<&GpuFault> {
        self.gpu.get(&index.to_string())
    }
}

/// A stable UUID per GPU index, shaped like NVIDIA's (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
pub fn uuid(index: usize) -> String {
    format!(
        "GPU-{:08x}-cafe-4000-8000-{:012x}",
        0xc0ffee00_u32 + index as u32,
        index as u64 + 1
    )
}

/// PCI bus of GPU `index`: the way 8-GPU boards spread them over root ports.
pub fn pci_bus(index: usize) -> u32 {
    [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb]
        .get(index)
        .copied()
        .unwrap_or(0x10 + index as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_one_l4() {
        let c = FakeConfig::parse("").unwrap();
        assert_eq!(c.profile.gpus().len(), 1);
        assert!(c.driver_loaded);
    }

    #[test]
    fn faults_parse_and_typos_are_refused() {
        let c =
            FakeConfig::parse("profile = \"h100x8\"\n[gpu.3]\nxid = [79]\nlost = true\n").unwrap();
        assert_eq!(c.profile.gpus().len(), 8);
        assert_eq!(c.fault(3).unwrap().xid, vec![79]);
        assert!(FakeConfig::parse("[gpu.3]\nxids = [79]\n").is_err());
        assert!(FakeConfig::parse("profile = \"a100x4\"\n").is_err());
    }

    #[test]
    fn new_fault_keys_parse() {
        let c = FakeConfig::parse(
            "[gpu.2]\nmemory_temperature_c = 92\nthrottle_reasons = 0x48\npcie_replays = 37\n\
             retired_pages_dbe = 1\nremapped_rows_uncorrectable = 2\nremap_pending = true\n",
        )
        .unwrap();
        let f = c.fault(2).unwrap();
        assert_eq!(f.throttle_reasons, Some(0x48));
        assert_eq!(f.memory_temperature_c, Some(92));
        assert!(f.retires_pages() && f.remap_pending && !f.remap_failure);
        assert!(!c.fault(3).is_some_and(GpuFault::retires_pages));
    }
}
