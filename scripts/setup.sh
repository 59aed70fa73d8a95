#!/usr/bin/env bash
# Install every system package the test suite and the demo need, then build the test guest.
# Meant for a fresh Debian 12 machine, run as root (CI runs it with CI=true and no TTY).
# Idempotent and fast on reruns: apt is skipped when everything is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

log() { echo "setup: $*" >&2; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# Packages, and a program each one must provide (used to decide whether apt is needed).
#   qemu-system-x86  qemu-system-x86_64: boots the test guests (TCG) as the vhost-user frontend
#   qemu-utils       qemu-img, qemu-storage-daemon: image oracle and the peer backend
#   busybox-static   the guest's userland (scripts/build-guest.sh)
#   cpio             packs the guest initramfs and the per-test /test.sh archives
#   fio              I/O load in tests and benchmarks
#   e2fsprogs        debugfs/e2fsck: the demo checks the guest-made filesystem from the host
#   file             build-guest.sh checks that busybox is static
#   make             the Makefile (make test / demo / bench)
#   fonts-dejavu-core  the labels of the benchmark plots (benches/src/chart.rs)
PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio fio e2fsprogs file make fonts-dejavu-core)
declare -A PROVIDES=(
    [qemu-system-x86]=qemu-system-x86_64
    [qemu-utils]="qemu-img qemu-storage-daemon"
    [busybox-static]=/bin/busybox
    [cpio]=cpio
    [fio]=fio
    [e2fsprogs]="debugfs e2fsck"
    [file]=file
    [make]=make
    [fonts-dejavu-core]=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
)

# ---------------------------------------------------------------------------------------
# vswitch (later work): add its packages here, e.g. dpdk-dev (dpdk-testpmd) and
# openvswitch-switch-dpdk (+ update-alternatives for ovs-vswitchd-dpdk), and reserve
# hugepages after the install step below (see /work/shared/ENVIRONMENT.md). Not installed yet.
# PACKAGES+=(dpdk-dev openvswitch-switch-dpdk)
# PROVIDES[dpdk-dev]=dpdk-testpmd
# PROVIDES[openvswitch-switch-dpdk]=ovs-vsctl
# ---------------------------------------------------------------------------------------

have() {
    case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ;;
    esac
}

missing_packages() {
    local pkg prog
    for pkg in "${PACKAGES[@]}"; do
        for prog in ${PROVIDES[$pkg]}; do
            if ! have "$prog"; then
                echo "$pkg"
                break
            fi
        done
    done
}

MISSING="$(missing_packages | tr '\n' ' ')"
if [ -n "${MISSING// /}" ]; then
    log "missing: $MISSING"
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
        else
            die "installing packages needs root: run 'sudo $0' (missing: $MISSING)"
        fi
    else
        SUDO=()
    fi
    APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    log "apt-get update"
    "${SUDO[@]}" apt-get update -q
    # qemu-system-x86 (QEMU 7.2) displaces a preinstalled newer qemu-utils (from backports),
    # taking qemu-img and qemu-storage-daemon with it: install qemu-utils again afterwards.
    log "apt-get install ${PACKAGES[*]}"
    "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" "${PACKAGES[@]}"
    log "apt-get install qemu-utils (again, see above)"
    "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" qemu-utils
    if ! have qemu-img || ! have qemu-storage-daemon; then
        log "qemu-img/qemu-storage-daemon still missing: reinstalling qemu-utils"
        "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" --reinstall qemu-utils
    fi
    STILL="$(missing_packages | tr '\n' ' ')"
    [ -z "${STILL// /}" ] || die "still missing after apt-get install: $STILL"
else
    log "all system packages present (${PACKAGES[*]})"
fi

# ---------------------------------------------------------------------------------------
# vswitch (later work): hugepages for DPDK go here, e.g.
#   echo 1024 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
#   mkdir -p /dev/hugepages; mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
# ---------------------------------------------------------------------------------------

log "qemu: $(qemu-system-x86_64 --version | head -n1)"
"$ROOT/scripts/build-guest.sh"
log "done"
