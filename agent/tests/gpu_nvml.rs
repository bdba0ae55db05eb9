//! `NvmlGpus::read` over the fake libnvidia-ml (sim/fake-nvml): every reading of every GPU, XIDs delivered
//! exactly once, and a lost GPU that does not take the others with it. The fake keeps process-wide state and
//! reads `FAKE_NVML_CONFIG` once, so each scenario runs in a child process of its own, as in the fake's tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_agent::hardware::gpu::{
    samples, GpuMetrics, GpuReading, GpuSource, NvmlGpus, RemappedRows, XidEvent,
};
use std::path::PathBuf;
use std::process::Command;

/// The fake library cargo built: beside this test binary (target/<profile>/deps) or one level up.
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [
        deps.join("libcairn_fake_nvml.so"),
        deps.parent().unwrap().join("libcairn_fake_nvml.so"),
    ];
    let newest = candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p.clone());
    newest.unwrap_or_else(|| {
        panic!(
            "the fake NVML library is missing beside {}: build it with `cargo build -p cairn-fake-nvml`",
            exe.display()
        )
    })
}

/// Runs one scenario in a child process with its own FAKE_NVML_CONFIG.
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
        "{name} failed (if symbols are missing, rebuild the fake: `cargo build -p cairn-fake-nvml`):\n{}\n{}",
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

/// Replaces the fault file as the simulated site does, after a pause so its modification time differs.
fn rewrite(text: &str) {
    let cfg = PathBuf::from(std::env::var_os("FAKE_NVML_CONFIG").unwrap());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tmp = cfg.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &cfg).unwrap();
}

fn gpus() -> NvmlGpus {
    NvmlGpus::new(library())
}

fn read(g: &mut NvmlGpus) -> GpuReading {
    g.read().unwrap()
}

fn uuid(index: u32) -> String {
    format!(
        "GPU-{:08x}-cafe-4000-8000-{:012x}",
        0xc0ffee00_u32 + index,
        u64::from(index) + 1
    )
}

/// Every reading the fake provides for an H100, and nothing it does not.
fn assert_full_h100(m: &GpuMetrics) {
    let i = m.index;
    assert_eq!(m.problem, None, "GPU {i}");
    assert_eq!(m.name, "NVIDIA H100 80GB HBM3");
    assert_eq!(m.uuid, uuid(i));
    assert!(m.pci_bus_id.starts_with("00000000:"), "{}", m.pci_bus_id);
    assert_eq!(m.temperature_c, Some(33 + i));
    assert_eq!(m.memory_temperature_c, Some(38 + i));
    assert_eq!(m.power_w, Some(72.0 + 1.5 * f64::from(i)));
    assert!(m.energy_mj.is_some());
    assert_eq!(m.util_gpu, Some(10 * i));
    assert_eq!(m.util_mem_copy, Some(5 * i));
    assert_eq!((m.util_enc, m.util_dec), (Some(0), Some(0)));
    assert_eq!(m.fb_used_mib, Some(512 * (u64::from(i) + 1)));
    let free = m.fb_free_mib.unwrap();
    assert!((75_000..81_600).contains(&free), "{free} MiB free");
    assert_eq!((m.sm_clock_mhz, m.mem_clock_mhz), (Some(1980), Some(2619)));
    assert_eq!((m.ecc_sbe_total, m.ecc_dbe_total), (Some(0), Some(0)));
    assert_eq!(m.throttle_reasons, Some(u64::from(i == 0)));
    assert_eq!(m.pcie_replays, Some(0));
    // Hopper remaps rows instead of retiring pages.
    assert_eq!((m.retired_pages_sbe, m.retired_pages_dbe), (None, None));
    assert_eq!(m.remapped_rows, Some(RemappedRows::default()));
    assert_eq!(m.last_xid, Some(0));
}

#[test]
fn eight_h100s_read_in_full() {
    run_scenario(
        "scenario_eight_h100s_read_in_full",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by eight_h100s_read_in_full in its own process"]
fn scenario_eight_h100s_read_in_full() {
    assert!(in_scenario());
    let mut g = gpus();
    let r = read(&mut g);
    assert_eq!(r.facts.driver_version, "550.54.15");
    assert_eq!(r.gpus.len(), 8);
    assert!(r.xids.is_empty());
    for (i, m) in r.gpus.iter().enumerate() {
        assert_eq!(m.index as usize, i);
        assert_full_h100(m);
        assert_eq!(r.facts.gpus[i], m.summary());
    }
    // The energy counter counts up between polls.
    let e0 = r.gpus[0].energy_mj.unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(read(&mut g).gpus[0].energy_mj.unwrap() > e0);
    // Every series for every GPU (retired pages excepted: not on Hopper).
    let s = samples(&r, "node-1");
    assert_eq!(s.len(), 8 * 21);
    assert_eq!(
        s.iter()
            .filter(|x| x.name == "DCGM_FI_DEV_MEMORY_TEMP")
            .count(),
        8
    );
    assert!(!s.iter().any(|x| x.name == "DCGM_FI_DEV_RETIRED_DBE"));
}

#[test]
fn one_l4_without_memory_temperature() {
    run_scenario(
        "scenario_one_l4_without_memory_temperature",
        "profile = \"l4x1\"\n",
    );
}

#[test]
#[ignore = "run by one_l4_without_memory_temperature in its own process"]
fn scenario_one_l4_without_memory_temperature() {
    assert!(in_scenario());
    let r = read(&mut gpus());
    assert_eq!(r.gpus.len(), 1);
    let m = &r.gpus[0];
    assert_eq!(m.name, "NVIDIA L4");
    // GDDR6 has no temperature NVML reports: left out, and not a problem.
    assert_eq!(m.memory_temperature_c, None);
    assert_eq!(m.problem, None);
    assert_eq!((m.util_enc, m.util_dec), (Some(3), Some(7)));
    assert_eq!(m.sm_clock_mhz, Some(2040));
    let s = samples(&r, "edge");
    assert!(!s.iter().any(|x| x.name == "DCGM_FI_DEV_MEMORY_TEMP"));
    assert!(s
        .iter()
        .any(|x| x.name == "DCGM_FI_DEV_ENC_UTIL" && x.value == 3.0));
}

#[test]
fn injected_faults_show_in_the_reading() {
    run_scenario(
        "scenario_injected_faults_show_in_the_reading",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by injected_faults_show_in_the_reading in its own process"]
fn scenario_injected_faults_show_in_the_reading() {
    assert!(in_scenario());
    let mut g = gpus();
    read(&mut g);
    rewrite(
        "profile = \"h100x8\"\n[gpu.6]\ntemperature_c = 91\nmemory_temperature_c = 95\nthrottle_reasons = 0x48\n\
         pcie_replays = 37\necc_single_bit = 12\necc_double_bit = 1\nretired_pages_sbe = 2\nretired_pages_dbe = 1\n\
         remapped_rows_correctable = 3\nremapped_rows_uncorrectable = 1\nremap_pending = true\nremap_failure = true\n",
    );
    let r = read(&mut g);
    let m = &r.gpus[6];
    assert_eq!(m.problem, None);
    assert_eq!(
        (m.temperature_c, m.memory_temperature_c),
        (Some(91), Some(95))
    );
    assert_eq!(m.throttle_reasons, Some(0x48));
    assert_eq!(m.pcie_replays, Some(37));
    assert_eq!((m.ecc_sbe_total, m.ecc_dbe_total), (Some(12), Some(1)));
    assert_eq!(
        (m.retired_pages_sbe, m.retired_pages_dbe),
        (Some(2), Some(1))
    );
    assert_eq!(
        m.remapped_rows,
        Some(RemappedRows {
            correctable: 3,
            uncorrectable: 1,
            pending: true,
            failure: true
        })
    );
    let s = samples(&r, "h");
    let of = |name: &str| {
        s.iter()
            .find(|x| x.name == name && x.labels[0].1 == "6")
            .unwrap_or_else(|| panic!("{name} missing"))
            .value
    };
    assert_eq!(of("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"), 72.0);
    assert_eq!(of("DCGM_FI_DEV_ROW_REMAP_FAILURE"), 1.0);
    assert_eq!(of("DCGM_FI_DEV_RETIRED_SBE"), 2.0);
    for other in r.gpus.iter().filter(|m| m.index != 6) {
        assert_full_h100(other);
    }
}

#[test]
fn an_xid_is_delivered_once() {
    run_scenario(
        "scenario_an_xid_is_delivered_once",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by an_xid_is_delivered_once in its own process"]
fn scenario_an_xid_is_delivered_once() {
    assert!(in_scenario());
    let mut g = gpus();
    assert!(read(&mut g).xids.is_empty());
    rewrite("profile = \"h100x8\"\n[gpu.3]\nxid = [79]\n");
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = read(&mut g);
        seen.extend(r.xids);
        if !seen.is_empty() {
            // Once seen, the GPU's gauge holds it; the other GPUs still read 0.
            assert_eq!(r.gpus[3].last_xid, Some(79));
            assert_eq!(r.gpus[2].last_xid, Some(0));
        }
    }
    assert_eq!(
        seen,
        vec![XidEvent {
            gpu: 3,
            uuid: uuid(3),
            xid: 79
        }]
    );
    // A second XID on the same GPU, and one on another: each once more.
    rewrite("profile = \"h100x8\"\n[gpu.3]\nxid = [79, 48]\n[gpu.0]\nxid = [13]\n");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.extend(read(&mut g).xids);
    }
    seen.sort_by_key(|x| x.gpu);
    assert_eq!(
        seen.iter().map(|x| (x.gpu, x.xid)).collect::<Vec<_>>(),
        vec![(0, 13), (3, 48)]
    );
    let r = read(&mut g);
    assert_eq!(
        (r.gpus[0].last_xid, r.gpus[3].last_xid),
        (Some(13), Some(48))
    );
}

#[test]
fn a_lost_gpu_keeps_the_others() {
    run_scenario(
        "scenario_a_lost_gpu_keeps_the_others",
        "profile = \"h100x8\"\n",
    );
}

#[test]
#[ignore = "run by a_lost_gpu_keeps_the_others in its own process"]
fn scenario_a_lost_gpu_keeps_the_others() {
    assert!(in_scenario());
    let mut g = gpus();
    read(&mut g);
    // GPU 5 falls off the bus, with the XID that says so.
    rewrite("profile = \"h100x8\"\n[gpu.5]\nlost = true\nxid = [79]\n");
    let r = read(&mut g);
    assert_eq!(
        r.xids,
        vec![XidEvent {
            gpu: 5,
            uuid: uuid(5),
            xid: 79
        }]
    );
    let lost = &r.gpus[5];
    assert!(
        lost.problem.as_deref().unwrap().contains("lost"),
        "{lost:?}"
    );
    // Its labels are kept; its readings are not.
    assert_eq!(lost.uuid, uuid(5));
    assert_eq!((lost.temperature_c, lost.sm_clock_mhz), (None, None));
    assert_eq!(lost.last_xid, Some(79));
    assert_eq!(r.facts.gpus[5].problem, lost.problem);
    for m in r.gpus.iter().filter(|m| m.index != 5) {
        assert_full_h100(m);
    }
    // The next polls: still lost, no XID repeated, and the other GPUs' XIDs still arrive.
    rewrite("profile = \"h100x8\"\n[gpu.5]\nlost = true\nxid = [79]\n[gpu.2]\nxid = [94]\n");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = read(&mut g);
        assert!(r.gpus[5].problem.is_some());
        assert!(r.gpus[2].problem.is_none());
        seen.extend(r.xids);
    }
    assert_eq!(
        seen.iter().map(|x| (x.gpu, x.xid)).collect::<Vec<_>>(),
        vec![(2, 94)]
    );
    // Back on the bus: read in full again, its XIDs watched again.
    rewrite("profile = \"h100x8\"\n[gpu.5]\nxid = [79]\n[gpu.2]\nxid = [94]\n");
    let r = read(&mut g);
    assert!(r.xids.is_empty(), "{:?}", r.xids);
    let back = &r.gpus[5];
    assert_eq!(back.problem, None);
    assert_eq!(back.temperature_c, Some(38));
    assert_eq!(back.last_xid, Some(79));
    rewrite("profile = \"h100x8\"\n[gpu.5]\nxid = [79, 45]\n[gpu.2]\nxid = [94]\n");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.extend(read(&mut g).xids);
    }
    assert_eq!(
        seen.iter().map(|x| (x.gpu, x.xid)).collect::<Vec<_>>(),
        vec![(5, 45)]
    );
}

#[test]
fn no_driver_is_a_reason_not_a_crash() {
    run_scenario(
        "scenario_no_driver_is_a_reason_not_a_crash",
        "driver_loaded = false\n",
    );
}

#[test]
#[ignore = "run by no_driver_is_a_reason_not_a_crash in its own process"]
fn scenario_no_driver_is_a_reason_not_a_crash() {
    assert!(in_scenario());
    let e = gpus().read().unwrap_err();
    assert!(e.starts_with("NVML unavailable ("), "{e}");
    assert!(e.contains("driver is not loaded"), "{e}");
}
