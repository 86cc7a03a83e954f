#!/usr/bin/env bash
# The main job: a single-node Flotilla cluster with a demo service, in the foreground.
# Installs what it needs (runc, busybox-static, …) when missing; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p flotilla
exec ./target/release/flotilla dev "$@"
