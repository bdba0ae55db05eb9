# cairn — the commands people and CI run. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Debian packages the build, the tests and the demo need.
apt_packages := "swtpm swtpm-tools tpm2-tools libtss2-dev libsystemd-dev libzstd-dev pkg-config prometheus prometheus-node-exporter jq curl mmdebstrap systemd-container"

default:
    @just --list

# Install what the project needs (idempotent; root or sudo).
deps: (_apt apt_packages)

test_packages := "tmux chromium zbar-tools"

# What only the tests need: a terminal to read the console screen from, a QR reader, a browser for the local page.
deps-test: (_apt test_packages)

# Installs the Debian packages of a list that are missing.
_apt PKGS:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=$(for p in {{PKGS}}; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
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

# Every test tier: the host tiers, then the qemu tier (README: what each costs).
test: test-host test-qemu

# The host tiers: unit, swtpm, cairnd process, nspawn systemd, simulated site (no image, no qemu).
test-host: deps deps-test build
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

# Bytes a device fetches for a one-package change of the image, against the whole image (docs/image.md).
bench-delta PKG="less": deps deps-image
    cargo build --locked --release -p cairn-agent --bins
    cargo build --locked -p cairn-fleet
    image/delta-bench.sh {{PKG}}

# Host tools for the image build and the qemu tier (large: qemu and OVMF), apart from `deps`.
image_packages := "mmdebstrap erofs-utils cryptsetup-bin dosfstools mtools fdisk jq qemu-system-x86 ovmf swtpm swtpm-tools"

# Host tools for the image build and the qemu tier.
deps-image: (_apt image_packages)

# The A/B disk image of VERSION into target/image (docs/image.md); the Debian base is cached.
image VERSION="1.0.0" *ARGS: deps deps-image
    cargo build --locked --release -p cairn-agent --bins
    cargo build --locked -p cairn-fleet
    image/build.sh --version {{VERSION}} --out target/image {{ARGS}}

# The qemu tier (tests/qemu): boots 1.0.0 under qemu (TCG) twice, then updates through the fleet's TUF repository
# 1.0.0 → 2.0.0 (with a power cut mid-write) → a 3.0.0 whose gate fails and falls back (that test builds its own
# images, which carry its fleet's address).
test-qemu: deps deps-image
    cargo build --locked --release -p cairn-agent --bins
    cargo build --locked -p cairn-fleet
    image/build.sh --version 1.0.0 --out target/image --config tests/qemu/page.toml
    cargo test --locked -p cairn-qemu-tests -- --ignored --test-threads=1

# Start a simulated site in the background, all state under DIR; writes DIR/site.env.
sim-up DIR: deps build
    target/debug/cairn-sim up {{DIR}}

# Stop everything `sim-up DIR` started.
sim-down DIR:
    target/debug/cairn-sim down {{DIR}}

# What CI runs: lint, then every test.
ci: deps lint test
