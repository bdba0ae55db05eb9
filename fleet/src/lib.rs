//! The reference fleet backend: the other side of every exchange a cairn device makes. It keeps its state in
//! one directory (`--state`), so a restarted fleet is the same fleet.

pub mod pki;
pub mod quote;
pub mod server;
