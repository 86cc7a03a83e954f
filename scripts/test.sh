#!/usr/bin/env bash
# The project's checks: formatting, lints, and every test (unit, contract, multi-process
# integration with real runc containers). Needs root (containers, mounts, cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The role crates never depend on each other; only flotilla-store links the Raft store.
for pair in "flotilla-agent flotilla-manager" "flotilla-agent flotilla-store" "flotilla-manager flotilla-agent"; do
    set -- $pair
    if cargo tree -p "$1" -e normal --prefix none | grep -q "^$2 "; then
        echo "test.sh: $1 must not depend on $2 (ARCHITECTURE.md, crate map)" >&2
        exit 1
    fi
done
cargo nextest run --workspace --no-fail-fast
