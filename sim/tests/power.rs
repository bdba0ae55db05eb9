#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

//! Power over the simulated site's fake sysfs tree: RAPL counters advanced and wrapped between two polls, the
//! hwmon chips, a fake upsd, and (when it is installed) node_exporter reading the same tree.

use cairn_agent::hardware::power::{self, PowerCollector, UpsConfig};
use cairn_agent::telemetry::{MetricKind, Sample};
use cairn_sim::sysfs_tree::{self, TreeProfile};
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

const RANGE_UJ: u64 = 262_143_328_850;

fn set(root: &Path, zone: &str, uj: u64) {
    std::fs::write(
        root.join("sys/class/powercap").join(zone).join("energy_uj"),
        format!("{uj}\n"),
    )
    .unwrap();
}

/// The value of the one sample with this name and these labels (others may exist).
fn value(s: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = s
        .iter()
        .filter(|x| {
            x.name == name
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?} in {s:#?}");
    found[0].value
}

/// A fake upsd answering `LIST VAR ups1` with each status in turn, one connection each.
fn upsd(statuses: Vec<&'static str>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for status in statuses {
            let Ok((s, _)) = l.accept() else { return };
            let mut req = String::new();
            if std::io::BufReader::new(&s).read_line(&mut req).is_err() {
                return;
            }
            assert_eq!(req, "LIST VAR ups1\n");
            let _ = write!(
                &s,
                "BEGIN LIST VAR ups1\n\
                 VAR ups1 battery.charge \"97\"\n\
                 VAR ups1 battery.runtime \"1840\"\n\
                 VAR ups1 device.mfr \"Eaton\"\n\
                 VAR ups1 device.model \"9PX 3000\"\n\
                 VAR ups1 ups.load \"38\"\n\
                 VAR ups1 ups.realpower.nominal \"3000\"\n\
                 VAR ups1 ups.status \"{status}\"\n\
                 END LIST VAR ups1\n"
            );
        }
    });
    addr
}

#[test]
fn two_polls_over_the_fake_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    sysfs_tree::write(root, &TreeProfile::default()).unwrap();
    // Socket 1's package counter just below its range, so that it wraps before the second poll.
    set(root, "intel-rapl:1", RANGE_UJ - 328_850_000);
    let ups = UpsConfig {
        server: upsd(vec!["OL", "OB DISCHRG"]),
        ups: "ups1".into(),
        timeout: Duration::from_secs(5),
    };
    let mut c = PowerCollector::new(root.to_owned(), Some(ups));
    let t0 = Instant::now();

    let first = c.read_at(t0);
    assert_eq!(first.psu, None, "no dev/ipmi0: no BMC, not an error");
    let zones: Vec<(&str, &str, u32)> = first
        .rapl
        .iter()
        .map(|z| (z.zone.as_str(), z.name.as_str(), z.index))
        .collect();
    assert_eq!(
        zones,
        [
            ("intel-rapl:0", "package", 0),
            ("intel-rapl:0:0", "dram", 0),
            ("intel-rapl:1", "package", 1),
            ("intel-rapl:1:0", "dram", 1),
        ]
    );
    assert!(first
        .rapl
        .iter()
        .all(|z| z.energy.as_ref().unwrap().watts.is_none()));
    let ups1 = first.ups.as_ref().unwrap().as_ref().unwrap();
    assert!(!ups1.on_battery());

    // 10 s later: +500 J on socket 0, and socket 1 wrapped after 328.85 J, then 171.15 J more.
    set(root, "intel-rapl:0", 12_345_678_901 + 500_000_000);
    set(root, "intel-rapl:1", 171_150_000);
    let second = c.read_at(t0 + Duration::from_secs(10));
    let e = |zone: &str| {
        let z = second.rapl.iter().find(|z| z.zone == zone).unwrap();
        *z.energy.as_ref().unwrap()
    };
    assert!((e("intel-rapl:0").watts.unwrap() - 50.0).abs() < 1e-9);
    assert!((e("intel-rapl:1").watts.unwrap() - 50.000_000_1).abs() < 1e-9);
    assert_eq!(e("intel-rapl:0:0").watts, Some(0.0));
    let ups2 = second.ups.as_ref().unwrap().as_ref().unwrap();
    assert!(ups2.on_battery());
    assert_eq!(ups2.battery_runtime_secs, Some(1840.0));

    let s = power::samples(&second);
    let pkg = |i: &str| {
        value(
            &s,
            "node_rapl_package_joules_total",
            &[
                ("index", i),
                ("path", &format!("/sys/class/powercap/intel-rapl:{i}")),
            ],
        )
    };
    assert!((pkg("0") - 12_845.678_901).abs() < 1e-6);
    // Monotonic across the wrap: the start, plus 500 J and the one microjoule from the range to 0, which is
    // beyond the counter's range.
    let expected = (RANGE_UJ - 328_850_000 + 500_000_001) as f64 / 1e6;
    assert!((pkg("1") - expected).abs() < 1e-6, "{}", pkg("1"));
    assert!(pkg("1") > RANGE_UJ as f64 / 1e6);
    assert!(s
        .iter()
        .filter(|x| x.name.starts_with("node_rapl_"))
        .all(|x| x.kind == MetricKind::Counter));
    let dram = value(
        &s,
        "node_rapl_dram_joules_total",
        &[
            ("index", "1"),
            ("path", "/sys/class/powercap/intel-rapl:1:0"),
        ],
    );
    assert!((dram - 987.654_321).abs() < 1e-9);

    let core0 = [("chip", "platform_coretemp_0"), ("sensor", "temp1")];
    assert_eq!(value(&s, "node_hwmon_temp_celsius", &core0), 48.0);
    assert_eq!(value(&s, "node_hwmon_temp_max_celsius", &core0), 80.0);
    assert_eq!(value(&s, "node_hwmon_temp_crit_celsius", &core0), 90.0);
    assert_eq!(
        value(
            &s,
            "node_hwmon_temp_celsius",
            &[("chip", "platform_coretemp_1"), ("sensor", "temp1")]
        ),
        49.0
    );
    assert_eq!(
        value(
            &s,
            "node_hwmon_sensor_label",
            &[
                ("chip", "platform_coretemp_1"),
                ("sensor", "temp1"),
                ("label", "Package id 1")
            ]
        ),
        1.0
    );
    let meter = [("chip", "lnxsybus:00_acpi000d:00"), ("sensor", "power1")];
    assert_eq!(value(&s, "node_hwmon_power_watt", &meter), 1450.0);
    assert_eq!(value(&s, "node_hwmon_power_average_watt", &meter), 1432.0);
    for f in 1..=4 {
        let sensor = format!("fan{f}");
        assert_eq!(
            value(
                &s,
                "node_hwmon_fan_rpm",
                &[("chip", "platform_nct6775_656"), ("sensor", &sensor)]
            ),
            f64::from(4_200 + 100 * f)
        );
    }
    let chips: Vec<(String, String)> = s
        .iter()
        .filter(|x| x.name == "node_hwmon_chip_names")
        .map(|x| (x.labels[0].1.clone(), x.labels[1].1.clone()))
        .collect();
    assert_eq!(
        chips,
        [
            ("platform_coretemp_0".into(), "coretemp".into()),
            ("platform_coretemp_1".into(), "coretemp".into()),
            ("lnxsybus:00_acpi000d:00".into(), "power_meter".into()),
            ("platform_nct6775_656".into(), "nct6798".into()),
        ]
    );

    assert_eq!(
        value(&s, "network_ups_tools_ups_status", &[("flag", "OB")]),
        1.0
    );
    assert_eq!(
        value(&s, "network_ups_tools_ups_status", &[("flag", "OL")]),
        0.0
    );
    assert_eq!(value(&s, "network_ups_tools_battery_runtime", &[]), 1840.0);
    assert_eq!(
        value(&s, "network_ups_tools_ups_realpower_nominal", &[]),
        3000.0
    );
    assert_eq!(
        value(
            &s,
            "network_ups_tools_device_info",
            &[("mfr", "Eaton"), ("model", "9PX 3000"), ("serial", "")]
        ),
        1.0
    );
    assert!(!s.iter().any(|x| x.name.starts_with("ipmi_")));

    // Families are contiguous, as the exposition format needs.
    let mut names: Vec<&str> = s.iter().map(|x| x.name).collect();
    names.dedup();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(names.len(), unique.len());
}

#[test]
fn an_unreachable_ups_is_a_reason_beside_the_other_readings() {
    let tmp = tempfile::tempdir().unwrap();
    sysfs_tree::write(tmp.path(), &TreeProfile::default()).unwrap();
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut c = PowerCollector::new(tmp.path().to_owned(), Some(UpsConfig::new(&addr, "ups1")));
    let r = c.read();
    let reason = r.ups.unwrap().unwrap_err();
    assert!(
        reason.contains(&addr) && reason.contains("upsd"),
        "{reason}"
    );
    assert_eq!(r.rapl.len(), 4);
    assert_eq!(r.hwmon.len(), 4);
}

/// Kills the node_exporter this test started when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, body) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_owned()))
}

/// A series: its name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// `name{a="x",b="y"} v` → (series, v). Enough for the values in the fake tree.
fn parse_line(line: &str) -> Option<(Series, f64)> {
    let (series, v) = line.rsplit_once(' ')?;
    let v: f64 = v.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut out = Vec::new();
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once("=\"")?;
        out.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
    }
    out.sort();
    Some(((name.to_owned(), out), v))
}

/// Every node_hwmon_* / node_rapl_* series cairnd publishes for the fake tree is one node_exporter publishes
/// with the same value, and node_exporter publishes none of those families that cairnd does not; only RAPL's
/// `path` differs, because node_exporter puts `--path.sysfs` in it. Skipped without node_exporter.
#[test]
fn the_same_series_as_node_exporter() {
    let bin = Path::new("/usr/bin/prometheus-node-exporter");
    if !bin.exists() {
        eprintln!("skipped: {} is not installed", bin.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    sysfs_tree::write(root, &TreeProfile::default()).unwrap();
    let ours = power::samples(&PowerCollector::new(root.to_owned(), None).read());

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _child = Child(
        std::process::Command::new(bin)
            .arg(format!("--path.sysfs={}", root.join("sys").display()))
            .args([
                "--collector.disable-defaults",
                "--collector.hwmon",
                "--collector.rapl",
                &format!("--web.listen-address=127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Some(t) = scrape(port) {
            break t;
        }
        assert!(Instant::now() < deadline, "node_exporter did not come up");
        std::thread::sleep(Duration::from_millis(100));
    };
    let sys = root.join("sys").display().to_string();
    let theirs: BTreeMap<Series, f64> = text
        .lines()
        .filter(|l| l.starts_with("node_hwmon_") || l.starts_with("node_rapl_"))
        .filter_map(parse_line)
        .map(|((name, labels), v)| {
            let labels = labels
                .into_iter()
                .map(|(k, v)| (k, v.replace(&sys, "/sys")))
                .collect();
            ((name, labels), v)
        })
        .collect();
    let mine: BTreeMap<Series, f64> = ours
        .iter()
        .filter(|s| s.name.starts_with("node_"))
        .map(|s| {
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            labels.sort();
            ((s.name.to_owned(), labels), s.value)
        })
        .collect();
    let families: Vec<&String> = mine.keys().map(|(n, _)| n).collect();
    let theirs: BTreeMap<_, _> = theirs
        .into_iter()
        .filter(|((n, _), _)| families.contains(&n))
        .collect();
    assert!(!mine.is_empty());
    assert_eq!(mine, theirs);
}
