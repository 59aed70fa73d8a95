#!/usr/bin/env bash
# Install every system package the test suite and the demo need, then build the test guest.
# Meant for a fresh Debian 12 machine, run as root (CI runs it with CI=true and no TTY).
# Idempotent and fast on reruns: apt is skipped when everything is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_NAME=setup
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

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
#   strace           counts the opens of an image (tests/tests/qcow2_serve.rs)
PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio fio e2fsprogs file make fonts-dejavu-core strace)
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
    [strace]=strace
)

# vswitch's end-to-end tests (tests/tests/testpmd_net.rs):
#   dpdk-dev         dpdk-testpmd (DPDK 22.11): its net_virtio_user ports are real virtio-net
#                    drivers on vswitch's vhost-user sockets; needs hugepages (see below)
PACKAGES+=(dpdk-dev)
PROVIDES[dpdk-dev]=dpdk-testpmd
# Open vSwitch with DPDK is only for the benchmark: scripts/setup-bench.sh installs it.

# The qcow2 fuzz target (scripts/fuzz.sh, run by CI):
#   g++              libfuzzer-sys compiles libFuzzer with the system C++ compiler
PACKAGES+=(g++)
PROVIDES[g++]=g++

# The test guest's tcpblast (tests/guest-tools), linked static by build-guest.sh:
#   libc6-dev        glibc's static libc.a
PACKAGES+=(libc6-dev)
PROVIDES[libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a

MISSING="$(missing_packages | tr '\n' ' ')"
if [ -n "${MISSING// /}" ]; then
    log "missing: $MISSING"
    root_prefix || die "installing packages needs root: run 'sudo $0' (missing: $MISSING)"
    # qemu-system-x86 (QEMU 7.2) breaks a preinstalled newer qemu-utils (from backports):
    # asked for in one command, apt keeps the newer qemu-utils and refuses the lot. So
    # everything else first (apt then removes the newer qemu-utils, taking qemu-img and
    # qemu-storage-daemon with it), then qemu-utils at the version that goes with it.
    OTHERS=()
    for p in "${PACKAGES[@]}"; do
        [ "$p" = qemu-utils ] || OTHERS+=("$p")
    done
    apt_install "${OTHERS[@]}"
    apt_install qemu-utils
    if ! have qemu-img || ! have qemu-storage-daemon; then
        log "qemu-img/qemu-storage-daemon still missing: reinstalling qemu-utils"
        apt_install --reinstall qemu-utils
    fi
    check_installed
else
    log "all system packages present (${PACKAGES[*]})"
fi

# Hugepages for DPDK: HUGEPAGES (default 1024) 2 MiB pages reserved, and hugetlbfs on
# /dev/hugepages. The testpmd tests take 128 MiB per testpmd process (--in-memory, so they
# need no mount and leave no files); other DPDK users (OVS, file-backed testpmd) need the
# mount. The reservation does not survive a reboot: rerun this script (make test does).
# Only ever raises the reservation; without root it warns, and the testpmd tests skip
# (outside CI) or fail (in CI) with the same explanation.
ensure_hugepages "${HUGEPAGES:-1024}"

log "qemu: $(qemu-system-x86_64 --version | head -n1)"
"$ROOT/scripts/build-guest.sh"
log "done"
