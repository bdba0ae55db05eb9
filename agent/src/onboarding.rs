//! Zero-touch onboarding: find the fleet, enrol the TPM, prove the AK sits beside the EK, attest, receive the
//! device certificate, and re-attest on the fleet's schedule or on demand — resuming after a restart at any
//! point. The state is persisted (`<data_dir>/onboarding.json`) and shown by `cairnctl status`.
//!
//! States: unprovisioned → contacting_fleet → enrolling → [awaiting_approval] → attesting → onboarded, or
//! refused (the fleet's reason) or retrying (our error), each with the time of the next attempt. Retries back
//! off exponentially with jitter between `fleet.retry_min_secs` and `fleet.retry_max_secs`.

use crate::attestation::{self, KeyRole};
use crate::config::Config;
use crate::discovery::{self, DiscoverySettings};
use crate::status::{now_unix, StatusBoard};
use crate::telemetry::{agent_event, kind, Severity, Sink};
use crate::tpm_tls::TpmClientCert;
use crate::uplink::{FleetClient, UplinkError};
use cairn_proto::control::OnboardingStatus;
use cairn_proto::fleet::{
    ActivateRequest, AttestRequest, CertifiedKey, Challenge, EnrollRequest, EnrollResponse,
    Evidence, Hex, PcrValue, Verdict, ACTIVATE_PATH, ATTEST_PATH, CHALLENGE_PATH, ENROLL_PATH,
};
use cairn_tpm::{EkAlgorithm, Tpm};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub const STATE_FILE: &str = "onboarding.json";
const CERT_FILE: &str = "device.crt";
/// The last provisioning file seen, kept on the data partition (see `discovery::DiscoverySettings::kept`).
pub const KEPT_PROVISIONING: &str = "provision.toml";

/// Why an attempt did not end in "onboarded".
enum Failure {
    /// The fleet refused, with its code and reason; try again after `retry_after`.
    Refused {
        code: String,
        message: String,
        retry_after: u64,
    },
    /// The fleet waits for an operator.
    Pending { message: String, retry_after: u64 },
    /// Something on our side or the way there (network, TPM, files).
    Error(String),
    /// The TLS handshake failed (an expired or foreign client certificate looks like this).
    Tls(String),
    /// Nothing names a fleet: no provisioning file, no DNS SRV record, no configured URL.
    Unprovisioned(String),
}

fn chain(e: &dyn std::error::Error) -> String {
    crate::error_chain(e)
}

/// Everything an attempt needs, cheap to clone into blocking tasks.
#[derive(Clone, Debug)]
struct Device {
    tpm: Tpm,
    alg: EkAlgorithm,
    data_dir: PathBuf,
    pcrs: Vec<u8>,
    event_log: PathBuf,
}

impl Device {
    fn cert_path(&self) -> PathBuf {
        attestation::key_dir(&self.data_dir, self.alg).join(CERT_FILE)
    }

    /// Evidence over `nonce`: a quote of the configured PCRs and the event log, if the platform has one.
    fn evidence(&self, nonce: &[u8]) -> Result<Evidence, String> {
        let ak = attestation::load_or_create_ak(&self.tpm, &self.data_dir, self.alg)
            .map_err(|e| chain(&e))?;
        let q = self
            .tpm
            .quote(self.alg, &ak, nonce, &self.pcrs)
            .map_err(|e| chain(&e))?;
        let event_log = match std::fs::read(&self.event_log) {
            Ok(bytes) => Some(Hex(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(format!(
                    "cannot read the event log {}: {e}",
                    self.event_log.display()
                ))
            }
        };
        Ok(Evidence {
            quote: Hex(q.message),
            signature: Hex(q.signature),
            pcrs: q
                .pcr_values
                .into_iter()
                .map(|(index, v)| PcrValue {
                    index,
                    sha256: Hex(v),
                })
                .collect(),
            event_log,
        })
    }

    fn enroll_request(&self) -> Result<EnrollRequest, String> {
        let ak = attestation::load_or_create_ak(&self.tpm, &self.data_dir, self.alg)
            .map_err(|e| chain(&e))?;
        let ek_public = self.tpm.ek_public(self.alg).map_err(|e| chain(&e))?;
        let ek_certificate = self.tpm.ek_certificate(self.alg).map_err(|e| chain(&e))?;
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        Ok(EnrollRequest {
            ek_algorithm: self.alg.as_str().into(),
            ek_public: Hex(ek_public),
            ek_certificate: ek_certificate.map(Hex),
            ak_public: Hex(tpm2b(&ak.public)),
            hostname,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    fn certified(&self, role: KeyRole, nonce: &[u8]) -> Result<CertifiedKey, String> {
        let ak = attestation::load_or_create_ak(&self.tpm, &self.data_dir, self.alg)
            .map_err(|e| chain(&e))?;
        let key = attestation::load_or_create(&self.tpm, &self.data_dir, self.alg, role)
            .map_err(|e| chain(&e))?;
        let c = self
            .tpm
            .certify(self.alg, &ak, &key, nonce)
            .map_err(|e| chain(&e))?;
        Ok(CertifiedKey {
            public: Hex(tpm2b(&key.public)),
            certify_info: Hex(c.message),
            signature: Hex(c.signature),
        })
    }

    /// Activation: the credential, evidence, and both certified keys, all over the challenge's nonce.
    fn activate_request(
        &self,
        device_id: &str,
        challenge: &Challenge,
    ) -> Result<ActivateRequest, String> {
        let credential = challenge
            .credential
            .as_ref()
            .ok_or("the fleet's enrolment challenge carries no credential")?;
        let ak = attestation::load_or_create_ak(&self.tpm, &self.data_dir, self.alg)
            .map_err(|e| chain(&e))?;
        let activated = self
            .tpm
            .activate_credential(
                self.alg,
                &ak,
                &credential.id_object.0,
                &credential.encrypted_secret.0,
            )
            .map_err(|e| chain(&e))?;
        let nonce = &challenge.nonce.0;
        Ok(ActivateRequest {
            device_id: device_id.to_owned(),
            challenge_id: challenge.id.clone(),
            activated_credential: Hex(activated),
            evidence: self.evidence(nonce)?,
            device_key: self.certified(KeyRole::Device, nonce)?,
            telemetry_key: self.certified(KeyRole::Telemetry, nonce)?,
        })
    }

    fn client_identity(&self, cert_pem: &str) -> Result<TpmClientCert, String> {
        let key = attestation::load_or_create(&self.tpm, &self.data_dir, self.alg, KeyRole::Device)
            .map_err(|e| chain(&e))?;
        TpmClientCert::new(self.tpm.clone(), self.alg, key, cert_pem)
    }
}

/// TPMT_PUBLIC → TPM2B_PUBLIC.
fn tpm2b(tpmt: &[u8]) -> Vec<u8> {
    let mut out = (tpmt.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(tpmt);
    out
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a TPM task failed: {e}"))?
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    cairn_proto::atomic_file::write(path, bytes, 0o644)
}

/// Reads the persisted state; a missing file is a fresh device, a damaged one is reported and replaced by a
/// fresh state (the keys and certificate live elsewhere, so nothing is lost but the history line).
pub fn load_state(data_dir: &Path) -> OnboardingStatus {
    let path = data_dir.join(STATE_FILE);
    let fresh = OnboardingStatus {
        state: "unprovisioned".into(),
        detail: "not enrolled with a fleet yet".into(),
        since_unix: now_unix(),
        ..OnboardingStatus::default()
    };
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "onboarding state is damaged; starting over (keys are kept)");
            fresh
        }),
        Err(_) => fresh,
    }
}

/// Backoff for the n-th consecutive failure: min·2ⁿ capped at max, ±20 % jitter so a site's boxes that lost
/// the uplink together do not return together.
pub fn backoff(attempt: u32, min: u64, max: u64, jitter_unit: f64) -> u64 {
    let base = min.saturating_mul(1u64 << attempt.min(20)).min(max) as f64;
    let jittered = base * (0.8 + 0.4 * jitter_unit.clamp(0.0, 1.0));
    (jittered.round() as u64).clamp(1, max.max(1))
}

/// A uniform number in [0, 1] for [`backoff`], so a fleet's boxes do not retry in step.
pub fn jitter_unit() -> f64 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// A request to attest now; answered with the state after the attempt.
pub type AttestNow = oneshot::Sender<OnboardingStatus>;

pub struct Onboarding {
    config: Config,
    device: Device,
    board: StatusBoard,
    status: OnboardingStatus,
    /// Every attempt's outcome goes here as an event (and so to the fleet).
    events: Arc<dyn Sink>,
}

impl std::fmt::Debug for Onboarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Onboarding")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Onboarding {
    pub fn new(config: &Config, board: StatusBoard, events: Arc<dyn Sink>) -> Result<Self, String> {
        let tpm = Tpm::new(&config.tpm.tcti).map_err(|e| chain(&e))?;
        let alg = config.ek_algorithm()?;
        let pcrs = attestation::parse_pcrs(&config.tpm.pcrs).map_err(|e| chain(&e))?;
        let status = load_state(&config.agent.data_dir);
        board.update(|s| s.onboarding = status.clone());
        Ok(Onboarding {
            device: Device {
                tpm,
                alg,
                data_dir: config.agent.data_dir.clone(),
                pcrs,
                event_log: config.event_log_path(),
            },
            config: config.clone(),
            board,
            status,
            events,
        })
    }

    fn set(&mut self, state: &str, detail: impl Into<String>) {
        if self.status.state != state {
            self.status.since_unix = now_unix();
        }
        self.status.state = state.into();
        self.status.detail = detail.into();
        self.publish();
    }

    fn publish(&self) {
        let status = self.status.clone();
        self.board.update(|s| s.onboarding = status);
        let path = self.config.agent.data_dir.join(STATE_FILE);
        match serde_json::to_vec_pretty(&self.status) {
            Ok(bytes) => {
                if let Err(e) = write_atomic(&path, &bytes) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot persist the onboarding state");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the onboarding state"),
        }
    }

    fn settings(&self) -> DiscoverySettings {
        let f = &self.config.fleet;
        DiscoverySettings {
            configured_url: f.url.clone(),
            provisioning_paths: f.provisioning_paths.clone(),
            srv: f.discover_srv,
            resolv_conf: f.resolv_conf.clone(),
            dns_timeout: Duration::from_secs(2),
            nameserver_override: None,
            kept: Some(self.config.agent.data_dir.join(KEPT_PROVISIONING)),
        }
    }

    /// Runs until `shutdown` fires. `attest_now` carries `cairnctl attest` requests.
    pub async fn run(
        mut self,
        mut attest_now: mpsc::Receiver<AttestNow>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        // After a restart in the onboarded state, wait for the scheduled re-attestation; anything else
        // resumes at once.
        let mut waiters: Vec<AttestNow> = Vec::new();
        loop {
            let due = self.status.next_attempt_unix.unwrap_or(0);
            let wait = if self.status.state == "onboarded" || self.status.attempt > 0 {
                due.saturating_sub(now_unix())
            } else {
                0
            };
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
                    req = attest_now.recv() => match req {
                        Some(tx) => waiters.push(tx),
                        None => return,
                    },
                    _ = shutdown.changed() => return,
                }
            }
            tokio::select! {
                _ = self.attempt() => {}
                _ = shutdown.changed() => return,
            }
            while let Ok(tx) = attest_now.try_recv() {
                // Asked while this attempt ran: the attempt answers them too.
                waiters.push(tx);
            }
            for tx in waiters.drain(..) {
                let _ = tx.send(self.status.clone());
            }
        }
    }

    async fn attempt(&mut self) {
        let outcome = self.attempt_inner().await;
        let now = now_unix();
        match outcome {
            Ok(reattest_after) => {
                self.status.attempt = 0;
                self.status.code = None;
                self.status.last_trusted_unix = Some(now);
                self.status.next_attempt_unix = Some(now + reattest_after);
                self.set(
                    "onboarded",
                    format!("trusted by the fleet; next attestation in {reattest_after} s"),
                );
            }
            Err(Failure::Pending {
                message,
                retry_after,
            }) => self.retry_later(
                now,
                retry_after,
                "awaiting_approval",
                Some("pending_approval".into()),
                message,
            ),
            Err(Failure::Unprovisioned(reason)) => {
                self.retry_later(now, 0, "unprovisioned", None, reason)
            }
            Err(Failure::Refused {
                code,
                message,
                retry_after,
            }) => self.retry_later(now, retry_after, "refused", Some(code), message),
            Err(Failure::Error(reason) | Failure::Tls(reason)) => {
                self.retry_later(now, 0, "retrying", None, reason)
            }
        }
        tracing::info!(state = %self.status.state, detail = %self.status.detail, "onboarding");
        let severity = match self.status.state.as_str() {
            "onboarded" => Severity::Info,
            "refused" => Severity::Critical,
            _ => Severity::Warning,
        };
        let code = self
            .status
            .code
            .as_deref()
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        self.events.event(agent_event(
            "attestation",
            kind::ATTESTATION,
            severity,
            format!("{}{code}: {}", self.status.state, self.status.detail),
        ));
    }

    /// Every failure schedules the next try the same way: capped exponential backoff with jitter, never
    /// sooner than the fleet asked (itself capped).
    fn retry_later(
        &mut self,
        now: u64,
        retry_after: u64,
        state: &str,
        code: Option<String>,
        detail: String,
    ) {
        let f = &self.config.fleet;
        let delay = backoff(
            self.status.attempt,
            f.retry_min_secs,
            f.retry_max_secs,
            jitter_unit(),
        )
        .max(retry_after.min(f.retry_max_secs));
        self.status.attempt = self.status.attempt.saturating_add(1);
        self.status.next_attempt_unix = Some(now + delay);
        self.status.code = code;
        self.set(state, detail);
    }

    /// One pass; Ok(seconds until the next attestation) when the fleet said "trusted".
    async fn attempt_inner(&mut self) -> Result<u64, Failure> {
        let settings = self.settings();
        let found = blocking(move || discovery::discover(&settings).map_err(|e| chain(&e)))
            .await
            .map_err(Failure::Error)?;
        let Some(found) = found else {
            return Err(Failure::Unprovisioned(
                "no fleet is named: no provisioning file, no DNS SRV record, and fleet.url is empty; insert the provisioning USB stick or set fleet.url".into(),
            ));
        };
        if self.status.fleet_url.as_deref() != Some(found.url.as_str()) {
            tracing::info!(url = %found.url, source = %found.source, "fleet found");
        }
        self.status.fleet_url = Some(found.url.clone());
        self.status.fleet_source = Some(found.source.to_string());
        self.status.site = found.site.clone();
        self.set("contacting_fleet", format!("reaching {}", found.url));
        let timeout = Duration::from_secs(self.config.fleet.timeout_secs);
        let ca = self.config.fleet.ca_file.clone();

        // A device holding a certificate re-attests over mTLS; it enrols again only if the fleet no longer
        // honours that certificate.
        let cert_path = self.device.cert_path();
        if let Ok(cert_pem) = std::fs::read_to_string(&cert_path) {
            match self.reattest(&found.url, &ca, timeout, &cert_pem).await {
                Err(Failure::Refused { code, .. })
                    if code == "certificate_not_honoured" || code == "device_refused" =>
                {
                    tracing::info!(%code, "the fleet no longer honours our certificate; enrolling again");
                    let _ = std::fs::remove_file(&cert_path);
                }
                // A handshake the fleet refuses (an expired or foreign certificate) never reaches a route
                // that could say so: enrol again, keeping the certificate until a new one arrives.
                Err(Failure::Tls(reason)) => {
                    tracing::info!(%reason, "mTLS with the fleet failed; enrolling again");
                }
                other => return other,
            }
        }
        self.enroll(&found.url, &ca, timeout).await
    }

    async fn reattest(
        &mut self,
        url: &str,
        ca: &Path,
        timeout: Duration,
        cert_pem: &str,
    ) -> Result<u64, Failure> {
        self.set("attesting", "re-attesting over mTLS");
        let device = self.device.clone();
        let pem = cert_pem.to_owned();
        let identity = blocking(move || device.client_identity(&pem))
            .await
            .map_err(Failure::Error)?;
        let client = FleetClient::with_client_cert(url, ca, timeout, Arc::new(identity))
            .map_err(|e| Failure::Error(chain(&e)))?;
        let challenge: Challenge = client
            .post_json(CHALLENGE_PATH, &serde_json::json!({}))
            .await
            .map_err(|e| match e {
                // Under TLS 1.3 the client finishes its handshake before the server checks the client
                // certificate, so a refused (e.g. expired) certificate surfaces as a failed HTTP exchange.
                UplinkError::Tls { .. } | UplinkError::Http { .. } => Failure::Tls(chain(&e)),
                other => uplink_failure(other),
            })?;
        let device = self.device.clone();
        let nonce = challenge.nonce.0.clone();
        let evidence = blocking(move || device.evidence(&nonce))
            .await
            .map_err(Failure::Error)?;
        let verdict: Verdict = client
            .post_json(
                ATTEST_PATH,
                &AttestRequest {
                    challenge_id: challenge.id,
                    evidence,
                },
            )
            .await
            .map_err(uplink_failure)?;
        self.store_certificate(&verdict)?;
        verdict_outcome(verdict)
    }

    /// Keeps a certificate the fleet sent (first one, or a renewal).
    fn store_certificate(&self, verdict: &Verdict) -> Result<(), Failure> {
        if let Verdict::Trusted {
            certificate_pem: Some(pem),
            ..
        } = verdict
        {
            let path = self.device.cert_path();
            write_atomic(&path, pem.as_bytes()).map_err(|e| {
                Failure::Error(format!(
                    "cannot store the device certificate at {}: {e}",
                    path.display()
                ))
            })?;
        }
        Ok(())
    }

    async fn enroll(&mut self, url: &str, ca: &Path, timeout: Duration) -> Result<u64, Failure> {
        self.set("enrolling", "sending the TPM's identity to the fleet");
        let client = FleetClient::new(url, ca, timeout).map_err(|e| Failure::Error(chain(&e)))?;
        let device = self.device.clone();
        let req = blocking(move || device.enroll_request())
            .await
            .map_err(Failure::Error)?;
        let resp: EnrollResponse = client
            .post_json(ENROLL_PATH, &req)
            .await
            .map_err(uplink_failure)?;
        let (device_id, challenge) = match resp {
            EnrollResponse::Challenge {
                device_id,
                challenge,
            } => (device_id, challenge),
            EnrollResponse::Pending {
                device_id,
                message,
                retry_after_secs,
            } => {
                self.status.device_id = Some(device_id);
                return Err(Failure::Pending {
                    message,
                    retry_after: retry_after_secs,
                });
            }
            EnrollResponse::Refused {
                device_id,
                code,
                message,
                retry_after_secs,
            } => {
                self.status.device_id = Some(device_id);
                return Err(Failure::Refused {
                    code,
                    message,
                    retry_after: retry_after_secs,
                });
            }
        };
        self.status.device_id = Some(device_id.clone());
        self.set(
            "attesting",
            "activating the fleet's credential and quoting the boot state",
        );
        let device = self.device.clone();
        let id = device_id.clone();
        let req = blocking(move || device.activate_request(&id, &challenge))
            .await
            .map_err(Failure::Error)?;
        let verdict: Verdict = client
            .post_json(ACTIVATE_PATH, &req)
            .await
            .map_err(uplink_failure)?;
        self.store_certificate(&verdict)?;
        verdict_outcome(verdict)
    }
}

fn uplink_failure(e: UplinkError) -> Failure {
    match e {
        // A fleet that fails inside (5xx) has not judged the device: try again later, not "refused".
        UplinkError::Refused { status, .. } if status >= 500 => Failure::Error(chain(&e)),
        UplinkError::Refused { code, message, .. } => Failure::Refused {
            code,
            message,
            retry_after: 0,
        },
        other => Failure::Error(chain(&other)),
    }
}

fn verdict_outcome(v: Verdict) -> Result<u64, Failure> {
    match v {
        Verdict::Trusted {
            reattest_after_secs,
            ..
        } => Ok(reattest_after_secs.max(1)),
        Verdict::Refused {
            code,
            message,
            retry_after_secs,
            ..
        } => Err(Failure::Refused {
            code,
            message,
            retry_after: retry_after_secs,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(0, 5, 300, 0.5), 5);
        assert_eq!(backoff(1, 5, 300, 0.5), 10);
        assert_eq!(backoff(3, 5, 300, 0.5), 40);
        assert_eq!(backoff(10, 5, 300, 0.5), 300);
        assert_eq!(backoff(u32::MAX, 5, 300, 0.5), 300);
        assert_eq!(backoff(0, 10, 300, 0.0), 8);
        assert_eq!(backoff(0, 10, 300, 1.0), 12);
        // Jitter never pushes past the cap.
        assert_eq!(backoff(10, 5, 300, 1.0), 300);
    }

    #[test]
    fn damaged_state_file_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert_eq!(load_state(dir.path()).state, "unprovisioned");
        let s = OnboardingStatus {
            state: "onboarded".into(),
            device_id: Some("000b11".into()),
            ..OnboardingStatus::default()
        };
        std::fs::write(dir.path().join(STATE_FILE), serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(load_state(dir.path()), s);
    }
}
