//! The signed workload set: what the fleet says a site runs, as served on `GET /v1/workload-set`.
//!
//! A COSE_Sign1 (RFC 9052, tagged) signed ES256 by the fleet's workload signer, whose public key every
//! device is given at install time. Its protected header carries alg, the content type
//! [`SET_CONTENT_TYPE`] and kid (SHA-256 of the signer's uncompressed P-256 point); the unprotected header
//! is empty. The payload is the CBOR encoding of [`WorkloadSet`]: a serial that only ever grows (a device
//! refuses a set whose serial is not above the last one it applied, so an old set cannot be replayed), the
//! devices it is for (empty: every device) and the recipes, each with its TOML text and artifacts.
//!
//! A device checks, in this order: size, COSE shape and headers, kid, signature, payload decoding, every
//! recipe against the schema, artifact digests, unique names, `after` naming recipes in the set. Nothing
//! in an unverified set is looked at beyond its headers.

use crate::recipe::{self, Recipe};
use coset::{iana, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use ring::digest::{digest, SHA256};
use ring::signature::{EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// `GET` (mTLS): the signed set for the device, `application/cose`, with an ETag; 304 when the request's
/// `If-None-Match` is that ETag, 204 when the fleet has no set for the device.
pub const WORKLOAD_SET_PATH: &str = "/v1/workload-set";
/// Media type of the answer.
pub const SET_MEDIA_TYPE: &str = "application/cose; cose-type=\"cose-sign1\"";
/// Content type in the protected header, so a set is never taken for another signed object.
pub const SET_CONTENT_TYPE: &str = "application/vnd.cairn.workload-set+cbor";
/// The largest signed set a device accepts: artifacts are scripts and small binaries; images come from a
/// registry.
pub const MAX_SET_BYTES: usize = 64 << 20;
/// DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSet {
    /// Grows with every set the fleet signs; a device applies only a serial above its last one.
    pub serial: u64,
    /// Unix seconds when it was signed, for operators.
    pub issued_at: u64,
    /// Device ids this set is for; empty means every device.
    pub devices: Vec<String>,
    pub recipes: Vec<SetRecipe>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRecipe {
    /// The recipe's file name, for messages.
    pub file: String,
    pub toml: String,
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Path relative to the recipe's directory, as `run.command.artifact` names it.
    pub name: String,
    /// Hex SHA-256 of `data`.
    pub sha256: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A recipe from a verified set, with the digest that identifies this exact version of it.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRecipe {
    pub recipe: Recipe,
    /// Hex SHA-256 over the recipe text and its artifacts: a change to either replaces the unit.
    pub digest: String,
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("the workload set is {len} bytes, more than the {max} accepted")]
    TooLarge { len: usize, max: usize },
    #[error("the workload set is not a COSE_Sign1 message ({0})")]
    Cose(String),
    #[error("the workload set's protected header is wrong: {0}")]
    Header(String),
    #[error(
        "the workload set is signed by key {found}, not by the fleet's workload signer {expected}; \
         give the device the fleet's workload-signer.pub, or sign with the matching key"
    )]
    UnknownSigner { found: String, expected: String },
    #[error(
        "the workload set's signature does not verify: it was altered or signed with another key"
    )]
    BadSignature,
    #[error("the workload set's payload does not decode ({0})")]
    Payload(String),
    #[error(transparent)]
    Recipe(#[from] recipe::RecipeError),
    #[error("the workload set is wrong: {0}")]
    Invalid(String),
    #[error(
        "the signer key is not a P-256 public key ({0}); give the fleet's workload-signer.pub"
    )]
    Key(String),
    #[error("cannot sign the workload set: {0}")]
    Sign(String),
}

/// Hex SHA-256 of a P-256 uncompressed point: the kid.
pub fn kid_of(point: &[u8]) -> Vec<u8> {
    digest(&SHA256, point).as_ref().to_vec()
}

/// The 65-byte point of a P-256 SubjectPublicKeyInfo (DER), as in a "PUBLIC KEY" PEM.
pub fn point_from_spki(der: &[u8]) -> Result<[u8; 65], SetError> {
    der.strip_prefix(&P256_SPKI_PREFIX[..])
        .and_then(|p| <[u8; 65]>::try_from(p).ok())
        .filter(|p| p[0] == 4)
        .ok_or_else(|| {
            SetError::Key(format!(
                "{} bytes of DER without the P-256 SubjectPublicKeyInfo prefix",
                der.len()
            ))
        })
}

/// The SubjectPublicKeyInfo (DER) of a P-256 point.
pub fn spki_of(point: &[u8; 65]) -> Vec<u8> {
    [&P256_SPKI_PREFIX[..], &point[..]].concat()
}

/// The digest a recipe version is known by: SHA-256 over its text and each artifact's name and digest.
pub fn recipe_digest(toml: &str, artifacts: &[Artifact]) -> String {
    let mut ctx = ring::digest::Context::new(&SHA256);
    ctx.update(&(toml.len() as u64).to_be_bytes());
    ctx.update(toml.as_bytes());
    for a in artifacts {
        ctx.update(&(a.name.len() as u64).to_be_bytes());
        ctx.update(a.name.as_bytes());
        ctx.update(a.sha256.as_bytes());
    }
    crate::fleet::to_hex(ctx.finish().as_ref())
}

/// Signs `set` with the workload signer `key` (PKCS#8 P-256).
pub fn sign(set: &WorkloadSet, key: &EcdsaKeyPair) -> Result<Vec<u8>, SetError> {
    let mut payload = Vec::new();
    coset::cbor::ser::into_writer(set, &mut payload).map_err(|e| SetError::Sign(e.to_string()))?;
    let kid = kid_of(ring::signature::KeyPair::public_key(key).as_ref());
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .content_type(SET_CONTENT_TYPE.to_owned())
        .key_id(kid)
        .build();
    let rng = ring::rand::SystemRandom::new();
    let bytes = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .try_create_signature(&[], |tbs| {
            key.sign(&rng, tbs)
                .map(|s| s.as_ref().to_vec())
                .map_err(|e| SetError::Sign(e.to_string()))
        })?
        .build()
        .to_tagged_vec()
        .map_err(|e| SetError::Sign(e.to_string()))?;
    if bytes.len() > MAX_SET_BYTES {
        return Err(SetError::TooLarge {
            len: bytes.len(),
            max: MAX_SET_BYTES,
        });
    }
    Ok(bytes)
}

/// Verifies a signed set against the signer's point and checks everything in it; returns the set and its
/// recipes in start order (every recipe after the ones it names in `after`).
pub fn verify(
    bytes: &[u8],
    signer: &[u8; 65],
) -> Result<(WorkloadSet, Vec<VerifiedRecipe>), SetError> {
    if bytes.len() > MAX_SET_BYTES {
        return Err(SetError::TooLarge {
            len: bytes.len(),
            max: MAX_SET_BYTES,
        });
    }
    let msg = CoseSign1::from_tagged_slice(bytes).map_err(|e| SetError::Cose(e.to_string()))?;
    let h = &msg.protected.header;
    if h.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::ES256,
        ))
    {
        return Err(SetError::Header(format!("alg is {:?}, not ES256", h.alg)));
    }
    if h.content_type != Some(coset::ContentType::Text(SET_CONTENT_TYPE.to_owned())) {
        return Err(SetError::Header(format!(
            "content type is {:?}, not {SET_CONTENT_TYPE}",
            h.content_type
        )));
    }
    if !h.crit.is_empty() || !h.rest.is_empty() || !msg.unprotected.is_empty() {
        return Err(SetError::Header(
            "it carries headers other than alg, content type and kid".into(),
        ));
    }
    let expected = kid_of(signer);
    if h.key_id != expected {
        return Err(SetError::UnknownSigner {
            found: crate::fleet::to_hex(&h.key_id),
            expected: crate::fleet::to_hex(&expected),
        });
    }
    let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, signer);
    msg.verify_signature(&[], |sig, tbs| key.verify(tbs, sig))
        .map_err(|_| SetError::BadSignature)?;
    let payload = msg.payload.as_deref().unwrap_or_default();
    let set: WorkloadSet =
        coset::cbor::de::from_reader(payload).map_err(|e| SetError::Payload(e.to_string()))?;
    let recipes = check(&set)?;
    Ok((set, recipes))
}

/// Checks the recipes of a set (also before signing, so the fleet never signs a set a device refuses);
/// returns them in start order.
pub fn check(set: &WorkloadSet) -> Result<Vec<VerifiedRecipe>, SetError> {
    let mut out = Vec::with_capacity(set.recipes.len());
    let mut names = BTreeSet::new();
    for r in &set.recipes {
        let origin = format!("{} in the workload set", r.file);
        let recipe = recipe::parse(&origin, &r.toml)?;
        for a in &r.artifacts {
            // Names become paths on the device: never outside the recipe's artifact directory.
            let safe = !a.name.is_empty()
                && std::path::Path::new(&a.name)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !safe {
                return Err(SetError::Invalid(format!(
                    "artifact {:?} of {} is not a relative path inside the recipe's directory",
                    a.name, r.file
                )));
            }
            let actual = crate::fleet::to_hex(digest(&SHA256, &a.data).as_ref());
            if actual != a.sha256 {
                return Err(SetError::Invalid(format!(
                    "artifact {} of {} has SHA-256 {actual}, not the {} the set states",
                    a.name, r.file, a.sha256
                )));
            }
        }
        if let recipe::Run::Command {
            artifact: Some(name),
            ..
        } = &recipe.run
        {
            if !r.artifacts.iter().any(|a| &a.name == name) {
                return Err(SetError::Invalid(format!(
                    "{} names artifact {name}, which the set does not carry",
                    r.file
                )));
            }
        }
        if !names.insert(recipe.name.clone()) {
            return Err(SetError::Invalid(format!(
                "two recipes are named {}; give each workload its own name",
                recipe.name
            )));
        }
        out.push(VerifiedRecipe {
            digest: recipe_digest(&r.toml, &r.artifacts),
            recipe,
            artifacts: r.artifacts.clone(),
        });
    }
    start_order(out)
}

/// Orders recipes so each comes after the ones it names in `after`; refuses unknown names and cycles.
fn start_order(mut pending: Vec<VerifiedRecipe>) -> Result<Vec<VerifiedRecipe>, SetError> {
    let names: BTreeSet<String> = pending.iter().map(|r| r.recipe.name.clone()).collect();
    for r in &pending {
        if let Some(a) = r.recipe.after.iter().find(|a| !names.contains(*a)) {
            return Err(SetError::Invalid(format!(
                "{} starts after {a}, which is not in the set; add that recipe or drop it from `after`",
                r.recipe.name
            )));
        }
    }
    pending.sort_by(|a, b| a.recipe.name.cmp(&b.recipe.name));
    let mut done = BTreeSet::new();
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let before = pending.len();
        let mut i = 0;
        while i < pending.len() {
            if pending[i].recipe.after.iter().all(|a| done.contains(a)) {
                let r = pending.remove(i);
                done.insert(r.recipe.name.clone());
                out.push(r);
            } else {
                i += 1;
            }
        }
        if pending.len() == before {
            let cycle: Vec<_> = pending.iter().map(|r| r.recipe.name.as_str()).collect();
            return Err(SetError::Invalid(format!(
                "the `after` lists of {} form a cycle; break it",
                cycle.join(", ")
            )));
        }
    }
    Ok(out)
}

/// Whether the set is for `device` (an empty list means every device).
pub fn is_for(set: &WorkloadSet, device: &str) -> bool {
    set.devices.is_empty() || set.devices.iter().any(|d| d == device)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn key() -> EcdsaKeyPair {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
    }

    fn point(k: &EcdsaKeyPair) -> [u8; 65] {
        k.public_key().as_ref().try_into().unwrap()
    }

    fn recipe(name: &str, after: &[&str]) -> SetRecipe {
        let data = b"#!/bin/sh\nexec sleep 1000\n".to_vec();
        SetRecipe {
            file: format!("{name}.toml"),
            toml: format!(
                "name = \"{name}\"\nversion = \"1\"\nafter = {after:?}\n[run.command]\nargv = [\"run.sh\"]\nartifact = \"run.sh\"\n"
            ),
            artifacts: vec![Artifact {
                name: "run.sh".into(),
                sha256: crate::fleet::to_hex(digest(&SHA256, &data).as_ref()),
                data,
            }],
        }
    }

    fn set(recipes: Vec<SetRecipe>) -> WorkloadSet {
        WorkloadSet {
            serial: 7,
            issued_at: 1_800_000_000,
            devices: vec![],
            recipes,
        }
    }

    #[test]
    fn a_signed_set_verifies_and_comes_back_in_start_order() {
        let k = key();
        let s = set(vec![
            recipe("b", &["a"]),
            recipe("c", &[]),
            recipe("a", &["c"]),
        ]);
        let bytes = sign(&s, &k).unwrap();
        let (back, recipes) = verify(&bytes, &point(&k)).unwrap();
        assert_eq!(back, s);
        let order: Vec<_> = recipes.iter().map(|r| r.recipe.name.as_str()).collect();
        assert_eq!(order, ["c", "a", "b"]);
        assert_eq!(recipes[0].digest.len(), 64);
    }

    #[test]
    fn a_tampered_or_foreign_set_is_refused() {
        let k = key();
        let bytes = sign(&set(vec![recipe("a", &[])]), &k).unwrap();
        // Flip one byte of the payload (the recipe text sits in the middle).
        let at = bytes.windows(6).position(|w| w == b"exec s").unwrap();
        let mut tampered = bytes.clone();
        tampered[at] ^= 0x20;
        assert!(matches!(
            verify(&tampered, &point(&k)),
            Err(SetError::BadSignature)
        ));
        let other = key();
        let err = verify(&bytes, &point(&other)).unwrap_err();
        assert!(matches!(err, SetError::UnknownSigner { .. }), "{err}");
        // A set signed by another key that claims the right kid still fails on the signature.
        let mut forged = sign(&set(vec![recipe("a", &[])]), &other).unwrap();
        let their_kid = kid_of(&point(&other));
        let at = forged.windows(32).position(|w| w == their_kid).unwrap();
        forged[at..at + 32].copy_from_slice(&kid_of(&point(&k)));
        assert!(matches!(
            verify(&forged, &point(&k)),
            Err(SetError::BadSignature)
        ));
        assert!(matches!(
            verify(b"not cbor", &point(&k)),
            Err(SetError::Cose(_))
        ));
    }

    #[test]
    fn bad_contents_are_refused_even_when_signed() {
        let k = key();
        let mut wrong_digest = recipe("a", &[]);
        wrong_digest.artifacts[0].data.push(b'\n');
        let mut missing = recipe("b", &[]);
        missing.artifacts.clear();
        let mut bad_toml = recipe("c", &[]);
        bad_toml.toml.push_str("colour = \"red\"\n");
        let mut escaping = recipe("d", &[]);
        escaping.artifacts.push(Artifact {
            name: "../../etc/cron.d/x".into(),
            sha256: crate::fleet::to_hex(digest(&SHA256, b"x").as_ref()),
            data: b"x".to_vec(),
        });
        let cases = [
            (vec![wrong_digest], "SHA-256"),
            (vec![escaping], "not a relative path"),
            (vec![missing], "does not carry"),
            (vec![bad_toml], "colour"),
            (vec![recipe("a", &[]), recipe("a", &[])], "two recipes"),
            (vec![recipe("a", &["z"])], "not in the set"),
            (vec![recipe("a", &["b"]), recipe("b", &["a"])], "cycle"),
        ];
        for (recipes, want) in cases {
            let bytes = sign(&set(recipes), &k).unwrap();
            let err = verify(&bytes, &point(&k)).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn digests_change_with_text_or_artifact_and_spki_round_trips() {
        let a = recipe("a", &[]);
        let mut b = a.clone();
        b.artifacts[0].sha256 = "00".repeat(32);
        assert_ne!(
            recipe_digest(&a.toml, &a.artifacts),
            recipe_digest(&b.toml, &b.artifacts)
        );
        assert_ne!(
            recipe_digest(&a.toml, &a.artifacts),
            recipe_digest(&format!("{} ", a.toml), &a.artifacts)
        );
        let p = point(&key());
        assert_eq!(point_from_spki(&spki_of(&p)).unwrap(), p);
        assert!(point_from_spki(&p).is_err());
        let mut s = set(vec![]);
        assert!(is_for(&s, "dev-1"));
        s.devices = vec!["dev-2".into()];
        assert!(!is_for(&s, "dev-1") && is_for(&s, "dev-2"));
    }
}
