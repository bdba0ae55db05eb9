//! The control socket, in process: permissions, answers, bad requests, and one agent per socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_agent::control::{self, ControlError};
use cairn_agent::status::{component, StatusBoard};
use cairn_proto::control::{AgentStatus, Command, OnboardingStatus, Response, TpmFacts};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn board() -> StatusBoard {
    let b = StatusBoard::new(
        AgentStatus {
            version: "test".into(),
            pid: 1,
            uptime_secs: 0,
            config_sources: vec![],
            data_dir: "/x".into(),
        },
        OnboardingStatus {
            state: "unprovisioned".into(),
            ..OnboardingStatus::default()
        },
    );
    b.update(|s| {
        s.tpm = component(Ok(TpmFacts {
            tcti: "swtpm:port=1".into(),
            manufacturer: "IBM".into(),
            firmware_version: "1.0".into(),
            ek_certificates: vec!["rsa2048".into()],
        }))
    });
    b
}

fn raw_exchange(path: &std::path::Path, line: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    out
}

fn ctx() -> control::Context {
    control::Context {
        board: board(),
        attest: None,
        sink: cairn_agent::telemetry::LocalSink::default(),
        spool: None,
        uplink: Default::default(),
        workloads: Default::default(),
        update: Default::default(),
        update_check: None,
        overview: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_round_trip_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/control.sock");
    let listener = control::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be owner-only");
    let server = tokio::spawn(control::serve(listener, ctx()));

    let p = path.clone();
    let (status, bad_json, bad_version, unknown) = tokio::task::spawn_blocking(move || {
        let status = control::request(&p, Command::Status, Duration::from_secs(5)).unwrap();
        (
            status,
            raw_exchange(&p, "this is not json\n"),
            raw_exchange(&p, "{\"version\":99,\"command\":\"status\"}\n"),
            raw_exchange(&p, "{\"version\":1,\"command\":\"reboot\"}\n"),
        )
    })
    .await
    .unwrap();
    let Response::Status(s) = status else {
        panic!("not a status: {status:?}")
    };
    assert_eq!(s.tpm.facts().unwrap().manufacturer, "IBM");
    assert_eq!(s.agent.version, "test");
    assert!(bad_json.contains("malformed request"), "{bad_json}");
    assert!(
        bad_version.contains("version 99 is not supported"),
        "{bad_version}"
    );
    assert!(
        unknown.contains("malformed request") && unknown.contains("reboot"),
        "{unknown}"
    );

    // A second agent must not steal the socket of a live one.
    assert!(matches!(
        control::bind(&path),
        Err(ControlError::InUse { .. })
    ));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_status_and_a_check_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let server = tokio::spawn(control::serve(
        control::bind(&path).unwrap(),
        control::Context {
            update_check: Some(tx),
            ..ctx()
        },
    ));
    let p = path.clone();
    let (status, check) = tokio::task::spawn_blocking(move || {
        (
            control::request(&p, Command::UpdateStatus, Duration::from_secs(5)).unwrap(),
            control::request(&p, Command::UpdateCheck, Duration::from_secs(5)).unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(
        matches!(status, Response::Update(ref u) if u.phase == cairn_proto::update::UpdatePhase::Idle),
        "{status:?}"
    );
    assert!(matches!(check, Response::Update(_)), "{check:?}");
    assert_eq!(
        rx.try_recv(),
        Ok(()),
        "the check request reached the updater"
    );
    server.abort();

    // Without an updater the request is refused with the reason.
    let path = dir.path().join("d.sock");
    let server = tokio::spawn(control::serve(control::bind(&path).unwrap(), ctx()));
    let answer = tokio::task::spawn_blocking(move || {
        control::request(&path, Command::UpdateCheck, Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert!(
        matches!(answer, Err(ControlError::Refused { ref message }) if message.contains("updates are off")),
        "{answer:?}"
    );
    server.abort();
}

#[tokio::test]
async fn oversized_request_is_refused_without_buffering_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let server = tokio::spawn(control::serve(control::bind(&path).unwrap(), ctx()));
    let p = path.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let big = "x".repeat(cairn_proto::control::MAX_LINE_BYTES + 10) + "\n";
        raw_exchange(&p, &big)
    })
    .await
    .unwrap();
    assert!(answer.contains("longer than"), "{answer}");
    server.abort();
}

#[test]
fn stale_socket_is_replaced_and_missing_agent_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    // A socket file with nobody behind it, as a crashed agent leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { control::bind(&path).unwrap() });
    drop(rt);

    let err = control::request(
        &dir.path().join("absent.sock"),
        Command::Status,
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(matches!(err, ControlError::Connect { .. }));
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_is_answered_and_the_page_binds_to_its_interface_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.sock");
    let server = tokio::spawn(control::serve(control::bind(&path).unwrap(), ctx()));
    let p = path.clone();
    let answer = tokio::task::spawn_blocking(move || {
        control::request(&p, Command::Overview, Duration::from_secs(5)).unwrap()
    })
    .await
    .unwrap();
    let Response::Overview(o) = answer else {
        panic!("not an overview: {answer:?}")
    };
    let tpm = o.lines.iter().find(|l| l.topic == "TPM").unwrap();
    assert!(tpm.text.contains("IBM"), "{tpm:?}");
    server.abort();

    // Bound to loopback by name: it answers there, with the page.
    let listener = cairn_agent::local_page::bind_interface("lo", 0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = tokio::spawn(cairn_agent::local_page::serve(listener, ctx()));
    let body = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("<th>TPM</th><td>TPM 2.0 IBM"), "{body}");
    page.abort();

    // An interface the box does not have is an error that names it (the agent retries it later).
    let err = cairn_agent::local_page::bind_interface("nosuch0", 8080).unwrap_err();
    assert!(
        cairn_agent::error_chain(&err)
            .starts_with("cannot serve the local page on interface nosuch0 port 8080"),
        "{err}"
    );
}
