//! cairnctl: the local CLI. Talks to cairnd over its control socket.
//! Exit codes: 0 ok, 1 error, 2 usage, 69 cairnd not reachable, 78 configuration error.

use cairn_agent::control::{self, ControlError};
use cairn_agent::{attestation, config, gate, view};
use cairn_proto::control::{Command, Response};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(version, about = "Look at and steer the local cairn agent")]
struct Args {
    /// The agent's configuration file (to find its control socket); default: the agent's own search.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Talk to this control socket instead of the configured one.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What the agent knows: TPM, GPUs, sensors, fleet, onboarding.
    Status {
        /// Machine-readable output (the control protocol's status object).
        #[arg(long)]
        json: bool,
    },
    /// The site overview in words, as the console and the local page show it: every part, and for what is
    /// not ok the cause and the next step. Exit code 0 when nothing is red, 1 otherwise.
    Overview {
        #[arg(long)]
        json: bool,
    },
    /// Write one archive for ops (versions, configuration with secrets redacted, the agent's answers, recent
    /// journal, data directory listing). Works when cairnd is down. Exit code 0 once the archive is written.
    Diagnose {
        /// File or directory to write to; default /var/tmp. A directory gets cairn-diagnose-<code>-<time>.tar.zst.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Journal lines to include.
        #[arg(long, default_value_t = 2000)]
        journal_lines: usize,
        #[arg(long)]
        json: bool,
    },
    /// Quote PCRs with this device's attestation key into files tpm2_checkquote reads. Uses the TPM and the
    /// AK named by the agent's configuration; works whether or not cairnd runs.
    Quote {
        /// Qualifying data (the verifier's nonce), hex.
        #[arg(long)]
        nonce: String,
        /// PCRs to quote, e.g. sha256:0,1,2,3,4,5,6,7.
        #[arg(long, default_value = "sha256:0,1,2,3,4,5,6,7")]
        pcrs: String,
        /// Directory for quote.msg, quote.sig, quote.pcrs and ak.pub (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// The health model: every component ok / degraded / failed with reasons, and the recent events.
    /// Exit code 0 when nothing is failed, 1 otherwise.
    Health {
        #[arg(long)]
        json: bool,
    },
    /// The telemetry spool: depth, oldest unsent age, bytes used, drops, last upload.
    Telemetry {
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent to attest to the fleet now (enrolling first if needed) and print the verdict.
    /// Exit code 0 when the fleet trusts the device, 1 otherwise.
    Attest {
        #[arg(long)]
        json: bool,
    },
    /// Desired workloads against what systemd runs: state, restarts, health and the reason. Exit code 0
    /// when none has failed, 1 otherwise.
    Workloads {
        #[arg(long)]
        json: bool,
    },
    /// The boot health gate, run by cairn-health-gate.service before boot-complete.target: waits for the
    /// agent, then checks the data partition, the TPM and the expected GPUs and SSDs (never the uplink).
    /// Exit code 0 when this boot is good, 1 otherwise.
    Gate {
        #[arg(long)]
        json: bool,
    },
    /// Workload recipes (recipes/*.toml).
    Recipe {
        #[command(subcommand)]
        command: RecipeCmd,
    },
    /// OTA updates (docs/image.md).
    Update {
        #[command(subcommand)]
        command: UpdateCmd,
    },
}

#[derive(Subcommand)]
enum UpdateCmd {
    /// Where the update stands: running version and slot, the update being written (with progress), staged
    /// or tried, the last outcome. Exit code 0 unless the last check failed or the last update fell back.
    Status {
        #[arg(long)]
        json: bool,
        /// Redraw every second until the update is no longer being written.
        #[arg(long)]
        follow: bool,
    },
    /// Check the update channel now instead of at the next scheduled check.
    Check {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RecipeCmd {
    /// Check recipe files: exit 0 when every one is valid, 1 otherwise, each error naming the file and key.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match &args.command {
        Cmd::Status { json } => status(args.config, args.socket, *json),
        Cmd::Overview { json } => overview(args.config, args.socket, *json),
        Cmd::Diagnose {
            out,
            journal_lines,
            json,
        } => diagnose(args.config, args.socket, out.clone(), *journal_lines, *json),
        Cmd::Quote { nonce, pcrs, out } => quote(args.config, nonce, pcrs, out),
        Cmd::Attest { json } => attest(args.config, args.socket, *json),
        Cmd::Health { json } => health(args.config, args.socket, *json),
        Cmd::Telemetry { json } => telemetry(args.config, args.socket, *json),
        Cmd::Workloads { json } => workloads(args.config, args.socket, *json),
        Cmd::Gate { json } => gate(args.config, args.socket, *json),
        Cmd::Recipe {
            command: RecipeCmd::Check { files, json },
        } => recipe_check(files, *json),
        Cmd::Update {
            command: UpdateCmd::Status { json, follow },
        } => update(
            args.config,
            args.socket,
            Command::UpdateStatus,
            *json,
            *follow,
        ),
        Cmd::Update {
            command: UpdateCmd::Check { json },
        } => update(args.config, args.socket, Command::UpdateCheck, *json, false),
    }
}

/// Needs no agent: checks each file on its own and reports every one.
fn recipe_check(files: &[PathBuf], json: bool) -> ExitCode {
    let mut ok = true;
    let mut out = Vec::new();
    for f in files {
        let result = cairn_agent::recipe::load(f);
        ok &= result.is_ok();
        match (&result, json) {
            (Ok(r), false) => println!(
                "ok     {}: {}",
                f.display(),
                cairn_agent::recipe::summary(r)
            ),
            (Err(e), false) => eprintln!("error  {}", cairn_agent::error_chain(e)),
            (Ok(r), true) => out.push(serde_json::json!({"file": f, "ok": true, "recipe": r})),
            (Err(e), true) => out.push(
                serde_json::json!({"file": f, "ok": false, "error": cairn_agent::error_chain(e)}),
            ),
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(out));
    }
    exit(ok)
}

fn socket_path(config_path: Option<PathBuf>, socket: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match socket {
        Some(s) => Ok(s),
        None => load_config(config_path).map(|c| c.agent.control_socket),
    }
}

fn control_failure(e: ControlError) -> ExitCode {
    eprintln!("cairnctl: {}", cairn_agent::error_chain(&e));
    match e {
        ControlError::Connect { .. } => ExitCode::from(EXIT_UNAVAILABLE),
        _ => ExitCode::FAILURE,
    }
}

/// Asks cairnd one question. An error answer or an unreachable agent is printed and becomes the exit code.
fn ask(
    config_path: Option<PathBuf>,
    socket: Option<PathBuf>,
    command: Command,
    timeout: Duration,
) -> Result<Response, ExitCode> {
    let socket = socket_path(config_path, socket)?;
    match control::request(&socket, command, timeout) {
        Ok(Response::Error { message }) => {
            eprintln!("cairnctl: {message}");
            Err(ExitCode::FAILURE)
        }
        Ok(r) => Ok(r),
        Err(e) => Err(control_failure(e)),
    }
}

/// Prints an answer as JSON (the control protocol's object) or in words.
fn show<T: serde::Serialize>(
    value: &T,
    json: bool,
    words: impl FnOnce(&T) -> String,
) -> Result<(), ExitCode> {
    if json {
        let text = serde_json::to_string_pretty(value).map_err(|e| {
            eprintln!("cairnctl: cannot print the answer: {e}");
            ExitCode::FAILURE
        })?;
        println!("{text}");
    } else {
        print!("{}", words(value));
    }
    Ok(())
}

fn unexpected(r: Response) -> ExitCode {
    eprintln!("cairnctl: unexpected answer from cairnd: {r:?}");
    ExitCode::FAILURE
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn telemetry(config_path: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    match ask(
        config_path,
        socket,
        Command::Telemetry,
        Duration::from_secs(10),
    ) {
        Ok(Response::Telemetry(t)) => {
            show(&t, json, view::telemetry).map_or_else(|c| c, |()| ExitCode::SUCCESS)
        }
        Ok(other) => unexpected(other),
        Err(code) => code,
    }
}

fn update(
    config_path: Option<PathBuf>,
    socket: Option<PathBuf>,
    command: Command,
    json: bool,
    follow: bool,
) -> ExitCode {
    loop {
        let u = match ask(
            config_path.clone(),
            socket.clone(),
            command.clone(),
            Duration::from_secs(10),
        ) {
            Ok(Response::Update(u)) => u,
            Ok(other) => return unexpected(other),
            Err(code) => return code,
        };
        let writing = u.phase == cairn_proto::update::UpdatePhase::Writing;
        if follow && !json {
            // Clear the screen and redraw: a field tech watches one picture, not a scroll.
            print!("\x1b[H\x1b[2J");
        }
        if let Err(code) = show(&u, json, view::update) {
            return code;
        }
        if !(follow && writing) {
            let fell_back = u.last_outcome.as_ref().is_some_and(|o| !o.succeeded);
            return exit(u.last_error.is_none() && !fell_back);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn workloads(config_path: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    match ask(
        config_path,
        socket,
        Command::Workloads,
        Duration::from_secs(10),
    ) {
        Ok(Response::Workloads(w)) => {
            if let Err(code) = show(&w, json, view::workloads) {
                return code;
            }
            exit(!w.workloads.iter().any(|x| x.state == "failed"))
        }
        Ok(other) => unexpected(other),
        Err(code) => code,
    }
}

fn health(config_path: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    match ask(
        config_path,
        socket,
        Command::Health,
        Duration::from_secs(10),
    ) {
        Ok(Response::Health(report)) => {
            if let Err(code) = show(&report, json, view::health) {
                return code;
            }
            exit(
                !report
                    .components
                    .iter()
                    .any(|c| c.state == cairn_proto::control::HealthState::Failed),
            )
        }
        Ok(other) => unexpected(other),
        Err(code) => code,
    }
}

fn attest(config_path: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    // Enrolment runs several TPM commands and fleet round trips, each bounded by the fleet timeout.
    let waiting = Spinner::start("attesting to the fleet");
    let answer = ask(
        config_path,
        socket,
        Command::Attest,
        Duration::from_secs(120),
    );
    drop(waiting);
    match answer {
        Ok(Response::Attest(o)) => {
            if let Err(code) = show(&o, json, view::onboarding) {
                return code;
            }
            exit(o.state == "onboarded")
        }
        Ok(other) => unexpected(other),
        Err(code) => code,
    }
}

/// Asks the agent until it has probed what the gate needs or the gate's timeout passes, then judges.
fn gate(config_path: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let socket = socket.unwrap_or_else(|| config.agent.control_socket.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(config.gate.timeout_secs);
    let status = loop {
        let answer = match control::request(&socket, Command::Status, Duration::from_secs(10)) {
            Ok(Response::Status(s)) => Ok(*s),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(cairn_agent::error_chain(&e)),
        };
        let done = match &answer {
            Ok(s) => gate::settled(&config.gate, s),
            Err(_) => false,
        };
        if done || std::time::Instant::now() >= deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let verdict = gate::judge(
        &config.gate,
        &mountinfo,
        status.as_ref().map_err(Clone::clone),
    );
    if show(&verdict, json, gate::render).is_err() {
        return ExitCode::FAILURE;
    }
    exit(verdict.passed)
}

fn load_config(path: Option<PathBuf>) -> Result<config::Config, ExitCode> {
    config::load(&config::Sources::system(path))
        .map(|l| l.config)
        .map_err(|e| {
            eprintln!("cairnctl: {}", cairn_agent::error_chain(&e));
            ExitCode::from(config::EXIT_CONFIG as u8)
        })
}

fn status(config_path: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    match ask(
        config_path,
        socket,
        Command::Status,
        Duration::from_secs(10),
    ) {
        Ok(Response::Status(status)) => {
            show(status.as_ref(), json, view::render).map_or_else(|c| c, |()| ExitCode::SUCCESS)
        }
        Ok(other) => unexpected(other),
        Err(code) => code,
    }
}

fn quote(config_path: Option<PathBuf>, nonce: &str, pcrs: &str, out: &std::path::Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = (|| {
        let nonce = attestation::parse_nonce(nonce)?;
        let pcrs = attestation::parse_pcrs(pcrs)?;
        let tpm = cairn_tpm::Tpm::new(&config.tpm.tcti)?;
        let alg = config
            .ek_algorithm()
            .map_err(attestation::AttestationError::Config)?;
        attestation::quote_to_dir(&tpm, &config.agent.data_dir, alg, &nonce, &pcrs, out)
    })();
    match result {
        Ok(_) => {
            println!(
                "wrote quote.msg, quote.sig, quote.pcrs and ak.pub to {}",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cairnctl: {}", cairn_agent::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn overview(config_path: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    match ask(
        config_path,
        socket,
        Command::Overview,
        Duration::from_secs(10),
    ) {
        Ok(Response::Overview(o)) => {
            let words = |o: &cairn_proto::overview::Overview| {
                let screen = cairn_agent::console::Screen {
                    width: 100,
                    height: 0,
                    colour: false,
                };
                let mut t = cairn_agent::console::render(o, screen).join("\n");
                t.push('\n');
                t
            };
            if let Err(code) = show(o.as_ref(), json, words) {
                return code;
            }
            exit(o.verdict != cairn_proto::overview::Level::Fault)
        }
        Ok(other) => unexpected(other),
        Err(code) => code,
    }
}

/// A spinner with the seconds waited on stderr, for a request that may take a minute, when stderr is a
/// terminal; cleared when dropped.
struct Spinner {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start(what: &'static str) -> Spinner {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        let thread = tty.then(|| {
            let done = done.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                for frame in ['|', '/', '-', '\\'].iter().cycle() {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    eprint!("\r\x1b[K{frame} {what}… {} s", started.elapsed().as_secs());
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprint!("\r\x1b[K");
            })
        });
        Spinner { done, thread }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A progress bar on stderr when it is a terminal; silent otherwise, so scripts and logs get only the result.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        Progress {
            total,
            done: 0,
            tty,
        }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        if self.tty {
            let width = 30;
            let filled = width * self.done / self.total.max(1);
            eprint!(
                "\r\x1b[K[{}{}] {}/{} {what}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.done,
                self.total
            );
            if self.done == self.total {
                eprintln!();
            }
        }
    }
}

fn diagnose(
    config_path: Option<PathBuf>,
    socket: Option<PathBuf>,
    out: Option<PathBuf>,
    journal_lines: usize,
    json: bool,
) -> ExitCode {
    use cairn_agent::diagnose::{self as diag, Part};
    // A configuration that does not load is itself worth sending: the archive then says why.
    let loaded = config::load(&config::Sources::system(config_path));
    let (config, sources, config_error) = match loaded {
        Ok(l) => (l.config, l.sources, None),
        Err(e) => (
            config::Config::default(),
            Vec::new(),
            Some(cairn_agent::error_chain(&e)),
        ),
    };
    let socket = socket.unwrap_or_else(|| config.agent.control_socket.clone());
    let questions: [(&str, Command); 6] = [
        ("overview.json", Command::Overview),
        ("status.json", Command::Status),
        ("health.json", Command::Health),
        ("telemetry.json", Command::Telemetry),
        ("workloads.json", Command::Workloads),
        ("update.json", Command::UpdateStatus),
    ];
    // The agent's answers, then configuration, journal, data directory and versions.
    let mut progress = Progress::new(questions.len() + 4);
    let mut parts = Vec::new();
    let mut missing = Vec::new();
    let mut agent_version = None;
    let mut code = None;
    for (name, command) in questions {
        progress.step(name);
        match control::request(&socket, command, Duration::from_secs(10)) {
            Ok(answer) => {
                if let Response::Status(s) = &answer {
                    agent_version = Some(s.agent.version.clone());
                }
                if let Response::Overview(o) = &answer {
                    code.clone_from(&o.code);
                }
                let text = serde_json::to_string_pretty(&answer).unwrap_or_else(|e| e.to_string());
                parts.push(Part {
                    name: name.into(),
                    text: diag::scrub(&text),
                });
            }
            Err(e) => missing.push(format!("{name}: {}", cairn_agent::error_chain(&e))),
        }
    }
    progress.step("configuration");
    let mut cfg_text =
        String::from("# The effective configuration, secrets redacted. Applied, in order:\n");
    for s in &sources {
        cfg_text.push_str(&format!("#   {s}\n"));
    }
    if let Some(e) = &config_error {
        cfg_text.push_str(&format!(
            "# It does not load: {}\n# These are the built-in defaults.\n",
            diag::scrub(e)
        ));
    }
    cfg_text.push_str(&diag::redacted_config(&config));
    parts.push(Part {
        name: "config.toml".into(),
        text: cfg_text,
    });
    progress.step("journal");
    parts.push(Part {
        name: "journal.txt".into(),
        text: diag::journal(journal_lines),
    });
    progress.step("data directory");
    parts.push(Part {
        name: "data-dir.txt".into(),
        text: diag::data_dir_listing(&config.agent.data_dir),
    });
    progress.step("versions");
    parts.push(Part {
        name: "versions.txt".into(),
        text: diag::versions(agent_version.as_deref()),
    });
    let now = cairn_agent::status::now_unix();
    let stamp = cairn_agent::view::utc(now)
        .replace([' ', ':'], "")
        .replace('-', "");
    let base = format!(
        "cairn-diagnose-{}-{stamp}",
        code.as_deref().unwrap_or("unknown")
    );
    let mut manifest = format!(
        "cairn diagnostics, written {} UTC by cairnctl {}\nNo key material is included: identity/ is listed, never read, and every text is scrubbed.\n\nFiles:\n",
        cairn_agent::view::utc(now),
        env!("CARGO_PKG_VERSION")
    );
    for p in &parts {
        manifest.push_str(&format!("  {} ({} bytes)\n", p.name, p.text.len()));
    }
    if !missing.is_empty() {
        manifest.push_str("\nNot collected:\n");
        for m in &missing {
            manifest.push_str(&format!("  {m}\n"));
        }
    }
    parts.insert(
        0,
        Part {
            name: "MANIFEST.txt".into(),
            text: manifest,
        },
    );
    let target = out.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let path = if target.is_dir() {
        target.join(format!("{base}.tar.zst"))
    } else {
        target
    };
    if let Err(e) = diag::write_archive(&path, &base, &parts, now) {
        eprintln!("cairnctl: {}", cairn_agent::error_chain(&e));
        return ExitCode::FAILURE;
    }
    if json {
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        println!(
            "{}",
            serde_json::json!({"archive": path, "files": names, "not_collected": missing})
        );
    } else {
        println!("wrote {}", path.display());
        for m in &missing {
            eprintln!("cairnctl: not collected: {m}");
        }
    }
    ExitCode::SUCCESS
}
