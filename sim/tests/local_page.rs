//! The local status page in a real browser: headless Chromium loads it from the simulated site's agent while
//! a GPU has failed, runs its script (which polls /overview.json and redraws), and the test reads the DOM.
//! Also: the page is read-only (no method but GET and HEAD), sends a strict content policy, and knows only
//! its two paths.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_proto::control::{Command, Response};
use cairn_proto::overview::{Level, Overview};
use cairn_sim::{Site, SiteOptions};
use std::process::Command as Process;
use std::time::{Duration, Instant};

fn overview(site: &Site) -> Overview {
    match cairn_agent::control::request(
        &site.env.control_socket,
        Command::Overview,
        Duration::from_secs(5),
    )
    .unwrap()
    {
        Response::Overview(o) => *o,
        other => panic!("{other:?}"),
    }
}

fn wait_overview(site: &Site, what: &str, ok: impl Fn(&Overview) -> bool) -> Overview {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = overview(site);
        if ok(&o) {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {o:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The DOM after the page's script ran, as headless Chromium serializes it.
fn browser_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Process::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("chromium runs (just deps-test installs it)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Status code and headers of one request, by curl.
fn curl(method: &str, url: &str) -> (u16, String) {
    let out = Process::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", "-X", method, url])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line from {method} {url}: {head}"));
    (code, head.to_ascii_lowercase())
}

#[test]
fn the_local_page_shows_the_overview_in_a_browser_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::up(tmp.path(), &SiteOptions::default()).unwrap();
    site.wait_onboarding("onboarded", Duration::from_secs(60))
        .expect("the site onboards");
    site.set_gpus("profile = \"h100x8\"\n[gpu.3]\nxid = [79]\n")
        .unwrap();
    let o = wait_overview(&site, "the GPU fault", |o| {
        o.lines
            .iter()
            .any(|l| l.topic == "GPUs" && l.level == Level::Fault)
    });
    let code = o.code.clone().unwrap();

    let dom = browser_dom(&site.env.page_url);
    // The script fetched /overview.json and redrew the page: it marks that last, after the lines and events.
    assert!(
        dom.contains("id=\"updated\" data-live=\"yes\">live, updated "),
        "the page's script did not run to the end:\n{dom}"
    );
    assert!(dom.contains(&format!("<h1>cairn box {code}</h1>")), "{dom}");
    assert!(
        dom.contains("class=\"verdict fault\">1 problem needs attention: follow the red line"),
        "{dom}"
    );
    let gpu_row = dom
        .split("<tr class=\"fault\"><th>GPUs</th><td>")
        .nth(1)
        .unwrap_or_else(|| panic!("no red GPUs row:\n{dom}"));
    let gpu_row = &gpu_row[..gpu_row.find("</tr>").unwrap()];
    assert!(
        gpu_row.starts_with("GPU 3 (PCI") && gpu_row.contains("XID 79"),
        "{gpu_row}"
    );
    assert!(
        gpu_row
            .contains("<div class=\"next\">Next: the box keeps running its other GPUs; call ops"),
        "{gpu_row}"
    );
    assert!(
        dom.contains("<tr class=\"ok\"><th>Onboarding</th><td>onboarded to https://"),
        "{dom}"
    );
    let events = dom.split("<ul id=\"events\">").nth(1).unwrap();
    assert!(
        events.contains("gpu 3") && events.contains("UTC"),
        "recent events are listed:\n{events}"
    );

    // The JSON the script reads is the overview, whole.
    let json = Process::new("curl")
        .args(["-sf", &format!("{}overview.json", site.env.page_url)])
        .output()
        .unwrap();
    let served: Overview = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(served.code.as_deref(), Some(code.as_str()));
    assert_eq!(served.verdict, Level::Fault);

    // Read-only: every other method is refused, and it says which are allowed.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let (status, head) = curl(method, &site.env.page_url);
        assert_eq!(status, 405, "{method}: {head}");
        assert!(head.contains("allow: get, head"), "{head}");
    }
    let (status, head) = curl("GET", &site.env.page_url);
    assert_eq!(status, 200);
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self' 'sha256-"),
        "{head}"
    );
    assert!(
        head.contains("x-frame-options: deny") && head.contains("cache-control: no-store"),
        "{head}"
    );
    assert_eq!(
        curl("GET", &format!("{}etc/passwd", site.env.page_url)).0,
        404
    );
}
