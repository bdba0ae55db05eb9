//! The fleet's HTTPS server. Today it answers `GET /v1/info`; enrolment, attestation, desired state and
//! telemetry ingest are added here as their issues land.

use crate::pki::{self, PkiError};
use cairn_proto::fleet::{FleetError, FleetInfo, FLEET_PROTOCOL_VERSION, INFO_PATH};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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
}

/// A bound, ready-to-serve fleet: the caller knows the address (port 0 resolved) before serving starts.
pub struct Fleet {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    pub local_addr: SocketAddr,
}

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
        let id = pki::load_or_create(&opts.state, &names)?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
            .map_err(|e| ServeError::Tls(e.to_string()))?
            .ok_or_else(|| ServeError::Tls("no private key in the generated PEM".into()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ServeError::Tls(e.to_string()))?
            .with_no_client_auth()
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
        Ok(Fleet {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            local_addr,
        })
    }

    /// Serves until the task is dropped. A bad client only ever costs its own connection.
    pub async fn serve(self) {
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
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, hyper::Error>(route(&req))
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

fn route(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, INFO_PATH) => json(
            StatusCode::OK,
            &FleetInfo {
                name: "cairn-fleet".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                protocol_versions: vec![FLEET_PROTOCOL_VERSION],
            },
        ),
        (_, path) => json(
            StatusCode::NOT_FOUND,
            &FleetError {
                code: "not_found".into(),
                message: format!("{} {path} is not part of fleet protocol v1", req.method()),
            },
        ),
    }
}
