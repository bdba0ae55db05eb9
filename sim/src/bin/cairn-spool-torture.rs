//! cairn-spool-torture DIR [RECORDS_PER_FLUSH [BUDGET_BYTES]]: appends to the telemetry spool in DIR as fast as it can, forever.
//! Prints `first SEQ` after its first append, then `durable SEQ` after every flush (each line flushed at once),
//! and acknowledges all but the last 2000 records every 8th flush. A small budget (a few MiB) makes the spool
//! compact itself now and then. The crash test (sim/tests/spool_crash.rs)
//! kills it with SIGKILL at random moments and checks that everything reported durable is there.

use cairn_agent::spool::{Spool, SpoolConfig};
use cairn_sim::spool_torture::record;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-spool-torture: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args_os().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: cairn-spool-torture DIR [RECORDS_PER_FLUSH [BUDGET_BYTES]]")?,
    );
    let per_flush: u64 = match args.next() {
        None => 500,
        Some(n) => n
            .to_str()
            .and_then(|n| n.parse().ok())
            .filter(|n| *n > 0)
            .ok_or("RECORDS_PER_FLUSH must be a positive number")?,
    };
    let budget_bytes = match args.next() {
        None => SpoolConfig::default().budget_bytes,
        Some(n) => n
            .to_str()
            .and_then(|n| n.parse().ok())
            .ok_or("BUDGET_BYTES must be a number")?,
    };
    let cfg = SpoolConfig {
        budget_bytes,
        // Short, so that the background group commit also runs between explicit flushes.
        flush_interval: Duration::from_millis(3),
        flush_records: 1000,
        ..SpoolConfig::default()
    };
    let spool = Spool::open(&dir, cfg).map_err(|e| cairn_agent::error_chain(&e))?;
    let fail = |e: cairn_agent::spool::SpoolError| cairn_agent::error_chain(&e);
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        out.write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("could not write to stdout: {e}"))
    };
    let mut i = 0u64;
    let mut first = None;
    for flushes in 1u64.. {
        if flushes.is_multiple_of(2) {
            let items = (i..i + per_flush).map(record).collect();
            let seqs = spool.append_many(items).map_err(fail)?;
            first.get_or_insert(seqs.start);
        } else {
            for j in i..i + per_flush {
                let (at, body) = record(j);
                let seq = spool.append(at, body).map_err(fail)?;
                first.get_or_insert(seq);
            }
        }
        if i == 0 {
            if let Some(first) = first {
                say(format!("first {first}\n"))?;
            }
        }
        i += per_flush;
        let durable = spool.flush().map_err(fail)?;
        say(format!("durable {durable}\n"))?;
        if let Some(first) = first {
            if flushes.is_multiple_of(8) && durable > first + 2000 {
                spool.ack(durable - 2000).map_err(fail)?;
            }
        }
    }
    Ok(())
}
