//! What the agent reads from the machine's hardware. Each source sits behind a narrow seam a test can fill:
//! GPUs behind [`gpu::GpuSource`] (NVML in production, the fake libnvidia-ml in the simulated site), sysfs
//! and /dev behind a configurable root directory ([`sysfs::SysRoot`]), filled with a fake tree in tests.

pub mod gpu;
pub mod sysfs;
