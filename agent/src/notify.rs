//! sd_notify: READY, STATUS and WATCHDOG to systemd. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::time::Duration;
use systemd::daemon::{self, STATE_READY, STATE_STATUS, STATE_STOPPING, STATE_WATCHDOG};

fn send(state: &[(&str, &str)]) {
    if let Err(e) = daemon::notify(state.iter()) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[(STATE_READY, "1"), (STATE_STATUS, status)]);
}

pub fn status(status: &str) {
    send(&[(STATE_STATUS, status)]);
}

pub fn stopping() {
    send(&[(STATE_STOPPING, "1"), (STATE_STATUS, "stopping")]);
}

pub fn watchdog() {
    send(&[(STATE_WATCHDOG, "1")]);
}

/// Half the watchdog period systemd asked for (WatchdogSec=), or None when no watchdog is configured.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
