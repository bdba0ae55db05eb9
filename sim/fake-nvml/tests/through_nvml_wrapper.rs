//! The fake library as the agent sees it: loaded by nvml-wrapper from a path, answering the queries the agent
//! makes, and injecting faults when its file changes. Each test runs in its own process under nextest; under
//! plain `cargo test` they share one, so each test uses its own config file only through a fresh process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_NVLINK_BANDWIDTH_C0_TOTAL,
    NVML_FI_DEV_PCIE_REPLAY_COUNTER, NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE,
    NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_REMAPPED_UNC, NVML_FI_DEV_RETIRED_DBE,
    NVML_FI_DEV_RETIRED_SBE, NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
};
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

/// Replaces the fault file the way the simulated site does (a new file renamed over), after a pause so its
/// modification time differs from the previous one's.
fn rewrite(text: &str) {
    let cfg = PathBuf::from(std::env::var_os("FAKE_NVML_CONFIG").unwrap());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tmp = cfg.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &cfg).unwrap();
}

fn field_ids(ids: &[u32]) -> Vec<FieldId> {
    ids.iter().map(|&i| FieldId(i)).collect()
}

/// Field values as `Ok(u64)` or the per-field error.
fn fields(d: &nvml_wrapper::Device, ids: &[u32]) -> Vec<Result<u64, NvmlError>> {
    d.field_values_for(&field_ids(ids))
        .unwrap()
        .into_iter()
        .map(|s| match s.and_then(|s| s.value)? {
            SampleValue::U32(v) => Ok(u64::from(v)),
            SampleValue::U64(v) => Ok(v),
            other => panic!("unexpected value type {other:?}"),
        })
        .collect()
}

/// `nvmlDeviceGetRemappedRows`, which nvml-wrapper 0.13 does not wrap: called through its loaded symbol.
fn remapped_rows(nvml: &Nvml, d: &nvml_wrapper::Device) -> Result<[u32; 4], NvmlError> {
    let f = nvml
        .lib()
        .nvmlDeviceGetRemappedRows
        .as_ref()
        .expect("the fake exports nvmlDeviceGetRemappedRows");
    let mut rows = [0u32; 4];
    let [c, u, p, x] = &mut rows;
    // SAFETY: a live handle from this NVML, four valid out-pointers.
    let code = unsafe { f(d.handle(), c, u, p, x) };
    match code {
        0 => Ok(rows),
        15 => Err(NvmlError::GpuLost),
        other => Err(NvmlError::UnexpectedVariant(other)),
    }
}

#[test]
fn telemetry_of_eight_h100s() {
    run_scenario(
        "scenario_telemetry_of_eight_h100s",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by telemetry_of_eight_h100s in its own process"]
fn scenario_telemetry_of_eight_h100s() {
    assert!(in_scenario());
    let nvml = load();
    for i in 0..8 {
        let d = nvml.device_by_index(i).unwrap();
        let e1 = d.total_energy_consumption().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(d.total_energy_consumption().unwrap() > e1);
        let u = d.utilization_rates().unwrap();
        assert!(u.gpu <= 100 && u.memory <= 100);
        let enc = d.encoder_utilization().unwrap();
        let dec = d.decoder_utilization().unwrap();
        // An H100 has no NVENC: its encoder reads idle.
        assert_eq!(enc.utilization, 0);
        assert!(dec.utilization <= 100 && dec.sampling_period > 0);
        let m = d.memory_info().unwrap();
        assert!(m.used > 0 && m.free > m.used);
        assert_eq!(d.clock_info(Clock::SM).unwrap(), 1980);
        assert_eq!(d.clock_info(Clock::Memory).unwrap(), 2619);
        let reasons = d.current_throttle_reasons().unwrap();
        if i == 0 {
            assert_eq!(reasons, ThrottleReasons::GPU_IDLE);
        } else {
            assert!(reasons.is_empty(), "{reasons:?}");
        }
        assert_eq!(d.pcie_replay_counter().unwrap(), 0);
        // Hopper remaps rows; it does not retire pages.
        assert!(matches!(
            d.retired_pages(RetirementCause::DoubleBitEccError),
            Err(NvmlError::NotSupported)
        ));
        assert_eq!(remapped_rows(&nvml, &d).unwrap(), [0, 0, 0, 0]);
        let f = fields(
            &d,
            &[
                NVML_FI_DEV_MEMORY_TEMP,
                NVML_FI_DEV_REMAPPED_COR,
                NVML_FI_DEV_REMAPPED_UNC,
                NVML_FI_DEV_REMAPPED_PENDING,
                NVML_FI_DEV_REMAPPED_FAILURE,
                NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
                NVML_FI_DEV_PCIE_REPLAY_COUNTER,
                NVML_FI_DEV_RETIRED_SBE,
                NVML_FI_DEV_NVLINK_BANDWIDTH_C0_TOTAL,
            ],
        );
        let hbm = *f[0].as_ref().unwrap();
        assert!((30..60).contains(&hbm), "HBM at {hbm} C");
        assert_eq!(f[1..5].iter().map(|v| *v.as_ref().unwrap()).sum::<u64>(), 0);
        assert!(*f[5].as_ref().unwrap() >= e1);
        assert_eq!(*f[6].as_ref().unwrap(), 0);
        assert!(matches!(f[7], Err(NvmlError::NotSupported)));
        // A field the fake does not simulate: that field fails, not the call.
        assert!(matches!(f[8], Err(NvmlError::NotSupported)));
    }
}

#[test]
fn telemetry_of_one_l4() {
    run_scenario("scenario_telemetry_of_one_l4", "profile = \"l4x1\"\n");
}

#[test]
#[ignore = "run by telemetry_of_one_l4 in its own process"]
fn scenario_telemetry_of_one_l4() {
    assert!(in_scenario());
    let nvml = load();
    let d = nvml.device_by_index(0).unwrap();
    assert_eq!(d.encoder_utilization().unwrap().utilization, 3);
    assert_eq!(d.decoder_utilization().unwrap().utilization, 7);
    assert_eq!(d.clock_info(Clock::SM).unwrap(), 2040);
    assert_eq!(d.memory_info().unwrap().total, 24_152_899_584);
    // GDDR6: no memory temperature.
    let f = fields(&d, &[NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_REMAPPED_UNC]);
    assert!(matches!(f[0], Err(NvmlError::NotSupported)), "{f:?}");
    assert_eq!(*f[1].as_ref().unwrap(), 0);
}

#[test]
fn new_faults_through_the_new_functions() {
    run_scenario(
        "scenario_new_faults_through_the_new_functions",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by new_faults_through_the_new_functions in its own process"]
fn scenario_new_faults_through_the_new_functions() {
    assert!(in_scenario());
    let nvml = load();
    let d2 = nvml.device_by_index(2).unwrap();
    assert!(d2
        .retired_pages(RetirementCause::MultipleSingleBitEccErrors)
        .is_err());
    rewrite(
        "profile = \"h100x8\"\n[gpu.2]\nmemory_temperature_c = 92\nthrottle_reasons = 0x48\npcie_replays = 37\n\
         retired_pages_sbe = 2\nretired_pages_dbe = 1\nremapped_rows_correctable = 3\n\
         remapped_rows_uncorrectable = 1\nremap_pending = true\nremap_failure = true\n",
    );
    assert_eq!(
        d2.current_throttle_reasons().unwrap(),
        ThrottleReasons::HW_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN
    );
    assert_eq!(d2.pcie_replay_counter().unwrap(), 37);
    let sbe = d2
        .retired_pages(RetirementCause::MultipleSingleBitEccErrors)
        .unwrap();
    let dbe = d2
        .retired_pages(RetirementCause::DoubleBitEccError)
        .unwrap();
    assert_eq!((sbe.len(), dbe.len()), (2, 1));
    assert_ne!(sbe[0].address, sbe[1].address);
    assert!(sbe.iter().chain(&dbe).all(|p| p.timestamp > 1_600_000_000));
    assert!(!sbe.iter().any(|p| p.address == dbe[0].address));
    assert_eq!(remapped_rows(&nvml, &d2).unwrap(), [3, 1, 1, 1]);
    let f = fields(
        &d2,
        &[
            NVML_FI_DEV_MEMORY_TEMP,
            NVML_FI_DEV_REMAPPED_COR,
            NVML_FI_DEV_REMAPPED_UNC,
            NVML_FI_DEV_REMAPPED_PENDING,
            NVML_FI_DEV_REMAPPED_FAILURE,
            NVML_FI_DEV_PCIE_REPLAY_COUNTER,
            NVML_FI_DEV_RETIRED_SBE,
            NVML_FI_DEV_RETIRED_DBE,
        ],
    );
    let f: Vec<u64> = f.into_iter().map(Result::unwrap).collect();
    assert_eq!(f, vec![92, 3, 1, 1, 1, 37, 2, 1]);
    // The other GPUs are untouched.
    let d3 = nvml.device_by_index(3).unwrap();
    assert_eq!(remapped_rows(&nvml, &d3).unwrap(), [0, 0, 0, 0]);
    assert_eq!(d3.pcie_replay_counter().unwrap(), 0);

    rewrite("profile = \"h100x8\"\n[gpu.2]\nlost = true\n");
    assert!(matches!(
        d2.field_values_for(&field_ids(&[NVML_FI_DEV_MEMORY_TEMP])),
        Err(NvmlError::GpuLost)
    ));
    assert!(matches!(d2.encoder_utilization(), Err(NvmlError::GpuLost)));
    assert!(matches!(
        d2.current_throttle_reasons(),
        Err(NvmlError::GpuLost)
    ));
    assert!(matches!(remapped_rows(&nvml, &d2), Err(NvmlError::GpuLost)));
    assert!(d3.pcie_replay_counter().is_ok());
}

#[test]
fn xids_happen_once_per_process() {
    run_scenario(
        "scenario_xids_happen_once_per_process",
        "profile = \"h100x8\"\n",
    );
}

fn xid_set<'n>(nvml: &'n Nvml, gpu: u32) -> nvml_wrapper::EventSet<'n> {
    nvml.device_by_index(gpu)
        .unwrap()
        .register_events(
            EventTypes::CRITICAL_XID_ERROR,
            nvml.create_event_set().unwrap(),
        )
        .unwrap()
}

fn xid(set: &nvml_wrapper::EventSet, timeout_ms: u32) -> Result<(u32, u64), NvmlError> {
    let ev = set.wait(timeout_ms)?;
    match ev.event_data {
        Some(XidError::Value(v)) => Ok((ev.device.index().unwrap(), v)),
        other => panic!("not an XID: {other:?}"),
    }
}

#[test]
#[ignore = "run by xids_happen_once_per_process in its own process"]
fn scenario_xids_happen_once_per_process() {
    assert!(in_scenario());
    let nvml = load();
    let first = xid_set(&nvml, 3);
    rewrite("profile = \"h100x8\"\n[gpu.3]\nxid = [79]\n");
    assert_eq!(xid(&first, 1000).unwrap(), (3, 79));
    // A set created afterwards, or the same one again, does not see it a second time.
    let second = xid_set(&nvml, 3);
    assert!(matches!(xid(&second, 30), Err(NvmlError::Timeout)));
    assert!(matches!(xid(&first, 30), Err(NvmlError::Timeout)));
    drop(first);
    // Extending the list adds one XID; replacing it adds all of the new list's.
    rewrite("profile = \"h100x8\"\n[gpu.3]\nxid = [79, 48]\n");
    assert_eq!(xid(&second, 1000).unwrap(), (3, 48));
    assert!(matches!(xid(&second, 30), Err(NvmlError::Timeout)));
    rewrite("profile = \"h100x8\"\n[gpu.3]\nxid = [13, 31]\n");
    assert_eq!(xid(&second, 1000).unwrap(), (3, 13));
    assert_eq!(xid(&second, 1000).unwrap(), (3, 31));
    assert!(matches!(xid(&second, 30), Err(NvmlError::Timeout)));
}

#[test]
fn a_lost_gpu_fails_only_its_own_event_set() {
    run_scenario(
        "scenario_a_lost_gpu_fails_only_its_own_event_set",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by a_lost_gpu_fails_only_its_own_event_set in its own process"]
fn scenario_a_lost_gpu_fails_only_its_own_event_set() {
    assert!(in_scenario());
    let nvml = load();
    let five = xid_set(&nvml, 5);
    let two = xid_set(&nvml, 2);
    rewrite("profile = \"h100x8\"\n[gpu.5]\nlost = true\nxid = [79]\n");
    // The XID that came with the fall is delivered, then the set reports the GPU lost.
    let ev = five.wait(1000).unwrap();
    assert!(matches!(ev.event_data, Some(XidError::Value(79))));
    assert!(matches!(five.wait(30), Err(NvmlError::GpuLost)));
    assert!(matches!(xid(&two, 30), Err(NvmlError::Timeout)));
    rewrite("profile = \"h100x8\"\n[gpu.5]\nlost = true\nxid = [79]\n[gpu.2]\nxid = [94]\n");
    assert_eq!(xid(&two, 1000).unwrap(), (2, 94));
    // A lost GPU cannot be registered; once it is back, it can.
    let d5 = nvml.device_by_index(5).unwrap();
    let err = d5
        .register_events(
            EventTypes::CRITICAL_XID_ERROR,
            nvml.create_event_set().unwrap(),
        )
        .unwrap_err();
    assert!(matches!(err.error, NvmlError::GpuLost), "{err:?}");
    rewrite("profile = \"h100x8\"\n");
    let back = xid_set(&nvml, 5);
    assert!(matches!(xid(&back, 30), Err(NvmlError::Timeout)));
}
