//! Store and forward: every sample and event goes into the spool ([`SpoolSink`]); once the device is onboarded,
//! the forwarder sends the spool's oldest records in batches signed inside the TPM with the telemetry key, over
//! mTLS, and forgets them when the fleet acknowledges them. One batch in flight at a time, so a slow or broken
//! fleet never grows memory.

use crate::attestation::{self, KeyRole};
use crate::config::Config;
use crate::spool::{RecordBody, Spool};
use crate::status::{now_unix, StatusBoard};
use crate::telemetry::{kind, Event, LocalSink, OnChange, Sample, Sink};
use crate::tpm_tls::TpmClientCert;
use crate::uplink::FleetClient;
use cairn_proto::control::TelemetryStatus;
use cairn_proto::telemetry::{
    sign_batch, Batch, BatchAck, WireBody, WireRecord, TELEMETRY_MEDIA_TYPE, TELEMETRY_PATH,
};
use cairn_tpm::{EkAlgorithm, Tpm};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The sink the collectors write to: `/metrics` and `cairnctl health` see the latest values (the local sink),
/// the spool keeps everything for the fleet.
#[derive(Clone)]
pub struct SpoolSink {
    pub local: LocalSink,
    pub spool: Option<Arc<Spool>>,
}

impl std::fmt::Debug for SpoolSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolSink")
            .field("spool", &self.spool.is_some())
            .finish()
    }
}

impl Sink for SpoolSink {
    fn samples(&self, source: &'static str, samples: Vec<Sample>) {
        if let Some(spool) = &self.spool {
            let now = crate::health::now_ms();
            let items = samples.iter().map(|s| (now, RecordBody::from(s))).collect();
            if let Err(e) = spool.append_many(items) {
                tracing::warn!(error = %crate::error_chain(&e), "telemetry spool refused samples");
            }
        }
        self.local.samples(source, samples);
    }

    fn event(&self, event: Event) {
        if let Some(spool) = &self.spool {
            if let Err(e) = spool.append(event.at_unix_ms, RecordBody::Event(event.clone())) {
                tracing::warn!(error = %crate::error_chain(&e), "telemetry spool refused an event");
            }
        }
        self.local.event(event);
    }
}

/// What `cairnctl telemetry` shows about the uplink side.
#[derive(Debug, Default, Clone)]
pub struct UplinkState {
    pub last_upload_unix: Option<u64>,
    pub last_upload: Option<String>,
    pub waiting_for: Option<String>,
}

pub fn status(spool: Option<&Spool>, uplink: &UplinkState) -> TelemetryStatus {
    let now_ms = crate::health::now_ms();
    let stats = spool.map(|s| s.stats());
    TelemetryStatus {
        depth: stats.as_ref().map_or(0, |s| s.depth),
        oldest_unsent_age_secs: stats
            .as_ref()
            .and_then(|s| s.oldest_unacked_at_unix_ms)
            .map(|t| now_ms.saturating_sub(t) / 1000),
        bytes_used: stats.as_ref().map_or(0, |s| s.bytes_used),
        budget_bytes: stats.as_ref().map_or(0, |s| s.budget_bytes),
        durable_seq: stats.as_ref().map_or(0, |s| s.durable_seq),
        acked_seq: stats.as_ref().map_or(0, |s| s.acked_seq),
        thinned_samples: stats.as_ref().map_or(0, |s| s.drops.thinned_samples),
        dropped_samples: stats.as_ref().map_or(0, |s| s.drops.dropped_samples),
        dropped_events: stats.as_ref().map_or(0, |s| s.drops.dropped_events),
        last_upload_unix: uplink.last_upload_unix,
        last_upload: uplink.last_upload.clone(),
        waiting_for: if spool.is_none() {
            Some("the spool could not be opened (see the agent's log)".into())
        } else {
            uplink.waiting_for.clone()
        },
    }
}

/// The id of this spool's sequence stream (sent as the batch's `boot_id`): the fleet dedupes by (device, id,
/// seq). The spool's sequences never restart while the spool lives, so the id lives as long as the spool: it is
/// made anew when the spool is new (nothing ever written or acknowledged), so a reset spool's seq 1 is not
/// mistaken for a duplicate.
fn stream_id(data_dir: &std::path::Path, spool: &Spool) -> String {
    let path = data_dir.join("spool-stream-id");
    let stats = spool.stats();
    let fresh = stats.durable_seq == 0 && stats.acked_seq == 0;
    if !fresh {
        if let Ok(id) = std::fs::read_to_string(&path) {
            let id = id.trim();
            if !id.is_empty() {
                return id.to_owned();
            }
        }
    }
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let id = cairn_proto::fleet::to_hex(&b);
    if let Err(e) = std::fs::write(&path, &id) {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the telemetry stream id");
    }
    id
}

fn wire(r: crate::spool::Record) -> WireRecord {
    WireRecord {
        seq: r.seq,
        at_unix_ms: r.at_unix_ms,
        body: match r.body {
            RecordBody::Sample {
                name,
                labels,
                value,
                counter,
            } => WireBody::Sample {
                name,
                labels,
                value,
                counter,
            },
            RecordBody::Event(e) => WireBody::Event {
                component: e.component,
                kind: e.kind,
                severity: format!("{:?}", e.severity).to_lowercase(),
                message: e.message,
            },
        },
    }
}

pub struct Forwarder {
    pub spool: Arc<Spool>,
    pub board: StatusBoard,
    pub state: Arc<Mutex<UplinkState>>,
    /// Upload failures and recoveries are events of their own.
    events: Arc<dyn Sink>,
    tpm: Tpm,
    alg: EkAlgorithm,
    config: Config,
    boot_id: String,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

/// Most bytes (by `Record::approx_bytes`) read from the spool for one batch.
const PENDING_BYTES: usize = 8 << 20;

/// Errors worth a retry later, as one sentence.
type Attempt = Result<Option<(BatchAck, bool)>, String>;

impl Forwarder {
    pub fn new(
        config: &Config,
        spool: Arc<Spool>,
        board: StatusBoard,
        state: Arc<Mutex<UplinkState>>,
        events: Arc<dyn Sink>,
    ) -> Result<Self, String> {
        Ok(Forwarder {
            events,
            boot_id: stream_id(&config.agent.data_dir, &spool),
            spool,
            board,
            state,
            tpm: Tpm::new(&config.tpm.tcti).map_err(|e| crate::error_chain(&e))?,
            alg: config.ek_algorithm()?,
            config: config.clone(),
        })
    }

    fn set(&self, f: impl FnOnce(&mut UplinkState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut failures = 0u32;
        let mut outcome = OnChange::default();
        loop {
            let interval = Duration::from_secs(self.config.telemetry.upload_interval_secs);
            let result = self.once().await;
            let now = match &result {
                Ok(Some(_)) => Some(Ok(())),
                Ok(None) => None,
                Err(reason) => Some(Err(reason.as_str())),
            };
            if let Some(event) = now.and_then(|o| {
                outcome.observe(
                    o,
                    "telemetry_uplink",
                    kind::AGENT_ERROR,
                    "telemetry upload failed",
                    "telemetry uploads work again",
                )
            }) {
                self.events.event(event);
            }
            let wait = match result {
                // A full batch: a backlog is draining, send the next one at once.
                Ok(Some((ack, true))) => {
                    failures = 0;
                    self.note_ok(&ack);
                    Duration::ZERO
                }
                // Caught up: wait, so one mTLS handshake and one TPM signature carry many polls' records.
                Ok(Some((ack, false))) => {
                    failures = 0;
                    self.note_ok(&ack);
                    interval
                }
                Ok(None) => interval
                    .min(Duration::from_secs(1))
                    .max(Duration::from_millis(500)),
                Err(reason) => {
                    failures = failures.saturating_add(1);
                    let f = &self.config.fleet;
                    let secs = crate::onboarding::backoff(
                        failures - 1,
                        f.retry_min_secs,
                        f.retry_max_secs,
                        crate::onboarding::jitter_unit(),
                    );
                    tracing::warn!(%reason, retry_in_secs = secs, "telemetry upload failed ({reason}); retrying in {secs} s");
                    self.set(|s| {
                        s.last_upload_unix = Some(now_unix());
                        s.last_upload = Some(reason);
                    });
                    Duration::from_secs(secs)
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
            } else if *shutdown.borrow() {
                return;
            }
        }
    }

    fn note_ok(&self, ack: &BatchAck) {
        self.set(|s| {
            s.last_upload_unix = Some(now_unix());
            s.last_upload = Some(format!(
                "ok: acknowledged up to {} ({} duplicates)",
                ack.acked_up_to, ack.duplicates
            ));
            s.waiting_for = None;
        });
    }

    /// One batch: Ok(None) when there is nothing to send or the device is not onboarded yet; otherwise the
    /// fleet's answer and whether the batch was full (more is probably waiting).
    async fn once(&self) -> Attempt {
        let onboarding = self.board.snapshot().onboarding;
        let (Some(device_id), Some(url)) = (onboarding.device_id.clone(), onboarding.fleet_url)
        else {
            self.set(|s| s.waiting_for = Some("the device is not onboarded yet".into()));
            return Ok(None);
        };
        let cert_path =
            attestation::key_dir(&self.config.agent.data_dir, self.alg).join("device.crt");
        let Ok(cert_pem) = std::fs::read_to_string(&cert_path) else {
            self.set(|s| s.waiting_for = Some("the device has no fleet certificate yet".into()));
            return Ok(None);
        };
        let spool = self.spool.clone();
        let after = spool.stats().acked_seq;
        let max = self.config.telemetry.batch_records;
        let records = tokio::task::spawn_blocking(move || spool.pending(after, max, PENDING_BYTES))
            .await
            .map_err(|e| format!("the spool task failed: {e}"))?
            .map_err(|e| crate::error_chain(&e))?;
        // Full by count or by the byte limit `pending` applies: either way more is probably waiting.
        let bytes: usize = records.iter().map(|r| r.approx_bytes()).sum();
        let full = records.len() >= max || bytes + (64 << 10) >= PENDING_BYTES;
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            self.set(|s| s.waiting_for = None);
            return Ok(None);
        };
        let (batch_device, batch_last) = (device_id.clone(), last.seq);
        let batch = Batch {
            device_id,
            boot_id: self.boot_id.clone(),
            // Everything between the last acknowledgement and the first record was thinned away on the device.
            first_seq: (after + 1).min(first.seq),
            last_seq: last.seq,
            records: records.into_iter().map(wire).collect(),
        };
        let (tpm, alg, data_dir) = (
            self.tpm.clone(),
            self.alg,
            self.config.agent.data_dir.clone(),
        );
        let (body, identity) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let key = attestation::load_or_create(&tpm, &data_dir, alg, KeyRole::Telemetry)
                .map_err(|e| crate::error_chain(&e))?;
            let point = key
                .ecc_point()
                .ok_or("the telemetry key is not an ECC P-256 key")?;
            let kid = ring::digest::digest(&ring::digest::SHA256, &point);
            let body = sign_batch(&batch, kid.as_ref(), |tbs| {
                let digest = ring::digest::digest(&ring::digest::SHA256, tbs);
                let mut d = [0u8; 32];
                d.copy_from_slice(digest.as_ref());
                let (r, s) = tpm.sign_digest(alg, &key, &d)?;
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&r);
                sig[32..].copy_from_slice(&s);
                Ok::<_, cairn_tpm::TpmError>(sig)
            })
            .map_err(|e| crate::error_chain(&e))?;
            let device_key = attestation::load_or_create(&tpm, &data_dir, alg, KeyRole::Device)
                .map_err(|e| crate::error_chain(&e))?;
            let identity = TpmClientCert::new(tpm, alg, device_key, &cert_pem)?;
            Ok((body, identity))
        })
        .await
        .map_err(|e| format!("the signing task failed: {e}"))??;
        let bytes = body.len() as u64;
        let client = FleetClient::with_client_cert(
            &url,
            &self.config.fleet.ca_file,
            Duration::from_secs(self.config.fleet.timeout_secs.max(30)),
            Arc::new(identity),
        )
        .map_err(|e| crate::error_chain(&e))?;
        let ack: BatchAck = client
            .post_bytes(TELEMETRY_PATH, TELEMETRY_MEDIA_TYPE, body)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        if ack.device_id != batch_device || ack.boot_id != self.boot_id {
            return Err(format!(
                "the fleet acknowledged another stream ({} / {}) than the one sent",
                ack.device_id, ack.boot_id
            ));
        }
        let spool = self.spool.clone();
        // Never forget more than was sent, whatever the answer says.
        let up_to = ack.acked_up_to.min(batch_last);
        tokio::task::spawn_blocking(move || spool.ack(up_to))
            .await
            .map_err(|e| format!("the spool task failed: {e}"))?
            .map_err(|e| crate::error_chain(&e))?;
        let cap = self.config.telemetry.max_bytes_per_sec;
        if cap > 0 {
            tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / cap as f64)).await;
        }
        Ok(Some((ack, full)))
    }
}
