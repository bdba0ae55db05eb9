//! A recipe as a transient systemd unit: the properties StartTransientUnit gets, with the sandbox every
//! workload runs in. Pure: nothing here talks to systemd.

use crate::recipe::{Recipe, Run};
use crate::systemd::{Prop, UnitSpec, SLICE, UNIT_PREFIX};
use std::path::Path;

/// Where a workload's artifacts appear inside its unit (a read-only bind of the agent's copy). Under /run,
/// a tmpfs, because systemd creates a missing mount point on the real filesystem, which is read-only.
pub const ARTIFACT_MOUNT: &str = "/run/cairn-wl";
/// Environment keys the agent reads back to adopt a running unit after it restarts.
pub const ENV_WORKLOAD: &str = "CAIRN_WORKLOAD";
pub const ENV_VERSION: &str = "CAIRN_RECIPE_VERSION";
pub const ENV_DIGEST: &str = "CAIRN_RECIPE_DIGEST";
pub const PODMAN: &str = "/usr/bin/podman";

/// A GPU a workload may be given: its NVML UUID and device minor (`/dev/nvidia<minor>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    pub uuid: String,
    pub minor: u32,
}

/// The two unit names a workload alternates between, so a new version can start before the old stops.
pub fn unit_name(workload: &str, slot_b: bool) -> String {
    if slot_b {
        format!("{UNIT_PREFIX}{workload}.b.service")
    } else {
        format!("{UNIT_PREFIX}{workload}.service")
    }
}

/// The workload a unit name belongs to, when the unit carries no CAIRN_WORKLOAD.
pub fn workload_of(unit: &str) -> Option<&str> {
    let rest = unit.strip_prefix(UNIT_PREFIX)?.strip_suffix(".service")?;
    Some(rest.strip_suffix(".b").unwrap_or(rest))
}

fn usec(secs: u64) -> u64 {
    secs.saturating_mul(1_000_000)
}

/// The program the unit's ExecStart runs: podman for an image, else the command, inside the artifact
/// mount when it is the shipped artifact.
pub fn program(recipe: &Recipe) -> String {
    match &recipe.run {
        Run::Command { argv, artifact } => match (argv.first(), artifact) {
            (Some(p), Some(a)) if p == a => format!("{ARTIFACT_MOUNT}/{}/{a}", recipe.name),
            (Some(p), _) => p.clone(),
            (None, _) => String::new(),
        },
        Run::Image { .. } => PODMAN.into(),
    }
}

/// The unit for `recipe` at `digest`, its artifacts in `artifact_dir`, given `gpus`.
pub fn spec(
    recipe: &Recipe,
    digest: &str,
    artifact_dir: &Path,
    gpus: &[GpuDevice],
    slot_b: bool,
) -> UnitSpec {
    let name = &recipe.name;
    let mount = format!("{ARTIFACT_MOUNT}/{name}");
    let mut env: Vec<String> = recipe.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("{ENV_WORKLOAD}={name}"));
    env.push(format!("{ENV_VERSION}={}", recipe.version));
    env.push(format!("{ENV_DIGEST}={digest}"));
    if !gpus.is_empty() {
        let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
        env.push(format!("NVIDIA_VISIBLE_DEVICES={}", uuids.join(",")));
        env.push(format!("CUDA_VISIBLE_DEVICES={}", uuids.join(",")));
    }
    if recipe.persistent_data {
        env.push(format!("CAIRN_DATA_DIR=/var/lib/cairn-wl/{name}"));
    }
    let mut p: Vec<(String, Prop)> = Vec::new();
    let mut put = |k: &str, v: Prop| p.push((k.to_owned(), v));
    put(
        "Description",
        Prop::Str(format!("cairn workload {name} {}", recipe.version)),
    );
    put("Slice", Prop::Str(SLICE.into()));
    let is_image = matches!(recipe.run, Run::Image { .. });
    match &recipe.run {
        Run::Command { argv, artifact } => {
            let mut argv = argv.clone();
            if let Some(first) = argv.first_mut() {
                *first = program(recipe);
            }
            if artifact.is_some() {
                put(
                    "BindReadOnlyPaths",
                    Prop::Binds(vec![(
                        artifact_dir.display().to_string(),
                        mount.clone(),
                        false,
                        0,
                    )]),
                );
                put("WorkingDirectory", Prop::Str(mount.clone()));
            }
            put(
                "ExecStart",
                Prop::Exec(vec![(argv[0].clone(), argv, false)]),
            );
        }
        Run::Image { reference, args } => {
            let mut argv: Vec<String> = [PODMAN, "run", "--rm", "--replace", "--network=host"]
                .map(String::from)
                .to_vec();
            argv.push(format!(
                "--name={}",
                unit_name(name, slot_b).trim_end_matches(".service")
            ));
            argv.push("--log-driver=journald".into());
            argv.push("--sdnotify=conmon".into());
            for kv in &env {
                argv.push(format!("--env={kv}"));
            }
            for g in gpus {
                argv.push(format!("--device=/dev/nvidia{}", g.minor));
            }
            if !gpus.is_empty() {
                for d in ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] {
                    argv.push(format!("--device={d}"));
                }
            }
            if recipe.persistent_data {
                argv.push(format!("--volume=/var/lib/cairn-wl/{name}:/data"));
            }
            argv.push(reference.clone());
            argv.extend(args.iter().cloned());
            put("ExecStart", Prop::Exec(vec![(PODMAN.into(), argv, false)]));
            // podman reports readiness itself; the container runs in its own namespaces.
            put("Type", Prop::Str("notify".into()));
            put("NotifyAccess", Prop::Str("all".into()));
        }
    }
    put("Environment", Prop::Strs(env));
    // The sandbox. Image workloads run under podman as root (it needs its storage and namespaces), so
    // they get the resource limits and device policy but not DynamicUser or a read-only system.
    if !is_image {
        put("DynamicUser", Prop::Bool(true));
        put("ProtectSystem", Prop::Str("strict".into()));
        put("ProtectHome", Prop::Str("yes".into()));
        put("PrivateTmp", Prop::Bool(true));
        put("ProtectKernelTunables", Prop::Bool(true));
        put("ProtectKernelModules", Prop::Bool(true));
        put("ProtectControlGroups", Prop::Bool(true));
        put("RestrictSUIDSGID", Prop::Bool(true));
        put("LockPersonality", Prop::Bool(true));
    }
    put("NoNewPrivileges", Prop::Bool(true));
    put("DevicePolicy", Prop::Str("closed".into()));
    if !gpus.is_empty() {
        let mut devs: Vec<(String, String)> = gpus
            .iter()
            .map(|g| (format!("/dev/nvidia{}", g.minor), "rw".to_owned()))
            .collect();
        for d in ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] {
            devs.push((d.to_owned(), "rw".to_owned()));
        }
        put("DeviceAllow", Prop::Devices(devs));
    }
    if let Some(cpu) = recipe.resources.cpu {
        put(
            "CPUQuotaPerSecUSec",
            Prop::U64((cpu * 1_000_000.0).round() as u64),
        );
    }
    if let Some(m) = recipe
        .resources
        .memory
        .as_deref()
        .and_then(crate::recipe::parse_size)
    {
        put("MemoryMax", Prop::U64(m));
    }
    if let Some(t) = recipe.resources.tasks {
        put("TasksMax", Prop::U64(t));
    }
    if recipe.persistent_data {
        put(
            "StateDirectory",
            Prop::Strs(vec![format!("cairn-wl/{name}")]),
        );
    }
    let r = &recipe.restart;
    put("Restart", Prop::Str(r.policy.clone()));
    put("RestartUSec", Prop::U64(usec(r.delay_secs).max(100_000)));
    // systemd gives up after max_restarts restarts within the window: the first start plus the restarts.
    put("StartLimitIntervalUSec", Prop::U64(usec(r.window_secs)));
    put(
        "StartLimitBurst",
        Prop::U32(r.max_restarts.saturating_add(1)),
    );
    if r.policy == "no" {
        // A batch job that finished stays visible as active/exited instead of vanishing.
        put("RemainAfterExit", Prop::Bool(true));
    }
    if r.watchdog_secs > 0 {
        put("WatchdogUSec", Prop::U64(usec(r.watchdog_secs)));
        if !is_image {
            put("NotifyAccess", Prop::Str("all".into()));
        }
    }
    put("TimeoutStopUSec", Prop::U64(usec(15)));
    UnitSpec {
        unit: unit_name(name, slot_b),
        props: p,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn recipe(extra: &str) -> Recipe {
        crate::recipe::parse(
            "t.toml",
            &format!(
                "name = \"cam\"\nversion = \"2\"\n{extra}\n[run.command]\nargv = [\"cam.sh\", \"-v\"]\nartifact = \"cam.sh\"\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn a_command_runs_from_its_read_only_artifact_mount_in_the_sandbox() {
        let s = spec(
            &recipe(""),
            "d1",
            Path::new("/var/lib/cairn/a/cam"),
            &[],
            false,
        );
        assert_eq!(s.unit, "cairn-wl-cam.service");
        assert_eq!(
            s.prop("ExecStart"),
            Some(&Prop::Exec(vec![(
                "/run/cairn-wl/cam/cam.sh".into(),
                vec!["/run/cairn-wl/cam/cam.sh".into(), "-v".into()],
                false
            )]))
        );
        assert_eq!(
            s.prop("BindReadOnlyPaths"),
            Some(&Prop::Binds(vec![(
                "/var/lib/cairn/a/cam".into(),
                "/run/cairn-wl/cam".into(),
                false,
                0
            )]))
        );
        for (k, v) in [
            ("DynamicUser", Prop::Bool(true)),
            ("NoNewPrivileges", Prop::Bool(true)),
            ("PrivateTmp", Prop::Bool(true)),
            ("ProtectSystem", Prop::Str("strict".into())),
            ("DevicePolicy", Prop::Str("closed".into())),
            ("Slice", Prop::Str(SLICE.into())),
            ("StartLimitBurst", Prop::U32(6)),
        ] {
            assert_eq!(s.prop(k), Some(&v), "{k}");
        }
        assert!(s.prop("DeviceAllow").is_none(), "no GPUs asked, no devices");
        assert!(s.prop("WatchdogUSec").is_none());
        let Some(Prop::Strs(env)) = s.prop("Environment") else {
            panic!()
        };
        assert!(env.contains(&"CAIRN_RECIPE_DIGEST=d1".to_owned()));
        assert!(env.contains(&"CAIRN_RECIPE_VERSION=2".to_owned()));
    }

    #[test]
    fn limits_gpus_watchdog_and_data_become_properties() {
        let r = recipe(
            "persistent_data = true\n[resources]\ncpu = 1.5\nmemory = \"512M\"\ntasks = 64\n[restart]\npolicy = \"always\"\nwatchdog_secs = 5\ndelay_secs = 1",
        );
        let gpus = [GpuDevice {
            uuid: "GPU-1".into(),
            minor: 3,
        }];
        let s = spec(&r, "d", Path::new("/a"), &gpus, true);
        assert_eq!(s.unit, "cairn-wl-cam.b.service");
        for (k, v) in [
            ("CPUQuotaPerSecUSec", Prop::U64(1_500_000)),
            ("MemoryMax", Prop::U64(512 << 20)),
            ("TasksMax", Prop::U64(64)),
            ("WatchdogUSec", Prop::U64(5_000_000)),
            ("NotifyAccess", Prop::Str("all".into())),
            ("Restart", Prop::Str("always".into())),
            ("RestartUSec", Prop::U64(1_000_000)),
            ("StateDirectory", Prop::Strs(vec!["cairn-wl/cam".into()])),
        ] {
            assert_eq!(s.prop(k), Some(&v), "{k}");
        }
        let Some(Prop::Devices(d)) = s.prop("DeviceAllow") else {
            panic!()
        };
        assert_eq!(d[0], ("/dev/nvidia3".into(), "rw".into()));
        assert!(d.iter().all(|(p, _)| p.starts_with("/dev/nvidia")));
    }

    #[test]
    fn unit_names_map_back_to_workloads() {
        assert_eq!(workload_of("cairn-wl-cam.service"), Some("cam"));
        assert_eq!(workload_of("cairn-wl-cam.b.service"), Some("cam"));
        assert_eq!(workload_of("sshd.service"), None);
    }
}
