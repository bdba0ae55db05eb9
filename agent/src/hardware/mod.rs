//! What the agent reads from the machine's hardware. Each source sits behind a narrow seam a test can fill:
//! GPUs behind [`gpu::GpuSource`] (NVML in production, the fake libnvidia-ml in the simulated site), sysfs
//! and /dev behind a configurable root directory ([`sysfs::SysRoot`]), filled with a fake tree in tests;
//! NVMe SMART logs behind [`nvme::SmartSource`] (the admin ioctl, or fixture NVMe logs in that tree); the
//! BMC's power reading behind [`power::IpmiTransport`], the UPS through a NUT server ([`power::nut`]).

pub mod gpu;
pub mod network;
pub mod nvme;
pub mod power;
pub mod sysfs;
