//! mTLS with a key that never leaves the TPM: rustls asks for a signature during the handshake and gets one
//! from TPM2_Sign with the AK-certified device key. The certificate is the one the fleet issued for that key.

use cairn_tpm::{EkAlgorithm, KeyBlob, Tpm};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::sync::Arc;

#[derive(Debug)]
struct TpmKey {
    tpm: Tpm,
    alg: EkAlgorithm,
    key: KeyBlob,
}

impl SigningKey for TpmKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(TpmSigner {
                    tpm: self.tpm.clone(),
                    alg: self.alg,
                    key: self.key.clone(),
                }) as Box<dyn Signer>
            })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct TpmSigner {
    tpm: Tpm,
    alg: EkAlgorithm,
    key: KeyBlob,
}

impl Signer for TpmSigner {
    /// Blocks for one TPM command (tens of ms on swtpm). Handshakes are rare (one per fleet exchange), so
    /// this stays on the calling thread rather than a blocking pool rustls cannot await.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        let mut d = [0u8; 32];
        d.copy_from_slice(digest.as_ref());
        let (r, s) = self
            .tpm
            .sign_digest(self.alg, &self.key, &d)
            .map_err(|e| rustls::Error::General(crate::error_chain(&e)))?;
        Ok(ecdsa_der(&r, &s))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }, minimal positive INTEGER encodings.
pub fn ecdsa_der(r: &[u8; 32], s: &[u8; 32]) -> Vec<u8> {
    fn integer(v: &[u8]) -> Vec<u8> {
        let start = v.iter().position(|&b| b != 0).unwrap_or(v.len() - 1);
        let v = &v[start..];
        let mut out = vec![0x02];
        if v[0] & 0x80 != 0 {
            out.push(v.len() as u8 + 1);
            out.push(0);
        } else {
            out.push(v.len() as u8);
        }
        out.extend_from_slice(v);
        out
    }
    let (r, s) = (integer(r), integer(s));
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    out
}

/// The device's client identity for rustls: the fleet-issued certificate and the TPM-resident key.
#[derive(Debug)]
pub struct TpmClientCert {
    certified: Arc<CertifiedKey>,
}

impl TpmClientCert {
    /// `cert_pem` is the certificate the fleet issued for `key`.
    pub fn new(tpm: Tpm, alg: EkAlgorithm, key: KeyBlob, cert_pem: &str) -> Result<Self, String> {
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the device certificate is not valid PEM: {e}"))?;
        if certs.is_empty() {
            return Err("the device certificate file holds no certificate".into());
        }
        let key: Arc<dyn SigningKey> = Arc::new(TpmKey { tpm, alg, key });
        Ok(TpmClientCert {
            certified: Arc::new(CertifiedKey::new(certs, key)),
        })
    }
}

impl ResolvesClientCert for TpmClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        sigschemes
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| self.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_integers_are_minimal_and_positive() {
        let mut r = [0u8; 32];
        r[31] = 1;
        let s = [0xffu8; 32];
        let der = ecdsa_der(&r, &s);
        assert_eq!(&der[..5], &[0x30, 3 + 35, 0x02, 1, 1]);
        assert_eq!(&der[5..8], &[0x02, 33, 0]);
        assert_eq!(der.len(), 2 + 3 + 35);
        // A signature ring accepts: sign with a software key, re-encode its fixed form, and verify.
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair;
        for _ in 0..20 {
            let sig = kp.sign(&rng, b"hello").unwrap();
            let (r, s) = sig.as_ref().split_at(32);
            let der = ecdsa_der(r.try_into().unwrap(), s.try_into().unwrap());
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                kp.public_key().as_ref(),
            )
            .verify(b"hello", &der)
            .unwrap();
        }
    }
}
