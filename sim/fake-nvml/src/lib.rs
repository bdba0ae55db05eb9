//! A fake `libnvidia-ml.so`: the NVML C API over simulated GPUs, for machines without NVIDIA hardware.
//!
//! The agent loads it exactly as it loads the real library (nvml-wrapper, configured library path), so
//! everything above the C ABI is the production code path. What it simulates comes from the TOML file named by
//! `FAKE_NVML_CONFIG` (see [`config`]), re-read whenever the file changes, so tests inject faults into a running
//! agent by rewriting it. Without the variable it simulates one L4.

pub mod config;
mod ffi;
mod state;

pub use config::{FakeConfig, Profile};
