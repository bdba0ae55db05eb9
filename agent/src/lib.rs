//! The cairn agent as a library: one module per concern. The `cairnd` and `cairnctl` binaries only parse
//! arguments, call into here and map errors to exit codes.

pub mod attestation;
pub mod collect;
pub mod config;
pub mod console;
pub mod control;
pub mod daemon;
pub mod desired;
pub mod diagnose;
pub mod discovery;
pub mod forward;
pub mod gate;
pub mod hardware;
pub mod health;
pub mod identity;
pub mod local_page;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod onboarding;
pub mod overview;
pub mod reconcile;
pub mod spool;
pub mod status;
pub mod systemd;
pub mod telemetry;
pub mod tpm_tls;
pub mod update;
pub mod uplink;
pub mod view;
pub mod workload_health;
pub mod workload_unit;
pub mod workloads;

/// Recipes are parsed where the fleet signs them too; the agent uses the same schema and checks.
pub use cairn_proto::recipe;

/// "outer: inner: innermost": an error and its sources on one line, for status entries and the one place
/// each binary prints an error. Messages never repeat their source, so nothing is said twice.
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
