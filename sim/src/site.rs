//! One simulated site under one directory: start it, describe it in `site.env`, poke it, stop it.

use crate::process::{self, bin_dir, wait_for};
use crate::sysfs_tree::{self, TreeProfile};
use cairn_proto::control::{Command, ComponentStatus, Response, Status};
use cairn_tpm::swtpm::Swtpm;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const STOP_GRACE: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is missing at {path}: build the workspace first (`just build`)")]
    MissingBinary { what: &'static str, path: PathBuf },
    #[error(transparent)]
    Swtpm(#[from] cairn_tpm::swtpm::SwtpmError),
    #[error("{what} did not become ready within {secs} s; its log is {log}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: PathBuf,
    },
    #[error("{path} is not a simulated site description: {reason}")]
    BadEnv { path: PathBuf, reason: String },
    #[error(
        "a site is already running in {dir} (cairnd pid {pid}); run `just sim-down {dir}` first"
    )]
    AlreadyUp { dir: PathBuf, pid: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SiteError + '_ {
    move |source| SiteError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// Fake NVML profile: "h100x8", "l4x1" or "none".
    pub gpu_profile: String,
    pub tree: TreeProfile,
    /// cairnd's hardware poll interval; the simulated site polls fast so tests and the demo see changes soon.
    pub poll_interval_secs: u64,
}

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions {
            gpu_profile: "h100x8".into(),
            tree: TreeProfile::default(),
            poll_interval_secs: 1,
        }
    }
}

/// What `site.env` records. Field names are the variable names, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteEnv {
    pub cairn_config: PathBuf,
    pub cairnd_pid: u32,
    pub fleet_pid: u32,
    pub fleet_url: String,
    pub fleet_state: PathBuf,
    pub swtpm_pid: u32,
    pub tpm_tcti: String,
    pub metrics_url: String,
    pub fake_nvml_config: PathBuf,
    pub control_socket: PathBuf,
}

impl SiteEnv {
    fn render(&self) -> String {
        let mut s = String::from("# Simulated cairn site. `set -a; . ./site.env; set +a` exports it; `just sim-down DIR` stops it.\n");
        let _ = writeln!(s, "CAIRN_CONFIG={}", self.cairn_config.display());
        let _ = writeln!(s, "CAIRND_PID={}", self.cairnd_pid);
        let _ = writeln!(s, "FLEET_PID={}", self.fleet_pid);
        let _ = writeln!(s, "FLEET_URL={}", self.fleet_url);
        let _ = writeln!(s, "FLEET_STATE={}", self.fleet_state.display());
        let _ = writeln!(s, "SWTPM_PID={}", self.swtpm_pid);
        let _ = writeln!(s, "TPM_TCTI={}", self.tpm_tcti);
        let _ = writeln!(s, "METRICS_URL={}", self.metrics_url);
        let _ = writeln!(s, "FAKE_NVML_CONFIG={}", self.fake_nvml_config.display());
        let _ = writeln!(s, "CONTROL_SOCKET={}", self.control_socket.display());
        s
    }

    fn parse(path: &Path, text: &str) -> Result<Self, SiteError> {
        let bad = |reason: String| SiteError::BadEnv {
            path: path.to_owned(),
            reason,
        };
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("no {key} line")))
        };
        let pid = |key: &str| {
            get(key)?
                .parse::<u32>()
                .map_err(|e| bad(format!("{key}: {e}")))
        };
        Ok(SiteEnv {
            cairn_config: get("CAIRN_CONFIG")?.into(),
            cairnd_pid: pid("CAIRND_PID")?,
            fleet_pid: pid("FLEET_PID")?,
            fleet_url: get("FLEET_URL")?,
            fleet_state: get("FLEET_STATE")?.into(),
            swtpm_pid: pid("SWTPM_PID")?,
            tpm_tcti: get("TPM_TCTI")?,
            metrics_url: get("METRICS_URL")?,
            fake_nvml_config: get("FAKE_NVML_CONFIG")?.into(),
            control_socket: get("CONTROL_SOCKET")?.into(),
        })
    }
}

/// A simulated site. Stopped when dropped unless [`Site::detach`] was called (as `cairn-sim up` does).
#[derive(Debug)]
pub struct Site {
    pub dir: PathBuf,
    pub env: SiteEnv,
    stop_on_drop: bool,
}

fn spawn_logged(
    program: &Path,
    args: &[&str],
    envs: &[(&str, &Path)],
    log: &Path,
) -> Result<u32, SiteError> {
    let out = std::fs::File::create(log).map_err(io(log))?;
    let err = out.try_clone().map_err(io(log))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // Its own process group: a Ctrl-C in the demo's terminal reaches the demo, which then stops the site in
    // order, instead of every process dying at once.
    cmd.process_group(0);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // Keep the agent from picking up the caller's CAIRN_* settings: the site's config file is the whole truth.
    for (k, _) in std::env::vars() {
        if k.starts_with("CAIRN_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd.spawn().map_err(io(program))?;
    Ok(child.id())
}

fn free_port() -> Result<u16, SiteError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io(Path::new("127.0.0.1:0")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(io(Path::new("127.0.0.1:0")))
}

impl Site {
    pub fn up(dir: &Path, opts: &SiteOptions) -> Result<Site, SiteError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let dir = dir.canonicalize().map_err(io(dir))?;
        if let Ok(existing) = Site::load(&dir) {
            if process::is_running(existing.env.cairnd_pid, "cairnd") {
                return Err(SiteError::AlreadyUp {
                    dir,
                    pid: existing.env.cairnd_pid,
                });
            }
        }
        let bins = bin_dir();
        for (what, name) in [("cairnd", "cairnd"), ("cairn-fleet", "cairn-fleet")] {
            if !bins.join(name).exists() {
                return Err(SiteError::MissingBinary {
                    what,
                    path: bins.join(name),
                });
            }
        }
        // `cargo build` puts the cdylib beside the binaries; `cargo test` leaves it in deps/.
        let nvml_library = [
            bins.join("libcairn_fake_nvml.so"),
            bins.join("deps/libcairn_fake_nvml.so"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| SiteError::MissingBinary {
            what: "the fake NVML library",
            path: bins.join("libcairn_fake_nvml.so"),
        })?;
        for sub in ["logs", "run", "agent/data", "fleet", "tpm"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
        }
        let sysroot = dir.join("sysroot");
        sysfs_tree::write(&sysroot, &opts.tree).map_err(io(&sysroot))?;
        let gpus = dir.join("gpus.toml");
        std::fs::write(&gpus, format!("# Fake NVML: edit to inject faults (see sim/fake-nvml/src/config.rs)\nprofile = \"{}\"\n", opts.gpu_profile))
            .map_err(io(&gpus))?;

        // Partial start-ups are torn down by Drop: a failed `up` leaves nothing running.
        let mut site = Site {
            env: SiteEnv {
                cairn_config: dir.join("cairnd.toml"),
                cairnd_pid: 0,
                fleet_pid: 0,
                fleet_url: String::new(),
                fleet_state: dir.join("fleet"),
                swtpm_pid: 0,
                tpm_tcti: String::new(),
                metrics_url: String::new(),
                fake_nvml_config: gpus,
                control_socket: dir.join("run/control.sock"),
            },
            dir: dir.clone(),
            stop_on_drop: true,
        };

        let (pid, tcti) = Swtpm::start(&dir.join("tpm"))?.detach();
        site.env.swtpm_pid = pid;
        site.env.tpm_tcti = tcti;

        site.start_fleet_on("127.0.0.1:0")?;

        let metrics_port = free_port()?;
        site.env.metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let config = format!(
            "# cairnd configuration of the simulated site in {dir}\n\
             [agent]\ndata_dir = \"{data}\"\ncontrol_socket = \"{sock}\"\nlog_level = \"info\"\n\n\
             [tpm]\ntcti = \"{tcti}\"\nprobe_interval_secs = 5\n\n\
             [fleet]\nurl = \"{url}\"\nca_file = \"{ca}\"\ncheck_interval_secs = 1\ntimeout_secs = 3\n\n\
             [hardware]\nsys_root = \"{sysroot}\"\nnvml_library = \"{nvml}\"\npoll_interval_secs = {poll}\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            dir = dir.display(),
            data = dir.join("agent/data").display(),
            sock = site.env.control_socket.display(),
            tcti = site.env.tpm_tcti,
            url = site.env.fleet_url,
            ca = dir.join("fleet/ca.pem").display(),
            sysroot = sysroot.display(),
            nvml = nvml_library.display(),
            poll = opts.poll_interval_secs,
        );
        std::fs::write(&site.env.cairn_config, config).map_err(io(&site.env.cairn_config))?;
        site.start_cairnd()?;
        Ok(site)
    }

    /// The site described by `DIR/site.env`. Dropping it does not stop it.
    pub fn load(dir: &Path) -> Result<Site, SiteError> {
        let path = dir.join("site.env");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        Ok(Site {
            dir: dir.to_owned(),
            env: SiteEnv::parse(&path, &text)?,
            stop_on_drop: false,
        })
    }

    /// Leaves the site running after this value is dropped.
    pub fn detach(mut self) {
        self.stop_on_drop = false;
    }

    fn save(&self) -> Result<(), SiteError> {
        let path = self.dir.join("site.env");
        std::fs::write(&path, self.env.render()).map_err(io(&path))
    }

    fn start_fleet_on(&mut self, listen: &str) -> Result<(), SiteError> {
        let ready = self.dir.join("run/fleet.url");
        let _ = std::fs::remove_file(&ready);
        let log = self.dir.join("logs/fleet.log");
        let state = self.env.fleet_state.display().to_string();
        let ready_s = ready.display().to_string();
        self.env.fleet_pid = spawn_logged(
            &bin_dir().join("cairn-fleet"),
            &[
                "serve",
                "--listen",
                listen,
                "--state",
                &state,
                "--ready-file",
                &ready_s,
            ],
            &[],
            &log,
        )?;
        let url = wait_for(START_TIMEOUT, || {
            std::fs::read_to_string(&ready)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .ok_or(SiteError::NotReady {
            what: "cairn-fleet",
            secs: START_TIMEOUT.as_secs(),
            log,
        })?;
        self.env.fleet_url = url;
        self.save()
    }

    /// Starts the fleet again on the port it had (after [`Site::stop_fleet`]).
    pub fn start_fleet(&mut self) -> Result<(), SiteError> {
        let listen = self.env.fleet_url.trim_start_matches("https://").to_owned();
        self.start_fleet_on(&listen)
    }

    /// Cuts the uplink: stops the fleet, keeping its state.
    pub fn stop_fleet(&mut self) {
        process::stop(self.env.fleet_pid, "cairn-fleet", STOP_GRACE);
    }

    pub fn start_cairnd(&mut self) -> Result<(), SiteError> {
        let log = self.dir.join("logs/cairnd.log");
        let config = self.env.cairn_config.display().to_string();
        self.env.cairnd_pid = spawn_logged(
            &bin_dir().join("cairnd"),
            &["--config", &config],
            &[("FAKE_NVML_CONFIG", &self.env.fake_nvml_config)],
            &log,
        )?;
        self.save()?;
        // Ready when every component has been looked at once.
        let pid = self.env.cairnd_pid;
        wait_for(START_TIMEOUT, || {
            if !process::is_running(pid, "cairnd") {
                return Some(());
            }
            self.status().ok().filter(|s| {
                !matches!(s.tpm, ComponentStatus::Unknown)
                    && !matches!(s.gpus, ComponentStatus::Unknown)
                    && !matches!(s.sensors, ComponentStatus::Unknown)
                    && !matches!(s.fleet, ComponentStatus::Unknown)
            })?;
            Some(())
        });
        if !process::is_running(pid, "cairnd") || self.status().is_err() {
            return Err(SiteError::NotReady {
                what: "cairnd",
                secs: START_TIMEOUT.as_secs(),
                log,
            });
        }
        Ok(())
    }

    /// Stops cairnd with SIGTERM; returns whether it had to be killed instead.
    pub fn stop_cairnd(&mut self) -> bool {
        process::stop(self.env.cairnd_pid, "cairnd", STOP_GRACE)
    }

    pub fn status(&self) -> Result<Status, cairn_agent::control::ControlError> {
        match cairn_agent::control::request(
            &self.env.control_socket,
            Command::Status,
            Duration::from_secs(5),
        )? {
            Response::Status(s) => Ok(*s),
            other => Err(cairn_agent::control::ControlError::Protocol {
                path: self.env.control_socket.clone(),
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Replaces the fake GPUs' file (profile and faults); cairnd sees it at its next poll.
    pub fn set_gpus(&self, toml: &str) -> Result<(), SiteError> {
        let path = &self.env.fake_nvml_config;
        // Write-then-rename so the library never reads a half-written file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, toml).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// Stops everything the site started. Returns the names of processes that had to be SIGKILLed.
    pub fn down(&mut self) -> Vec<&'static str> {
        self.stop_on_drop = false;
        let mut killed = Vec::new();
        if process::stop(self.env.cairnd_pid, "cairnd", STOP_GRACE) {
            killed.push("cairnd");
        }
        if process::stop(self.env.fleet_pid, "cairn-fleet", STOP_GRACE) {
            killed.push("cairn-fleet");
        }
        let _ = Swtpm::stop(&self.dir.join("tpm"));
        killed
    }

    /// PIDs of the site's processes that still run.
    pub fn running(&self) -> Vec<(&'static str, u32)> {
        [
            ("cairnd", self.env.cairnd_pid),
            ("cairn-fleet", self.env.fleet_pid),
            ("swtpm", self.env.swtpm_pid),
        ]
        .into_iter()
        .filter(|&(name, pid)| pid != 0 && process::is_running(pid, name))
        .collect()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.down();
        }
    }
}
