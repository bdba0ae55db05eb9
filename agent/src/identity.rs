//! What TPM the device has, as the status shows it. Onboarding (enrolment, attestation) is `onboarding`.

use cairn_proto::control::TpmFacts;

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
