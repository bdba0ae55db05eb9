//! The simulated site: every piece a real process or file boundary, never a mock inside the agent.
//!
//! - a software TPM (swtpm, through `tpm/scripts/swtpm-start`),
//! - the reference fleet (`cairn-fleet serve`),
//! - the fake `libnvidia-ml.so` with a GPU profile file,
//! - a fake sysfs tree (hwmon, RAPL, NVMe),
//! - `cairnd` configured to use all of them.
//!
//! All state lives under one directory, described by `DIR/site.env`. The demo, the tests and people debugging
//! use the same site (`just sim-up DIR`, `just sim-down DIR`).

pub mod measured_boot;
pub mod nspawn;
pub mod nvme_fixtures;
pub mod process;
pub mod site;
pub mod spool_torture;
pub mod sysfs_tree;
pub mod telemetry_peer;

pub use site::{Site, SiteError, SiteOptions, Trust};
