//! The telemetry spool against kill -9: `cairn-spool-torture` appends and flushes as fast as it can and reports
//! each durable sequence; it is killed with SIGKILL at random moments after its open, 30 times over the same
//! spool (more if none of the small-budget runs got as far as compacting). After each
//! kill the spool must reopen, hold every record up to the last sequence reported durable (less what the run
//! itself acknowledged), intact, and hand out only sequences above every earlier one. Every other run has a
//! budget small enough that the spool compacts itself (copies sled into a new generation and switches
//! `CURRENT`) while it is being killed.
//!
//! SIGKILL loses what the process had not handed to the kernel, not what sits in the page cache: this checks
//! that sled's log and the spool's counters are consistent at any point of a write, not power loss.
//! `CAIRN_TORTURE_SEED=N` repeats a run's random delays.
//!
//! A kill during the open itself is left out: sled 0.34 rewrites its log tail and snapshot while it recovers,
//! and a kill in that window left an unopenable spool (`Corruption`) in about 1 of 40 runs of this test. That
//! is sled's limitation, recorded in docs/telemetry.md (cairnd then runs without a spool); it would make this
//! test fail at random instead of on a regression of the spool's own code.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_agent::spool::{Record, Spool, SpoolConfig};
use cairn_sim::spool_torture::record;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ROUNDS: usize = 30;

/// What one run of the torture binary said before it died.
#[derive(Debug, Default)]
struct Said {
    first: Option<u64>,
    durable: Option<u64>,
    flushes: usize,
}

/// xorshift64*: enough randomness for delays, and repeatable from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Small enough that sled's files pass it within a run (so the spool compacts), large enough that the records a
/// run leaves unacknowledged stay under the quota (so nothing is dropped).
const SMALL_BUDGET: u64 = 2 << 20;

fn run_and_kill(spool_dir: &Path, per_flush: u64, budget: u64, delay: Duration) -> Said {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-spool-torture"))
        .arg(spool_dir)
        .arg(per_flush.to_string())
        .arg(budget.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cairn-spool-torture");
    let stdout = child.stdout.take().unwrap();
    let (opened_tx, opened) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut said = Said::default();
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        // Only whole lines count: the kill may cut one short.
        while lines.read_line(&mut line).unwrap_or(0) > 0 && line.ends_with('\n') {
            match line.trim_end().split_once(' ') {
                Some(("first", n)) => {
                    said.first = Some(n.parse().unwrap());
                    let _ = opened_tx.send(());
                }
                Some(("durable", n)) => {
                    let n: u64 = n.parse().unwrap();
                    assert!(
                        said.durable.is_none_or(|d| n >= d),
                        "durable went backwards"
                    );
                    said.durable = Some(n);
                    said.flushes += 1;
                }
                _ => panic!("unexpected line from cairn-spool-torture: {line:?}"),
            }
            line.clear();
        }
        said
    });
    // The run prints `first` once its spool is open; a run that dies before is reported below.
    let _ = opened.recv_timeout(Duration::from_secs(60));
    std::thread::sleep(delay);
    if let Some(status) = child.try_wait().unwrap() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("cairn-spool-torture exited by itself ({status}): {err}");
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

fn all_pending(spool: &Spool) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    loop {
        let after = out.last().map_or(0, |r| r.seq);
        let page = spool.pending(after, 20_000, usize::MAX).unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

#[test]
fn the_spool_keeps_every_durable_record_through_kill_9() {
    let seed = std::env::var("CAIRN_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("CAIRN_TORTURE_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let started = Instant::now();
    // The highest sequence any earlier run or check has seen: everything after must be above it.
    let mut highest = 0u64;
    let (mut rounds_with_flushes, mut checked) = (0, 0usize);

    // Beyond ROUNDS only while no run has compacted yet (a loaded machine writes less per run), with longer runs.
    let compacted = |dir: &Path| {
        std::fs::read_to_string(dir.join(cairn_agent::spool::CURRENT_FILE))
            .is_ok_and(|c| c.trim() != "gen-0")
    };
    let mut round = 0;
    while round < ROUNDS || (!compacted(&spool_dir) && round < 3 * ROUNDS) {
        let per_flush = 1 + rng.below(3000);
        let extra = if round < ROUNDS { 0 } else { 1000 };
        let delay = Duration::from_millis(20 + rng.below(251) + extra);
        let budget = if round % 2 == 0 || round >= ROUNDS {
            SMALL_BUDGET
        } else {
            1 << 30
        };
        let said = run_and_kill(&spool_dir, per_flush, budget, delay);
        let ctx = format!(
            "round {round} ({per_flush} per flush, budget {budget}, killed after {delay:?}, {said:?})"
        );

        let spool = Spool::open(&spool_dir, SpoolConfig::default())
            .unwrap_or_else(|e| panic!("{ctx}: the spool did not reopen: {e}"));
        let stats = spool.stats();
        let records = all_pending(&spool);
        assert_eq!(
            stats.depth,
            records.len() as u64,
            "{ctx}: depth disagrees with the records"
        );
        assert_eq!(
            stats.drops,
            Default::default(),
            "{ctx}: nothing may be dropped"
        );

        if let Some(first) = said.first {
            assert!(
                first > highest,
                "{ctx}: sequence {first} reused (had seen {highest})"
            );
            // Everything of this run above its own acknowledgement is intact, whether reported durable or not.
            for r in &records {
                if r.seq >= first {
                    let (at, body) = record(r.seq - first);
                    assert_eq!(
                        (r.at_unix_ms, &r.body),
                        (at, &body),
                        "{ctx}: record {} damaged",
                        r.seq
                    );
                }
            }
            // Everything reported durable is there (the run acknowledged at most up to durable - 2000).
            if let Some(durable) = said.durable {
                rounds_with_flushes += 1;
                assert!(
                    stats.acked_seq <= durable,
                    "{ctx}: acknowledged beyond what was durable"
                );
                assert!(
                    stats.durable_seq >= durable,
                    "{ctx}: durable sequence went backwards"
                );
                let from = first.max(stats.acked_seq + 1);
                let present: Vec<u64> = records
                    .iter()
                    .map(|r| r.seq)
                    .filter(|s| (from..=durable).contains(s))
                    .collect();
                let want = durable.saturating_sub(from) + 1;
                assert_eq!(
                    present.len() as u64,
                    want,
                    "{ctx}: records missing between {from} and {durable}"
                );
                checked += present.len();
            }
        }
        highest = highest
            .max(said.durable.unwrap_or(0))
            .max(records.last().map_or(0, |r| r.seq));
        let next = spool.append(0, record(0).1).unwrap();
        assert!(
            next > highest,
            "{ctx}: reopened spool handed out {next}, not above {highest}"
        );
        highest = next;
        // Acknowledge everything, so each round checks only its own run.
        spool.flush().unwrap();
        spool.ack(u64::MAX).unwrap();
        drop(spool);
        round += 1;
    }
    let current =
        std::fs::read_to_string(spool_dir.join(cairn_agent::spool::CURRENT_FILE)).unwrap();
    println!(
        "{round} kills in {:.1} s; {rounds_with_flushes} runs had reported durable records; {checked} records \
         checked; the spool ended in {}",
        started.elapsed().as_secs_f64(),
        current.trim()
    );
    assert_ne!(
        current.trim(),
        "gen-0",
        "the small-budget runs never compacted"
    );
    assert!(
        rounds_with_flushes >= ROUNDS / 2,
        "too few runs got as far as a flush to test anything"
    );
}
