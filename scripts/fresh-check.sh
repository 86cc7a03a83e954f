#!/usr/bin/env bash
# Proves the README's two commands on a clean slate, as a new user or CI on a new machine meets
# them: the current commit cloned into a temporary directory, an empty cargo home (holding only
# the toolchain's config, so every crate is downloaded again) and an empty VM kernel cache.
#
#   scripts/fresh-check.sh            # needs root, network access to crates.io and Debian
#
# Steps: (1) `./scripts/demo.sh` in the background until the demo service answers on its
# published port, `node cleanup --dry-run` on its data dir while it runs (which must list its
# containers), then Ctrl-C (SIGINT) and a check that nothing is left on the host: no data dir,
# link, mount, iptables chain, netns, VIP route or shim process that was not there before;
# (2) `./scripts/test.sh`; (3) the same leftover check. Exits non-zero on the first failure.
# Not part of CI. Takes about 15 minutes on the 2-core reference machine (measured 855 s: the
# demo's cold release build and start 272 s, then a cold debug build and the whole test suite,
# including the cgroup v2 VM, 583 s).
# Uncommitted changes are not included: commit first.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
[[ $(id -u) -eq 0 ]] || { echo "fresh-check: run as root (containers, mounts, cgroups)" >&2; exit 2; }
[[ -z $(git status --porcelain --untracked-files=no) ]] ||
	echo "fresh-check: warning: uncommitted changes are not part of the check" >&2

work=$(mktemp -d /var/tmp/flotilla-fresh.XXXXXX)
chmod 0755 "$work"
demo_pid=
cleanup() {
	if [[ -n $demo_pid ]] && kill -0 "$demo_pid" 2>/dev/null; then
		kill -INT "$demo_pid" 2>/dev/null || true
		wait "$demo_pid" 2>/dev/null || true
	fi
	if [[ ${KEEP:-0} == 1 ]]; then
		echo "fresh-check: kept $work" >&2
	else
		rm -rf --one-file-system "$work"
	fi
}
trap cleanup EXIT

step_start=$SECONDS
stamp() { printf '[fresh-check %4ds] %s\n' $((SECONDS - step_start)) "$*"; }

git clone -q --no-hardlinks "$repo" "$work/src"
git -C "$work/src" checkout -q "$(git rev-parse HEAD)"
mkdir -p "$work/cargo-home" "$work/vm-cache"
# Only the toolchain's configuration, nothing downloaded or built.
for f in config.toml config; do
	[[ -f ${CARGO_HOME:-$HOME/.cargo}/$f ]] && cp "${CARGO_HOME:-$HOME/.cargo}/$f" "$work/cargo-home/"
done
export CARGO_HOME=$work/cargo-home
export FLOTILLA_VM_CACHE=$work/vm-cache
unset CARGO_TARGET_DIR
stamp "clone of $(git rev-parse --short HEAD) in $work/src, empty CARGO_HOME and FLOTILLA_VM_CACHE"

# Host state before, to compare with after (the machine may hold other software's objects).
host_state() {
	{
		ip -o link show | awk -F': ' '{print $2}' | grep -E '^(flt|flotilla)' || true
		grep -E 'flotilla|flt-' /proc/mounts | awk '{print $2}' || true
		iptables -S 2>/dev/null | grep -iE 'flt|flotilla' || true
		iptables -t nat -S 2>/dev/null | grep -iE 'flt|flotilla' || true
		ip netns list 2>/dev/null | grep -iE 'flt|flotilla' || true
		pgrep -f 'flotilla-shim|shim --standby|flotilla node run|flotilla dev' | sed 's/^/pid /' || true
		ip route show table local | grep -E '^local 10\.1(99|28)\.' || true
	} | sort
}
host_state >"$work/before"

leftovers() {
	local what=$1 until=$((SECONDS + 15))
	# Only what appeared counts: objects of other software may go away meanwhile. A standby
	# shim exits on its own once its node is gone: give stragglers a few seconds.
	while host_state >"$work/after" && comm -13 "$work/before" "$work/after" >"$work/new" &&
		[[ -s $work/new ]] && ((SECONDS < until)); do
		sleep 0.5
	done
	if [[ -s $work/new ]]; then
		cat "$work/new"
		# For a process: what it is, and which runtime started it (shims carry
		# FLOTILLA_SHIM_OF=<data dir>/runtime, which `node cleanup` looks for too).
		awk '$1 == "pid" {print $2}' "$work/new" | while read -r pid; do
			ps -o pid,ppid,pgid,stat,etime,comm,args -p "$pid" 2>/dev/null | tail -n +2 || true
			tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep '^FLOTILLA_SHIM_OF=' | sed 's/^/    /' || true
		done
		echo "fresh-check: $what left the objects above on the host" >&2
		exit 1
	fi
	stamp "$what left nothing behind (links, mounts, iptables, netns, processes)"
}

cd "$work/src"
# 1. The main job, exactly as the README runs it (a temporary data dir, removed on Ctrl-C).
./scripts/demo.sh >"$work/demo.log" 2>&1 &
demo_pid=$!
deadline=$((SECONDS + 1800))
ready() {
	grep -q '^Flotilla dev cluster is running' "$work/demo.log" &&
		curl -fsS --max-time 2 http://127.0.0.1:8080/ >"$work/answer" 2>/dev/null
}
until ready; do
	if ! kill -0 "$demo_pid" 2>/dev/null; then
		tail -40 "$work/demo.log"
		echo "fresh-check: the demo stopped before its service answered" >&2
		exit 1
	fi
	((SECONDS < deadline)) || { tail -40 "$work/demo.log"; echo "fresh-check: no answer in 30 min" >&2; exit 1; }
	sleep 2
done
stamp "demo service answered on 127.0.0.1:8080: $(head -c 80 "$work/answer")"
data=$(sed -n 's/^Flotilla dev cluster is running (data dir \(.*\))\.$/\1/p' "$work/demo.log")
[[ -d $data ]] || { echo "fresh-check: the demo's data dir is not named in its output" >&2; exit 1; }
# What `node cleanup --dry-run` sees while the demo runs: its containers and network objects.
./target/release/flotilla node cleanup --dry-run --data-dir "$data" >"$work/dry-run" 2>&1 || true
stamp "while it runs, node cleanup --dry-run lists $(wc -l <"$work/dry-run") objects"
kill -INT "$demo_pid"
wait "$demo_pid" || true
demo_pid=
[[ ! -e $data ]] || { echo "fresh-check: the demo left its data dir $data" >&2; exit 1; }
stamp "Ctrl-C: the demo stopped and removed its data dir"
leftovers "the demo"

# 2. The tests.
step_start=$SECONDS
set +e
./scripts/test.sh 2>&1 | tee "$work/test.log" | grep -E '^\s*(Summary|FAIL|PASS .*t70|error)'
status=${PIPESTATUS[0]}
set -e
tail -5 "$work/test.log"
if ((status != 0)); then
	# The work dir goes with the exit: keep what failed.
	grep -n -B2 -A30 'panicked at' "$work/test.log" | head -200 >&2 || true
	echo "fresh-check: ./scripts/test.sh failed ($status)" >&2
	exit 1
fi
stamp "./scripts/test.sh passed"
leftovers "the tests"
echo "fresh-check: OK"
