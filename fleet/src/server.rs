//! The fleet's HTTPS server: `/v1/info`, enrolment and activation (no client certificate), and the mTLS
//! routes a device uses once it holds a fleet certificate. Also serves the admin socket in the state dir.

use crate::admin::{AdminRequest, AdminResponse, ADMIN_SOCKET};
use crate::attestation::{Attestor, BadRequest, Policy};
use crate::ingest::Ingest;
use crate::pki::{self, PkiError};
use crate::store::{self, Store, StoreError, StoreLock};
use cairn_proto::fleet::{
    ActivateRequest, AttestRequest, EnrollRequest, FleetError, FleetInfo, ACTIVATE_PATH,
    ATTEST_PATH, CHALLENGE_PATH, ENROLL_PATH, FLEET_PROTOCOL_VERSION, INFO_PATH,
};
use cairn_proto::telemetry::TELEMETRY_PATH;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the fleet state directory {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error("another cairn-fleet serves {0}; stop it first (its admin commands work meanwhile)")]
    Busy(PathBuf),
    #[error("cannot open the admin socket {path}")]
    Admin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fleet's TLS configuration is not usable: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub state: PathBuf,
    /// DNS names and IP addresses for the server certificate, besides the listen address.
    pub names: Vec<String>,
    pub policy: Policy,
}

/// Request bodies are small JSON; the event log is the largest part (a real one is tens of KiB, hex doubles it).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// A bound, ready-to-serve fleet: the caller knows the address (port 0 resolved) before serving starts.
pub struct Fleet {
    listener: TcpListener,
    admin: tokio::net::UnixListener,
    acceptor: tokio_rustls::TlsAcceptor,
    attestor: Arc<Mutex<Attestor>>,
    ingest: Arc<Mutex<Ingest>>,
    state: Arc<PathBuf>,
    _lock: StoreLock,
    pub local_addr: SocketAddr,
}

type Shared = Arc<Mutex<Attestor>>;

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    pub async fn bind(opts: &ServeOptions) -> Result<Self, ServeError> {
        std::fs::create_dir_all(&opts.state).map_err(|source| ServeError::State {
            path: opts.state.clone(),
            source,
        })?;
        let mut names = opts.names.clone();
        names.push(opts.listen.ip().to_string());
        names.push("localhost".into());
        names.sort();
        names.dedup();
        let lock =
            store::try_lock(&opts.state)?.ok_or_else(|| ServeError::Busy(opts.state.clone()))?;
        let store = Store::open(&opts.state, &lock)?;
        let ingest = Ingest::open(&opts.state)?;
        let id = pki::load_or_create(&opts.state, &names)?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
            .map_err(|e| ServeError::Tls(e.to_string()))?
            .ok_or_else(|| ServeError::Tls("no private key in the generated PEM".into()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls_pemfile::certs(&mut id.ca_pem.as_bytes()) {
            roots
                .add(ca.map_err(|e| ServeError::Tls(e.to_string()))?)
                .map_err(|e| ServeError::Tls(e.to_string()))?;
        }
        // Client certificates are optional at the TLS layer: enrolment happens before a device has one. The
        // routes that need one check it (and whether the fleet still honours it) themselves.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ServeError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: opts.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Listen {
            addr: opts.listen,
            source,
        })?;
        let admin_path = opts.state.join(ADMIN_SOCKET);
        // We hold the lock, so a socket file left here belongs to a dead server.
        let _ = std::fs::remove_file(&admin_path);
        let admin = {
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            let bound = tokio::net::UnixListener::bind(&admin_path);
            nix::sys::stat::umask(old);
            bound.map_err(|source| ServeError::Admin {
                path: admin_path.clone(),
                source,
            })?
        };
        Ok(Fleet {
            listener,
            admin,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            attestor: Arc::new(Mutex::new(Attestor::new(opts.policy.clone(), store, id))),
            ingest: Arc::new(Mutex::new(ingest)),
            state: Arc::new(opts.state.clone()),
            _lock: lock,
            local_addr,
        })
    }

    /// Re-exports the samples ingested from now on with Prometheus remote write (`serve --remote-write`).
    pub fn export_to(&self, exporter: crate::remote_write::Exporter) {
        self.ingest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .export_to(exporter);
    }

    /// Serves until the task is dropped. A bad client only ever costs its own connection.
    pub async fn serve(self) {
        tokio::spawn(serve_admin(self.admin, self.attestor.clone()));
        let attestor = self.attestor;
        let ingest = self.ingest;
        let state = self.state;
        let _lock = self._lock;
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let attestor = attestor.clone();
            let ingest = ingest.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let serial = client_serial(&tls);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let attestor = attestor.clone();
                    let ingest = ingest.clone();
                    let state = state.clone();
                    let serial = serial.clone();
                    async move {
                        Ok::<_, hyper::Error>(route(req, attestor, ingest, &state, serial).await)
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

fn status_only(status: StatusCode, etag: Option<&str>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    if let Some(v) = etag.and_then(|t| hyper::header::HeaderValue::from_str(t).ok()) {
        resp.headers_mut().insert(hyper::header::ETAG, v);
    }
    resp
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The serial of the client certificate, if the client presented one (rustls has verified it chains to the
/// fleet CA by now).
fn client_serial(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Option<Vec<u8>> {
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(parsed.serial().to_vec())
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(
        status,
        &FleetError {
            code: code.into(),
            message: message.into(),
        },
    )
}

fn bad_request(e: BadRequest) -> Response<Full<Bytes>> {
    match e {
        BadRequest::Malformed(m) => error(StatusCode::BAD_REQUEST, "malformed", m),
        e @ BadRequest::UnknownDevice(_) => {
            error(StatusCode::NOT_FOUND, "unknown_device", e.to_string())
        }
        e @ (BadRequest::Store(_) | BadRequest::Internal(_)) => {
            tracing::error!(error = %crate::error_chain(&e), "request failed inside the fleet");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    }
}

/// An answer that ends a request early (boxed: responses are large next to the values they stand in for).
type Early = Box<Response<Full<Bytes>>>;

async fn raw_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Early> {
    Ok(Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body could not be read: {e}"),
            ))
        })?
        .to_bytes())
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Early> {
    let bytes = Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body could not be read: {e}"),
            ))
        })?
        .to_bytes();
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!(
                "the request body is not valid at {}: {}",
                e.path(),
                e.inner()
            ),
        ))
    })
}

fn lock(attestor: &Shared) -> std::sync::MutexGuard<'_, Attestor> {
    // A handler that panicked leaves the attestor as consistent as its last completed store write.
    attestor.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device behind a client certificate, or the answer that refuses the request.
fn mtls_device(attestor: &Shared, serial: Option<&[u8]>) -> Result<String, Early> {
    let Some(serial) = serial else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "certificate_required",
            "this route needs the device certificate the fleet issued at onboarding",
        )));
    };
    lock(attestor)
        .device_for_serial(serial)
        .map_err(|r| Box::new(error(StatusCode::FORBIDDEN, &r.code, r.message)))
}

async fn route(
    req: Request<Incoming>,
    attestor: Shared,
    ingest: Arc<Mutex<Ingest>>,
    state: &std::path::Path,
    serial: Option<Vec<u8>>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let serial = serial.as_deref();
    macro_rules! or_return {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(resp) => return *resp,
            }
        };
    }
    match (&method, path.as_str()) {
        (&hyper::Method::GET, INFO_PATH) => json(
            StatusCode::OK,
            &FleetInfo {
                name: "cairn-fleet".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                protocol_versions: vec![FLEET_PROTOCOL_VERSION],
            },
        ),
        (&hyper::Method::POST, ENROLL_PATH) => {
            let r: EnrollRequest = or_return!(body(req).await);
            match lock(&attestor).enroll(&r) {
                Ok(resp) => json(StatusCode::OK, &resp),
                Err(e) => bad_request(e),
            }
        }
        (&hyper::Method::POST, ACTIVATE_PATH) => {
            let r: ActivateRequest = or_return!(body(req).await);
            match lock(&attestor).activate(&r) {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => bad_request(e),
            }
        }
        (&hyper::Method::POST, CHALLENGE_PATH) => {
            let device = or_return!(mtls_device(&attestor, serial));
            match lock(&attestor).reattestation_challenge(&device) {
                Ok(c) => json(StatusCode::OK, &c),
                Err(e) => bad_request(e),
            }
        }
        (&hyper::Method::POST, ATTEST_PATH) => {
            let device = or_return!(mtls_device(&attestor, serial));
            let r: AttestRequest = or_return!(body(req).await);
            match lock(&attestor).attest(&device, &r) {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => bad_request(e),
            }
        }
        (&hyper::Method::POST, TELEMETRY_PATH) => {
            let device = or_return!(mtls_device(&attestor, serial));
            let Some(key) = lock(&attestor).telemetry_key(&device) else {
                return error(
                    StatusCode::CONFLICT,
                    "no_telemetry_key",
                    format!("device {device} has no certified telemetry key; enrol again"),
                );
            };
            let body = or_return!(raw_body(req, cairn_proto::telemetry::MAX_SIGNED_BYTES).await);
            let mut ingest = ingest.lock().unwrap_or_else(|p| p.into_inner());
            match ingest.accept(&device, &key, &body) {
                Ok(Ok(ack)) => json(StatusCode::OK, &ack),
                Ok(Err(r)) => {
                    let status = if r.code == "telemetry_malformed" {
                        StatusCode::BAD_REQUEST
                    } else {
                        StatusCode::FORBIDDEN
                    };
                    error(status, r.code, r.message)
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "telemetry ingest failed");
                    error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                }
            }
        }
        (&hyper::Method::GET, cairn_proto::workload_set::WORKLOAD_SET_PATH) => {
            let device = or_return!(mtls_device(&attestor, serial));
            let tag = req
                .headers()
                .get(hyper::header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok());
            match crate::workloads::current_set(&state.join(crate::workloads::DIR), &device) {
                Ok(None) => status_only(StatusCode::NO_CONTENT, None),
                Ok(Some((_, etag))) if tag == Some(etag.as_str()) => {
                    status_only(StatusCode::NOT_MODIFIED, Some(&etag))
                }
                Ok(Some((bytes, etag))) => {
                    let mut resp = status_only(StatusCode::OK, Some(&etag));
                    *resp.body_mut() = Full::new(Bytes::from(bytes));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            cairn_proto::workload_set::SET_MEDIA_TYPE,
                        ),
                    );
                    resp
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "cannot read the workload set");
                    error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                }
            }
        }
        (&hyper::Method::GET, path) if path.starts_with(cairn_proto::update::UPDATE_PATH) => {
            // The update repository is public: TUF signatures, not the channel, make it trustworthy,
            // and a device not yet onboarded must be able to update.
            update_file(
                &state.join(crate::update_repo::DIR),
                &path[cairn_proto::update::UPDATE_PATH.len()..],
            )
            .await
        }
        (_, path) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{method} {path} is not part of fleet protocol v1"),
        ),
    }
}

/// One file of the update repository: `metadata/<file>` or `targets/<file>`, nothing else.
async fn update_file(repo: &std::path::Path, rel: &str) -> Response<Full<Bytes>> {
    let plain = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
    };
    let parts: Vec<&str> = rel.split('/').collect();
    let allowed = match parts.as_slice() {
        ["metadata", file] => plain(file),
        ["targets", file] => plain(file),
        _ => false,
    };
    let missing = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the update repository has no {rel}"),
        )
    };
    if !allowed {
        return missing();
    }
    match tokio::fs::read(repo.join(rel)).await {
        Ok(bytes) => {
            let mut resp = status_only(StatusCode::OK, None);
            *resp.body_mut() = Full::new(Bytes::from(bytes));
            resp
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing(),
        Err(e) => {
            tracing::error!(file = %repo.join(rel).display(), error = %e, "cannot read the update repository");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot read {rel}"),
            )
        }
    }
}

async fn serve_admin(listener: tokio::net::UnixListener, attestor: Shared) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let attestor = attestor.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(1024 * 1024));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<AdminRequest>(&line) {
                Ok(req) => lock(&attestor).admin(&req),
                Err(e) => AdminResponse::Error {
                    message: format!("the admin request is not valid: {e}"),
                },
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}
