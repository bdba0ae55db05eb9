//! The telemetry benchmark's workload and its peer: 1,000 GPU series sampled every 10 s, written into cairn's
//! spool by `cairn-bench`, and the same series scraped by Prometheus in agent mode
//! (`prometheus --enable-feature=agent`) that remote-writes them to a second Prometheus
//! (`--web.enable-remote-write-receiver`). Both sides get the same names, labels, values and 10 s spacing.
//!
//! Prometheus cannot be fed a backlog: it scrapes, and it refuses timestamps far from its clock (past ones
//! are never remote-written, future ones are dropped). So the exporter here hands out one step per scrape and
//! the agent scrapes every 50 ms, stamping the samples itself: the same values, replayed faster. The spacing
//! does not change the agent's WAL, whose sample records carry one base time per scrape and a varint delta
//! per sample (0 here, as at 10 s). Bytes per sample are the growth of the WAL after the first steps (series
//! records excluded: the steady-state cost) over the samples appended meanwhile.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SERIES: usize = 1000;
pub const METRIC: &str = "DCGM_FI_DEV_GPU_TEMP";
/// 10 s between samples of a series, in milliseconds.
pub const STEP_MS: u64 = 10_000;

/// The labels of series `i`, as dcgm-exporter would give them for 8 GPUs.
pub fn labels(i: usize) -> Vec<(String, String)> {
    vec![
        ("gpu".to_owned(), (i % 8).to_string()),
        (
            "UUID".to_owned(),
            format!("GPU-c0ffee{:02}-cafe-4000-8000-{:012}", i % 8, i % 8),
        ),
        (
            "pci_bus_id".to_owned(),
            format!("00000000:{:02X}:00.0", 0x18 + i % 8),
        ),
        ("modelName".to_owned(), "NVIDIA H100 80GB HBM3".to_owned()),
        ("Hostname".to_owned(), "site-0042".to_owned()),
        ("series".to_owned(), (i / 8).to_string()),
    ]
}

/// The value of series `i` at step `step`: a temperature wandering between 40 and 69 °C.
pub fn value(step: usize, i: usize) -> f64 {
    40.0 + ((step + i) % 30) as f64
}

/// What the Prometheus agent spent.
#[derive(Debug, Clone, Copy)]
pub struct AgentCost {
    pub samples: u64,
    /// WAL bytes per sample appended, after the first steps.
    pub wal_bytes_per_sample: f64,
    /// CPU of the agent (scrape, WAL, remote write) per sample, in microseconds.
    pub agent_cpu_us_per_sample: f64,
    /// CPU of the receiving Prometheus per sample, in microseconds.
    pub receiver_cpu_us_per_sample: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("Prometheus is not installed at {0} (apt-get install prometheus)")]
    Missing(String),
    #[error("could not {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PeerError {
    let what = what.into();
    move |source| PeerError::Io { what, source }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, PeerError> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io("pick a free port"))?
        .port())
}

/// A plain HTTP GET on loopback (no client crate for a bench helper).
fn get(port: u16, path: &str) -> Result<String, PeerError> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(io(format!("connect to 127.0.0.1:{port}")))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("set a timeout"))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(io("send a request"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(io("read an answer"))?;
    if !out.starts_with("HTTP/1.") || out.split(' ').nth(1).is_none_or(|c| c != "200") {
        return Err(PeerError::Failed(format!(
            "GET {path} on port {port} answered {}",
            out.lines().next().unwrap_or("nothing")
        )));
    }
    Ok(out)
}

/// Sum of every series of `name` in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn cpu_ticks(pid: u32) -> Result<u64, PeerError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(io(format!("read /proc/{pid}/stat")))?;
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(field(11) + field(12))
}

/// Bytes of every file under `dir` (what `du -b` would say, without directory entries).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Serves one step of every series per scrape, `steps` times, then nothing.
fn start_exporter(steps: usize) -> Result<(u16, Arc<AtomicU64>, Arc<AtomicBool>), PeerError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listen for the exporter"))?;
    let port = listener
        .local_addr()
        .map_err(io("read the exporter's port"))?
        .port();
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let label_text: Vec<String> = (0..SERIES)
        .map(|i| {
            labels(i)
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let (served2, stop2) = (served.clone(), stop.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop2.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut conn) = conn else { continue };
            let mut req = [0u8; 4096];
            let _ = conn.read(&mut req);
            let step = served2.load(Ordering::Relaxed) as usize;
            let mut body = String::with_capacity(SERIES * 200);
            if step < steps {
                served2.fetch_add(1, Ordering::Relaxed);
                body.push_str("# TYPE DCGM_FI_DEV_GPU_TEMP gauge\n");
                for (i, l) in label_text.iter().enumerate() {
                    body.push_str(&format!("{METRIC}{{{l}}} {}\n", value(step, i)));
                }
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok((port, served, stop))
}

fn spawn_prometheus(args: &[String], log: &Path) -> Result<Running, PeerError> {
    let out = std::fs::File::create(log).map_err(io(format!("create {}", log.display())))?;
    let err = out.try_clone().map_err(io("duplicate a log file"))?;
    Command::new("prometheus")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map(Running)
        .map_err(io("start prometheus"))
}

fn wait_ready(port: u16, what: &str) -> Result<(), PeerError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/-/ready").is_err() {
        if Instant::now() > deadline {
            return Err(PeerError::Failed(format!(
                "{what} did not become ready within 30 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs the agent and its receiver in `dir` over `steps` steps of the workload.
pub fn prometheus_agent(dir: &Path, steps: usize) -> Result<AgentCost, PeerError> {
    let bin = "/usr/bin/prometheus";
    if !Path::new(bin).exists() {
        return Err(PeerError::Missing(bin.into()));
    }
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let (exporter, served, stop) = start_exporter(steps)?;
    let (agent_port, recv_port) = (free_port()?, free_port()?);

    let recv_cfg = dir.join("receiver.yml");
    std::fs::write(&recv_cfg, "global: {}\n").map_err(io("write the receiver's configuration"))?;
    let receiver = spawn_prometheus(
        &[
            format!("--config.file={}", recv_cfg.display()),
            format!("--web.listen-address=127.0.0.1:{recv_port}"),
            format!(
                "--storage.tsdb.path={}",
                dir.join("receiver-data").display()
            ),
            "--web.enable-remote-write-receiver".into(),
        ],
        &dir.join("receiver.log"),
    )?;
    wait_ready(recv_port, "the receiving Prometheus")?;

    let agent_cfg = dir.join("agent.yml");
    std::fs::write(
        &agent_cfg,
        format!(
            "global:\n  scrape_interval: 50ms\n  scrape_timeout: 50ms\nscrape_configs:\n  - job_name: gpu\n    \
             static_configs: [{{targets: ['127.0.0.1:{exporter}']}}]\nremote_write:\n  - url: \
             http://127.0.0.1:{recv_port}/api/v1/write\n"
        ),
    )
    .map_err(io("write the agent's configuration"))?;
    let wal = dir.join("agent-data");
    let agent = spawn_prometheus(
        &[
            "--enable-feature=agent".into(),
            format!("--config.file={}", agent_cfg.display()),
            format!("--web.listen-address=127.0.0.1:{agent_port}"),
            format!("--storage.agent.path={}", wal.display()),
        ],
        &dir.join("agent.log"),
    )?;
    wait_ready(agent_port, "the Prometheus agent")?;

    let appended = || -> Result<f64, PeerError> {
        Ok(metric(
            &get(agent_port, "/metrics")?,
            "prometheus_agent_samples_appended_total",
        ))
    };
    // Past the first steps the series are in the WAL: from here on it grows by samples alone.
    let warm = (steps / 20).max(2) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while served.load(Ordering::Relaxed) < warm {
        if Instant::now() > deadline {
            return Err(PeerError::Failed(
                "the agent did not scrape the exporter within 120 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s0, w0) = (appended()?, dir_bytes(&wal));
    let (a0, r0) = (cpu_ticks(agent.0.id())?, cpu_ticks(receiver.0.id())?);
    // Every step served: the WAL holds them all (the agent appends a scrape before it scrapes again). The
    // agent adds five series of its own per scrape (`up`, `scrape_duration_seconds`, …): half a percent of
    // the samples counted. The CPU window closes once everything appended up to the last step was sent.
    while (served.load(Ordering::Relaxed) as usize) < steps {
        if Instant::now() > deadline {
            return Err(PeerError::Failed(format!(
                "the agent scraped {} of {steps} steps within 120 s",
                served.load(Ordering::Relaxed)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (s1, w1) = (appended()?, dir_bytes(&wal));
    loop {
        let sent = metric(
            &get(agent_port, "/metrics")?,
            "prometheus_remote_storage_samples_total",
        );
        if sent >= s1 {
            break;
        }
        if Instant::now() > deadline {
            return Err(PeerError::Failed(format!(
                "the agent sent {sent} of {s1} samples within 120 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (a1, r1) = (cpu_ticks(agent.0.id())?, cpu_ticks(receiver.0.id())?);
    stop.store(true, Ordering::Relaxed);
    drop(agent);
    drop(receiver);
    let samples = s1 - s0;
    if samples <= 0.0 {
        return Err(PeerError::Failed(
            "the agent appended nothing after warming up".into(),
        ));
    }
    // Ticks are 10 ms.
    let us = |ticks: u64| ticks as f64 * 10_000.0 / samples;
    Ok(AgentCost {
        samples: samples as u64,
        wal_bytes_per_sample: w1.saturating_sub(w0) as f64 / samples,
        agent_cpu_us_per_sample: us(a1 - a0),
        receiver_cpu_us_per_sample: us(r1 - r0),
    })
}
