//! Verifying a TPM quote on the fleet, without a TPM and without tss-esapi: the wire structures are parsed
//! here with bounds checks (TPM 2.0 Part 2, big-endian), and the signature is checked with ring.
//!
//! What is checked: the AK's attributes (a restricted signing key that never left its TPM), the signature
//! over TPMS_ATTEST, that it is a quote, that it carries the fleet's nonce, and that the quoted PCR digest is
//! the SHA-256 of the PCR values the device reported. What the PCR values *should* be, clock monotonicity and
//! nonce freshness are the caller's policy (enrolment and attestation, issue 3).

use ring::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_ECDSA: u16 = 0x0018;
const TPM_ECC_NIST_P256: u16 = 0x0003;
const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_RSASSA: u16 = 0x0014;

const ATTR_FIXED_TPM: u32 = 1 << 1;
const ATTR_FIXED_PARENT: u32 = 1 << 4;
const ATTR_SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const ATTR_RESTRICTED: u32 = 1 << 16;
const ATTR_DECRYPT: u32 = 1 << 17;
const ATTR_SIGN: u32 = 1 << 18;

/// Why a quote was refused: a code the fleet stores and shows, and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteRefusal {
    #[error("{what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the attestation key lacks the {0} attribute (it must be a restricted signing key that never left its TPM)")]
    AkAttribute(&'static str),
    #[error("the attestation key is not an RSA key with RSASSA/SHA-256 (type {key_type:#06x}, scheme {scheme:#06x})")]
    AkAlgorithm { key_type: u16, scheme: u16 },
    #[error("the quote's signature does not verify with the attestation key")]
    BadSignature,
    #[error("the signed structure is not a TPM-generated quote")]
    NotAQuote,
    #[error("the signed structure is not a TPM-generated key certification")]
    NotACertification,
    #[error("the quote carries another nonce than the one the fleet issued")]
    WrongNonce,
    #[error("the quote covers PCRs {quoted:?} but values were sent for {sent:?}")]
    PcrSelection { quoted: Vec<u8>, sent: Vec<u8> },
    #[error("the PCR values sent do not match the digest the TPM signed")]
    PcrDigest,
    #[error("the {role} key is not a TPM-resident ECDSA P-256 signing key: {detail}")]
    CertifiedKey { role: &'static str, detail: String },
    #[error("the AK's certification names another key than the {role} key sent")]
    CertifiedName { role: &'static str },
}

impl QuoteRefusal {
    /// A stable machine-readable code (for the fleet's records and the protocol's error bodies).
    pub fn code(&self) -> &'static str {
        match self {
            QuoteRefusal::Malformed { .. } => "evidence_malformed",
            QuoteRefusal::AkAttribute(_) => "ak_attributes",
            QuoteRefusal::AkAlgorithm { .. } => "ak_algorithm",
            QuoteRefusal::BadSignature => "bad_signature",
            QuoteRefusal::NotAQuote => "not_a_quote",
            QuoteRefusal::NotACertification => "not_a_certification",
            QuoteRefusal::WrongNonce => "wrong_nonce",
            QuoteRefusal::PcrSelection { .. } => "pcr_selection",
            QuoteRefusal::PcrDigest => "pcr_digest",
            QuoteRefusal::CertifiedKey { .. } => "certified_key",
            QuoteRefusal::CertifiedName { .. } => "certified_name",
        }
    }
}

/// What a verified quote says about the device at the moment it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
    /// SHA-256 bank indices the quote covers, ascending.
    pub pcrs: Vec<u8>,
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

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], QuoteRefusal> {
        if self.buf.len() < n {
            return Err(QuoteRefusal::Malformed {
                what: self.what,
                detail: format!("needs {n} more bytes, has {}", self.buf.len()),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, QuoteRefusal> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, QuoteRefusal> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, QuoteRefusal> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, QuoteRefusal> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    /// A TPM2B: u16 size, then that many bytes.
    fn sized(&mut self) -> Result<&'a [u8], QuoteRefusal> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }

    fn end(&self) -> Result<(), QuoteRefusal> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(QuoteRefusal::Malformed {
                what: self.what,
                detail: format!("{} trailing bytes", self.buf.len()),
            })
        }
    }
}

/// The RSA modulus and exponent of an AK given as TPM2B_PUBLIC, after checking its attributes and scheme.
fn ak_key(ak_public: &[u8]) -> Result<(Vec<u8>, Vec<u8>), QuoteRefusal> {
    let mut outer = Reader::new("ak.pub (TPM2B_PUBLIC)", ak_public);
    let inner = outer.sized()?;
    outer.end()?;
    let mut r = Reader::new("ak.pub (TPMT_PUBLIC)", inner);
    let key_type = r.u16()?;
    let _name_alg = r.u16()?;
    let attrs = r.u32()?;
    for (bit, name) in [
        (ATTR_FIXED_TPM, "fixedTPM"),
        (ATTR_FIXED_PARENT, "fixedParent"),
        (ATTR_SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (ATTR_RESTRICTED, "restricted"),
        (ATTR_SIGN, "sign"),
    ] {
        if attrs & bit == 0 {
            return Err(QuoteRefusal::AkAttribute(name));
        }
    }
    if attrs & ATTR_DECRYPT != 0 {
        return Err(QuoteRefusal::AkAttribute("sign-only (it also decrypts)"));
    }
    if key_type != TPM_ALG_RSA {
        return Err(QuoteRefusal::AkAlgorithm {
            key_type,
            scheme: 0,
        });
    }
    let _auth_policy = r.sized()?;
    let symmetric = r.u16()?;
    if symmetric != TPM_ALG_NULL {
        let _key_bits = r.u16()?;
        let _mode = r.u16()?;
    }
    let scheme = r.u16()?;
    let scheme_hash = if scheme != TPM_ALG_NULL { r.u16()? } else { 0 };
    if scheme != TPM_ALG_RSASSA || scheme_hash != TPM_ALG_SHA256 {
        return Err(QuoteRefusal::AkAlgorithm { key_type, scheme });
    }
    let _key_bits = r.u16()?;
    let exponent = match r.u32()? {
        0 => 65_537,
        e => e,
    };
    let modulus = r.sized()?.to_vec();
    r.end()?;
    let e = exponent
        .to_be_bytes()
        .iter()
        .copied()
        .skip_while(|&b| b == 0)
        .collect();
    Ok((modulus, e))
}

/// Checks that `ak_public` (TPM2B_PUBLIC) is an AK this fleet accepts: a restricted RSASSA/SHA-256 signing key
/// that never left its TPM.
pub fn check_ak(ak_public: &[u8]) -> Result<(), QuoteRefusal> {
    ak_key(ak_public)?;
    // MakeCredential binds to the AK's name, which must be a SHA-256 name.
    tpm_name(ak_public).map(|_| ())
}

/// The TPM Name of a key given as TPM2B_PUBLIC: its name algorithm (SHA-256) and the digest of TPMT_PUBLIC.
pub fn tpm_name(tpm2b_public: &[u8]) -> Result<Vec<u8>, QuoteRefusal> {
    let mut outer = Reader::new("public key (TPM2B_PUBLIC)", tpm2b_public);
    let inner = outer.sized()?;
    outer.end()?;
    let mut r = Reader::new("public key (TPMT_PUBLIC)", inner);
    let _type = r.u16()?;
    let name_alg = r.u16()?;
    if name_alg != TPM_ALG_SHA256 {
        return Err(QuoteRefusal::Malformed {
            what: "public key",
            detail: format!("name algorithm {name_alg:#06x}, expected SHA-256"),
        });
    }
    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, inner).as_ref());
    Ok(name)
}

fn check_rsassa_signature(
    n: &[u8],
    e: &[u8],
    message: &[u8],
    signature: &[u8],
    what: &'static str,
) -> Result<(), QuoteRefusal> {
    let mut s = Reader::new(what, signature);
    let (sig_alg, sig_hash) = (s.u16()?, s.u16()?);
    if sig_alg != TPM_ALG_RSASSA || sig_hash != TPM_ALG_SHA256 {
        return Err(QuoteRefusal::Malformed {
            what,
            detail: format!("scheme {sig_alg:#06x}/{sig_hash:#06x}, expected RSASSA/SHA-256"),
        });
    }
    let sig = s.sized()?;
    s.end()?;
    RsaPublicKeyComponents { n, e }
        .verify(&RSA_PKCS1_2048_8192_SHA256, message, sig)
        .map_err(|_| QuoteRefusal::BadSignature)
}

/// An AK-certified key: its uncompressed P-256 point (0x04 || x || y) and its TPM name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifiedKeyInfo {
    pub point: Vec<u8>,
    pub name: Vec<u8>,
}

/// Verifies TPM2_Certify output: the AK signed, over `nonce`, that the key `key_public` (TPM2B_PUBLIC) lives
/// in its TPM; and that key is an ECDSA P-256 signing key that cannot leave the TPM.
pub fn verify_certify(
    role: &'static str,
    ak_public: &[u8],
    key_public: &[u8],
    message: &[u8],
    signature: &[u8],
    nonce: &[u8],
) -> Result<CertifiedKeyInfo, QuoteRefusal> {
    let (n, e) = ak_key(ak_public)?;
    check_rsassa_signature(
        &n,
        &e,
        message,
        signature,
        "certification signature (TPMT_SIGNATURE)",
    )?;
    let mut m = Reader::new("certification (TPMS_ATTEST)", message);
    if m.u32()? != TPM_GENERATED_VALUE || m.u16()? != TPM_ST_ATTEST_CERTIFY {
        return Err(QuoteRefusal::NotACertification);
    }
    let _signer = m.sized()?;
    if m.sized()? != nonce {
        return Err(QuoteRefusal::WrongNonce);
    }
    let _clock_info = m.bytes(8 + 4 + 4 + 1)?;
    let _firmware = m.u64()?;
    let certified_name = m.sized()?;
    let _qualified_name = m.sized()?;
    m.end()?;

    let name = tpm_name(key_public)?;
    if certified_name != name.as_slice() {
        return Err(QuoteRefusal::CertifiedName { role });
    }
    let bad = |detail: String| QuoteRefusal::CertifiedKey { role, detail };
    let mut outer = Reader::new("certified key (TPM2B_PUBLIC)", key_public);
    let inner = outer.sized()?;
    outer.end()?;
    let mut r = Reader::new("certified key (TPMT_PUBLIC)", inner);
    let key_type = r.u16()?;
    let _name_alg = r.u16()?;
    let attrs = r.u32()?;
    if key_type != TPM_ALG_ECC {
        return Err(bad(format!("type {key_type:#06x}, expected ECC")));
    }
    for (bit, attr) in [
        (ATTR_FIXED_TPM, "fixedTPM"),
        (ATTR_FIXED_PARENT, "fixedParent"),
        (ATTR_SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (ATTR_SIGN, "sign"),
    ] {
        if attrs & bit == 0 {
            return Err(bad(format!("it lacks the {attr} attribute")));
        }
    }
    if attrs & ATTR_DECRYPT != 0 {
        return Err(bad("it also decrypts".into()));
    }
    let _auth_policy = r.sized()?;
    let symmetric = r.u16()?;
    if symmetric != TPM_ALG_NULL {
        return Err(bad("a signing key has no symmetric algorithm".into()));
    }
    let scheme = r.u16()?;
    let scheme_hash = if scheme != TPM_ALG_NULL { r.u16()? } else { 0 };
    if scheme != TPM_ALG_ECDSA || scheme_hash != TPM_ALG_SHA256 {
        return Err(bad(format!(
            "scheme {scheme:#06x}/{scheme_hash:#06x}, expected ECDSA/SHA-256"
        )));
    }
    let curve = r.u16()?;
    if curve != TPM_ECC_NIST_P256 {
        return Err(bad(format!("curve {curve:#06x}, expected NIST P-256")));
    }
    let kdf = r.u16()?;
    if kdf != TPM_ALG_NULL {
        let _kdf_hash = r.u16()?;
    }
    let (x, y) = (r.sized()?, r.sized()?);
    r.end()?;
    if x.len() != 32 || y.len() != 32 {
        return Err(bad("the point is not 32+32 bytes".into()));
    }
    let mut point = vec![4u8];
    point.extend_from_slice(x);
    point.extend_from_slice(y);
    Ok(CertifiedKeyInfo { point, name })
}

/// Verifies a quote. `pcr_values` are the device's reported SHA-256 PCR values, by index.
pub fn verify(
    ak_public: &[u8],
    message: &[u8],
    signature: &[u8],
    nonce: &[u8],
    pcr_values: &[(u8, [u8; 32])],
) -> Result<VerifiedQuote, QuoteRefusal> {
    let (n, e) = ak_key(ak_public)?;
    check_rsassa_signature(&n, &e, message, signature, "quote.sig (TPMT_SIGNATURE)")?;

    // Signed, so from here on the content is the TPM's; still parsed with bounds checks.
    let mut m = Reader::new("quote.msg (TPMS_ATTEST)", message);
    if m.u32()? != TPM_GENERATED_VALUE || m.u16()? != TPM_ST_ATTEST_QUOTE {
        return Err(QuoteRefusal::NotAQuote);
    }
    let _signer = m.sized()?;
    let extra = m.sized()?;
    if extra != nonce {
        return Err(QuoteRefusal::WrongNonce);
    }
    let clock = m.u64()?;
    let reset_count = m.u32()?;
    let restart_count = m.u32()?;
    let _safe = m.u8()?;
    let firmware_version = m.u64()?;
    let mut quoted = Vec::new();
    for _ in 0..m.u32()? {
        let hash = m.u16()?;
        let size = m.u8()? as usize;
        let bitmap = m.bytes(size)?;
        for (byte, bits) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                if bits & (1 << bit) != 0 {
                    if hash != TPM_ALG_SHA256 {
                        return Err(QuoteRefusal::Malformed {
                            what: "quote.msg",
                            detail: format!("quotes bank {hash:#06x}; only SHA-256 is accepted"),
                        });
                    }
                    quoted.push((byte * 8 + bit) as u8);
                }
            }
        }
    }
    let digest = m.sized()?;
    m.end()?;

    let mut sent: Vec<(u8, [u8; 32])> = pcr_values.to_vec();
    sent.sort_by_key(|(i, _)| *i);
    let sent_idx: Vec<u8> = sent.iter().map(|(i, _)| *i).collect();
    if sent_idx != quoted {
        return Err(QuoteRefusal::PcrSelection {
            quoted,
            sent: sent_idx,
        });
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (_, v) in &sent {
        ctx.update(v);
    }
    if ctx.finish().as_ref() != digest {
        return Err(QuoteRefusal::PcrDigest);
    }
    Ok(VerifiedQuote {
        clock,
        reset_count,
        restart_count,
        firmware_version,
        pcrs: quoted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_garbage_inputs_are_malformed_never_a_panic() {
        for ak in [&[][..], &[0, 5, 1], &[0xff; 3]] {
            let err = verify(ak, b"", b"", b"", &[]).unwrap_err();
            assert_eq!(err.code(), "evidence_malformed", "{err}");
        }
    }
}
