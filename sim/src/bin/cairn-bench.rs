//! cairn-bench: the numbers `just bench` reports, measured on a simulated site built from this workspace's
//! binaries (run it from target/release). Prints a table and appends one JSON line per figure to
//! target/bench/results.jsonl (or the file named as the first argument): {"bench", "metric", "value", "unit", "peer"}.

use cairn_proto::control::Command;
use cairn_sim::{Site, SiteOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Figure {
    bench: &'static str,
    metric: &'static str,
    value: f64,
    unit: &'static str,
    peer: Option<&'static str>,
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Mean CPU time `pid` spends per GET of `url`, over `n` scrapes.
fn scrape_cpu_ms(pid: u32, url: &str, n: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let c0 = cpu_ticks(pid).ok_or("process exited")?;
    for _ in 0..n {
        let out = std::process::Command::new("curl")
            .args(["-fsS", "-o", "/dev/null", url])
            .status()?;
        if !out.success() {
            return Err(format!("scraping {url} failed").into());
        }
    }
    let c1 = cpu_ticks(pid).ok_or("process exited")?;
    // Ticks are 10 ms; over hundreds of scrapes the mean is fine-grained enough.
    Ok((c1 - c0) as f64 * 10.0 / f64::from(n))
}

/// A running node_exporter: its pid, its /metrics URL, and the process to stop.
type NodeExporter = (u32, String, std::process::Child);

/// node_exporter with only the collectors that read what cairnd reads (hwmon, RAPL), on the fake tree.
fn start_node_exporter(
    sysroot: &std::path::Path,
) -> Result<Option<NodeExporter>, Box<dyn std::error::Error>> {
    let bin = std::path::Path::new("/usr/bin/prometheus-node-exporter");
    if !bin.exists() {
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = std::process::Command::new(bin)
        .arg(format!("--path.sysfs={}", sysroot.join("sys").display()))
        .args([
            "--collector.disable-defaults",
            "--collector.hwmon",
            "--collector.rapl",
            &format!("--web.listen-address=127.0.0.1:{port}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::process::Command::new("curl")
        .args(["-fsS", "-o", "/dev/null", &url])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            return Err("node_exporter did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Some((child.id(), url, child)))
}

/// The peer a figure measures, when it is not cairn: told by the metric's name.
fn peer_of(metric: &str) -> Option<&'static str> {
    if metric.starts_with("node_exporter") {
        Some("prometheus-node-exporter")
    } else if metric.starts_with("prometheus_") {
        Some("prometheus --enable-feature=agent")
    } else {
        None
    }
}

/// 24 h of 1,000 series at 10 s: written into cairnd's spool while it is stopped (durable append rate, bytes
/// on disk, CPU), then drained to the fleet over mTLS loopback by a restarted cairnd (drain time, CPU of
/// cairnd and of the fleet); then the same series through Prometheus in agent mode remote-writing to a second
/// Prometheus (WAL bytes and CPU per sample).
fn telemetry_bench(
    site: &mut Site,
    fig: &mut impl FnMut(&'static str, f64, &'static str),
) -> Result<(), Box<dyn std::error::Error>> {
    use cairn_agent::spool::{RecordBody, Spool, SpoolConfig};
    use cairn_sim::telemetry_peer::{self, SERIES};
    const STEPS: usize = 8640;
    site.stop_cairnd();
    let spool_dir = site.dir.join("agent/data/spool");
    let spool = Spool::open(&spool_dir, SpoolConfig::default())?;
    let before = spool.stats();
    let labels: Vec<Vec<(String, String)>> = (0..SERIES).map(telemetry_peer::labels).collect();
    let start_ms = 1_790_000_000_000u64;
    let me = std::process::id();
    let c0 = cpu_ticks(me).ok_or("no CPU figures for this process")?;
    let t = Instant::now();
    for step in 0..STEPS {
        let at = start_ms + step as u64 * telemetry_peer::STEP_MS;
        let items = (0..SERIES)
            .map(|i| {
                (
                    at,
                    RecordBody::Sample {
                        name: telemetry_peer::METRIC.to_owned(),
                        labels: labels[i].clone(),
                        value: telemetry_peer::value(step, i),
                        counter: false,
                    },
                )
            })
            .collect();
        spool.append_many(items)?;
    }
    let target = spool.flush()?;
    let secs = t.elapsed().as_secs_f64();
    let append_ticks = cpu_ticks(me).ok_or("no CPU figures for this process")? - c0;
    let n = (SERIES * STEPS) as f64;
    fig("spool_append_durable_samples_per_s", n / secs, "1/s");
    let after = spool.stats();
    fig(
        "spool_bytes_on_disk_per_sample",
        after.bytes_on_disk.saturating_sub(before.bytes_on_disk) as f64 / n,
        "B",
    );
    drop(spool);

    site.start_cairnd()?;
    let (d0, f0) = (
        cpu_ticks(site.env.cairnd_pid).ok_or("cairnd exited")?,
        cpu_ticks(site.env.fleet_pid).ok_or("cairn-fleet exited")?,
    );
    let t = Instant::now();
    loop {
        match cairn_agent::control::request(
            &site.env.control_socket,
            Command::Telemetry,
            Duration::from_secs(5),
        )? {
            cairn_proto::control::Response::Telemetry(s) if s.acked_seq >= target => break,
            cairn_proto::control::Response::Telemetry(_) => {}
            other => return Err(format!("unexpected answer {other:?}").into()),
        }
        if t.elapsed() > Duration::from_secs(900) {
            return Err("the 24 h backlog did not drain within 15 min".into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    fig("drain_24h_1000_series_mtls", t.elapsed().as_secs_f64(), "s");
    let drain_ticks = cpu_ticks(site.env.cairnd_pid).ok_or("cairnd exited")? - d0;
    let fleet_ticks = cpu_ticks(site.env.fleet_pid).ok_or("cairn-fleet exited")? - f0;
    // Ticks are 10 ms. The device's side: spooling, then reading, encoding, compressing, signing (the TPM's
    // own work is swtpm's, not counted) and sending; the fleet's: verifying, deduping, storing.
    let us = |ticks: u64| ticks as f64 * 10_000.0 / n;
    fig(
        "cairn_device_cpu_per_sample",
        us(append_ticks + drain_ticks),
        "us",
    );
    fig("cairn_fleet_ingest_cpu_per_sample", us(fleet_ticks), "us");

    let cost = telemetry_peer::prometheus_agent(&site.dir.join("prometheus-agent"), 600)?;
    fig(
        "prometheus_agent_wal_bytes_per_sample",
        cost.wal_bytes_per_sample,
        "B",
    );
    fig(
        "prometheus_agent_cpu_per_sample",
        cost.agent_cpu_us_per_sample,
        "us",
    );
    fig(
        "prometheus_receiver_cpu_per_sample",
        cost.receiver_cpu_us_per_sample,
        "us",
    );
    fig(
        "prometheus_agent_samples_measured",
        cost.samples as f64,
        "1",
    );
    Ok(())
}

fn workloads(site: &Site) -> Option<cairn_proto::control::WorkloadsReport> {
    match cairn_agent::control::request(
        &site.env.control_socket,
        Command::Workloads,
        Duration::from_secs(5),
    ) {
        Ok(cairn_proto::control::Response::Workloads(w)) => Some(w),
        _ => None,
    }
}

/// A new signed set of `n` recipes to every unit active, against systemd in a bookworm container (the nspawn
/// tier's): from the set written where the fleet serves it, and from the agent accepting it (the first part
/// is the agent's fetch interval, 1 s here).
fn workloads_bench(
    dir: &std::path::Path,
    fig: &mut impl FnMut(&'static str, f64, &'static str),
) -> Result<(), Box<dyn std::error::Error>> {
    use cairn_sim::nspawn::{self, Container};
    let root = nspawn::rootfs(std::path::Path::new("target/tmp"))?;
    std::fs::create_dir_all(dir)?;
    let base = dir.canonicalize()?;
    let container = Container::boot(&root, &base.join("nspawn"), &[&base])?;
    let signer = base.join("signer");
    let fleet = cairn_sim::process::bin_dir().join("cairn-fleet");
    let ok = std::process::Command::new(&fleet)
        .args(["workloads", "keygen", "--dir"])
        .arg(&signer)
        .status()?;
    if !ok.success() {
        return Err("cairn-fleet workloads keygen failed".into());
    }
    let mut site = Site::up(
        &base.join("site"),
        &SiteOptions {
            extra_config: format!(
                "[workloads]\nsigner_key = \"{}\"\ndbus_address = \"{}\"\njournal_dir = \"{}\"\nfetch_interval_secs = 1\n",
                signer.join("workload-signer.pub").display(),
                container.bus_address(),
                container.journal_dir().display(),
            ),
            ..SiteOptions::default()
        },
    )?;
    site.wait_onboarding("onboarded", Duration::from_secs(60))
        .ok_or("the workloads site did not onboard within 60 s")?;
    let recipes = base.join("recipes");
    std::fs::create_dir_all(&recipes)?;
    let out = site.env.fleet_state.join("workloads/default.cose");
    let cases: [(usize, &'static str, &'static str); 2] = [
        (
            1,
            "workload_set_to_active_1_recipe",
            "workload_accepted_to_active_1_recipe",
        ),
        (
            50,
            "workload_set_to_active_50_recipes",
            "workload_accepted_to_active_50_recipes",
        ),
    ];
    for (serial, (n, total, after)) in cases.into_iter().enumerate() {
        let mut files = Vec::new();
        for i in 0..n {
            let f = recipes.join(format!("s{serial}-w{i}.toml"));
            std::fs::write(
                &f,
                format!("name = \"s{serial}-w{i}\"\nversion = \"1\"\n[run.command]\nargv = [\"/bin/busybox\", \"sleep\", \"100000\"]\n"),
            )?;
            files.push(f);
        }
        let t0 = Instant::now();
        let ok = std::process::Command::new(&fleet)
            .args(["workloads", "sign", "--key"])
            .arg(signer.join("workload-signer.key"))
            .args(["--serial", &(serial + 1).to_string(), "--out"])
            .arg(&out)
            .args(&files)
            .stdout(std::process::Stdio::null())
            .status()?;
        if !ok.success() {
            return Err("cairn-fleet workloads sign failed".into());
        }
        let mut accepted = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let w = workloads(&site).ok_or("cairnd stopped answering")?;
            if accepted.is_none() && w.serial == Some(serial as u64 + 1) {
                accepted = Some(Instant::now());
            }
            let prefix = format!("s{serial}-");
            let up = w
                .workloads
                .iter()
                .filter(|x| x.name.starts_with(&prefix) && x.state == "running")
                .count();
            // The previous case's units must be gone too: the set replaced them.
            if up == n && w.workloads.len() == n {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{up} of {n} workloads active after 120 s").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        fig(total, t0.elapsed().as_secs_f64() * 1000.0, "ms");
        if let Some(a) = accepted {
            fig(after, a.elapsed().as_secs_f64() * 1000.0, "ms");
        }
    }
    site.down();
    Ok(())
}

fn run(dir: &std::path::Path) -> Result<Vec<Figure>, Box<dyn std::error::Error>> {
    let mut figures = Vec::new();
    let mut fig = |metric, value, unit| {
        figures.push(Figure {
            bench: "site",
            metric,
            value,
            unit,
            peer: peer_of(metric),
        })
    };

    let t = Instant::now();
    let mut site = Site::up(dir, &SiteOptions::default())?;
    fig("site_up", t.elapsed().as_secs_f64(), "s");

    // First onboarding: enrol, MakeCredential/ActivateCredential, quote, two TPM2_Certify, certificate.
    let t = Instant::now();
    site.wait_onboarding("onboarded", Duration::from_secs(60))
        .ok_or("the site did not onboard within 60 s")?;
    fig(
        "first_onboarding_after_site_up",
        t.elapsed().as_secs_f64() * 1000.0,
        "ms",
    );
    // Re-attestation on demand, as `cairnctl attest` asks for it: mTLS handshake signed by the TPM, fleet
    // challenge, quote, verdict.
    let mut rt = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        match cairn_agent::control::request(
            &site.env.control_socket,
            Command::Attest,
            Duration::from_secs(60),
        )? {
            cairn_proto::control::Response::Attest(o) if o.state == "onboarded" => {}
            other => return Err(format!("attestation failed: {other:?}").into()),
        }
        rt.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    rt.sort_by(f64::total_cmp);
    fig(
        "attestation_round_trip_swtpm_p50",
        percentile(&rt, 0.5),
        "ms",
    );
    fig(
        "attestation_round_trip_swtpm_max",
        percentile(&rt, 1.0),
        "ms",
    );

    site.stop_cairnd();
    let t = Instant::now();
    site.start_cairnd()?;
    fig(
        "cairnd_start_to_all_components_checked",
        t.elapsed().as_secs_f64() * 1000.0,
        "ms",
    );

    let mut lat = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = Instant::now();
        cairn_agent::control::request(
            &site.env.control_socket,
            Command::Status,
            Duration::from_secs(5),
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    fig("control_status_round_trip_p50", percentile(&lat, 0.5), "us");
    fig(
        "control_status_round_trip_p99",
        percentile(&lat, 0.99),
        "us",
    );

    // Idle cost with 8 GPUs, 8 NVMe drives (SMART read every poll), 1 s hardware polling and a 1 s fleet check.
    let pid = site.env.cairnd_pid;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let window = Duration::from_secs(10);
    let c0 = cpu_ticks(pid).ok_or("cairnd exited")?;
    std::thread::sleep(window);
    let c1 = cpu_ticks(pid).ok_or("cairnd exited")?;
    fig(
        "cairnd_cpu_idle_8gpu_1s_poll",
        (c1 - c0) as f64 / ticks_per_s / window.as_secs_f64() * 100.0,
        "% of a core",
    );
    fig(
        "cairnd_rss_8gpu",
        proc_field(pid, "status", "VmRSS:").ok_or("no VmRSS")? as f64 / 1024.0,
        "MiB",
    );

    // One quote (AK load under the EK + TPM2_Quote + PCR read) on swtpm, as `cairnctl quote` does it.
    let tpm = cairn_tpm::Tpm::new(&site.env.tpm_tcti)?;
    let data = dir.join("agent/data");
    let alg = cairn_tpm::EkAlgorithm::Rsa2048;
    cairn_agent::attestation::load_or_create_ak(&tpm, &data, alg)?;
    let mut quote_ms = Vec::new();
    let mut last = None;
    for i in 0..20u8 {
        let t = Instant::now();
        let ak = cairn_agent::attestation::load_or_create_ak(&tpm, &data, alg)?;
        last = Some((tpm.quote(alg, &ak, &[i; 32], &[0, 1, 2, 3, 4, 5, 6, 7])?, i));
        quote_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    quote_ms.sort_by(f64::total_cmp);
    fig("tpm_quote_swtpm_p50", percentile(&quote_ms, 0.5), "ms");

    // The fleet's side: full verification (AK attributes, RSA-2048 signature, nonce, PCR digest) on one core.
    let (q, i) = last.ok_or("no quote")?;
    let values: Vec<(u8, [u8; 32])> = (0..8u8)
        .map(|p| {
            let at = 140 + 66 * p as usize + 2;
            let mut v = [0u8; 32];
            v.copy_from_slice(&q.pcrs[at..at + 32]);
            (p, v)
        })
        .collect();
    let n = 5000;
    let t = Instant::now();
    for _ in 0..n {
        cairn_fleet::quote::verify(&q.ak_public, &q.message, &q.signature, &[i; 32], &values)?;
    }
    fig(
        "fleet_quote_verifications_per_core",
        n as f64 / t.elapsed().as_secs_f64(),
        "1/s",
    );

    // CPU per /metrics scrape, cairnd beside node_exporter reading the same fake tree (hwmon, RAPL).
    let scrapes = 1000;
    let cairnd_ms = scrape_cpu_ms(pid, &site.env.metrics_url, scrapes)?;
    fig("cairnd_cpu_per_scrape", cairnd_ms, "ms");
    if let Some((ne_pid, url, mut child)) = start_node_exporter(&dir.join("sysroot"))? {
        let ne_ms = scrape_cpu_ms(ne_pid, &url, scrapes);
        let _ = child.kill();
        let _ = child.wait();
        let ne_ms = ne_ms?;
        fig("node_exporter_cpu_per_scrape", ne_ms, "ms");
        fig(
            "cairnd_to_node_exporter_cpu_per_scrape",
            cairnd_ms / ne_ms,
            "ratio",
        );
    } else {
        eprintln!("cairn-bench: prometheus-node-exporter not installed; skipping the comparison");
    }

    telemetry_bench(&mut site, &mut fig)?;

    let s = site.status()?;
    if let Some(f) = s.fleet.facts() {
        fig(
            "fleet_info_round_trip_tls",
            f.round_trip_us as f64 / 1000.0,
            "ms",
        );
    }
    site.down();
    workloads_bench(&dir.join("workloads"), &mut fig)?;
    Ok(figures)
}

fn main() -> std::process::ExitCode {
    let dir = std::env::temp_dir().join(format!("cairn-bench-{}", std::process::id()));
    let result = run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let figures = match result {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cairn-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "{:<8} {:<42} {:>12}  {:<14} peer",
        "bench", "metric", "value", "unit"
    );
    for f in &figures {
        println!(
            "{:<8} {:<42} {:>12.3}  {:<14} {}",
            f.bench,
            f.metric,
            f.value,
            f.unit,
            f.peer.unwrap_or("-")
        );
    }
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/bench/results.jsonl".into()),
    );
    if let Some(parent) = out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let mut file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cairn-bench: cannot append to {}: {e}", out.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    for f in &figures {
        let line = serde_json::json!({"bench": f.bench, "metric": f.metric, "value": f.value, "unit": f.unit, "peer": f.peer});
        let _ = writeln!(file, "{line}");
    }
    println!("appended {} figures to {}", figures.len(), out.display());
    std::process::ExitCode::SUCCESS
}
