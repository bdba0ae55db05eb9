#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Remote write against a real Prometheus (Debian's 2.42, `/usr/bin/prometheus`): samples the ingest path
//! stores reach it once each, with the device label, through an outage at the start; duplicates, events
//! and samples Prometheus cannot take do not; a refused request is counted and does not stall the rest.

use cairn_fleet::ingest::Ingest;
use cairn_fleet::remote_write::{self, Endpoint, ExportOptions, ExportStats, Exporter};
use cairn_proto::telemetry::{sign_batch, Batch, WireBody, WireRecord};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const DEV: &str = "000bdevice";
const GAUGE: &str = "cairn_test_gpu_temp_celsius";

struct Key(EcdsaKeyPair);

impl Key {
    fn new() -> Key {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        Key(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap(),
        )
    }
    fn point(&self) -> Vec<u8> {
        self.0.public_key().as_ref().to_vec()
    }
    fn sign(&self, b: &Batch) -> Vec<u8> {
        let kid = ring::digest::digest(&ring::digest::SHA256, &self.point());
        sign_batch(b, kid.as_ref(), |tbs| {
            let sig = self.0.sign(&SystemRandom::new(), tbs).unwrap();
            let mut out = [0u8; 64];
            out.copy_from_slice(sig.as_ref());
            Ok::<_, std::convert::Infallible>(out)
        })
        .unwrap()
    }
}

/// Debian's Prometheus with the remote-write receiver on, killed (by its pid) when dropped.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, port: u16) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, "").unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg("--web.enable-remote-write-receiver")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--config.file={}", config.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { child, port };
        wait("Prometheus to be ready", Duration::from_secs(10), || {
            get(port, "/-/ready").is_some_and(|(status, _)| status == 200)
        });
        p
    }

    /// The samples of `selector` over the last hour before `at_ms`: labels (without `__name__`) and
    /// (seconds, value) pairs per series.
    fn range(&self, selector: &str, at_ms: u64) -> Vec<(serde_json::Value, Vec<(f64, String)>)> {
        let query = format!(
            "/api/v1/query?query={}&time={}",
            percent(&format!("{selector}[1h]")),
            at_ms as f64 / 1000.0
        );
        let (status, body) = get(self.port, &query).unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut out: Vec<_> = v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let mut labels = s["metric"].clone();
                labels.as_object_mut().unwrap().remove("__name__");
                let values = s["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[0].as_f64().unwrap(), p[1].as_str().unwrap().to_owned()))
                    .collect();
                (labels, values)
            })
            .collect();
        out.sort_by_key(|(l, _)| l.to_string());
        out
    }
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A tiny HTTP/1.0 GET: (status, body), or None when nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sample(seq: u64, at_ms: u64, name: &str, labels: &[(&str, &str)], value: f64) -> WireRecord {
    WireRecord {
        seq,
        at_unix_ms: at_ms,
        body: WireBody::Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            value,
            counter: name.ends_with("_total"),
        },
    }
}

/// The gauge at `seq`: GPU `seq % 2`, labels given out of order and one empty.
fn gauge(seq: u64, base: u64, value: f64) -> WireRecord {
    let gpu = (seq % 2).to_string();
    sample(
        seq,
        base + seq * 1000,
        GAUGE,
        &[("zone", "row-1"), ("gpu", &gpu), ("empty", "")],
        value,
    )
}

fn batch(first: u64, last: u64, records: Vec<WireRecord>) -> Batch {
    Batch {
        device_id: DEV.into(),
        boot_id: "boot-1".into(),
        first_seq: first,
        last_seq: last,
        records,
    }
}

#[test]
fn stored_samples_reach_prometheus_once_each() {
    if !Path::new(PROMETHEUS).exists() {
        eprintln!(
            "SKIPPED: {PROMETHEUS} is missing (apt-get install prometheus) — remote write is not tested against a receiver"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();
    let port = free_port();
    let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{port}/api/v1/write")).unwrap();
    let mut opts = ExportOptions::new(endpoint, Some(&state));
    opts.min_backoff = Duration::from_millis(50);
    opts.max_backoff = Duration::from_millis(400);
    opts.timeout = Duration::from_secs(5);
    opts.stats_interval = Duration::from_millis(100);
    let exporter = Exporter::start(opts).unwrap();
    let stats = || exporter.stats();
    let mut ingest = Ingest::open(&state).unwrap();
    ingest.export_to(exporter.clone());
    let key = Key::new();
    let mut accept = |b: Batch| {
        ingest
            .accept(DEV, &key.point(), &key.sign(&b))
            .unwrap()
            .unwrap()
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let base = now_ms - 120_000;

    // The receiver is down: the first batch waits in the queue, retried with backoff.
    accept(batch(
        1,
        20,
        (1..=20).map(|s| gauge(s, base, 40.0 + s as f64)).collect(),
    ));
    wait("failed attempts", Duration::from_secs(5), || {
        stats().failed_requests >= 2
    });
    let down = stats();
    assert!(
        down.last_error
            .as_deref()
            .unwrap()
            .contains("cannot connect"),
        "{down:?}"
    );
    assert_eq!((down.exported, down.queued), (0, 20), "{down:?}");

    let prom = Prometheus::start(tmp.path(), port);
    // Overlapping the first: seqs 11..=20 again, with other values; they are duplicates, never exported.
    let mut records: Vec<WireRecord> = (11..=30)
        .map(|s| gauge(s, base, if s <= 20 { 1000.0 } else { 40.0 } + s as f64))
        .collect();
    records.push(WireRecord {
        seq: 31,
        at_unix_ms: base + 31_000,
        body: WireBody::Event {
            component: "gpu0".into(),
            kind: "xid".into(),
            severity: "critical".into(),
            message: "XID 79".into(),
        },
    });
    records.push(sample(32, base + 32_000, GAUGE, &[("bad-label", "x")], 1.0));
    records.push(sample(
        33,
        base + 33_000,
        GAUGE,
        &[(remote_write::DEVICE_LABEL, "000banother")],
        1.0,
    ));
    records.push(sample(
        34,
        base + 34_000,
        "cairn_test_xid_total",
        &[("gpu", "0")],
        1.0,
    ));
    let ack = accept(batch(11, 34, records));
    assert_eq!(ack.duplicates, 10);
    wait("the backlog exported", Duration::from_secs(10), || {
        stats().exported == 31
    });
    let st = stats();
    assert_eq!(
        (st.queued, st.dropped, st.invalid, st.rejected),
        (0, 0, 2, 0),
        "{st:?}"
    );

    let at = base + 60_000;
    let series = prom.range(GAUGE, at);
    let labels = |gpu: &str| serde_json::json!({"cairn_device": DEV, "gpu": gpu, "zone": "row-1"});
    let points = |parity: u64| -> Vec<(f64, String)> {
        (1..=30)
            .filter(|s| s % 2 == parity)
            .map(|s| ((base + s * 1000) as f64 / 1000.0, (40 + s).to_string()))
            .collect()
    };
    assert_eq!(
        series,
        vec![(labels("0"), points(0)), (labels("1"), points(1))]
    );
    let xid = prom.range("cairn_test_xid_total", at);
    assert_eq!(
        xid,
        vec![(
            serde_json::json!({"cairn_device": DEV, "gpu": "0"}),
            vec![((base + 34_000) as f64 / 1000.0, "1".to_owned())]
        )]
    );
    // Nothing else arrived (no spoofed device, no bad label).
    assert_eq!(
        prom.range(
            &format!(
                "{{__name__=~\"cairn_test_.*\",{}!=\"{DEV}\"}}",
                remote_write::DEVICE_LABEL
            ),
            at
        ),
        vec![]
    );

    // Out of order for its series (older than what Prometheus has): refused with a 400, counted, not
    // retried; the next sample goes through.
    accept(batch(35, 35, vec![gauge(35, base - 100_000, 1.0)]));
    wait("the refusal", Duration::from_secs(5), || {
        stats().rejected == 1
    });
    accept(batch(36, 36, vec![gauge(36, base, 76.0)]));
    wait("the next export", Duration::from_secs(5), || {
        stats().exported == 32
    });
    let st = stats();
    assert!(st.last_error.as_deref().unwrap().contains("400"), "{st:?}");
    assert_eq!(st.requests, 3, "{st:?}");
    let gpu0 = prom.range(&format!("{GAUGE}{{gpu=\"0\"}}"), base + 36_000 + 1);
    assert_eq!(gpu0[0].1.last().unwrap().1, "76");

    // The counters reach the state directory, and `cairn-fleet telemetry` shows them.
    wait("the counters' file", Duration::from_secs(5), || {
        remote_write::read_stats(&state).is_some_and(|s: ExportStats| s.exported == 32)
    });
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-fleet"))
        .args(["telemetry", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "remote write to http://127.0.0.1:{port}/api/v1/write"
        )) && text.contains("exported 32")
            && text.contains("rejected 1"),
        "{text}"
    );
}

#[test]
fn serve_exports_with_the_flag_and_forgets_old_counters_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ready = tmp.path().join("ready");
    let serve = |extra: &[&str]| {
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-fleet"))
            .args(["serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait("the fleet to serve", Duration::from_secs(10), || {
            ready.exists() || child.try_wait().unwrap().is_some()
        });
        assert!(
            child.try_wait().unwrap().is_none(),
            "cairn-fleet serve exited"
        );
        child
    };
    // Nothing listens on port 9 (discard): the counters show the failures.
    let url = "http://127.0.0.1:9/api/v1/write";
    let mut child = serve(&["--remote-write", url]);
    wait("the counters' file", Duration::from_secs(5), || {
        remote_write::read_stats(&state).is_some_and(|s| s.url == url)
    });
    let _ = child.kill();
    let _ = child.wait();
    let mut child = serve(&[]);
    assert!(remote_write::read_stats(&state).is_none());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn serve_refuses_a_remote_write_url_it_cannot_use() {
    for url in ["https://prometheus:9090/api/v1/write", "prometheus:9090"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn-fleet"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--state",
                "/nonexistent",
            ])
            .args(["--remote-write", url])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("remote-write URL"), "{err}");
    }
}
