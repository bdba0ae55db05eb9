# cairn — the commands people and CI run. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Debian packages the build, the tests and the demo need.
apt_packages := "swtpm swtpm-tools tpm2-tools libtss2-dev libsystemd-dev libzstd-dev pkg-config prometheus prometheus-node-exporter jq curl mmdebstrap systemd-container"

default:
    @just --list

# Install what the project needs (idempotent; root or sudo).
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=$(for p in {{apt_packages}}; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
    if [ -n "$missing" ]; then
        sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "installing:" $missing
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
    fi

# Build every binary and the fake NVML library (debug).
build:
    cargo build --workspace --locked

# Run a whole simulated site and show what happens, step by step.
demo: deps build
    sim/demo.sh

# Every test tier: unit, swtpm, cairnd process, simulated site.
test: deps build
    #!/usr/bin/env bash
    set -euo pipefail
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace --locked --no-fail-fast
    else
        cargo test --workspace --locked --no-fail-fast
    fi

# Unit tests only: no swtpm, no processes (seconds).
test-unit:
    cargo test --workspace --locked --lib --bins

# Formatting and clippy, warnings are errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Benchmarks (release build): prints a table, appends JSON lines to target/bench/results.jsonl.
bench: deps
    cargo build --workspace --locked --release
    target/release/cairn-bench target/bench/results.jsonl

# The A/B firmware image (not built yet: issue 7).
image:
    @echo "just image: the A/B image build does not exist yet (open issue 7)" >&2; exit 1

# Boot the image under qemu (not built yet: issue 7).
test-qemu:
    @echo "just test-qemu: the qemu tier does not exist yet (open issue 7)" >&2; exit 1

# Start a simulated site in the background, all state under DIR; writes DIR/site.env.
sim-up DIR: deps build
    target/debug/cairn-sim up {{DIR}}

# Stop everything `sim-up DIR` started.
sim-down DIR:
    target/debug/cairn-sim down {{DIR}}

# What CI runs: lint, then every test.
ci: deps lint test
