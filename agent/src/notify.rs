//! sd_notify: READY, STATUS, WATCHDOG and STOPPING to systemd. Outside systemd (no NOTIFY_SOCKET) every call
//! is a no-op.
//!
//! libsystemd's send blocks when systemd does not drain its socket (the queue holds ~10 datagrams), so the
//! sends happen on a thread of their own, fed through a small queue that drops on overflow: a stuck systemd
//! must never stall the agent's async runtime.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::OnceLock;
use std::time::Duration;
use systemd::daemon::{self, STATE_READY, STATE_STATUS, STATE_STOPPING, STATE_WATCHDOG};

enum Note {
    State(Vec<(&'static str, String)>),
    Flush(SyncSender<()>),
}

fn sender() -> Option<&'static SyncSender<Note>> {
    static TX: OnceLock<Option<SyncSender<Note>>> = OnceLock::new();
    TX.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET")?;
        let (tx, rx) = sync_channel(16);
        std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || deliver(rx))
            .ok()?;
        Some(tx)
    })
    .as_ref()
}

fn deliver(rx: Receiver<Note>) {
    for note in rx {
        match note {
            Note::State(state) => {
                if let Err(e) = daemon::notify(state.iter()) {
                    tracing::debug!(error = %e, "sd_notify failed");
                }
            }
            Note::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn send(state: &[(&'static str, &str)]) {
    if let Some(tx) = sender() {
        // Full queue: systemd is not reading; dropping a note is better than blocking.
        let _ = tx.try_send(Note::State(
            state.iter().map(|&(k, v)| (k, v.to_owned())).collect(),
        ));
    }
}

pub fn ready(status: &str) {
    send(&[(STATE_READY, "1"), (STATE_STATUS, status)]);
}

pub fn status(status: &str) {
    send(&[(STATE_STATUS, status)]);
}

pub fn watchdog() {
    send(&[(STATE_WATCHDOG, "1")]);
}

/// Says STOPPING and waits (at most `timeout`) until everything queued has been handed to systemd.
pub fn stopping(timeout: Duration) {
    send(&[(STATE_STOPPING, "1"), (STATE_STATUS, "stopping")]);
    if let Some(tx) = sender() {
        let (done_tx, done_rx) = sync_channel(1);
        if tx.try_send(Note::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(timeout);
        }
    }
}

/// Half the watchdog period systemd asked for (WatchdogSec=), or None when no watchdog is configured.
pub fn watchdog_interval() -> Option<Duration> {
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok()?;
    // WATCHDOG_PID names the process systemd watches; a child that inherited the variables must stay quiet.
    if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_the_period_and_only_for_the_watched_pid() {
        assert_eq!(
            interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("soon"), None, 7), None);
        assert_eq!(interval_from(None, None, 7), None);
    }
}
