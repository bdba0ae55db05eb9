//! A real systemd to run workloads against: a Debian bookworm rootfs (made once with mmdebstrap, cached)
//! booted with `systemd-nspawn -b`, its system bus on a bind-mounted socket the agent on the host connects
//! to. The container shares the host's network (health checks reach 127.0.0.1) and sees the given host
//! directories at the same paths (the agent's artifact directories). Its journal is a host directory, so
//! each boot starts with an empty one and the host reads it with `journalctl --directory`. The rootfs itself is
//! booted volatile: whatever the container writes is gone when it stops.
//!
//! The sandbox does not enforce cgroup limits (no delegated cgroup tree); tests read the properties back
//! instead, and leave enforcement to the qemu tier.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Packages beyond minbase: systemd as PID 1, the bus, busybox for test workloads (httpd, nc, sh) and
/// python3 for the shipped example recipes.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,libpam-systemd,busybox,python3";
/// The cached rootfs's name; a new one whenever PACKAGES changes, so an old cache is not taken for it.
const ROOTFS: &str = "nspawn-bookworm-v2";

#[derive(Debug, thiserror::Error)]
pub enum NspawnError {
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the container's system bus did not come up within {0:?}; see {1}")]
    NoBus(Duration, PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NspawnError + '_ {
    move |source| NspawnError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The rootfs under `cache` (e.g. target/tmp), made on first use; a lock keeps parallel callers to one build.
pub fn rootfs(cache: &Path) -> Result<PathBuf, NspawnError> {
    let root = cache.join(ROOTFS);
    let ready = cache.join(format!("{ROOTFS}.ready"));
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let lock_path = cache.join(format!("{ROOTFS}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    let lock =
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            NspawnError::Io {
                path: lock_path.clone(),
                source: e.into(),
            }
        })?;
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&root);
        let out = Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet"])
            .arg(format!("--include={PACKAGES}"))
            .arg("bookworm")
            .arg(&root)
            .output()
            .map_err(io(Path::new("mmdebstrap")))?;
        if !out.status.success() {
            return Err(NspawnError::Command {
                what: "mmdebstrap bookworm".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        std::fs::write(&ready, b"").map_err(io(&ready))?;
    }
    drop(lock);
    Ok(root)
}

/// Where the rootfs is cached when no test names a directory: `target/tmp`, as `cargo test` has it.
pub fn default_cache() -> PathBuf {
    let bins = crate::process::bin_dir();
    bins.parent().unwrap_or(&bins).join("tmp")
}

/// The name `systemd-nspawn` runs under, for stopping a detached container by PID.
pub const PROGRAM: &str = "systemd-nspawn";

/// A booted container; powered off when dropped, unless detached.
#[derive(Debug)]
pub struct Container {
    child: Child,
    bus_dir: PathBuf,
    journal: PathBuf,
    log: PathBuf,
    detached: bool,
}

impl Container {
    /// Boots `root`, with its bus socket and journal under `work`, and each of `share` bound at its own path.
    pub fn boot(root: &Path, work: &Path, share: &[&Path]) -> Result<Self, NspawnError> {
        let bus_dir = work.join("bus");
        let journal = work.join("journal");
        for d in [&bus_dir, &journal] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let log = work.join("nspawn.log");
        let out = std::fs::File::create(&log).map_err(io(&log))?;
        let err = out.try_clone().map_err(io(&log))?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--directory")
            .arg(root)
            .args(["--register=no", "--keep-unit", "--boot", "--quiet"])
            // Writes go to a tmpfs over the cached rootfs, so no run leaves anything in it for the next.
            .arg("--volatile=overlay")
            .arg(format!("--bind={}:/run/dbus", bus_dir.display()))
            .arg(format!("--bind={}:/var/log/journal", journal.display()));
        for s in share {
            cmd.arg(format!("--bind={0}:{0}", s.display()));
        }
        // Its own session, so a terminal's signals do not reach it; stdin closed, so it does not want a tty.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().map_err(io(Path::new("systemd-nspawn")))?;
        let c = Container {
            child,
            bus_dir,
            journal,
            log,
            detached: false,
        };
        let wait = Duration::from_secs(30);
        let started = Instant::now();
        loop {
            let ok = c
                .busctl(&[
                    "get-property",
                    "org.freedesktop.systemd1",
                    "/org/freedesktop/systemd1",
                    "org.freedesktop.systemd1.Manager",
                    "SystemState",
                ])
                .is_ok_and(|s| s.contains("running") || s.contains("degraded"));
            if ok {
                return Ok(c);
            }
            if started.elapsed() > wait {
                return Err(NspawnError::NoBus(wait, c.log.clone()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The D-Bus address of the container's system bus.
    pub fn bus_address(&self) -> String {
        format!(
            "unix:path={}",
            self.bus_dir.join("system_bus_socket").display()
        )
    }

    /// The journal directory the container writes.
    pub fn journal_dir(&self) -> &Path {
        &self.journal
    }

    /// Runs the host's busctl against the container's bus; stdout on success.
    pub fn busctl(&self, args: &[&str]) -> Result<String, NspawnError> {
        let out = Command::new("busctl")
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus_address())
            .arg("--system")
            .args(args)
            .output()
            .map_err(io(Path::new("busctl")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NspawnError::Command {
                what: format!("busctl {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// A unit property as busctl prints it ("t 536870912", "b true", "s \"strict\"", …); None when the
    /// unit is not loaded.
    pub fn property(&self, unit: &str, interface: &str, name: &str) -> Option<String> {
        let path = unit_path(unit);
        self.busctl(&[
            "get-property",
            "org.freedesktop.systemd1",
            &path,
            &format!("org.freedesktop.systemd1.{interface}"),
            name,
        ])
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|_| {
            self.busctl(&[
                "get-property",
                "org.freedesktop.systemd1",
                &path,
                "org.freedesktop.systemd1.Unit",
                "LoadState",
            ])
            .is_ok_and(|s| s.contains("loaded"))
        })
    }

    /// Stops a unit as if the box rebooted under it.
    pub fn stop_unit(&self, unit: &str) -> Result<(), NspawnError> {
        self.busctl(&[
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "StopUnit",
            "ss",
            unit,
            "replace",
        ])
        .map(|_| ())
    }
}

/// systemd's object path for a unit name.
pub fn unit_path(unit: &str) -> String {
    let mut p = String::from("/org/freedesktop/systemd1/unit/");
    for b in unit.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    p
}

impl Container {
    /// Leaves the container running after this value is dropped; returns nspawn's PID to stop it by.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.child.id()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // SIGTERM asks nspawn to shut the container down cleanly; it usually takes a second or two.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
