//! `cairnctl diagnose`: one archive (tar, zstd-compressed) for ops with what support asks for first: the
//! versions, the configuration with secrets redacted, the agent's answers (overview, status, health and its
//! events, telemetry spool, workloads, update), the recent journal, and the names and sizes of the files in
//! the data directory. It works when cairnd is down (those parts then say why they are missing) and never
//! reads key material: nothing under `identity/` is opened, and every text is scrubbed before it is packed.

use crate::config::Config;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiagnoseError {
    #[error("cannot write the diagnostics archive {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file of the archive.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub text: String,
}

/// Keys whose values are never shown, whatever table they are in.
const SECRET_KEY_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "private",
    "credential",
];

const REDACTED: &str = "<redacted>";

/// The effective configuration as TOML, with secret-looking keys and URL passwords redacted.
pub fn redacted_config(config: &Config) -> String {
    match toml::Value::try_from(config) {
        Ok(mut v) => {
            redact_value(&mut v, "");
            toml::to_string_pretty(&v)
                .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
        }
        Err(e) => format!("# cannot print the configuration: {e}\n"),
    }
}

fn redact_value(v: &mut toml::Value, key: &str) {
    let lower = key.to_ascii_lowercase();
    match v {
        toml::Value::Table(t) => {
            for (k, inner) in t.iter_mut() {
                redact_value(inner, k);
            }
        }
        toml::Value::Array(a) => {
            for inner in a {
                redact_value(inner, key);
            }
        }
        toml::Value::String(s) => {
            if SECRET_KEY_WORDS.iter().any(|w| lower.contains(w)) && !s.is_empty() {
                *s = REDACTED.into();
            } else {
                *s = scrub(s);
            }
        }
        _ => {
            if SECRET_KEY_WORDS.iter().any(|w| lower.contains(w)) {
                *v = toml::Value::String(REDACTED.into());
            }
        }
    }
}

/// Removes what must never leave the box from free text: PEM private keys, URL passwords, and the values of
/// `password=`/`token=`-style assignments and `Authorization:` headers.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_key = false;
    for line in text.split_inclusive('\n') {
        if line.contains("-----BEGIN") && line.contains("PRIVATE KEY-----") {
            in_key = true;
            out.push_str("<redacted private key>\n");
            continue;
        }
        if in_key {
            if line.contains("-----END") {
                in_key = false;
            }
            continue;
        }
        out.push_str(&scrub_line(line));
    }
    out
}

fn scrub_line(line: &str) -> String {
    let mut s = line.to_owned();
    // scheme://user:password@host → scheme://user:<redacted>@host
    let mut from = 0;
    while let Some(pos) = s[from..].find("://") {
        let start = from + pos + 3;
        let end = s[start..]
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"')
            .map_or(s.len(), |e| start + e);
        if let Some(at) = s[start..end].rfind('@') {
            if let Some(colon) = s[start..start + at].find(':') {
                s.replace_range(start + colon + 1..start + at, REDACTED);
            }
        }
        from = start.min(s.len());
        if from >= s.len() {
            break;
        }
    }
    let lower = s.to_ascii_lowercase();
    if let Some(pos) = lower.find("authorization:") {
        s.replace_range(pos + "authorization:".len().., &format!(" {REDACTED}\n"));
        return s;
    }
    for word in SECRET_KEY_WORDS {
        let lower = s.to_ascii_lowercase();
        let mut search = 0;
        while let Some(p) = lower[search..].find(word) {
            let after = search + p + word.len();
            // The rest of the key name, then `=` or `:`, then the value up to whitespace, a quote or `,`.
            let tail = &s[after..];
            let key_rest = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let t = &tail[key_rest..];
            let sep = t.find(|c: char| c != ' ' && c != '"').unwrap_or(t.len());
            if t[sep..].starts_with('=') || t[sep..].starts_with(':') {
                let vstart = after + key_rest + sep + 1;
                let v = &s[vstart..];
                let skip = v.find(|c: char| c != ' ' && c != '"').unwrap_or(v.len());
                let vlen = v[skip..]
                    .find(|c: char| c.is_whitespace() || c == '"' || c == ',')
                    .unwrap_or(v.len() - skip);
                if vlen > 0 {
                    s.replace_range(vstart + skip..vstart + skip + vlen, REDACTED);
                }
            }
            search = after.min(s.len());
            if search >= s.len() {
                break;
            }
        }
    }
    s
}

/// Names and sizes of the files under the data directory, never their contents.
pub fn data_dir_listing(dir: &Path) -> String {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>, depth: usize) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            out.push(format!("{}: cannot be read", dir.display()));
            return;
        };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path
                .strip_prefix(base)
                .unwrap_or(&path)
                .display()
                .to_string();
            match e.metadata() {
                Ok(m) if m.is_dir() => {
                    out.push(format!("{rel}/"));
                    if depth < 4 {
                        walk(base, &path, out, depth + 1);
                    }
                }
                Ok(m) => out.push(format!("{rel}  {} bytes", m.len())),
                Err(_) => out.push(format!("{rel}  (unreadable)")),
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out, 0);
    let mut s = format!("# {} (names and sizes only)\n", dir.display());
    for l in out {
        s.push_str(&l);
        s.push('\n');
    }
    s
}

/// The recent journal of cairn's units, scrubbed; or why it could not be read.
pub fn journal(lines: usize) -> String {
    let out = std::process::Command::new("journalctl")
        .args([
            "--no-pager",
            "-o",
            "short-iso-precise",
            "-n",
            &lines.to_string(),
            "-u",
            "cairnd",
            "-u",
            "cairn-*",
            "-u",
            "cairn-wl-*",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => scrub(&String::from_utf8_lossy(&o.stdout)),
        Ok(o) => format!(
            "# journalctl failed ({}): {}\n",
            o.status,
            scrub(String::from_utf8_lossy(&o.stderr).trim())
        ),
        Err(e) => format!("# journalctl could not be run: {e}\n"),
    }
}

/// The OS and kernel the box runs.
pub fn versions(agent_version: Option<&str>) -> String {
    let mut s = format!("cairnctl {}\n", env!("CARGO_PKG_VERSION"));
    s.push_str(&match agent_version {
        Some(v) => format!("cairnd {v}\n"),
        None => "cairnd: not reachable\n".into(),
    });
    for f in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Ok(t) = std::fs::read_to_string(f) {
            s.push_str(&format!("\n# {f}\n{t}"));
            break;
        }
    }
    if let Ok(t) = std::fs::read_to_string("/proc/version") {
        s.push_str(&format!("\n# /proc/version\n{t}"));
    }
    if let Ok(t) = std::fs::read_to_string("/proc/cmdline") {
        s.push_str(&format!("\n# /proc/cmdline\n{}", scrub(&t)));
    }
    s
}

/// Writes the parts as `<dir>/<name>` entries of a ustar archive, compressed with zstd, to `path` (through a
/// temporary file, so an interrupted run leaves no half archive under the final name).
pub fn write_archive(
    path: &Path,
    dir: &str,
    parts: &[Part],
    mtime: u64,
) -> Result<(), DiagnoseError> {
    let werr = |source| DiagnoseError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tar = Vec::new();
    for p in parts {
        let name = format!("{dir}/{}", p.name);
        tar.extend_from_slice(&ustar_header(&name, p.text.len() as u64, mtime));
        tar.extend_from_slice(p.text.as_bytes());
        let pad = (512 - p.text.len() % 512) % 512;
        tar.extend(std::iter::repeat_n(0u8, pad));
    }
    tar.extend(std::iter::repeat_n(0u8, 1024));
    let compressed = zstd::bulk::compress(&tar, 3).map_err(werr)?;
    cairn_proto::atomic_file::write(path, &compressed, 0o600).map_err(werr)
}

/// A POSIX ustar header for a regular file, mode 0600, owned by root. Names over 100 bytes are split into
/// prefix and name at a slash, as ustar allows.
fn ustar_header(name: &str, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let (prefix, short) = if name.len() > 100 {
        match name[..name.len().min(155)].rfind('/') {
            Some(cut) if name.len() - cut - 1 <= 100 => (&name[..cut], &name[cut + 1..]),
            _ => ("", &name[name.len() - 100..]),
        }
    } else {
        ("", name)
    };
    let put =
        |h: &mut [u8; 512], at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut h, 0, short.as_bytes());
    put(&mut h, 100, b"0000600\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, format!("{mtime:011o}\0").as_bytes());
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    put(&mut h, 265, b"root");
    put(&mut h, 297, b"root");
    put(&mut h, 345, prefix.as_bytes());
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn private_keys_url_passwords_and_assignments_are_scrubbed() {
        let text = "start\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBx\nabc\n-----END EC PRIVATE KEY-----\n\
                    fetch https://ops:hunter2@fleet.example/v1 failed\n\
                    nut password=pa55word user=ups\n\
                    \"api_token\": \"tok-123\", \"x\": 1\n\
                    Authorization: Bearer eyJabc\n\
                    keep this line\n";
        let s = scrub(text);
        for secret in ["MHcCAQEEIBx", "hunter2", "pa55word", "tok-123", "eyJabc"] {
            assert!(!s.contains(secret), "{secret} left in:\n{s}");
        }
        assert!(s.contains("<redacted private key>"));
        assert!(s.contains("https://ops:<redacted>@fleet.example/v1"), "{s}");
        assert!(
            s.contains("user=ups") && s.contains("keep this line") && s.contains("\"x\": 1"),
            "{s}"
        );
    }

    #[test]
    fn secret_keys_in_the_configuration_are_redacted_wherever_they_are() {
        let mut v: toml::Value = toml::from_str(
            "[power]\nnut_password = \"pw-1\"\n[fleet]\nurl = \"https://a:pw-2@f.example\"\n[x]\nlist = [{ token = \"pw-3\" }]\nport = 80\n",
        )
        .unwrap();
        redact_value(&mut v, "");
        let s = toml::to_string(&v).unwrap();
        for secret in ["pw-1", "pw-2", "pw-3"] {
            assert!(!s.contains(secret), "{secret} left in:\n{s}");
        }
        assert!(s.contains("port = 80"), "{s}");
        let full = redacted_config(&Config::default());
        assert!(
            full.contains("[fleet]") && full.contains("control_socket"),
            "{full}"
        );
    }

    #[test]
    fn the_archive_is_a_tar_that_tar_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d.tar.zst");
        let parts = vec![
            Part {
                name: "MANIFEST.txt".into(),
                text: "hello\n".into(),
            },
            Part {
                name: format!("{}/{}", "d".repeat(60), "x".repeat(60)),
                text: "y".repeat(700),
            },
        ];
        write_archive(&path, "cairn-diagnose-1", &parts, 1_700_000_000).unwrap();
        let tar = zstd::decode_all(std::fs::File::open(&path).unwrap()).unwrap();
        let listing = std::process::Command::new("tar")
            .args(["-tvf", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(&tar)?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(listing.status.success(), "{listing:?}");
        let out = String::from_utf8_lossy(&listing.stdout);
        assert!(out.contains("cairn-diagnose-1/MANIFEST.txt"), "{out}");
        let long = format!("cairn-diagnose-1/{}/{}", "d".repeat(60), "x".repeat(60));
        assert!(out.contains(&long) && out.contains(" 700 "), "{out}");
    }

    #[test]
    fn the_data_dir_listing_has_names_and_sizes_not_contents() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("identity/rsa2048")).unwrap();
        std::fs::write(tmp.path().join("identity/rsa2048/ak.priv"), "SECRETBLOB").unwrap();
        let l = data_dir_listing(tmp.path());
        assert!(l.contains("identity/rsa2048/ak.priv  10 bytes"), "{l}");
        assert!(!l.contains("SECRETBLOB"));
    }
}
