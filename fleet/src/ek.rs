//! The endorsement key (EK) as the fleet sees it: parsed from the TPM2B_PUBLIC a device sends (TPM 2.0
//! Part 2, big-endian, bounds-checked), named the way the TPM names it, and tied to the manufacturer through
//! its EK certificate. The fleet has no TPM: everything here is software.
//!
//! Only the TCG default EK templates are accepted (EK Credential Profile 2.0, template L-1 for RSA-2048 and
//! L-2 for ECC NIST P-256): a restricted decryption key with AES-128-CFB as its symmetric algorithm and
//! SHA-256 as its name algorithm, which is what [`crate::credential::make_credential`] encrypts to.

use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_AES: u16 = 0x0006;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_CFB: u16 = 0x0043;
const TPM_ECC_NIST_P256: u16 = 0x0003;

const ATTR_FIXED_TPM: u32 = 1 << 1;
const ATTR_FIXED_PARENT: u32 = 1 << 4;
const ATTR_SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const ATTR_ADMIN_WITH_POLICY: u32 = 1 << 7;
const ATTR_RESTRICTED: u32 = 1 << 16;
const ATTR_DECRYPT: u32 = 1 << 17;
const ATTR_SIGN: u32 = 1 << 18;

/// The DER contents of OID 2.23.133.8.1, tcg-kp-EKCertificate (TCG EK Credential Profile 2.0, 3.2.16).
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];
/// rsaEncryption, 1.2.840.113549.1.1.1.
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// id-ecPublicKey, 1.2.840.10045.2.1.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 (secp256r1), 1.2.840.10045.3.1.7.
const OID_PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Which TCG default EK template a device's EK follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EkAlgorithm {
    /// Template L-1: RSA-2048.
    #[serde(rename = "rsa2048")]
    Rsa2048,
    /// Template L-2: ECC NIST P-256.
    #[serde(rename = "ecc-p256")]
    EccP256,
}

impl EkAlgorithm {
    /// The name used in configuration and the fleet protocol (the same as the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            EkAlgorithm::Rsa2048 => "rsa2048",
            EkAlgorithm::EccP256 => "ecc-p256",
        }
    }
}

impl std::fmt::Display for EkAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an EK or its certificate was refused: a code the fleet stores and shows, and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkError {
    #[error("{what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the key sent as the endorsement key is not shaped like one: {0}")]
    NotAnEk(String),
    #[error("the EK certificate cannot be parsed: {0}")]
    CertMalformed(String),
    #[error("manufacturer CA certificate {index} cannot be used as a trust anchor: {reason}")]
    BadRoot { index: usize, reason: String },
    #[error("the EK certificate is not trusted: {0}")]
    CertUntrusted(String),
    #[error("the EK certificate is for another key than the endorsement key sent")]
    CertMismatch,
}

impl EkError {
    /// A stable machine-readable code (for the fleet's records and the protocol's error bodies).
    pub fn code(&self) -> &'static str {
        match self {
            EkError::Malformed { .. } => "ek_malformed",
            EkError::NotAnEk(_) => "ek_not_an_ek",
            EkError::CertMalformed(_) => "ek_cert_malformed",
            EkError::BadRoot { .. } => "ek_root_invalid",
            EkError::CertUntrusted(_) => "ek_cert_untrusted",
            EkError::CertMismatch => "ek_cert_mismatch",
        }
    }
}

/// The public key material of an EK, as the credential code needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EkKey {
    /// Modulus (exactly 256 bytes) and public exponent.
    Rsa { modulus: Vec<u8>, exponent: u32 },
    /// The coordinates as the TPM's public area holds them, each at most 32 bytes.
    Ecc { x: Vec<u8>, y: Vec<u8> },
}

/// A parsed, EK-shaped public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkPublic {
    /// The marshalled TPMT_PUBLIC, as the TPM hashes it for the Name.
    tpmt_public: Vec<u8>,
    key: EkKey,
}

/// A bounds-checked big-endian reader over one TPM structure.
struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { what, buf }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], EkError> {
        if self.buf.len() < n {
            return Err(EkError::Malformed {
                what: self.what,
                detail: format!("needs {n} more bytes, has {}", self.buf.len()),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, EkError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, EkError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A TPM2B: u16 size, then that many bytes.
    fn sized(&mut self) -> Result<&'a [u8], EkError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }

    fn end(&self) -> Result<(), EkError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(EkError::Malformed {
                what: self.what,
                detail: format!("{} trailing bytes", self.buf.len()),
            })
        }
    }
}

impl EkPublic {
    /// Parses TPM2B_PUBLIC (u16 size + TPMT_PUBLIC) of an EK; refuses keys that are not EK-shaped (they must
    /// be restricted decryption keys that cannot sign, with fixedTPM, fixedParent, sensitiveDataOrigin and
    /// adminWithPolicy; RSA-2048 or ECC NIST P-256; symmetric AES-128-CFB; name algorithm SHA-256).
    pub fn parse(tpm2b_public: &[u8]) -> Result<Self, EkError> {
        let mut outer = Reader::new("the EK public area (TPM2B_PUBLIC)", tpm2b_public);
        let inner = outer.sized()?;
        outer.end()?;
        let mut r = Reader::new("the EK public area (TPMT_PUBLIC)", inner);

        let key_type = r.u16()?;
        if key_type != TPM_ALG_RSA && key_type != TPM_ALG_ECC {
            return Err(EkError::NotAnEk(format!(
                "its type is {key_type:#06x}, not RSA or ECC"
            )));
        }
        let name_alg = r.u16()?;
        if name_alg != TPM_ALG_SHA256 {
            return Err(EkError::NotAnEk(format!(
                "its name algorithm is {name_alg:#06x}, not SHA-256"
            )));
        }
        let attrs = r.u32()?;
        for (bit, attr) in [
            (ATTR_FIXED_TPM, "fixedTPM"),
            (ATTR_FIXED_PARENT, "fixedParent"),
            (ATTR_SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
            (ATTR_ADMIN_WITH_POLICY, "adminWithPolicy"),
            (ATTR_RESTRICTED, "restricted"),
            (ATTR_DECRYPT, "decrypt"),
        ] {
            if attrs & bit == 0 {
                return Err(EkError::NotAnEk(format!("it lacks the {attr} attribute")));
            }
        }
        if attrs & ATTR_SIGN != 0 {
            return Err(EkError::NotAnEk("it is a signing key".into()));
        }
        let _auth_policy = r.sized()?;

        // TPMT_SYM_DEF_OBJECT: the TCG templates use AES-128 in CFB mode, which make_credential relies on.
        let sym = r.u16()?;
        let (sym_bits, sym_mode) = if sym == TPM_ALG_NULL {
            (0, TPM_ALG_NULL)
        } else {
            (r.u16()?, r.u16()?)
        };
        if (sym, sym_bits, sym_mode) != (TPM_ALG_AES, 128, TPM_ALG_CFB) {
            return Err(EkError::NotAnEk(format!(
                "its symmetric algorithm is {sym:#06x}/{sym_bits}/{sym_mode:#06x}, not AES-128-CFB"
            )));
        }
        // A restricted decryption key has no asymmetric scheme of its own.
        let scheme = r.u16()?;
        if scheme != TPM_ALG_NULL {
            return Err(EkError::NotAnEk(format!(
                "it has the asymmetric scheme {scheme:#06x}; an EK has none"
            )));
        }

        let key = if key_type == TPM_ALG_RSA {
            let bits = r.u16()?;
            let exponent = match r.u32()? {
                0 => 65_537,
                e => e,
            };
            let modulus = r.sized()?;
            r.end()?;
            if bits != 2048 {
                return Err(EkError::NotAnEk(format!("it is RSA-{bits}, not RSA-2048")));
            }
            if modulus.len() != 256 || modulus[0] & 0x80 == 0 {
                return Err(EkError::Malformed {
                    what: "the EK public area",
                    detail: "the RSA modulus is not 2048 bits".into(),
                });
            }
            if exponent < 3 || exponent % 2 == 0 {
                return Err(EkError::Malformed {
                    what: "the EK public area",
                    detail: format!("{exponent} is not an RSA public exponent"),
                });
            }
            EkKey::Rsa {
                modulus: modulus.to_vec(),
                exponent,
            }
        } else {
            let curve = r.u16()?;
            let kdf = r.u16()?;
            if kdf != TPM_ALG_NULL {
                let _kdf_hash = r.u16()?;
            }
            let (x, y) = (r.sized()?, r.sized()?);
            r.end()?;
            if curve != TPM_ECC_NIST_P256 {
                return Err(EkError::NotAnEk(format!(
                    "its curve is {curve:#06x}, not NIST P-256"
                )));
            }
            if kdf != TPM_ALG_NULL {
                return Err(EkError::NotAnEk(format!(
                    "it has the key derivation scheme {kdf:#06x}; an EK has none"
                )));
            }
            let key = EkKey::Ecc {
                x: x.to_vec(),
                y: y.to_vec(),
            };
            if x.len() > 32 || y.len() > 32 || !on_p256(&uncompressed_point(&key)) {
                return Err(EkError::Malformed {
                    what: "the EK public area",
                    detail: "the ECC point is not on NIST P-256".into(),
                });
            }
            key
        };
        Ok(EkPublic {
            tpmt_public: inner.to_vec(),
            key,
        })
    }

    pub fn algorithm(&self) -> EkAlgorithm {
        match self.key {
            EkKey::Rsa { .. } => EkAlgorithm::Rsa2048,
            EkKey::Ecc { .. } => EkAlgorithm::EccP256,
        }
    }

    /// The marshalled TPMT_PUBLIC (without the TPM2B size).
    pub fn tpmt_public(&self) -> &[u8] {
        &self.tpmt_public
    }

    pub(crate) fn key(&self) -> &EkKey {
        &self.key
    }

    /// The TPM Name: 0x000b || SHA-256(TPMT_PUBLIC). Its hex is the device id and the allow-list entry.
    pub fn name(&self) -> Vec<u8> {
        let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(
            ring::digest::digest(&ring::digest::SHA256, &self.tpmt_public).as_ref(),
        );
        name
    }

    /// The DER SubjectPublicKeyInfo of the key, as an EK certificate carries it: rsaEncryption with NULL
    /// parameters and an RSAPublicKey, or id-ecPublicKey on prime256v1 with the uncompressed point.
    pub fn spki_der(&self) -> Vec<u8> {
        match &self.key {
            EkKey::Rsa { modulus, exponent } => {
                let algorithm = der(
                    0x30,
                    &[der(0x06, OID_RSA_ENCRYPTION), der(0x05, &[])].concat(),
                );
                let rsa_key = der(
                    0x30,
                    &[der_uint(modulus), der_uint(&exponent.to_be_bytes())].concat(),
                );
                der(
                    0x30,
                    &[algorithm, der(0x03, &[&[0u8][..], &rsa_key].concat())].concat(),
                )
            }
            ecc => {
                let algorithm = der(
                    0x30,
                    &[der(0x06, OID_EC_PUBLIC_KEY), der(0x06, OID_PRIME256V1)].concat(),
                );
                let point = uncompressed_point(ecc);
                der(
                    0x30,
                    &[algorithm, der(0x03, &[&[0u8][..], &point].concat())].concat(),
                )
            }
        }
    }
}

/// 0x04 || x || y, each coordinate left-padded to 32 bytes (empty for an RSA key).
pub(crate) fn uncompressed_point(key: &EkKey) -> Vec<u8> {
    match key {
        EkKey::Ecc { x, y } => {
            let mut point = vec![4u8];
            for c in [x, y] {
                point.extend(std::iter::repeat_n(0u8, 32usize.saturating_sub(c.len())));
                point.extend_from_slice(c);
            }
            point
        }
        EkKey::Rsa { .. } => Vec::new(),
    }
}

/// Whether `point` (0x04 || x || y) is a valid P-256 public key. ring checks peer keys before any agreement
/// (on the curve, not the identity), so one throwaway ECDH tells.
fn on_p256(point: &[u8]) -> bool {
    use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
    let rng = ring::rand::SystemRandom::new();
    EphemeralPrivateKey::generate(&ECDH_P256, &rng)
        .ok()
        .and_then(|mine| {
            agree_ephemeral(mine, &UnparsedPublicKey::new(&ECDH_P256, point), |_| ()).ok()
        })
        .is_some()
}

/// One DER TLV (definite length; the keys here are far below 64 KiB).
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.push(0x82);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER holding the unsigned big-endian `v`: no redundant leading zeros, one added when the high
/// bit is set.
fn der_uint(v: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = v.iter().copied().skip_while(|&b| b == 0).collect();
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(&trimmed);
    der(0x02, &content)
}

/// Why webpki refused a chain, in words (webpki's own Display is its Debug form).
fn untrusted_reason(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => "no known manufacturer CA issued it".into(),
        E::CertExpired { .. } => "it has expired".into(),
        E::CertNotValidYet { .. } => "it is not valid yet".into(),
        E::RequiredEkuNotFoundContext(_) => {
            "its extended key usage does not include tcg-kp-EKCertificate".into()
        }
        E::InvalidSignatureForPublicKey => "a signature in its chain does not verify".into(),
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "its chain uses a signature algorithm the fleet does not accept".into()
        }
        E::CaUsedAsEndEntity => "it is a CA certificate".into(),
        other => format!("its chain was refused ({other:?})"),
    }
}

/// Checks that the EK certificate `cert_der` (DER) chains to one of `manufacturer_roots` (DER CA
/// certificates), possibly through `intermediates`, is valid at `now`, is not restricted to other purposes
/// than tcg-kp-EKCertificate, and certifies exactly this EK's public key.
pub fn check_ek_certificate(
    ek: &EkPublic,
    cert_der: &[u8],
    intermediates: &[Vec<u8>],
    manufacturer_roots: &[Vec<u8>],
    now: std::time::SystemTime,
) -> Result<(), EkError> {
    let cert_der = CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&cert_der)
        .map_err(|e| EkError::CertMalformed(e.to_string()))?;

    let roots: Vec<CertificateDer<'_>> = manufacturer_roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = roots
        .iter()
        .enumerate()
        .map(|(index, root)| {
            webpki::anchor_from_trusted_cert(root).map_err(|e| EkError::BadRoot {
                index,
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| EkError::CertUntrusted("the clock is before 1970".into()))?;

    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(since_epoch),
        webpki::KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
        None,
        None,
    )
    .map_err(|e| EkError::CertUntrusted(untrusted_reason(&e)))?;

    // webpki's SPKI includes the outer SEQUENCE, as spki_der() does.
    if cert.subject_public_key_info().as_ref() != ek.spki_der().as_slice() {
        return Err(EkError::CertMismatch);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// PolicySecret(TPM_RH_ENDORSEMENT), the default EK policy of the TCG low-range templates.
    const EK_POLICY: &str = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";

    /// The common head of a template-L EK TPMT_PUBLIC: type, nameAlg, attributes, authPolicy, AES-128-CFB,
    /// no scheme.
    fn head(key_type: u16) -> Vec<u8> {
        let mut t = key_type.to_be_bytes().to_vec();
        t.extend(hex("000b000300b20020"));
        t.extend(hex(EK_POLICY));
        t.extend(hex("0006008000430010"));
        t
    }

    fn tpm2b(tpmt: &[u8]) -> Vec<u8> {
        let mut out = (tpmt.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(tpmt);
        out
    }

    /// TPM2B_PUBLIC of an RSA-2048 EK (template L-1) with the given 256-byte modulus.
    pub(crate) fn rsa_ek_tpm2b(modulus: &[u8]) -> Vec<u8> {
        let mut t = head(TPM_ALG_RSA);
        t.extend(hex("080000000000"));
        t.extend((modulus.len() as u16).to_be_bytes());
        t.extend_from_slice(modulus);
        tpm2b(&t)
    }

    /// TPM2B_PUBLIC of an ECC P-256 EK (template L-2) with the given point 0x04 || x || y.
    pub(crate) fn ecc_ek_tpm2b(point: &[u8]) -> Vec<u8> {
        assert_eq!(point.len(), 65);
        let mut t = head(TPM_ALG_ECC);
        t.extend(hex("00030010"));
        for c in [&point[1..33], &point[33..]] {
            t.extend(hex("0020"));
            t.extend_from_slice(c);
        }
        tpm2b(&t)
    }

    // A swtpm's EKs as `tpm2_createek -f tss` wrote them, with the names `tpm2_readpublic` printed and the
    // SubjectPublicKeyInfo `tpm2_readpublic -f der` wrote.
    const SWTPM_RSA_MODULUS: &str = concat!(
        "e332f20e47901602fce69ec4d03357e0326a8caa0b1456e64035664443d932c1cf5265a98c76fcf7cc9ac9a77677a8ef",
        "01e0bd65178608adf049f74332ccc29d706d08f901b394cd7c0abff61c732a1843d9d2532579679400f6ab0622c54699",
        "7e142157afed07024807488cac6e983620a7fc03e27876a3f5241f9f3c540294247936dfc541cf4dec2068ff85d931ba",
        "d97200c614b1db15eda0b2bb3c5eb88338e6dac24b58f95f816d38bf0d79fe808622c803ac8fbdf74f34ad2d1a84df6a",
        "1946ce0086ceb6ba793511a587779ea0cd13d1e31f4f4320a8009db88ec9a6749d3d4a6a6af4809d39e66b7fb30728da",
        "cf3313fda9c625c41ad74f5f3aceb61d"
    );
    const SWTPM_RSA_NAME: &str =
        "000bffa7fb1244258371b71a4897329cb84cbe6052b78a068baee2b43063d7f88e4e";
    const SWTPM_ECC_TPM2B: &str = concat!(
        "007a0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa000600",
        "80004300100003001000209d554cbe0737a9ce5ff11feb832b9f9395ea51fe0f83576ecd5cd042b0094f0100206475",
        "ada55001bf6529e292f209d9bb74652097a07a0d9fc231c82a2ffbaa216c"
    );
    const SWTPM_ECC_NAME: &str =
        "000b1004279e4451b9fbb4d818be9756975407b7ba61d0cab3c5e9a71506d6ca7fc9";
    const SWTPM_ECC_SPKI: &str = concat!(
        "3059301306072a8648ce3d020106082a8648ce3d030107034200049d554cbe0737a9ce5ff11feb832b9f9395ea51fe0f",
        "83576ecd5cd042b0094f016475ada55001bf6529e292f209d9bb74652097a07a0d9fc231c82a2ffbaa216c"
    );

    #[test]
    fn swtpm_eks_parse_with_the_names_and_spki_the_tpm_tools_report() {
        let rsa = EkPublic::parse(&rsa_ek_tpm2b(&hex(SWTPM_RSA_MODULUS))).unwrap();
        assert_eq!(rsa.algorithm(), EkAlgorithm::Rsa2048);
        assert_eq!(rsa.name(), hex(SWTPM_RSA_NAME));
        let rsa_spki = [
            hex("30820122300d06092a864886f70d01010105000382010f003082010a0282010100"),
            hex(SWTPM_RSA_MODULUS),
            hex("0203010001"),
        ]
        .concat();
        assert_eq!(rsa.spki_der(), rsa_spki);

        let ecc = EkPublic::parse(&hex(SWTPM_ECC_TPM2B)).unwrap();
        assert_eq!(ecc.algorithm(), EkAlgorithm::EccP256);
        assert_eq!(ecc.name(), hex(SWTPM_ECC_NAME));
        assert_eq!(ecc.spki_der(), hex(SWTPM_ECC_SPKI));
        assert_eq!(ecc.tpmt_public(), &hex(SWTPM_ECC_TPM2B)[2..]);
    }

    #[test]
    fn algorithm_names_are_the_protocol_names() {
        for (alg, name) in [
            (EkAlgorithm::Rsa2048, "rsa2048"),
            (EkAlgorithm::EccP256, "ecc-p256"),
        ] {
            assert_eq!(serde_json::to_string(&alg).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<EkAlgorithm>(&format!("\"{name}\"")).unwrap(),
                alg
            );
            assert_eq!(alg.to_string(), name);
        }
    }

    #[test]
    fn truncated_or_padded_input_is_malformed_never_a_panic() {
        for good in [rsa_ek_tpm2b(&hex(SWTPM_RSA_MODULUS)), hex(SWTPM_ECC_TPM2B)] {
            for cut in 0..good.len() {
                let err = EkPublic::parse(&good[..cut]).unwrap_err();
                assert_eq!(err.code(), "ek_malformed", "cut at {cut}: {err}");
                // The same cut with the outer size fixed up: the TPMT_PUBLIC itself is short.
                if cut >= 2 {
                    let err = EkPublic::parse(&tpm2b(&good[2..cut])).unwrap_err();
                    assert!(
                        matches!(err.code(), "ek_malformed" | "ek_not_an_ek"),
                        "cut at {cut}: {err}"
                    );
                }
            }
            let mut long = good[2..].to_vec();
            long.push(0);
            assert_eq!(
                EkPublic::parse(&tpm2b(&long)).unwrap_err().code(),
                "ek_malformed"
            );
        }
    }

    /// The swtpm RSA EK with `f` applied to its TPMT_PUBLIC.
    fn rsa_with(f: impl FnOnce(&mut Vec<u8>)) -> Result<EkPublic, EkError> {
        let mut t = rsa_ek_tpm2b(&hex(SWTPM_RSA_MODULUS))[2..].to_vec();
        f(&mut t);
        EkPublic::parse(&tpm2b(&t))
    }

    fn not_an_ek(r: Result<EkPublic, EkError>) -> String {
        let err = r.unwrap_err();
        assert_eq!(err.code(), "ek_not_an_ek", "{err}");
        err.to_string()
    }

    // Offsets in TPMT_PUBLIC: type 0, nameAlg 2, attributes 4, authPolicy 8 (2 + 32), symmetric 42
    // (alg, bits, mode), scheme 48, then keyBits 50, exponent 52, modulus 56 (2 + 256).
    #[test]
    fn keys_not_shaped_like_an_ek_are_refused() {
        // A keyed-hash object is no EK.
        assert!(not_an_ek(rsa_with(|t| t[0..2].copy_from_slice(&[0, 8]))).contains("type"));
        // SHA-1 and SHA-384 name algorithms.
        for alg in [[0, 4], [0, 0x0c]] {
            assert!(
                not_an_ek(rsa_with(|t| t[2..4].copy_from_slice(&alg))).contains("name algorithm")
            );
        }
        // An AK (restricted signing key, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign)
        // passed as the EK.
        let ak_attrs = 0x0005_0072u32.to_be_bytes();
        assert!(not_an_ek(rsa_with(|t| t[4..8].copy_from_slice(&ak_attrs))).contains("attribute"));
        // The EK's attributes plus sign.
        let sign = (0x0003_00b2u32 | ATTR_SIGN).to_be_bytes();
        assert!(not_an_ek(rsa_with(|t| t[4..8].copy_from_slice(&sign))).contains("signing key"));
        // Each required attribute cleared in turn.
        for bit in [1, 4, 5, 7, 16, 17] {
            let attrs = (0x0003_00b2u32 & !(1 << bit)).to_be_bytes();
            assert!(not_an_ek(rsa_with(|t| t[4..8].copy_from_slice(&attrs))).contains("lacks"));
        }
        // AES-256-CFB, AES-128-CBC, and no symmetric algorithm at all.
        assert!(not_an_ek(rsa_with(|t| t[44..46].copy_from_slice(&[1, 0]))).contains("AES-128-CFB"));
        assert!(
            not_an_ek(rsa_with(|t| t[46..48].copy_from_slice(&[0, 0x42]))).contains("AES-128-CFB")
        );
        assert!(not_an_ek(rsa_with(|t| {
            t.splice(42..48, [0, 0x10]);
        }))
        .contains("AES-128-CFB"));
        // An OAEP scheme (with its hash).
        assert!(not_an_ek(rsa_with(|t| {
            t.splice(48..50, [0, 0x17, 0, 0x0b]);
        }))
        .contains("scheme"));
        // RSA-3072 (with a matching modulus).
        assert!(not_an_ek(rsa_with(|t| {
            t[50..52].copy_from_slice(&3072u16.to_be_bytes());
            t.truncate(56);
            t.extend(384u16.to_be_bytes());
            t.extend([0xc1; 384]);
        }))
        .contains("RSA-3072"));

        // ECC: P-384 (curve 0x0004) and a KDF scheme.
        let ecc = hex(SWTPM_ECC_TPM2B)[2..].to_vec();
        let mut p384 = ecc.clone();
        p384[50..52].copy_from_slice(&[0, 4]);
        assert!(not_an_ek(EkPublic::parse(&tpm2b(&p384))).contains("curve"));
        let mut kdf = ecc.clone();
        kdf.splice(52..54, [0, 0x20, 0, 0x0b]);
        assert!(not_an_ek(EkPublic::parse(&tpm2b(&kdf))).contains("derivation"));
    }

    #[test]
    fn broken_key_material_is_malformed() {
        // A modulus that is not 2048 bits, and an even exponent.
        let err = rsa_with(|t| t[58] = 0x01).unwrap_err();
        assert_eq!(err.code(), "ek_malformed", "{err}");
        let err = rsa_with(|t| t[52..56].copy_from_slice(&4u32.to_be_bytes())).unwrap_err();
        assert_eq!(err.code(), "ek_malformed", "{err}");
        // A point off the curve.
        let mut ecc = hex(SWTPM_ECC_TPM2B)[2..].to_vec();
        let last = ecc.len() - 1;
        ecc[last] ^= 1;
        let err = EkPublic::parse(&tpm2b(&ecc)).unwrap_err();
        assert_eq!(err.code(), "ek_malformed", "{err}");
    }

    /// A CA made with rcgen: its DER certificate and the issuer that signs with it.
    fn make_ca(name: &str) -> (Vec<u8>, rcgen::Issuer<'static, KeyPair>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), rcgen::Issuer::new(params, key))
    }

    /// An EK certificate (with tcg-kp-EKCertificate unless `eku` says otherwise) for an ECC EK, and that EK.
    fn make_ek_cert(
        issuer: &rcgen::Issuer<'static, KeyPair>,
        eku: ExtendedKeyUsagePurpose,
    ) -> (Vec<u8>, EkPublic) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ek = EkPublic::parse(&ecc_ek_tpm2b(key.public_key_raw())).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.extended_key_usages = vec![eku];
        params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.der().to_vec(), ek)
    }

    fn tcg_ek_eku() -> ExtendedKeyUsagePurpose {
        ExtendedKeyUsagePurpose::Other(vec![2, 23, 133, 8, 1])
    }

    #[test]
    fn ek_certificate_from_a_known_ca_for_this_ek_passes() {
        let (root, issuer) = make_ca("TPM manufacturer root");
        let (cert, ek) = make_ek_cert(&issuer, tcg_ek_eku());
        let now = std::time::SystemTime::now();
        check_ek_certificate(&ek, &cert, &[], std::slice::from_ref(&root), now).unwrap();
        // One of several roots is enough.
        let (other_root, _) = make_ca("another manufacturer");
        check_ek_certificate(&ek, &cert, &[], &[other_root, root], now).unwrap();
    }

    #[test]
    fn ek_certificate_of_another_ek_is_a_mismatch() {
        let (root, issuer) = make_ca("TPM manufacturer root");
        let (cert, _) = make_ek_cert(&issuer, tcg_ek_eku());
        let (_, other_ek) = make_ek_cert(&issuer, tcg_ek_eku());
        let err =
            check_ek_certificate(&other_ek, &cert, &[], &[root], std::time::SystemTime::now())
                .unwrap_err();
        assert_eq!(err, EkError::CertMismatch);
        assert_eq!(err.code(), "ek_cert_mismatch");
    }

    #[test]
    fn ek_certificate_from_an_unknown_ca_is_untrusted() {
        let (_, issuer) = make_ca("TPM manufacturer root");
        let (unrelated_root, _) = make_ca("TPM manufacturer root");
        let (cert, ek) = make_ek_cert(&issuer, tcg_ek_eku());
        let now = std::time::SystemTime::now();
        let err = check_ek_certificate(&ek, &cert, &[], &[unrelated_root], now).unwrap_err();
        assert_eq!(err.code(), "ek_cert_untrusted", "{err}");
        assert_eq!(
            err.to_string(),
            "the EK certificate is not trusted: a signature in its chain does not verify"
        );
        let err = check_ek_certificate(&ek, &cert, &[], &[], now).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the EK certificate is not trusted: no known manufacturer CA issued it"
        );
    }

    #[test]
    fn ek_certificate_for_another_purpose_or_out_of_date_is_untrusted() {
        let (root, issuer) = make_ca("TPM manufacturer root");
        let roots = std::slice::from_ref(&root);
        let (tls_cert, ek) = make_ek_cert(&issuer, ExtendedKeyUsagePurpose::ServerAuth);
        let now = std::time::SystemTime::now();
        let err = check_ek_certificate(&ek, &tls_cert, &[], roots, now).unwrap_err();
        assert_eq!(err.code(), "ek_cert_untrusted", "{err}");
        assert!(err.to_string().contains("tcg-kp-EKCertificate"), "{err}");

        let (cert, ek) = make_ek_cert(&issuer, tcg_ek_eku());
        // rcgen's default validity ends in 4096.
        let far_future =
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(5000 * 365 * 86_400);
        let err = check_ek_certificate(&ek, &cert, &[], roots, far_future).unwrap_err();
        assert_eq!(err.code(), "ek_cert_untrusted", "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn garbage_certificates_and_roots_are_reported_as_such() {
        let (root, issuer) = make_ca("TPM manufacturer root");
        let (cert, ek) = make_ek_cert(&issuer, tcg_ek_eku());
        let now = std::time::SystemTime::now();
        let err = check_ek_certificate(&ek, b"not DER", &[], std::slice::from_ref(&root), now)
            .unwrap_err();
        assert_eq!(err.code(), "ek_cert_malformed", "{err}");
        let err =
            check_ek_certificate(&ek, &cert, &[], &[root, b"junk".to_vec()], now).unwrap_err();
        assert!(matches!(err, EkError::BadRoot { index: 1, .. }), "{err}");
        assert_eq!(err.code(), "ek_root_invalid");
    }
}
