#!/usr/bin/env bash
# Install what the benchmarks need beyond the test suite (scripts/setup.sh), for
# `cargo run --release -p benches -- net`: DPDK's testpmd (generator and vhost PMD), and
# Open vSwitch with DPDK as the peer switch. Also reserves hugepages for DPDK.
# Meant for a Debian 12 machine, run as root. Idempotent: apt is skipped when everything is
# there, the alternative is only set when it points elsewhere, hugepages are only raised.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

log() { echo "setup-bench: $*" >&2; }
die() { echo "setup-bench: ERROR: $*" >&2; exit 1; }

OVS_DPDK=/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk
HUGEPAGES_2M=1024

# Packages, and a file or program each one must provide (to decide whether apt is needed).
#   dpdk-dev                 dpdk-testpmd: the traffic generator, and the vhost PMD peer
#   openvswitch-switch-dpdk  ovs-vswitchd-dpdk (+ ovsdb-server, ovs-vsctl, ovs-appctl)
#   coreutils                stdbuf: unbuffers testpmd's output when it is driven over a pipe
#   fonts-dejavu-core        the labels of the benchmark plots
PACKAGES=(dpdk-dev openvswitch-switch-dpdk coreutils fonts-dejavu-core)
declare -A PROVIDES=(
    [dpdk-dev]=dpdk-testpmd
    [openvswitch-switch-dpdk]="$OVS_DPDK ovsdb-server ovsdb-tool ovs-vsctl ovs-appctl"
    [coreutils]=stdbuf
    [fonts-dejavu-core]=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
)

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

SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
    else
        NEED_ROOT=1
    fi
fi

MISSING="$(missing_packages | tr '\n' ' ')"
if [ -n "${MISSING// /}" ]; then
    [ -z "${NEED_ROOT:-}" ] || die "installing packages needs root: run 'sudo $0' (missing: $MISSING)"
    log "missing: $MISSING"
    # The benchmark runs its own private ovsdb-server/ovs-vswitchd: keep the package from
    # starting the system service (which would also take hugepages and cores). A policy-rc.d
    # that refuses every start does that, for invoke-rc.d and deb-systemd-invoke alike.
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        "${SUDO[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
        trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
    fi
    APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    log "apt-get update"
    "${SUDO[@]}" apt-get update -q
    log "apt-get install ${PACKAGES[*]}"
    "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" "${PACKAGES[@]}"
    STILL="$(missing_packages | tr '\n' ' ')"
    [ -z "${STILL// /}" ] || die "still missing after apt-get install: $STILL"
else
    log "all benchmark packages present (${PACKAGES[*]})"
fi

# The benchmark calls ovs-vswitchd-dpdk by its full path; the alternative makes the plain
# `ovs-vswitchd` command DPDK-enabled too, as the OVS-DPDK documentation assumes.
current="$(readlink -f /etc/alternatives/ovs-vswitchd 2>/dev/null || true)"
if [ "$current" != "$OVS_DPDK" ]; then
    [ -z "${NEED_ROOT:-}" ] || die "setting the ovs-vswitchd alternative needs root"
    log "update-alternatives --set ovs-vswitchd $OVS_DPDK"
    "${SUDO[@]}" update-alternatives --set ovs-vswitchd "$OVS_DPDK"
else
    log "ovs-vswitchd alternative already points to $OVS_DPDK"
fi

# Hugepages: a generator (128 MiB) plus OVS (256 MiB) or the vhost PMD (128 MiB), with room
# for the testpmd end-to-end tests. Only ever raised. The benchmark's DPDK processes use
# --in-memory, which needs no hugetlbfs mount; mount one anyway for other DPDK users.
NR=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
if [ -r "$NR" ]; then
    have_pages="$(cat "$NR")"
    if [ "$have_pages" -lt "$HUGEPAGES_2M" ]; then
        [ -z "${NEED_ROOT:-}" ] || die "reserving hugepages needs root"
        log "reserving $HUGEPAGES_2M 2 MiB hugepages (had $have_pages)"
        echo "$HUGEPAGES_2M" | "${SUDO[@]}" tee "$NR" >/dev/null
        got="$(cat "$NR")"
        [ "$got" -ge "$HUGEPAGES_2M" ] || log "warning: only $got hugepages could be reserved"
    else
        log "$have_pages 2 MiB hugepages reserved"
    fi
else
    log "warning: $NR not found: no 2 MiB hugepages on this kernel"
fi
if ! mountpoint -q /dev/hugepages 2>/dev/null; then
    if [ -z "${NEED_ROOT:-}" ]; then
        "${SUDO[@]}" mkdir -p /dev/hugepages
        "${SUDO[@]}" mount -t hugetlbfs nodev /dev/hugepages || log "warning: cannot mount /dev/hugepages"
    fi
fi

log "dpdk $(dpkg-query -W -f '${Version}' dpdk 2>/dev/null || echo '(version unknown)')"
log "$("$OVS_DPDK" --version | head -n2 | tr '\n' ' ')"
log "done"
