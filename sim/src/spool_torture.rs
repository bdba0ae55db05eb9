//! The records `cairn-spool-torture` appends, so that the crash test can tell an intact record from a damaged
//! one by its position in the run alone.

use cairn_agent::spool::RecordBody;
use cairn_agent::telemetry::{Event, Severity};

const NAMES: [&str; 3] = [
    "torture_temp_celsius",
    "torture_power_watts",
    "torture_errors_total",
];

/// The `i`-th record of a run (counted from 0): (at_unix_ms, body). Mostly samples of 48 series, every 50th an
/// event.
pub fn record(i: u64) -> (u64, RecordBody) {
    let at = 1_700_000_000_000 + i * 7;
    let body = if i % 50 == 49 {
        RecordBody::Event(Event {
            at_unix_ms: at - 3,
            component: format!("gpu{}", i % 8),
            kind: "xid".into(),
            severity: Severity::Critical,
            message: format!("torture event {i}"),
        })
    } else {
        RecordBody::Sample {
            name: NAMES[(i % 3) as usize].into(),
            labels: vec![
                ("gpu".into(), (i % 16).to_string()),
                ("host".into(), "torture".into()),
            ],
            value: i as f64 * 0.25,
            counter: i % 3 == 2,
        }
    };
    (at, body)
}
