//! The cairn agent as a library: one module per concern. The `cairnd` and `cairnctl` binaries only parse
//! arguments, call into here and map errors to exit codes.

pub mod config;
pub mod control;
pub mod daemon;
pub mod hardware;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod status;
pub mod uplink;
pub mod view;
