//! Workloads against a real systemd: a bookworm container booted with systemd-nspawn, its bus handed to
//! cairnd, the fleet serving signed sets. One test walks the whole lifecycle in order, since each step
//! builds on the units the last one left: converge, properties read back over D-Bus, a tampered set
//! refused, replacement, removal, a crashing workload given up on with its journal, a watchdog kill, an
//! agent restart that adopts, and a "reboot" with no uplink that brings the units back from the kept set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cairn_proto::control::{Command, Response, WorkloadStatus, WorkloadsReport};
use cairn_sim::nspawn::{self, Container};
use cairn_sim::process::{bin_dir, wait_for};
use cairn_sim::{Site, SiteOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn report(site: &Site) -> Option<WorkloadsReport> {
    match cairn_agent::control::request(
        &site.env.control_socket,
        Command::Workloads,
        Duration::from_secs(5),
    ) {
        Ok(Response::Workloads(w)) => Some(w),
        _ => None,
    }
}

fn workload(site: &Site, name: &str) -> Option<WorkloadStatus> {
    report(site)?.workloads.into_iter().find(|w| w.name == name)
}

/// Waits until `pred` holds for workload `name`; panics with the last report otherwise.
fn wait_workload(
    site: &Site,
    name: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    wait_for(Duration::from_secs(secs), || {
        workload(site, name).filter(|w| pred(w))
    })
    .unwrap_or_else(|| {
        panic!(
            "{name}: {what} within {secs} s; last report: {:#?}",
            report(site)
        )
    })
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Busybox-only workloads: the container has no python.
fn recipes(dir: &Path, port: u16) {
    std::fs::create_dir_all(dir).unwrap();
    write(
        dir,
        "web.sh",
        "#!/bin/sh\nmkdir -p /tmp/www && echo ok > /tmp/www/healthz && echo \"web $CAIRN_RECIPE_VERSION on $PORT\"\nexec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h /tmp/www\n",
    );
    for v in ["1", "2"] {
        write(
            dir,
            &format!("web-{v}.toml"),
            &format!(
                r#"name = "web"
version = "{v}"
persistent_data = true
[run.command]
argv = ["web.sh"]
artifact = "web.sh"
[env]
PORT = "{port}"
[resources]
cpu = 0.5
memory = "64M"
tasks = 32
[gpus]
count = 1
[[ports]]
port = {port}
[health]
kind = "http"
port = {port}
path = "/healthz"
interval_secs = 1
timeout_secs = 1
failures = 2
"#
            ),
        );
    }
    write(
        dir,
        "ticker.sh",
        "#!/bin/sh\nwhile true; do echo \"tick $CAIRN_RECIPE_VERSION\"; /bin/busybox sleep 5; done\n",
    );
    for v in ["1", "2"] {
        write(
            dir,
            &format!("ticker-{v}.toml"),
            &format!(
                "name = \"ticker\"\nversion = \"{v}\"\n[run.command]\nargv = [\"ticker.sh\"]\nartifact = \"ticker.sh\"\n"
            ),
        );
    }
    write(dir, "batch.sh", "#!/bin/sh\necho \"batch done\"\n");
    write(
        dir,
        "batch.toml",
        "name = \"batch\"\nversion = \"1\"\nafter = [\"web\"]\n[run.command]\nargv = [\"batch.sh\"]\nartifact = \"batch.sh\"\n[restart]\npolicy = \"no\"\n",
    );
    write(
        dir,
        "crasher.sh",
        "#!/bin/sh\necho \"crasher: cannot open camera /dev/video0\"\nexit 3\n",
    );
    write(
        dir,
        "crasher.toml",
        "name = \"crasher\"\nversion = \"1\"\n[run.command]\nargv = [\"crasher.sh\"]\nartifact = \"crasher.sh\"\n[restart]\nmax_restarts = 2\nwindow_secs = 60\ndelay_secs = 1\n",
    );
    write(
        dir,
        "hung.toml",
        "name = \"hung\"\nversion = \"1\"\n[run.command]\nargv = [\"/bin/busybox\", \"sleep\", \"1000\"]\n[restart]\npolicy = \"always\"\nmax_restarts = 50\ndelay_secs = 1\nwatchdog_secs = 2\n",
    );
}

fn fleet(args: &[&str]) {
    let out = std::process::Command::new(bin_dir().join("cairn-fleet"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cairn-fleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sign(key: &Path, serial: u64, out: &Path, files: &[PathBuf]) {
    let serial = serial.to_string();
    let mut args = vec![
        "workloads",
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--serial",
        &serial,
        "--out",
        out.to_str().unwrap(),
    ];
    let files: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    args.extend(files);
    fleet(&args);
}

fn main_pid(c: &Container, unit: &str) -> String {
    c.property(unit, "Service", "MainPID")
        .unwrap_or_else(|| panic!("{unit} not loaded"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn workloads_converge_replace_fail_and_are_adopted_under_a_real_systemd() {
    let started = Instant::now();
    let root = nspawn::rootfs(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let container = Container::boot(&root, &base.join("nspawn"), &[&base]).unwrap();
    eprintln!("container up after {:?}", started.elapsed());

    let signer = base.join("signer");
    fleet(&["workloads", "keygen", "--dir", signer.to_str().unwrap()]);
    let key = signer.join("workload-signer.key");
    let port = free_port();
    let rdir = base.join("recipes");
    recipes(&rdir, port);
    let r = |n: &str| rdir.join(n);

    let mut site = Site::up(
        &base.join("site"),
        &SiteOptions {
            gpu_profile: "l4x1".into(),
            extra_config: format!(
                "[workloads]\nsigner_key = \"{}\"\ndbus_address = \"{}\"\njournal_dir = \"{}\"\nfetch_interval_secs = 1\nresync_interval_secs = 5\n",
                signer.join("workload-signer.pub").display(),
                container.bus_address(),
                container.journal_dir().display(),
            ),
            ..SiteOptions::default()
        },
    )
    .unwrap();
    site.wait_onboarding("onboarded", Duration::from_secs(60))
        .expect("onboarded");
    let sets = site.env.fleet_state.join("workloads");
    let default_set = sets.join("default.cose");

    // 1. Three recipes converge: web healthy, ticker running, batch (after web) completed.
    let t0 = Instant::now();
    sign(
        &key,
        1,
        &default_set,
        &[r("web-1.toml"), r("ticker-1.toml"), r("batch.toml")],
    );
    wait_workload(&site, "web", 30, "running and healthy", |w| {
        w.state == "running" && w.health == "ok"
    });
    wait_workload(&site, "ticker", 10, "running", |w| w.state == "running");
    wait_workload(&site, "batch", 20, "completed", |w| w.state == "completed");
    eprintln!("set 1 converged in {:?}", t0.elapsed());
    let got = std::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/healthz")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "ok");

    // The sandbox and limits, as systemd holds them.
    let web = "cairn-wl-web.service";
    for (iface, prop, want) in [
        ("Service", "MemoryMax", "t 67108864"),
        ("Service", "CPUQuotaPerSecUSec", "t 500000"),
        ("Service", "TasksMax", "t 32"),
        ("Service", "DynamicUser", "b true"),
        ("Service", "NoNewPrivileges", "b true"),
        ("Service", "ProtectSystem", "s \"strict\""),
        ("Service", "PrivateTmp", "b true"),
        ("Service", "DevicePolicy", "s \"closed\""),
        ("Service", "Slice", "s \"cairn-workloads.slice\""),
        ("Service", "Restart", "s \"on-failure\""),
        ("Service", "StateDirectory", "as 1 \"cairn-wl/web\""),
    ] {
        assert_eq!(
            container.property(web, iface, prop).as_deref(),
            Some(want),
            "{web} {prop}"
        );
    }
    let devices = container.property(web, "Service", "DeviceAllow").unwrap();
    assert!(
        devices.contains("/dev/nvidia0") && devices.contains("/dev/nvidiactl"),
        "{devices}"
    );
    let ticker_devices = container
        .property("cairn-wl-ticker.service", "Service", "DeviceAllow")
        .unwrap();
    assert_eq!(ticker_devices, "a(ss) 0", "no GPUs asked, no devices");

    // `cairnctl workloads --json` shows the same, and exits 0 with nothing failed.
    let out = std::process::Command::new(bin_dir().join("cairnctl"))
        .args([
            "--socket",
            site.env.control_socket.to_str().unwrap(),
            "workloads",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: WorkloadsReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((json.serial, json.workloads.len()), (Some(1), 3));

    // 2. A tampered set is refused and changes nothing.
    let web_pid = main_pid(&container, web);
    let mut bytes = std::fs::read(&default_set).unwrap();
    let at = bytes.windows(5).position(|w| w == b"httpd").unwrap();
    bytes[at] = b'H';
    std::fs::write(&default_set, &bytes).unwrap();
    wait_for(Duration::from_secs(15), || {
        report(&site)?.refused.filter(|r| r.contains("signature"))
    })
    .unwrap_or_else(|| panic!("tampered set not refused: {:#?}", report(&site)));
    assert_eq!(report(&site).unwrap().serial, Some(1));
    assert_eq!(main_pid(&container, web), web_pid);
    // So is a replay of an older serial, signed properly.
    sign(&key, 1, &default_set, &[r("ticker-1.toml")]);
    wait_for(Duration::from_secs(15), || {
        report(&site)?.refused.filter(|r| r.contains("not above"))
    })
    .unwrap_or_else(|| panic!("replay not refused: {:#?}", report(&site)));
    assert_eq!(main_pid(&container, web), web_pid);

    // 3. Set 2: ticker 2 replaces ticker 1 (no ports: side by side), batch is dropped, crasher and hung join.
    sign(
        &key,
        2,
        &default_set,
        &[
            r("web-1.toml"),
            r("ticker-2.toml"),
            r("crasher.toml"),
            r("hung.toml"),
        ],
    );
    let t = wait_workload(&site, "ticker", 30, "version 2 running", |w| {
        w.state == "running" && w.running_version.as_deref() == Some("2")
    });
    assert_eq!(t.unit.as_deref(), Some("cairn-wl-ticker.b.service"));
    wait_for(Duration::from_secs(15), || {
        container
            .property("cairn-wl-ticker.service", "Unit", "ActiveState")
            .is_none()
            .then_some(())
    })
    .expect("ticker 1 stopped");
    wait_for(Duration::from_secs(15), || {
        container
            .property("cairn-wl-batch.service", "Unit", "ActiveState")
            .is_none()
            .then_some(())
    })
    .expect("batch removed");
    assert_eq!(main_pid(&container, web), web_pid, "web unchanged by set 2");

    // The crasher is restarted by systemd (max_restarts = 2), then reported failed with its journal.
    let c = wait_workload(&site, "crasher", 40, "failed", |w| w.state == "failed");
    assert_eq!(c.restarts, 2, "{c:#?}");
    assert!(
        c.journal.iter().any(|l| l.contains("cannot open camera")),
        "{c:#?}"
    );
    assert!(c.reason.contains("gave up"), "{}", c.reason);
    // A workload that stops answering systemd's watchdog is killed and restarted.
    let h = wait_workload(&site, "hung", 30, "restarted by the watchdog", |w| {
        w.restarts >= 1
    });
    assert_ne!(h.state, "failed");
    let result = container.property("cairn-wl-hung.service", "Service", "WatchdogUSec");
    assert_eq!(result.as_deref(), Some("t 2000000"));

    // 4. cairnd restarts: it adopts the running units instead of restarting them.
    let ticker = "cairn-wl-ticker.b.service";
    let before = (
        main_pid(&container, web),
        main_pid(&container, ticker),
        container.property(web, "Service", "NRestarts"),
    );
    site.stop_cairnd();
    site.start_cairnd().unwrap();
    wait_workload(&site, "web", 20, "adopted, healthy", |w| {
        w.state == "running" && w.health == "ok"
    });
    wait_workload(&site, "ticker", 10, "adopted", |w| w.state == "running");
    let after = (
        main_pid(&container, web),
        main_pid(&container, ticker),
        container.property(web, "Service", "NRestarts"),
    );
    assert_eq!(before, after, "units were restarted, not adopted");

    // 5. web 2 uses the same port: stop-then-start, then healthy again.
    sign(
        &key,
        3,
        &default_set,
        &[r("web-2.toml"), r("ticker-2.toml")],
    );
    wait_workload(&site, "web", 30, "version 2 healthy", |w| {
        w.running_version.as_deref() == Some("2") && w.health == "ok" && w.state == "running"
    });
    wait_for(Duration::from_secs(15), || {
        container
            .property("cairn-wl-crasher.service", "Unit", "ActiveState")
            .is_none()
            .then_some(())
    })
    .expect("the failed crasher is unloaded when the set drops it");

    // 6. "Reboot" with no uplink: fleet and agent down, units stopped; the agent brings them back from the
    // kept set alone.
    let units: Vec<String> = report(&site)
        .unwrap()
        .workloads
        .into_iter()
        .filter_map(|w| w.unit)
        .collect();
    assert_eq!(units.len(), 2, "{units:?}");
    site.stop_fleet();
    site.stop_cairnd();
    for u in &units {
        container.stop_unit(u).unwrap();
    }
    for u in &units {
        wait_for(Duration::from_secs(20), || {
            container
                .property(u, "Unit", "ActiveState")
                .is_none()
                .then_some(())
        })
        .unwrap_or_else(|| panic!("{u} did not stop"));
    }
    site.start_cairnd().unwrap();
    wait_workload(&site, "web", 30, "back after the reboot", |w| {
        w.state == "running" && w.health == "ok" && w.running_version.as_deref() == Some("2")
    });
    wait_workload(&site, "ticker", 10, "back after the reboot", |w| {
        w.state == "running"
    });
    assert_eq!(report(&site).unwrap().serial, Some(3));
    eprintln!("whole lifecycle in {:?}", started.elapsed());
    site.down();
}

/// The shipped examples, as `just demo` runs them: a site brought up with its own systemd container runs
/// camera-analytics (GPU, HTTP health, watchdog, attestation) and then nightly-report; the podman sidecar,
/// with no podman in the container, is reported failed, naming the missing program; `down` stops the container.
#[test]
fn a_site_with_workloads_runs_the_shipped_example_recipes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::up(
        &tmp.path().join("site"),
        &SiteOptions {
            gpu_profile: "l4x1".into(),
            workloads: true,
            ..SiteOptions::default()
        },
    )
    .unwrap();
    assert_ne!(site.env.nspawn_pid, 0);
    site.wait_onboarding("onboarded", Duration::from_secs(60))
        .expect("onboarded");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let sets = site.env.fleet_state.join("workloads");
    std::fs::create_dir_all(&sets).unwrap();
    sign(
        &site.env.workload_signer.clone(),
        1,
        &sets.join("default.cose"),
        &[
            "camera-analytics.toml",
            "nightly-report.toml",
            "metrics-sidecar.toml",
        ]
        .map(|f| examples.join(f)),
    );
    wait_workload(&site, "camera-analytics", 60, "running and healthy", |w| {
        w.state == "running" && w.health == "ok"
    });
    wait_workload(&site, "nightly-report", 30, "completed", |w| {
        w.state == "completed"
    });
    let sidecar = wait_workload(&site, "metrics-sidecar", 60, "failed", |w| {
        w.state == "failed"
    });
    // The reason names the program: journald can lose the unit of a process that dies at exec, so
    // systemd's own "Failed to locate executable" line is not always in the tail.
    assert!(
        sidecar
            .reason
            .contains("systemd could not execute /usr/bin/podman"),
        "{sidecar:#?}"
    );
    assert!(
        sidecar
            .journal
            .iter()
            .any(|l| l.contains("status=203/EXEC")),
        "{sidecar:#?}"
    );
    let counts = std::process::Command::new("curl")
        .args(["-sf", "http://127.0.0.1:8080/counts"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&counts.stdout).contains("\"people\""),
        "{counts:?}"
    );
    let pid = site.env.nspawn_pid;
    site.down();
    assert!(!cairn_sim::process::is_running(pid, nspawn::PROGRAM));
}
