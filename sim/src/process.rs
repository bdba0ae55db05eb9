//! Starting and stopping the site's processes. A process is only ever signalled after checking that the PID
//! still runs the program we started, so a recycled PID is never killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the workspace's binaries are: beside this executable (target/<profile>/), or one level up when
/// running from target/<profile>/deps (tests).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// The program a PID runs (its `comm`, at most 15 characters), or None if it has exited or is a zombie.
/// `comm` rather than `cmdline`: the latter reads empty for a moment right after exec.
pub fn program(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let (_, comm) = head.split_once(" (")?;
    // The field after the name is the state; Z means exited but not yet reaped.
    if rest.starts_with('Z') {
        return None;
    }
    Some(comm.to_owned())
}

pub fn is_running(pid: u32, name: &str) -> bool {
    program(pid).as_deref() == Some(name)
}

/// SIGTERM, then SIGKILL after `grace`. Returns whether the process had to be killed.
pub fn stop(pid: u32, name: &str, grace: Duration) -> bool {
    if !is_running(pid, name) {
        return false;
    }
    // SAFETY: kill(2) with a PID we just checked runs `name`; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap(pid);
        if !is_running(pid, name) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    reap(pid);
    true
}

/// Collects the exit status of a child of ours, if it is one; harmless for any other PID.
fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a PID writes only into `status`.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
}

/// Polls `f` every 50 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
