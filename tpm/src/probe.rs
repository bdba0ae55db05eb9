//! What a TPM is: maker, firmware, and which EK certificates it carries. Read-only and cheap, so the agent can
//! ask on every status refresh.

use crate::{Tpm, TpmError};
use tss_esapi::constants::{tss::TPM2_NV_INDEX_FIRST, CapabilityType, PropertyTag};
use tss_esapi::structures::CapabilityData;

/// An EK certificate the TPM carries in NV, by its index in the TCG EK Credential Profile 2.0 (2.2.1.4):
/// the low range (RSA-2048, ECC P-256 with the default templates) and the high range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EkCertificate {
    pub nv_index: u32,
    /// "rsa2048", "ecc-p256", … as people and the fleet name it.
    pub kind: &'static str,
}

const EK_CERT_INDICES: &[(u32, &str)] = &[
    (0x01c0_0002, "rsa2048"),
    (0x01c0_000a, "ecc-p256"),
    (0x01c0_0012, "rsa2048"),
    (0x01c0_0014, "ecc-p256"),
    (0x01c0_0016, "ecc-p384"),
    (0x01c0_0018, "ecc-p521"),
    (0x01c0_001a, "ecc-sm2"),
    (0x01c0_001c, "rsa3072"),
    (0x01c0_001e, "rsa4096"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmInfo {
    /// The four-letter vendor ID, e.g. "IBM" for swtpm, "INTC", "STM", "IFX".
    pub manufacturer: String,
    /// Firmware version as the vendor reports it, "major.minor" from TPM2_PT_FIRMWARE_VERSION_1.
    pub firmware_version: String,
    pub ek_certificates: Vec<EkCertificate>,
}

impl Tpm {
    pub fn probe(&self) -> Result<TpmInfo, TpmError> {
        self.with_context("reading its properties", |ctx| {
            let manufacturer = ctx
                .get_tpm_property(PropertyTag::Manufacturer)?
                .unwrap_or(0);
            let fw1 = ctx
                .get_tpm_property(PropertyTag::FirmwareVersion1)?
                .unwrap_or(0);
            let (handles, _) =
                ctx.get_capability(CapabilityType::Handles, TPM2_NV_INDEX_FIRST, 254)?;
            let nv: Vec<u32> = match handles {
                CapabilityData::Handles(list) => {
                    list.into_inner().into_iter().map(u32::from).collect()
                }
                _ => Vec::new(),
            };
            let ek_certificates = EK_CERT_INDICES
                .iter()
                .filter(|(index, _)| nv.contains(index))
                .map(|&(nv_index, kind)| EkCertificate { nv_index, kind })
                .collect();
            Ok(TpmInfo {
                manufacturer: vendor_string(manufacturer),
                firmware_version: format!("{}.{}", fw1 >> 16, fw1 & 0xffff),
                ek_certificates,
            })
        })
    }
}

/// TPM vendor IDs are four ASCII bytes, NUL- or space-padded.
fn vendor_string(raw: u32) -> String {
    raw.to_be_bytes()
        .iter()
        .filter(|b| b.is_ascii_graphic())
        .map(|&b| char::from(b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_ids_are_trimmed() {
        assert_eq!(vendor_string(0x4942_4D00), "IBM");
        assert_eq!(vendor_string(0x494E_5443), "INTC");
        assert_eq!(vendor_string(0x5354_4D20), "STM");
    }
}
