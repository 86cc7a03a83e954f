#!/bin/sh
# Node runtime benchmark: our create/start path (overlay + bundle + shim + runc) vs plain runc on
# the same bundle, interleaved; plus shim and agent RSS with 50 running containers.
# The shim is the release `flotilla-shim`, as on a node; `run.sh N flotilla` measures the
# `flotilla shim` mode instead.
# Needs root and runc (apt-get install runc busybox-static). Usage: bench/runtime/run.sh [rounds] [flotilla]
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -q -p flotilla -p flotilla-runtime --example runtime_bench --bins
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: $(nproc) cpu, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
FLOTILLA_BENCH_SHIM="$PWD/target/release/${2:-flotilla-shim}" exec target/release/examples/runtime_bench "${1:-60}"
