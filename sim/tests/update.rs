//! OTA updates on the host: real TUF repositories built by `cairn-fleet update publish` (tough), read by the
//! agent's updater from a directory or through `cairn-fleet serve`, written into slot files. The boot loader
//! is the hardware edge here: `boot()` plays systemd-boot's boot counting on the entry files (the qemu tier
//! runs the real one).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_agent::config::UpdateConfig;
use cairn_agent::telemetry::LocalSink;
use cairn_agent::update::channel::Source;
use cairn_agent::update::slots::{BootSlots, Esp, Slot};
use cairn_agent::update::{Checked, Reboot, StatusHandle, Updater};
use cairn_proto::update::{UpdatePhase, CHUNK_BYTES};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    cairn_sim::process::bin_dir().join(name)
}

fn sha(data: &[u8]) -> String {
    cairn_proto::fleet::to_hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// An image's pieces, varied by `edits` (each changes one chunk of the root).
struct Image {
    version: String,
    root: Vec<u8>,
    verity: Vec<u8>,
    vmlinuz: Vec<u8>,
    initrd: Vec<u8>,
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn image(version: &str, edits: &[usize]) -> Image {
    let mut root = bytes(1, 6 * CHUNK_BYTES as usize + 4321);
    for &chunk in edits {
        root[chunk * CHUNK_BYTES as usize + 17] ^= 0x5a;
    }
    Image {
        version: version.into(),
        verity: bytes(2 + edits.len() as u64, 40_960),
        root,
        vmlinuz: bytes(3, 2 * CHUNK_BYTES as usize + 99),
        initrd: bytes(4, 3 * CHUNK_BYTES as usize + 5),
    }
}

/// Writes the files image/build.sh writes; returns the manifest's path.
fn build(dir: &Path, img: &Image) -> PathBuf {
    let v = &img.version;
    let put = |ext: &str, data: &[u8]| {
        std::fs::write(dir.join(format!("cairn-{v}.{ext}")), data).unwrap()
    };
    put("root.erofs", &img.root);
    put("root.verity", &img.verity);
    put("vmlinuz", &img.vmlinuz);
    put("initrd", &img.initrd);
    let manifest = serde_json::json!({
        "version": v, "kernel": "6.1.0-57-cloud-amd64", "roothash": sha(&img.root),
        "root": {"bytes": img.root.len(), "sha256": sha(&img.root)},
        "verity": {"bytes": img.verity.len(), "sha256": sha(&img.verity)},
        "kernel_sha256": sha(&img.vmlinuz), "initrd_sha256": sha(&img.initrd),
        "layout_mib": {"esp": 256, "root": 1024, "verity": 32, "disk": 4096}
    });
    let path = dir.join(format!("cairn-{v}.json"));
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    path
}

fn fleet(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("cairn-fleet"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A fleet's update repository and signer.
struct Repo {
    dir: PathBuf,
    key: PathBuf,
    images: PathBuf,
}

impl Repo {
    fn new(root: &Path) -> Repo {
        let (ok, out) = fleet(&[
            "update",
            "keygen",
            "--dir",
            root.join("keys").to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        let images = root.join("images");
        std::fs::create_dir_all(&images).unwrap();
        Repo {
            dir: root.join("state/update"),
            key: root.join("keys/update-signer.key"),
            images,
        }
    }

    fn publish(&self, img: &Image, extra: &[&str]) -> String {
        let manifest = build(&self.images, img);
        let (ok, out) = self.try_publish(&manifest, extra);
        assert!(ok, "{out}");
        out
    }

    fn try_publish(&self, manifest: &Path, extra: &[&str]) -> (bool, String) {
        let mut args = vec![
            "update",
            "publish",
            "--repo",
            self.dir.to_str().unwrap(),
            "--key",
            self.key.to_str().unwrap(),
            "--image",
            manifest.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        fleet(&args)
    }

    fn source(&self) -> Source {
        Source::Directory(url::Url::from_directory_path(&self.dir).unwrap())
    }
}

/// An entry systemd-boot may pick: version, file name, slot, (tries left, tries done).
type Candidate = (
    cairn_proto::update::ImageVersion,
    String,
    Slot,
    Option<(u32, u32)>,
);

#[derive(Default)]
struct CountingReboot(AtomicU32);

impl Reboot for CountingReboot {
    fn reboot(&self) -> Result<(), String> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A device: slot files, an ESP directory, its command line and os-release, its data directory.
struct Device {
    root: PathBuf,
    esp: Esp,
    cfg: UpdateConfig,
    reboots: Arc<CountingReboot>,
    events: LocalSink,
}

impl Device {
    /// A box as the image build leaves it: `img` in slot A, blessed; slot B empty.
    fn new(root: &Path, img: &Image, repo: &Repo) -> Device {
        let parts = root.join("dev");
        std::fs::create_dir_all(&parts).unwrap();
        std::fs::write(parts.join("root-a"), &img.root).unwrap();
        std::fs::write(parts.join("root-a-verity"), &img.verity).unwrap();
        std::fs::write(parts.join("root-b"), b"").unwrap();
        std::fs::write(parts.join("root-b-verity"), b"").unwrap();
        let esp = Esp {
            esp: root.join("efi"),
            partitions: parts,
            cmdline: root.join("cmdline"),
            os_release: root.join("os-release"),
        };
        let kernels = esp.kernel_dir(&img.version.parse().unwrap(), Slot::A);
        std::fs::create_dir_all(&kernels).unwrap();
        std::fs::create_dir_all(esp.esp.join("loader/entries")).unwrap();
        std::fs::write(kernels.join("vmlinuz"), &img.vmlinuz).unwrap();
        std::fs::write(kernels.join("initrd"), &img.initrd).unwrap();
        std::fs::write(
            esp.esp
                .join(format!("loader/entries/cairn-{}-a.conf", img.version)),
            "title x\n",
        )
        .unwrap();
        let cfg = UpdateConfig {
            root_file: repo.dir.join("root.json"),
            esp: esp.esp.clone(),
            partitions: esp.partitions.clone(),
            cmdline: esp.cmdline.clone(),
            os_release: esp.os_release.clone(),
            ..UpdateConfig::default()
        };
        let b = Device {
            root: root.to_owned(),
            esp,
            cfg,
            reboots: Arc::default(),
            events: LocalSink::default(),
        };
        b.set_running(&img.version, Slot::A);
        b
    }

    fn set_running(&self, version: &str, slot: Slot) {
        std::fs::write(
            &self.esp.cmdline,
            format!("ro quiet cairn.slot={}\n", slot.name()),
        )
        .unwrap();
        std::fs::write(
            &self.esp.os_release,
            format!("ID=debian\nIMAGE_ID=cairn\nIMAGE_VERSION={version}\n"),
        )
        .unwrap();
    }

    /// A new agent process: the updater as cairnd builds it, from what is on disk.
    fn agent(&self) -> Updater {
        Updater::new(
            &self.cfg,
            &self.root.join("data"),
            Arc::new(self.esp.clone()),
            self.reboots.clone(),
            Arc::new(self.events.clone()),
            StatusHandle::default(),
        )
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.esp.esp.join("loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// systemd-boot with boot counting, then the health gate: boots the newest entry that is blessed or
    /// has tries left (using one), and blesses it when `gate_passes`. Returns the entry booted.
    fn boot(&self, gate_passes: bool) -> String {
        let dir = self.esp.esp.join("loader/entries");
        let mut best: Option<Candidate> = None;
        for name in self.entries() {
            let stem = name
                .strip_prefix("cairn-")
                .unwrap()
                .strip_suffix(".conf")
                .unwrap();
            let (base, counter) = match stem.split_once('+') {
                Some((b, c)) => {
                    let (l, d) = c.split_once('-').unwrap_or((c, "0"));
                    (b, Some((l.parse().unwrap(), d.parse().unwrap())))
                }
                None => (stem, None),
            };
            if counter.is_some_and(|(left, _)| left == 0) {
                continue; // bad entries sort last; a good one always exists here
            }
            let (v, s) = base.rsplit_once('-').unwrap();
            let v = v.parse().unwrap();
            if best.as_ref().is_none_or(|b| v > b.0) {
                best = Some((v, name.clone(), Slot::parse(s).unwrap(), counter));
            }
        }
        let (v, name, slot, counter) = best.expect("no bootable entry");
        let mut booted = name.clone();
        if let Some((left, done)) = counter {
            let base = name.split_once('+').unwrap().0;
            booted = format!("{base}+{}-{}.conf", left - 1, done + 1);
            std::fs::rename(dir.join(&name), dir.join(&booted)).unwrap();
            if gate_passes {
                std::fs::rename(dir.join(&booted), dir.join(format!("{base}.conf"))).unwrap();
            }
        }
        self.set_running(&v.to_string(), slot);
        booted
    }

    fn slot_b(&self) -> Vec<u8> {
        std::fs::read(self.esp.partitions.join("root-b")).unwrap()
    }
}

/// A fleet repository with 1.0.0 published; the temporary directory holds it and the device.
fn published_1_0_0() -> (tempfile::TempDir, Repo, Image) {
    let t = tempfile::tempdir().unwrap();
    let repo = Repo::new(t.path());
    let v1 = image("1.0.0", &[]);
    repo.publish(&v1, &[]);
    (t, repo, v1)
}

/// A daily UTC window of `len` minutes starting `from` minutes after the current minute.
fn window_from_now(from: u64, len: u64) -> String {
    let now = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60)
        % 1440;
    let (s, e) = ((now + from) % 1440, (now + from + len) % 1440);
    format!("{:02}:{:02}-{:02}:{:02}", s / 60, s % 60, e / 60, e % 60)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_update_is_written_to_the_other_slot_boots_and_is_blessed_fetching_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let repo = Repo::new(t.path());
    let v1 = image("1.0.0", &[]);
    let v2 = image("2.0.0", &[3]);
    let out = repo.publish(&v1, &[]);
    assert!(
        out.contains("published 1.0.0") && out.contains("15 chunks, 15 new"),
        "{out}"
    );
    let out = repo.publish(&v2, &[]);
    // The changed root chunk and the new verity tree are new; the rest is shared with 1.0.0.
    assert!(
        out.contains("published 2.0.0") && out.contains("15 chunks, 2 new"),
        "{out}"
    );
    let b = Device::new(t.path(), &v1, &repo);
    let rt = rt();

    let agent = b.agent();
    let checked = rt.block_on(agent.check(&repo.source())).unwrap();
    assert_eq!(
        checked,
        Checked::Staged {
            version: "2.0.0".parse().unwrap(),
            rebooted: true
        }
    );
    assert_eq!(b.reboots.0.load(Ordering::SeqCst), 1);
    assert_eq!(b.slot_b(), v2.root);
    assert_eq!(
        std::fs::read(b.esp.verity_device(Slot::B)).unwrap(),
        v2.verity
    );
    let kernels = b.esp.kernel_dir(&"2.0.0".parse().unwrap(), Slot::B);
    assert_eq!(std::fs::read(kernels.join("vmlinuz")).unwrap(), v1.vmlinuz);
    assert_eq!(std::fs::read(kernels.join("initrd")).unwrap(), v2.initrd);
    assert_eq!(b.entries(), ["cairn-1.0.0-a.conf", "cairn-2.0.0-b+3.conf"]);
    let entry =
        std::fs::read_to_string(b.esp.esp.join("loader/entries/cairn-2.0.0-b+3.conf")).unwrap();
    assert!(
        entry.contains(&format!("roothash={}", sha(&v2.root))),
        "{entry}"
    );
    assert!(
        entry.contains("by-partlabel/root-b ") && entry.contains("cairn.slot=b"),
        "{entry}"
    );
    let s = agent.status();
    assert_eq!(s.phase, UpdatePhase::Trying);
    // Delta: 2 chunks downloaded (root chunk 3 and the verity tree), 13 copied from slot A and its kernels.
    assert_eq!(
        (
            s.chunks_total,
            s.chunks_done,
            s.chunks_fetched,
            s.chunks_local
        ),
        (15, 15, 2, 13),
        "{s:?}"
    );
    assert!(
        s.bytes_fetched > CHUNK_BYTES && s.bytes_fetched < 2 * CHUNK_BYTES,
        "{s:?}"
    );

    // The reboot: systemd-boot picks 2.0.0 in slot B, the gate passes, and the next agent reports success.
    assert_eq!(b.boot(true), "cairn-2.0.0-b+2-1.conf");
    let agent = b.agent();
    agent.settle().unwrap();
    let s = agent.status();
    assert_eq!(s.phase, UpdatePhase::Idle);
    let outcome = s.last_outcome.unwrap();
    assert!(
        outcome.succeeded && outcome.message.contains("updated to 2.0.0 in slot b"),
        "{outcome:?}"
    );
    assert!(b
        .events
        .recent_events()
        .iter()
        .any(|e| e.kind == "update" && e.message.contains("updated to 2.0.0")));
    // Nothing newer: the next check leaves the box alone.
    assert_eq!(
        rt.block_on(agent.check(&repo.source())).unwrap(),
        Checked::UpToDate
    );
    assert_eq!(b.reboots.0.load(Ordering::SeqCst), 1);
}

/// Staged outside the maintenance window, then a power cut: systemd-boot tries the new entry anyway. When
/// those trials never reach their agent (say the kernel panics at every try), the status still says
/// `staged`; the old slot's agent learns from the spent tries that the update failed.
#[test]
fn a_trial_whose_agent_never_ran_is_still_settled_as_failed() {
    let (t, repo, v1) = published_1_0_0();
    repo.publish(&image("3.0.0", &[1, 2]), &[]);
    let mut b = Device::new(t.path(), &v1, &repo);
    b.cfg.window = window_from_now(120, 60);
    let rt = rt();
    let checked = rt.block_on(b.agent().check(&repo.source())).unwrap();
    assert!(
        matches!(
            checked,
            Checked::Staged {
                rebooted: false,
                ..
            }
        ),
        "{checked:?}"
    );
    assert_eq!(b.agent().status().phase, UpdatePhase::Staged);
    for _ in 0..3 {
        b.boot(false);
    }
    assert_eq!(b.boot(true), "cairn-1.0.0-a.conf");
    let agent = b.agent();
    agent.settle().unwrap();
    let s = agent.status();
    let outcome = s.last_outcome.clone().unwrap();
    assert!(
        !outcome.succeeded && outcome.message.contains("after 3 tries"),
        "{outcome:?}"
    );
    assert_eq!(s.phase, UpdatePhase::Idle);
    assert_eq!(s.failed, ["3.0.0".parse().unwrap()]);
    assert_eq!(b.entries(), ["cairn-1.0.0-a.conf"]);
}

#[test]
fn a_release_whose_gate_fails_falls_back_after_its_tries_and_is_never_tried_again() {
    let (t, repo, v1) = published_1_0_0();
    repo.publish(&image("3.0.0", &[1, 2]), &[]);
    let b = Device::new(t.path(), &v1, &repo);
    let rt = rt();
    let checked = rt.block_on(b.agent().check(&repo.source())).unwrap();
    assert!(
        matches!(checked, Checked::Staged { rebooted: true, .. }),
        "{checked:?}"
    );
    // Three boots of 3.0.0 fail the gate (the gate's failure unit reboots each time); then slot A again.
    for expected in [
        "cairn-3.0.0-b+2-1.conf",
        "cairn-3.0.0-b+1-2.conf",
        "cairn-3.0.0-b+0-3.conf",
    ] {
        assert_eq!(b.boot(false), expected);
        let agent = b.agent();
        agent.settle().unwrap();
        assert_eq!(
            agent.status().phase,
            UpdatePhase::Trying,
            "still being tried"
        );
    }
    assert_eq!(b.boot(true), "cairn-1.0.0-a.conf");
    let agent = b.agent();
    agent.settle().unwrap();
    let s = agent.status();
    let outcome = s.last_outcome.clone().unwrap();
    assert!(!outcome.succeeded, "{outcome:?}");
    assert!(
        outcome.message.contains("update to 3.0.0 failed")
            && outcome.message.contains("after 3 tries"),
        "{outcome:?}"
    );
    assert!(
        outcome.message.contains("fell back to 1.0.0"),
        "{outcome:?}"
    );
    assert_eq!(s.failed, ["3.0.0".parse().unwrap()]);
    assert_eq!(
        b.entries(),
        ["cairn-1.0.0-a.conf"],
        "the failed entry is gone"
    );
    let critical = b.events.recent_events();
    assert!(
        critical
            .iter()
            .any(|e| e.kind == "update" && e.message.contains("3.0.0 failed")),
        "{critical:?}"
    );
    // The same release is not offered again; a newer one is.
    assert_eq!(
        rt.block_on(agent.check(&repo.source())).unwrap(),
        Checked::UpToDate
    );
    repo.publish(&image("3.0.1", &[1]), &[]);
    let checked = rt.block_on(agent.check(&repo.source())).unwrap();
    assert_eq!(
        checked,
        Checked::Staged {
            version: "3.0.1".parse().unwrap(),
            rebooted: true
        }
    );
}

#[test]
fn a_lower_version_is_refused_unless_the_fleet_signs_a_downgrade() {
    let t = tempfile::tempdir().unwrap();
    let repo = Repo::new(t.path());
    let v2 = image("2.0.0", &[3]);
    repo.publish(&image("1.0.0", &[]), &[]);
    let b = Device::new(t.path(), &v2, &repo);
    let rt = rt();
    let agent = b.agent();
    assert_eq!(
        rt.block_on(agent.check(&repo.source())).unwrap(),
        Checked::UpToDate
    );
    assert!(
        b.entries().iter().all(|e| e.contains("2.0.0")),
        "{:?}",
        b.entries()
    );
    let out = repo.publish(&image("1.0.0", &[]), &["--allow-downgrade"]);
    assert!(
        out.contains("0 new"),
        "publishing again only re-signs: {out}"
    );
    let checked = rt.block_on(agent.check(&repo.source())).unwrap();
    assert_eq!(
        checked,
        Checked::Staged {
            version: "1.0.0".parse().unwrap(),
            rebooted: true
        }
    );
    // Publishing the same thing twice is an operator mistake worth saying.
    let (ok, out) = repo.try_publish(
        &repo.images.join("cairn-1.0.0.json"),
        &["--allow-downgrade"],
    );
    assert!(!ok && out.contains("already published"), "{out}");
}

#[test]
fn an_expired_timestamp_stops_updates_until_the_fleet_refreshes_it() {
    let (t, repo, v1) = published_1_0_0();
    let b = Device::new(t.path(), &v1, &repo);
    let rt = rt();
    let agent = b.agent();
    assert_eq!(
        rt.block_on(agent.check(&repo.source())).unwrap(),
        Checked::UpToDate
    );
    // A fleet that published nothing for longer than the timestamp lasts: 2.0.0 waits behind an expired one.
    repo.publish(&image("2.0.0", &[3]), &[]);
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    rt.block_on(cairn_fleet::update_repo::refresh(
        &repo.dir, &repo.key, past,
    ))
    .unwrap();
    let err = cairn_agent::error_chain(&rt.block_on(agent.check(&repo.source())).unwrap_err());
    assert!(
        err.contains("update channel") && err.contains("xpired"),
        "{err}"
    );
    assert_eq!(b.entries(), ["cairn-1.0.0-a.conf"]);

    let (ok, out) = fleet(&[
        "update",
        "refresh",
        "--repo",
        repo.dir.to_str().unwrap(),
        "--key",
        repo.key.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("signed timestamp version"), "{out}");
    assert!(matches!(
        rt.block_on(agent.check(&repo.source())).unwrap(),
        Checked::Staged { .. }
    ));
    // Nothing to refresh in a repository that was never published to.
    let (ok, out) = fleet(&[
        "update",
        "refresh",
        "--repo",
        t.path().join("empty").to_str().unwrap(),
        "--key",
        repo.key.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("nothing is published"), "{out}");
}

#[test]
fn a_publish_is_taken_at_once_not_at_the_next_scheduled_check() {
    let (t, repo, v1) = published_1_0_0();
    let mut b = Device::new(t.path(), &v1, &repo);
    b.cfg.reboot = false;
    let rt = rt();
    let updater = Arc::new(b.agent());
    let (ask, asked) = tokio::sync::mpsc::channel(1);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let source = repo.source();
    let task = rt.spawn(cairn_agent::update::run(
        updater.clone(),
        move || Ok(source.clone()),
        asked,
        stopped,
        // The schedule alone would not check again within the test; only a look at the timestamp can.
        Duration::from_secs(3600),
        Duration::from_millis(200),
    ));
    // The first check (asked for, instead of waiting the 20 s after start) finds nothing newer.
    rt.block_on(ask.send(())).unwrap();
    let settle = Instant::now() + Duration::from_secs(10);
    while updater.status().last_check_unix.is_none() {
        assert!(Instant::now() < settle, "the asked-for check never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(updater.status().phase, UpdatePhase::Idle);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        updater.status().phase,
        UpdatePhase::Idle,
        "an unchanged timestamp does not make a check write anything"
    );

    let published = Instant::now();
    repo.publish(&image("2.0.0", &[3]), &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while updater.status().phase != UpdatePhase::Staged {
        assert!(
            Instant::now() < deadline,
            "2.0.0 was not taken after its publish: {:?}",
            updater.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("staged {:?} after the publish", published.elapsed());
    assert!(b.entries().iter().any(|e| e.starts_with("cairn-2.0.0-b")));
    stop.send(true).unwrap();
    rt.block_on(task).unwrap();
}

#[test]
fn waves_and_the_maintenance_window_are_honoured() {
    let (t, repo, v1) = published_1_0_0();
    repo.publish(&image("2.0.0", &[3]), &["--max-wave", "2"]);
    let mut b = Device::new(t.path(), &v1, &repo);
    let rt = rt();
    b.cfg.wave = 5;
    assert_eq!(
        rt.block_on(b.agent().check(&repo.source())).unwrap(),
        Checked::UpToDate,
        "wave 5 waits"
    );
    // A window that is closed now: the update is written and staged, the reboot waits.
    b.cfg.window = window_from_now(120, 60);
    b.cfg.wave = 2;
    let agent = b.agent();
    let checked = rt.block_on(agent.check(&repo.source())).unwrap();
    assert_eq!(
        checked,
        Checked::Staged {
            version: "2.0.0".parse().unwrap(),
            rebooted: false
        }
    );
    assert_eq!(agent.status().phase, UpdatePhase::Staged);
    assert_eq!(b.reboots.0.load(Ordering::SeqCst), 0);
    // The next check finds it staged: nothing is written again, still no reboot outside the window.
    let fetched = agent.status().chunks_fetched;
    assert!(matches!(
        rt.block_on(agent.check(&repo.source())).unwrap(),
        Checked::Staged {
            rebooted: false,
            ..
        }
    ));
    assert_eq!(agent.status().chunks_fetched, fetched);
    // The window opens (here: the window is made to cover now).
    b.cfg.window = window_from_now(0, 60);
    assert!(matches!(
        rt.block_on(b.agent().check(&repo.source())).unwrap(),
        Checked::Staged { rebooted: true, .. }
    ));
    assert_eq!(b.reboots.0.load(Ordering::SeqCst), 1);
}

#[test]
fn a_write_cut_short_resumes_without_fetching_again_what_was_written() {
    let (t, repo, v1) = published_1_0_0();
    // Every root chunk changes, so all of them are downloaded.
    let v2 = image("2.0.0", &[0, 1, 2, 3, 4, 5, 6]);
    repo.publish(&v2, &[]);
    let b = Device::new(t.path(), &v1, &repo);
    let rt = rt();
    // The uplink dies after a few chunks: the chunk of root index 4 is unreachable.
    let chunk = |i: usize| {
        let c =
            sha(&v2.root
                [i * CHUNK_BYTES as usize..((i + 1) * CHUNK_BYTES as usize).min(v2.root.len())]);
        std::fs::read_dir(repo.dir.join("targets"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(&format!("chunk-{c}.zst")))
            .unwrap()
    };
    let hidden = chunk(4);
    let aside = t.path().join("aside");
    std::fs::rename(&hidden, &aside).unwrap();
    let agent = b.agent();
    let err = rt.block_on(agent.check(&repo.source())).unwrap_err();
    assert!(
        cairn_agent::error_chain(&err).contains("update channel"),
        "{}",
        cairn_agent::error_chain(&err)
    );
    let s = agent.status();
    assert_eq!(s.phase, UpdatePhase::Writing);
    assert_eq!(s.chunks_fetched, 4, "{s:?}");
    assert!(s.last_error.is_some());
    assert_eq!(
        b.entries(),
        ["cairn-1.0.0-a.conf"],
        "no entry for a half-written slot"
    );

    // The box restarts (a new agent process); the uplink is back. Only what is missing is fetched.
    std::fs::rename(&aside, &hidden).unwrap();
    let agent = b.agent();
    assert_eq!(
        agent.status().phase,
        UpdatePhase::Writing,
        "the status survived the restart"
    );
    let checked = rt.block_on(agent.check(&repo.source())).unwrap();
    assert!(matches!(checked, Checked::Staged { .. }), "{checked:?}");
    let s = agent.status();
    assert_eq!(
        s.chunks_fetched,
        4 + 3 + 1,
        "3 root chunks and the verity tree after the 4 before: {s:?}"
    );
    assert_eq!(b.slot_b(), v2.root);
}

#[test]
fn tampered_chunks_forged_metadata_and_replayed_metadata_are_refused() {
    let (t, repo, v1) = published_1_0_0();
    let old = t.path().join("old-metadata");
    copy_dir(&repo.dir.join("metadata"), &old);
    repo.publish(&image("2.0.0", &[3]), &[]);
    let mut b = Device::new(t.path(), &v1, &repo);
    // Staged, not rebooted: every check below reads the channel again.
    b.cfg.reboot = false;
    let rt = rt();

    // A chunk replaced on the server (same name, other bytes): TUF's hash check refuses it.
    let chunks: Vec<PathBuf> = std::fs::read_dir(repo.dir.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".chunk-"))
        .collect();
    let originals: Vec<Vec<u8>> = chunks.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for p in &chunks {
        let mut data = std::fs::read(p).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(p, data).unwrap();
    }
    let agent = b.agent();
    let err = cairn_agent::error_chain(&rt.block_on(agent.check(&repo.source())).unwrap_err());
    assert!(err.contains("update channel"), "{err}");
    assert_eq!(b.entries(), ["cairn-1.0.0-a.conf"]);
    for (p, data) in chunks.iter().zip(originals) {
        std::fs::write(p, data).unwrap();
    }

    // targets.json edited to point at other bytes: its signature no longer holds.
    let targets = std::fs::read_dir(repo.dir.join("metadata"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".targets.json"))
        .max()
        .unwrap();
    let good = std::fs::read(&targets).unwrap();
    let forged =
        String::from_utf8(good.clone())
            .unwrap()
            .replacen("\"length\":", "\"length\": 1", 1);
    std::fs::write(&targets, forged).unwrap();
    let err = cairn_agent::error_chain(&rt.block_on(b.agent().check(&repo.source())).unwrap_err());
    assert!(err.contains("update channel"), "{err}");
    std::fs::write(&targets, good).unwrap();

    // A good check moves the device's trusted metadata to version 2 ...
    assert!(matches!(
        rt.block_on(agent.check(&repo.source())).unwrap(),
        Checked::Staged { .. }
    ));
    // ... so the older, validly signed metadata served again (a freeze or rollback attack) is refused.
    std::fs::remove_dir_all(repo.dir.join("metadata")).unwrap();
    copy_dir(&old, &repo.dir.join("metadata"));
    let agent = b.agent();
    let err = cairn_agent::error_chain(&rt.block_on(agent.check(&repo.source())).unwrap_err());
    assert!(
        err.contains("update channel") && err.contains("version"),
        "{err}"
    );

    // A repository signed by another key entirely is not this device's.
    let other = Repo::new(&t.path().join("other"));
    other.publish(&image("9.0.0", &[]), &[]);
    let err = cairn_agent::error_chain(&rt.block_on(agent.check(&other.source())).unwrap_err());
    assert!(err.contains("update channel"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn the_fleet_serves_its_repository_and_nothing_else_of_its_state() {
    let (t, repo, v1) = published_1_0_0();
    repo.publish(&image("2.0.0", &[3]), &[]);
    let state = t.path().join("state");
    let ready = t.path().join("ready");
    let mut serve = Command::new(bin("cairn-fleet"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state",
            state.to_str().unwrap(),
            "--ready-file",
            ready.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = cairn_sim::process::wait_for(std::time::Duration::from_secs(20), || {
        std::fs::read_to_string(&ready)
            .ok()
            .filter(|s| !s.trim().is_empty())
    })
    .expect("the fleet did not start");
    let url = url.trim().to_string();
    let ca = state.join("ca.pem");
    let client =
        cairn_agent::uplink::FleetClient::new(&url, &ca, std::time::Duration::from_secs(10))
            .unwrap();
    let rt = rt();
    let source = Source::Fleet {
        client: client.clone(),
        base: url::Url::parse(&url)
            .unwrap()
            .join(cairn_proto::update::UPDATE_PATH)
            .unwrap(),
    };
    let b = Device::new(t.path(), &v1, &repo);
    let checked = rt.block_on(b.agent().check(&source));
    // The fleet's own secrets are not files of the repository, however the path is spelled.
    let probes = [
        "/v1/update/../ca-key.pem",
        "/v1/update/metadata/../../ca-key.pem",
        "/v1/update/targets/../../ca-key.pem",
        "/v1/update/ca-key.pem",
    ];
    let leaks: Vec<_> = probes
        .iter()
        .map(|p| {
            (
                p,
                rt.block_on(client.update_file(p, 1 << 20))
                    .map(|b| b.map(|b| b.len())),
            )
        })
        .collect();
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(
        checked.unwrap(),
        Checked::Staged {
            version: "2.0.0".parse().unwrap(),
            rebooted: true
        }
    );
    assert_eq!(b.slot_b(), image("2.0.0", &[3]).root);
    for (p, r) in leaks {
        assert!(matches!(r, Ok(None)), "{p}: {r:?}");
    }
}
