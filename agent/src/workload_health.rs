//! A workload's health check, run by the agent: an HTTP GET answered 2xx, a TCP connection that opens, or a
//! command that exits 0, each within the recipe's timeout. Checks reach the workload on 127.0.0.1 (units
//! share the host's network); a command runs in the agent's own environment.

use crate::recipe::Health;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ok, or why the check failed, as a phrase.
pub async fn check(h: &Health) -> Result<(), String> {
    let timeout = Duration::from_secs(h.timeout_secs);
    match tokio::time::timeout(timeout, run(h)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", h.timeout_secs)),
    }
}

async fn run(h: &Health) -> Result<(), String> {
    let port = h.port.unwrap_or(0);
    match h.kind.as_str() {
        "tcp" => tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(|_| ())
            .map_err(|e| format!("port {port}: {e}")),
        "http" => {
            let path = h.path.as_deref().unwrap_or("/");
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("port {port}: {e}"))?;
            let req = format!(
                "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: cairnd-health\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("port {port}: {e}"))?;
            // The status line is all that matters; read a little more than it.
            let mut buf = vec![0u8; 256];
            let mut n = 0;
            while n < 13 {
                let got = s
                    .read(&mut buf[n..])
                    .await
                    .map_err(|e| format!("port {port}: {e}"))?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let code = line
                .strip_prefix("HTTP/1.")
                .and_then(|r| r.get(2..5))
                .and_then(|c| c.parse::<u16>().ok());
            match code {
                Some(c) if (200..300).contains(&c) => Ok(()),
                Some(c) => Err(format!("GET {path} answered {c}")),
                None => Err(format!("GET {path} did not answer HTTP")),
            }
        }
        "command" => {
            let out = tokio::process::Command::new(&h.argv[0])
                .args(&h.argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("{}: {e}", h.argv[0]))?;
            if out.success() {
                Ok(())
            } else {
                Err(format!("{} exited with {out}", h.argv[0]))
            }
        }
        other => Err(format!("unknown check kind {other}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn health(kind: &str, port: u16, path: &str) -> Health {
        Health {
            kind: kind.into(),
            port: Some(port),
            path: Some(path.into()),
            argv: vec![],
            interval_secs: 1,
            timeout_secs: 1,
            failures: 1,
        }
    }

    async fn serve(answer: &'static str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_tcp_and_command_checks_pass_and_fail() {
        let ok = serve("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let bad = serve("HTTP/1.1 503 Busy\r\n\r\n").await;
        assert_eq!(check(&health("http", ok, "/healthz")).await, Ok(()));
        let err = check(&health("http", bad, "/healthz")).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        assert_eq!(check(&health("tcp", ok, "/")).await, Ok(()));
        // A port nothing listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(check(&health("tcp", closed, "/")).await.is_err());
        let mut cmd = health("command", 0, "/");
        cmd.argv = vec!["/bin/true".into()];
        assert_eq!(check(&cmd).await, Ok(()));
        cmd.argv = vec!["/bin/false".into()];
        assert!(check(&cmd).await.unwrap_err().contains("exited"));
        cmd.argv = vec!["/bin/sleep".into(), "5".into()];
        assert!(check(&cmd).await.unwrap_err().contains("within 1 s"));
    }
}
