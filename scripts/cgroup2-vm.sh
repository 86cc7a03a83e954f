#!/usr/bin/env bash
# Runs a command inside a throw-away QEMU VM whose kernel boots with a pure cgroup v2 layout.
#
#   scripts/cgroup2-vm.sh [--] COMMAND [ARG...]
#
# The VM sees this host's root filesystem read-only over virtio-9p with a tmpfs overlay on top
# (so everything is writable inside, nothing is written back), fresh proc/sys/dev, tmpfs on
# /tmp and /run, and cgroup2 — and nothing else — at /sys/fs/cgroup with every controller
# enabled for children. The command runs as root in the caller's working directory with PATH,
# HOME and the RUST*/CARGO_HOME/CARGO_TARGET_DIR/FLOTILLA_* variables of the caller, plus
# FLOTILLA_IN_CGROUP2_VM=1. Its output goes to this script's stdout (serial console) and its
# exit code becomes the script's. No network device: loopback only.
#
# Exit codes: the command's, or 124 (timeout), 125 (the VM failed before reporting one).
#
# Environment:
#   FLOTILLA_VM_CACHE    kernel cache dir (default /var/cache/flotilla-vm), reused across runs
#   FLOTILLA_VM_TIMEOUT  seconds before the VM is killed (default 900)
#   FLOTILLA_VM_MEM      guest memory (default 4G)
#   FLOTILLA_VM_CPUS     guest CPUs (default: host CPUs, at most 4, under KVM; 1 under TCG)
#   FLOTILLA_VM_ACCEL    kvm | tcg | auto (default: KVM, falling back to TCG when the guest does
#                        not boot; the failure is remembered in the cache dir)
#   FLOTILLA_VM_BOOT_TIMEOUT  seconds for the guest to reach init (default 30 KVM, 120 TCG)
#   FLOTILLA_VM_VERBOSE  1: show the kernel's boot messages
#
# Needs root (9p export of /), apt-get for qemu-system-x86 and the Debian kernel package.
set -euo pipefail
# One compound command: bash parses it whole, so editing this file during a run is harmless.
{

log() { printf 'cgroup2-vm: %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 125
}

[[ ${1:-} == -- ]] && shift
[[ $# -gt 0 ]] || die "usage: $0 [--] COMMAND [ARG...]"
[[ $(id -u) -eq 0 ]] || die "must run as root (the VM exports / over 9p)"

CACHE=${FLOTILLA_VM_CACHE:-/var/cache/flotilla-vm}
TIMEOUT=${FLOTILLA_VM_TIMEOUT:-900}
MEM=${FLOTILLA_VM_MEM:-4G}
# vCPUs: under KVM the host's (at most 4); under TCG one. Two TCG vCPUs on a 2-core host that
# is busy with other work hung the guest in soft lockups (both vCPUs stuck for 500 s in a CI
# run); one vCPU cannot wait on another that the host does not schedule.
vcpus() {
	if [[ -n ${FLOTILLA_VM_CPUS:-} ]]; then
		echo "$FLOTILLA_VM_CPUS"
	elif [[ $1 == tcg ]]; then
		echo 1
	else
		echo $(($(nproc) < 4 ? $(nproc) : 4))
	fi
}
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	9pnet 9pnet_virtio netfs fscache 9p overlay)

# --- qemu -------------------------------------------------------------------------------------
if ! command -v qemu-system-x86_64 >/dev/null; then
	log "installing qemu-system-x86"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >&2 ||
		die "could not install qemu-system-x86 (apt-get install qemu-system-x86)"
fi
if ! dpkg -s busybox-static >/dev/null 2>&1; then
	log "installing busybox-static"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >&2 ||
		die "could not install busybox-static"
fi
BUSYBOX=/bin/busybox

# --- kernel (cached) --------------------------------------------------------------------------
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $KPKG ]]; then
	# No apt metadata: use whatever a previous run cached.
	KPKG=$(find "$CACHE" -maxdepth 1 -name 'linux-image-*.deb' -printf '%f\n' | sort -V | tail -1 | cut -d_ -f1)
fi
[[ -n $KPKG ]] || die "no kernel package: apt-get update, then apt-cache depends linux-image-amd64"
KREL=${KPKG#linux-image-}
KDIR=$CACHE/$KREL
# The initramfs is rebuilt whenever this script changes.
STAMP=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
if [[ ! -f $KDIR/initrd.cpio.gz || $(cat "$KDIR/stamp" 2>/dev/null) != "$STAMP" ]]; then
	DEB=$(find "$CACHE" -maxdepth 1 -name "${KPKG}_*.deb" | head -1)
	if [[ -z $DEB ]]; then
		log "downloading $KPKG"
		(cd "$CACHE" && apt-get download "$KPKG" >&2) || die "apt-get download $KPKG failed"
		DEB=$(find "$CACHE" -maxdepth 1 -name "${KPKG}_*.deb" | head -1)
	fi
	rm -rf "$KDIR.tmp"
	mkdir -p "$KDIR.tmp/x" "$KDIR.tmp/initrd"/{bin,lib/modules,proc,sys,dev,lower,rw,newroot}
	dpkg-deb -x "$DEB" "$KDIR.tmp/x"
	cp "$KDIR.tmp/x/boot/vmlinuz-$KREL" "$KDIR.tmp/vmlinuz"
	for m in "${MODULES[@]}"; do
		f=$(find "$KDIR.tmp/x/lib/modules/$KREL" -name "$m.ko*" | head -1)
		[[ -n $f ]] || die "module $m not in $KPKG"
		case $f in
		*.ko.xz) xz -dc "$f" >"$KDIR.tmp/initrd/lib/modules/$m.ko" ;;
		*.ko.zst) zstd -qdc "$f" >"$KDIR.tmp/initrd/lib/modules/$m.ko" ;;
		*) cp "$f" "$KDIR.tmp/initrd/lib/modules/$m.ko" ;;
		esac
	done
	cp "$BUSYBOX" "$KDIR.tmp/initrd/bin/busybox"
	cat >"$KDIR.tmp/initrd/init" <<'INIT'
#!/bin/busybox sh
# Initramfs init of scripts/cgroup2-vm.sh.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "FLOTILLA-VM-ERROR $*"; poweroff -f; }
for m in $(cat /modules); do insmod /lib/modules/$m.ko || fail "insmod $m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower ||
	fail "mount 9p hostroot"
mount -t tmpfs -o mode=755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
	fail "mount overlay root"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=755 run $R/run
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || fail "mount cgroup2"
for c in $(cat $R/sys/fs/cgroup/cgroup.controllers); do
	echo "+$c" >$R/sys/fs/cgroup/cgroup.subtree_control || echo "cgroup2-vm: could not enable $c"
done
mkdir -p $R/run/flotilla-vm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmout $R/run/flotilla-vm || fail "mount 9p vmout"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
ACCEL=tcg
dmesg | grep -q "Hypervisor detected: KVM" && ACCEL=kvm
echo "FLOTILLA-VM-BOOTED accel=$ACCEL uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r) cgroup_mounts=$(awk '$3 ~ /^cgroup/' /proc/mounts | wc -l) sys_fs_cgroup=$(awk -v m=$R/sys/fs/cgroup '$2 == m {print $3}' /proc/mounts) controllers=\"$(cat $R/sys/fs/cgroup/cgroup.subtree_control)\""
# Stage 2 runs from the new root. switch_root, not chroot: the kernel refuses user namespaces
# to a chrooted process.
B=/run/flotilla-vm-boot
mkdir -p $R$B
cp /bin/busybox $R$B/busybox
cat >$R$B/init2 <<'STAGE2'
B=/run/flotilla-vm-boot/busybox
# Through a pipe, so the command sees a plain log stream rather than a terminal.
(
	/bin/bash /run/flotilla-vm/cmd.sh </dev/null
	echo $? >/run/flotilla-vm/rc
) 2>&1 | $B cat
$B sync
$B umount /run/flotilla-vm
$B poweroff -f
STAGE2
exec switch_root $R $B/busybox sh $B/init2
INIT
	chmod 755 "$KDIR.tmp/initrd/init"
	printf '%s\n' "${MODULES[*]}" >"$KDIR.tmp/initrd/modules"
	(cd "$KDIR.tmp/initrd" && find . | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 >"$KDIR.tmp/initrd.cpio.gz")
	echo "$STAMP" >"$KDIR.tmp/stamp"
	rm -rf "$KDIR.tmp/x" "$KDIR.tmp/initrd" "$KDIR"
	mv "$KDIR.tmp" "$KDIR"
	# Drop older kernels a previous run cached.
	find "$CACHE" -maxdepth 1 -name 'linux-image-*.deb' ! -name "${KPKG}_*" -delete
	find "$CACHE" -mindepth 1 -maxdepth 1 -type d -name '*-amd64*' ! -name "$KREL" -exec rm -rf {} +
	log "kernel $KREL and initramfs cached in $KDIR"
fi
flock -u 9

# --- the run ----------------------------------------------------------------------------------
OUT=$(mktemp -d /tmp/flotilla-vm.XXXXXX)
QPID=
TPID=
cleanup() {
	if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then kill -9 "$QPID" 2>/dev/null || true; fi
	if [[ -n $TPID ]] && kill -0 "$TPID" 2>/dev/null; then kill "$TPID" 2>/dev/null || true; fi
	rm -rf "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

{
	echo 'set -u'
	for v in PATH HOME $(compgen -e | grep -E '^(RUST[A-Z_]*|CARGO_HOME|CARGO_TARGET_DIR|FLOTILLA_[A-Z0-9_]*)$' || true); do
		[[ -v $v ]] && printf 'export %s=%q\n' "$v" "${!v}"
	done
	echo 'export FLOTILLA_IN_CGROUP2_VM=1 TERM=dumb'
	printf 'cd %q\n' "$PWD"
	printf 'exec'
	printf ' %q' "$@"
	printf '\n'
} >"$OUT/cmd.sh"

QUIET="quiet loglevel=3"
[[ ${FLOTILLA_VM_VERBOSE:-0} == 1 ]] && QUIET=

# boot ACCEL: runs the VM, streaming its console to stdout. Returns 0 when the VM ended (the
# command's exit code, if any, is in $OUT/rc), 1 when it did not reach init within BOOT_TIMEOUT
# (or qemu died before that), 2 when it was killed after TIMEOUT.
boot() {
	local accel=$1 accel_args
	case $accel in
	kvm) accel_args=(-accel kvm -cpu host) ;;
	tcg) accel_args=(-accel tcg,thread=multi -cpu max) ;;
	esac
	: >"$OUT/console"
	rm -f "$OUT/rc"
	log "booting $KREL with $accel ($CPUS cpus, $MEM)"
	qemu-system-x86_64 "${accel_args[@]}" \
		-machine q35 -m "$MEM" -smp "$CPUS" -nodefaults -no-user-config -display none -no-reboot \
		-serial file:"$OUT/console" -monitor none \
		-kernel "$KDIR/vmlinuz" -initrd "$KDIR/initrd.cpio.gz" \
		-append "console=ttyS0 $QUIET panic=1 rdinit=/init cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1" \
		-fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
		-device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
		-fsdev local,id=vmout,path="$OUT",security_model=none,multidevs=remap \
		-device virtio-9p-pci,fsdev=vmout,mount_tag=vmout \
		</dev/null >&2 &
	QPID=$!
	# The guest writes CRLF on its serial console.
	tail -n +1 -s 0.2 -F --pid="$QPID" "$OUT/console" 2>/dev/null | tr -d '\r' &
	TPID=$!
	local t0=$SECONDS booted=0
	while kill -0 "$QPID" 2>/dev/null; do
		if [[ $booted == 0 ]] && grep -q '^FLOTILLA-VM-BOOTED' "$OUT/console"; then
			booted=1
			log "guest init reached after $((SECONDS - t0))s"
		fi
		if [[ $booted == 0 && $((SECONDS - t0)) -ge $BOOT_TIMEOUT ]]; then
			log "$accel: no init after ${BOOT_TIMEOUT}s"
			kill -9 "$QPID" 2>/dev/null || true
			wait "$QPID" 2>/dev/null || true
			wait "$TPID" 2>/dev/null || true
			return 1
		fi
		if [[ $((SECONDS - t0)) -ge $TIMEOUT ]]; then
			log "VM killed after ${TIMEOUT}s (FLOTILLA_VM_TIMEOUT)"
			kill -9 "$QPID" 2>/dev/null || true
			wait "$QPID" 2>/dev/null || true
			wait "$TPID" 2>/dev/null || true
			return 2
		fi
		sleep 0.2
	done
	wait "$QPID" 2>/dev/null || true
	wait "$TPID" 2>/dev/null || true
	QPID=
	grep -q '^FLOTILLA-VM-BOOTED' "$OUT/console" || return 1
	return 0
}

# KVM when it works, else TCG. A KVM that fails to boot the guest (seen with nested
# virtualization) is remembered in the cache so later runs go straight to TCG.
KVM_BROKEN=$CACHE/kvm-broken
KVM_SIG="qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}') kernel $KREL host $(uname -r)"
case ${FLOTILLA_VM_ACCEL:-auto} in
auto)
	ACCELS=()
	if [[ ! -w /dev/kvm ]]; then
		log "/dev/kvm not usable: using TCG emulation"
	elif [[ -f $KVM_BROKEN && $(cut -d' ' -f2- "$KVM_BROKEN") == "$KVM_SIG" ]]; then
		log "KVM did not boot this guest before ($(cut -d' ' -f1 "$KVM_BROKEN")): using TCG; rm $KVM_BROKEN to retry"
	else
		ACCELS=(kvm)
	fi
	ACCELS+=(tcg)
	;;
kvm | tcg) ACCELS=("$FLOTILLA_VM_ACCEL") ;;
*) die "FLOTILLA_VM_ACCEL must be kvm, tcg or auto" ;;
esac
START=$SECONDS
for accel in "${ACCELS[@]}"; do
	BOOT_TIMEOUT=${FLOTILLA_VM_BOOT_TIMEOUT:-$([[ $accel == kvm ]] && echo 30 || echo 120)}
	CPUS=$(vcpus "$accel")
	set +e
	boot "$accel"
	st=$?
	set -e
	case $st in
	0) break ;;
	2) exit 124 ;;
	1)
		if [[ $accel == kvm && ${FLOTILLA_VM_ACCEL:-auto} == auto ]]; then
			echo "$(date -Is) $KVM_SIG" >"$KVM_BROKEN"
			log "KVM could not boot the guest (nested virtualization?): falling back to TCG"
		fi
		;;
	esac
done
[[ $st == 0 ]] || die "the VM did not boot; rerun with FLOTILLA_VM_VERBOSE=1 to see the kernel's messages"
if [[ -f $OUT/rc ]]; then
	RC=$(cat "$OUT/rc")
	log "command exited with $RC; VM ran $((SECONDS - START))s"
	exit "$RC"
fi
die "the VM ended without reporting the command's exit code (out of memory? kernel panic?); rerun with FLOTILLA_VM_VERBOSE=1"
exit 125
}
