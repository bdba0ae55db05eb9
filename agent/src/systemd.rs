//! The systemd boundary: transient units over D-Bus (`org.freedesktop.systemd1`), their state, change
//! signals and journal. [`Systemd`] is what the reconciler needs; [`Dbus`] speaks to a real systemd (the
//! system bus, or any bus address: the nspawn tier points it at a container's); [`Fake`] is an in-memory
//! systemd for unit tests.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Every workload unit lives in this slice, so the image can bound them all at once.
pub const SLICE: &str = "cairn-workloads.slice";
/// Workload units are `cairn-wl-<name>.service` (and `cairn-wl-<name>.b.service` while one replaces it).
pub const UNIT_PREFIX: &str = "cairn-wl-";

/// A unit property as StartTransientUnit takes it; only the D-Bus types the recipes need.
#[derive(Debug, Clone, PartialEq)]
pub enum Prop {
    Bool(bool),
    Str(String),
    U32(u32),
    U64(u64),
    Strs(Vec<String>),
    /// ExecStart: (path, argv, ignore failure).
    Exec(Vec<(String, Vec<String>, bool)>),
    /// BindReadOnlyPaths: (source, destination, ignore missing source, flags).
    Binds(Vec<(String, String, bool, u64)>),
    /// DeviceAllow: (device node or class, "rwm").
    Devices(Vec<(String, String)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub unit: String,
    pub props: Vec<(String, Prop)>,
}

impl UnitSpec {
    pub fn prop(&self, name: &str) -> Option<&Prop> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }
}

/// What systemd says about one unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub unit: String,
    /// active, activating, deactivating, inactive, failed.
    pub active_state: String,
    /// running, auto-restart, exited, failed, dead, …
    pub sub_state: String,
    /// The service's Result: success, exit-code, signal, core-dump, watchdog, timeout, …
    pub result: String,
    pub n_restarts: u32,
    pub main_pid: u32,
    /// ExecMainStatus when the main process exited (ExecMainCode is CLD_EXITED); 200–243 are systemd's
    /// own codes for a process it could not set up (203 is EXEC), which the journal may not say.
    pub exit_status: Option<i32>,
    /// The unit's Environment=, where the agent keeps which recipe version it runs.
    pub environment: Vec<String>,
}

impl UnitState {
    pub fn env(&self, key: &str) -> Option<&str> {
        self.environment
            .iter()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to systemd over D-Bus at {address}")]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd refused to {action} {unit}")]
    Call {
        action: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd answered about {unit} with property {property} of an unexpected type")]
    Property {
        unit: String,
        property: &'static str,
    },
}

/// The narrow systemd interface the reconciler uses.
pub trait Systemd: Send + Sync + 'static {
    /// StartTransientUnit with mode "replace"; returns once the job is queued.
    fn start(&self, spec: &UnitSpec) -> impl Future<Output = Result<(), SystemdError>> + Send;
    fn stop(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    fn restart(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// Forgets a failed unit, so a transient one is unloaded.
    fn reset_failed(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// Every loaded `cairn-wl-*` unit.
    fn list(&self) -> impl Future<Output = Result<Vec<UnitState>, SystemdError>> + Send;
    /// The unit's state, or None when it is not loaded.
    fn state(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<Option<UnitState>, SystemdError>> + Send;
    /// Names of workload units as systemd signals a change to them (JobRemoved, PropertiesChanged).
    fn changes(&self) -> impl Future<Output = Result<mpsc::Receiver<String>, SystemdError>> + Send;
    /// The unit's last journal lines, oldest first (empty when the journal cannot be read).
    fn journal_tail(&self, unit: &str, lines: usize) -> impl Future<Output = Vec<String>> + Send;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, zbus::Variant<'_>)],
        aux: &[(&str, &[(&str, zbus::Variant<'_>)])],
    ) -> zbus::Result<zbus::OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            zbus::OwnedObjectPath,
            u32,
            String,
            zbus::OwnedObjectPath,
        )>,
    >;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: zbus::OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.DBus.Properties",
    default_service = "org.freedesktop.systemd1"
)]
trait Properties {
    fn get_all(&self, interface: &str) -> zbus::Result<HashMap<String, zbus::OwnedVariant>>;
}

/// systemd over a D-Bus connection.
#[derive(Debug, Clone)]
pub struct Dbus {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    /// `journalctl --directory`, when the units' journal is not the host's (the nspawn tier).
    journal_dir: Option<std::path::PathBuf>,
}

impl Dbus {
    /// Connects to `address` (a D-Bus address such as `unix:path=/run/dbus/system_bus_socket`), or the
    /// system bus when None.
    pub async fn connect(
        address: Option<&str>,
        journal_dir: Option<std::path::PathBuf>,
    ) -> Result<Self, SystemdError> {
        let shown = address.unwrap_or("the system bus").to_owned();
        let err = |source| SystemdError::Connect {
            address: shown.clone(),
            source,
        };
        let builder = match address {
            Some(a) => zbus::connection::Builder::address(a),
            None => zbus::connection::Builder::system(),
        };
        let conn = builder.build().await.map_err(err)?;
        let manager = ManagerProxy::new(&conn).await.map_err(err)?;
        Ok(Dbus {
            conn,
            manager,
            journal_dir,
        })
    }

    fn call(action: &'static str, unit: &str) -> impl FnOnce(zbus::Error) -> SystemdError {
        let unit = unit.to_owned();
        move |source| SystemdError::Call {
            action,
            unit,
            source,
        }
    }

    async fn state_at(
        &self,
        unit: &str,
        path: zbus::OwnedObjectPath,
    ) -> Result<Option<UnitState>, SystemdError> {
        let props = PropertiesProxy::builder(&self.conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(Self::call("read", unit))?;
        let u = match props.get_all("org.freedesktop.systemd1.Unit").await {
            Ok(u) => u,
            Err(e) if is_unknown_object(&e) => return Ok(None),
            Err(e) => return Err(Self::call("read", unit)(e)),
        };
        let s = props
            .get_all("org.freedesktop.systemd1.Service")
            .await
            .map_err(Self::call("read", unit))?;
        let str_of = |m: &HashMap<String, zbus::OwnedVariant>, k: &'static str| {
            m.get(k)
                .and_then(|v| String::try_from(v.clone()).ok())
                .ok_or(SystemdError::Property {
                    unit: unit.to_owned(),
                    property: k,
                })
        };
        let load = str_of(&u, "LoadState")?;
        if load == "not-found" {
            return Ok(None);
        }
        Ok(Some(UnitState {
            unit: unit.to_owned(),
            active_state: str_of(&u, "ActiveState")?,
            sub_state: str_of(&u, "SubState")?,
            result: str_of(&s, "Result").unwrap_or_default(),
            n_restarts: s
                .get("NRestarts")
                .and_then(|v| u32::try_from(v.clone()).ok())
                .unwrap_or(0),
            main_pid: s
                .get("MainPID")
                .and_then(|v| u32::try_from(v.clone()).ok())
                .unwrap_or(0),
            exit_status: exit_status(&s),
            environment: s
                .get("Environment")
                .and_then(|v| Vec::<String>::try_from(v.clone()).ok())
                .unwrap_or_default(),
        }))
    }
}

/// CLD_EXITED from waitid(2): ExecMainStatus is then an exit status, not a signal number.
const CLD_EXITED: i32 = 1;

fn exit_status(service: &HashMap<String, zbus::OwnedVariant>) -> Option<i32> {
    let int = |k: &str| service.get(k).and_then(|v| i32::try_from(v.clone()).ok());
    if int("ExecMainCode")? != CLD_EXITED {
        return None;
    }
    int("ExecMainStatus")
}

fn is_unknown_object(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::MethodError(name, _, _) => {
            let n = name.as_str();
            n == "org.freedesktop.DBus.Error.UnknownObject"
                || n == "org.freedesktop.systemd1.NoSuchUnit"
                || n == "org.freedesktop.DBus.Error.UnknownInterface"
        }
        _ => false,
    }
}

/// The unit name in a systemd object path (`…/unit/cairn_2dwl_2dx_2eservice` → `cairn-wl-x.service`).
pub fn unit_from_path(path: &str) -> Option<String> {
    let escaped = path.strip_prefix("/org/freedesktop/systemd1/unit/")?;
    let b = escaped.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn variant(p: &Prop) -> zbus::Variant<'_> {
    match p {
        Prop::Bool(b) => zbus::Variant::from(*b),
        Prop::Str(s) => zbus::Variant::from(s.as_str()),
        Prop::U32(n) => zbus::Variant::from(*n),
        Prop::U64(n) => zbus::Variant::from(*n),
        Prop::Strs(v) => zbus::Variant::from(v.clone()),
        Prop::Exec(v) => zbus::Variant::from(v.clone()),
        Prop::Binds(v) => zbus::Variant::from(v.clone()),
        Prop::Devices(v) => zbus::Variant::from(v.clone()),
    }
}

impl Systemd for Dbus {
    async fn start(&self, spec: &UnitSpec) -> Result<(), SystemdError> {
        let props: Vec<(&str, zbus::Variant<'_>)> = spec
            .props
            .iter()
            .map(|(n, p)| (n.as_str(), variant(p)))
            .collect();
        self.manager
            .start_transient_unit(&spec.unit, "replace", &props, &[])
            .await
            .map_err(Self::call("start", &spec.unit))?;
        Ok(())
    }

    async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        match self.manager.stop_unit(unit, "replace").await {
            Ok(_) => Ok(()),
            Err(e) if is_unknown_object(&e) => Ok(()),
            Err(e) => Err(Self::call("stop", unit)(e)),
        }
    }

    async fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.manager
            .restart_unit(unit, "replace")
            .await
            .map_err(Self::call("restart", unit))?;
        Ok(())
    }

    async fn reset_failed(&self, unit: &str) -> Result<(), SystemdError> {
        match self.manager.reset_failed_unit(unit).await {
            Ok(()) => Ok(()),
            Err(e) if is_unknown_object(&e) => Ok(()),
            Err(e) => Err(Self::call("reset", unit)(e)),
        }
    }

    async fn list(&self) -> Result<Vec<UnitState>, SystemdError> {
        let pattern = format!("{UNIT_PREFIX}*.service");
        let units = self
            .manager
            .list_units_by_patterns(&[], &[pattern.as_str()])
            .await
            .map_err(Self::call("list", &pattern))?;
        let mut out = Vec::with_capacity(units.len());
        for u in units {
            if let Some(s) = self.state_at(&u.0, u.6).await? {
                out.push(s);
            }
        }
        Ok(out)
    }

    async fn state(&self, unit: &str) -> Result<Option<UnitState>, SystemdError> {
        match self.manager.get_unit(unit).await {
            Ok(path) => self.state_at(unit, path).await,
            Err(e) if is_unknown_object(&e) => Ok(None),
            Err(e) => Err(Self::call("read", unit)(e)),
        }
    }

    async fn changes(&self) -> Result<mpsc::Receiver<String>, SystemdError> {
        use zbus::export::futures_core::Stream;
        let err = Self::call("subscribe to", "unit changes");
        // Without Subscribe, systemd sends signals only for units someone asked about.
        self.manager.subscribe().await.map_err(err)?;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.systemd1")
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .path_namespace("/org/freedesktop/systemd1/unit")
            .build()
            .map_err(Self::call("subscribe to", "unit changes"))?;
        let mut props = zbus::MessageStream::for_match_rule(rule, &self.conn, None)
            .await
            .map_err(Self::call("subscribe to", "unit changes"))?;
        let mut jobs = self
            .manager
            .receive_job_removed()
            .await
            .map_err(Self::call("subscribe to", "job changes"))?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let unit = tokio::select! {
                    m = std::future::poll_fn(|cx| std::pin::Pin::new(&mut props).poll_next(cx)) => {
                        let Some(Ok(m)) = m else { return };
                        m.header().path().and_then(|p| unit_from_path(p.as_str()))
                    }
                    j = std::future::poll_fn(|cx| std::pin::Pin::new(&mut jobs).poll_next(cx)) => {
                        let Some(j) = j else { return };
                        j.args().ok().map(|a| a.unit)
                    }
                };
                if let Some(u) = unit.filter(|u| u.starts_with(UNIT_PREFIX)) {
                    // A full channel means a resync is due anyway; a closed one means the agent stopped.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(u) {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn journal_tail(&self, unit: &str, lines: usize) -> Vec<String> {
        let mut cmd = tokio::process::Command::new("journalctl");
        if let Some(d) = &self.journal_dir {
            cmd.arg("--directory").arg(d);
        }
        cmd.args(["--unit", unit, "--output", "cat", "--no-pager", "--lines"])
            .arg(lines.to_string())
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        match tokio::time::timeout(std::time::Duration::from_secs(5), cmd.output()).await {
            Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// An in-memory systemd for unit tests: units start active at once; tests drive failures with
/// [`Fake::set`]. Every call is recorded.
#[derive(Debug, Clone, Default)]
pub struct Fake {
    inner: Arc<Mutex<FakeInner>>,
}

#[derive(Debug, Default)]
struct FakeInner {
    units: BTreeMap<String, (UnitSpec, UnitState)>,
    calls: Vec<String>,
    journal: BTreeMap<String, Vec<String>>,
    watchers: Vec<mpsc::Sender<String>>,
    next_pid: u32,
}

impl Fake {
    fn with<R>(&self, f: impl FnOnce(&mut FakeInner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Calls made so far, as "start cairn-wl-x.service", "stop …".
    pub fn calls(&self) -> Vec<String> {
        self.with(|i| i.calls.clone())
    }

    pub fn spec(&self, unit: &str) -> Option<UnitSpec> {
        self.with(|i| i.units.get(unit).map(|(s, _)| s.clone()))
    }

    /// Changes a unit's state as systemd would, and signals it.
    pub fn set(&self, unit: &str, active: &str, sub: &str, result: &str, restarts: u32) {
        let watchers = self.with(|i| {
            if let Some((_, s)) = i.units.get_mut(unit) {
                s.active_state = active.into();
                s.sub_state = sub.into();
                s.result = result.into();
                s.n_restarts = restarts;
                s.exit_status = (result == "exit-code").then_some(1);
            }
            i.watchers.clone()
        });
        for w in watchers {
            let _ = w.try_send(unit.to_owned());
        }
    }

    /// The main process's last exit status, as systemd's ExecMainStatus.
    pub fn set_exit_status(&self, unit: &str, status: i32) {
        self.with(|i| {
            if let Some((_, s)) = i.units.get_mut(unit) {
                s.exit_status = Some(status);
            }
        });
    }

    pub fn set_journal(&self, unit: &str, lines: &[&str]) {
        self.with(|i| {
            i.journal
                .insert(unit.into(), lines.iter().map(|l| l.to_string()).collect())
        });
    }

    fn changed(&self, unit: &str) {
        for w in self.with(|i| i.watchers.clone()) {
            let _ = w.try_send(unit.to_owned());
        }
    }
}

impl Systemd for Fake {
    async fn start(&self, spec: &UnitSpec) -> Result<(), SystemdError> {
        let env = match spec.prop("Environment") {
            Some(Prop::Strs(v)) => v.clone(),
            _ => Vec::new(),
        };
        self.with(|i| {
            i.calls.push(format!("start {}", spec.unit));
            i.next_pid += 1;
            let state = UnitState {
                unit: spec.unit.clone(),
                active_state: "active".into(),
                sub_state: "running".into(),
                result: "success".into(),
                n_restarts: 0,
                main_pid: 1000 + i.next_pid,
                exit_status: None,
                environment: env,
            };
            i.units.insert(spec.unit.clone(), (spec.clone(), state));
        });
        self.changed(&spec.unit);
        Ok(())
    }

    async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.with(|i| {
            i.calls.push(format!("stop {unit}"));
            i.units.remove(unit);
        });
        self.changed(unit);
        Ok(())
    }

    async fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.with(|i| {
            i.calls.push(format!("restart {unit}"));
            if let Some((_, s)) = i.units.get_mut(unit) {
                s.active_state = "active".into();
                s.sub_state = "running".into();
                i.next_pid += 1;
                s.main_pid = 1000 + i.next_pid;
            }
        });
        self.changed(unit);
        Ok(())
    }

    async fn reset_failed(&self, unit: &str) -> Result<(), SystemdError> {
        self.with(|i| {
            i.calls.push(format!("reset-failed {unit}"));
            if i.units
                .get(unit)
                .is_some_and(|(_, s)| s.active_state == "failed")
            {
                i.units.remove(unit);
            }
        });
        Ok(())
    }

    async fn list(&self) -> Result<Vec<UnitState>, SystemdError> {
        Ok(self.with(|i| i.units.values().map(|(_, s)| s.clone()).collect()))
    }

    async fn state(&self, unit: &str) -> Result<Option<UnitState>, SystemdError> {
        Ok(self.with(|i| i.units.get(unit).map(|(_, s)| s.clone())))
    }

    async fn changes(&self) -> Result<mpsc::Receiver<String>, SystemdError> {
        let (tx, rx) = mpsc::channel(256);
        self.with(|i| i.watchers.push(tx));
        Ok(rx)
    }

    async fn journal_tail(&self, unit: &str, lines: usize) -> Vec<String> {
        self.with(|i| {
            let all = i.journal.get(unit).cloned().unwrap_or_default();
            all[all.len().saturating_sub(lines)..].to_vec()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_come_back_from_object_paths() {
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/cairn_2dwl_2dcam_2eb_2eservice")
                .as_deref(),
            Some("cairn-wl-cam.b.service")
        );
        assert_eq!(unit_from_path("/org/freedesktop/systemd1/job/4"), None);
    }

    #[test]
    fn environment_lookups_need_the_whole_key() {
        let s = UnitState {
            environment: vec!["CAIRN_RECIPE_DIGEST=ab".into(), "CAIRN_X=1".into()],
            ..UnitState::default()
        };
        assert_eq!(s.env("CAIRN_RECIPE_DIGEST"), Some("ab"));
        assert_eq!(s.env("CAIRN_RECIPE"), None);
    }
}
