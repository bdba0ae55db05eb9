//! The fleet's side of onboarding and attestation: who may enrol, the challenges, and every check a device's
//! evidence must pass. Transport-free, so the HTTP server and the tests drive the same code.
//!
//! Enrolment: the EK must be vouched for (EK certificate chaining to a manufacturer CA, the allow-list, or an
//! operator's approval), else the device waits as pending. A vouched device gets a single-use challenge: a
//! nonce and a credential sealed (MakeCredential) to its EK for its AK's name. Activation proves the AK sits
//! beside the EK; the quote over the nonce is checked; the AK-certified device and telemetry keys are
//! recorded; the device certificate is issued. Re-attestation runs over mTLS with a fresh nonce.

use crate::admin::{AdminRequest, AdminResponse};
use crate::credential::make_credential;
use crate::ek::{check_ek_certificate, EkAlgorithm, EkPublic};
use crate::pki::ServerIdentity;
use crate::quote::{self, QuoteRefusal};
use crate::reference::Reference;
use crate::store::{DeviceRecord, DeviceState, QuoteCounters, Reason, Store, StoreError};
use cairn_proto::fleet::{
    ActivateRequest, AttestRequest, Challenge, Credential, EnrollRequest, EnrollResponse, Evidence,
    Hex, PcrValue, Verdict,
};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the fleet accepts. Built from `cairn-fleet serve` flags.
#[derive(Debug, Clone)]
pub struct Policy {
    /// DER certificates of the TPM manufacturers' EK CAs (roots).
    pub manufacturer_roots: Vec<Vec<u8>>,
    /// DER intermediate CA certificates for EK certificate chains.
    pub intermediates: Vec<Vec<u8>>,
    /// EK names (hex) from the procurement list.
    pub allow_list: BTreeSet<String>,
    pub reference: Reference,
    /// PCRs every quote must cover (SHA-256 bank).
    pub required_pcrs: Vec<u8>,
    pub nonce_ttl: Duration,
    pub reattest_after: Duration,
    pub retry_after: Duration,
    pub cert_validity_days: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            manufacturer_roots: Vec::new(),
            intermediates: Vec::new(),
            allow_list: BTreeSet::new(),
            reference: Reference::default(),
            required_pcrs: (0..8).collect(),
            nonce_ttl: Duration::from_secs(60),
            reattest_after: Duration::from_secs(3600),
            retry_after: Duration::from_secs(60),
            cert_validity_days: 30,
        }
    }
}

/// A request the fleet cannot even read (as opposed to evidence it reads and refuses).
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("{0}")]
    Malformed(String),
    #[error("device {0} is not known to this fleet; enrol first")]
    UnknownDevice(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the fleet failed inside: {0}")]
    Internal(String),
}

/// Challenges a device may have open at once; older ones are dropped (each request is single-use anyway).
const OUTSTANDING_PER_DEVICE: usize = 4;

struct Outstanding {
    device_id: String,
    issued: Instant,
    nonce: Vec<u8>,
    expires: Instant,
    /// For enrolment challenges: the AK the credential was made for, and the credential itself.
    activation: Option<(Vec<u8>, Vec<u8>)>,
}

pub struct Attestor {
    policy: Policy,
    store: Store,
    pki: ServerIdentity,
    outstanding: HashMap<String, Outstanding>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("devices", &self.store.devices.len())
            .field("outstanding", &self.outstanding.len())
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A refusal on its way to the device and the device's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

impl Refusal {
    fn new(code: &str, message: impl Into<String>) -> Self {
        Refusal {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl From<QuoteRefusal> for Refusal {
    fn from(e: QuoteRefusal) -> Self {
        Refusal::new(e.code(), e.to_string())
    }
}

/// What a successful evidence check yields for the record.
struct Checked {
    counters: QuoteCounters,
    pins: Vec<PcrValue>,
    /// The accepted reference entry the PCRs matched: which known image the device booted.
    reference: Option<String>,
}

impl Attestor {
    pub fn new(policy: Policy, store: Store, pki: ServerIdentity) -> Self {
        Attestor {
            policy,
            store,
            pki,
            outstanding: HashMap::new(),
            rng: SystemRandom::new(),
        }
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.store.devices.values()
    }

    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], BadRequest> {
        let mut b = [0u8; N];
        self.rng
            .fill(&mut b)
            .map_err(|_| BadRequest::Internal("the system random generator failed".into()))?;
        Ok(b)
    }

    fn new_challenge(
        &mut self,
        device_id: &str,
        activation: Option<(&EkPublic, Vec<u8>)>,
    ) -> Result<Challenge, BadRequest> {
        // Expired challenges are dropped here, so the table stays small without a timer.
        let now = Instant::now();
        self.outstanding.retain(|_, c| c.expires > now);
        let mut mine: Vec<(Instant, String)> = self
            .outstanding
            .iter()
            .filter(|(_, c)| c.device_id == device_id)
            .map(|(id, c)| (c.issued, id.clone()))
            .collect();
        if mine.len() >= OUTSTANDING_PER_DEVICE {
            mine.sort();
            for (_, id) in &mine[..=mine.len() - OUTSTANDING_PER_DEVICE] {
                self.outstanding.remove(id);
            }
        }
        let id = cairn_proto::fleet::to_hex(&self.random::<16>()?);
        let nonce = self.random::<32>()?.to_vec();
        let (credential, activation) = match activation {
            Some((ek, ak_public)) => {
                let secret = self.random::<32>()?.to_vec();
                let ak_name = quote::tpm_name(&ak_public)
                    .map_err(|e| BadRequest::Malformed(e.to_string()))?;
                let made = make_credential(ek, &ak_name, &secret)
                    .map_err(|e| BadRequest::Internal(e.to_string()))?;
                (
                    Some(Credential {
                        id_object: Hex(made.id_object),
                        encrypted_secret: Hex(made.encrypted_secret),
                    }),
                    Some((ak_public, secret)),
                )
            }
            None => (None, None),
        };
        self.outstanding.insert(
            id.clone(),
            Outstanding {
                device_id: device_id.to_owned(),
                issued: now,
                nonce: nonce.clone(),
                expires: now + self.policy.nonce_ttl,
                activation,
            },
        );
        Ok(Challenge {
            id,
            nonce: Hex(nonce),
            expires_in_secs: self.policy.nonce_ttl.as_secs(),
            credential,
        })
    }

    /// Marks a device refused (its certificate stops being honoured) and saves.
    fn refuse(&mut self, device_id: &str, r: &Refusal, demote: bool) -> Result<(), BadRequest> {
        if let Some(rec) = self.store.devices.get_mut(device_id) {
            rec.reason = Some(Reason {
                code: r.code.clone(),
                message: r.message.clone(),
                at_unix: now_unix(),
            });
            rec.last_seen_unix = now_unix();
            if demote {
                rec.state = DeviceState::Refused;
            }
            tracing::warn!(device = device_id, code = %r.code, reason = %r.message, "device refused");
        }
        self.store.save()?;
        Ok(())
    }

    fn refused_verdict(&self, device_id: &str, r: Refusal) -> Verdict {
        Verdict::Refused {
            device_id: device_id.to_owned(),
            code: r.code,
            message: r.message,
            retry_after_secs: self.policy.retry_after.as_secs(),
        }
    }

    pub fn enroll(&mut self, req: &EnrollRequest) -> Result<EnrollResponse, BadRequest> {
        let claimed: EkAlgorithm = match req.ek_algorithm.as_str() {
            "rsa2048" => EkAlgorithm::Rsa2048,
            "ecc-p256" => EkAlgorithm::EccP256,
            other => {
                return Err(BadRequest::Malformed(format!(
                    "ek_algorithm {other:?} is not one of \"rsa2048\", \"ecc-p256\""
                )))
            }
        };
        let ek = EkPublic::parse(&req.ek_public.0)
            .map_err(|e| BadRequest::Malformed(format!("ek_public: {e}")))?;
        if ek.algorithm() != claimed {
            return Err(BadRequest::Malformed(format!(
                "ek_public is not a {} EK",
                req.ek_algorithm
            )));
        }
        let device_id = cairn_proto::fleet::to_hex(&ek.name());
        let now = now_unix();
        let retry_after_secs = self.policy.retry_after.as_secs();
        let rec = self
            .store
            .devices
            .entry(device_id.clone())
            .or_insert_with(|| DeviceRecord {
                id: device_id.clone(),
                state: DeviceState::Pending,
                ek_algorithm: req.ek_algorithm.clone(),
                ek_public: req.ek_public.clone(),
                vouched_by: None,
                ak_public: None,
                hostname: req.hostname.clone(),
                agent_version: req.agent_version.clone(),
                reason: None,
                pinned_pcrs: Vec::new(),
                reference: None,
                last_quote: None,
                device_key: None,
                telemetry_key: None,
                cert_serial: None,
                cert_not_after_unix: None,
                first_seen_unix: now,
                last_seen_unix: now,
                last_trusted_unix: None,
            });
        rec.last_seen_unix = now;
        // Anyone can call enroll with a known EK: what it claims is recorded only for devices not yet
        // onboarded, and replaced by what an activated device says.
        if rec.state != DeviceState::Onboarded {
            rec.hostname.clone_from(&req.hostname);
            rec.agent_version.clone_from(&req.agent_version);
        }

        if rec.vouched_by.is_none() {
            let cert_result = req.ek_certificate.as_ref().map(|cert| {
                check_ek_certificate(
                    &ek,
                    &cert.0,
                    &self.policy.intermediates,
                    &self.policy.manufacturer_roots,
                    SystemTime::now(),
                )
            });
            if let Some(Ok(())) = cert_result {
                rec.vouched_by = Some("EK certificate".into());
            } else if self.policy.allow_list.contains(&device_id) {
                rec.vouched_by = Some("allow-list".into());
            } else {
                let why = match cert_result {
                    Some(Err(e)) => format!("its EK certificate was not accepted ({e})"),
                    _ => "it sent no EK certificate".into(),
                };
                let message = format!(
                    "this TPM is not on the allow-list and {why}; an operator must run `cairn-fleet devices approve {device_id}`"
                );
                rec.state = DeviceState::Pending;
                rec.reason = Some(Reason {
                    code: "pending_approval".into(),
                    message: message.clone(),
                    at_unix: now,
                });
                tracing::info!(device = %device_id, "device pending approval");
                self.store.save()?;
                return Ok(EnrollResponse::Pending {
                    device_id,
                    message,
                    retry_after_secs,
                });
            }
        }

        if rec.state != DeviceState::Onboarded {
            rec.state = DeviceState::Enrolling;
        }
        // The AK's shape is checked before anything is sealed to it.
        if let Err(e) = quote::check_ak(&req.ak_public.0) {
            let r = Refusal::from(e);
            // Not proven to come from the device (its EK is public): recorded, state kept.
            self.refuse(&device_id, &r, false)?;
            return Ok(EnrollResponse::Refused {
                device_id,
                code: r.code,
                message: r.message,
                retry_after_secs,
            });
        }
        self.store.save()?;
        let challenge = self.new_challenge(&device_id, Some((&ek, req.ak_public.0.clone())))?;
        Ok(EnrollResponse::Challenge {
            device_id,
            challenge,
        })
    }

    /// Takes a challenge out of the table (single use) after checking it belongs to `device_id`.
    fn take_challenge(&mut self, id: &str, device_id: &str) -> Result<Outstanding, Refusal> {
        let c = self.outstanding.remove(id).ok_or_else(|| {
            Refusal::new(
                "nonce_unknown",
                "the challenge is unknown or was already used (a replayed or stale request); ask for a new one",
            )
        })?;
        if c.device_id != device_id {
            return Err(Refusal::new(
                "nonce_unknown",
                "the challenge was issued to another device",
            ));
        }
        if c.expires <= Instant::now() {
            return Err(Refusal::new(
                "nonce_expired",
                format!(
                    "the challenge expired (it is valid for {} s); ask for a new one",
                    self.policy.nonce_ttl.as_secs()
                ),
            ));
        }
        Ok(c)
    }

    fn check_evidence(
        &self,
        rec: &DeviceRecord,
        ak_public: &[u8],
        nonce: &[u8],
        evidence: &Evidence,
    ) -> Result<Checked, Refusal> {
        let mut values = Vec::new();
        for p in &evidence.pcrs {
            let v: [u8; 32] = p.sha256.0.clone().try_into().map_err(|_| {
                Refusal::new(
                    "evidence_malformed",
                    format!("PCR {} is not a SHA-256 value", p.index),
                )
            })?;
            values.push((p.index, v));
        }
        let verified = quote::verify(
            ak_public,
            &evidence.quote.0,
            &evidence.signature.0,
            nonce,
            &values,
        )?;
        let missing: Vec<u8> = self
            .policy
            .required_pcrs
            .iter()
            .copied()
            .filter(|i| !verified.pcrs.contains(i))
            .collect();
        if !missing.is_empty() {
            return Err(Refusal::new(
                "pcr_selection",
                format!("the quote leaves out PCRs {missing:?}, which this fleet requires"),
            ));
        }
        let counters = QuoteCounters {
            clock: verified.clock,
            reset_count: verified.reset_count,
            restart_count: verified.restart_count,
        };
        if let Some(last) = rec.last_quote {
            let back = if counters.reset_count < last.reset_count {
                Some("reset count")
            } else if counters.reset_count == last.reset_count
                && counters.restart_count < last.restart_count
            {
                Some("restart count")
            } else if counters.reset_count == last.reset_count && counters.clock < last.clock {
                Some("clock")
            } else {
                None
            };
            if let Some(what) = back {
                return Err(Refusal::new(
                    "clock_regressed",
                    format!("the TPM's {what} went backwards since the last quote (a replayed quote or a rolled-back TPM)"),
                ));
            }
        }
        let quoted: BTreeMap<u8, [u8; 32]> = values.iter().copied().collect();
        if let Some(log) = &evidence.event_log {
            let parsed = cairn_proto::eventlog::parse(&log.0).map_err(|e| {
                Refusal::new("event_log", format!("the event log cannot be read: {e}"))
            })?;
            let replayed = crate::eventlog::replay_sha256(&parsed).map_err(|e| {
                Refusal::new(
                    "event_log",
                    format!("the event log cannot be replayed: {e}"),
                )
            })?;
            let quoted_vec: BTreeMap<u8, Vec<u8>> =
                quoted.iter().map(|(i, v)| (*i, v.to_vec())).collect();
            crate::eventlog::check_against_quote(&replayed, &quoted_vec)
                .map_err(|e| Refusal::new("event_log", e.to_string()))?;
        }
        let (covered, reference): (BTreeSet<u8>, _) = match self.policy.reference.check(&quoted) {
            Ok(Some(entry)) => (
                entry.sha256.keys().copied().collect(),
                Some(entry.name.clone()),
            ),
            Ok(None) => (BTreeSet::new(), None),
            Err(m) => {
                return Err(Refusal::new(
                    "pcr_reference",
                    format!(
                        "PCRs {:?} match no accepted reference value (closest: {:?}); the device booted software this fleet does not know",
                        m.differing, m.closest
                    ),
                ))
            }
        };
        let mut pins: BTreeMap<u8, Hex> = rec
            .pinned_pcrs
            .iter()
            .map(|p| (p.index, p.sha256.clone()))
            .collect();
        let mut changed = Vec::new();
        for (i, v) in &quoted {
            if covered.contains(i) {
                continue;
            }
            match pins.get(i) {
                Some(pinned) if pinned.0 != v.as_slice() => changed.push(*i),
                Some(_) => {}
                None => {
                    pins.insert(*i, Hex(v.to_vec()));
                }
            }
        }
        if !changed.is_empty() {
            return Err(Refusal::new(
                "pcr_changed",
                format!("PCRs {changed:?} differ from the values this device first attested; the boot chain changed"),
            ));
        }
        let pins = pins
            .into_iter()
            .map(|(index, sha256)| PcrValue { index, sha256 })
            .collect();
        Ok(Checked {
            counters,
            pins,
            reference,
        })
    }

    pub fn activate(&mut self, req: &ActivateRequest) -> Result<Verdict, BadRequest> {
        let device_id = req.device_id.clone();
        let Some(rec) = self.store.devices.get(&device_id).cloned() else {
            return Err(BadRequest::UnknownDevice(device_id));
        };
        let challenge = match self.take_challenge(&req.challenge_id, &device_id) {
            Ok(c) => c,
            Err(r) => {
                // Nothing proves this request came from the device: note it, but keep the device's state.
                self.refuse(&device_id, &r, false)?;
                return Ok(self.refused_verdict(&device_id, r));
            }
        };
        let Some((ak_public, secret)) = challenge.activation else {
            let r = Refusal::new(
                "nonce_unknown",
                "the challenge was issued for re-attestation, not activation",
            );
            self.refuse(&device_id, &r, false)?;
            return Ok(self.refused_verdict(&device_id, r));
        };
        if !ct_eq(&req.activated_credential.0, &secret) {
            let r = Refusal::new(
                "credential_not_activated",
                "the credential was not activated: the attestation key does not live in the TPM that holds this EK",
            );
            let demote = rec.state != DeviceState::Onboarded;
            self.refuse(&device_id, &r, demote)?;
            return Ok(self.refused_verdict(&device_id, r));
        }
        // From here on the AK is proven to be this TPM's: failures are the device's own.
        let checked = self
            .check_evidence(&rec, &ak_public, &challenge.nonce, &req.evidence)
            .and_then(|checked| {
                let device = quote::verify_certify(
                    "device",
                    &ak_public,
                    &req.device_key.public.0,
                    &req.device_key.certify_info.0,
                    &req.device_key.signature.0,
                    &challenge.nonce,
                )?;
                let telemetry = quote::verify_certify(
                    "telemetry",
                    &ak_public,
                    &req.telemetry_key.public.0,
                    &req.telemetry_key.certify_info.0,
                    &req.telemetry_key.signature.0,
                    &challenge.nonce,
                )?;
                Ok((checked, device, telemetry))
            });
        let (checked, device_key, telemetry_key) = match checked {
            Ok(c) => c,
            Err(r) => {
                self.refuse(&device_id, &r, true)?;
                return Ok(self.refused_verdict(&device_id, r));
            }
        };
        let issued = self
            .pki
            .issue_device_cert(
                &device_id,
                &device_key.point,
                self.random::<16>()?,
                self.policy.cert_validity_days,
            )
            .map_err(|e| BadRequest::Internal(e.to_string()))?;
        let now = now_unix();
        if let Some(rec) = self.store.devices.get_mut(&device_id) {
            rec.state = DeviceState::Onboarded;
            rec.ak_public = Some(Hex(ak_public));
            rec.device_key = Some(Hex(device_key.point));
            rec.telemetry_key = Some(Hex(telemetry_key.point));
            rec.cert_serial = Some(Hex(issued.serial));
            rec.cert_not_after_unix = Some(issued.not_after_unix);
            rec.pinned_pcrs = checked.pins;
            rec.reference = checked.reference;
            rec.last_quote = Some(checked.counters);
            rec.last_seen_unix = now;
            rec.last_trusted_unix = Some(now);
        }
        self.store.save()?;
        tracing::info!(device = %device_id, "device onboarded");
        Ok(Verdict::Trusted {
            device_id,
            certificate_pem: Some(issued.pem),
            reattest_after_secs: self.policy.reattest_after.as_secs(),
        })
    }

    /// The device a client certificate (by serial) stands for, if that certificate is honoured now.
    pub fn device_for_serial(&self, serial: &[u8]) -> Result<String, Refusal> {
        let rec = self
            .store
            .devices
            .values()
            .find(|d| d.cert_serial.as_ref().is_some_and(|s| s.0 == serial))
            .ok_or_else(|| {
                Refusal::new(
                    "certificate_not_honoured",
                    "this device certificate is not (or no longer) honoured; enrol again",
                )
            })?;
        if rec.state != DeviceState::Onboarded {
            let why = rec
                .reason
                .as_ref()
                .map(|r| r.message.clone())
                .unwrap_or_default();
            return Err(Refusal::new(
                "device_refused",
                format!("device {} is {}: {why}", rec.id, rec.state.as_str()),
            ));
        }
        Ok(rec.id.clone())
    }

    pub fn reattestation_challenge(&mut self, device_id: &str) -> Result<Challenge, BadRequest> {
        if !self.store.devices.contains_key(device_id) {
            return Err(BadRequest::UnknownDevice(device_id.to_owned()));
        }
        self.new_challenge(device_id, None)
    }

    pub fn attest(&mut self, device_id: &str, req: &AttestRequest) -> Result<Verdict, BadRequest> {
        let Some(rec) = self.store.devices.get(device_id).cloned() else {
            return Err(BadRequest::UnknownDevice(device_id.to_owned()));
        };
        let challenge = match self.take_challenge(&req.challenge_id, device_id) {
            Ok(c) => c,
            Err(r) => {
                // mTLS proved the device, but a stale nonce is a transport matter: note it, keep the state.
                self.refuse(device_id, &r, false)?;
                return Ok(self.refused_verdict(device_id, r));
            }
        };
        if challenge.activation.is_some() {
            let r = Refusal::new(
                "nonce_unknown",
                "the challenge was issued for activation, not re-attestation",
            );
            self.refuse(device_id, &r, false)?;
            return Ok(self.refused_verdict(device_id, r));
        }
        let Some(ak_public) = rec.ak_public.clone() else {
            return Err(BadRequest::Malformed(format!(
                "device {device_id} has no activated attestation key; enrol first"
            )));
        };
        match self.check_evidence(&rec, &ak_public.0, &challenge.nonce, &req.evidence) {
            Ok(checked) => {
                let now = now_unix();
                // Past half its life, the certificate is renewed here, so a device that keeps attesting never
                // meets an expired certificate (the handshake would fail before any route could say so).
                let half_life = u64::from(self.policy.cert_validity_days) * 86_400 / 2;
                let renew = rec.cert_not_after_unix.is_none_or(|t| now + half_life >= t);
                let renewed = match (&rec.device_key, renew) {
                    (Some(point), true) => Some(
                        self.pki
                            .issue_device_cert(
                                device_id,
                                &point.0,
                                self.random::<16>()?,
                                self.policy.cert_validity_days,
                            )
                            .map_err(|e| BadRequest::Internal(e.to_string()))?,
                    ),
                    _ => None,
                };
                if let Some(rec) = self.store.devices.get_mut(device_id) {
                    rec.state = DeviceState::Onboarded;
                    rec.pinned_pcrs = checked.pins;
                    rec.reference = checked.reference;
                    rec.last_quote = Some(checked.counters);
                    rec.last_seen_unix = now;
                    rec.last_trusted_unix = Some(now);
                    if let Some(cert) = &renewed {
                        rec.cert_serial = Some(Hex(cert.serial.clone()));
                        rec.cert_not_after_unix = Some(cert.not_after_unix);
                    }
                }
                self.store.save()?;
                Ok(Verdict::Trusted {
                    device_id: device_id.to_owned(),
                    certificate_pem: renewed.map(|c| c.pem),
                    reattest_after_secs: self.policy.reattest_after.as_secs(),
                })
            }
            Err(r) => {
                self.refuse(device_id, &r, true)?;
                Ok(self.refused_verdict(device_id, r))
            }
        }
    }

    /// The telemetry key (uncompressed P-256 point) the AK certified for `device_id`.
    pub fn telemetry_key(&self, device_id: &str) -> Option<Vec<u8>> {
        self.store
            .devices
            .get(device_id)
            .and_then(|d| d.telemetry_key.as_ref())
            .map(|k| k.0.clone())
    }

    /// Runs an operator command against the live store.
    pub fn admin(&mut self, req: &AdminRequest) -> AdminResponse {
        let resp =
            crate::admin::apply(&mut self.store, req).unwrap_or_else(|e| AdminResponse::Error {
                message: crate::error_chain(&e),
            });
        if let AdminRequest::Forget { id } = req {
            self.outstanding.retain(|_, c| &c.device_id != id);
        }
        resp
    }
}
