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

# vswitch's end-to-end tests (tests/tests/testpmd_net.rs):
#   dpdk-dev         dpdk-testpmd (DPDK 22.11): its net_virtio_user ports are real virtio-net
#                    drivers on vswitch's vhost-user sockets; needs hugepages (see below)
PACKAGES+=(dpdk-dev)
PROVIDES[dpdk-dev]=dpdk-testpmd
# Later (the vswitch benchmark): openvswitch-switch-dpdk, plus update-alternatives for
# ovs-vswitchd-dpdk (see /work/shared/ENVIRONMENT.md). Not installed yet.
# PACKAGES+=(openvswitch-switch-dpdk)
# PROVIDES[openvswitch-switch-dpdk]=ovs-vsctl

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

# Hugepages for DPDK: HUGEPAGES (default 1024) 2 MiB pages reserved, and hugetlbfs on
# /dev/hugepages. The testpmd tests take 128 MiB per testpmd process (--in-memory, so they
# need no mount and leave no files); other DPDK users (OVS, file-backed testpmd) need the
# mount. The reservation does not survive a reboot: rerun this script (make test does).
# Only ever raises the reservation; without root it warns, and the testpmd tests skip
# (outside CI) or fail (in CI) with the same explanation.
HUGEPAGES="${HUGEPAGES:-1024}"
HP_SYS=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}
hugepages_ok() {
    [ "$(cat "$HP_SYS" 2>/dev/null || echo 0)" -ge "$HUGEPAGES" ] && mountpoint -q /dev/hugepages
}
if [ ! -e "$HP_SYS" ]; then
    log "WARNING: $HP_SYS missing: this kernel has no 2 MiB hugepages; testpmd tests cannot run"
elif hugepages_ok; then
    log "hugepages: $(cat "$HP_SYS") x 2 MiB reserved, hugetlbfs on /dev/hugepages"
else
    if [ "$(cat "$HP_SYS")" -lt "$HUGEPAGES" ]; then
        log "reserving $HUGEPAGES 2 MiB hugepages (was $(cat "$HP_SYS"))"
        as_root sh -c "echo $HUGEPAGES > $HP_SYS" ||
            log "WARNING: cannot reserve hugepages (needs root: sudo $0)"
    fi
    if ! mountpoint -q /dev/hugepages; then
        log "mounting hugetlbfs on /dev/hugepages"
        { as_root mkdir -p /dev/hugepages && as_root mount -t hugetlbfs nodev /dev/hugepages; } ||
            log "WARNING: cannot mount hugetlbfs on /dev/hugepages (needs root: sudo $0)"
    fi
    if hugepages_ok; then
        log "hugepages: $(cat "$HP_SYS") x 2 MiB reserved, hugetlbfs on /dev/hugepages"
    else
        log "WARNING: hugepages: $(cat "$HP_SYS") of $HUGEPAGES reserved" \
            "(the kernel may lack contiguous memory), /dev/hugepages" \
            "$(mountpoint -q /dev/hugepages && echo mounted || echo 'not mounted')"
    fi
fi

log "qemu: $(qemu-system-x86_64 --version | head -n1)"
"$ROOT/scripts/build-guest.sh"
log "done"
