//! The agent's side of the fleet connection: HTTPS (rustls, ring) to the configured fleet, trusting only the
//! CA that ships in the image. Agent-initiated and outbound only: sites sit behind NAT.

use cairn_proto::fleet::{FleetError, FleetInfo, FLEET_PROTOCOL_VERSION, INFO_PATH};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Largest response body the agent reads from the fleet; a broken fleet must not exhaust the device's memory.
const MAX_BODY_BYTES: usize = 1024 * 1024;
const MAX_SET_BYTES: usize = cairn_proto::workload_set::MAX_SET_BYTES;

/// A parsed fleet URL: https only, host and port explicit after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetUrl {
    pub host: String,
    pub port: u16,
}

impl FleetUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url:?} is not an https URL"));
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!(
                "{url:?} has a path; give only scheme, host and port"
            ));
        }
        Ok(FleetUrl {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: uri.port_u16().unwrap_or(443),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("fleet CA file {path} could not be read")]
    CaRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet CA file {path} holds no usable certificate")]
    CaEmpty { path: String },
    #[error("fleet {authority} did not answer within {secs} s")]
    Timeout { authority: String, secs: u64 },
    #[error("could not connect to fleet {authority}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with fleet {authority} failed (is fleet.ca_file the fleet's CA?)")]
    Tls {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with fleet {authority} failed")]
    Http {
        authority: String,
        #[source]
        source: hyper::Error,
    },
    #[error("fleet {authority} answered {path} with status {status}")]
    Status {
        authority: String,
        path: &'static str,
        status: u16,
    },
    /// The fleet said no, with its reason (the body of a non-2xx answer).
    #[error("fleet {authority} refused {path} ({code}): {message}")]
    Refused {
        authority: String,
        path: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("fleet {authority} sent a response to {path} that is not valid: {reason}")]
    Body {
        authority: String,
        path: &'static str,
        reason: String,
    },
    #[error("fleet {authority} speaks protocol versions {offered:?}; this agent speaks {FLEET_PROTOCOL_VERSION}")]
    Version {
        authority: String,
        offered: Vec<u32>,
    },
}

/// A client for one fleet. Cheap to clone; each request opens its own connection (requests are rare).
#[derive(Clone)]
pub struct FleetClient {
    url: FleetUrl,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for FleetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetClient")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl FleetClient {
    pub fn new(url: &str, ca_file: &Path, timeout: Duration) -> Result<Self, UplinkError> {
        Self::build(url, ca_file, timeout, None)
    }

    /// A client that presents a client certificate (the device certificate, its key in the TPM).
    pub fn with_client_cert(
        url: &str,
        ca_file: &Path,
        timeout: Duration,
        identity: Arc<dyn rustls::client::ResolvesClientCert>,
    ) -> Result<Self, UplinkError> {
        Self::build(url, ca_file, timeout, Some(identity))
    }

    fn build(
        url: &str,
        ca_file: &Path,
        timeout: Duration,
        identity: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    ) -> Result<Self, UplinkError> {
        let url = FleetUrl::parse(url).map_err(|reason| UplinkError::Body {
            authority: url.to_owned(),
            path: "/",
            reason,
        })?;
        let path = ca_file.display().to_string();
        let pem = std::fs::read(ca_file).map_err(|source| UplinkError::CaRead {
            path: path.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            // A malformed certificate among good ones is skipped; an empty result is refused below.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(UplinkError::CaEmpty { path });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| UplinkError::Tls {
                authority: url.authority(),
                source: std::io::Error::other(e),
            })?
            .with_root_certificates(roots);
        let config = match identity {
            Some(resolver) => config.with_client_cert_resolver(resolver),
            None => config.with_no_client_auth(),
        };
        Ok(FleetClient {
            url,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    /// `GET /v1/info`, checking that the fleet speaks our protocol. Returns the answer and the round trip.
    pub async fn info(&self) -> Result<(FleetInfo, Duration), UplinkError> {
        let started = Instant::now();
        let body = self.get(INFO_PATH).await?;
        let authority = self.url.authority();
        let info: FleetInfo = serde_json::from_slice(&body).map_err(|e| UplinkError::Body {
            authority: authority.clone(),
            path: INFO_PATH,
            reason: e.to_string(),
        })?;
        if !info.protocol_versions.contains(&FLEET_PROTOCOL_VERSION) {
            return Err(UplinkError::Version {
                authority,
                offered: info.protocol_versions,
            });
        }
        Ok((info, started.elapsed()))
    }

    async fn get(&self, path: &'static str) -> Result<Bytes, UplinkError> {
        Ok(self.exchange(hyper::Method::GET, path, None).await?.body)
    }

    /// One file of the fleet's update repository, `uri` under `/v1/update/`; `None` when the fleet has none.
    pub async fn update_file(&self, uri: &str, limit: usize) -> Result<Option<Bytes>, UplinkError> {
        let path = cairn_proto::update::UPDATE_PATH;
        let authority = self.url.authority();
        let secs = self.timeout.as_secs();
        let answer = tokio::time::timeout(
            self.timeout,
            self.exchange_inner(hyper::Method::GET, path, uri, None, None, limit),
        )
        .await
        .map_err(|_| UplinkError::Timeout { authority, secs })?;
        match answer {
            Ok(a) => Ok(Some(a.body)),
            Err(
                UplinkError::Refused { status: 404, .. } | UplinkError::Status { status: 404, .. },
            ) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/workload-set`, conditional on the ETag of the set the device holds.
    pub async fn workload_set(&self, etag: Option<&str>) -> Result<SetAnswer, UplinkError> {
        let path = cairn_proto::workload_set::WORKLOAD_SET_PATH;
        let authority = self.url.authority();
        let secs = self.timeout.as_secs();
        let answer = tokio::time::timeout(
            self.timeout,
            self.exchange_inner(hyper::Method::GET, path, path, None, etag, MAX_SET_BYTES),
        )
        .await
        .map_err(|_| UplinkError::Timeout { authority, secs })??;
        Ok(match answer.status {
            204 => SetAnswer::NoSet,
            304 => SetAnswer::NotModified,
            _ => SetAnswer::Set {
                bytes: answer.body.to_vec(),
                etag: answer.etag,
            },
        })
    }

    /// POSTs `body` as JSON and reads a JSON answer; a non-2xx answer becomes [`UplinkError::Refused`].
    pub async fn post_json<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
        body: &T,
    ) -> Result<R, UplinkError> {
        let authority = self.url.authority();
        let bytes = serde_json::to_vec(body).map_err(|e| UplinkError::Body {
            authority: authority.clone(),
            path,
            reason: e.to_string(),
        })?;
        let answer = self
            .exchange(hyper::Method::POST, path, Some((bytes, "application/json")))
            .await?
            .body;
        serde_json::from_slice(&answer).map_err(|e| UplinkError::Body {
            authority,
            path,
            reason: e.to_string(),
        })
    }

    /// POSTs raw bytes of `content_type` and reads a JSON answer.
    pub async fn post_bytes<R: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<R, UplinkError> {
        let answer = self
            .exchange(hyper::Method::POST, path, Some((body, content_type)))
            .await?
            .body;
        serde_json::from_slice(&answer).map_err(|e| UplinkError::Body {
            authority: self.url.authority(),
            path,
            reason: e.to_string(),
        })
    }

    /// GETs a JSON document.
    pub async fn get_json<R: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
    ) -> Result<R, UplinkError> {
        let answer = self.get(path).await?;
        serde_json::from_slice(&answer).map_err(|e| UplinkError::Body {
            authority: self.url.authority(),
            path,
            reason: e.to_string(),
        })
    }

    async fn exchange(
        &self,
        method: hyper::Method,
        path: &'static str,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<Answer, UplinkError> {
        let authority = self.url.authority();
        let secs = self.timeout.as_secs();
        tokio::time::timeout(
            self.timeout,
            self.exchange_inner(method, path, path, body, None, MAX_BODY_BYTES),
        )
        .await
        .map_err(|_| UplinkError::Timeout { authority, secs })?
    }

    /// `uri` is what is asked for; `path` names the route in errors.
    async fn exchange_inner(
        &self,
        method: hyper::Method,
        path: &'static str,
        uri: &str,
        body: Option<(Vec<u8>, &'static str)>,
        if_none_match: Option<&str>,
        limit: usize,
    ) -> Result<Answer, UplinkError> {
        let authority = self.url.authority();
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|source| UplinkError::Connect {
                authority: authority.clone(),
                source,
            })?;
        let name = rustls::pki_types::ServerName::try_from(self.url.host.clone()).map_err(|e| {
            UplinkError::Tls {
                authority: authority.clone(),
                source: std::io::Error::other(e),
            }
        })?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|source| UplinkError::Tls {
                authority: authority.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|source| UplinkError::Http {
                authority: authority.clone(),
                source,
            })?;
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(uri);
        if let Some((_, content_type)) = &body {
            req = req.header(hyper::header::CONTENT_TYPE, *content_type);
        }
        if let Some(tag) = if_none_match {
            req = req.header(hyper::header::IF_NONE_MATCH, tag);
        }
        let req = req
            .header(hyper::header::HOST, &authority)
            .header(
                hyper::header::USER_AGENT,
                concat!("cairnd/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(
                body.map(|(bytes, _)| bytes).unwrap_or_default(),
            )))
            .map_err(|e| UplinkError::Body {
                authority: authority.clone(),
                path,
                reason: e.to_string(),
            })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| UplinkError::Http {
                authority: authority.clone(),
                source,
            })?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get(hyper::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| UplinkError::Body {
                authority: authority.clone(),
                path,
                reason: e.to_string(),
            })?
            .to_bytes();
        conn.abort();
        if !matches!(status, 200 | 204 | 304) {
            if let Ok(e) = serde_json::from_slice::<FleetError>(&body) {
                return Err(UplinkError::Refused {
                    authority,
                    path,
                    status,
                    code: e.code,
                    message: e.message,
                });
            }
            return Err(UplinkError::Status {
                authority,
                path,
                status,
            });
        }
        Ok(Answer { status, etag, body })
    }
}

struct Answer {
    status: u16,
    etag: Option<String>,
    body: Bytes,
}

/// The fleet's answer to a workload-set fetch.
#[derive(Debug)]
pub enum SetAnswer {
    /// The fleet has no set for this device.
    NoSet,
    /// The set the device holds (by ETag) is current.
    NotModified,
    Set {
        bytes: Vec<u8>,
        etag: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_urls() {
        assert_eq!(
            FleetUrl::parse("https://fleet.example:8443").unwrap(),
            FleetUrl {
                host: "fleet.example".into(),
                port: 8443
            }
        );
        assert_eq!(FleetUrl::parse("https://fleet.example/").unwrap().port, 443);
        assert_eq!(
            FleetUrl::parse("https://[::1]:9").unwrap().authority(),
            "[::1]:9"
        );
        for bad in ["http://x:1", "fleet.example", "https://x:1/v1", "https://"] {
            assert!(FleetUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
