//! The EK, the attestation key (AK), credential activation, quotes, and AK-certified keys. The AK is created
//! under the EK from the TCG default template (RSA-2048 or ECC P-256), so only this TPM can load it; its blobs
//! are kept by the caller (on the data partition) and loaded again per operation, never re-created on every
//! boot. Quotes are written in the formats tpm2-tools reads, so any operator can check them with
//! `tpm2_checkquote`.

use crate::{Tpm, TpmError};
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection, KeyCustomization};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, EncryptedSecret, HashScheme, HashcheckTicket, IdObject,
    PcrSelectionList, PcrSlot, Private, Public, PublicBuffer, Signature, SignatureScheme,
    SymmetricDefinition,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::{TPML_PCR_SELECTION, TPMT_TK_HASHCHECK};
use tss_esapi::Context;

/// Which of the TCG default EK templates (EK Credential Profile 2.0, B.3.3/B.3.4) the device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EkAlgorithm {
    /// Template L-1, EK certificate at NV 0x01c00002.
    Rsa2048,
    /// Template L-2, EK certificate at NV 0x01c0000a.
    EccP256,
}

impl EkAlgorithm {
    /// The name used in configuration, file names and the fleet protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            EkAlgorithm::Rsa2048 => "rsa2048",
            EkAlgorithm::EccP256 => "ecc-p256",
        }
    }

    pub fn nv_index(self) -> u32 {
        match self {
            EkAlgorithm::Rsa2048 => 0x01c0_0002,
            EkAlgorithm::EccP256 => 0x01c0_000a,
        }
    }

    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkAlgorithm::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkAlgorithm::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        }
    }
}

impl std::str::FromStr for EkAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rsa2048" => Ok(EkAlgorithm::Rsa2048),
            "ecc-p256" => Ok(EkAlgorithm::EccP256),
            other => Err(format!(
                "'{other}' is not an EK algorithm cairn supports (use \"rsa2048\" or \"ecc-p256\")"
            )),
        }
    }
}

impl std::fmt::Display for EkAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key created under the EK, as stored between operations: the TPM-wrapped private part and the public
/// part (TPMT_PUBLIC), both marshalled. Used for the AK and for AK-certified keys alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkBlob {
    pub private: Vec<u8>,
    /// TPMT_PUBLIC.
    pub public: Vec<u8>,
}

/// A key blob of an AK-certified key (device key, telemetry key): same layout as the AK's.
pub type KeyBlob = AkBlob;

impl AkBlob {
    /// The uncompressed point (0x04 || x || y) of an ECC P-256 key; None for other keys.
    pub fn ecc_point(&self) -> Option<Vec<u8>> {
        match Public::unmarshall(&self.public).ok()? {
            Public::Ecc { unique, .. } => {
                let (x, y) = (unique.x().value(), unique.y().value());
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut p = vec![4u8];
                p.extend_from_slice(x);
                p.extend_from_slice(y);
                Some(p)
            }
            _ => None,
        }
    }
}

/// A quote in the files `tpm2_checkquote -u ak.pub -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q NONCE` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteFiles {
    /// TPMS_ATTEST.
    pub message: Vec<u8>,
    /// TPMT_SIGNATURE.
    pub signature: Vec<u8>,
    /// tpm2-tools' serialized PCR layout: TPML_PCR_SELECTION, u32 count, TPML_DIGEST per 8 PCRs (little-endian).
    pub pcrs: Vec<u8>,
    /// TPM2B_PUBLIC of the AK.
    pub ak_public: Vec<u8>,
    /// The SHA-256 values of the quoted PCRs, in the order of `pcrs` ascending.
    pub pcr_values: Vec<(u8, Vec<u8>)>,
}

/// TPM2_Certify's output: the AK's statement that a key with a given name lives in this TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certification {
    /// TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY.
    pub message: Vec<u8>,
    /// TPMT_SIGNATURE by the AK.
    pub signature: Vec<u8>,
}

/// Largest qualifying data a quote carries (TPM2B_DATA holds a digest-sized value).
pub const MAX_NONCE_BYTES: usize = 64;

/// AK-certified keys are ordinary (unrestricted) ECDSA P-256 signing keys: they sign TLS handshakes and
/// telemetry, which a restricted key may not.
#[derive(Debug)]
struct Unrestricted;

impl KeyCustomization for Unrestricted {
    fn attributes(&self, b: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
        b.with_restricted(false)
    }
}

/// A policy session satisfying the default EK policy (PolicySecret on the endorsement hierarchy), which
/// ActivateCredential needs for the EK. The caller flushes it.
fn ek_policy_session(ctx: &mut Context) -> tss_esapi::Result<AuthSession> {
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )?
        .ok_or(tss_esapi::Error::WrapperError(
            tss_esapi::WrapperErrorKind::WrongValueFromTpm,
        ))?;
    let (attrs, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .build();
    let handle = SessionHandle::from(session);
    let result = ctx
        .tr_sess_set_attributes(session, attrs, mask)
        .and_then(|_| {
            ctx.execute_with_nullauth_session(|ctx| {
                ctx.policy_secret(
                    PolicySession::try_from(session)?,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
        });
    match result {
        Ok(_) => Ok(session),
        Err(e) => {
            let _ = ctx.flush_context(ObjectHandle::from(handle));
            Err(e)
        }
    }
}

/// Loads a key stored under the EK; the EK is flushed again before returning.
fn load_under_ek(
    ctx: &mut Context,
    alg: EkAlgorithm,
    blob: &AkBlob,
) -> tss_esapi::Result<KeyHandle> {
    let public = Public::unmarshall(&blob.public)?;
    let private = Private::try_from(blob.private.clone())?;
    let ek = ek::create_ek_object_2(ctx, alg.selection(), None)?;
    let loaded = ak::load_ak(ctx, ek, None, private, public);
    ctx.flush_context(ek.into())?;
    loaded
}

fn nv_present(ctx: &mut Context, index: u32) -> tss_esapi::Result<bool> {
    let (handles, _) = ctx.get_capability(CapabilityType::Handles, index, 1)?;
    Ok(match handles {
        CapabilityData::Handles(list) => {
            list.into_inner().into_iter().any(|h| u32::from(h) == index)
        }
        _ => false,
    })
}

impl Tpm {
    /// The EK's public area as TPM2B_PUBLIC (re-derived from the endorsement seed; nothing is stored).
    pub fn ek_public(&self, alg: EkAlgorithm) -> Result<Vec<u8>, TpmError> {
        self.with_context("reading the endorsement key", |ctx| {
            let ek = ek::create_ek_object_2(ctx, alg.selection(), None)?;
            let read = ctx.read_public(ek);
            ctx.flush_context(ek.into())?;
            let (public, _, _) = read?;
            PublicBuffer::try_from(public)?.marshall()
        })
    }

    /// The EK certificate the manufacturer stored in NV (DER), or None when this TPM carries none for `alg`.
    pub fn ek_certificate(&self, alg: EkAlgorithm) -> Result<Option<Vec<u8>>, TpmError> {
        self.with_context("reading the EK certificate", |ctx| {
            if !nv_present(ctx, alg.nv_index())? {
                return Ok(None);
            }
            ek::retrieve_ek_pubcert(ctx, alg.selection()).map(Some)
        })
    }

    /// Creates a new AK under the EK (RSA-2048, RSASSA/SHA-256, whatever the EK's algorithm). Call once per
    /// device and keep the blob.
    pub fn create_ak(&self, alg: EkAlgorithm) -> Result<AkBlob, TpmError> {
        self.with_context("creating the attestation key", |ctx| {
            let ek = ek::create_ek_object_2(ctx, alg.selection(), None)?;
            let result = ak::create_ak(
                ctx,
                ek,
                HashingAlgorithm::Sha256,
                SignatureSchemeAlgorithm::RsaSsa,
                None,
                None,
            );
            // swtpm has no resource manager and three transient slots: flush on every path.
            ctx.flush_context(ek.into())?;
            let created = result?;
            Ok(AkBlob {
                private: created.out_private.value().to_vec(),
                public: created.out_public.marshall()?,
            })
        })
    }

    /// Creates an ECDSA P-256 signing key under the EK (fixedTPM, fixedParent, sensitiveDataOrigin, not
    /// restricted) for the AK to certify. Call once per role and keep the blob.
    pub fn create_signing_key(&self, alg: EkAlgorithm) -> Result<KeyBlob, TpmError> {
        self.with_context("creating a signing key", |ctx| {
            let ek = ek::create_ek_object_2(ctx, alg.selection(), None)?;
            let result = ak::create_ak_2(
                ctx,
                ek,
                HashingAlgorithm::Sha256,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                SignatureSchemeAlgorithm::EcDsa,
                None,
                Unrestricted,
            );
            ctx.flush_context(ek.into())?;
            let created = result?;
            Ok(KeyBlob {
                private: created.out_private.value().to_vec(),
                public: created.out_public.marshall()?,
            })
        })
    }

    /// TPM2_ActivateCredential: recovers the secret the fleet sealed to this EK for the AK's name. It only
    /// succeeds when the AK is loaded beside the EK it was made for, which is what the fleet learns from it.
    /// `id_object` and `encrypted_secret` are the TPM2B contents without their size prefix.
    pub fn activate_credential(
        &self,
        alg: EkAlgorithm,
        ak_blob: &AkBlob,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        self.with_context("activating the fleet's credential", |ctx| {
            let id_object = IdObject::try_from(id_object.to_vec())?;
            let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())?;
            let ak = load_under_ek(ctx, alg, ak_blob)?;
            let ek = match ek::create_ek_object_2(ctx, alg.selection(), None) {
                Ok(ek) => ek,
                Err(e) => {
                    ctx.flush_context(ak.into())?;
                    return Err(e);
                }
            };
            let result = ek_policy_session(ctx).and_then(|policy| {
                ctx.set_sessions((Some(AuthSession::Password), Some(policy), None));
                let r = ctx.activate_credential(ak, ek, id_object, secret);
                ctx.clear_sessions();
                ctx.flush_context(ObjectHandle::from(SessionHandle::from(policy)))?;
                r
            });
            ctx.flush_context(ak.into())?;
            ctx.flush_context(ek.into())?;
            Ok(result?.value().to_vec())
        })
    }

    /// TPM2_Certify: the AK signs that `key` (created by [`Tpm::create_signing_key`]) lives in this TPM, with
    /// the fleet's nonce as qualifying data.
    pub fn certify(
        &self,
        alg: EkAlgorithm,
        ak_blob: &AkBlob,
        key: &KeyBlob,
        nonce: &[u8],
    ) -> Result<Certification, TpmError> {
        self.with_context("certifying a key with the attestation key", |ctx| {
            let ak = load_under_ek(ctx, alg, ak_blob)?;
            let object = match load_under_ek(ctx, alg, key) {
                Ok(h) => h,
                Err(e) => {
                    ctx.flush_context(ak.into())?;
                    return Err(e);
                }
            };
            let result = Data::try_from(nonce.to_vec()).and_then(|nonce| {
                ctx.set_sessions((
                    Some(AuthSession::Password),
                    Some(AuthSession::Password),
                    None,
                ));
                let r = ctx.certify(object.into(), ak, nonce, SignatureScheme::Null);
                ctx.clear_sessions();
                r
            });
            ctx.flush_context(object.into())?;
            ctx.flush_context(ak.into())?;
            let (attest, signature) = result?;
            Ok(Certification {
                message: attest.marshall()?,
                signature: signature.marshall()?,
            })
        })
    }

    /// Signs a SHA-256 digest with an AK-certified ECDSA P-256 key; returns the signature as (r, s), each
    /// 32 bytes big-endian.
    pub fn sign_digest(
        &self,
        alg: EkAlgorithm,
        key: &KeyBlob,
        digest: &[u8; 32],
    ) -> Result<([u8; 32], [u8; 32]), TpmError> {
        self.with_context("signing with a device key", |ctx| {
            let handle = load_under_ek(ctx, alg, key)?;
            let result = (|| {
                let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
                    tag: TPM2_ST_HASHCHECK,
                    hierarchy: TPM2_RH_NULL,
                    digest: Default::default(),
                })?;
                let scheme = SignatureScheme::EcDsa {
                    hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                };
                ctx.execute_with_nullauth_session(|ctx| {
                    ctx.sign(
                        handle,
                        Digest::try_from(digest.to_vec())?,
                        scheme,
                        validation,
                    )
                })
            })();
            ctx.flush_context(handle.into())?;
            match result? {
                Signature::EcDsa(sig) => Ok((
                    left_pad(sig.signature_r().value()),
                    left_pad(sig.signature_s().value()),
                )),
                _ => Err(tss_esapi::Error::WrapperError(
                    tss_esapi::WrapperErrorKind::WrongValueFromTpm,
                )),
            }
        })
    }

    /// Quotes the PCRs in `pcrs` (indices in the SHA-256 bank) with `nonce` as qualifying data.
    pub fn quote(
        &self,
        alg: EkAlgorithm,
        ak_blob: &AkBlob,
        nonce: &[u8],
        pcrs: &[u8],
    ) -> Result<QuoteFiles, TpmError> {
        self.with_context("quoting PCRs", |ctx| {
            let public = Public::unmarshall(&ak_blob.public)?;
            let slots = pcrs
                .iter()
                .map(|&i| PcrSlot::try_from(1u32 << i))
                .collect::<Result<Vec<_>, _>>()?;
            let selection = PcrSelectionList::builder()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()?;
            let mut sorted: Vec<u8> = pcrs.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            let ak = load_under_ek(ctx, alg, ak_blob)?;
            let mut quote_and_read = || -> tss_esapi::Result<_> {
                let quoted = ctx.execute_with_nullauth_session(|ctx| {
                    ctx.quote(
                        ak,
                        Data::try_from(nonce.to_vec())?,
                        SignatureScheme::Null,
                        selection.clone(),
                    )
                })?;
                // Read right after quoting; a PCR extended in between makes the check fail, never pass wrongly.
                // TPM2_PCR_Read returns at most 8 digests per call, so larger selections are read in chunks.
                let mut digests = Vec::with_capacity(sorted.len());
                for chunk in sorted.chunks(8) {
                    let slots = chunk
                        .iter()
                        .map(|&i| PcrSlot::try_from(1u32 << i))
                        .collect::<Result<Vec<_>, _>>()?;
                    let part = PcrSelectionList::builder()
                        .with_selection(HashingAlgorithm::Sha256, &slots)
                        .build()?;
                    let (_, _, read) = ctx.pcr_read(part)?;
                    digests.extend(read.value().iter().cloned());
                }
                Ok((quoted, digests))
            };
            let result = quote_and_read();
            ctx.flush_context(ak.into())?;
            let ((attest, signature), digests) = result?;
            if digests.len() != sorted.len() {
                return Err(tss_esapi::Error::WrapperError(
                    tss_esapi::WrapperErrorKind::WrongValueFromTpm,
                ));
            }
            let pcr_values = sorted
                .iter()
                .copied()
                .zip(digests.iter().map(|d| d.value().to_vec()))
                .collect();
            Ok(QuoteFiles {
                message: attest.marshall()?,
                signature: signature.marshall()?,
                pcrs: tpm2_tools_pcrs(selection, &digests),
                ak_public: PublicBuffer::try_from(public)?.marshall()?,
                pcr_values,
            })
        })
    }
}

/// ECDSA scalars come from the TPM without leading zeros.
fn left_pad(v: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let v = &v[v.len().saturating_sub(32)..];
    out[32 - v.len()..].copy_from_slice(v);
    out
}

/// The byte layout tpm2-tools uses for `-f` PCR files: raw C structs as x86-64 lays them out.
fn tpm2_tools_pcrs(
    selection: PcrSelectionList,
    digests: &[tss_esapi::structures::Digest],
) -> Vec<u8> {
    let tpml: TPML_PCR_SELECTION = selection.into();
    let mut out = Vec::with_capacity(668);
    out.extend_from_slice(&tpml.count.to_le_bytes());
    for sel in &tpml.pcrSelections {
        // TPMS_PCR_SELECTION: u16 hash, u8 sizeofSelect, u8[4] pcrSelect, one byte of padding.
        out.extend_from_slice(&sel.hash.to_le_bytes());
        out.push(sel.sizeofSelect);
        out.extend_from_slice(&sel.pcrSelect);
        out.push(0);
    }
    let chunks: Vec<_> = digests.chunks(8).collect();
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for chunk in chunks {
        // TPML_DIGEST: u32 count, then 8 × TPM2B_DIGEST (u16 size, 64-byte buffer).
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        for i in 0..8 {
            let d = chunk.get(i).map(|d| d.value()).unwrap_or_default();
            out.extend_from_slice(&(d.len() as u16).to_le_bytes());
            let mut buf = [0u8; 64];
            buf[..d.len().min(64)].copy_from_slice(&d[..d.len().min(64)]);
            out.extend_from_slice(&buf);
        }
    }
    out
}
