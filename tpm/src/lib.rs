//! `cairn-tpm`: the only crate in cairn that touches tss-esapi.
//!
//! The TPM is opened per operation and closed right after ([`Tpm::with_context`]): swtpm serves one client at a
//! time and has no resource manager, and an operator's tpm2-tools must reach the same TPM while cairnd runs.

mod attest;
mod probe;
pub mod swtpm;

pub use attest::{AkBlob, Certification, EkAlgorithm, KeyBlob, QuoteFiles, MAX_NONCE_BYTES};
pub use probe::{EkCertificate, TpmInfo};

use std::str::FromStr;
use tss_esapi::{Context, TctiNameConf};

/// Everything that can go wrong talking to the TPM. Messages name the TCTI so a reader knows which TPM.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("TPM connection string '{tcti}' is not valid (expected e.g. 'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321')")]
    BadTcti {
        tcti: String,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("could not open the TPM at '{tcti}'")]
    Open {
        tcti: String,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM at '{tcti}' failed during {operation}")]
    Command {
        tcti: String,
        operation: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
}

/// A TPM named by its TCTI string. Holds no connection: each operation opens and closes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tpm {
    tcti: String,
}

impl Tpm {
    /// Checks the TCTI string now, so a bad configuration is reported at start-up, not at first use.
    pub fn new(tcti: &str) -> Result<Self, TpmError> {
        TctiNameConf::from_str(tcti).map_err(|source| TpmError::BadTcti {
            tcti: tcti.to_owned(),
            source,
        })?;
        Ok(Tpm {
            tcti: tcti.to_owned(),
        })
    }

    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// A TPM without a resource manager (swtpm, the simulator) mixes up two processes' sessions and objects if
    /// their commands interleave; cairnd and cairnctl then take turns through a lock file. A kernel resource
    /// manager (`/dev/tpmrm0`) needs none.
    fn turn(&self) -> Option<std::fs::File> {
        if !(self.tcti.starts_with("swtpm") || self.tcti.starts_with("mssim")) {
            return None;
        }
        let name: String = self
            .tcti
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = std::env::temp_dir().join(format!("cairn-tpm-{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok()?;
        file.lock().ok()?;
        Some(file)
    }

    /// Opens the TPM, runs `f`, and closes the TPM again whatever `f` returned.
    pub fn with_context<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> Result<T, TpmError> {
        let _turn = self.turn();
        let conf = TctiNameConf::from_str(&self.tcti).map_err(|source| TpmError::BadTcti {
            tcti: self.tcti.clone(),
            source,
        })?;
        let mut context = Context::new(conf).map_err(|source| TpmError::Open {
            tcti: self.tcti.clone(),
            source,
        })?;
        f(&mut context).map_err(|source| TpmError::Command {
            tcti: self.tcti.clone(),
            operation,
            source,
        })
    }
}
