//! OTA updates: check the TUF channel, write the inactive slot, reboot in the window, learn the outcome.
//!
//! The state machine (docs/image.md): `idle` → `writing` (resumable: the status is on disk and every
//! written chunk is found again by its hash) → `staged` (the slot is checked and its boot entry, written
//! last, has `boot_tries` tries) → reboot in the window → `trying` → the health gate blesses the entry
//! (success) or the tries run out and systemd-boot boots the old slot (failure: the version is never
//! offered again). Either outcome is an `update` event to the fleet.

pub mod channel;
pub mod slots;
pub mod writer;

use crate::config::{UpdateConfig, Window};
use crate::status::now_unix;
use crate::telemetry::{agent_event, Sink};
use cairn_proto::control::Severity;
use cairn_proto::update::{ImageVersion, Release, UpdateOutcome, UpdatePhase, UpdateStatus};
use slots::{BootSlots, EntryState, Slot};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const COMPONENT: &str = "update";

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this system is not a cairn A/B image ({what})")]
    NotAnImage { what: String },
    #[error("{path} holds {size} bytes; the update needs {needed}")]
    TooSmall {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error("chunk {index} of {piece} is wrong: {reason}")]
    Chunk {
        piece: String,
        index: usize,
        reason: String,
    },
    #[error("{piece} read back from {path} does not match the release: the slot is not used")]
    Verify { piece: String, path: PathBuf },
    #[error("the update channel: {0}")]
    Channel(String),
    #[error("release {version} in the update channel is not usable: {reason}")]
    Release {
        version: ImageVersion,
        reason: String,
    },
    #[error("no update channel: {path} (the repository's root.json) is missing; build the image with --update-root")]
    NoRoot { path: PathBuf },
    #[error("the fleet's address is not known yet (not configured, not discovered)")]
    NoFleet,
}

/// Restarts the machine into its next boot entry.
pub trait Reboot: Send + Sync {
    fn reboot(&self) -> Result<(), String>;
}

/// `systemctl reboot`: systemd stops the workloads and the agent in order before the machine restarts.
#[derive(Debug)]
pub struct SystemdReboot;

impl Reboot for SystemdReboot {
    fn reboot(&self) -> Result<(), String> {
        let out = std::process::Command::new("systemctl")
            .args(["--no-block", "reboot"])
            .output()
            .map_err(|e| format!("cannot run systemctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "systemctl reboot failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// The shared, persisted status.
#[derive(Clone)]
pub struct StatusHandle(Arc<Mutex<UpdateStatus>>);

impl std::fmt::Debug for StatusHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StatusHandle").finish_non_exhaustive()
    }
}

impl Default for StatusHandle {
    fn default() -> Self {
        StatusHandle(Arc::new(Mutex::new(UpdateStatus::default())))
    }
}

impl StatusHandle {
    pub fn snapshot(&self) -> UpdateStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut UpdateStatus)) -> UpdateStatus {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.clone()
    }
}

/// What one check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Nothing newer for this device (or only versions it refuses).
    UpToDate,
    /// Written and staged; `rebooted` when the reboot was started.
    Staged {
        version: ImageVersion,
        rebooted: bool,
    },
}

pub struct Updater {
    cfg: UpdateConfig,
    window: Option<Window>,
    state_file: PathBuf,
    datastore: PathBuf,
    slots: Arc<dyn BootSlots>,
    reboot: Arc<dyn Reboot>,
    events: Arc<dyn Sink>,
    status: StatusHandle,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

impl Updater {
    /// Loads the persisted status (a damaged file is reported and started afresh: the slot contents are
    /// found again by hash, so only the record of failed versions is lost).
    pub fn new(
        cfg: &UpdateConfig,
        data_dir: &Path,
        slots: Arc<dyn BootSlots>,
        reboot: Arc<dyn Reboot>,
        events: Arc<dyn Sink>,
        status: StatusHandle,
    ) -> Updater {
        let dir = data_dir.join("update");
        let state_file = dir.join("status.json");
        let saved = match std::fs::read(&state_file) {
            Ok(bytes) => match serde_json::from_slice::<UpdateStatus>(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(file = %state_file.display(), error = %e, "the update status is damaged; starting afresh");
                    UpdateStatus::default()
                }
            },
            Err(_) => UpdateStatus::default(),
        };
        status.update(|s| *s = saved);
        Updater {
            window: Window::parse(&cfg.window).ok().flatten(),
            cfg: cfg.clone(),
            state_file,
            datastore: dir.join("tuf"),
            slots,
            reboot,
            events,
            status,
        }
    }

    pub fn status(&self) -> UpdateStatus {
        self.status.snapshot()
    }

    fn save(&self, s: &UpdateStatus) {
        save_status(&self.state_file, s);
    }

    fn set(&self, f: impl FnOnce(&mut UpdateStatus)) {
        let s = self.status.update(f);
        self.save(&s);
    }

    fn outcome(&self, version: ImageVersion, succeeded: bool, message: String) {
        let severity = if succeeded {
            Severity::Info
        } else {
            Severity::Critical
        };
        // A failure is a warning, which journald also forwards to the console (the image's journald.conf).
        if succeeded {
            tracing::info!(%version, "{message}");
        } else {
            tracing::warn!(%version, "{message}");
        }
        self.events
            .event(agent_event(COMPONENT, "update", severity, message.clone()));
        self.set(|s| {
            if !succeeded && !s.failed.contains(&version) {
                s.failed.push(version);
            }
            s.phase = UpdatePhase::Idle;
            s.last_outcome = Some(UpdateOutcome {
                version,
                succeeded,
                message,
                at_unix: now_unix(),
            });
        });
    }

    /// Reads what this boot is and settles a trial: blessed → success; booted elsewhere with the trial's
    /// tries gone (or its entry gone) → failure.
    pub fn settle(&self) -> Result<(), UpdateError> {
        let (running, slot) = self.slots.running()?;
        self.status.update(|s| {
            s.running = Some(running);
            s.slot = slot.name().into();
        });
        let s = self.status.snapshot();
        let (Some(target), Some(target_slot)) =
            (s.target, s.target_slot.as_deref().and_then(Slot::parse))
        else {
            return Ok(());
        };
        if !matches!(s.phase, UpdatePhase::Staged | UpdatePhase::Trying) {
            return Ok(());
        }
        let entry = self.slots.entry_state(&target, target_slot)?;
        if running == target && slot == target_slot {
            if entry == EntryState::Blessed {
                self.outcome(
                    target,
                    true,
                    format!(
                        "updated to {target} in slot {}: the health gate passed",
                        slot.name()
                    ),
                );
            } else if s.phase != UpdatePhase::Trying {
                self.set(|s| s.phase = UpdatePhase::Trying);
            }
            return Ok(());
        }
        // Tries used up means systemd-boot tried it, even when the trial never got as far as its agent (a
        // kernel that panics, a root that does not mount), so the phase may still say staged.
        let tried_out = match entry {
            EntryState::Trying { left: 0, .. } => true,
            EntryState::Missing => s.phase == UpdatePhase::Trying,
            _ => false,
        };
        match entry {
            _ if tried_out => {
                let done = match entry {
                    EntryState::Trying { done, .. } => format!(" after {done} tries"),
                    _ => String::new(),
                };
                // The failed slot's entry goes, so it is never chosen by hand either.
                let _ = self.slots.clear(target_slot, None);
                self.outcome(
                    target,
                    false,
                    format!(
                        "update to {target} failed: its boots did not pass the health gate{done}, and the box fell back to {running} in slot {}",
                        slot.name()
                    ),
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// One check: the channel's releases against this device's policy; writes and stages a newer one, and
    /// reboots into it when allowed.
    pub async fn check(&self, source: &channel::Source) -> Result<Checked, UpdateError> {
        self.settle()?;
        self.set(|s| s.last_check_unix = Some(now_unix()));
        if !self.cfg.root_file.exists() {
            return Err(UpdateError::NoRoot {
                path: self.cfg.root_file.clone(),
            });
        }
        let status = self.status.snapshot();
        if status.phase == UpdatePhase::Trying {
            // A trial boot is being judged: nothing new until it is settled.
            return Ok(Checked::UpToDate);
        }
        let (running, slot) = self.slots.running()?;
        let channel =
            Arc::new(channel::Channel::open(&self.cfg.root_file, source, &self.datastore).await?);
        let mut chosen = None;
        for v in channel.versions() {
            if v == running || status.failed.contains(&v) {
                continue;
            }
            let release = channel.release(&v).await?;
            if release.max_wave < self.cfg.wave {
                continue;
            }
            if v > running || release.allow_downgrade {
                chosen = Some(release);
                break;
            }
        }
        let Some(release) = chosen else {
            self.set(|s| s.last_error = None);
            return Ok(Checked::UpToDate);
        };
        let version = release.version;
        let target_slot = slot.other();
        let already = status.phase == UpdatePhase::Staged
            && status.target == Some(version)
            && matches!(self.slots.entry_state(&version, target_slot)?, EntryState::Trying { left, .. } if left > 0);
        if !already {
            let running_release = if channel.versions().contains(&running) {
                channel.release(&running).await.ok()
            } else {
                None
            };
            self.write(channel, release, running_release, slot).await?;
        }
        self.set(|s| s.last_error = None);
        Ok(Checked::Staged {
            version,
            rebooted: self.maybe_reboot(version),
        })
    }

    async fn write(
        &self,
        channel: Arc<channel::Channel>,
        release: Release,
        running: Option<Release>,
        slot: Slot,
    ) -> Result<(), UpdateError> {
        let target_slot = slot.other();
        let version = release.version;
        let total: u64 = release
            .pieces()
            .iter()
            .map(|(_, p)| p.chunks.len() as u64)
            .sum();
        self.set(|s| {
            if s.target != Some(version) || s.phase != UpdatePhase::Writing {
                s.chunks_local = 0;
                s.chunks_fetched = 0;
                s.bytes_fetched = 0;
            }
            s.phase = UpdatePhase::Writing;
            s.target = Some(version);
            s.target_slot = Some(target_slot.name().into());
            s.chunks_total = total;
            s.chunks_done = 0;
        });
        tracing::info!(%version, slot = target_slot.name(), "writing the update");
        // The slot is made unbootable before a byte of it changes.
        self.slots.clear(target_slot, Some(&version))?;
        let slots = self.slots.clone();
        let status = self.status.clone();
        let state_file = self.state_file.clone();
        let runtime = tokio::runtime::Handle::current();
        let tries = self.cfg.boot_tries;

        let result = tokio::task::spawn_blocking(move || -> Result<(), UpdateError> {
            let source = channel::Blocking { channel, runtime };
            let kernels = slots.kernel_dir(&version, target_slot);
            std::fs::create_dir_all(&kernels).map_err(|e| UpdateError::Io {
                path: kernels.clone(),
                source: e,
            })?;
            let (run_v, _) = slots.running()?;
            let active_kernels = slots.kernel_dir(&run_v, slot);
            let mut local = writer::LocalChunks::default();
            let pieces = [
                (
                    "root",
                    &release.root,
                    slots.root_device(target_slot),
                    slots.root_device(slot),
                    running.as_ref().map(|r| &r.root),
                ),
                (
                    "verity",
                    &release.verity,
                    slots.verity_device(target_slot),
                    slots.verity_device(slot),
                    running.as_ref().map(|r| &r.verity),
                ),
                (
                    "vmlinuz",
                    &release.vmlinuz,
                    kernels.join("vmlinuz"),
                    active_kernels.join("vmlinuz"),
                    running.as_ref().map(|r| &r.vmlinuz),
                ),
                (
                    "initrd",
                    &release.initrd,
                    kernels.join("initrd"),
                    active_kernels.join("initrd"),
                    running.as_ref().map(|r| &r.initrd),
                ),
            ];
            for (_, piece, _, active, listed) in &pieces {
                match listed {
                    Some(l) => local.add_listed(active, &l.chunks),
                    None => local.add_hashed(active, piece.bytes),
                }
            }
            let mut before = 0;
            for (name, piece, dest, _, _) in &pieces {
                let base = before;
                let mut last = writer::Progress::default();
                let mut report = |p: writer::Progress| {
                    let s = status.update(|s| {
                        s.chunks_done = base + p.done();
                        s.chunks_local += p.local - last.local;
                        s.chunks_fetched += p.fetched - last.fetched;
                        s.bytes_fetched += p.bytes_fetched - last.bytes_fetched;
                    });
                    last = p;
                    save_status(&state_file, &s);
                };
                writer::write_piece(name, piece, dest, &local, &source, &mut report)?;
                before += piece.chunks.len() as u64;
            }
            // Last: the entry that makes the slot bootable.
            slots.add_entry(&release, target_slot, tries)?;
            Ok(())
        })
        .await
        .map_err(|e| UpdateError::Channel(format!("the writer task failed: {e}")))?;
        if let Err(e) = result {
            self.set(|s| s.last_error = Some(crate::error_chain(&e)));
            return Err(e);
        }
        self.set(|s| s.phase = UpdatePhase::Staged);
        self.events.event(agent_event(
            COMPONENT,
            "update",
            Severity::Info,
            format!(
                "update {version} written to slot {} and checked; it boots next",
                target_slot.name()
            ),
        ));
        Ok(())
    }

    /// Reboots into a staged update if this device reboots by itself and the window is open.
    pub fn maybe_reboot(&self, version: ImageVersion) -> bool {
        if !self.cfg.reboot || !self.window.is_none_or(|w| w.contains(now_unix())) {
            return false;
        }
        self.set(|s| s.phase = UpdatePhase::Trying);
        tracing::info!(%version, "rebooting into the update");
        match self.reboot.reboot() {
            Ok(()) => true,
            Err(e) => {
                self.set(|s| {
                    s.phase = UpdatePhase::Staged;
                    s.last_error = Some(e);
                });
                false
            }
        }
    }
}

/// Writes the status atomically (temp file, fsync, rename): a power cut leaves the old one or the new one.
fn save_status(path: &Path, s: &UpdateStatus) {
    let result = serde_json::to_vec_pretty(s)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            cairn_proto::atomic_file::write(path, &bytes, 0o644)
        });
    if let Err(e) = result {
        tracing::warn!(file = %path.display(), error = %e, "cannot save the update status");
    }
}

/// After `failures` failed checks in a row: 30 s doubling, jittered, never later than the schedule. A fleet
/// that was briefly unreachable must not delay an update by a whole check interval.
fn retry_after(failures: u32, every: Duration) -> Duration {
    let every = every.as_secs().max(1);
    Duration::from_secs(crate::onboarding::backoff(
        failures.saturating_sub(1),
        30.min(every),
        every,
        crate::onboarding::jitter_unit(),
    ))
}

/// The daemon's loop: settle the boot, check on a schedule or when asked, until shutdown.
pub async fn run(
    updater: Arc<Updater>,
    source: impl Fn() -> Result<channel::Source, UpdateError> + Send + 'static,
    mut asked: tokio::sync::mpsc::Receiver<()>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    check_every: Duration,
    look_every: Duration,
) {
    // Early, so a trial boot's outcome reaches the fleet soon after the gate blesses (or not).
    let mut next = Duration::from_secs(20);
    let mut failures = 0u32;
    // What the fleet had signed at the last check: between checks, every `look_every` the agent fetches only
    // the timestamp (~1 KB), and a changed one is the fleet asking for a check now (a publish, a wider wave).
    let mut seen: Option<[u8; 32]> = None;
    loop {
        let due = tokio::time::Instant::now() + next;
        loop {
            let look = tokio::time::Instant::now() + look_every;
            tokio::select! {
                _ = tokio::time::sleep_until(due.min(look)) => {}
                Some(()) = asked.recv() => break,
                _ = shutdown.changed() => return,
            }
            if tokio::time::Instant::now() >= due {
                break;
            }
            if let (Some(before), Ok(src)) = (seen, source()) {
                if src
                    .timestamp_digest()
                    .await
                    .is_some_and(|now| now != before)
                {
                    tracing::info!("the fleet signed a new update channel state; checking now");
                    break;
                }
            }
        }
        let result = match source() {
            Ok(src) => {
                seen = src.timestamp_digest().await;
                updater.check(&src).await
            }
            Err(e) => updater.settle().and(Err(e)),
        };
        match result {
            Ok(c) => {
                failures = 0;
                tracing::debug!(?c, "update check");
            }
            Err(e) => {
                failures += 1;
                let msg = crate::error_chain(&e);
                // The message carries the cause: journald forwards warnings to the console, which shows only the message.
                tracing::warn!(error = %msg, "update check failed: {msg}");
                updater.set(|s| s.last_error = Some(msg));
            }
        }
        next = if updater.status().phase == UpdatePhase::Trying {
            Duration::from_secs(15)
        } else if failures > 0 {
            retry_after(failures, check_every)
        } else {
            check_every
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_is_retried_soon_then_less_often_and_never_later_than_the_schedule() {
        let every = Duration::from_secs(4 * 3600);
        let first = retry_after(1, every).as_secs();
        assert!((24..=36).contains(&first), "{first}");
        let fifth = retry_after(5, every).as_secs();
        assert!((384..=576).contains(&fifth), "{fifth}");
        let late = retry_after(40, every);
        assert!(late <= every && late >= every * 8 / 10, "{late:?}");
        let short = Duration::from_secs(10);
        assert!(retry_after(1, short) <= short);
    }
}
