//! The library's process-wide state: the current configuration (re-read when its file changes), init count,
//! event sets and how many of each GPU's XIDs have been delivered.

use crate::config::{FakeConfig, GpuModel};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Instant, SystemTime};

pub struct State {
    pub config: FakeConfig,
    source: Option<(PathBuf, Option<SystemTime>)>,
    /// Set when the file could not be read or parsed; init then fails and the reason goes to stderr once.
    pub config_error: Option<String>,
    pub init_count: u32,
    pub loaded_at: Instant,
    pub next_set: usize,
    /// Per event set: the registered (gpu index, event mask) pairs.
    pub sets: HashMap<usize, EventSet>,
    /// Per GPU: how many of the XIDs listed in the file have been delivered (to any event set). Each XID happens
    /// once, so a set created later does not see it again.
    pub xids_delivered: HashMap<usize, usize>,
}

#[derive(Default)]
pub struct EventSet {
    pub registered: Vec<(usize, u64)>,
}

impl State {
    fn new() -> Self {
        let source = std::env::var_os("FAKE_NVML_CONFIG").map(|p| (PathBuf::from(p), None));
        let mut s = State {
            config: FakeConfig::default(),
            source,
            config_error: None,
            init_count: 0,
            loaded_at: Instant::now(),
            next_set: 1,
            sets: HashMap::new(),
            xids_delivered: HashMap::new(),
        };
        s.refresh();
        s
    }

    /// Re-reads the configuration file if its modification time changed.
    pub fn refresh(&mut self) {
        let Some((path, seen)) = &mut self.source else {
            return;
        };
        let mtime = std::fs::metadata(&*path).and_then(|m| m.modified()).ok();
        if mtime.is_some() && mtime == *seen {
            return;
        }
        *seen = mtime;
        match std::fs::read_to_string(&*path)
            .map_err(|e| e.to_string())
            .and_then(|t| FakeConfig::parse(&t).map_err(|e| e.to_string()))
        {
            Ok(c) => {
                self.forget_replaced_xids(&c);
                self.config = c;
                self.config_error = None;
            }
            Err(e) => {
                let msg = format!("fake NVML: cannot use {}: {e}", path.display());
                if self.config_error.as_deref() != Some(&msg) {
                    eprintln!("{msg}");
                }
                self.config_error = Some(msg);
            }
        }
    }

    /// A GPU's XID list that no longer starts with what was delivered from it was replaced, not extended: all of
    /// its entries are new XIDs.
    fn forget_replaced_xids(&mut self, next: &FakeConfig) {
        let current = &self.config;
        self.xids_delivered.retain(|&index, delivered| {
            let old = current
                .fault(index)
                .map(|f| f.xid.as_slice())
                .unwrap_or_default();
            let new = next
                .fault(index)
                .map(|f| f.xid.as_slice())
                .unwrap_or_default();
            new.starts_with(&old[..(*delivered).min(old.len())])
        });
    }

    pub fn gpus(&self) -> Vec<GpuModel> {
        self.config.profile.gpus()
    }
}

pub fn lock() -> MutexGuard<'static, State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    let m = STATE.get_or_init(|| Mutex::new(State::new()));
    // A panic while holding the lock cannot leave State inconsistent in a way that matters to a simulator.
    let mut guard = m.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    guard.refresh();
    guard
}
