//! The attestation key (AK) and quotes. The AK is created under the RSA-2048 EK from the TCG default
//! template, so only this TPM can load it; its blobs are kept by the caller (on the data partition) and loaded
//! again per operation, never re-created on every boot. Quotes are written in the formats tpm2-tools reads,
//! so any operator can check them with `tpm2_checkquote`.

use crate::{Tpm, TpmError};
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{
    Data, PcrSelectionList, PcrSlot, Private, Public, PublicBuffer, SignatureScheme,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPML_PCR_SELECTION;

/// The AK as stored between operations: the TPM-wrapped private part and the public part, both marshalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkBlob {
    pub private: Vec<u8>,
    /// TPMT_PUBLIC.
    pub public: Vec<u8>,
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
}

/// Largest qualifying data a quote carries (TPM2B_DATA holds a digest-sized value).
pub const MAX_NONCE_BYTES: usize = 64;

fn ek_rsa() -> Result<AsymmetricAlgorithmSelection, tss_esapi::Error> {
    Ok(AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048))
}

impl Tpm {
    /// Creates a new AK under the RSA-2048 EK (RSASSA, SHA-256). Call once per device and keep the blob.
    pub fn create_ak(&self) -> Result<AkBlob, TpmError> {
        self.with_context("creating the attestation key", |ctx| {
            let ek = ek::create_ek_object_2(ctx, ek_rsa()?, None)?;
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

    /// Quotes the PCRs in `pcrs` (indices in the SHA-256 bank) with `nonce` as qualifying data.
    pub fn quote(
        &self,
        ak_blob: &AkBlob,
        nonce: &[u8],
        pcrs: &[u8],
    ) -> Result<QuoteFiles, TpmError> {
        self.with_context("quoting PCRs", |ctx| {
            let public = Public::unmarshall(&ak_blob.public)?;
            let private = Private::try_from(ak_blob.private.clone())?;
            let slots = pcrs
                .iter()
                .map(|&i| PcrSlot::try_from(1u32 << i))
                .collect::<Result<Vec<_>, _>>()?;
            let selection = PcrSelectionList::builder()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()?;
            let ek = ek::create_ek_object_2(ctx, ek_rsa()?, None)?;
            let loaded = ak::load_ak(ctx, ek, None, private, public.clone());
            ctx.flush_context(ek.into())?;
            let ak = loaded?;
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
                Ok((quoted, ctx.pcr_read(selection.clone())?))
            };
            let result = quote_and_read();
            ctx.flush_context(ak.into())?;
            let ((attest, signature), (_, read_selection, digests)) = result?;
            Ok(QuoteFiles {
                message: attest.marshall()?,
                signature: signature.marshall()?,
                pcrs: tpm2_tools_pcrs(read_selection, digests.value()),
                ak_public: PublicBuffer::try_from(public)?.marshall()?,
            })
        })
    }
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
