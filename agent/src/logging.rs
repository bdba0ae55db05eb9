//! Logs go to journald when the agent runs under systemd (it sets JOURNAL_STREAM for our stderr), to stderr
//! otherwise, or when journald cannot be reached.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. `filter` was validated with the configuration; an invalid one falls back to
/// `info` rather than leaving the agent mute.
pub fn init(filter: &str) {
    // sled 0.34 logs through `log` at TRACE; keep third-party crates at warn unless asked.
    let targets: Targets = filter
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let registry = tracing_subscriber::registry().with(targets);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(layer) => {
                registry
                    .with(layer.with_syslog_identifier("cairnd".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("cairnd: journald not reachable ({e}); logging to stderr"),
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .init();
}
