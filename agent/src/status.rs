//! The agent's current picture of itself and the site, written by the pollers and read by the control socket
//! and `/metrics`. One writer per component; readers get a consistent clone.

use cairn_proto::control::{AgentStatus, ComponentStatus, Status};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct StatusBoard {
    inner: Arc<RwLock<Status>>,
    started: Instant,
}

impl StatusBoard {
    pub fn new(agent: AgentStatus, onboarding: cairn_proto::control::OnboardingStatus) -> Self {
        let status = Status {
            agent,
            onboarding,
            tpm: ComponentStatus::Unknown,
            gpus: ComponentStatus::Unknown,
            sensors: ComponentStatus::Unknown,
            fleet: ComponentStatus::Unknown,
            health: Vec::new(),
        };
        StatusBoard {
            inner: Arc::new(RwLock::new(status)),
            started: Instant::now(),
        }
    }

    pub fn snapshot(&self) -> Status {
        // A writer that panicked mid-update leaves at worst one stale component; still worth showing.
        let mut s = self.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
        s.agent.uptime_secs = self.started.elapsed().as_secs();
        s
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.inner.write().unwrap_or_else(|p| p.into_inner()));
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A component's status from a check's result.
pub fn component<T>(result: Result<T, String>) -> ComponentStatus<T> {
    let checked_unix = now_unix();
    match result {
        Ok(facts) => ComponentStatus::Ok {
            facts,
            checked_unix,
        },
        Err(reason) => ComponentStatus::Unavailable {
            reason,
            checked_unix,
        },
    }
}
