//! The local control socket: a Unix socket, mode 0600, that only root or the agent's own user may use
//! (checked with SO_PEERCRED as well as by file mode). One JSON request per line, one JSON response per line.

use crate::onboarding::AttestNow;
use crate::status::StatusBoard;
use crate::telemetry::LocalSink;
use cairn_proto::control::HealthReport;
use cairn_proto::control::{Command, Request, Response, CONTROL_VERSION, MAX_LINE_BYTES};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another cairnd is already answering on the control socket {path}")]
    InUse { path: PathBuf },
    #[error("cannot listen on the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach cairnd at {path} (is it running? `systemctl status cairnd`)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control exchange with cairnd at {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cairnd at {path} sent an answer this cairnctl does not understand (versions differ?): {reason}")]
    Protocol { path: PathBuf, reason: String },
    #[error("cairnd refused the request: {message}")]
    Refused { message: String },
}

/// Binds the socket, replacing a stale one left by a crashed agent but never one a live agent answers on.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    // Bind under a restrictive umask so there is no window in which the socket is open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves requests until the listener is dropped (the task is aborted at shutdown).
/// What the control socket answers from.
#[derive(Debug, Clone)]
pub struct Context {
    pub board: StatusBoard,
    /// Onboarding's request channel, when onboarding runs.
    pub attest: Option<mpsc::Sender<AttestNow>>,
    /// Where recent events are kept.
    pub sink: LocalSink,
    /// The telemetry spool, when it opened, and the uplink's last word.
    pub spool: Option<std::sync::Arc<crate::spool::Spool>>,
    pub uplink: std::sync::Arc<std::sync::Mutex<crate::forward::UplinkState>>,
    pub workloads: crate::workloads::Report,
    pub update: crate::update::StatusHandle,
    /// Asks the updater for a check now.
    pub update_check: Option<mpsc::Sender<()>>,
    /// What the overview needs beyond the above.
    pub overview: crate::overview::Sources,
}

pub async fn serve(listener: UnixListener, ctx: Context) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == 0 || c.uid() == own_uid)
            .unwrap_or(false);
        if !allowed {
            tracing::warn!(
                "control socket: refused a client that is neither root nor the agent's user"
            );
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &ctx).await {
                tracing::debug!(error = %e, "control client went away");
            }
        });
    }
}

async fn handle(stream: UnixStream, ctx: &Context) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read.take(MAX_LINE_BYTES as u64 + 1));
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let response = if line.len() > MAX_LINE_BYTES {
            Response::Error {
                message: format!("request longer than {MAX_LINE_BYTES} bytes"),
            }
        } else {
            answer(line.trim_end(), ctx).await
        };
        let mut text = serde_json::to_string(&response).map_err(std::io::Error::other)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
        if line.len() > MAX_LINE_BYTES {
            return Ok(());
        }
        lines.get_mut().set_limit(MAX_LINE_BYTES as u64 + 1);
    }
}

async fn answer(line: &str, ctx: &Context) -> Response {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return Response::Error {
                message: format!("malformed request: {e}"),
            }
        }
    };
    if req.version != CONTROL_VERSION {
        return Response::Error {
            message: format!("control protocol version {} is not supported; this cairnd speaks {CONTROL_VERSION}", req.version),
        };
    }
    match req.command {
        Command::Status => Response::Status(Box::new(ctx.board.snapshot())),
        Command::Overview => Response::Overview(Box::new(crate::overview::snapshot(ctx))),
        Command::UpdateStatus => Response::Update(ctx.update.snapshot()),
        Command::UpdateCheck => match &ctx.update_check {
            // A full queue means a check is already due: that one answers the request too.
            Some(tx) => {
                let _ = tx.try_send(());
                Response::Update(ctx.update.snapshot())
            }
            None => Response::Error {
                message: "updates are off: the image has no update channel (see `cairnctl update status`)".into(),
            },
        },
        Command::Workloads => Response::Workloads(
            ctx.workloads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        ),
        Command::Telemetry => {
            let uplink = ctx.uplink.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Response::Telemetry(crate::forward::status(ctx.spool.as_deref(), &uplink))
        }
        Command::Health => Response::Health(HealthReport {
            components: ctx.board.snapshot().health,
            events: ctx.sink.recent_events(),
        }),
        Command::Attest => {
            let unavailable = |why: &str| Response::Error {
                message: format!("cannot attest: {why}"),
            };
            let Some(attest) = &ctx.attest else {
                return unavailable(
                    "onboarding is not running (see the TPM line of `cairnctl status`)",
                );
            };
            let (tx, rx) = oneshot::channel();
            if attest.send(tx).await.is_err() {
                return unavailable("onboarding has stopped");
            }
            match rx.await {
                Ok(status) => Response::Attest(status),
                Err(_) => unavailable("onboarding stopped before answering"),
            }
        }
    }
}

/// The client side, blocking: what `cairnctl` uses.
pub fn request(path: &Path, command: Command, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut text = serde_json::to_string(&Request {
        version: CONTROL_VERSION,
        command,
    })
    .map_err(|e| ControlError::Protocol {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream.take(MAX_LINE_BYTES as u64 + 1));
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io)?;
    let response: Response =
        serde_json::from_str(line.trim_end()).map_err(|e| ControlError::Protocol {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    match response {
        Response::Error { message } => Err(ControlError::Refused { message }),
        ok => Ok(ok),
    }
}
