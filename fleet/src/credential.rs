//! TPM2_MakeCredential in software (TPM 2.0 Part 1 §24, "Credential Protection"): the fleet seals a secret
//! to a device's EK for the Name of its AK. Only a TPM holding that EK, with that AK loaded beside it, can
//! recover the secret with TPM2_ActivateCredential, which is how the fleet learns the AK lives in that TPM.
//!
//! The construction, for an EK from the TCG default templates (name algorithm SHA-256, AES-128-CFB):
//! - a seed is shared with the EK: RSA-OAEP of a random seed (Part 1 Annex B, label "IDENTITY"), or an
//!   ephemeral ECDH with KDFe (Part 1 Annex C, §11.4.10.3);
//! - the credential, marshalled as TPM2B_DIGEST, is encrypted with AES-128-CFB under
//!   KDFa(seed, "STORAGE", AK name) with a zero IV (§11.4.9.3);
//! - an HMAC-SHA256 under KDFa(seed, "INTEGRITY") covers the ciphertext and the AK name.
//!
//! ring has no RSA encryption and no raw AES block function, so the RSA public operation is done with
//! `num-bigint` (with OAEP encoding written here) and CFB-128 is built here on the `aes` crate's block
//! cipher. Everything else (SHA-256, HMAC, ECDH, randomness) is ring.

use crate::ek::{uncompressed_point, EkKey, EkPublic};
use aes::cipher::{BlockEncrypt, KeyInit};
use num_bigint::BigUint;
use ring::rand::SecureRandom;

const SHA256_LEN: usize = 32;
const TPM_ALG_SHA256: u16 = 0x000b;

/// TPM2_MakeCredential's output, each as the contents of its TPM2B (without the u16 size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    /// TPM2B_ID_OBJECT contents: integrityHMAC (TPM2B_DIGEST) followed by encIdentity.
    pub id_object: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents: the OAEP ciphertext (RSA) or the ephemeral TPMS_ECC_POINT (ECC).
    pub encrypted_secret: Vec<u8>,
}

/// Why a credential could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("a credential must be 1 to {SHA256_LEN} bytes, this one is {0}")]
    CredentialSize(usize),
    #[error("the AK name is not a SHA-256 TPM name (0x000b followed by 32 bytes)")]
    AkName,
    #[error("the endorsement key cannot be encrypted to: {0}")]
    EkKey(&'static str),
    #[error("the system random number generator failed")]
    Random,
}

impl CredentialError {
    /// A stable machine-readable code (for the fleet's records and the protocol's error bodies).
    pub fn code(&self) -> &'static str {
        match self {
            CredentialError::CredentialSize(_) => "credential_size",
            CredentialError::AkName => "ak_name",
            CredentialError::EkKey(_) => "ek_key",
            CredentialError::Random => "random",
        }
    }
}

/// Seals `credential` to `ek` for the AK whose TPM Name is `ak_name`. The EK was parsed by
/// [`EkPublic::parse`], which admits only EKs with name algorithm SHA-256 and AES-128-CFB.
pub fn make_credential(
    ek: &EkPublic,
    ak_name: &[u8],
    credential: &[u8],
) -> Result<MadeCredential, CredentialError> {
    if credential.is_empty() || credential.len() > SHA256_LEN {
        return Err(CredentialError::CredentialSize(credential.len()));
    }
    if ak_name.len() != 2 + SHA256_LEN || ak_name[..2] != TPM_ALG_SHA256.to_be_bytes() {
        return Err(CredentialError::AkName);
    }
    let rng = ring::rand::SystemRandom::new();
    let (seed, encrypted_secret) = match ek.key() {
        EkKey::Rsa { modulus, exponent } => {
            let mut seed = [0u8; SHA256_LEN];
            rng.fill(&mut seed).map_err(|_| CredentialError::Random)?;
            let secret = rsa_oaep_encrypt(modulus, *exponent, b"IDENTITY\0", &seed, &rng)?;
            (seed, secret)
        }
        ecc @ EkKey::Ecc { x: ek_x, .. } => ecc_seed(&uncompressed_point(ecc), ek_x, &rng)?,
    };
    Ok(MadeCredential {
        id_object: protect(&seed, ak_name, credential),
        encrypted_secret,
    })
}

/// The seed and its TPMS_ECC_POINT for an ECC EK: an ephemeral P-256 key agrees Z with the EK, and
/// seed = KDFe(SHA-256, Z.x, "IDENTITY", ephemeral.x, EK.x, 256).
fn ecc_seed(
    ek_point: &[u8],
    ek_x: &[u8],
    rng: &ring::rand::SystemRandom,
) -> Result<([u8; SHA256_LEN], Vec<u8>), CredentialError> {
    use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
    let ephemeral =
        EphemeralPrivateKey::generate(&ECDH_P256, rng).map_err(|_| CredentialError::Random)?;
    let public = ephemeral
        .compute_public_key()
        .map_err(|_| CredentialError::Random)?;
    let public = public.as_ref();
    if public.len() != 65 || public[0] != 4 {
        return Err(CredentialError::EkKey(
            "the ephemeral key is not an uncompressed P-256 point",
        ));
    }
    let (eph_x, eph_y) = (&public[1..33], &public[33..65]);
    let seed = agree_ephemeral(
        ephemeral,
        &UnparsedPublicKey::new(&ECDH_P256, ek_point),
        |z| kdfe_sha256(z, b"IDENTITY", eph_x, ek_x),
    )
    .map_err(|_| CredentialError::EkKey("its point is not a valid P-256 public key"))?;
    let mut point = Vec::with_capacity(2 + 32 + 2 + 32);
    for c in [eph_x, eph_y] {
        point.extend_from_slice(&(c.len() as u16).to_be_bytes());
        point.extend_from_slice(c);
    }
    Ok((seed, point))
}

/// The TPM2B_ID_OBJECT contents for `credential` under `seed` (Part 1 §24.4 and §24.5).
fn protect(seed: &[u8], ak_name: &[u8], credential: &[u8]) -> Vec<u8> {
    let mut key = [0u8; 16];
    kdfa_sha256(seed, b"STORAGE", ak_name, &[], &mut key);
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    aes128_cfb_encrypt(&key, &mut enc_identity);

    let mut hmac_key = [0u8; SHA256_LEN];
    kdfa_sha256(seed, b"INTEGRITY", &[], &[], &mut hmac_key);
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hmac_key);
    let mut ctx = ring::hmac::Context::with_key(&hmac_key);
    ctx.update(&enc_identity);
    ctx.update(ak_name);
    let integrity = ctx.sign();

    let mut id_object = Vec::with_capacity(2 + SHA256_LEN + enc_identity.len());
    id_object.extend_from_slice(&(SHA256_LEN as u16).to_be_bytes());
    id_object.extend_from_slice(integrity.as_ref());
    id_object.extend_from_slice(&enc_identity);
    id_object
}

/// The label as the TPM uses it: the bytes, then a terminating zero if they do not end in one.
fn label_bytes(label: &[u8]) -> impl Iterator<Item = &[u8]> {
    let terminator: &[u8] = if label.last() == Some(&0) { &[] } else { &[0] };
    [label, terminator].into_iter()
}

/// KDFa with SHA-256 (Part 1 §11.4.10.2, SP 800-108 counter mode with HMAC): fills `out` (whole bytes) with
/// HMAC(key, [i]₃₂ || label || 0x00 || contextU || contextV || [bits]₃₂) for i = 1, 2, …
fn kdfa_sha256(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], out: &mut [u8]) {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let bits = (out.len() as u32).wrapping_mul(8);
    for (i, chunk) in out.chunks_mut(SHA256_LEN).enumerate() {
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(&(i as u32 + 1).to_be_bytes());
        for part in label_bytes(label) {
            ctx.update(part);
        }
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        chunk.copy_from_slice(&ctx.sign().as_ref()[..chunk.len()]);
    }
}

/// KDFe with SHA-256 for one digest of output (Part 1 §11.4.10.3, SP 800-56A concatenation KDF):
/// SHA-256([1]₃₂ || Z || label || 0x00 || partyUInfo || partyVInfo).
fn kdfe_sha256(z: &[u8], label: &[u8], party_u: &[u8], party_v: &[u8]) -> [u8; SHA256_LEN] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&1u32.to_be_bytes());
    ctx.update(z);
    for part in label_bytes(label) {
        ctx.update(part);
    }
    ctx.update(party_u);
    ctx.update(party_v);
    let mut out = [0u8; SHA256_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// AES-128 in CFB-128 mode with a zero IV, in place: C_i = P_i xor E(C_{i-1}), C_0 = IV; a short last block
/// uses the leading bytes of the keystream block.
fn aes128_cfb_encrypt(key: &[u8; 16], data: &mut [u8]) {
    let cipher = aes::Aes128::new(key.into());
    let mut feedback = [0u8; 16];
    for chunk in data.chunks_mut(16) {
        let mut block = aes::Block::from(feedback);
        cipher.encrypt_block(&mut block);
        for (d, k) in chunk.iter_mut().zip(block.iter()) {
            *d ^= k;
        }
        feedback[..chunk.len()].copy_from_slice(chunk);
    }
}

/// MGF1 with SHA-256 (RFC 8017 B.2.1): xors the mask generated from `seed` into `out`.
fn mgf1_sha256_xor(seed: &[u8], out: &mut [u8]) {
    for (counter, chunk) in out.chunks_mut(SHA256_LEN).enumerate() {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(seed);
        ctx.update(&(counter as u32).to_be_bytes());
        for (o, m) in chunk.iter_mut().zip(ctx.finish().as_ref()) {
            *o ^= m;
        }
    }
}

/// EME-OAEP encoding with SHA-256 and MGF1-SHA-256 (RFC 8017 §7.1.1 step 2) of `message` into `k` bytes.
fn oaep_encode(
    k: usize,
    label: &[u8],
    message: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, CredentialError> {
    if k < 2 * SHA256_LEN + 2 || message.len() > k - 2 * SHA256_LEN - 2 {
        return Err(CredentialError::EkKey(
            "its modulus is too small for the seed",
        ));
    }
    let mut em = vec![0u8; k];
    let (seed, db) = em[1..].split_at_mut(SHA256_LEN);
    db[..SHA256_LEN].copy_from_slice(ring::digest::digest(&ring::digest::SHA256, label).as_ref());
    let one_at = db.len() - message.len() - 1;
    db[one_at] = 1;
    db[one_at + 1..].copy_from_slice(message);
    rng.fill(seed).map_err(|_| CredentialError::Random)?;
    mgf1_sha256_xor(seed, db);
    mgf1_sha256_xor(db, seed);
    Ok(em)
}

/// RSAES-OAEP encryption (SHA-256) of `message` to the public key (`modulus`, `exponent`), left-padded to the
/// modulus length.
fn rsa_oaep_encrypt(
    modulus: &[u8],
    exponent: u32,
    label: &[u8],
    message: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, CredentialError> {
    let k = modulus.len();
    let em = oaep_encode(k, label, message, rng)?;
    let n = BigUint::from_bytes_be(modulus);
    let c = BigUint::from_bytes_be(&em).modpow(&BigUint::from(exponent), &n);
    let c = c.to_bytes_be();
    if c.len() > k {
        return Err(CredentialError::EkKey(
            "the RSA result is longer than its modulus",
        ));
    }
    let mut out = vec![0u8; k - c.len()];
    out.extend_from_slice(&c);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use crate::ek::tests::{ecc_ek_tpm2b, rsa_ek_tpm2b};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // The expected values below were computed independently with Python's `cryptography` package:
    // KBKDFHMAC (SP 800-108 counter mode, 4-byte counter before the fixed input, 4-byte length),
    // ConcatKDFHash (SP 800-56A) with otherinfo = label || 0x00 || U || V, and AES-128 CFB.
    fn seed() -> Vec<u8> {
        (0u8..32).collect()
    }

    #[test]
    fn kdfa_matches_sp800_108_counter_mode() {
        let mut name = vec![0x00, 0x0b];
        name.extend(0x20u8..0x40);
        let mut storage = [0u8; 16];
        kdfa_sha256(&seed(), b"STORAGE", &name, &[], &mut storage);
        assert_eq!(storage.to_vec(), hex("44d0c54553f7cd6bf17d99c547ec79d6"));
        let mut integrity = [0u8; 32];
        kdfa_sha256(&seed(), b"INTEGRITY", &[], &[], &mut integrity);
        assert_eq!(
            integrity.to_vec(),
            hex("bacf689f634ece301e1f1b15b072d9c87db6a69585db42b1a0cb8f73ebe2692e")
        );
        // More than one HMAC block, contexts split across U and V, and a label already zero-terminated.
        let mut long = [0u8; 80];
        kdfa_sha256(&seed(), b"TEST\0", b"u", b"v", &mut long);
        assert_eq!(
            long.to_vec(),
            hex(concat!(
                "e5407046c6692ae565b265ce74e65f955fdba599721db90c4ea4710e8872aeab",
                "84faf25e8fc1d4737800a82ea5ddcc03317e2928275f0ab3054fbdf2beebc817",
                "2588e065af6ef99a64605c4ec5e976fe"
            ))
        );
    }

    #[test]
    fn kdfe_matches_sp800_56a_concatenation_kdf() {
        let z: Vec<u8> = (0x40u8..0x60).collect();
        let u: Vec<u8> = (0x60u8..0x80).collect();
        let v: Vec<u8> = (0x80u8..0xa0).collect();
        assert_eq!(
            kdfe_sha256(&z, b"IDENTITY", &u, &v).to_vec(),
            hex("09889693e119f3fcbd0e9fab79ba8a81a68874d97d7929d67587b1fe260bd34c")
        );
    }

    #[test]
    fn cfb_matches_a_reference_and_handles_a_short_last_block() {
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let mut data = hex("000568656c6c6f2c2063726564656e7469616c20776f726c642121");
        aes128_cfb_encrypt(&key, &mut data);
        assert_eq!(
            data,
            hex("c6a45352ebe334ae4f2cf307c5adb60d7f5eb430a0999f0e5884b2")
        );
    }

    /// CFB decryption, for the tests: P_i = C_i xor E(C_{i-1}).
    fn aes128_cfb_decrypt(key: &[u8; 16], data: &mut [u8]) {
        let cipher = aes::Aes128::new(key.into());
        let mut feedback = [0u8; 16];
        for chunk in data.chunks_mut(16) {
            let mut block = aes::Block::from(feedback);
            cipher.encrypt_block(&mut block);
            feedback[..chunk.len()].copy_from_slice(chunk);
            for (d, k) in chunk.iter_mut().zip(block.iter()) {
                *d ^= k;
            }
        }
    }

    #[test]
    fn cfb_round_trips_every_length() {
        let key = [0x5au8; 16];
        for len in 0..70 {
            let plain: Vec<u8> = (0..len as u8).collect();
            let mut data = plain.clone();
            aes128_cfb_encrypt(&key, &mut data);
            if len > 0 {
                assert_ne!(data, plain);
            }
            aes128_cfb_decrypt(&key, &mut data);
            assert_eq!(data, plain, "length {len}");
        }
    }

    /// EME-OAEP decoding (RFC 8017 §7.1.2 step 3), for the tests.
    fn oaep_decode(label: &[u8], em: &[u8]) -> Option<Vec<u8>> {
        if em[0] != 0 {
            return None;
        }
        let (mut seed, mut db) = (
            em[1..1 + SHA256_LEN].to_vec(),
            em[1 + SHA256_LEN..].to_vec(),
        );
        mgf1_sha256_xor(&db, &mut seed);
        mgf1_sha256_xor(&seed, &mut db);
        if db[..SHA256_LEN] != *ring::digest::digest(&ring::digest::SHA256, label).as_ref() {
            return None;
        }
        let rest = &db[SHA256_LEN..];
        let one = rest.iter().position(|&b| b != 0)?;
        (rest[one] == 1).then(|| rest[one + 1..].to_vec())
    }

    #[test]
    fn oaep_round_trips_and_binds_the_label() {
        let rng = ring::rand::SystemRandom::new();
        for len in [0, 1, 32, 190] {
            let msg: Vec<u8> = (0..len).map(|i| i as u8 ^ 0xa5).collect();
            let em = oaep_encode(256, b"IDENTITY\0", &msg, &rng).unwrap();
            assert_eq!(em.len(), 256);
            assert_eq!(oaep_decode(b"IDENTITY\0", &em), Some(msg.clone()));
            assert_eq!(oaep_decode(b"IDENTITY", &em), None);
            // Randomised: the same message encodes differently each time.
            assert_ne!(em, oaep_encode(256, b"IDENTITY\0", &msg, &rng).unwrap());
        }
        assert_eq!(
            oaep_encode(256, b"", &[0u8; 191], &rng).unwrap_err().code(),
            "ek_key"
        );
    }

    /// Two 1024-bit primes made with `openssl prime -generate -bits 1024` for these tests only.
    const P: &str = concat!(
        "CBC34D546BB15156772CFA5DE2E18F03D655964CBFAD053A5CAAE7FAF898D46086711B125AEF56E62DF9C151AD3F947C",
        "6EB570DECC0966E73FFADA906346D0F7FF1958A92228A468161139474F78C32FF28C5665690A83193265A4C0D625B1EA",
        "69DA0F93D7B55583F3876F6FC05F82EC221C31A599AA3B09532F863446DD4817"
    );
    const Q: &str = concat!(
        "C52BE5084BD1C9015DDDA620F07ED3E193AE88A65598E5A6345A226973BB418020056C2F2E710574D3D8A3CB60502E03",
        "C765F6F70D4F0E6BE9D67B2429CFEB3B0858DB848C049FFF48993D56221CEEE5BBD73691C22292B54EFC5C72E61365C0",
        "9BBDD7102931455920FF2843042780D789965AEEFBCC298388EB65D0C9B61E81"
    );

    /// A test RSA-2048 key: (modulus bytes, private exponent).
    pub(crate) fn test_rsa_key() -> (Vec<u8>, BigUint) {
        let p = BigUint::parse_bytes(P.as_bytes(), 16).unwrap();
        let q = BigUint::parse_bytes(Q.as_bytes(), 16).unwrap();
        let one = BigUint::from(1u32);
        let phi = (&p - &one) * (&q - &one);
        let d = BigUint::from(65_537u32).modinv(&phi).unwrap();
        let n = (p * q).to_bytes_be();
        assert_eq!(n.len(), 256);
        (n, d)
    }

    /// TPM2_ActivateCredential in software, given the seed: checks the HMAC and decrypts the credential.
    fn unprotect(seed: &[u8], ak_name: &[u8], id_object: &[u8]) -> Option<Vec<u8>> {
        let (size, rest) = id_object.split_at(2);
        if size != [0, 32] {
            return None;
        }
        let (integrity, enc_identity) = rest.split_at(32);
        let mut hmac_key = [0u8; 32];
        kdfa_sha256(seed, b"INTEGRITY", &[], &[], &mut hmac_key);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hmac_key);
        ring::hmac::verify(&key, &[enc_identity, ak_name].concat(), integrity).ok()?;
        let mut sym = [0u8; 16];
        kdfa_sha256(seed, b"STORAGE", ak_name, &[], &mut sym);
        let mut plain = enc_identity.to_vec();
        aes128_cfb_decrypt(&sym, &mut plain);
        let n = u16::from_be_bytes([plain[0], plain[1]]) as usize;
        (plain.len() == 2 + n).then(|| plain[2..].to_vec())
    }

    fn ak_name(fill: u8) -> Vec<u8> {
        let mut name = vec![0x00, 0x0b];
        name.extend([fill; 32]);
        name
    }

    #[test]
    fn rsa_credential_activates_in_software_only_for_its_ak() {
        let (n, d) = test_rsa_key();
        let ek = EkPublic::parse(&rsa_ek_tpm2b(&n)).unwrap();
        let secret = b"the fleet's challenge, 32 bytes!";
        let made = make_credential(&ek, &ak_name(1), secret).unwrap();
        assert_eq!(made.encrypted_secret.len(), 256);
        assert_eq!(made.id_object.len(), 2 + 32 + 2 + secret.len());

        let c = BigUint::from_bytes_be(&made.encrypted_secret);
        let em = c.modpow(&d, &BigUint::from_bytes_be(&n)).to_bytes_be();
        let mut em_padded = vec![0u8; 256 - em.len()];
        em_padded.extend(em);
        let seed = oaep_decode(b"IDENTITY\0", &em_padded).unwrap();
        assert_eq!(seed.len(), 32);
        assert_eq!(
            unprotect(&seed, &ak_name(1), &made.id_object),
            Some(secret.to_vec())
        );
        assert_eq!(unprotect(&seed, &ak_name(2), &made.id_object), None);
        let mut tampered = made.id_object.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(unprotect(&seed, &ak_name(1), &tampered), None);

        // A fresh seed every time.
        let again = make_credential(&ek, &ak_name(1), secret).unwrap();
        assert_ne!(again.encrypted_secret, made.encrypted_secret);
        assert_ne!(again.id_object, made.id_object);
    }

    #[test]
    fn ecc_credential_sends_a_valid_ephemeral_point() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ek = EkPublic::parse(&ecc_ek_tpm2b(key.public_key_raw())).unwrap();
        let made = make_credential(&ek, &ak_name(1), &[9u8; 20]).unwrap();
        let s = &made.encrypted_secret;
        assert_eq!(s.len(), 2 + 32 + 2 + 32);
        assert_eq!((&s[..2], &s[34..36]), (&[0u8, 32][..], &[0u8, 32][..]));
        let point = [&[4u8][..], &s[2..34], &s[36..]].concat();
        let rng = ring::rand::SystemRandom::new();
        let mine =
            ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::ECDH_P256, &rng)
                .unwrap();
        let peer = ring::agreement::UnparsedPublicKey::new(&ring::agreement::ECDH_P256, &point);
        ring::agreement::agree_ephemeral(mine, &peer, |_| ()).unwrap();
        assert_eq!(made.id_object.len(), 2 + 32 + 2 + 20);
        let again = make_credential(&ek, &ak_name(1), &[9u8; 20]).unwrap();
        assert_ne!(again.encrypted_secret, made.encrypted_secret);
    }

    #[test]
    fn bad_credentials_and_names_are_refused() {
        let (n, _) = test_rsa_key();
        let ek = EkPublic::parse(&rsa_ek_tpm2b(&n)).unwrap();
        for len in [0, 33, 64] {
            let err = make_credential(&ek, &ak_name(1), &vec![1u8; len]).unwrap_err();
            assert_eq!(err, CredentialError::CredentialSize(len));
        }
        let mut sha1_name = vec![0x00, 0x04];
        sha1_name.extend([1u8; 20]);
        for name in [&[][..], &ak_name(1)[..33], &sha1_name] {
            let err = make_credential(&ek, name, b"x").unwrap_err();
            assert_eq!(err.code(), "ak_name", "{err}");
        }
    }
}
