#!/bin/sh
# Node runtime benchmark: our create/start path (overlay + bundle + shim + runc) vs plain runc on
# the same bundle, interleaved; plus shim and agent RSS with 50 running containers.
# Needs root and runc (apt-get install runc busybox-static). Usage: bench/runtime/run.sh [rounds]
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -q -p flotilla-runtime --example runtime_bench
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: $(nproc) cpu, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
exec target/release/examples/runtime_bench "${1:-20}"
