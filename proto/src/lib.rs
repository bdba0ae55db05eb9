//! Wire types shared by `cairnd`, `cairnctl` and `cairn-fleet`.
//!
//! Two protocols live here, each versioned on its own:
//! - [`control`]: the local control socket between `cairnctl` and `cairnd` (JSON lines over a Unix socket);
//! - [`overview`]: the site overview the console, the local status page and `cairnctl` show;
//! - [`update`]: the release manifest of the OTA update channel (a TUF target);
//! - [`fleet`]: the agent-initiated HTTPS protocol between a device and its fleet backend;
//!   [`telemetry`] holds its signed telemetry batches (CBOR in COSE_Sign1).
//!
//! [`atomic_file`] is the one durable whole-file write both sides use for what they keep.
//!
//! Every type that crosses a process boundary denies unknown fields, so a peer speaking a newer version is told
//! so instead of being half-understood. A new field is a new protocol version.

pub mod atomic_file;
pub mod control;
pub mod eventlog;
pub mod fleet;
pub mod overview;
pub mod recipe;
pub mod telemetry;
pub mod update;
pub mod workload_set;
