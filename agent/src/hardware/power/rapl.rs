//! RAPL energy counters from the powercap class (`sys/class/powercap/intel-rapl:N[:M]`, also on AMD).
//!
//! `energy_uj` is a free-running microjoule counter that wraps at `max_energy_range_uj`. [`Rapl`] keeps the
//! previous reading of every zone and turns the counter into a monotonically increasing joules total across
//! wrap-arounds, and the average power between two polls. It starts at the first raw reading, so right after
//! start the total equals what node_exporter reports; it then keeps growing where node_exporter's value wraps.
//! A wrap is only seen if the counter wraps at most once between polls: at the default poll interval a
//! package would have to draw tens of kilowatts to wrap twice.
//!
//! Zone names and indexes are node_exporter's (procfs `GetRaplZones`): the `name` attribute without a
//! numeric `-N` suffix, which becomes the index; names without one are indexed by how many zones of that name
//! came before, in directory order.

use super::{read_attr, read_u64, PowerError};
use crate::telemetry::Sample;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;

/// The label node_exporter gives a zone: its path on the machine, whatever `hardware.sys_root` is.
const MACHINE_POWERCAP: &str = "/sys/class/powercap";

/// One RAPL zone at one poll.
#[derive(Debug, Clone, PartialEq)]
pub struct RaplZone {
    /// Directory under `sys/class/powercap`: `intel-rapl:0`, `intel-rapl:0:0`, `intel-rapl-mmio:0`.
    pub zone: String,
    /// node_exporter's zone name: `package`, `dram`, `core`, `uncore`, `psys`.
    pub name: String,
    /// node_exporter's `index` label.
    pub index: u32,
    /// node_exporter's `path` label: `/sys/class/powercap/intel-rapl:0`.
    pub path: String,
    /// The counter, or why it could not be read (`energy_uj` is root-only on current kernels).
    pub energy: Result<RaplEnergy, String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RaplEnergy {
    /// Monotonic across wrap-arounds while cairnd runs.
    pub joules_total: f64,
    /// Average power since the previous poll; `None` at the first poll of a zone, after a counter reset that
    /// cannot be explained as a wrap, or when no time has passed.
    pub watts: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct ZoneState {
    last_uj: u64,
    at: Instant,
    total_uj: u64,
}

/// The RAPL reader: the previous reading of every zone, keyed by directory.
#[derive(Debug, Default)]
pub struct Rapl {
    zones: HashMap<String, ZoneState>,
}

/// Microjoules consumed between two readings of a counter that wraps after `max_range_uj`: the counter
/// counts up to `max_range_uj` and continues from 0. `None` when a decrease cannot be a wrap (the range is
/// unknown or zero, or the previous reading lies outside it): the counter was reset.
pub fn energy_delta(prev_uj: u64, now_uj: u64, max_range_uj: u64) -> Option<u64> {
    if now_uj >= prev_uj {
        return Some(now_uj - prev_uj);
    }
    if max_range_uj == 0 || prev_uj > max_range_uj {
        return None;
    }
    // (max - prev) + 1 + now, without overflow for any inputs.
    let delta = u128::from(max_range_uj - prev_uj) + 1 + u128::from(now_uj);
    u64::try_from(delta).ok()
}

impl Rapl {
    pub fn new() -> Self {
        Rapl::default()
    }

    /// Feeds one reading of one zone and returns its accumulated energy. `max_range_uj` 0 means unknown.
    pub fn observe(
        &mut self,
        zone: &str,
        energy_uj: u64,
        max_range_uj: u64,
        at: Instant,
    ) -> RaplEnergy {
        let (total_uj, watts) = match self.zones.get(zone) {
            None => (energy_uj, None),
            Some(prev) => match energy_delta(prev.last_uj, energy_uj, max_range_uj) {
                Some(delta) => {
                    let secs = at.saturating_duration_since(prev.at).as_secs_f64();
                    let watts = (secs > 0.0).then(|| delta as f64 / 1e6 / secs);
                    (prev.total_uj.saturating_add(delta), watts)
                }
                None => (prev.total_uj, None),
            },
        };
        self.zones.insert(
            zone.to_owned(),
            ZoneState {
                last_uj: energy_uj,
                at,
                total_uj,
            },
        );
        RaplEnergy {
            joules_total: total_uj as f64 / 1e6,
            watts,
        }
    }

    /// Reads every RAPL zone under `root`, now.
    pub fn read(&mut self, root: &Path) -> Vec<RaplZone> {
        self.read_at(root, Instant::now())
    }

    /// Reads every RAPL zone under `root` as of `at`. Zones that are gone are forgotten: if one comes back,
    /// its total starts again from its raw counter.
    pub fn read_at(&mut self, root: &Path, at: Instant) -> Vec<RaplZone> {
        let dir = root.join("sys/class/powercap");
        let mut entries: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("intel-rapl") && n.contains(':'))
                    .collect()
            })
            .unwrap_or_default();
        entries.sort();

        let mut used: BTreeMap<String, u32> = BTreeMap::new();
        let mut present = BTreeSet::new();
        let mut zones = Vec::new();
        for entry in entries {
            let zdir = dir.join(&entry);
            // Like node_exporter: a directory without a readable name is not a zone.
            let Ok(raw_name) = read_attr(&zdir.join("name")) else {
                continue;
            };
            let (name, index) = name_and_index(&raw_name, &used);
            used.insert(name.clone(), index.saturating_add(1));
            present.insert(entry.clone());
            let energy = self
                .read_zone(&entry, &zdir, at)
                .map_err(|e| crate::error_chain(&e));
            zones.push(RaplZone {
                path: format!("{MACHINE_POWERCAP}/{entry}"),
                zone: entry,
                name,
                index,
                energy,
            });
        }
        self.zones.retain(|k, _| present.contains(k));
        zones
    }

    fn read_zone(&mut self, key: &str, zdir: &Path, at: Instant) -> Result<RaplEnergy, PowerError> {
        let path = zdir.join("energy_uj");
        let energy_uj = read_u64(&path).map_err(permission)?;
        // Without a range a wrap cannot be told from a reset; the total then just does not grow at a wrap.
        let max_range_uj = read_u64(&zdir.join("max_energy_range_uj")).unwrap_or(0);
        Ok(self.observe(key, energy_uj, max_range_uj, at))
    }
}

/// A permission error on `energy_uj` gets the reason and the fix.
fn permission(e: PowerError) -> PowerError {
    match e {
        PowerError::Read { path, source }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            PowerError::RaplPermission { path }
        }
        other => other,
    }
}

/// procfs `getIndexAndName`: `package-1` is (`package`, 1); `dram` is (`dram`, zones named `dram` so far).
fn name_and_index(raw: &str, used: &BTreeMap<String, u32>) -> (String, u32) {
    let parts: Vec<&str> = raw.split('-').collect();
    if let [name, n] = parts.as_slice() {
        if let Ok(i) = n.parse::<u32>() {
            return ((*name).to_owned(), i);
        }
    }
    (raw.to_owned(), used.get(raw).copied().unwrap_or(0))
}

/// node_exporter's metric name and help for a zone name. Its names are built from the zone name at run time;
/// here they are the kernel's RAPL domain names (intel_rapl_common), so an unknown name has no series.
fn family(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "package" => (
            "node_rapl_package_joules_total",
            "Current RAPL package value in joules",
        ),
        "core" => (
            "node_rapl_core_joules_total",
            "Current RAPL core value in joules",
        ),
        "uncore" => (
            "node_rapl_uncore_joules_total",
            "Current RAPL uncore value in joules",
        ),
        "dram" => (
            "node_rapl_dram_joules_total",
            "Current RAPL dram value in joules",
        ),
        "psys" => (
            "node_rapl_psys_joules_total",
            "Current RAPL psys value in joules",
        ),
        _ => return None,
    })
}

/// `node_rapl_<name>_joules_total{index,path}` counters, as node_exporter's rapl collector (without
/// `--collector.rapl.enable-zone-label`).
pub fn samples(zones: &[RaplZone]) -> Vec<Sample> {
    zones
        .iter()
        .filter_map(|z| {
            let energy = z.energy.as_ref().ok()?;
            let (name, help) = family(&z.name)?;
            Some(Sample::counter(
                name,
                help,
                vec![("index", z.index.to_string()), ("path", z.path.clone())],
                energy.joules_total,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::MetricKind;
    use std::time::Duration;

    const RANGE: u64 = 262_143_328_850;

    fn zone(root: &Path, dir: &str, name: &str, energy: u64, range: u64) {
        let d = root.join("sys/class/powercap").join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
        std::fs::write(d.join("max_energy_range_uj"), format!("{range}\n")).unwrap();
    }

    fn energy(z: &RaplZone) -> RaplEnergy {
        *z.energy.as_ref().unwrap()
    }

    #[test]
    fn delta_counts_up_and_across_a_wrap() {
        assert_eq!(energy_delta(100, 250, 1000), Some(150));
        assert_eq!(energy_delta(100, 100, 1000), Some(0));
        // 900 → 1000 is 100, 1000 → 0 is 1, 0 → 50 is 50.
        assert_eq!(energy_delta(900, 50, 1000), Some(151));
        assert_eq!(energy_delta(1000, 0, 1000), Some(1));
        assert_eq!(energy_delta(u64::MAX, 0, u64::MAX), Some(1));
        assert_eq!(
            energy_delta(0, u64::MAX, u64::MAX),
            Some(u64::MAX),
            "no overflow"
        );
        assert_eq!(energy_delta(u64::MAX - 1, u64::MAX, 7), Some(1));
        assert_eq!(energy_delta(0, u64::MAX - 1, 0), Some(u64::MAX - 1));
    }

    #[test]
    fn a_decrease_that_cannot_be_a_wrap_is_a_reset() {
        assert_eq!(energy_delta(900, 50, 0), None, "zero range");
        assert_eq!(
            energy_delta(2000, 50, 1000),
            None,
            "previous reading out of range"
        );
        // The largest wrap fits: now < prev keeps (max - prev) + 1 + now within max.
        assert_eq!(energy_delta(1, 0, u64::MAX), Some(u64::MAX));
    }

    #[test]
    fn two_wraps_across_polls_keep_the_total_monotonic_and_exact() {
        let mut r = Rapl::new();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let range = 1_000_000_000; // 1 kJ
        let e = r.observe("z", 900_000_000, range, at(0));
        assert_eq!(e.joules_total, 900.0);
        assert_eq!(e.watts, None, "first poll");
        // +50 J in 10 s.
        let e = r.observe("z", 950_000_000, range, at(10));
        assert_eq!(e.joules_total, 950.0);
        assert_eq!(e.watts, Some(5.0));
        // Wrap 1: 950 J → 1000 J → 0 → 40 J: 90 J + 1 µJ.
        let e = r.observe("z", 40_000_000, range, at(20));
        assert_eq!(e.joules_total, 1_040.000_001);
        assert!((e.watts.unwrap() - 9.000_000_1).abs() < 1e-9);
        let e = r.observe("z", 990_000_000, range, at(30));
        assert_eq!(e.joules_total, 1_990.000_001);
        // Wrap 2: 990 J → 1000 J → 0 → 10 J.
        let e = r.observe("z", 10_000_000, range, at(40));
        assert_eq!(e.joules_total, 2_010.000_002);
        assert!((e.watts.unwrap() - 2.000_000_1).abs() < 1e-9);
    }

    #[test]
    fn zero_range_decrease_rebases_without_losing_the_total() {
        let mut r = Rapl::new();
        let t0 = Instant::now();
        r.observe("z", 5_000_000, 0, t0);
        let e = r.observe("z", 7_000_000, 0, t0 + Duration::from_secs(1));
        assert_eq!((e.joules_total, e.watts), (7.0, Some(2.0)));
        let e = r.observe("z", 1_000_000, 0, t0 + Duration::from_secs(2));
        assert_eq!((e.joules_total, e.watts), (7.0, None), "reset: no delta");
        let e = r.observe("z", 4_000_000, 0, t0 + Duration::from_secs(3));
        assert_eq!((e.joules_total, e.watts), (10.0, Some(3.0)));
    }

    #[test]
    fn no_time_passed_means_no_watts() {
        let mut r = Rapl::new();
        let t = Instant::now();
        r.observe("z", 1, RANGE, t);
        assert_eq!(r.observe("z", 2, RANGE, t).watts, None);
        // An earlier `at` than the previous poll (a caller's mistake) is not a crash.
        if let Some(before) = t.checked_sub(Duration::from_secs(1)) {
            assert_eq!(r.observe("z", 3, RANGE, before).watts, None);
        }
    }

    #[test]
    fn names_indexes_and_paths_are_node_exporters() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        zone(root, "intel-rapl:0", "package-0", 1_000_000, RANGE);
        zone(root, "intel-rapl:0:0", "dram", 2_000_000, RANGE);
        zone(root, "intel-rapl:1", "package-1", 3_000_000, RANGE);
        zone(root, "intel-rapl:1:0", "dram", 4_000_000, RANGE);
        zone(root, "intel-rapl:1:1", "weird-name-x", 1, RANGE);
        // The control type directory has no name; other powercap types are not RAPL.
        std::fs::create_dir_all(root.join("sys/class/powercap/intel-rapl")).unwrap();
        zone(root, "dtpm:0", "dtpm", 1, RANGE);
        let zones = Rapl::new().read(root);
        let got: Vec<(&str, &str, u32, &str)> = zones
            .iter()
            .map(|z| (z.zone.as_str(), z.name.as_str(), z.index, z.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "intel-rapl:0",
                    "package",
                    0,
                    "/sys/class/powercap/intel-rapl:0"
                ),
                (
                    "intel-rapl:0:0",
                    "dram",
                    0,
                    "/sys/class/powercap/intel-rapl:0:0"
                ),
                (
                    "intel-rapl:1",
                    "package",
                    1,
                    "/sys/class/powercap/intel-rapl:1"
                ),
                (
                    "intel-rapl:1:0",
                    "dram",
                    1,
                    "/sys/class/powercap/intel-rapl:1:0"
                ),
                (
                    "intel-rapl:1:1",
                    "weird-name-x",
                    0,
                    "/sys/class/powercap/intel-rapl:1:1"
                ),
            ]
        );
        let s = samples(&zones);
        assert_eq!(s.len(), 4, "the unknown zone name has no series: {s:?}");
        assert_eq!(s[0].name, "node_rapl_package_joules_total");
        assert_eq!(s[0].kind, MetricKind::Counter);
        assert_eq!(
            s[0].labels,
            vec![
                ("index", "0".to_owned()),
                ("path", "/sys/class/powercap/intel-rapl:0".to_owned())
            ]
        );
        assert_eq!(s[0].value, 1.0);
        assert_eq!(s[3].name, "node_rapl_dram_joules_total");
        assert_eq!(s[3].labels[0], ("index", "1".to_owned()));
        assert_eq!(s[3].value, 4.0);
    }

    #[test]
    fn a_zone_disappearing_is_forgotten_and_starts_over_when_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        zone(root, "intel-rapl:0", "package-0", 10_000_000, RANGE);
        zone(root, "intel-rapl:1", "package-1", 20_000_000, RANGE);
        let mut r = Rapl::new();
        let t0 = Instant::now();
        r.read_at(root, t0);
        std::fs::remove_dir_all(root.join("sys/class/powercap/intel-rapl:1")).unwrap();
        zone(root, "intel-rapl:0", "package-0", 11_000_000, RANGE);
        let zones = r.read_at(root, t0 + Duration::from_secs(1));
        assert_eq!(zones.len(), 1);
        assert_eq!(energy(&zones[0]).watts, Some(1.0));
        zone(root, "intel-rapl:1", "package-1", 5_000_000, RANGE);
        let zones = r.read_at(root, t0 + Duration::from_secs(2));
        let back = energy(&zones[1]);
        assert_eq!(
            (back.joules_total, back.watts),
            (5.0, None),
            "a new zone, not a wrap"
        );
    }

    #[test]
    fn an_unreadable_counter_is_a_reason_and_the_state_survives_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        zone(root, "intel-rapl:0", "package-0", 10_000_000, RANGE);
        let mut r = Rapl::new();
        let t0 = Instant::now();
        r.read_at(root, t0);
        // A directory where the file should be fails to read even for root.
        let e = root.join("sys/class/powercap/intel-rapl:0/energy_uj");
        std::fs::remove_file(&e).unwrap();
        std::fs::create_dir(&e).unwrap();
        let zones = r.read_at(root, t0 + Duration::from_secs(1));
        let reason = zones[0].energy.as_ref().unwrap_err();
        assert!(reason.contains("intel-rapl:0/energy_uj"), "{reason}");
        assert!(samples(&zones).is_empty());
        std::fs::remove_dir(&e).unwrap();
        std::fs::write(&e, "14000000\n").unwrap();
        let zones = r.read_at(root, t0 + Duration::from_secs(2));
        let back = energy(&zones[0]);
        assert_eq!((back.joules_total, back.watts), (14.0, Some(2.0)));

        std::fs::write(&e, "garbage\n").unwrap();
        let zones = r.read_at(root, t0 + Duration::from_secs(3));
        assert!(zones[0].energy.as_ref().unwrap_err().contains("garbage"));
    }

    #[test]
    fn permission_denied_names_the_fix() {
        let e = permission(PowerError::Read {
            path: "/sys/class/powercap/intel-rapl:0/energy_uj".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        let msg = crate::error_chain(&e);
        assert!(
            msg.contains("intel-rapl:0/energy_uj") && msg.contains("run cairnd as root"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_range_still_counts_up() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        zone(root, "intel-rapl:0", "package-0", 10_000_000, RANGE);
        std::fs::remove_file(root.join("sys/class/powercap/intel-rapl:0/max_energy_range_uj"))
            .unwrap();
        let mut r = Rapl::new();
        let t0 = Instant::now();
        r.read_at(root, t0);
        zone(root, "intel-rapl:0", "package-0", 12_000_000, RANGE);
        std::fs::remove_file(root.join("sys/class/powercap/intel-rapl:0/max_energy_range_uj"))
            .unwrap();
        let z = r.read_at(root, t0 + Duration::from_secs(1));
        assert_eq!(energy(&z[0]).joules_total, 12.0);
    }
}
