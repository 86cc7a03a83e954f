#!/usr/bin/env bash
# Cost of a certificate renewal on the manager: N renewals of a worker's certificate, each over a
# new TLS connection (curl, as an agent renews), against N pings the same way; prints wall time
# and the manager process's CPU per call. Needs root, the release build and openssl.
#   bench/pki/renew.sh            (B=path/to/flotilla, N=calls; default target/release, 200)
set -euo pipefail
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/flotilla}
N=${N:-200}
d=$(mktemp -d /var/tmp/renew.XXXX); chmod 755 $d
stop() {
	pkill -INT -f "data-dir $d/" || true
	while pgrep -f "data-dir $d/" >/dev/null; do sleep 0.2; done
	for n in m1 w1; do [ -f $d/$n/node.json ] && $B node cleanup --data-dir $d/$n >/dev/null 2>&1; done
	rm -rf --one-file-system $d
}
trap stop EXIT
$B node run --data-dir $d/m1 --listen 127.0.140.1:4440 --init --name m1 --address-pool 10.140.0.0/17 --vip-pool 10.140.128.0/17 >$d/m1.log 2>&1 &
until $B --host unix://$d/m1/api.sock node ls >/dev/null 2>&1; do sleep 0.2; done
TOKEN=$($B --host unix://$d/m1/api.sock cluster join-token worker -q)
FLOTILLA_JOIN_TOKEN=$TOKEN $B node run --data-dir $d/w1 --listen 127.0.140.2:4440 --join 127.0.140.1:4440 --name w1 >$d/w1.log 2>&1 &
until [ -f $d/w1/tls/node.key ] && $B --host unix://$d/m1/api.sock node ls 2>/dev/null | grep -q "w1.*ready"; do sleep 0.2; done
id=$($B --host unix://$d/m1/api.sock node ls --format json | python3 -c 'import json,sys; print([n["id"] for n in json.load(sys.stdin) if n["spec"]["name"]=="w1"][0])')
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=x -keyout $d/k.pem -out $d/csr.pem 2>/dev/null
python3 -c 'import json,sys; print(json.dumps({"csr_pem": open(sys.argv[1]).read()}))' $d/csr.pem > $d/body.json
c=(curl -sS -o /dev/null -w '%{http_code}\n' --cacert $d/w1/tls/ca.pem --cert $d/w1/tls/node.pem --key $d/w1/tls/node.key --resolve flotilla-node:4440:127.0.140.1)
"${c[@]}" -X POST -H 'content-type: application/json' --data @$d/body.json https://flotilla-node:4440/v1/nodes/$id/renew
pid=$(pgrep -f "data-dir $d/m1" | head -1)
cpu() { awk '{print $14+$15}' /proc/$pid/stat; }
t0=$(date +%s%N); c0=$(cpu)
for i in $(seq $N); do "${c[@]}" https://flotilla-node:4440/v1/ping >/dev/null; done
t1=$(date +%s%N); c1=$(cpu)
for i in $(seq $N); do "${c[@]}" -X POST -H 'content-type: application/json' --data @$d/body.json https://flotilla-node:4440/v1/nodes/$id/renew >/dev/null; done
t2=$(date +%s%N); c2=$(cpu)
tck=$(getconf CLK_TCK)
echo "ping:  $N calls, $(( (t1-t0)/N/1000 )) us per call (curl, new TLS connection each), manager CPU $(( (c1-c0)*1000000/tck/N )) us per call"
echo "renew: $N calls, $(( (t2-t1)/N/1000 )) us per call (curl, new TLS connection each), manager CPU $(( (c2-c1)*1000000/tck/N )) us per call"
