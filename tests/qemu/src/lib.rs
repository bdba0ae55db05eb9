//! The qemu tier's harness: one [`Machine`] is one box (a disk, UEFI variables, a TPM that keeps its state
//! across boots); each [`Machine::boot`] starts a fresh qemu and swtpm, because resetting inside one qemu
//! process makes firmware-to-kernel time swing from seconds to a minute under TCG.
//!
//! The guest is observed the way a field tech or a fleet would: its serial console, and its disk read on the
//! host after it is off (boot entries on the ESP, the partition table, the LUKS header).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The ESP starts 1 MiB into the disk (image/build.sh).
const ESP_OFFSET: &str = "@@1M";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("could not run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed { program: String, stderr: String },
    #[error("{what} at {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the image {0} does not exist: build the images with `just test-qemu` (or `just image`)"
    )]
    NoImage(PathBuf),
    #[error("{waiting_for} did not happen within {secs} s; the serial log is {log}; its last lines:\n{tail}")]
    Timeout {
        waiting_for: String,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("QMP on {path}: {detail}")]
    Qmp { path: PathBuf, detail: String },
    #[error("unexpected output of {program}: {detail}")]
    Parse { program: String, detail: String },
}

type Result<T> = std::result::Result<T, QemuError>;

/// A test's error as the sentence it is (with its serial log tail), not as its Debug form: tests return
/// `Result<(), Failure>`.
pub struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where `just test-qemu` puts the images; `CAIRN_IMAGE_DIR` overrides it.
pub fn image_dir() -> PathBuf {
    std::env::var_os("CAIRN_IMAGE_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/image"),
        PathBuf::from,
    )
}

/// The disk image of one version, as `image/build.sh` names it.
pub fn image(version: &str) -> Result<PathBuf> {
    let path = image_dir().join(format!("cairn-{version}.img"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(QemuError::NoImage(path))
    }
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| QemuError::Spawn {
            program: program.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(QemuError::Failed {
            program: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> QemuError {
    let path = path.to_path_buf();
    move |source| QemuError::Io { what, path, source }
}

/// One box: its disk, its UEFI variable store and its TPM state, all under `dir`.
#[derive(Debug)]
pub struct Machine {
    dir: PathBuf,
    disk: PathBuf,
    boots: u32,
}

impl Machine {
    /// A new box whose disk is a copy of `image` (sparse, so a 4 GiB disk costs what is written).
    pub fn new(dir: &Path, image: &Path) -> Result<Machine> {
        let disk = dir.join("disk.img");
        run(
            "cp",
            &[
                "--sparse=always",
                &image.display().to_string(),
                &disk.display().to_string(),
            ],
        )?;
        let vars = dir.join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars).map_err(io("copying the UEFI variable store", &vars))?;
        let tpm = dir.join("tpm");
        std::fs::create_dir_all(&tpm).map_err(io("creating the TPM state directory", &tpm))?;
        Ok(Machine {
            dir: dir.to_path_buf(),
            disk,
            boots: 0,
        })
    }

    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// Powers the box on: a software TPM with this box's state, then qemu with its serial port in a file.
    pub fn boot(&mut self) -> Result<Boot> {
        self.boots += 1;
        let n = self.boots;
        let tpm_dir = self.dir.join("tpm");
        let tpm_sock = self.dir.join(format!("swtpm-{n}.sock"));
        let swtpm = Command::new("swtpm")
            .args(["socket", "--tpm2", "--terminate", "--tpmstate"])
            .arg(format!("dir={}", tpm_dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", tpm_sock.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                program: "swtpm".into(),
                source,
            })?;
        let swtpm = Reaped(swtpm);
        wait_until(Duration::from_secs(10), || tpm_sock.exists()).map_err(|_| {
            QemuError::Failed {
                program: "swtpm".into(),
                stderr: format!("its socket {} never appeared", tpm_sock.display()),
            }
        })?;

        let serial = self.dir.join(format!("serial-{n}.log"));
        let qmp = self.dir.join(format!("qmp-{n}.sock"));
        // The guest's port 80 (its local page) on a free loopback port of the host.
        let page_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|source| QemuError::Io {
                what: "cannot find a free port for the page forward",
                path: PathBuf::from("127.0.0.1:0"),
                source,
            })?;
        let vars = self.dir.join("OVMF_VARS.fd");
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024",
            ])
            .args(["-smp", &smp()])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-drive")
            .arg(format!("if=virtio,format=raw,file={}", self.disk.display()))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", tpm_sock.display()))
            .args([
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-crb,tpmdev=tpm0",
            ])
            .arg("-netdev")
            .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{page_port}-:80"))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                program: "qemu-system-x86_64".into(),
                source,
            })?;
        Ok(Boot {
            qemu: Reaped(qemu),
            _swtpm: swtpm,
            serial,
            qmp,
            started: Instant::now(),
            seen: 0,
            page_port,
        })
    }

    /// The boot entries on the ESP (`cairn-1.0.0-a+2-1.conf` and so on), read on the host; the box must be off.
    pub fn boot_entries(&self) -> Result<Vec<String>> {
        let image = format!("{}{ESP_OFFSET}", self.disk.display());
        let out = run("mdir", &["-b", "-i", &image, "::/loader/entries"])?;
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .filter(|n| n.ends_with(".conf"))
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }

    /// The partition table: (name, type GUID, start sector, size in sectors) per partition.
    pub fn partitions(&self) -> Result<Vec<Partition>> {
        let out = run("sfdisk", &["--json", &self.disk.display().to_string()])?;
        let parse = |detail: String| QemuError::Parse {
            program: "sfdisk --json".into(),
            detail,
        };
        let json: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| parse(e.to_string()))?;
        let parts = json["partitiontable"]["partitions"]
            .as_array()
            .ok_or_else(|| parse("no partitiontable.partitions".into()))?;
        parts
            .iter()
            .map(|p| {
                Ok(Partition {
                    name: p["name"].as_str().unwrap_or_default().to_string(),
                    type_guid: p["type"].as_str().unwrap_or_default().to_uppercase(),
                    start: p["start"]
                        .as_u64()
                        .ok_or_else(|| parse(format!("no start in {p}")))?,
                    sectors: p["size"]
                        .as_u64()
                        .ok_or_else(|| parse(format!("no size in {p}")))?,
                })
            })
            .collect()
    }

    /// The first `bytes` of a partition, read from the disk file.
    pub fn read_partition(&self, p: &Partition, bytes: usize) -> Result<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.disk).map_err(io("opening the disk", &self.disk))?;
        f.seek(SeekFrom::Start(p.start * 512))
            .map_err(io("seeking in the disk", &self.disk))?;
        let mut buf = vec![0; bytes.min((p.sectors * 512) as usize)];
        f.read_exact(&mut buf)
            .map_err(io("reading the disk", &self.disk))?;
        Ok(buf)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub type_guid: String,
    pub start: u64,
    pub sectors: u64,
}

/// A child process killed and reaped when dropped, so a failed test leaves no qemu or swtpm behind.
#[derive(Debug)]
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One power-on of a [`Machine`]: qemu runs until the guest powers off or reboots (`-no-reboot`).
#[derive(Debug)]
pub struct Boot {
    qemu: Reaped,
    _swtpm: Reaped,
    serial: PathBuf,
    qmp: PathBuf,
    started: Instant,
    /// How far into the serial log earlier waits have matched, so each wait looks only at what came after.
    seen: usize,
    /// The host port qemu forwards to the guest's port 80.
    page_port: u16,
}

impl Boot {
    /// One HTTP/1.1 request to the guest's port 80 through qemu's forward, retried until `timeout` while the
    /// guest does not answer yet; the whole response (status line, headers, body).
    pub fn http(&mut self, method: &str, path: &str, timeout: Duration) -> Result<String> {
        use std::io::{Read, Write};
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = (|| -> std::io::Result<String> {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", self.page_port))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                write!(
                    s,
                    "{method} {path} HTTP/1.1\r\nHost: box\r\nConnection: close\r\n\r\n"
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })();
            match attempt {
                // qemu accepts the forward itself and closes it when nothing in the guest listens.
                Ok(text) if text.starts_with("HTTP/1.1") => return Ok(text),
                _ if Instant::now() < deadline && !self.exited() => {
                    std::thread::sleep(Duration::from_secs(1));
                }
                Ok(_) | Err(_) => {
                    return Err(self.timeout(
                        format!("an HTTP answer to {method} {path} on the guest's port 80"),
                        timeout,
                    ));
                }
            }
        }
    }

    pub fn serial_log(&self) -> &Path {
        &self.serial
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The serial console so far, without terminal colour and cursor sequences.
    pub fn console(&self) -> String {
        let bytes = std::fs::read(&self.serial).unwrap_or_default();
        strip_escapes(&String::from_utf8_lossy(&bytes))
    }

    /// Waits until the serial console shows `needle` after what earlier waits matched; returns the line.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            if let Some(i) = text.get(self.seen..).and_then(|t| t.find(needle)) {
                let at = self.seen + i;
                let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
                let line_end = text[at..].find('\n').map_or(text.len(), |n| at + n);
                self.seen = line_end;
                return Ok(text[line_start..line_end].trim_end().to_string());
            }
            if Instant::now() >= deadline || self.exited() {
                return Err(self.timeout(format!("`{needle}` on the console"), timeout));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `needle` shows anywhere on the console, for lines whose order to the others is not fixed;
    /// returns the line and leaves where [`Boot::wait_for`] looks next alone.
    pub fn wait_anywhere(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.console().lines().find(|l| l.contains(needle)) {
                return Ok(line.trim_end().to_string());
            }
            if Instant::now() >= deadline || self.exited() {
                return Err(self.timeout(format!("`{needle}` on the console"), timeout));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn exited(&mut self) -> bool {
        matches!(self.qemu.0.try_wait(), Ok(Some(_)))
    }

    fn timeout(&self, waiting_for: String, timeout: Duration) -> QemuError {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        QemuError::Timeout {
            waiting_for,
            secs: timeout.as_secs(),
            log: self.serial.clone(),
            tail: lines[lines.len().saturating_sub(30)..].join("\n"),
        }
    }

    /// Waits for qemu to end by itself: the guest powered off or rebooted.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        wait_until(timeout, || self.exited())
            .map_err(|_| self.timeout("qemu exiting".into(), timeout))?;
        let mut stderr = String::new();
        if let Some(mut e) = self.qemu.0.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        match self.qemu.0.try_wait() {
            Ok(Some(status)) if status.success() => Ok(()),
            other => Err(QemuError::Failed {
                program: "qemu-system-x86_64".into(),
                stderr: format!("{other:?}: {}", stderr.trim()),
            }),
        }
    }

    /// Presses the power button (ACPI) and waits for the guest to shut down cleanly. A press before
    /// systemd-logind listens is lost (a CI run saw logind still starting after the gate passed), so the
    /// button is pressed again every 20 s until qemu exits or `timeout` runs out.
    pub fn power_off(mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.qmp("system_powerdown")?;
            let left = deadline.saturating_duration_since(Instant::now());
            if wait_until(left.min(Duration::from_secs(20)), || self.exited()).is_ok() {
                return self.wait_exit(Duration::ZERO);
            }
            if left <= Duration::from_secs(20) {
                let logind = self.console().contains("Started systemd-logind.service");
                return Err(self.timeout(
                    format!(
                        "qemu exiting after the power button (pressed every 20 s; systemd-logind, which \
                         handles it, {} started)",
                        if logind { "had" } else { "had not" }
                    ),
                    timeout,
                ));
            }
        }
    }

    /// Sends one QMP command and waits for its answer.
    fn qmp(&self, cmd: &str) -> Result<()> {
        let qmp_err = |detail: String| QemuError::Qmp {
            path: self.qmp.clone(),
            detail,
        };
        let stream = UnixStream::connect(&self.qmp).map_err(|e| qmp_err(e.to_string()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| qmp_err(e.to_string()))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| qmp_err(e.to_string()))?);
        let mut writer = stream;
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| qmp_err(format!("no greeting: {e}")))?;
        for cmd in ["qmp_capabilities", cmd] {
            writeln!(writer, "{{\"execute\":\"{cmd}\"}}").map_err(|e| qmp_err(e.to_string()))?;
            loop {
                line.clear();
                reader
                    .read_line(&mut line)
                    .map_err(|e| qmp_err(format!("{cmd}: {e}")))?;
                if line.contains("\"return\"") {
                    break;
                }
                if line.contains("\"error\"") || line.is_empty() {
                    return Err(qmp_err(format!("{cmd} answered {}", line.trim())));
                }
            }
        }
        Ok(())
    }

    /// Pulls the plug: qemu is killed with no warning to the guest.
    pub fn kill(mut self) {
        let _ = self.qemu.0.kill();
        let _ = self.qemu.0.wait();
    }
}

/// Drops CSI sequences (`ESC [ … final byte`), which systemd's status lines are full of.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> std::result::Result<(), ()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// vCPUs per guest: `CAIRN_QEMU_SMP`, else 2 (1 made a boot ~40% slower under TCG and still saw the stall).
fn smp() -> String {
    std::env::var("CAIRN_QEMU_SMP").unwrap_or_else(|_| "2".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_and_cursor_sequences_are_stripped() {
        let line = "\u{1b}[0;32m  OK  \u{1b}[0m] Finished \u{1b}[0;1;39msystemd-repart.service\u{1b}[0m.\u{1b}[K";
        assert_eq!(
            strip_escapes(line),
            "  OK  ] Finished systemd-repart.service."
        );
    }
}
