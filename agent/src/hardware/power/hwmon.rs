//! Hardware-monitoring chips (`sys/class/hwmon/hwmonN`): temperatures, fans and power meters, read the way
//! node_exporter's hwmon collector reads them so the series match.
//!
//! Attributes follow the kernel's hwmon sysfs ABI: `tempN_input`, `tempN_max`, `tempN_crit` in millidegrees
//! Celsius, `tempN_label`; `fanN_input` in RPM; `powerN_input`, `powerN_average` in microwatts. Like
//! node_exporter, attributes are looked for in the chip directory and in its `device/` directory (older
//! drivers put them there); an attribute that is missing, unreadable or not a number is skipped.
//!
//! The `chip` label is node_exporter's: `<parent>_<device>` of the resolved `device` link
//! (`platform_coretemp_0`, `0000:00:01_0_0000:01:00_0`), else the chip's `name`, else `hwmonN`; every label
//! cleaned to `[a-z0-9:_]`. Where two chips would get the same label (same `name`, no `device` link),
//! node_exporter would publish clashing series; here those chips are labelled `hwmonN` instead.

use super::read_attr;
use crate::telemetry::Sample;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A chip directory with more entries than this is not one we understand; the rest are ignored.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct HwmonChip {
    /// The directory under `sys/class/hwmon`: `hwmon3`.
    pub dir: String,
    /// node_exporter's `chip` label.
    pub chip: String,
    /// The chip's `name` attribute, cleaned: node_exporter's `chip_name` (`coretemp`, `nct6798`).
    pub chip_name: Option<String>,
    pub temperatures: Vec<Temperature>,
    pub fans: Vec<Fan>,
    pub power: Vec<PowerMeter>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Temperature {
    /// `temp1`: node_exporter's `sensor` label.
    pub sensor: String,
    /// `tempN_label`, as the driver wrote it: `Package id 0`, `Composite`.
    pub label: Option<String>,
    pub input_celsius: Option<f64>,
    pub max_celsius: Option<f64>,
    pub crit_celsius: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fan {
    pub sensor: String,
    pub label: Option<String>,
    pub rpm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PowerMeter {
    pub sensor: String,
    pub label: Option<String>,
    pub input_watts: Option<f64>,
    pub average_watts: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Temp,
    Fan,
    Power,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Prop {
    Input,
    Label,
    Max,
    Crit,
    Average,
}

/// `temp1_input` → (Temp, 1, Input); anything we do not read → None.
fn parse_file_name(name: &str) -> Option<(Kind, u32, Prop)> {
    let (kind, rest) = [
        ("temp", Kind::Temp),
        ("fan", Kind::Fan),
        ("power", Kind::Power),
    ]
    .into_iter()
    .find_map(|(prefix, kind)| name.strip_prefix(prefix).map(|rest| (kind, rest)))?;
    let (num, prop) = rest.split_once('_')?;
    if num.is_empty() || num.len() > 9 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num: u32 = num.parse().ok()?;
    let prop = match (kind, prop) {
        (_, "input") => Prop::Input,
        (_, "label") => Prop::Label,
        (Kind::Temp, "max") => Prop::Max,
        (Kind::Temp, "crit") => Prop::Crit,
        (Kind::Power, "average") => Prop::Average,
        _ => return None,
    };
    Some((kind, num, prop))
}

/// node_exporter's `cleanMetricName`: lower case, everything but `[a-z0-9:_]` to `_`, no `_` at either end.
pub fn clean_name(s: &str) -> String {
    let replaced: String = s
        .to_lowercase()
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | ':' | '_' => c,
            _ => '_',
        })
        .collect();
    replaced.trim_matches('_').to_owned()
}

/// The label node_exporter derives from the `device` link, if there is one that resolves.
fn device_label(chip_dir: &Path) -> Option<String> {
    let real = std::fs::canonicalize(chip_dir.join("device")).ok()?;
    let dev = clean_name(&real.file_name()?.to_string_lossy());
    let parent = real
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| clean_name(&n.to_string_lossy()))
        .unwrap_or_default();
    match (parent.is_empty(), dev.is_empty()) {
        (false, false) => Some(format!("{parent}_{dev}")),
        (true, false) => Some(dev),
        _ => None,
    }
}

type Attrs = BTreeMap<(Kind, u32), BTreeMap<Prop, String>>;

/// Reads the sensor attributes of one directory; attributes already found (in the chip directory) win.
fn collect(dir: &Path, attrs: &mut Attrs) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()).take(MAX_ENTRIES) {
        let file = e.file_name();
        let Some((kind, num, prop)) = file.to_str().and_then(parse_file_name) else {
            continue;
        };
        let props = attrs.entry((kind, num)).or_default();
        if props.contains_key(&prop) {
            continue;
        }
        if let Ok(v) = read_attr(&e.path()) {
            props.insert(prop, v);
        }
    }
}

fn milli(v: Option<&String>) -> Option<f64> {
    v?.parse::<i64>().ok().map(|n| n as f64 / 1000.0)
}

fn micro(v: Option<&String>) -> Option<f64> {
    v?.parse::<u64>().ok().map(|n| n as f64 / 1e6)
}

fn whole(v: Option<&String>) -> Option<f64> {
    v?.parse::<u64>().ok().map(|n| n as f64)
}

/// One chip's sensors; the chip label is decided by the caller.
fn read_chip(chip_dir: &Path, dir: String, chip: String) -> HwmonChip {
    let mut attrs = Attrs::new();
    collect(chip_dir, &mut attrs);
    let device = chip_dir.join("device");
    if device.is_dir() {
        collect(&device, &mut attrs);
    }
    let mut c = HwmonChip {
        dir,
        chip,
        chip_name: read_attr(&chip_dir.join("name"))
            .ok()
            .map(|n| clean_name(&n))
            .filter(|n| !n.is_empty()),
        temperatures: Vec::new(),
        fans: Vec::new(),
        power: Vec::new(),
    };
    for ((kind, num), props) in &attrs {
        let label = props.get(&Prop::Label).filter(|l| !l.is_empty()).cloned();
        let input = props.get(&Prop::Input);
        match kind {
            Kind::Temp => {
                let t = Temperature {
                    sensor: format!("temp{num}"),
                    label,
                    input_celsius: milli(input),
                    max_celsius: milli(props.get(&Prop::Max)),
                    crit_celsius: milli(props.get(&Prop::Crit)),
                };
                if t.label.is_some()
                    || t.input_celsius.is_some()
                    || t.max_celsius.is_some()
                    || t.crit_celsius.is_some()
                {
                    c.temperatures.push(t);
                }
            }
            Kind::Fan => {
                let f = Fan {
                    sensor: format!("fan{num}"),
                    label,
                    rpm: whole(input),
                };
                if f.label.is_some() || f.rpm.is_some() {
                    c.fans.push(f);
                }
            }
            Kind::Power => {
                let p = PowerMeter {
                    sensor: format!("power{num}"),
                    label,
                    input_watts: micro(input),
                    average_watts: micro(props.get(&Prop::Average)),
                };
                if p.label.is_some() || p.input_watts.is_some() || p.average_watts.is_some() {
                    c.power.push(p);
                }
            }
        }
    }
    c
}

/// Every hwmon chip under `root`. No hwmon class directory is an empty list.
pub fn read(root: &Path) -> Vec<HwmonChip> {
    let class = root.join("sys/class/hwmon");
    let mut dirs: Vec<(u64, String)> = std::fs::read_dir(&class)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .take(MAX_ENTRIES)
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_owned();
                    let n = name.strip_prefix("hwmon")?.parse::<u64>().ok()?;
                    // Follows the class symlink to the chip's directory.
                    e.path().is_dir().then_some((n, name))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();

    let preferred: Vec<(String, String)> = dirs
        .into_iter()
        .map(|(_, dir)| {
            let path = class.join(&dir);
            let label = device_label(&path)
                .or_else(|| {
                    read_attr(&path.join("name"))
                        .ok()
                        .map(|n| clean_name(&n))
                        .filter(|n| !n.is_empty())
                })
                .unwrap_or_else(|| clean_name(&dir));
            (dir, label)
        })
        .collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, label) in &preferred {
        *uses.entry(label.as_str()).or_default() += 1;
    }
    let unique: Vec<(String, String)> = preferred
        .iter()
        .map(|(dir, label)| {
            let clash = uses.get(label.as_str()).copied().unwrap_or(0) > 1;
            let chip = if clash {
                clean_name(dir)
            } else {
                label.clone()
            };
            (dir.clone(), chip)
        })
        .collect();
    unique
        .into_iter()
        .map(|(dir, chip)| read_chip(&class.join(&dir), dir, chip))
        .collect()
}

fn chip_sensor(chip: &HwmonChip, sensor: &str) -> Vec<(&'static str, String)> {
    vec![("chip", chip.chip.clone()), ("sensor", sensor.to_owned())]
}

/// node_exporter's hwmon series for the signals read here, all gauges.
pub fn samples(chips: &[HwmonChip]) -> Vec<Sample> {
    let mut out = Vec::new();
    for c in chips {
        if let Some(name) = &c.chip_name {
            out.push(Sample::gauge(
                "node_hwmon_chip_names",
                "Annotation metric for human-readable chip names",
                vec![("chip", c.chip.clone()), ("chip_name", name.clone())],
                1.0,
            ));
        }
        let labelled = c
            .temperatures
            .iter()
            .map(|t| (&t.sensor, &t.label))
            .chain(c.fans.iter().map(|f| (&f.sensor, &f.label)))
            .chain(c.power.iter().map(|p| (&p.sensor, &p.label)));
        for (sensor, label) in labelled {
            if let Some(label) = label {
                let mut labels = chip_sensor(c, sensor);
                labels.push(("label", label.clone()));
                out.push(Sample::gauge(
                    "node_hwmon_sensor_label",
                    "Label for given chip and sensor",
                    labels,
                    1.0,
                ));
            }
        }
        for t in &c.temperatures {
            for (name, help, v) in [
                (
                    "node_hwmon_temp_celsius",
                    "Hardware monitor for temperature (input)",
                    t.input_celsius,
                ),
                (
                    "node_hwmon_temp_max_celsius",
                    "Hardware monitor for temperature (max)",
                    t.max_celsius,
                ),
                (
                    "node_hwmon_temp_crit_celsius",
                    "Hardware monitor for temperature (crit)",
                    t.crit_celsius,
                ),
            ] {
                if let Some(v) = v {
                    out.push(Sample::gauge(name, help, chip_sensor(c, &t.sensor), v));
                }
            }
        }
        for f in &c.fans {
            if let Some(rpm) = f.rpm {
                out.push(Sample::gauge(
                    "node_hwmon_fan_rpm",
                    "Hardware monitor for fan revolutions per minute (input)",
                    chip_sensor(c, &f.sensor),
                    rpm,
                ));
            }
        }
        for p in &c.power {
            for (name, help, v) in [
                (
                    "node_hwmon_power_watt",
                    "Hardware monitor for power usage in watts (input)",
                    p.input_watts,
                ),
                (
                    "node_hwmon_power_average_watt",
                    "Hardware monitor for power usage in watts (average)",
                    p.average_watts,
                ),
            ] {
                if let Some(v) = v {
                    out.push(Sample::gauge(name, help, chip_sensor(c, &p.sensor), v));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::MetricKind;

    fn put(dir: &Path, file: &str, v: &[u8]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(file), v).unwrap();
    }

    fn find<'a>(s: &'a [Sample], name: &str, chip: &str, sensor: &str) -> Option<&'a Sample> {
        s.iter().find(|s| {
            s.name == name
                && s.labels.contains(&("chip", chip.to_owned()))
                && s.labels.contains(&("sensor", sensor.to_owned()))
        })
    }

    #[test]
    fn file_names_parse_and_garbage_does_not() {
        assert_eq!(
            parse_file_name("temp1_input"),
            Some((Kind::Temp, 1, Prop::Input))
        );
        assert_eq!(
            parse_file_name("temp12_crit"),
            Some((Kind::Temp, 12, Prop::Crit))
        );
        assert_eq!(
            parse_file_name("fan3_label"),
            Some((Kind::Fan, 3, Prop::Label))
        );
        assert_eq!(
            parse_file_name("power1_average"),
            Some((Kind::Power, 1, Prop::Average))
        );
        assert_eq!(
            parse_file_name("temp01_input"),
            Some((Kind::Temp, 1, Prop::Input))
        );
        for junk in [
            "temp_input",
            "tempX_input",
            "temp1",
            "temp1_",
            "temp1_crit_alarm",
            "fan1_max",
            "power1_average_interval",
            "in0_input",
            "temp99999999999_input",
            "temp-1_input",
            "temp+1_input",
            "",
            "name",
        ] {
            assert_eq!(parse_file_name(junk), None, "{junk}");
        }
    }

    #[test]
    fn names_are_cleaned_like_node_exporter() {
        assert_eq!(clean_name("coretemp.0"), "coretemp_0");
        assert_eq!(clean_name("  ACPI000D:00\n"), "acpi000d:00");
        assert_eq!(clean_name("__x-y__"), "x_y");
        assert_eq!(clean_name("ünï"), "n");
        assert_eq!(clean_name("..."), "");
    }

    #[test]
    fn reads_sensors_and_skips_missing_and_garbage_attributes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let d = root.join("sys/class/hwmon/hwmon0");
        put(&d, "name", b"coretemp\n");
        put(&d, "temp1_input", b"48000\n");
        put(&d, "temp1_label", b"Package id 0\n");
        put(&d, "temp1_max", b"abc\n");
        put(&d, "temp1_crit", b"100000\n");
        put(&d, "temp2_label", b"Core 0\n"); // label only
        put(&d, "temp3_input", b"-5500\n");
        put(&d, "temp4_input", b"\n"); // empty: no sensor at all
        put(&d, "temp5_input", &[0xff, 0xfe, 0x00]);
        put(&d, "temp6_input", "9".repeat(10_000).as_bytes());
        put(&d, "fan1_input", b"1200\n");
        put(&d, "fan2_input", b"-1\n");
        put(&d, "power1_input", b"1450000000\n");
        put(&d, "power1_average", b"1400500000\n");
        put(&d, "power2_average", b"x\n");
        put(&d, "in0_input", b"1000\n");
        std::fs::create_dir_all(d.join("temp7_input")).unwrap(); // unreadable: a directory
        let chips = read(root);
        assert_eq!(chips.len(), 1);
        let c = &chips[0];
        assert_eq!(
            (c.dir.as_str(), c.chip.as_str()),
            ("hwmon0", "coretemp"),
            "no device link: the name"
        );
        assert_eq!(c.chip_name.as_deref(), Some("coretemp"));
        assert_eq!(
            c.temperatures,
            vec![
                Temperature {
                    sensor: "temp1".into(),
                    label: Some("Package id 0".into()),
                    input_celsius: Some(48.0),
                    max_celsius: None,
                    crit_celsius: Some(100.0)
                },
                Temperature {
                    sensor: "temp2".into(),
                    label: Some("Core 0".into()),
                    input_celsius: None,
                    max_celsius: None,
                    crit_celsius: None
                },
                Temperature {
                    sensor: "temp3".into(),
                    label: None,
                    input_celsius: Some(-5.5),
                    max_celsius: None,
                    crit_celsius: None
                },
            ]
        );
        assert_eq!(
            c.fans,
            vec![Fan {
                sensor: "fan1".into(),
                label: None,
                rpm: Some(1200.0)
            }]
        );
        assert_eq!(
            c.power,
            vec![PowerMeter {
                sensor: "power1".into(),
                label: None,
                input_watts: Some(1450.0),
                average_watts: Some(1400.5)
            }]
        );

        let s = samples(&chips);
        assert!(s.iter().all(|s| s.kind == MetricKind::Gauge));
        let t = find(&s, "node_hwmon_temp_celsius", "coretemp", "temp1").unwrap();
        assert_eq!(t.value, 48.0);
        assert_eq!(
            t.labels,
            vec![
                ("chip", "coretemp".to_owned()),
                ("sensor", "temp1".to_owned())
            ]
        );
        assert_eq!(
            find(&s, "node_hwmon_temp_crit_celsius", "coretemp", "temp1")
                .unwrap()
                .value,
            100.0
        );
        assert!(find(&s, "node_hwmon_temp_max_celsius", "coretemp", "temp1").is_none());
        assert_eq!(
            find(&s, "node_hwmon_fan_rpm", "coretemp", "fan1")
                .unwrap()
                .value,
            1200.0
        );
        assert_eq!(
            find(&s, "node_hwmon_power_watt", "coretemp", "power1")
                .unwrap()
                .value,
            1450.0
        );
        assert_eq!(
            find(&s, "node_hwmon_power_average_watt", "coretemp", "power1")
                .unwrap()
                .value,
            1400.5
        );
        let label = find(&s, "node_hwmon_sensor_label", "coretemp", "temp1").unwrap();
        assert!(label.labels.contains(&("label", "Package id 0".to_owned())));
        let names: Vec<&Sample> = s
            .iter()
            .filter(|s| s.name == "node_hwmon_chip_names")
            .collect();
        assert_eq!(
            names[0].labels,
            vec![
                ("chip", "coretemp".to_owned()),
                ("chip_name", "coretemp".to_owned())
            ]
        );
    }

    #[test]
    fn chip_labels_follow_node_exporters_preferences() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let class = root.join("sys/class/hwmon");
        // 0 and 1: device links to distinct platform devices, same name.
        for (i, dev) in [(0, "coretemp.0"), (1, "coretemp.1")] {
            let dev_dir = root.join("sys/devices/platform").join(dev);
            std::fs::create_dir_all(&dev_dir).unwrap();
            let d = class.join(format!("hwmon{i}"));
            put(&d, "name", b"coretemp\n");
            put(&d, "temp1_input", b"40000\n");
            std::os::unix::fs::symlink(
                format!("../../../devices/platform/{dev}"),
                d.join("device"),
            )
            .unwrap();
        }
        // 2 and 3: no device link, the same name: they would clash, so they get their directory names.
        for i in [2, 3] {
            put(&class.join(format!("hwmon{i}")), "name", b"power_meter\n");
        }
        // 4: no name, no device.
        put(&class.join("hwmon4"), "fan1_input", b"900\n");
        // 5: a dangling device link falls back to the name.
        let d5 = class.join("hwmon5");
        put(&d5, "name", b"nct6798\n");
        std::os::unix::fs::symlink("../../../devices/nowhere", d5.join("device")).unwrap();
        // 10 sorts after 5; not-a-directory and foreign entries are ignored.
        put(&class.join("hwmon10"), "name", b"nvme\n");
        put(&class, "hwmon11", b"a file\n");
        std::fs::create_dir_all(class.join("other")).unwrap();
        // Attributes in device/ count, the chip directory's win.
        let dev0 = root.join("sys/devices/platform/coretemp.0");
        put(&dev0, "temp1_input", b"99000\n");
        put(&dev0, "temp2_input", b"41000\n");

        let chips = read(root);
        let got: Vec<(&str, &str, Option<&str>)> = chips
            .iter()
            .map(|c| (c.dir.as_str(), c.chip.as_str(), c.chip_name.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("hwmon0", "platform_coretemp_0", Some("coretemp")),
                ("hwmon1", "platform_coretemp_1", Some("coretemp")),
                ("hwmon2", "hwmon2", Some("power_meter")),
                ("hwmon3", "hwmon3", Some("power_meter")),
                ("hwmon4", "hwmon4", None),
                ("hwmon5", "nct6798", Some("nct6798")),
                ("hwmon10", "nvme", Some("nvme")),
            ]
        );
        let temps: Vec<(&str, Option<f64>)> = chips[0]
            .temperatures
            .iter()
            .map(|t| (t.sensor.as_str(), t.input_celsius))
            .collect();
        assert_eq!(temps, [("temp1", Some(40.0)), ("temp2", Some(41.0))]);
        let s = samples(&chips);
        assert!(find(&s, "node_hwmon_fan_rpm", "hwmon4", "fan1").is_some());
        assert!(!s.iter().any(|s| s.name == "node_hwmon_chip_names"
            && s.labels.contains(&("chip", "hwmon4".to_owned()))));
    }

    #[test]
    fn no_class_directory_is_no_chips() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(read(tmp.path()).is_empty());
    }
}
