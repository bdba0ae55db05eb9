//! The fleet's own CA and its TLS server certificate. The CA key is made once and kept in the state
//! directory (mode 0600); the CA certificate (`ca.pem`) is what device images ship as their trust anchor.
//! The server certificate is re-issued at every start, for the names the fleet is reached by.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fleet CA key {path} is not a usable PEM private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

pub const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";

/// The fleet's TLS material for one run, and the CA that issues device certificates.
pub struct ServerIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity").finish_non_exhaustive()
    }
}

/// A device certificate as issued: PEM for the device, and the serial the fleet matches client certificates by.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    /// The DER INTEGER contents, as webpki reports them for a presented certificate.
    pub serial: Vec<u8>,
    pub not_after_unix: u64,
}

/// A TPM-resident P-256 public key for rcgen, which signs certificates for keys it does not hold.
struct TpmPublicKey<'a>(&'a [u8]);

impl rcgen::PublicKeyData for TpmPublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl ServerIdentity {
    /// Issues a client certificate (CN = device id) for an AK-certified P-256 key, `point` = 0x04 || x || y.
    pub fn issue_device_cert(
        &self,
        device_id: &str,
        point: &[u8],
        serial: [u8; 16],
        validity_days: u32,
    ) -> Result<IssuedCert, PkiError> {
        let gen = |e: rcgen::Error| PkiError::Generate(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "cairn device");
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        let mut serial = serial.to_vec();
        // A positive INTEGER with no leading zero byte: what a verifier reads back is exactly what we store.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(rcgen::SerialNumber::from(serial.clone()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        let not_after = now + time::Duration::days(i64::from(validity_days));
        params.not_after = not_after;
        let cert = params
            .signed_by(&TpmPublicKey(point), &self.issuer)
            .map_err(gen)?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial,
            not_after_unix: u64::try_from(not_after.unix_timestamp()).unwrap_or(0),
        })
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cairn reference fleet");
    dn.push(DnType::CommonName, "cairn fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    cairn_proto::atomic_file::write(path, text.as_bytes(), 0o600).map_err(|source| {
        PkiError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// Loads the CA from `state` (creating it on first use) and issues a server certificate for `names`.
pub fn load_or_create(state: &Path, names: &[String]) -> Result<ServerIdentity, PkiError> {
    let key_path = state.join(CA_KEY_FILE);
    let cert_path = state.join(CA_CERT_FILE);
    let gen = |e: rcgen::Error| PkiError::Generate(e.to_string());

    let ca_key = if key_path.exists() {
        let pem = std::fs::read_to_string(&key_path).map_err(|source| PkiError::Read {
            path: key_path.clone(),
            source,
        })?;
        KeyPair::from_pem(&pem).map_err(|e| PkiError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?
    } else {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        write_private(&key_path, &key.serialize_pem())?;
        key
    };
    let ca_pem = if cert_path.exists() {
        std::fs::read_to_string(&cert_path).map_err(|source| PkiError::Read {
            path: cert_path.clone(),
            source,
        })?
    } else {
        let pem = ca_params().self_signed(&ca_key).map_err(gen)?.pem();
        std::fs::write(&cert_path, &pem).map_err(|source| PkiError::Write {
            path: cert_path.clone(),
            source,
        })?;
        pem
    };
    // Verifiers match the issuer by name and key, both stable, so the CA parameters need not be re-read.
    let issuer = rcgen::Issuer::new(
        ca_params(),
        KeyPair::from_pem(&ca_key.serialize_pem()).map_err(gen)?,
    );
    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(gen)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "cairn fleet");
    let cert = params.signed_by(&server_key, &issuer).map_err(gen)?;
    Ok(ServerIdentity {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: server_key.serialize_pem(),
        issuer: rcgen::Issuer::new(ca_params(), ca_key),
    })
}
