//! The fake library as the agent sees it: loaded by nvml-wrapper from a path, answering the queries the agent
//! makes, and injecting faults when its file changes. Each test runs in its own process under nextest; under
//! plain `cargo test` they share one, so each test uses its own config file only through a fresh process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use std::path::PathBuf;
use std::process::Command;

/// The cdylib cargo built for this package: beside the test binary in target/<profile>/deps.
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.with_file_name("libcairn_fake_nvml.so");
    assert!(
        lib.exists(),
        "{} is missing: build it with `cargo build -p cairn-fake-nvml`",
        lib.display()
    );
    lib
}

/// Runs one scenario in a child process so each gets a fresh library state and its own FAKE_NVML_CONFIG.
fn run_scenario(name: &str, config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gpus.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--include-ignored"])
        .env("FAKE_NVML_CONFIG", &cfg)
        .env("FAKE_NVML_SCENARIO", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "{name} did not run"
    );
}

fn in_scenario() -> bool {
    std::env::var_os("FAKE_NVML_SCENARIO").is_some()
}

fn load() -> Nvml {
    Nvml::builder()
        .lib_path(library().as_os_str())
        .init()
        .unwrap()
}

#[test]
fn eight_h100s() {
    run_scenario("scenario_eight_h100s", "profile = \"h100x8\"\n");
}

#[test]
#[ignore = "run by eight_h100s in its own process"]
fn scenario_eight_h100s() {
    assert!(in_scenario());
    let nvml = load();
    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.device_count().unwrap(), 8);
    let mut uuids = std::collections::HashSet::new();
    for i in 0..8 {
        let d = nvml.device_by_index(i).unwrap();
        assert_eq!(d.name().unwrap(), "NVIDIA H100 80GB HBM3");
        assert!(uuids.insert(d.uuid().unwrap()));
        assert!(d.pci_info().unwrap().bus_id.starts_with("00000000:"));
        let t = d.temperature(TemperatureSensor::Gpu).unwrap();
        assert!((20..90).contains(&t), "temperature {t}");
        let m = d.memory_info().unwrap();
        assert_eq!(m.total, 85_520_809_984);
        assert!(m.used + m.free <= m.total);
        assert_eq!(
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)
                .unwrap(),
            0
        );
        assert!(d.power_usage().unwrap() > 50_000);
    }
}

#[test]
fn faults_injected_at_runtime() {
    run_scenario(
        "scenario_faults_injected_at_runtime",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by faults_injected_at_runtime in its own process"]
fn scenario_faults_injected_at_runtime() {
    assert!(in_scenario());
    let cfg = PathBuf::from(std::env::var_os("FAKE_NVML_CONFIG").unwrap());
    let nvml = load();
    let d3 = nvml.device_by_index(3).unwrap();
    let mut set = nvml.create_event_set().unwrap();
    set = d3
        .register_events(
            nvml_wrapper::bitmasks::event::EventTypes::CRITICAL_XID_ERROR,
            set,
        )
        .unwrap();
    assert!(matches!(set.wait(50), Err(NvmlError::Timeout)));

    // Same mtime granularity guard: make sure the rewrite is seen as a change.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(
        &cfg,
        "profile = \"h100x8\"\n[gpu.3]\nxid = [79]\necc_double_bit = 2\n[gpu.5]\nlost = true\n",
    )
    .unwrap();
    let ev = set.wait(1000).unwrap();
    assert!(
        matches!(
            ev.event_data,
            Some(nvml_wrapper::enums::event::XidError::Value(79))
        ),
        "{:?}",
        ev.event_data
    );
    assert_eq!(ev.device.index().unwrap(), 3);
    // Delivered once only.
    assert!(matches!(set.wait(50), Err(NvmlError::Timeout)));
    assert_eq!(
        d3.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)
            .unwrap(),
        2
    );
    let d5 = nvml.device_by_index(5).unwrap();
    assert!(matches!(
        d5.temperature(TemperatureSensor::Gpu),
        Err(NvmlError::GpuLost)
    ));
}

#[test]
fn driver_not_loaded() {
    run_scenario("scenario_driver_not_loaded", "driver_loaded = false\n");
}

#[test]
#[ignore = "run by driver_not_loaded in its own process"]
fn scenario_driver_not_loaded() {
    assert!(in_scenario());
    let err = Nvml::builder()
        .lib_path(library().as_os_str())
        .init()
        .unwrap_err();
    assert!(matches!(err, NvmlError::DriverNotLoaded), "{err:?}");
}

#[test]
fn malformed_file_fails_init() {
    run_scenario(
        "scenario_malformed_file_fails_init",
        "profile = \"a100x3\"\n",
    );
}

#[test]
#[ignore = "run by malformed_file_fails_init in its own process"]
fn scenario_malformed_file_fails_init() {
    assert!(in_scenario());
    assert!(Nvml::builder()
        .lib_path(library().as_os_str())
        .init()
        .is_err());
}
