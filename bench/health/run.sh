#!/bin/sh
# Health checks benchmark: service create → first successful request through the published port
# (default start interval, Docker's 5 s, the old one-probe-per-interval schedule, no check), and
# the node daemon's CPU per TCP and exec probe. See bench/src/bin/health.rs.
# Needs root, runc and busybox-static. Usage: bench/health/run.sh [--repeat K]
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -q -p flotilla -p flotilla-bench --bin flotilla --bin flotilla-shim --bin health
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + working tree')"
exec target/release/health "$@"
