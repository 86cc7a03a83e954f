#!/usr/bin/env bash
# Builds the application images of the conformance suite from Debian bookworm packages, as
# OCI image archives (a tar of an OCI image layout: `oci-layout`, `index.json` whose one
# manifest is annotated `org.opencontainers.image.ref.name: apps/<app>:1`, and
# `blobs/sha256/…` holding the manifest, the image config and one gzip layer).
#
#   scripts/build-app-images.sh [OUTDIR]
#
# OUTDIR (default ${FLOTILLA_APPS_CACHE:-/var/cache/flotilla-apps}) receives <app>.oci.tar for
# each app below and `stamp`, the sha256 of this script. When the stamp matches and every
# archive is there the script says so and exits at once; otherwise it rebuilds them all in
# OUTDIR.tmp and renames that to OUTDIR, holding a lock on OUTDIR.lock (a second caller waits,
# then finds the cache). Downloaded packages are kept in OUTDIR.debs, so a rebuild after an
# edit of this script downloads only what changed in the archive. A cold build takes a few
# minutes; the build time of each image and the total are printed on stderr.
#
# Images (each one layer: a `mmdebstrap --variant=minbase` root filesystem without docs, man
# pages, translations or apt lists; files keep their real owners and modes):
#   apps/nginx:1       nginx, the default site on port 80 (IPv4 only) serving
#                      "flotilla-conformance nginx"; logs linked to /dev/stdout, /dev/stderr
#   apps/redis:1       redis-server as user redis on 6379, no persistence; healthcheck
#   apps/postgres:1    PostgreSQL 15 as user postgres on 5432; /usr/local/bin/pg-entrypoint
#                      initialises $PGDATA (trust auth, listening everywhere) on first start
#   apps/python:1      python3 -m http.server 8000 in /srv ("flotilla-conformance python");
#                      stop signal SIGINT (as PID 1 it would ignore SIGTERM)
#   apps/stdout-app:1  the python image plus /app/server.py on 8080 as user app (1000:1000),
#                      which opens /dev/stdout and /dev/stderr by path for every request
#
# Needs root (mmdebstrap --mode=root, chroot) and python3; installs mmdebstrap when missing.
set -euo pipefail
# One compound command: bash parses it whole, so editing this file during a run is harmless.
{

log() { printf 'build-app-images: %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 1
}

OUT=$(realpath -m -- "${1:-${FLOTILLA_APPS_CACHE:-/var/cache/flotilla-apps}}")
[[ $OUT != / ]] || die "usage: $0 [OUTDIR] (not /)"
APPS=(nginx redis postgres python stdout-app)
HASH=$(sha256sum <"$0" | cut -d' ' -f1)

cached() {
	[[ -f $OUT/stamp && $(<"$OUT/stamp") == "$HASH" ]] || return 1
	local a
	for a in "${APPS[@]}"; do
		[[ -s $OUT/$a.oci.tar ]] || return 1
	done
}
if cached; then
	log "cached ($OUT)"
	exit 0
fi
[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap --mode=root, chroot)"
command -v python3 >/dev/null || die "python3 is needed to pack the images"
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9
if cached; then
	log "cached ($OUT)"
	exit 0
fi

if ! command -v mmdebstrap >/dev/null; then
	log "installing mmdebstrap"
	export DEBIAN_FRONTEND=noninteractive
	{ apt-get update -qq && apt-get install -y -q --no-install-recommends mmdebstrap; } >&2 ||
		die "could not install mmdebstrap (apt-get install mmdebstrap)"
fi

TMP=$OUT.tmp
WORK=$TMP/.work
DEBS=$OUT.debs
# Unmounts whatever an interrupted mmdebstrap left mounted under TMP, then removes TMP.
cleanup() {
	local mp mps=() i
	while read -r _ mp _; do
		[[ $mp == "$TMP"/* ]] && mps+=("$mp")
	done </proc/self/mounts
	for ((i = ${#mps[@]} - 1; i >= 0; i--)); do
		umount -l "${mps[i]}" 2>/dev/null || true
	done
	rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT
cleanup
mkdir -p "$WORK/hooks" "$DEBS"
export FLOTILLA_APPS_DEBS=$DEBS FLOTILLA_APPS_WORK=$WORK
: >"$WORK/used-debs"

# mmdebstrap setup hook: the packages downloaded by earlier builds, hard-linked (or copied)
# into the new root's apt archive, where apt finds them instead of downloading them again.
cat >"$WORK/hooks/load-debs" <<'EOF'
#!/bin/sh
set -eu
mkdir -p "$1/var/cache/apt/archives/partial"
for f in "$FLOTILLA_APPS_DEBS"/*.deb; do
	[ -f "$f" ] || continue
	ln "$f" "$1/var/cache/apt/archives/" 2>/dev/null || cp "$f" "$1/var/cache/apt/archives/"
done
EOF
# mmdebstrap customize hook (before its cleanup empties the archive): new packages go to the
# cache; the installed ones are listed so that the cache can be pruned of stale versions.
cat >"$WORK/hooks/save-debs" <<'EOF'
#!/bin/sh
set -eu
for f in "$1"/var/cache/apt/archives/*.deb; do
	[ -f "$f" ] || continue
	b=${f##*/}
	[ -e "$FLOTILLA_APPS_DEBS/$b" ] && continue
	cp "$f" "$FLOTILLA_APPS_DEBS/.$b.part"
	mv "$FLOTILLA_APPS_DEBS/.$b.part" "$FLOTILLA_APPS_DEBS/$b"
done
dpkg-query --admindir="$1/var/lib/dpkg" -W -f '${Package}_${Version}_${Architecture}.deb\n' |
	sed 's/:/%3a/g' >>"$FLOTILLA_APPS_WORK/used-debs"
EOF
# mmdebstrap essential hook of the postgres image: no "main" cluster from the package's postinst.
cat >"$WORK/hooks/no-main-cluster" <<'EOF'
#!/bin/sh
set -eu
mkdir -p "$1/etc/postgresql-common/createcluster.d"
echo 'create_main_cluster = false' >"$1/etc/postgresql-common/createcluster.d/flotilla.conf"
EOF
chmod 0755 "$WORK"/hooks/*

# Packs a root filesystem directory into an OCI image archive: pack.py APP ROOTFS OUTFILE.
cat >"$WORK/pack.py" <<'PY'
"""One-layer OCI image archive of a root filesystem directory (scripts/build-app-images.sh)."""
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import zlib

PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PG_PATH = "PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
S = 1_000_000_000  # Docker's Healthcheck durations are in nanoseconds


def healthcheck(test, retries, start=0):
    h = {"Test": test, "Interval": 2 * S, "Timeout": 2 * S, "Retries": retries}
    if start:
        h["StartPeriod"] = start * S
    return h


IMAGES = {
    "nginx": ("apps/nginx:1", {
        "Env": [PATH],
        "Cmd": ["nginx", "-g", "daemon off;"],
        "StopSignal": "SIGQUIT",
        "ExposedPorts": {"80/tcp": {}},
    }),
    "redis": ("apps/redis:1", {
        "User": "redis",
        "Env": [PATH],
        "Cmd": ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no",
                "--daemonize", "no", "--save", "", "--appendonly", "no", "--logfile", ""],
        "WorkingDir": "/var/lib/redis",
        "ExposedPorts": {"6379/tcp": {}},
        "Healthcheck": healthcheck(["CMD", "redis-cli", "ping"], 3),
    }),
    "postgres": ("apps/postgres:1", {
        "User": "postgres",
        "Env": [PG_PATH, "PGDATA=/var/lib/postgresql/data"],
        "Entrypoint": ["/usr/local/bin/pg-entrypoint"],
        "StopSignal": "SIGINT",
        "ExposedPorts": {"5432/tcp": {}},
        "Volumes": {"/var/lib/postgresql/data": {}},
        "Healthcheck": healthcheck(["CMD", "pg_isready", "-h", "127.0.0.1"], 15),
    }),
    "python": ("apps/python:1", {
        "Env": [PATH, "LANG=C.UTF-8"],
        "Cmd": ["python3", "-m", "http.server", "8000"],
        # As PID 1 python ignores SIGTERM (no handler, no default action); http.server exits 0
        # on SIGINT (KeyboardInterrupt).
        "StopSignal": "SIGINT",
        "WorkingDir": "/srv",
        "ExposedPorts": {"8000/tcp": {}},
    }),
    "stdout-app": ("apps/stdout-app:1", {
        "User": "app",
        "Env": [PATH, "LANG=C.UTF-8"],
        "Cmd": ["python3", "/app/server.py"],
        "WorkingDir": "/app",
        "ExposedPorts": {"8080/tcp": {}},
        "Labels": {"org.flotilla.conformance": "stdout-app"},
    }),
}
# Directories kept empty in the layer: the runtime mounts them.
EMPTY = {"dev", "proc", "sys"}


def id_names(path):
    names = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                p = line.split(":")
                if len(p) > 2 and p[2].isdigit():
                    names.setdefault(int(p[2]), p[0])
    except FileNotFoundError:
        pass
    return names


class Sink:
    """File-like: hashes what tarfile writes (the diff_id), gzips it to out, hashes that."""

    def __init__(self, out):
        self.out = out
        self.raw = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.raw_size = 0
        self.size = 0
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing, mtime 0

    def write(self, b):
        self.raw.update(b)
        self.raw_size += len(b)
        self._emit(self.z.compress(b))
        return len(b)

    def _emit(self, c):
        if c:
            self.out.write(c)
            self.blob.update(c)
            self.size += len(c)

    def finish(self):
        self._emit(self.z.flush())


def add_tree(tar, root, rel, users, groups, counts):
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        arc = f"{rel}/{e.name}" if rel else e.name
        ti = tar.gettarinfo(e.path, arc)
        if ti is None:  # socket
            print(f"pack: skipped {arc} (socket)", file=sys.stderr)
            continue
        ti.mtime = int(ti.mtime)
        ti.uname = users.get(ti.uid, "")
        ti.gname = groups.get(ti.gid, "")
        if ti.isreg():
            with open(e.path, "rb") as f:
                tar.addfile(ti, f)
        else:
            tar.addfile(ti)
        counts[0] += 1
        if ti.isdir() and arc not in EMPTY:
            add_tree(tar, root, arc, users, groups, counts)


def blob_member(tar, digest, data=None, path=None, size=None):
    ti = tarfile.TarInfo("blobs/sha256/" + digest.split(":", 1)[1])
    ti.mode, ti.mtime = 0o644, int(time.time())
    if data is not None:
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    else:
        ti.size = size
        with open(path, "rb") as f:
            tar.addfile(ti, f)


def main():
    app, root, out = sys.argv[1:4]
    tag, cfg = IMAGES[app]
    users = id_names(os.path.join(root, "etc/passwd"))
    groups = id_names(os.path.join(root, "etc/group"))
    layer_path = out + ".layer"
    counts = [0]
    with open(layer_path, "wb") as f:
        sink = Sink(f)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            add_tree(tar, root, "", users, groups, counts)
        sink.finish()
    layer_digest = "sha256:" + sink.blob.hexdigest()
    diff_id = "sha256:" + sink.raw.hexdigest()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created,
                     "created_by": f"scripts/build-app-images.sh: {app} (mmdebstrap, Debian bookworm)"}],
    }
    config_bytes = json.dumps(config, indent=2).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": sink.size}],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": len(manifest_bytes),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    with tarfile.open(out + ".part", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                           ("index.json", json.dumps(index, indent=2).encode())):
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime, ti.size = 0o644, int(time.time()), len(data)
            tar.addfile(ti, io.BytesIO(data))
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(ti)
        blob_member(tar, manifest_digest, data=manifest_bytes)
        blob_member(tar, config_digest, data=config_bytes)
        blob_member(tar, layer_digest, path=layer_path, size=sink.size)
    os.unlink(layer_path)
    os.rename(out + ".part", out)
    mib = 1 << 20
    print(f"build-app-images: {app}: {tag}, {counts[0]} entries, layer "
          f"{sink.size / mib:.1f} MiB gzip ({sink.raw_size / mib:.1f} MiB tar)", file=sys.stderr)


main()
PY

# A minbase bookworm root filesystem with PACKAGES in directory ROOT:
#   rootfs ROOT PACKAGES [MMDEBSTRAP-OPTION...]
# The merged-usr hook makes /bin, /sbin, /lib… links into /usr as debootstrap does; without it
# apt satisfies init-system-helpers' "usrmerge | usr-is-merged" with usrmerge, i.e. with perl.
rootfs() {
	local root=$1 pkgs=$2
	shift 2
	mmdebstrap --mode=root --variant=minbase --format=directory --include="$pkgs" \
		--dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-include=/usr/share/doc/*/copyright' \
		--dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/info/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' \
		--dpkgopt='path-include=/usr/share/locale/locale.alias' \
		--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
		--skip=essential/unlink \
		--setup-hook="$WORK/hooks/load-debs" \
		--customize-hook="$WORK/hooks/save-debs" \
		"$@" bookworm "$root" >"$root.log" 2>&1 || {
		tail -n 40 "$root.log" >&2
		die "mmdebstrap of $pkgs failed (the end of its output is above)"
	}
	# Build-host leftovers: its resolver config and name (a runtime binds its own).
	rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
}

pack() {
	python3 "$WORK/pack.py" "$1" "$2" "$TMP/$1.oci.tar" || die "packing $1 failed"
}

# Writes stdin to FILE inside ROOT, root-owned with MODE: put ROOT FILE MODE.
put() {
	mkdir -p "$(dirname "$1$2")"
	cat >"$1$2"
	chown 0:0 "$1$2"
	chmod "$3" "$1$2"
}

build_nginx() {
	local r=$WORK/nginx
	rootfs "$r" nginx
	ln -sfn /dev/stdout "$r/var/log/nginx/access.log"
	ln -sfn /dev/stderr "$r/var/log/nginx/error.log"
	rm -f "$r"/var/www/html/index.nginx-debian.html
	printf 'flotilla-conformance nginx' | put "$r" /var/www/html/index.html 0644
	# The container may have no IPv6: the default site listens on IPv4 only.
	sed -i '/listen \[::\]:80/d' "$r/etc/nginx/sites-available/default"
	grep -q '^[[:space:]]*listen 80 default_server;' "$r/etc/nginx/sites-available/default" ||
		die "nginx: the default site does not listen on port 80"
	pack nginx "$r"
}

build_redis() {
	local r=$WORK/redis
	rootfs "$r" redis-server
	[[ -d $r/var/lib/redis ]] || die "redis: no /var/lib/redis"
	pack redis "$r"
}

build_postgres() {
	local r=$WORK/postgres
	rootfs "$r" postgresql --essential-hook="$WORK/hooks/no-main-cluster"
	[[ -x $r/usr/lib/postgresql/15/bin/initdb ]] || die "postgres: no PostgreSQL 15 initdb"
	rm -rf "$r/etc/postgresql/15/main" "$r/var/lib/postgresql/15" "$r"/var/log/postgresql/*
	# No JIT: LLVM (libllvm14, libz3-4) is a third of the image, and postgres runs with JIT off
	# when its provider llvmjit.so is missing.
	chroot "$r" dpkg --purge --force-depends libllvm14 libz3-4 >>"$r.log" 2>&1 ||
		{ tail -n 20 "$r.log" >&2; die "postgres: could not remove LLVM"; }
	rm -rf "$r"/usr/lib/postgresql/15/lib/{llvmjit.so,llvmjit_types.bc,bitcode} "$r/var/log/dpkg.log"
	mkdir -p "$r/var/lib/postgresql/data" "$r/run/postgresql"
	chroot "$r" chown postgres:postgres /var/lib/postgresql /var/lib/postgresql/data /run/postgresql
	chmod 0700 "$r/var/lib/postgresql/data"
	chmod 3777 "$r/run/postgresql"
	put "$r" /usr/local/bin/pg-entrypoint 0755 <<'EOF'
#!/bin/sh
# Entrypoint of apps/postgres:1 (scripts/build-app-images.sh). As user postgres: initialises
# $PGDATA on the first start (trust authentication, listening on every address), then runs
# postgres in the foreground; arguments go to postgres (e.g. -p 5433, -c name=value).
# Started as root, it makes $PGDATA and the socket directory postgres's and drops to it.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA
if [ "$(id -u)" = 0 ]; then
	mkdir -p "$PGDATA" /var/run/postgresql
	chown postgres:postgres "$PGDATA" /var/run/postgresql
	chmod 0700 "$PGDATA"
	exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
	initdb -D "$PGDATA" --auth=trust -U postgres --encoding=UTF8 --locale=C
	echo "host all all 0.0.0.0/0 trust" >>"$PGDATA/pg_hba.conf"
	echo "listen_addresses='*'" >>"$PGDATA/postgresql.conf"
fi
exec postgres -D "$PGDATA" "$@"
EOF
	pack postgres "$r"
}

# Builds the python image and, from a copy of its root filesystem, the stdout-app image.
build_python_and_stdout_app() {
	local r=$WORK/python s=$WORK/stdout-app
	rootfs "$r" python3
	printf 'flotilla-conformance python' | put "$r" /srv/index.html 0644
	cp -a "$r" "$s"
	pack python "$r"
	rm -rf --one-file-system "$r"
	log "python: $((SECONDS - T0)) s"

	T0=$SECONDS
	chroot "$s" useradd --no-log-init --uid 1000 --user-group --create-home \
		--home-dir /home/app --shell /bin/sh app
	[[ $(chroot "$s" id -u app):$(chroot "$s" id -g app) == 1000:1000 ]] ||
		die "stdout-app: user app is not 1000:1000"
	put "$s" /app/server.py 0755 <<'EOF'
#!/usr/bin/env python3
"""stdout-app of the Flotilla conformance suite (scripts/build-app-images.sh).

Serves HTTP on port 8080 (or $PORT): every GET is answered "flotilla-conformance stdout-app".
For every request it opens /dev/stdout by path and writes "stdout-app request <path>", and
/dev/stderr by path with "stdout-app stderr <path>"; at startup it writes
"stdout-app started uid=<uid>" to /dev/stdout and to /proc/self/fd/1. Opening those paths
fails where stdout or stderr is a socket, or a pipe or file the user may not open (runc
hands the container's stdio to its user for this): then the app exits at startup with a
traceback on fd 2, or the request gets no answer. Exits on SIGTERM and SIGINT (as PID 1 it
would get no default action for them).
"""
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b"flotilla-conformance stdout-app"


def say(path, line):
    # Append: where stdout is a file rather than a pipe, "w" would truncate it each time.
    with open(path, "a") as f:
        f.write(line + "\n")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        say("/dev/stdout", f"stdout-app request {self.path}")
        say("/dev/stderr", f"stdout-app stderr {self.path}")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format, *args):
        pass


def main():
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler)
    started = f"stdout-app started uid={os.getuid()}"
    say("/dev/stdout", started)
    say("/proc/self/fd/1", started)
    server.serve_forever()


main()
EOF
	pack stdout-app "$s"
}

START=$SECONDS
log "building ${APPS[*]} in $TMP (packages cached in $DEBS)"
T0=$SECONDS
build_nginx
log "nginx: $((SECONDS - T0)) s"
T0=$SECONDS
build_redis
log "redis: $((SECONDS - T0)) s"
T0=$SECONDS
build_postgres
log "postgres: $((SECONDS - T0)) s"
T0=$SECONDS
build_python_and_stdout_app
log "stdout-app: $((SECONDS - T0)) s"

# Drop cached packages that no image uses any more (older versions).
find "$DEBS" -maxdepth 1 -type f -name '*.deb' -printf '%f\n' | sort -u |
	comm -23 - <(sort -u "$WORK/used-debs") | while read -r f; do rm -f "$DEBS/$f"; done
rm -rf --one-file-system "$WORK"
echo "$HASH" >"$TMP/stamp"
rm -rf --one-file-system "$OUT.old"
[[ ! -e $OUT ]] || mv -T "$OUT" "$OUT.old"
mv -T "$TMP" "$OUT"
rm -rf --one-file-system "$OUT.old"
log "built ${#APPS[@]} images in $OUT in $((SECONDS - START)) s"
exit 0
}
