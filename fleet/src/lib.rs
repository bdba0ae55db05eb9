//! The reference fleet backend: the other side of every exchange a cairn device makes. It keeps its state in
//! one directory (`--state`), so a restarted fleet is the same fleet.

pub mod admin;
pub mod attestation;
pub mod credential;
pub mod ek;
pub mod eventlog;
pub mod image_measure;
pub mod ingest;
pub mod pki;
pub mod quote;
pub mod reference;
pub mod remote_write;
pub mod server;
pub mod store;
pub mod update_repo;
pub mod workloads;

/// An error and its sources as one line, for logs and command output.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
