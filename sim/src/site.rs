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
/// nspawn shuts the container's systemd down on SIGTERM, which takes a few seconds.
const NSPAWN_GRACE: Duration = Duration::from_secs(20);
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
    #[error("the simulated boot failed: {0}")]
    Boot(String),
    #[error("{path} is not a simulated site description: {reason}")]
    BadEnv { path: PathBuf, reason: String },
    #[error(
        "a site is already running in {dir} (cairnd pid {pid}); run `just sim-down {dir}` first"
    )]
    AlreadyUp { dir: PathBuf, pid: u32 },
    #[error("the workloads' systemd container did not start")]
    Nspawn(#[from] crate::nspawn::NspawnError),
    #[error("cannot make the workload signer")]
    Signer(#[from] cairn_fleet::workloads::WorkloadsError),
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
    /// Which EK the device's keys hang off.
    pub ek_algorithm: cairn_tpm::EkAlgorithm,
    /// What vouches for the TPM at enrolment.
    pub trust: Trust,
    /// The image version measured into PCR 4 by the simulated firmware boot.
    pub image_version: String,
    /// Seconds between re-attestations the fleet asks for.
    pub reattest_secs: u64,
    /// TOML appended to cairnd.toml: tables the site does not write itself (`[telemetry]`, `[health]`, …).
    pub extra_config: String,
    /// Boot a systemd container (see [`crate::nspawn`]) for workloads, make a workload signer in
    /// `DIR/signer`, and point cairnd's `[workloads]` at both; `extra_config` must then not hold that table.
    pub workloads: bool,
}

/// How the site's fleet learns to trust the site's TPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The swtpm EK certificate chains to the machine's swtpm-localca, given to the fleet as manufacturer CA.
    EkCertificate,
    /// The EK's name is on the fleet's allow-list (procurement list).
    AllowList,
    /// Nothing vouches: the device waits as pending until `cairn-fleet devices approve`.
    Operator,
}

/// swtpm_setup's local CA on Debian: the "manufacturer" of every swtpm on this machine.
pub const SWTPM_LOCALCA_ROOT: &str = "/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem";
pub const SWTPM_LOCALCA_ISSUER: &str = "/var/lib/swtpm-localca/issuercert.pem";

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions {
            gpu_profile: "h100x8".into(),
            tree: TreeProfile::default(),
            poll_interval_secs: 1,
            ek_algorithm: cairn_tpm::EkAlgorithm::Rsa2048,
            trust: Trust::EkCertificate,
            image_version: "0.1.0".into(),
            reattest_secs: 30,
            extra_config: String::new(),
            workloads: false,
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
    /// The local status page, on loopback.
    pub page_url: String,
    pub fake_nvml_config: PathBuf,
    pub control_socket: PathBuf,
    /// The workloads' systemd container (`systemd-nspawn`), 0 when the site has none.
    pub nspawn_pid: u32,
    /// The workload signer's private key, empty when the site has no workloads.
    pub workload_signer: PathBuf,
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
        let _ = writeln!(s, "PAGE_URL={}", self.page_url);
        let _ = writeln!(s, "FAKE_NVML_CONFIG={}", self.fake_nvml_config.display());
        let _ = writeln!(s, "CONTROL_SOCKET={}", self.control_socket.display());
        let _ = writeln!(s, "NSPAWN_PID={}", self.nspawn_pid);
        let _ = writeln!(s, "WORKLOAD_SIGNER={}", self.workload_signer.display());
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
            page_url: get("PAGE_URL")?,
            fake_nvml_config: get("FAKE_NVML_CONFIG")?.into(),
            control_socket: get("CONTROL_SOCKET")?.into(),
            nspawn_pid: pid("NSPAWN_PID")?,
            workload_signer: get("WORKLOAD_SIGNER")?.into(),
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
        for sub in ["logs", "run", "agent/data", "fleet", "tpm", "lib"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
        }
        // The site's own copy of the driver library, so a test can take the driver away from this site only.
        let site_nvml = dir.join("lib/libnvidia-ml.so.1");
        std::fs::copy(&nvml_library, &site_nvml).map_err(io(&site_nvml))?;
        let nvml_library = site_nvml;
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
                page_url: String::new(),
                fake_nvml_config: gpus,
                control_socket: dir.join("run/control.sock"),
                nspawn_pid: 0,
                workload_signer: PathBuf::new(),
            },
            dir: dir.clone(),
            stop_on_drop: true,
        };

        let (pid, tcti) = Swtpm::start(&dir.join("tpm"))?.detach();
        site.env.swtpm_pid = pid;
        site.env.tpm_tcti = tcti;

        site.prepare_trust(opts, &sysroot)?;
        site.start_fleet_on("127.0.0.1:0")?;

        let workloads = if opts.workloads {
            site.start_workload_host()?
        } else {
            String::new()
        };

        let metrics_port = free_port()?;
        site.env.metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let page_port = free_port()?;
        site.env.page_url = format!("http://127.0.0.1:{page_port}/");
        let config = format!(
            "# cairnd configuration of the simulated site in {dir}\n\
             [agent]\ndata_dir = \"{data}\"\ncontrol_socket = \"{sock}\"\nlog_level = \"info\"\n\n\
             [tpm]\ntcti = \"{tcti}\"\nprobe_interval_secs = 5\nek_algorithm = \"{alg}\"\n\n\
             [fleet]\nurl = \"{url}\"\nca_file = \"{ca}\"\ncheck_interval_secs = 1\ntimeout_secs = 3\n\
             provisioning_paths = [\"{provision}\"]\ndiscover_srv = false\nretry_min_secs = 1\nretry_max_secs = 10\n\n\
             [hardware]\nsys_root = \"{sysroot}\"\nnvml_library = \"{nvml}\"\npoll_interval_secs = {poll}\nnvme_interval_secs = {poll}\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [page]\ninterfaces = []\nlisten = [\"127.0.0.1:{page_port}\"]\n{workloads}{extra}",
            dir = dir.display(),
            data = dir.join("agent/data").display(),
            sock = site.env.control_socket.display(),
            tcti = site.env.tpm_tcti,
            alg = opts.ek_algorithm,
            provision = dir.join("provision/cairn-provision.toml").display(),
            url = site.env.fleet_url,
            ca = dir.join("fleet/ca.pem").display(),
            sysroot = sysroot.display(),
            nvml = nvml_library.display(),
            poll = opts.poll_interval_secs,
            extra = opts.extra_config,
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

    /// Boots the software TPM (PCRs and event log), writes the reference values an image build would emit
    /// (PCRs 4 and 7: what the image controls; the firmware's PCRs are pinned at enrolment), and sets up what
    /// vouches for the TPM.
    fn prepare_trust(&self, opts: &SiteOptions, sysroot: &Path) -> Result<(), SiteError> {
        let fleet = self.dir.join("fleet");
        let stages = crate::measured_boot::default_boot(&opts.image_version);
        let log = crate::measured_boot::boot(&self.env.tpm_tcti, &stages)
            .map_err(|e| SiteError::Boot(cairn_agent::error_chain(&e)))?;
        let log_path = sysroot.join("sys/kernel/security/tpm0/binary_bios_measurements");
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&log_path, &log).map_err(io(&log_path))?;
        let parsed =
            cairn_proto::eventlog::parse(&log).map_err(|e| SiteError::Boot(e.to_string()))?;
        let replayed = cairn_fleet::eventlog::replay_sha256(&parsed)
            .map_err(|e| SiteError::Boot(e.to_string()))?;
        let pcrs: serde_json::Map<String, serde_json::Value> = replayed
            .iter()
            .filter(|(i, _)| [4u8, 7].contains(i))
            .map(|(i, v)| (i.to_string(), cairn_proto::fleet::to_hex(v).into()))
            .collect();
        let reference = serde_json::json!({
            "version": 1,
            "accepted": [{ "name": format!("cairn {}", opts.image_version), "sha256": pcrs }],
        });
        let path = fleet.join("reference.json");
        std::fs::write(&path, reference.to_string()).map_err(io(&path))?;

        let allow = fleet.join("allow-list");
        let mut allow_text =
            String::from("# EK names of TPMs this fleet enrols without an EK certificate\n");
        match opts.trust {
            Trust::EkCertificate => {
                for (from, to) in [
                    (SWTPM_LOCALCA_ROOT, "ek-ca.pem"),
                    (SWTPM_LOCALCA_ISSUER, "ek-intermediate.pem"),
                ] {
                    std::fs::copy(from, fleet.join(to)).map_err(io(Path::new(from)))?;
                }
            }
            Trust::AllowList => {
                let tpm = cairn_tpm::Tpm::new(&self.env.tpm_tcti)
                    .map_err(|e| SiteError::Boot(cairn_agent::error_chain(&e)))?;
                let ek = tpm
                    .ek_public(opts.ek_algorithm)
                    .map_err(|e| SiteError::Boot(cairn_agent::error_chain(&e)))?;
                let ek = cairn_fleet::ek::EkPublic::parse(&ek)
                    .map_err(|e| SiteError::Boot(e.to_string()))?;
                let _ = writeln!(allow_text, "{}", cairn_proto::fleet::to_hex(&ek.name()));
            }
            Trust::Operator => {}
        }
        std::fs::write(&allow, allow_text).map_err(io(&allow))?;
        let reattest = fleet.join("reattest-secs");
        std::fs::write(&reattest, opts.reattest_secs.to_string()).map_err(io(&reattest))
    }

    fn start_fleet_on(&mut self, listen: &str) -> Result<(), SiteError> {
        let ready = self.dir.join("run/fleet.url");
        let _ = std::fs::remove_file(&ready);
        let log = self.dir.join("logs/fleet.log");
        let state = self.env.fleet_state.display().to_string();
        let ready_s = ready.display().to_string();
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            listen,
            "--state",
            &state,
            "--ready-file",
            &ready_s,
            "--retry-after-secs",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // The policy lives in files beside the fleet's state, so a restarted fleet has the same one.
        let fleet = &self.env.fleet_state;
        for (flag, file) in [
            ("--ek-ca", "ek-ca.pem"),
            ("--ek-intermediate", "ek-intermediate.pem"),
            ("--allow-list", "allow-list"),
            ("--reference", "reference.json"),
        ] {
            if fleet.join(file).exists() {
                args.push(flag.into());
                args.push(fleet.join(file).display().to_string());
            }
        }
        if let Ok(secs) = std::fs::read_to_string(fleet.join("reattest-secs")) {
            args.push("--reattest-secs".into());
            args.push(secs.trim().to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.env.fleet_pid = spawn_logged(&bin_dir().join("cairn-fleet"), &args, &[], &log)?;
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

    /// Waits until onboarding reaches `state` (e.g. "onboarded"); returns the last status seen either way.
    pub fn wait_onboarding(&self, state: &str, timeout: Duration) -> Option<Status> {
        let mut last = None;
        wait_for(timeout, || {
            let s = self.status().ok()?;
            let done = s.onboarding.state == state;
            last = Some(s);
            done.then_some(())
        })?;
        last
    }

    /// Runs `cairn-fleet devices --json` against the site's fleet state (through the server if it runs).
    pub fn fleet_devices(&self) -> Result<serde_json::Value, SiteError> {
        let out = std::process::Command::new(bin_dir().join("cairn-fleet"))
            .args(["devices", "--json", "--state"])
            .arg(&self.env.fleet_state)
            .output()
            .map_err(io(&bin_dir().join("cairn-fleet")))?;
        serde_json::from_slice(&out.stdout).map_err(|e| SiteError::BadEnv {
            path: self.env.fleet_state.clone(),
            reason: format!(
                "cairn-fleet devices answered {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }

    /// Replaces the fake GPUs' file (profile and faults); cairnd sees it at its next poll.
    pub fn set_gpus(&self, toml: &str) -> Result<(), SiteError> {
        let path = &self.env.fake_nvml_config;
        // Write-then-rename so the library never reads a half-written file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, toml).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// A workload signer in `DIR/signer` and a booted systemd container (first use builds its rootfs, about
    /// half a minute); returns the `[workloads]` table that points cairnd at both.
    fn start_workload_host(&mut self) -> Result<String, SiteError> {
        let signer = self.dir.join("signer");
        use cairn_fleet::workloads::{keygen, KEY_FILE, PUBLIC_FILE};
        // A site brought up again in the same directory keeps its signer, like a real fleet.
        let (key, public) = if signer.join(KEY_FILE).exists() {
            (signer.join(KEY_FILE), signer.join(PUBLIC_FILE))
        } else {
            keygen(&signer)?
        };
        self.env.workload_signer = key;
        let root = crate::nspawn::rootfs(&crate::nspawn::default_cache())?;
        let container =
            crate::nspawn::Container::boot(&root, &self.dir.join("nspawn"), &[&self.dir])?;
        let table = format!(
            "\n[workloads]\nsigner_key = \"{}\"\ndbus_address = \"{}\"\njournal_dir = \"{}\"\nfetch_interval_secs = 2\nresync_interval_secs = 10\n",
            public.display(),
            container.bus_address(),
            container.journal_dir().display(),
        );
        self.env.nspawn_pid = container.detach();
        Ok(table)
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
        if self.env.nspawn_pid != 0
            && process::stop(self.env.nspawn_pid, crate::nspawn::PROGRAM, NSPAWN_GRACE)
        {
            killed.push(crate::nspawn::PROGRAM);
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
            (crate::nspawn::PROGRAM, self.env.nspawn_pid),
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
