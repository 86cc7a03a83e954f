#!/bin/sh
# Volume move benchmark: a drained task's 1 GiB volume moved with `flotilla volume move`,
# against rsync of the same data in the same round. See bench/src/bin/volume_move.rs.
# Needs root, runc, busybox-static; installs rsync when missing.
# Usage: bench/volume-move/run.sh [--rounds 3] [--mib 1024]
set -eu
cd "$(dirname "$0")/../.."
command -v rsync >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; }
cargo build --release -q -p flotilla -p flotilla-bench --bin flotilla --bin flotilla-shim --bin volume_move
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + working tree')"
exec target/release/volume_move "$@"
