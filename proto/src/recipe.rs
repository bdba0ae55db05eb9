//! Workload recipes: what the fleet says a site should run, one TOML file per workload. This module parses
//! and checks them; nothing here touches systemd. The schema is in docs/workloads.md, the examples in
//! `recipes/`. Every error names the file, the key and the fix.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The longest workload name: it becomes part of a unit name (`cairn-wl-<name>.service`).
pub const MAX_NAME_LEN: usize = 48;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Lower-case letters, digits and dashes, starting with a letter.
    pub name: String,
    /// The recipe's version; a change replaces the running unit.
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// What runs: a command (with an artifact shipped beside the recipe) or an OCI image run by podman.
    pub run: Run,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub gpus: Gpus,
    #[serde(default)]
    pub ports: Vec<Port>,
    /// A persistent data directory (`/var/lib/cairn-wl/<name>`, systemd's StateDirectory), kept across
    /// versions and restarts.
    #[serde(default)]
    pub persistent_data: bool,
    pub health: Option<Health>,
    #[serde(default)]
    pub restart: Restart,
    /// Workloads that must be active before this one starts.
    #[serde(default)]
    pub after: Vec<String>,
    /// Start only once the site is attested and trusted by the fleet.
    #[serde(default)]
    pub requires_attestation: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Run {
    /// argv[0] is the artifact (a path relative to the recipe's directory) or an absolute path in the image.
    Command {
        argv: Vec<String>,
        /// The file shipped beside the recipe that argv\[0\] names; checked to exist.
        artifact: Option<String>,
    },
    /// An OCI image reference, run with `podman run`; `args` follow the image.
    Image {
        reference: String,
        #[serde(default)]
        args: Vec<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (e.g. 1.5); becomes CPUQuotaPerSecUSec.
    pub cpu: Option<f64>,
    /// Memory limit with a unit: "512M", "8G" (K, M, G, T; powers of 1024); becomes MemoryMax.
    pub memory: Option<String>,
    /// Most tasks (processes and threads); becomes TasksMax.
    pub tasks: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpus {
    /// How many GPUs, any of them.
    #[serde(default)]
    pub count: u32,
    /// Or exactly these (NVML UUIDs, `GPU-…`).
    #[serde(default)]
    pub uuids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "tcp".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// "http" (GET http://127.0.0.1:<port><path> answers 2xx), "tcp" (a connection to 127.0.0.1:<port>
    /// opens) or "command" (argv exits 0).
    pub kind: String,
    pub port: Option<u16>,
    pub path: Option<String>,
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Consecutive failed checks before the workload is restarted.
    #[serde(default = "default_failures")]
    pub failures: u32,
}

fn default_interval() -> u64 {
    10
}
fn default_timeout() -> u64 {
    3
}
fn default_failures() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    /// "on-failure" (default), "always" or "no", as systemd's Restart=.
    #[serde(default = "on_failure")]
    pub policy: String,
    /// Restarts within `window_secs` before the workload is reported failed and left stopped.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// Seconds between a failure and the restart.
    #[serde(default = "default_delay")]
    pub delay_secs: u64,
    /// systemd's watchdog: the workload must call sd_notify(WATCHDOG=1) at least this often (0: off).
    #[serde(default)]
    pub watchdog_secs: u64,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: on_failure(),
            max_restarts: default_max_restarts(),
            window_secs: default_window(),
            delay_secs: default_delay(),
            watchdog_secs: 0,
        }
    }
}

fn on_failure() -> String {
    "on-failure".into()
}
fn default_max_restarts() -> u32 {
    5
}
fn default_window() -> u64 {
    300
}
fn default_delay() -> u64 {
    2
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {origin}: {problem}; fix: {fix}")]
    Invalid {
        origin: String,
        problem: String,
        fix: String,
    },
}

/// The 1-based line of a TOML error's span in `text`, for messages that name the line.
pub fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    span.map(|s| {
        text.as_bytes()[..s.start.min(text.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    })
}

fn invalid(origin: &str, problem: impl Into<String>, fix: impl Into<String>) -> RecipeError {
    RecipeError::Invalid {
        origin: origin.to_owned(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Reads and checks the recipe in `path`; a command's artifact must exist beside it.
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_owned(),
        source,
    })?;
    let recipe = parse(&path.display().to_string(), &text)?;
    if let Run::Command {
        artifact: Some(a), ..
    } = &recipe.run
    {
        let dir = path.parent().unwrap_or(Path::new("."));
        let file = dir.join(a);
        if !file.is_file() {
            return Err(invalid(
                &path.display().to_string(),
                format!("key `run.artifact`: {} does not exist", file.display()),
                "ship the artifact beside the recipe, or name the file that is there",
            ));
        }
    }
    Ok(recipe)
}

/// Parses and checks one recipe's text; `origin` names it in errors (a path, or a set entry).
pub fn parse(origin: &str, text: &str) -> Result<Recipe, RecipeError> {
    let line_of = |span| line_of(text, span);
    let recipe: Recipe =
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let at = line_of(e.inner().span())
                .map(|l| format!(", line {l}"))
                .unwrap_or_default();
            let path = e.path().to_string();
            let key = if path == "." {
                "(top level)".to_owned()
            } else {
                format!("`{path}`")
            };
            invalid(
                &format!("{origin}{at}"),
                format!("key {key}: {}", e.inner().message().trim_end()),
                "correct the key or its value; the schema is in docs/workloads.md",
            )
        })?;
    check(origin, &recipe)?;
    Ok(recipe)
}

fn is_name(s: &str) -> bool {
    s.len() <= MAX_NAME_LEN
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.ends_with('-')
}

/// "512M" → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift).filter(|&b| b > 0)
}

fn check(origin: &str, r: &Recipe) -> Result<(), RecipeError> {
    let bad = |key: &str, problem: String, fix: &str| {
        Err(invalid(origin, format!("key `{key}`: {problem}"), fix))
    };
    if !is_name(&r.name) {
        return bad(
            "name",
            format!("{:?} is not a workload name", r.name),
            "use lower-case letters, digits and dashes, starting with a letter, at most 48 characters",
        );
    }
    if r.version.trim().is_empty() || r.version.chars().any(char::is_whitespace) {
        return bad(
            "version",
            format!("{:?} is empty or has spaces", r.version),
            "give a version such as \"1.4.2\"",
        );
    }
    match &r.run {
        Run::Command { argv, artifact } => {
            if argv.first().is_none_or(|a| a.is_empty()) {
                return bad(
                    "run.command.argv",
                    "is empty".into(),
                    "give the program and its arguments",
                );
            }
            if let Some(a) = artifact {
                if a.is_empty() || Path::new(a).is_absolute() || a.split('/').any(|p| p == "..") {
                    return bad(
                        "run.command.artifact",
                        format!("{a:?} is not a path inside the recipe's directory"),
                        "name a file beside the recipe, e.g. \"camera-analytics.py\"",
                    );
                }
            } else if !Path::new(&argv[0]).is_absolute() {
                return bad(
                    "run.command.argv",
                    format!("{:?} is neither an absolute path nor an artifact", argv[0]),
                    "give an absolute path in the image, or ship the program as `artifact`",
                );
            }
        }
        Run::Image { reference, .. } => {
            if reference.is_empty() || reference.chars().any(char::is_whitespace) {
                return bad(
                    "run.image.reference",
                    format!("{reference:?} is not an image reference"),
                    "give a reference such as \"registry.example/analytics:1.2\"",
                );
            }
        }
    }
    for k in r.env.keys() {
        if k.is_empty()
            || k.starts_with(|c: char| c.is_ascii_digit())
            || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad(
                &format!("env.{k}"),
                "is not an environment variable name".into(),
                "use letters, digits and _, not starting with a digit",
            );
        }
    }
    if let Some(cpu) = r.resources.cpu {
        if !(cpu > 0.0 && cpu <= 1024.0) {
            return bad(
                "resources.cpu",
                format!("{cpu} is not a number of cores"),
                "give cores above 0, e.g. 0.5 or 4",
            );
        }
    }
    if let Some(m) = &r.resources.memory {
        if parse_size(m).is_none() {
            return bad(
                "resources.memory",
                format!("{m:?} is not a size"),
                "give a number with K, M, G or T, e.g. \"512M\"",
            );
        }
    }
    if r.resources.tasks == Some(0) {
        return bad(
            "resources.tasks",
            "is 0".into(),
            "give at least 1, or leave it out",
        );
    }
    if r.gpus.count > 0 && !r.gpus.uuids.is_empty() {
        return bad(
            "gpus",
            "gives both count and uuids".into(),
            "give one: a count of any GPUs, or the UUIDs of exact ones",
        );
    }
    if let Some(u) = r.gpus.uuids.iter().find(|u| !u.starts_with("GPU-")) {
        return bad(
            "gpus.uuids",
            format!("{u:?} is not an NVML UUID"),
            "give UUIDs as `nvidia-smi -L` shows them, GPU-…",
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in r.ports.iter().enumerate() {
        if p.port == 0 {
            return bad(
                &format!("ports[{i}].port"),
                "is 0".into(),
                "give the port the workload listens on",
            );
        }
        if p.protocol != "tcp" && p.protocol != "udp" {
            return bad(
                &format!("ports[{i}].protocol"),
                format!("{:?} is not tcp or udp", p.protocol),
                "use \"tcp\" or \"udp\"",
            );
        }
        if !seen.insert((p.port, p.protocol.clone())) {
            return bad(
                &format!("ports[{i}]"),
                format!("{}/{} is listed twice", p.port, p.protocol),
                "list each port once",
            );
        }
    }
    if let Some(h) = &r.health {
        if h.interval_secs == 0 || h.timeout_secs == 0 || h.failures == 0 {
            return bad(
                "health",
                "interval_secs, timeout_secs and failures must be at least 1".into(),
                "give positive values, or leave them out for 10 s, 3 s and 3",
            );
        }
        if h.timeout_secs > h.interval_secs {
            return bad(
                "health.timeout_secs",
                format!(
                    "{} is longer than interval_secs ({})",
                    h.timeout_secs, h.interval_secs
                ),
                "make the timeout at most the interval",
            );
        }
        let port_ok = h.port.is_some_and(|p| p != 0);
        match h.kind.as_str() {
            "http" | "tcp" if !port_ok => {
                return bad(
                    "health.port",
                    "is missing or 0".into(),
                    "give the port the workload answers on",
                );
            }
            "http" if !h.path.as_deref().is_some_and(|p| p.starts_with('/')) => {
                return bad(
                    "health.path",
                    format!(
                        "{:?} does not start with /",
                        h.path.as_deref().unwrap_or("")
                    ),
                    "give a path such as \"/healthz\"",
                );
            }
            "command" if h.argv.first().is_none_or(|a| a.is_empty()) => {
                return bad(
                    "health.argv",
                    "is empty".into(),
                    "give the check's program and arguments",
                );
            }
            "http" | "tcp" | "command" => {}
            other => {
                return bad(
                    "health.kind",
                    format!("{other:?} is not a kind of check"),
                    "use \"http\", \"tcp\" or \"command\"",
                );
            }
        }
    }
    if !matches!(r.restart.policy.as_str(), "on-failure" | "always" | "no") {
        return bad(
            "restart.policy",
            format!("{:?} is not a restart policy", r.restart.policy),
            "use \"on-failure\", \"always\" or \"no\"",
        );
    }
    if r.restart.window_secs == 0 {
        return bad(
            "restart.window_secs",
            "is 0".into(),
            "give the window restarts are counted in, e.g. 300",
        );
    }
    for (i, a) in r.after.iter().enumerate() {
        if !is_name(a) {
            return bad(
                &format!("after[{i}]"),
                format!("{a:?} is not a workload name"),
                "name another recipe by its `name`",
            );
        }
        if *a == r.name {
            return bad(
                &format!("after[{i}]"),
                "names the recipe itself".into(),
                "remove it",
            );
        }
    }
    Ok(())
}

/// One line about a checked recipe, for `cairnctl recipe check`.
pub fn summary(r: &Recipe) -> String {
    let what = match &r.run {
        Run::Command { argv, .. } => format!("command {}", argv.join(" ")),
        Run::Image { reference, .. } => format!("image {reference}"),
    };
    let gpus = if !r.gpus.uuids.is_empty() {
        format!(", GPUs {}", r.gpus.uuids.join(" "))
    } else if r.gpus.count > 0 {
        format!(", {} GPU(s)", r.gpus.count)
    } else {
        String::new()
    };
    format!("{} {}: {what}{gpus}", r.name, r.version)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
name = "camera-analytics"
version = "1.2.0"
[run.command]
argv = ["camera-analytics.py", "--port", "8080"]
artifact = "camera-analytics.py"
[resources]
cpu = 2.0
memory = "4G"
tasks = 256
[gpus]
count = 1
[[ports]]
port = 8080
[health]
kind = "http"
port = 8080
path = "/healthz"
"#;

    #[test]
    fn a_good_recipe_parses_with_defaults() {
        let r = parse("good.toml", GOOD).unwrap();
        assert_eq!(r.name, "camera-analytics");
        assert_eq!(r.restart, Restart::default());
        assert_eq!(r.ports[0].protocol, "tcp");
        let h = r.health.unwrap();
        assert_eq!((h.interval_secs, h.timeout_secs, h.failures), (10, 3, 3));
        assert_eq!(parse_size("4G"), Some(4 << 30));
    }

    /// Each malformed recipe is refused with a message naming the key that is wrong, and a fix.
    #[test]
    fn malformed_recipes_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "name = \"camera-analytics\"",
                "name = \"Camera_Analytics\"",
                "`name`",
            ),
            ("version = \"1.2.0\"", "version = \"\"", "`version`"),
            ("version = \"1.2.0\"", "version = 3", "`version`"),
            (
                "version = \"1.2.0\"\n",
                "version = \"1.2.0\"\ncolour = \"red\"\n",
                "colour",
            ),
            (
                "argv = [\"camera-analytics.py\", \"--port\", \"8080\"]",
                "argv = []",
                "`run.command.argv`",
            ),
            (
                "artifact = \"camera-analytics.py\"",
                "artifact = \"../../etc/passwd\"",
                "`run.command.artifact`",
            ),
            (
                "artifact = \"camera-analytics.py\"",
                "",
                "`run.command.argv`",
            ),
            ("cpu = 2.0", "cpu = -1.0", "`resources.cpu`"),
            ("cpu = 2.0", "cpu = \"two\"", "resources.cpu"),
            ("memory = \"4G\"", "memory = \"lots\"", "`resources.memory`"),
            ("tasks = 256", "tasks = 0", "`resources.tasks`"),
            ("count = 1", "count = 1\nuuids = [\"GPU-1\"]", "`gpus`"),
            ("count = 1", "uuids = [\"3\"]", "`gpus.uuids`"),
            ("[[ports]]\nport = 8080", "[[ports]]\nport = 70000", "ports"),
            (
                "[[ports]]\nport = 8080",
                "[[ports]]\nport = 8080\nprotocol = \"sctp\"",
                "`ports[0].protocol`",
            ),
            ("path = \"/healthz\"", "path = \"healthz\"", "`health.path`"),
            (
                "kind = \"http\"",
                "kind = \"smoke-signal\"",
                "`health.kind`",
            ),
            (
                "path = \"/healthz\"",
                "path = \"/healthz\"\ntimeout_secs = 30",
                "`health.timeout_secs`",
            ),
            (
                "[health]",
                "[restart]\npolicy = \"sometimes\"\n[health]",
                "`restart.policy`",
            ),
            (
                "version = \"1.2.0\"\n",
                "version = \"1.2.0\"\nafter = [\"camera-analytics\"]\n",
                "`after[0]`",
            ),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let err = parse("bad.toml", &text).unwrap_err().to_string();
            assert!(err.contains(key), "{to:?}: {err}");
            assert!(err.contains("bad.toml") && err.contains("fix:"), "{err}");
        }
        // A missing required key is named too.
        let err = parse("bad.toml", &GOOD.replacen("version = \"1.2.0\"", "", 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("version"), "{err}");
    }

    #[test]
    fn an_artifact_must_be_shipped_beside_the_recipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("camera-analytics.toml");
        std::fs::write(&path, GOOD).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("`run.artifact`") && err.contains("does not exist"),
            "{err}"
        );
        std::fs::write(dir.path().join("camera-analytics.py"), "print()").unwrap();
        assert_eq!(load(&path).unwrap().name, "camera-analytics");
        let err = load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(err, RecipeError::Read { .. }));
    }
}
