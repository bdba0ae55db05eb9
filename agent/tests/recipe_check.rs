//! `cairnctl recipe check` as a field tech or the fleet's CI runs it: the shipped examples pass, each
//! malformed file fails with its key named, and the exit code says which.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::PathBuf;
use std::process::Command;

fn recipes_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../recipes")
}

fn check(files: &[PathBuf], json: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairnctl"));
    cmd.args(["recipe", "check"]).args(files);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[test]
fn the_shipped_examples_pass() {
    let files: Vec<PathBuf> = std::fs::read_dir(recipes_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    let out = check(&files, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["recipe"]["name"].as_str().unwrap())
        .collect();
    for want in ["camera-analytics", "metrics-sidecar", "nightly-report"] {
        assert!(names.contains(&want), "{names:?}");
    }
}

#[test]
fn each_malformed_recipe_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("no-version", "name = \"a\"\n[run.image]\nreference = \"r\"\n", "version"),
        ("typo", "name = \"a\"\nversion = \"1\"\nrestrat = 1\n[run.image]\nreference = \"r\"\n", "restrat"),
        ("memory", "name = \"a\"\nversion = \"1\"\n[run.image]\nreference = \"r\"\n[resources]\nmemory = \"1 GB\"\n", "resources.memory"),
        ("artifact", "name = \"a\"\nversion = \"1\"\n[run.command]\nargv = [\"a.py\"]\nartifact = \"a.py\"\n", "run.artifact"),
        ("syntax", "name = \"a\nversion = 1\n", "line 1"),
    ];
    let mut files = Vec::new();
    for (name, text, key) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = check(std::slice::from_ref(&path), false);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key) && err.contains(&*path.to_string_lossy()),
            "{name}: {err}"
        );
        files.push(path);
    }
    // Several at once: every file is reported, and one bad file fails the whole check.
    files.push(recipes_dir().join("metrics-sidecar.toml"));
    let out = check(&files, false);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        cases.len()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("metrics-sidecar"));
}
