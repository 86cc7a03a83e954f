#!/usr/bin/env bash
# The conformance applications (scripts/build-app-images.sh) under Flotilla and under Docker
# (Debian's docker.io) in the same run, with the same checks, side by side:
#   serve  the app's protocol on its published port (HTTP 200 with the page, RESP PONG,
#          PostgreSQL's answer to SSLRequest)
#   name   a client container of the same image (busybox for HTTP) reaches it by name
#   logs   the app's log line is in `service logs` / `docker logs`
#   stop   `service rm` / `docker stop` ends it within the 10 s grace period (not 137)
#
#   bench/apps/compare-docker.sh            (as root; FLOTILLA_BIN, FLOTILLA_APPS_CACHE honoured)
#
# Docker runs its own dockerd in a temporary directory, on a private bridge (dkapps0,
# 10.214.0.1/24), with --iptables=false; by-name access uses --link (the default bridge has no
# DNS, and Docker's embedded DNS needs its iptables rules). Flotilla runs one node on
# 127.0.0.77. Everything is removed at exit. Needs docker.io (dockerd), skopeo, python3.
set -euo pipefail
{
cd "$(dirname "$0")/../.."
FLOTILLA=${FLOTILLA_BIN:-$PWD/target/release/flotilla}
CACHE=${FLOTILLA_APPS_CACHE:-/var/cache/flotilla-apps}
[[ $(id -u) -eq 0 ]] || { echo "compare-docker: run as root" >&2; exit 1; }
command -v dockerd >/dev/null || { echo "compare-docker: apt-get install docker.io" >&2; exit 1; }
[[ -x $FLOTILLA ]] || { echo "compare-docker: build first: cargo build --release -p flotilla" >&2; exit 1; }
scripts/build-app-images.sh "$CACHE"

WORK=$(mktemp -d /var/tmp/compare-docker.XXXXXX)
chmod 711 "$WORK" # containers (host uid 100000) must reach the node's data dir
BR=dkapps0
DOCKER_SOCK=unix://$WORK/docker.sock
NODE_IP=127.0.0.77
FL_HOST=unix://$WORK/node/api.sock
pids=()
cleanup() {
	set +e
	docker -H "$DOCKER_SOCK" ps -aq 2>/dev/null | xargs -r docker -H "$DOCKER_SOCK" rm -f >/dev/null 2>&1
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	"$FLOTILLA" node cleanup --data-dir "$WORK/node" >/dev/null 2>&1
	umount "$WORK/exec/netns/default" 2>/dev/null
	ip link del "$BR" 2>/dev/null
	rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
d() { docker -H "$DOCKER_SOCK" "$@"; }
f() { "$FLOTILLA" --host "$FL_HOST" "$@"; }
waitfor() { # SECONDS CMD...: retries CMD every 0.2 s
	local until=$((SECONDS + $1)); shift
	until "$@" >/dev/null 2>&1; do
		((SECONDS < until)) || return 1
		sleep 0.2
	done
}

# --- the two systems ----------------------------------------------------------------------------
ip link add "$BR" type bridge && ip addr add 10.214.0.1/24 dev "$BR" && ip link set "$BR" up
dockerd --storage-driver=overlay2 --bridge "$BR" --iptables=false --ip-forward=false --ip-masq=false \
	--data-root "$WORK/docker" --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" -H "$DOCKER_SOCK" \
	>"$WORK/dockerd.log" 2>&1 &
pids+=($!)
"$FLOTILLA" node run --data-dir "$WORK/node" --listen "$NODE_IP:4440" --init --name apps \
	--address-pool 10.215.0.0/17 --vip-pool 10.215.128.0/17 >"$WORK/node.log" 2>&1 &
pids+=($!)
waitfor 60 d info || { tail "$WORK/dockerd.log"; exit 1; }
waitfor 60 f node ls || { tail "$WORK/node.log"; exit 1; }
echo "compare-docker: $(dockerd --version); flotilla $(git rev-parse --short HEAD)" >&2

# busybox for the HTTP clients, in both.
mkdir -p "$WORK/bb/bin" "$WORK/bb/etc"
cp /bin/busybox "$WORK/bb/bin/busybox"
for a in sh wget echo sleep; do ln -s busybox "$WORK/bb/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' >"$WORK/bb/etc/passwd"
f image import "$WORK/bb" --name client:1 --cmd sh >/dev/null
tar -C "$WORK/bb" -c . | d import - client:1 >/dev/null

# --- checks ------------------------------------------------------------------------------------
# probe APP ADDR PORT: the app's protocol from the host.
probe() {
	python3 - "$@" <<'EOF'
import socket, sys
app, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection((host, port), timeout=3)
s.settimeout(5)
if app == "redis":
    s.sendall(b"*1\r\n$4\r\nPING\r\n"); ok = s.recv(7) == b"+PONG\r\n"
elif app == "postgres":
    s.sendall(bytes([0, 0, 0, 8, 4, 210, 22, 47])); ok = s.recv(1) in (b"N", b"S")
else:
    s.sendall(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n"); data = b""
    while chunk := s.recv(65536): data += chunk
    ok = data[9:12] == b"200" and f"flotilla-conformance {app}".encode() in data
    s2 = socket.create_connection((host, port), timeout=3)
    s2.sendall(b"GET /conformance HTTP/1.0\r\nHost: t\r\n\r\n"); s2.recv(100)
sys.exit(0 if ok else 1)
EOF
}
client() { # APP HOST PORT: image and script of a by-name client
	case $1 in
	redis) echo "apps/redis:1|redis-cli -h $2 -p $3 PING" ;;
	postgres) echo "apps/postgres:1|for i in \$(seq 50); do pg_isready -q -h $2 && break; sleep 0.2; done; psql -h $2 -U postgres -tAc 'select 40+2'" ;;
	*) echo "client:1|wget -qO- http://$2:$3/" ;;
	esac
}
answer() { case $1 in redis) echo PONG ;; postgres) echo 42 ;; *) echo "flotilla-conformance $1" ;; esac; }
logline() {
	case $1 in
	nginx | python) echo '"GET /conformance HTTP/1.0" 404' ;;
	redis) echo "Ready to accept connections" ;;
	postgres) echo "database system is ready to accept connections" ;;
	stdout-app) echo "stdout-app request /conformance" ;;
	esac
}

declare -A R
f events --filter type=task --format json >"$WORK/events" 2>/dev/null &
pids+=($!)
port=0
for app in nginx redis postgres python stdout-app; do
	case $app in nginx) t=80 ;; redis) t=6379 ;; postgres) t=5432 ;; python) t=8000 ;; stdout-app) t=8080 ;; esac
	port=$((port + 1))
	fp=$((19000 + port)) dp=$((29000 + port))
	tar=$WORK/$app.docker.tar
	skopeo copy -q "oci-archive:$CACHE/$app.oci.tar" "docker-archive:$tar:apps/$app:1"
	d load -q -i "$tar" >/dev/null
	f image load "$CACHE/$app.oci.tar" >/dev/null
	d run -d --name "$app" -p "$dp:$t" "apps/$app:1" >/dev/null || true
	f service create -d --name "$app" -p "$fp:$t" "apps/$app:1" >/dev/null
	IFS='|' read -r img script < <(client "$app" "$app" "$t")
	want=$(answer "$app")

	# Docker
	R[$app,serve,docker]=$(waitfor 60 probe "$app" 127.0.0.1 "$dp" && echo ok || echo FAIL)
	out=$(d run --rm --link "$app:$app" --entrypoint "" "$img" sh -c "$script" 2>&1 || true)
	R[$app,name,docker]=$([[ $out == *"$want"* ]] && echo ok || echo FAIL)
	R[$app,logs,docker]=$(waitfor 20 sh -c "docker -H $DOCKER_SOCK logs $app 2>&1 | grep -qF '$(logline "$app")'" && echo ok || echo FAIL)
	t0=$SECONDS
	d stop "$app" >/dev/null 2>&1 || true
	code=$(d inspect -f '{{.State.ExitCode}}' "$app" 2>/dev/null || echo none)
	R[$app,stop,docker]=$([[ $code != 137 && $code != none && $((SECONDS - t0)) -lt 10 ]] && echo "ok($code)" || echo "FAIL($code)")

	# Flotilla
	R[$app,serve,flotilla]=$(waitfor 60 probe "$app" "$NODE_IP" "$fp" && echo ok || echo FAIL)
	f service create -d --name "$app-client" --entrypoint "" "$img" sh -c "$script 2>&1; echo CLIENT-DONE; sleep 3600" >/dev/null
	waitfor 60 sh -c "'$FLOTILLA' --host $FL_HOST service logs $app-client | grep -q CLIENT-DONE" || true
	out=$(f service logs "$app-client" 2>&1 || true)
	f service rm "$app-client" >/dev/null
	R[$app,name,flotilla]=$([[ $out == *"$want"* ]] && echo ok || echo FAIL)
	R[$app,logs,flotilla]=$(waitfor 20 sh -c "'$FLOTILLA' --host $FL_HOST service logs $app 2>&1 | grep -qF '$(logline "$app")'" && echo ok || echo FAIL)
	task=$(f service ps "$app" --format json | python3 -c 'import json,sys; print([t["id"] for t in json.load(sys.stdin) if t["status"]["state"]=="running"][0])')
	t0=$SECONDS
	f service rm "$app" >/dev/null
	waitfor 30 python3 -c "
import json,sys
for l in open('$WORK/events'):
    e=json.loads(l)
    if e['id']=='$task' and e['object']['status']['state']=='shutdown': sys.exit(0)
sys.exit(1)" || true
	code=$(python3 -c "
import json
c='none'
for l in open('$WORK/events'):
    e=json.loads(l)
    if e['id']=='$task' and e['object']['status']['state']=='shutdown': c=e['object']['status'].get('exit_code','none')
print(c)")
	R[$app,stop,flotilla]=$([[ $code != 137 && $code != none && $((SECONDS - t0)) -lt 10 ]] && echo "ok($code)" || echo "FAIL($code)")
done

printf '%-11s %-6s %-10s %-10s %s\n' app check docker flotilla same
for app in nginx redis postgres python stdout-app; do
	for c in serve name logs stop; do
		a=${R[$app,$c,docker]} b=${R[$app,$c,flotilla]}
		printf '%-11s %-6s %-10s %-10s %s\n' "$app" "$c" "$a" "$b" "$([[ ${a%%(*} == "${b%%(*}" ]] && echo yes || echo NO)"
	done
done
}
