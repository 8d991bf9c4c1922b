#!/usr/bin/env bash
# ferry's whole test suite, as CI runs it (.ci/run calls this). Run as root:
# the end-to-end tests drive the real CRIU.
#
# 1. installs/starts what the tests need (scripts/setup.sh, idempotent);
# 2. the gates: cargo fmt --check, cargo clippy -D warnings;
# 3. every test: unit tests and end-to-end tests against real CRIU, plus the
#    benches and the fuzz target built (so they cannot rot).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { echo "== test.sh: $*" >&2; }

step "setup (install what the tests need)"
scripts/setup.sh --no-build

step "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit + end-to-end against real CRIU)"
cargo test --workspace --all-targets

step "fuzz target builds"
cargo check --manifest-path fuzz/Cargo.toml --bins

step "all passed"
