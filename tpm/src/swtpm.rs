//! Starts and stops a software TPM for tests, the demo and the simulated site, through the scripts in
//! `tpm/scripts/` (so people debugging by hand use exactly what the tests use).

use std::path::{Path, PathBuf};
use std::process::Command;

const START: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swtpm-start");
const STOP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swtpm-stop");

#[derive(Debug, thiserror::Error)]
pub enum SwtpmError {
    #[error("could not run {script}")]
    Spawn {
        script: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("swtpm-start failed for {dir}: {stderr}")]
    Start { dir: PathBuf, stderr: String },
    #[error("swtpm-start printed no {key} line for {dir}")]
    Output { dir: PathBuf, key: &'static str },
}

/// A running swtpm. Stopped when dropped; its state directory stays, so a new one started on the same
/// directory is the same TPM.
#[derive(Debug)]
pub struct Swtpm {
    dir: PathBuf,
    pid: u32,
    tcti: String,
}

impl Swtpm {
    /// Starts a swtpm on `dir`, manufacturing it first if `dir` holds no TPM yet.
    pub fn start(dir: &Path) -> Result<Self, SwtpmError> {
        let out = Command::new(START)
            .arg(dir)
            .output()
            .map_err(|source| SwtpmError::Spawn {
                script: START,
                source,
            })?;
        if !out.status.success() {
            return Err(SwtpmError::Start {
                dir: dir.to_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |key: &'static str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
                .ok_or_else(|| SwtpmError::Output {
                    dir: dir.to_owned(),
                    key,
                })
        };
        let pid = value("SWTPM_PID")?
            .parse()
            .map_err(|_| SwtpmError::Output {
                dir: dir.to_owned(),
                key: "SWTPM_PID",
            })?;
        Ok(Swtpm {
            dir: dir.to_owned(),
            pid,
            tcti: value("TPM_TCTI")?,
        })
    }

    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Hands the process over to whoever will stop it with `swtpm-stop` (the simulated site does).
    pub fn detach(self) -> (u32, String) {
        let this = std::mem::ManuallyDrop::new(self);
        (this.pid, this.tcti.clone())
    }

    pub fn stop(dir: &Path) -> Result<(), SwtpmError> {
        let out = Command::new(STOP)
            .arg(dir)
            .output()
            .map_err(|source| SwtpmError::Spawn {
                script: STOP,
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(SwtpmError::Start {
                dir: dir.to_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        // Best effort: a test that fails should still not leave a TPM behind, and Drop cannot report.
        let _ = Swtpm::stop(&self.dir);
    }
}
