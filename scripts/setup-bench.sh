#!/usr/bin/env bash
# Install what the benchmarks need beyond the test suite (scripts/setup.sh), for
# `cargo run --release -p benches -- net`: DPDK's testpmd (generator and vhost PMD), and
# Open vSwitch with DPDK as the peer switch. Also reserves hugepages for DPDK.
# Meant for a Debian 12 machine, run as root. Idempotent: apt is skipped when everything is
# there, the alternative is only set when it points elsewhere, hugepages are only raised.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_NAME=setup-bench
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

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

root_prefix || NEED_ROOT=1

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
    apt_install "${PACKAGES[@]}"
    check_installed
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
# Without root this only warns; the benchmark's preflight then says what is missing.
ensure_hugepages "$HUGEPAGES_2M"

log "dpdk $(dpkg-query -W -f '${Version}' dpdk 2>/dev/null || echo '(version unknown)')"
log "$("$OVS_DPDK" --version | head -n2 | tr '\n' ' ')"
log "done"
