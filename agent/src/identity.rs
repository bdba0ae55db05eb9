//! The device's identity: its TPM, and (with the attestation work) onboarding. Today it reports what TPM the
//! device has; onboarding stays `unprovisioned` until enrolment exists, and says so.

use cairn_proto::control::{OnboardingStatus, TpmFacts};

/// The TPM as the agent needs it, so tests can stand in for it.
pub trait TpmProbe: Send {
    fn probe(&self) -> Result<TpmFacts, String>;
}

impl TpmProbe for cairn_tpm::Tpm {
    fn probe(&self) -> Result<TpmFacts, String> {
        let info = cairn_tpm::Tpm::probe(self).map_err(|e| crate::error_chain(&e))?;
        Ok(TpmFacts {
            tcti: self.tcti().to_owned(),
            manufacturer: info.manufacturer,
            firmware_version: info.firmware_version,
            ek_certificates: info
                .ek_certificates
                .iter()
                .map(|c| c.kind.to_owned())
                .collect(),
        })
    }
}

pub fn onboarding_initial() -> OnboardingStatus {
    OnboardingStatus {
        state: "unprovisioned".into(),
        detail: "enrolment with the fleet is not implemented in this build".into(),
    }
}
