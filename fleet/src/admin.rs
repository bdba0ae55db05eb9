//! Operator commands (`cairn-fleet devices …`). The device store is locked while the server runs, so a
//! command goes to the running server through its admin socket (`<state>/admin.sock`, mode 0600); when no
//! server runs, the command takes the lock and works on the store itself. Either way the same code applies it.

use crate::store::{self, DeviceRecord, DeviceState, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub const ADMIN_SOCKET: &str = "admin.sock";
const MAX_LINE: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    List,
    /// Telemetry received per device: sequence ranges (gaps visible), counts, refusals.
    Telemetry,
    Approve {
        id: String,
    },
    Forget {
        id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminResponse {
    Devices {
        devices: Vec<DeviceRecord>,
    },
    Telemetry {
        devices: std::collections::BTreeMap<String, crate::ingest::DeviceTelemetry>,
    },
    Done {
        message: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the fleet server holds {state} but its admin socket {socket} does not answer")]
    Socket {
        state: PathBuf,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fleet server sent an answer that is not valid: {0}")]
    Answer(String),
}

/// Runs `req` against the state directory: through the server if one runs, directly otherwise.
pub fn run(state: &Path, req: &AdminRequest) -> Result<AdminResponse, AdminError> {
    if let Some(lock) = store::try_lock(state)? {
        let mut store = Store::open(state, &lock)?;
        return Ok(apply(&mut store, req)?);
    }
    let socket = state.join(ADMIN_SOCKET);
    let serr = |source| AdminError::Socket {
        state: state.to_owned(),
        socket: socket.clone(),
        source,
    };
    let mut stream = UnixStream::connect(&socket).map_err(serr)?;
    let mut line = serde_json::to_string(req).map_err(|e| AdminError::Answer(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(serr)?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_LINE))
        .read_line(&mut answer)
        .map_err(serr)?;
    serde_json::from_str(&answer).map_err(|e| AdminError::Answer(e.to_string()))
}

/// Applies one admin request to a device store: the running server's, or one this command opened.
pub fn apply(store: &mut Store, req: &AdminRequest) -> Result<AdminResponse, StoreError> {
    Ok(match req {
        AdminRequest::List => AdminResponse::Devices {
            devices: store.devices.values().cloned().collect(),
        },
        AdminRequest::Telemetry => match crate::ingest::read_index(&store_dir(store)) {
            Ok(devices) => AdminResponse::Telemetry { devices },
            Err(e) => AdminResponse::Error {
                message: crate::error_chain(&e),
            },
        },
        AdminRequest::Approve { id } => match resolve(store, id) {
            Err(message) => AdminResponse::Error { message },
            Ok(id) => {
                let Some(rec) = store.devices.get_mut(&id) else {
                    return Ok(AdminResponse::Error {
                        message: format!("device {id} is not known to this fleet"),
                    });
                };
                if rec.vouched_by.is_none() {
                    rec.vouched_by = Some("operator".into());
                }
                if rec.state == DeviceState::Pending {
                    rec.state = DeviceState::Enrolling;
                    // The approval answers the pending reason; later refusals are still kept.
                    rec.reason = None;
                }
                let state = rec.state.as_str();
                store.save()?;
                AdminResponse::Done {
                    message: format!(
                        "device {id} approved; it is {state} and onboards at its next attempt unless its evidence is refused"
                    ),
                }
            }
        },
        AdminRequest::Forget { id } => match resolve(store, id) {
            Err(message) => AdminResponse::Error { message },
            Ok(id) => {
                store.devices.remove(&id);
                store.save()?;
                AdminResponse::Done {
                    message: format!("device {id} forgotten; it must enrol from scratch"),
                }
            }
        },
    })
}

/// A device named by its id, or by the short code its console shows (`K7QF-2M9A`, any case, dash optional).
fn resolve(store: &Store, named: &str) -> Result<String, String> {
    if store.devices.contains_key(named) {
        return Ok(named.to_owned());
    }
    let unknown = || {
        format!(
            "device {named} is not known to this fleet (give its id or the code on its console)"
        )
    };
    let code = cairn_proto::overview::normalize_code(named).ok_or_else(unknown)?;
    let mut matches = store
        .devices
        .keys()
        .filter(|id| cairn_proto::overview::device_code(id) == code);
    match (matches.next(), matches.next()) {
        (Some(id), None) => Ok(id.clone()),
        (Some(_), Some(_)) => Err(format!(
            "code {code} matches more than one device: give the full device id (`cairn-fleet devices` lists them)"
        )),
        (None, _) => Err(unknown()),
    }
}

fn store_dir(store: &Store) -> std::path::PathBuf {
    store.dir().to_owned()
}
