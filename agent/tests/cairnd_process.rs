//! cairnd as a process: configuration errors and their exit code, a run with nothing usable around it, and
//! a clean stop on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CAIRND: &str = env!("CARGO_BIN_EXE_cairnd");
const CAIRNCTL: &str = env!("CARGO_BIN_EXE_cairnctl");

/// Kills the daemon if the test fails before stopping it, so a failed run leaves nothing behind.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cairnd(config: &Path) -> Command {
    let mut c = Command::new(CAIRND);
    c.arg("--config").arg(config);
    // The test's own environment must not leak CAIRN_* settings into the daemon.
    for (k, _) in std::env::vars() {
        if k.starts_with("CAIRN_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn broken_config_exits_78_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cairnd.toml");
    std::fs::write(
        &cfg,
        "[hardware]\npoll_interval_secs = 5\nsys_rooot = \"/\"\n",
    )
    .unwrap();
    let out = cairnd(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(
        err.contains("sys_rooot") && err.contains("line 3") && err.contains("fix:"),
        "{err}"
    );

    let out = cairnd(&dir.path().join("missing.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));

    let out = cairnd(&cfg)
        .env("CAIRN_FLEET_URL", "ftp://nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "env layer must be checked too");
}

#[test]
fn check_config_prints_the_merged_result() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cairnd.toml");
    std::fs::write(&cfg, "[fleet]\nurl = \"https://fleet.example:9443\"\n").unwrap();
    std::fs::create_dir(dir.path().join("cairnd.toml.d")).unwrap();
    std::fs::write(
        dir.path().join("cairnd.toml.d/50-poll.toml"),
        "[hardware]\npoll_interval_secs = 3\n",
    )
    .unwrap();
    let out = cairnd(&cfg)
        .arg("--check-config")
        .env("CAIRN_TPM_PROBE_INTERVAL_SECS", "7")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("url = \"https://fleet.example:9443\""),
        "{text}"
    );
    assert!(text.contains("poll_interval_secs = 3"), "{text}");
    assert!(text.contains("probe_interval_secs = 7"), "{text}");
}

/// With no TPM, no NVML, no sysfs and no fleet, cairnd still runs, answers, names each problem, and stops
/// cleanly on SIGTERM.
#[test]
fn runs_degraded_answers_status_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let cfg = dir.path().join("cairnd.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &cfg,
        format!(
            "[agent]\ndata_dir = \"{data}\"\ncontrol_socket = \"{sock}\"\n\
             [tpm]\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n\
             [fleet]\nurl = \"https://127.0.0.1:1\"\nca_file = \"{dir}/no-ca.pem\"\ncheck_interval_secs = 1\n\
             provisioning_paths = []\ndiscover_srv = false\n\
             [hardware]\nsys_root = \"{dir}/no-sysroot\"\nnvml_library = \"{dir}/no-libnvidia-ml.so\"\npoll_interval_secs = 1\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            data = dir.path().join("data").display(),
            sock = sock.display(),
            dir = dir.path().display(),
        ),
    )
    .unwrap();
    // Stand in for systemd's notify socket: cairnd must say READY, ping the watchdog, and say STOPPING.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    // Non-blocking: the watchdog pings every 100 ms, so a blocking drain would never end.
    notify.set_nonblocking(true).unwrap();
    let mut child = Daemon(
        cairnd(&cfg)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut notes: Vec<String> = Vec::new();
    let drain = |notes: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = notify.recv(&mut buf) {
            notes.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = Command::new(CAIRNCTL)
            .args(["--socket"])
            .arg(&sock)
            .args(["status", "--json"])
            .output()
            .unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if ["tpm", "gpus", "sensors", "fleet"]
                .iter()
                .all(|k| v[k]["state"] != "unknown")
                && v["onboarding"]["state"] == "retrying"
            {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "cairnd never reported every component"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Onboarding cannot reach the fleet (no CA file) and says so, with a next try; the agent runs on.
    let detail = status["onboarding"]["detail"].as_str().unwrap();
    assert!(detail.contains("no-ca.pem"), "{detail}");
    assert!(status["onboarding"]["next_attempt_unix"].as_u64().is_some());
    for (key, words) in [
        ("tpm", "port=1"),
        ("gpus", "NVML unavailable"),
        ("sensors", "hardware.sys_root"),
        ("fleet", "no-ca.pem"),
    ] {
        assert_eq!(status[key]["state"], "unavailable", "{key}: {status}");
        let reason = status[key]["reason"].as_str().unwrap();
        assert!(
            reason.contains(words),
            "{key} reason {reason:?} lacks {words:?}"
        );
    }
    assert!(dir.path().join("data").is_dir(), "data dir created");

    // Human output names the problems too.
    let human = Command::new(CAIRNCTL)
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("PROBLEM — NVML unavailable"), "{text}");

    // The watchdog keeps pinging (every 100 ms here): wait for a second ping, within a generous bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    while notes.iter().filter(|n| n.contains("WATCHDOG=1")).count() < 2 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        drain(&mut notes);
    }
    drain(&mut notes);
    assert!(
        notes.iter().any(|n| n.contains("READY=1")),
        "no READY=1 in {notes:?}"
    );
    assert!(
        notes.iter().filter(|n| n.contains("WATCHDOG=1")).count() >= 2,
        "watchdog not pinged: {notes:?}"
    );

    // SAFETY: plain kill(2) on our own child.
    unsafe { libc_kill(child.0.id() as i32, 15) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "cairnd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit after SIGTERM: {code:?}");
    assert!(!sock.exists(), "control socket left behind");
    drain(&mut notes);
    assert!(
        notes.iter().any(|n| n.contains("STOPPING=1")),
        "no STOPPING=1 in {notes:?}"
    );

    // And cairnctl then says plainly that the agent is not there (exit 69).
    let out = Command::new(CAIRNCTL)
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach cairnd"));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
