# Sourced by scripts/setup.sh and scripts/setup-bench.sh: logging, the "which packages are
# missing" check, root access, apt-get and hugepages. Set LOG_NAME before sourcing, and the
# PACKAGES array and PROVIDES map (package -> the programs or absolute paths it must
# provide) before calling missing_packages.
# shellcheck shell=bash

export DEBIAN_FRONTEND=noninteractive

log() { echo "${LOG_NAME:-setup}: $*" >&2; }
die() { echo "${LOG_NAME:-setup}: ERROR: $*" >&2; exit 1; }

# have PROG|/PATH: the program is on PATH (or in /usr/sbin, /sbin), or the path exists.
have() {
    case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ;;
    esac
}

# The packages of PACKAGES that lack one of their PROVIDES, one a line.
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

# Set SUDO to what runs a command as root: nothing as root, passwordless sudo otherwise.
# Fails (SUDO left empty) when neither is available.
root_prefix() {
    SUDO=()
    [ "$(id -u)" != 0 ] || return 0
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
        return 0
    fi
    return 1
}

# as_root CMD...: run CMD as root, or fail without running it.
as_root() {
    local SUDO
    root_prefix && "${SUDO[@]}" "$@"
}

APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

# apt_install PKG...: apt-get update (once per script), then apt-get install, as root.
apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        log "apt-get update"
        as_root apt-get update -q
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root apt-get install "${APT_OPTS[@]}" "$@"
}

# Die unless missing_packages now finds nothing.
check_installed() {
    local still
    still="$(missing_packages | tr '\n' ' ')"
    [ -z "${still// /}" ] || die "still missing after apt-get install: $still"
}

# ensure_hugepages N: at least N 2 MiB hugepages reserved (only ever raised) and hugetlbfs
# on /dev/hugepages. The reservation does not survive a reboot. Without root it only
# warns: the DPDK users then skip (outside CI) or fail (in CI) with their own explanation.
ensure_hugepages() {
    local want="$1" sys=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
    hugepages_ok() {
        [ "$(cat "$sys" 2>/dev/null || echo 0)" -ge "$want" ] && mountpoint -q /dev/hugepages
    }
    if [ ! -e "$sys" ]; then
        log "WARNING: $sys missing: this kernel has no 2 MiB hugepages; DPDK cannot run"
        return 0
    fi
    if ! hugepages_ok; then
        if [ "$(cat "$sys")" -lt "$want" ]; then
            log "reserving $want 2 MiB hugepages (was $(cat "$sys"))"
            as_root sh -c "echo $want > $sys" ||
                log "WARNING: cannot reserve hugepages (needs root: sudo $0)"
        fi
        if ! mountpoint -q /dev/hugepages; then
            log "mounting hugetlbfs on /dev/hugepages"
            { as_root mkdir -p /dev/hugepages && as_root mount -t hugetlbfs nodev /dev/hugepages; } ||
                log "WARNING: cannot mount hugetlbfs on /dev/hugepages (needs root: sudo $0)"
        fi
    fi
    if hugepages_ok; then
        log "hugepages: $(cat "$sys") x 2 MiB reserved, hugetlbfs on /dev/hugepages"
    else
        log "WARNING: hugepages: $(cat "$sys") of $want reserved" \
            "(the kernel may lack contiguous memory), /dev/hugepages" \
            "$(mountpoint -q /dev/hugepages && echo mounted || echo 'not mounted')"
    fi
}
