//! The console status screen, as a field tech sees it: cairn-console runs in a real terminal (tmux, 120×60)
//! against a simulated site, and the test reads the screen through onboarding (the code on screen is what
//! ops types to approve the box; its QR code is scanned with zbarimg), a GPU fault, an uplink loss, an unplugged cable and an agent that stops.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_sim::{Site, SiteOptions, Trust};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of this test's own, killed on drop.
struct Terminal {
    server: String,
}

impl Terminal {
    fn start(program: &[String]) -> Terminal {
        let server = format!("cairn-console-test-{}", std::process::id());
        let cmd = program
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new("tmux")
            .args([
                "-L",
                &server,
                "new-session",
                "-d",
                "-x",
                "120",
                "-y",
                "60",
                "-s",
                "console",
            ])
            .arg(cmd)
            .env("TERM", "xterm-256color")
            .output()
            .expect("tmux runs (just deps-test installs it)");
        assert!(out.status.success(), "tmux: {out:?}");
        Terminal { server }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.server, "capture-pane", "-p", "-t", "console"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every phrase is on screen at once, and returns that screen.
    fn wait_for(&self, phrases: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if phrases.iter().all(|p| s.contains(p)) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {phrases:?}; the screen shows:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.server, "kill-server"])
            .output();
    }
}

fn fleet(site: &Site, args: &[&str]) -> std::process::Output {
    Command::new(cairn_sim::process::bin_dir().join("cairn-fleet"))
        .args(["devices"])
        .args(args)
        .arg("--state")
        .arg(&site.env.fleet_state)
        .output()
        .unwrap()
}

/// What a phone reads from the QR code on the screen: the half-block rows back into modules, as a PBM image
/// scaled up, decoded by zbarimg.
fn scan_qr(screen: &str) -> String {
    let rows: Vec<Vec<char>> = screen
        .lines()
        .skip_while(|l| !l.contains("scan for the device id"))
        .skip(1)
        .take_while(|l| l.starts_with(" █"))
        .map(|l| l.chars().skip(1).collect())
        .collect();
    assert!(rows.len() > 10, "no QR code rows in:\n{screen}");
    let scale = 8;
    let width = rows[0].len();
    let mut pbm = format!("P1\n{} {}\n", width * scale, rows.len() * 2 * scale);
    for row in &rows {
        for half in 0..2 {
            // Light modules are drawn: a full block is light over light, an upper half block light on top.
            let dark: Vec<u8> = row
                .iter()
                .map(|c| match (c, half) {
                    ('█', _) | ('▀', 0) | ('▄', 1) => 0,
                    _ => 1,
                })
                .collect();
            let line: Vec<String> = dark
                .iter()
                .flat_map(|d| std::iter::repeat_n(d.to_string(), scale))
                .collect();
            for _ in 0..scale {
                pbm.push_str(&line.join(" "));
                pbm.push('\n');
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("qr.pbm");
    std::fs::write(&image, pbm).unwrap();
    let out = Command::new("zbarimg")
        .args(["-q", "--raw"])
        .arg(&image)
        .output()
        .expect("zbarimg runs (just deps-test installs zbar-tools)");
    assert!(
        out.status.success(),
        "zbarimg could not read the QR code: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The line of the screen that holds `phrase`.
fn line_with<'a>(screen: &'a str, phrase: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(phrase))
        .unwrap_or_else(|| panic!("no line with {phrase:?} in:\n{screen}"))
}

#[test]
fn the_console_shows_onboarding_a_gpu_fault_and_an_uplink_loss_in_words() {
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::up(
        tmp.path(),
        &SiteOptions {
            trust: Trust::Operator,
            ..SiteOptions::default()
        },
    )
    .unwrap();
    let console = cairn_sim::process::bin_dir().join("cairn-console");
    let term = Terminal::start(&[
        console.display().to_string(),
        "--socket".into(),
        site.env.control_socket.display().to_string(),
        "--interval".into(),
        "1".into(),
    ]);

    // 1. Waiting for approval: red, with the code ops needs, and the QR code beside it in the terminal.
    let s = term.wait_for(
        &[
            "FAIL  Onboarding  device not yet approved by the fleet",
            "give ops code",
            "scan for the device id",
        ],
        Duration::from_secs(60),
    );
    let code_line = line_with(&s, "give ops code");
    let code = code_line
        .split("give ops code ")
        .nth(1)
        .and_then(|r| r.get(..9))
        .unwrap()
        .to_owned();
    let id = site.status().unwrap().onboarding.device_id.unwrap();
    assert_eq!(code, cairn_proto::overview::device_code(&id), "{s}");
    assert!(line_with(&s, "CAIRN BOX").contains(&code), "{s}");
    assert!(s.contains("1 PROBLEM NEEDS ATTENTION"), "{s}");
    assert_eq!(
        scan_qr(&s),
        format!("CAIRN:{code}:{}", id.to_uppercase()),
        "the QR code scans to the code and id"
    );
    assert!(
        s.contains(&id[..60]),
        "the device id is on screen in words:\n{s}"
    );

    // Ops types the code from the screen; a code that is not this box's is refused.
    let wrong = fleet(&site, &["approve", "ZZZZ-ZZZZ"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not known to this fleet"));
    let ok = fleet(&site, &["approve", &code.to_lowercase()]);
    assert!(ok.status.success(), "{ok:?}");

    // 2. Onboarded: all green.
    let s = term.wait_for(
        &[
            "OK   Onboarding  onboarded to",
            "OK   Attestation trusted: TPM evidence accepted",
            "ALL GOOD: NOTHING TO DO",
        ],
        Duration::from_secs(60),
    );
    assert!(s.contains("OK   GPUs        8 of 8 ok"), "{s}");
    assert!(!s.contains("FAIL"), "{s}");

    // 3. A GPU falls off the bus: its own red line with the cause, the bus id and the next step.
    site.set_gpus("profile = \"h100x8\"\n[gpu.3]\nxid = [79]\n")
        .unwrap();
    let s = term.wait_for(
        &["FAIL  GPUs        GPU 3 (PCI", "1 PROBLEM NEEDS ATTENTION"],
        Duration::from_secs(30),
    );
    let gpu = s.split("FAIL  GPUs").nth(1).unwrap();
    assert!(gpu.contains("XID 79"), "{s}");
    assert!(
        gpu.contains("→ the box keeps running its other GPUs; call ops"),
        "{s}"
    );

    // 4. The uplink goes: the fleet stops answering; telemetry is kept.
    site.stop_fleet();
    let s = term.wait_for(
        &[
            "FAIL  Uplink      cannot reach the fleet",
            "→ check the site's internet connection",
        ],
        Duration::from_secs(60),
    );
    assert!(s.contains("2 PROBLEMS NEED ATTENTION"), "{s}");
    assert!(
        line_with(&s, "Telemetry").contains("records kept on the box"),
        "{s}"
    );

    // 5. The cable comes out of port 1: the network line says which port, and the uplink points at it.
    let net = site.dir.join("sysroot/sys/class/net/eno1");
    std::fs::write(net.join("carrier"), "0\n").unwrap();
    std::fs::write(net.join("operstate"), "down\n").unwrap();
    let s = term.wait_for(
        &[
            "FAIL  Network     no network link on port 1 (eno1)",
            "→ check the cable",
            "→ fix the network link first",
        ],
        Duration::from_secs(30),
    );
    assert!(s.contains("no network link on port 2 (eno2)"), "{s}");

    // 6. The agent stops: the screen says so and what to do, rather than freezing on its last picture.
    site.stop_cairnd();
    term.wait_for(
        &["THE CAIRN AGENT IS NOT ANSWERING", "wait two minutes"],
        Duration::from_secs(30),
    );
}
