//! OTA updates of the real image under qemu: the box boots 1.0.0, finds 2.0.0 in the fleet's TUF
//! repository (`cairn-fleet serve` on the host, reached at 10.0.2.2 through qemu's user network) and starts
//! writing slot B; the power is cut; the box boots 1.0.0 again, finishes the write, reboots by itself, boots
//! 2.0.0 from slot B and blesses it. Then 3.0.0, whose gate cannot pass: the box
//! tries it in slot A, falls back to 2.0.0 by itself and reports the failure. Builds its own images, because
//! they carry this run's fleet address, fleet CA and update root.

use cairn_qemu_tests::{Failure, Machine, Partition};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(300);
/// From the first gate passing to the reboot: the agent's first check (20 s), hashing slot A, writing slot B.
const WRITE: Duration = Duration::from_secs(900);

type Result = std::result::Result<(), Failure>;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(program: &Path, args: &[&str]) -> std::result::Result<String, Failure> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Failure(format!("cannot run {}: {e}", program.display())))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Failure(format!(
            "{} {} failed:\n{text}",
            program.display(),
            args.join(" ")
        )));
    }
    Ok(text)
}

/// The update chunk size (cairn_proto::update::CHUNK_BYTES).
const CHUNK: usize = 1 << 20;

/// How many of `want`'s 1 MiB chunks are already at their place in partition `part` of the disk file.
fn chunks_in_place(
    m: &Machine,
    part: &Partition,
    want: &[u8],
) -> std::result::Result<usize, Failure> {
    let have = m.read_partition(part, want.len())?;
    Ok(want
        .chunks(CHUNK)
        .zip(have.chunks(CHUNK))
        .filter(|(w, h)| w == h)
        .count())
}

struct Fleet(Child);

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "qemu tier: run with `just test-qemu`"]
fn an_update_is_written_booted_and_blessed_and_a_bad_one_falls_back_by_itself() -> Result {
    let dir = repo_root().join("target/qemu/update");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let fleet_bin = repo_root().join("target/debug/cairn-fleet");
    let state = dir.join("fleet");
    let key_dir = dir.join("keys");
    let key = key_dir.join("update-signer.key");
    let update_repo = state.join("update");
    let p = |p: &Path| p.display().to_string();
    run(&fleet_bin, &["update", "keygen", "--dir", &p(&key_dir)])?;
    run(
        &fleet_bin,
        &[
            "update",
            "init",
            "--repo",
            &p(&update_repo),
            "--key",
            &p(&key),
        ],
    )?;
    // The fleet runs twice on one state and port: first to make its CA (the images carry it), then, once the
    // images exist, again with their reference measurements.
    let serve = |listen: &str, extra: &[String]| -> std::result::Result<(Fleet, String), Failure> {
        let ready = dir.join("fleet.url");
        let _ = std::fs::remove_file(&ready);
        let fleet = Fleet(
            Command::new(&fleet_bin)
                .args(["serve", "--listen", listen, "--name", "10.0.2.2"])
                .args(["--state", &p(&state), "--ready-file", &p(&ready)])
                .args(extra)
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("fleet.log"))?,
                )
                .stdout(Stdio::null())
                .spawn()?,
        );
        let started = Instant::now();
        loop {
            if let Ok(u) = std::fs::read_to_string(&ready) {
                if !u.trim().is_empty() {
                    return Ok((fleet, u.trim().to_string()));
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Failure(
                    "cairn-fleet serve did not start (see fleet.log)".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (first, url) = serve("127.0.0.1:0", &[])?;
    let port = url
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    let guest_url = format!("https://10.0.2.2:{port}");

    // Both versions carry this fleet's address, CA and update root.
    let images = dir.join("images");
    let build = repo_root().join("image/build.sh");
    let t = Instant::now();
    // 2.0.0 gives the updates it writes two tries (1.0.0 the default three); 3.0.0's gate cannot pass here.
    let qemu_dir = repo_root().join("tests/qemu");
    for (v, config) in [
        ("1.0.0", None),
        ("2.0.0", Some("two-tries.toml")),
        ("3.0.0", Some("gate-fail.toml")),
    ] {
        let mut args = vec![
            "--version".to_string(),
            v.into(),
            "--out".into(),
            p(&images),
            "--fleet-ca".into(),
            p(&state.join("ca.pem")),
            "--fleet-url".into(),
            guest_url.clone(),
            "--update-root".into(),
            p(&update_repo.join("root.json")),
        ];
        if let Some(c) = config {
            args.extend(["--config".into(), p(&qemu_dir.join(c))]);
        }
        run(&build, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    eprintln!("three images built in {:?}", t.elapsed());
    drop(first);
    // Pending devices are told to come back in 10 s, so the one this test approves onboards within a boot.
    let mut extra: Vec<String> = vec!["--retry-after-secs".into(), "10".into()];
    for v in ["1.0.0", "2.0.0"] {
        extra.push("--reference".into());
        extra.push(p(
            &images.join(format!("cairn-{v}.reference-measurements.json"))
        ));
    }
    let (_fleet, _) = serve(&format!("127.0.0.1:{port}"), &extra)?;
    let devices = || -> std::result::Result<Vec<serde_json::Value>, Failure> {
        let out = run(&fleet_bin, &["devices", "--state", &p(&state), "--json"])?;
        let doc: serde_json::Value = serde_json::from_str(&out)?;
        Ok(doc["devices"].as_array().cloned().unwrap_or_default())
    };
    let publish = |version: &str| -> std::result::Result<(), Failure> {
        let out = run(
            &fleet_bin,
            &[
                "update",
                "publish",
                "--repo",
                &p(&update_repo),
                "--key",
                &p(&key),
                "--image",
                &p(&images.join(format!("cairn-{version}.json"))),
            ],
        )?;
        eprintln!("{}", out.trim());
        Ok(())
    };
    publish("2.0.0")?;

    let mut m = Machine::new(&dir, &images.join("cairn-1.0.0.img"))?;
    let root_b = m
        .partitions()?
        .into_iter()
        .find(|p| p.name == "root-b")
        .ok_or_else(|| Failure("the image has no root-b partition".into()))?;
    let want = std::fs::read(images.join("cairn-2.0.0.root.erofs"))?;
    let total = want.len().div_ceil(CHUNK);
    let before = chunks_in_place(&m, &root_b, &want)?;
    let mut boot = m.boot()?;
    boot.wait_for("health gate passed", BOOT)?;
    let gate = boot.elapsed();
    // The agent checks the channel and writes slot B, syncing every 16 chunks. Pull the plug once some of
    // slot B's root is on the disk, and not all of it.
    let deadline = Instant::now() + WRITE;
    let written = loop {
        let n = chunks_in_place(&m, &root_b, &want)?;
        if n >= before + 16 && n < total {
            break n;
        }
        if n == total || Instant::now() > deadline {
            return Err(Failure(format!(
                "slot B was never seen part-written ({n} of {total} chunks of 2.0.0's root in place)"
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let cut = boot.elapsed();
    let console = boot.console();
    boot.kill();
    eprintln!(
        "boot 1 (1.0.0, slot a): gate passed at {gate:?}; power cut at {cut:?}, {written} of {total} root chunks in slot B ({before} before)"
    );
    assert!(
        console.contains("Command line:") && console.contains("cairn.slot=a"),
        "the first boot ran slot A:\n{console}"
    );
    assert_eq!(
        m.boot_entries()?,
        ["cairn-1.0.0-a.conf"],
        "a half-written slot has no boot entry"
    );
    // The box asks to join once its network is up; nothing vouches for its software TPM, so it waits as
    // pending until ops approves it. Usually that happened during boot 1; if the cut came first, it is
    // approved as soon as it shows up during boot 2.
    let approve_pending = || -> std::result::Result<Option<String>, Failure> {
        for d in devices()? {
            if d["state"] == "pending" {
                let id = d["id"].as_str().unwrap_or_default().to_string();
                run(
                    &fleet_bin,
                    &["devices", "--state", &p(&state), "approve", &id],
                )?;
                return Ok(Some(id));
            }
        }
        Ok(None)
    };
    let mut approved = approve_pending()?;
    let seen_in_boot_1 = approved.is_some();

    // The old slot boots; its agent finds the write unfinished, completes it and reboots: qemu exits.
    let mut boot = m.boot()?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (waited, polled) = std::thread::scope(|s| {
        let poll = s.spawn(|| -> std::result::Result<Option<String>, Failure> {
            while approved.is_none() && !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(id) = approve_pending()? {
                    return Ok(Some(id));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(None)
        });
        let waited = (|| -> std::result::Result<(Duration, Duration), Failure> {
            boot.wait_for("health gate passed", BOOT)?;
            let gate = boot.elapsed();
            boot.wait_exit(WRITE)?;
            Ok((gate, boot.elapsed()))
        })();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let polled = poll
            .join()
            .unwrap_or_else(|_| Err(Failure("the approving thread panicked".into())));
        (waited, polled)
    });
    let (gate, updated) = waited?;
    approved = approved.or(polled?);
    let console = boot.console();
    eprintln!(
        "boot 2 (1.0.0, slot a, after the cut): gate passed at {gate:?}; the agent finished the write and rebooted at {updated:?}"
    );
    assert!(
        console.contains("cairn.slot=a"),
        "the box booted the old slot:\n{console}"
    );
    assert_eq!(
        m.boot_entries()?,
        ["cairn-1.0.0-a.conf", "cairn-2.0.0-b+3.conf"],
        "slot B is written and its entry has its tries"
    );
    // Approved, the box attested during boot 2: its quoted PCR 4 is the one its image's build computed.
    let Some(id) = approved else {
        return Err(Failure(format!(
            "the box never enrolled with the fleet in boots 1 and 2: {:?}",
            devices()?
        )));
    };
    let device = devices()?.into_iter().next().unwrap_or_default();
    assert_eq!(
        (device["state"].as_str(), device["reference"].as_str()),
        (Some("onboarded"), Some("cairn 1.0.0")),
        "the box onboarded against its image's reference measurements: {device:#}"
    );
    eprintln!(
        "enrolled during boot {}, approved, onboarded during boot 2 as {id}, matching reference \"cairn 1.0.0\"",
        if seen_in_boot_1 { 1 } else { 2 }
    );

    let mut boot = m.boot()?;
    boot.wait_for("health gate passed", BOOT)?;
    let gate = boot.elapsed();
    boot.wait_for(
        "Finished systemd-bless-boot.service",
        Duration::from_secs(60),
    )?;
    let console = boot.console();
    boot.power_off(Duration::from_secs(120))?;
    eprintln!("boot 3 (2.0.0, slot b): gate passed at {gate:?}");
    assert!(
        console.contains("cairn.slot=b"),
        "the second boot ran slot B:\n{console}"
    );
    let roothash = std::fs::read_to_string(images.join("cairn-2.0.0.roothash"))?;
    assert!(
        console.contains(&format!("roothash={}", roothash.trim())),
        "with 2.0.0's root hash:\n{console}"
    );
    assert_eq!(
        m.boot_entries()?,
        ["cairn-1.0.0-a.conf", "cairn-2.0.0-b.conf"],
        "2.0.0 in slot B passed the gate and was blessed"
    );

    // 3.0.0: 2.0.0 writes it to slot A and reboots; both its tries fail the gate; systemd-boot falls back
    // to 2.0.0, whose agent reports the failure (on the console too: it is a warning) and drops the entry.
    publish("3.0.0")?;
    let mut boot = m.boot()?;
    boot.wait_for("health gate passed", BOOT)?;
    let gate = boot.elapsed();
    boot.wait_exit(WRITE)?;
    eprintln!(
        "boot 4 (2.0.0, slot b): gate passed at {gate:?}; the agent rebooted into 3.0.0 at {:?}",
        boot.elapsed()
    );
    assert_eq!(
        m.boot_entries()?,
        ["cairn-2.0.0-b.conf", "cairn-3.0.0-a+2.conf"],
        "slot A holds 3.0.0 with 2.0.0's two tries"
    );
    for (n, entry) in [(1, "cairn-3.0.0-a+1-1.conf"), (2, "cairn-3.0.0-a+0-2.conf")] {
        let mut boot = m.boot()?;
        let line = boot.wait_for("FAIL gpus", BOOT)?;
        assert!(line.contains("0 of 1 expected GPUs visible"), "{line}");
        boot.wait_for("health gate failed", Duration::from_secs(30))?;
        boot.wait_for("rebooting to try again", Duration::from_secs(60))?;
        boot.wait_exit(Duration::from_secs(120))?;
        eprintln!(
            "try {n} of 3.0.0 (slot a): failed the gate and rebooted at {:?}",
            boot.elapsed()
        );
        assert!(
            boot.console().contains("cairn.slot=a"),
            "try {n} booted slot A"
        );
        assert_eq!(m.boot_entries()?, ["cairn-2.0.0-b.conf", entry]);
    }
    let mut boot = m.boot()?;
    boot.wait_for("health gate passed", BOOT)?;
    let gate = boot.elapsed();
    let report = boot.wait_anywhere("update to 3.0.0 failed", Duration::from_secs(60))?;
    let console = boot.console();
    boot.power_off(Duration::from_secs(120))?;
    eprintln!("boot 7 (2.0.0, slot b, the fallback): gate passed at {gate:?}");
    assert!(
        console.contains("cairn.slot=b"),
        "the fallback ran slot B:\n{console}"
    );
    assert!(
        report.contains("after 2 tries") && report.contains("fell back to 2.0.0 in slot b"),
        "{report}"
    );
    assert_eq!(
        m.boot_entries()?,
        ["cairn-2.0.0-b.conf"],
        "the failed entry is gone, so nobody boots it by hand either"
    );
    Ok(())
}
