#!/usr/bin/env bash
# The project's checks: formatting, lints, and every test (unit, contract, multi-process
# integration with real runc containers). Needs root (containers, mounts, cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast
