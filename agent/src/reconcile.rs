//! Makes systemd run exactly the desired workload set: starts what is missing, replaces a unit whose recipe
//! changed, removes what the set dropped, runs the health checks and restarts by policy, and reports each
//! workload's state. Driven by systemd's change signals, a new set, health results and a one-second clock
//! for its own timers; a slow full resync only guards against a lost signal.
//!
//! A unit carries its recipe's name, version and digest in its Environment, so an agent that restarts
//! adopts the units it finds running at the desired digest instead of restarting them.

use crate::desired::{Desired, Store};
use crate::systemd::{Systemd, UnitState};
use crate::telemetry::Sink;
use crate::workload_unit::{self, GpuDevice, ENV_DIGEST, ENV_VERSION, ENV_WORKLOAD};
use cairn_proto::control::{Event, Severity, WorkloadStatus, WorkloadsReport};
use cairn_proto::workload_set::VerifiedRecipe;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Event kind for workload state changes.
pub const EVENT_KIND: &str = "workload";
/// Journal lines kept with a failure.
pub const JOURNAL_LINES: usize = 20;
/// Ports a unit's recipe declares, so a replacement knows whether old and new can run side by side.
const ENV_PORTS: &str = "CAIRN_PORTS";

/// Whatever the reconciler needs to know about the rest of the agent.
pub struct Inputs {
    pub store: Arc<Store>,
    pub gpus: Vec<GpuDevice>,
    /// Whether the fleet trusts the site now (for `requires_attestation`).
    pub attested: Box<dyn Fn() -> bool + Send + Sync>,
    pub events: Arc<dyn Sink>,
    pub report: Arc<Mutex<WorkloadsReport>>,
    /// How long a unit must stay `failed` before it counts as failed (systemd may be about to restart it).
    pub failed_grace: Duration,
    pub resync: Duration,
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs").field("gpus", &self.gpus).finish()
    }
}

#[derive(Debug, Default)]
struct Runtime {
    state: String,
    reason: String,
    journal: Vec<String>,
    /// This digest failed for good: left alone until a new set changes it.
    failed_digest: Option<String>,
    failed_since: Option<(String, Instant)>,
    retry_at: Option<Instant>,
    health: HealthTrack,
    agent_restarts: Vec<Instant>,
    /// systemd counts the restart it then refused for the start limit; this many really happened.
    restart_cap: Option<u32>,
    stop_requested: BTreeSet<String>,
    reported: String,
}

#[derive(Debug, Default)]
struct HealthTrack {
    /// The unit the results are about; a new unit starts over.
    unit: String,
    ok: Option<bool>,
    consecutive: u32,
    last_error: String,
    next_due: Option<Instant>,
    in_flight: bool,
}

struct HealthResult {
    workload: String,
    unit: String,
    outcome: Result<(), String>,
}

#[derive(Debug)]
pub struct Reconciler<S: Systemd> {
    sd: Arc<S>,
    inputs: Inputs,
    desired: Option<Desired>,
    units: BTreeMap<String, UnitState>,
    rt: BTreeMap<String, Runtime>,
    health_tx: mpsc::Sender<HealthResultBox>,
    health_rx: mpsc::Receiver<HealthResultBox>,
}

type HealthResultBox = Box<HealthResult>;

impl std::fmt::Debug for HealthResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthResult")
            .field("workload", &self.workload)
            .field("unit", &self.unit)
            .finish()
    }
}

fn workload_name(u: &UnitState) -> Option<String> {
    u.env(ENV_WORKLOAD)
        .map(str::to_owned)
        .or_else(|| workload_unit::workload_of(&u.unit).map(str::to_owned))
}

fn ports_env(r: &VerifiedRecipe) -> String {
    let p: Vec<String> = r
        .recipe
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol))
        .collect();
    format!("{ENV_PORTS}={}", p.join(","))
}

fn unit_ports(u: &UnitState) -> BTreeSet<String> {
    u.env(ENV_PORTS)
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn is_up(u: &UnitState) -> bool {
    matches!(
        u.active_state.as_str(),
        "active" | "activating" | "reloading"
    )
}

impl<S: Systemd> Reconciler<S> {
    pub fn new(sd: Arc<S>, inputs: Inputs) -> Self {
        let (health_tx, health_rx) = mpsc::channel(256);
        Reconciler {
            sd,
            inputs,
            desired: None,
            units: BTreeMap::new(),
            rt: BTreeMap::new(),
            health_tx,
            health_rx,
        }
    }

    /// Runs until `shutdown`; units keep running after it (the next agent adopts them).
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Desired>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut changes = match self.sd.changes().await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "no systemd change signals; relying on resync");
                mpsc::channel(1).1
            }
        };
        self.desired = desired.borrow().clone();
        self.resync().await;
        let mut clock = tokio::time::interval(Duration::from_secs(1));
        let mut resync = tokio::time::interval(self.inputs.resync);
        resync.tick().await;
        loop {
            self.step().await;
            self.publish();
            tokio::select! {
                _ = shutdown.changed() => return,
                r = desired.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.desired = desired.borrow().clone();
                }
                Some(unit) = changes.recv() => {
                    let mut seen = BTreeSet::from([unit]);
                    while let Ok(u) = changes.try_recv() {
                        seen.insert(u);
                    }
                    for u in seen {
                        self.refresh(&u).await;
                    }
                }
                Some(r) = self.health_rx.recv() => self.health_result(*r).await,
                _ = clock.tick() => {}
                _ = resync.tick() => self.resync().await,
            }
        }
    }

    async fn resync(&mut self) {
        match self.sd.list().await {
            Ok(list) => self.units = list.into_iter().map(|u| (u.unit.clone(), u)).collect(),
            Err(e) => tracing::warn!(error = %crate::error_chain(&e), "cannot list workload units"),
        }
    }

    async fn refresh(&mut self, unit: &str) {
        match self.sd.state(unit).await {
            Ok(Some(s)) => {
                self.units.insert(unit.to_owned(), s);
            }
            Ok(None) => {
                self.units.remove(unit);
            }
            Err(e) => {
                tracing::warn!(unit, error = %crate::error_chain(&e), "cannot read unit state")
            }
        }
    }

    /// The units of each workload, by workload name.
    fn by_workload(&self) -> BTreeMap<String, Vec<UnitState>> {
        let mut out: BTreeMap<String, Vec<UnitState>> = BTreeMap::new();
        for u in self.units.values() {
            if let Some(w) = workload_name(u) {
                out.entry(w).or_default().push(u.clone());
            }
        }
        out
    }

    /// GPUs for each desired workload, in start order; a workload that cannot get its GPUs gets the reason.
    fn assign_gpus(
        &self,
        recipes: &[VerifiedRecipe],
    ) -> BTreeMap<String, Result<Vec<GpuDevice>, String>> {
        let mut free: Vec<GpuDevice> = self.inputs.gpus.clone();
        let mut out = BTreeMap::new();
        for r in recipes {
            let g = &r.recipe.gpus;
            let got = if !g.uuids.is_empty() {
                let mut mine = Vec::new();
                let mut missing = Vec::new();
                for u in &g.uuids {
                    match free.iter().position(|f| f.uuid == *u) {
                        Some(i) => mine.push(free.remove(i)),
                        None => missing.push(u.as_str()),
                    }
                }
                if missing.is_empty() {
                    Ok(mine)
                } else {
                    free.extend(mine);
                    Err(format!(
                        "waiting for GPU {}: not on this site or given to another workload",
                        missing.join(", ")
                    ))
                }
            } else if g.count as usize > free.len() {
                Err(format!(
                    "waiting for {} GPU(s): {} free on this site",
                    g.count,
                    free.len()
                ))
            } else {
                Ok(free.drain(..g.count as usize).collect())
            };
            out.insert(r.recipe.name.clone(), got);
        }
        out
    }

    async fn step(&mut self) {
        let Some(desired) = self.desired.clone() else {
            return;
        };
        let now = Instant::now();
        let by = self.by_workload();
        let gpus = self.assign_gpus(&desired.recipes);
        let mut ready: BTreeSet<String> = BTreeSet::new();
        for r in &desired.recipes {
            let units = by.get(&r.recipe.name).cloned().unwrap_or_default();
            let gpu = gpus.get(&r.recipe.name).cloned().unwrap_or(Ok(Vec::new()));
            if self.step_one(r, &units, gpu, &ready, now).await {
                ready.insert(r.recipe.name.clone());
            }
        }
        let wanted: BTreeSet<&str> = desired
            .recipes
            .iter()
            .map(|r| r.recipe.name.as_str())
            .collect();
        for (name, units) in &by {
            if wanted.contains(name.as_str()) {
                continue;
            }
            for u in units {
                self.remove(name, u).await;
            }
        }
        // Workloads neither desired nor present are forgotten.
        let present: BTreeSet<String> = by.keys().cloned().collect();
        self.rt
            .retain(|name, _| wanted.contains(name.as_str()) || present.contains(name));
        self.schedule_health(&desired, now);
    }

    async fn remove(&mut self, name: &str, u: &UnitState) {
        let rt = self.rt.entry(name.to_owned()).or_default();
        rt.state = "stopping".into();
        rt.reason = "no longer in the workload set".into();
        if u.active_state == "failed" || u.active_state == "inactive" {
            let _ = self.sd.reset_failed(&u.unit).await;
            self.refresh(&u.unit.clone()).await;
        } else if rt.stop_requested.insert(u.unit.clone()) {
            if let Err(e) = self.sd.stop(&u.unit).await {
                rt.reason = crate::error_chain(&e);
                rt.stop_requested.remove(&u.unit);
            }
        }
    }

    /// One desired workload; returns whether it counts as ready for the ones that start after it.
    async fn step_one(
        &mut self,
        r: &VerifiedRecipe,
        units: &[UnitState],
        gpus: Result<Vec<GpuDevice>, String>,
        ready: &BTreeSet<String>,
        now: Instant,
    ) -> bool {
        let name = r.recipe.name.clone();
        let current = units
            .iter()
            .find(|u| u.env(ENV_DIGEST) == Some(r.digest.as_str()) && u.active_state != "inactive")
            .cloned();
        let others: Vec<UnitState> = units
            .iter()
            .filter(|u| u.env(ENV_DIGEST) != Some(r.digest.as_str()))
            .cloned()
            .collect();
        let old_version = others
            .iter()
            .find(|u| is_up(u))
            .and_then(|u| u.env(ENV_VERSION))
            .map(str::to_owned);
        let grace = self.inputs.failed_grace;
        let sd = self.sd.clone();
        let rt = self.rt.entry(name.clone()).or_default();
        // Units of this workload the agent no longer needs to stop.
        rt.stop_requested
            .retain(|u| units.iter().any(|x| x.unit == *u));

        if rt.failed_digest.as_deref() == Some(r.digest.as_str()) {
            return false;
        }
        if rt.failed_digest.is_some() {
            // A new version after a failure starts afresh.
            *rt = Runtime::default();
        }

        if let Some(c) = current {
            if rt.health.unit != c.unit {
                rt.health = HealthTrack {
                    unit: c.unit.clone(),
                    ..HealthTrack::default()
                };
            }
            match c.active_state.as_str() {
                "active" => {
                    rt.failed_since = None;
                    let exited = c.sub_state == "exited";
                    let healthy = r.recipe.health.is_none() || rt.health.ok == Some(true);
                    let live_others: Vec<&UnitState> = others.iter().filter(|u| is_up(u)).collect();
                    if !live_others.is_empty() {
                        if healthy {
                            for o in &live_others {
                                if rt.stop_requested.insert(o.unit.clone()) {
                                    let _ = sd.stop(&o.unit).await;
                                }
                            }
                            set(
                                rt,
                                "replacing",
                                format!(
                                    "version {} is up; stopping version {}",
                                    r.recipe.version,
                                    old_version.as_deref().unwrap_or("?")
                                ),
                            );
                        } else {
                            set(rt, "replacing", format!(
                                "version {} started beside version {}; waiting for its health check",
                                r.recipe.version,
                                old_version.as_deref().unwrap_or("?")
                            ));
                        }
                        return false;
                    }
                    for o in others.iter().filter(|u| u.active_state == "failed") {
                        let _ = sd.reset_failed(&o.unit).await;
                    }
                    if exited {
                        set(rt, "completed", "finished successfully".into());
                        return true;
                    }
                    let reason = match (&r.recipe.health, rt.health.ok) {
                        (None, _) => "running (no health check)".to_owned(),
                        (Some(_), None) => "running; first health check pending".to_owned(),
                        (Some(_), Some(true)) => "running and healthy".to_owned(),
                        (Some(_), Some(false)) => {
                            format!("running; health check failing: {}", rt.health.last_error)
                        }
                    };
                    set(rt, "running", reason);
                    return healthy;
                }
                "failed" => {
                    let since = match &rt.failed_since {
                        Some((u, t)) if *u == c.unit => *t,
                        _ => {
                            rt.failed_since = Some((c.unit.clone(), now));
                            now
                        }
                    };
                    if now.duration_since(since) < grace {
                        set(
                            rt,
                            "restarting",
                            format!(
                                "{} ({}); waiting to see whether systemd restarts it",
                                c.sub_state, c.result
                            ),
                        );
                        return false;
                    }
                    let rs = &r.recipe.restart;
                    let mut reason = if rs.policy == "no" {
                        format!("the job failed ({})", c.result)
                    } else {
                        rt.restart_cap = Some(rs.max_restarts);
                        format!(
                            "it kept failing ({}): systemd restarted it {} time(s), then gave up (at most {} in {} s)",
                            c.result,
                            c.n_restarts.min(rs.max_restarts),
                            rs.max_restarts,
                            rs.window_secs
                        )
                    };
                    if let Some(why) = c
                        .exit_status
                        .and_then(|st| setup_failure(st, &workload_unit::program(&r.recipe)))
                    {
                        reason.push_str("; ");
                        reason.push_str(&why);
                    }
                    if let Some(v) = &old_version {
                        reason.push_str(&format!("; version {v} keeps running"));
                    }
                    reason.push_str("; see the journal lines, fix the recipe and sign a new set");
                    rt.journal = sd.journal_tail(&c.unit, JOURNAL_LINES).await;
                    rt.failed_digest = Some(r.digest.clone());
                    set(rt, "failed", reason);
                    return false;
                }
                "deactivating" => {
                    set(rt, "restarting", "stopping before a restart".into());
                    return false;
                }
                _ => {
                    if c.sub_state == "auto-restart" {
                        set(
                            rt,
                            "restarting",
                            format!(
                                "exited ({}); systemd restarts it (restart {})",
                                c.result,
                                c.n_restarts + 1
                            ),
                        );
                    } else {
                        set(
                            rt,
                            "starting",
                            format!("{}/{}", c.active_state, c.sub_state),
                        );
                    }
                    return false;
                }
            }
        }

        // This version does not run: start it when nothing holds it back.
        if r.recipe.requires_attestation && !(self.inputs.attested)() {
            let rt = self.rt.entry(name).or_default();
            set(
                rt,
                "waiting",
                "waiting for the fleet to attest the site (requires_attestation)".into(),
            );
            return false;
        }
        if let Some(dep) = r.recipe.after.iter().find(|d| !ready.contains(*d)) {
            let rt = self.rt.entry(name).or_default();
            set(
                rt,
                "waiting",
                format!("waiting for {dep} to be running and healthy"),
            );
            return false;
        }
        let gpus = match gpus {
            Ok(g) => g,
            Err(why) => {
                let rt = self.rt.entry(name).or_default();
                set(rt, "waiting", why);
                return false;
            }
        };
        let rt = self.rt.entry(name.clone()).or_default();
        if rt.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        let new_ports: BTreeSet<String> = ports_env(r)
            .split_once('=')
            .map(|(_, v)| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let live: Vec<&UnitState> = others.iter().filter(|u| is_up(u)).collect();
        let slot_a = workload_unit::unit_name(&name, false);
        let slot_b = workload_unit::unit_name(&name, true);
        let taken: BTreeSet<&str> = units.iter().map(|u| u.unit.as_str()).collect();
        for u in units.iter().filter(|u| !is_up(u)) {
            // A failed or finished unit of an older version only holds its name.
            let _ = sd.reset_failed(&u.unit).await;
        }
        let clash: Vec<String> = live
            .iter()
            .flat_map(|u| {
                unit_ports(u)
                    .intersection(&new_ports)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        let free_slot = if !taken.contains(slot_a.as_str()) {
            Some(false)
        } else if !taken.contains(slot_b.as_str()) {
            Some(true)
        } else {
            None
        };
        if !live.is_empty() && (!clash.is_empty() || free_slot.is_none()) {
            for u in &live {
                if rt.stop_requested.insert(u.unit.clone()) {
                    let _ = sd.stop(&u.unit).await;
                }
            }
            let why = if clash.is_empty() {
                "no free unit name".to_owned()
            } else {
                format!("both use port {}", clash.join(", "))
            };
            set(
                rt,
                "replacing",
                format!(
                    "stopping version {} before starting {}: {why}",
                    old_version.as_deref().unwrap_or("?"),
                    r.recipe.version
                ),
            );
            return false;
        }
        let Some(slot_b_used) = free_slot else {
            // Both names still held by stopped units: wait for systemd to unload them.
            set(
                rt,
                "starting",
                "waiting for systemd to unload the previous unit".into(),
            );
            return false;
        };
        let dir = self.inputs.store.artifact_dir(&name, &r.digest);
        let mut spec = workload_unit::spec(&r.recipe, &r.digest, &dir, &gpus, slot_b_used);
        if let Some((_, crate::systemd::Prop::Strs(env))) =
            spec.props.iter_mut().find(|(k, _)| k == "Environment")
        {
            env.push(ports_env(r));
        }
        let env = match spec.prop("Environment") {
            Some(crate::systemd::Prop::Strs(e)) => e.clone(),
            _ => Vec::new(),
        };
        match sd.start(&spec).await {
            Ok(()) => {
                rt.retry_at = None;
                rt.agent_restarts.clear();
                let what = match &old_version {
                    Some(v) => format!("starting version {} beside version {v}", r.recipe.version),
                    None => format!("starting version {}", r.recipe.version),
                };
                set(
                    rt,
                    if old_version.is_some() {
                        "replacing"
                    } else {
                        "starting"
                    },
                    what,
                );
                // Known at once, so the next step does not start it again before the signal arrives.
                self.units.insert(
                    spec.unit.clone(),
                    UnitState {
                        unit: spec.unit.clone(),
                        active_state: "activating".into(),
                        sub_state: "start".into(),
                        environment: env,
                        ..UnitState::default()
                    },
                );
                self.refresh(&spec.unit).await;
            }
            Err(e) => {
                rt.retry_at = Some(now + Duration::from_secs(10));
                set(
                    rt,
                    "waiting",
                    format!("{}; retrying in 10 s", crate::error_chain(&e)),
                );
            }
        }
        false
    }

    fn schedule_health(&mut self, desired: &Desired, now: Instant) {
        for r in &desired.recipes {
            let Some(check) = r.recipe.health.clone() else {
                continue;
            };
            let Some(rt) = self.rt.get_mut(&r.recipe.name) else {
                continue;
            };
            let unit = rt.health.unit.clone();
            let running = self
                .units
                .get(&unit)
                .is_some_and(|u| u.active_state == "active" && u.sub_state == "running");
            if !running || rt.health.in_flight || rt.failed_digest.is_some() {
                continue;
            }
            let due = *rt
                .health
                .next_due
                .get_or_insert(now + Duration::from_secs(1));
            if now < due {
                continue;
            }
            rt.health.in_flight = true;
            let tx = self.health_tx.clone();
            let workload = r.recipe.name.clone();
            tokio::spawn(async move {
                let outcome = crate::workload_health::check(&check).await;
                let _ = tx
                    .send(Box::new(HealthResult {
                        workload,
                        unit,
                        outcome,
                    }))
                    .await;
            });
        }
    }

    async fn health_result(&mut self, res: HealthResult) {
        let Some(desired) = &self.desired else { return };
        let Some(r) = desired
            .recipes
            .iter()
            .find(|r| r.recipe.name == res.workload)
            .cloned()
        else {
            return;
        };
        let Some(check) = &r.recipe.health else {
            return;
        };
        let sd = self.sd.clone();
        let Some(rt) = self.rt.get_mut(&res.workload) else {
            return;
        };
        if rt.health.unit != res.unit {
            return;
        }
        let now = Instant::now();
        rt.health.in_flight = false;
        rt.health.next_due = Some(now + Duration::from_secs(check.interval_secs));
        match res.outcome {
            Ok(()) => {
                rt.health.ok = Some(true);
                rt.health.consecutive = 0;
            }
            Err(e) => {
                rt.health.ok = Some(false);
                rt.health.consecutive += 1;
                rt.health.last_error =
                    format!("{e} ({} of {})", rt.health.consecutive, check.failures);
                if rt.health.consecutive < check.failures {
                    return;
                }
                let window = Duration::from_secs(r.recipe.restart.window_secs);
                rt.agent_restarts
                    .retain(|t| now.duration_since(*t) < window);
                if rt.agent_restarts.len() as u32 >= r.recipe.restart.max_restarts
                    || r.recipe.restart.policy == "no"
                {
                    let _ = sd.stop(&res.unit).await;
                    rt.journal = sd.journal_tail(&res.unit, JOURNAL_LINES).await;
                    rt.failed_digest = Some(r.digest.clone());
                    let reason = format!(
                        "its health check kept failing ({e}); restarted {} time(s) within {} s, now stopped; see the journal lines",
                        rt.agent_restarts.len(),
                        r.recipe.restart.window_secs
                    );
                    set(rt, "failed", reason);
                } else {
                    rt.agent_restarts.push(now);
                    rt.health.ok = None;
                    rt.health.consecutive = 0;
                    rt.health.next_due = Some(now + Duration::from_secs(check.interval_secs));
                    match sd.restart(&res.unit).await {
                        Ok(()) => set(
                            rt,
                            "restarting",
                            format!(
                                "restarted after {} failed health checks ({e})",
                                check.failures
                            ),
                        ),
                        Err(err) => set(rt, "restarting", crate::error_chain(&err)),
                    }
                }
            }
        }
    }

    fn publish(&mut self) {
        let by = self.by_workload();
        let mut list = Vec::new();
        let mut events = Vec::new();
        let desired: Vec<VerifiedRecipe> = self
            .desired
            .as_ref()
            .map(|d| d.recipes.clone())
            .unwrap_or_default();
        let mut names: Vec<(String, String)> = desired
            .iter()
            .map(|r| (r.recipe.name.clone(), r.recipe.version.clone()))
            .collect();
        for n in by.keys() {
            if !names.iter().any(|(m, _)| m == n) {
                names.push((n.clone(), String::new()));
            }
        }
        for (name, version) in names {
            let units = by.get(&name).cloned().unwrap_or_default();
            let digest = desired
                .iter()
                .find(|r| r.recipe.name == name)
                .map(|r| r.digest.clone());
            let shown = units
                .iter()
                .find(|u| digest.is_some() && u.env(ENV_DIGEST) == digest.as_deref())
                .or_else(|| units.iter().find(|u| is_up(u)))
                .or(units.first());
            let rt = self.rt.entry(name.clone()).or_default();
            let health = match (
                desired
                    .iter()
                    .find(|r| r.recipe.name == name)
                    .and_then(|r| r.recipe.health.as_ref()),
                rt.health.ok,
            ) {
                (None, _) => "none".to_owned(),
                (Some(_), None) => "unknown".to_owned(),
                (Some(_), Some(true)) => "ok".to_owned(),
                (Some(_), Some(false)) => format!("failing: {}", rt.health.last_error),
            };
            let state = if rt.state.is_empty() {
                "waiting".to_owned()
            } else {
                rt.state.clone()
            };
            let line = format!("{state}: {}", rt.reason);
            if line != rt.reported && state != "starting" {
                let severity = match state.as_str() {
                    "failed" => Severity::Critical,
                    "restarting" => Severity::Warning,
                    _ => Severity::Info,
                };
                let label = if version.is_empty() {
                    name.clone()
                } else {
                    format!("{name} {version}")
                };
                events.push(Event {
                    at_unix_ms: crate::health::now_ms(),
                    component: format!("workload:{name}"),
                    kind: EVENT_KIND.into(),
                    severity,
                    message: format!("{label} {line}"),
                });
                tracing::info!(workload = %name, %state, reason = %rt.reason, "workload");
                rt.reported = line;
            }
            list.push(WorkloadStatus {
                name: name.clone(),
                desired_version: version,
                running_version: shown.and_then(|u| u.env(ENV_VERSION)).map(str::to_owned),
                unit: shown.map(|u| u.unit.clone()),
                state,
                systemd: shown
                    .map(|u| format!("{}/{}", u.active_state, u.sub_state))
                    .unwrap_or_else(|| "-".into()),
                restarts: shown.map_or(0, |u| u.n_restarts.min(rt.restart_cap.unwrap_or(u32::MAX)))
                    + rt.agent_restarts.len() as u32,
                health,
                reason: rt.reason.clone(),
                journal: rt.journal.clone(),
            });
        }
        for e in events {
            self.inputs.events.event(e);
        }
        let mut report = self.inputs.report.lock().unwrap_or_else(|p| p.into_inner());
        report.workloads = list;
    }
}

fn set(rt: &mut Runtime, state: &str, reason: String) {
    rt.state = state.to_owned();
    rt.reason = reason;
    if state != "failed" {
        rt.journal.clear();
    }
}

/// What systemd's own exit statuses (200–243, see systemd.exec(5)) mean for a workload. The journal says
/// it too, but journald can drop the attribution of a process that dies at once, so the reason says it.
fn setup_failure(status: i32, program: &str) -> Option<String> {
    let what = match status {
        200 => "its working directory could not be entered".to_owned(),
        203 => format!(
            "systemd could not execute {program}: it is missing or not executable on this image"
        ),
        217 | 216 => "its user or group could not be set up".to_owned(),
        226 => "its sandbox (mount namespace) could not be set up".to_owned(),
        s if (200..=243).contains(&s) => {
            format!("systemd could not set up its process (status {status}, see systemd.exec(5))")
        }
        _ => return None,
    };
    Some(what)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::systemd::Fake;
    use crate::telemetry::LocalSink;

    fn recipe(name: &str, version: &str, extra: &str) -> VerifiedRecipe {
        let toml = format!(
            "name = \"{name}\"\nversion = \"{version}\"\n{extra}\n[run.command]\nargv = [\"/bin/sleep\", \"100\"]\n"
        );
        VerifiedRecipe {
            recipe: crate::recipe::parse("t", &toml).unwrap(),
            digest: cairn_proto::workload_set::recipe_digest(&toml, &[]),
            artifacts: vec![],
        }
    }

    struct Rig {
        fake: Fake,
        rec: Reconciler<Fake>,
        sink: LocalSink,
        report: Arc<Mutex<WorkloadsReport>>,
        attested: Arc<std::sync::atomic::AtomicBool>,
        _dir: tempfile::TempDir,
    }

    fn rig(fake: &Fake, grace: Duration) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalSink::default();
        let report = Arc::new(Mutex::new(WorkloadsReport::default()));
        let attested = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let a = attested.clone();
        let rec = Reconciler::new(
            Arc::new(fake.clone()),
            Inputs {
                store: Arc::new(Store::new(dir.path(), [4; 65])),
                gpus: vec![GpuDevice {
                    uuid: "GPU-a".into(),
                    minor: 0,
                }],
                attested: Box::new(move || a.load(std::sync::atomic::Ordering::SeqCst)),
                events: Arc::new(sink.clone()),
                report: report.clone(),
                failed_grace: grace,
                resync: Duration::from_secs(30),
            },
        );
        Rig {
            fake: fake.clone(),
            rec,
            sink,
            report,
            attested,
            _dir: dir,
        }
    }

    impl Rig {
        async fn apply(&mut self, recipes: Vec<VerifiedRecipe>) {
            self.rec.desired = Some(Desired { serial: 1, recipes });
            self.tick().await;
        }
        async fn tick(&mut self) {
            self.rec.resync().await;
            self.rec.step().await;
            self.rec.publish();
        }
        fn state(&self, name: &str) -> WorkloadStatus {
            let r = self.report.lock().unwrap();
            r.workloads
                .iter()
                .find(|w| w.name == name)
                .cloned()
                .unwrap()
        }
        fn starts(&self) -> Vec<String> {
            self.fake
                .calls()
                .into_iter()
                .filter(|c| c.starts_with("start"))
                .collect()
        }
    }

    #[tokio::test]
    async fn a_set_converges_in_order_and_a_new_agent_adopts_the_units() {
        let fake = Fake::default();
        let mut r = rig(&fake, Duration::from_secs(3));
        let set = vec![
            recipe("db", "1", ""),
            recipe("api", "1", "after = [\"db\"]"),
            recipe("gpu-job", "1", "[gpus]\ncount = 1"),
        ];
        r.apply(set.clone()).await;
        // api waits for db in the first pass; the next pass starts it.
        assert_eq!(r.state("api").state, "waiting");
        r.tick().await;
        r.tick().await;
        assert_eq!(
            r.starts(),
            [
                "start cairn-wl-db.service",
                "start cairn-wl-gpu-job.service",
                "start cairn-wl-api.service"
            ]
        );
        for n in ["db", "api", "gpu-job"] {
            assert_eq!(r.state(n).state, "running", "{n}");
        }
        let spec = fake.spec("cairn-wl-gpu-job.service").unwrap();
        assert!(matches!(
            spec.prop("DeviceAllow"),
            Some(crate::systemd::Prop::Devices(d)) if d[0].0 == "/dev/nvidia0"
        ));
        let pids: Vec<u32> = fake
            .list()
            .await
            .unwrap()
            .iter()
            .map(|u| u.main_pid)
            .collect();

        // A restarted agent finds the units at the desired digests and starts nothing.
        let mut again = rig(&fake, Duration::from_secs(3));
        let before = fake.calls().len();
        again.apply(set).await;
        again.tick().await;
        assert_eq!(fake.calls().len(), before, "{:?}", fake.calls());
        let now: Vec<u32> = fake
            .list()
            .await
            .unwrap()
            .iter()
            .map(|u| u.main_pid)
            .collect();
        assert_eq!(pids, now);
        assert_eq!(again.state("api").state, "running");
    }

    #[tokio::test]
    async fn briefly_failed_is_not_failed_but_staying_failed_is_reported_with_the_journal() {
        let fake = Fake::default();
        let mut r = rig(&fake, Duration::from_millis(300));
        r.apply(vec![recipe("cam", "1", "")]).await;
        let unit = "cairn-wl-cam.service";
        fake.set(unit, "failed", "failed", "exit-code", 1);
        r.tick().await;
        assert_eq!(r.state("cam").state, "restarting");
        fake.set(unit, "active", "running", "success", 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        r.tick().await;
        assert_eq!(r.state("cam").state, "running");
        assert_eq!(r.state("cam").restarts, 1);

        fake.set(unit, "failed", "failed", "exit-code", 5);
        fake.set_journal(unit, &["starting", "Traceback: camera not found"]);
        r.tick().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        r.tick().await;
        let s = r.state("cam");
        assert_eq!(s.state, "failed");
        assert!(
            s.reason.contains("restarted it 5 time(s), then gave up"),
            "{}",
            s.reason
        );
        assert_eq!(s.journal.last().unwrap(), "Traceback: camera not found");
        let events = r.sink.recent_events();
        assert!(events.iter().any(|e| e.kind == EVENT_KIND
            && e.severity == Severity::Critical
            && e.message.contains("cam 1 failed")));
        // Failed stays failed: no restart loop by the agent.
        let n = fake.calls().len();
        r.tick().await;
        assert_eq!(fake.calls().len(), n);
    }

    #[tokio::test]
    async fn a_program_systemd_cannot_execute_is_named_in_the_reason_even_with_no_journal() {
        let fake = Fake::default();
        let mut r = rig(&fake, Duration::from_millis(100));
        r.apply(vec![recipe("cam", "1", "")]).await;
        let unit = "cairn-wl-cam.service";
        fake.set(unit, "failed", "failed", "exit-code", 5);
        fake.set_exit_status(unit, 203);
        r.tick().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        r.tick().await;
        let s = r.state("cam");
        assert_eq!(s.state, "failed");
        assert!(
            s.reason
                .contains("systemd could not execute /bin/sleep: it is missing or not executable"),
            "{}",
            s.reason
        );
        // A program's own exit status is its business, not systemd's.
        assert_eq!(setup_failure(1, "/bin/sleep"), None);
        assert_eq!(setup_failure(244, "/bin/sleep"), None);
        assert!(setup_failure(238, "x").unwrap().contains("status 238"));
    }

    #[tokio::test]
    async fn a_new_version_starts_beside_the_old_unless_ports_clash_and_dropped_ones_go() {
        let fake = Fake::default();
        let mut r = rig(&fake, Duration::from_secs(3));
        let port = "[[ports]]\nport = 8080";
        r.apply(vec![recipe("side", "1", ""), recipe("web", "1", port)])
            .await;
        // side: no ports, so version 2 starts in the other slot before version 1 stops.
        r.apply(vec![recipe("side", "2", ""), recipe("web", "1", port)])
            .await;
        assert!(fake
            .state("cairn-wl-side.b.service")
            .await
            .unwrap()
            .is_some());
        assert!(fake.state("cairn-wl-side.service").await.unwrap().is_some());
        r.tick().await;
        assert!(fake.state("cairn-wl-side.service").await.unwrap().is_none());
        assert_eq!(r.state("side").running_version.as_deref(), Some("2"));

        // web: both versions want 8080, so the old stops first.
        r.apply(vec![recipe("side", "2", ""), recipe("web", "2", port)])
            .await;
        assert!(fake.state("cairn-wl-web.service").await.unwrap().is_none());
        assert!(fake
            .state("cairn-wl-web.b.service")
            .await
            .unwrap()
            .is_none());
        assert!(
            r.state("web").reason.contains("port 8080/tcp"),
            "{}",
            r.state("web").reason
        );
        r.tick().await;
        let web: Vec<UnitState> = fake
            .list()
            .await
            .unwrap()
            .into_iter()
            .filter(|u| u.unit.starts_with("cairn-wl-web"))
            .collect();
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].env(ENV_VERSION), Some("2"));

        // Dropped from the set: stopped and forgotten.
        r.apply(vec![recipe("web", "2", port)]).await;
        assert!(fake
            .state("cairn-wl-side.b.service")
            .await
            .unwrap()
            .is_none());
        r.tick().await;
        assert!(r
            .report
            .lock()
            .unwrap()
            .workloads
            .iter()
            .all(|w| w.name != "side"));
    }

    #[tokio::test]
    async fn attestation_and_gpus_hold_a_workload_back_with_the_reason() {
        let fake = Fake::default();
        let mut r = rig(&fake, Duration::from_secs(3));
        r.attested.store(false, std::sync::atomic::Ordering::SeqCst);
        r.apply(vec![
            recipe("secret", "1", "requires_attestation = true"),
            recipe("big", "1", "[gpus]\ncount = 2"),
        ])
        .await;
        assert!(r.starts().is_empty());
        assert!(r.state("secret").reason.contains("attest"));
        assert!(
            r.state("big").reason.contains("2 GPU(s): 1 free"),
            "{}",
            r.state("big").reason
        );
        r.attested.store(true, std::sync::atomic::Ordering::SeqCst);
        r.tick().await;
        assert_eq!(r.starts(), ["start cairn-wl-secret.service"]);
    }
}
