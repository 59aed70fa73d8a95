#!/usr/bin/env bash
# The demo: vdisk, then vswitch, each with real QEMU guests (TCG, no KVM), each ending with
# a summary of [ok]/[FAIL] checks. Exits non-zero if any check failed.
#
# vdisk: serve a fresh raw image over vhost-user-blk to a QEMU guest, let the guest make a
# filesystem on it and write a file, check that file from the host, then stop vdisk with
# SIGTERM as an operator would.
# vswitch (scripts/demo-vswitch.sh): three guests on vhost-user NICs, two on one VLAN and one
# on another; who reaches whom, what the switch learned and counted, then SIGTERM.
#
#   scripts/demo.sh [CONFIG]        (default configs/vdisk-demo.toml; `make demo`)
#
# Environment:
#   VDISK_BIN=path, VSWITCH_BIN=path  use that binary instead of building target/release/...
#   VSWITCH_CONFIG=file               the switch's configuration (configs/vswitch-two-vlans.toml)
#   DEMO_PARTS="vdisk vswitch"        the parts to run, in order (default both)
# Works unattended (CI=true, no TTY). Installs what is missing through scripts/setup.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:-$ROOT/configs/vdisk-demo.toml}"
DEMO_PARTS="${DEMO_PARTS:-vdisk vswitch}"
GUEST_DIR="${GUEST_DIR:-$ROOT/target/guest}"

step() { printf '\n==> %s\n' "$*"; }
die() { echo "demo: ERROR: $*" >&2; exit 1; }

[ -f "$CONFIG" ] || die "config $CONFIG not found"
CONFIG="$(realpath "$CONFIG")"
# The daemons resolve the relative paths in their configs from here, as this script does.
cd "$ROOT"

# Read `key = value` or `key = "value"` from the vdisk config (the first match wins).
cfg() {
    local v
    v="$(sed -n -E \
        -e "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"([^\"]*)\".*/\1/p" \
        -e "t" \
        -e "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*([^[:space:]#]+).*/\1/p" \
        "$CONFIG" | head -n1)"
    if [ -z "$v" ]; then
        [ $# -ge 2 ] || die "$CONFIG: key '$1' missing"
        v="$2"
    fi
    echo "$v"
}
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
# indent PREFIX: stdin with PREFIX before every line.
indent() {
    local l
    while IFS= read -r l || [ -n "$l" ]; do printf '%s%s\n' "$1" "$l"; done
}

OK=true
check() { # check DESCRIPTION 'SHELL CONDITION' (the condition is eval'ed)
    if eval "$2"; then printf '    [ok]   %s\n' "$1"; else printf '    [FAIL] %s\n' "$1"; OK=false; fi
}

# start_daemon VAR LOG SOCKET... -- COMMAND...: start COMMAND in the background (stdout and
# stderr to LOG), store its pid in VAR, wait until every SOCKET exists (20 s at most).
start_daemon() {
    local var="$1" log="$2" pid rc s
    local sockets=()
    shift 2
    while [ "$1" != -- ]; do sockets+=("$1"); shift; done
    shift
    echo "    $*"
    RUST_LOG="${RUST_LOG:-info}" "$@" </dev/null >"$log" 2>&1 &
    pid=$!
    printf -v "$var" '%s' "$pid"
    for _ in $(seq 1 200); do
        rc=ok
        for s in "${sockets[@]}"; do [ -S "$s" ] || rc=missing; done
        [ "$rc" = ok ] && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" && rc=0 || rc=$?
            printf -v "$var" '%s' ""
            tail -n 30 "$log" >&2 || true
            die "$(basename "$1") exited with status $rc before its sockets appeared"
        fi
        sleep 0.1
    done
    tail -n 30 "$log" >&2
    die "$(basename "$1")'s sockets (${sockets[*]}) did not all appear within 20 s"
}

# stop_daemon VAR PID [SECONDS]: SIGTERM, wait (30 s by default), store the exit status in
# VAR, or "still running N s after SIGTERM" (and SIGKILL it).
stop_daemon() {
    local var="$1" pid="$2" secs="${3:-30}" rc=0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        printf -v "$var" 'still running %s s after SIGTERM' "$secs"
        return 0
    fi
    wait "$pid" || rc=$?
    printf -v "$var" '%s' "$rc"
}

# guest_initrd DIR SCRIPT: DIR/initrd is the guest's base initramfs (scripts/build-guest.sh)
# followed by a second archive holding SCRIPT as /test.sh, which the guest's init runs; the
# kernel unpacks both.
guest_initrd() {
    local dir="$1"
    rm -rf "$dir/extra"
    mkdir -p "$dir/extra"
    printf '%s\n' "$2" >"$dir/extra/test.sh"
    chmod 755 "$dir/extra/test.sh"
    (cd "$dir/extra" && echo test.sh | cpio --quiet -o -H newc --owner=0:0) >"$dir/extra.cpio"
    # Each archive must start 4-byte aligned (build-guest.sh pads the base; belt and braces).
    cp "$GUEST_DIR/initramfs.cpio.gz" "$dir/initrd"
    truncate -s %4 "$dir/initrd"
    cat "$dir/extra.cpio" >>"$dir/initrd"
}

# run_guest LABEL DIR MEM_MIB [QEMU ARGS...]: boot the guest with DIR/initrd and the given
# devices; the console goes to DIR/console.log and, from the guest's init on, to stdout with
# "LABEL| " in front (as each line arrives: every stage is unbuffered, and the last sed
# loops with `n` because a `$` address would hold each line back until the next one); QEMU's stderr to DIR/qemu.stderr, its pid to DIR/qemu.pid, the run's
# duration in seconds to DIR/secs. If DIR/console.in is a FIFO, what the host writes there is
# the console's input (keep it open for writing: QEMU must not see an end of file). Returns
# QEMU's exit status (124: killed after 300 s).
run_guest() {
    local label="$1" dir="$2" mem="$3" start=$SECONDS rc input=/dev/null
    shift 3
    [ ! -p "$dir/console.in" ] || input="$dir/console.in"
    rm -f "$dir/console.log" "$dir/qemu.stderr" "$dir/qemu.pid" "$dir/secs"
    set +e
    timeout 300 qemu-system-x86_64 -accel tcg -m "$mem" -smp 1 -nodefaults -no-user-config \
        -nographic -monitor none -no-reboot -pidfile "$dir/qemu.pid" \
        -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem \
        -kernel "$GUEST_DIR/vmlinuz" -initrd "$dir/initrd" \
        -append "console=ttyS0 loglevel=4 panic=-1 edd=off" \
        "$@" -serial stdio <"$input" 2>"$dir/qemu.stderr" |
        sed -u -E 's/\r//g; s/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' | tee "$dir/console.log" |
        sed -u -n -E "/GUEST-INIT/ { s/^.*GUEST-INIT/GUEST-INIT/; :l; s/^/    ${label//[^A-Za-z0-9_.-]/_}| /; p; n; bl }"
    rc=${PIPESTATUS[0]}
    set -e
    echo $((SECONDS - start)) >"$dir/secs"
    return "$rc"
}

# kill_guest DIR: SIGKILL the QEMU of a run_guest that is still running (on an early exit).
kill_guest() {
    local pid
    pid="$(cat "$1/qemu.pid" 2>/dev/null)" || return 0
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = qemu-system-x86 ] &&
        kill -KILL "$pid" 2>/dev/null
    return 0
}

# guest_result CONSOLE KEY: the value of the guest's last "RESULT KEY value" line.
guest_result() { sed -n -E "s/^RESULT $2( (.*))?$/\2/p" "$1" | tail -n1; }
# guest_exit CONSOLE: /test.sh's exit status, empty if it did not finish.
guest_exit() { sed -n -E 's/^GUEST-TEST: exit ([0-9]+).*/\1/p' "$1" | tail -n1; }

demo_vdisk() {
    IMAGE="$(abspath "$(cfg image)")"
    SIZE_MIB="$(cfg size_mib)"
    SOCKET="$(abspath "$(cfg socket)")"
    NUM_QUEUES="$(cfg num_queues 1)"
    ENGINE="$(cfg engine io_uring)"
    SERIAL="$(cfg serial vdisk-demo)"
    WRITE_MIB="$(cfg write_mib 16)"
    is_uint "$SIZE_MIB" || die "$CONFIG: size_mib must be a number of MiB, got '$SIZE_MIB'"
    is_uint "$NUM_QUEUES" || die "$CONFIG: num_queues must be a number, got '$NUM_QUEUES'"
    is_uint "$WRITE_MIB" || die "$CONFIG: write_mib must be a number, got '$WRITE_MIB'"
    [ "$SIZE_MIB" -ge 16 ] || die "$CONFIG: size_mib must be at least 16"
    [ "$WRITE_MIB" -le $((SIZE_MIB / 2)) ] || die "$CONFIG: write_mib must be at most half of size_mib"
    [ "${#SOCKET}" -lt 100 ] || die "socket path $SOCKET is too long for a unix socket; set a shorter 'socket' in $CONFIG"

    WORK="$(dirname "$IMAGE")/demo-run"
    CONSOLE="$WORK/console.log"
    VDISK_LOG="$WORK/vdisk.log"
    VDISK_PID=""

    # shellcheck disable=SC2317 # invoked by the EXIT trap
    cleanup() { # on any exit: kill the guest, stop a vdisk we started (SIGKILL after 10 s)
        kill_guest "$WORK"
        [ -z "$VDISK_PID" ] || stop_daemon VDISK_RC "$VDISK_PID" 10
    }
    trap cleanup EXIT

    if [ -n "${VDISK_BIN:-}" ]; then
        VDISK="$VDISK_BIN"
        step "Using vdisk from VDISK_BIN=$VDISK"
    else
        step "Building vdisk (release)"
        cargo build --release -p vdisk --bin vdisk
        VDISK="$ROOT/target/release/vdisk"
    fi
    [ -x "$VDISK" ] || die "$VDISK is not an executable"

    step "Creating a fresh ${SIZE_MIB} MiB thin qcow2 image"
    mkdir -p "$(dirname "$IMAGE")" "$(dirname "$SOCKET")" "$WORK"
    rm -f "$IMAGE" "$CONSOLE" "$VDISK_LOG"
    "$VDISK" image create "$IMAGE" --size "${SIZE_MIB}M" | indent "    "
    echo "    $IMAGE: $(du -h "$IMAGE" | cut -f1) allocated"

    step "Starting vdisk"
    # A socket left by a killed vdisk is replaced by vdisk itself; one with a live vdisk behind
    # it makes vdisk refuse to start (reported by start_daemon).
    # Everything vdisk needs is in the config file; relative paths resolve from the repo root.
    start_daemon VDISK_PID "$VDISK_LOG" "$SOCKET" -- "$VDISK" serve --config "$CONFIG"
    echo "    vdisk is running (pid $VDISK_PID), listening on $SOCKET"

    # The guest's part: runs as /test.sh in the busybox guest (scripts/build-guest.sh).
    GUEST_SCRIPT="$(cat <<EOF
set -e
say() { echo "DEMO \$*"; }
size=\$(blockdev --getsize64 /dev/vda)
echo "RESULT size \$size"
echo "RESULT ro \$(blockdev --getro /dev/vda)"
echo "RESULT serial \$(cat /sys/block/vda/serial 2>/dev/null || true)"
echo "RESULT queues \$(ls /sys/block/vda/mq | wc -l)"
say "guest kernel \$(uname -r) sees /dev/vda: \$((size / 1048576)) MiB, serial '\$(cat /sys/block/vda/serial 2>/dev/null || true)', \$(ls /sys/block/vda/mq | wc -l) queue(s)"
say "mke2fs -L vdisk-demo /dev/vda"
mke2fs -F -L vdisk-demo /dev/vda >/dev/null
mount -t ext2 /dev/vda /mnt
echo "hello from the guest (Linux \$(uname -r)), written through vhost-user-blk to vdisk" >/mnt/hello.txt
say "writing /mnt/random.bin: ${WRITE_MIB} MiB from /dev/urandom"
dd if=/dev/urandom of=/mnt/random.bin bs=1048576 count=${WRITE_MIB} 2>/dev/null
sum=\$(sha256sum /mnt/random.bin | cut -d' ' -f1)
echo "RESULT sha \$sum"
say "sha256 \$sum"
umount /mnt
echo 3 >/proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/vda /mnt
sum2=\$(sha256sum /mnt/random.bin | cut -d' ' -f1)
echo "RESULT sha-reread \$sum2"
say "unmounted, dropped the page cache, mounted again: reads back sha256 \$sum2"
say "\$(df -k /mnt | tail -n 1 | awk '{print "filesystem: " \$2 " KiB, " \$3 " KiB used"}')"
umount /mnt
say "unmounted; powering off"
EOF
)"

    step "Booting a QEMU guest (TCG, no KVM) on the vdisk disk"
    guest_initrd "$WORK" "$GUEST_SCRIPT"
    run_guest guest "$WORK" 512 \
        -chardev "socket,id=vublk0,path=$SOCKET" \
        -device "vhost-user-blk-pci,chardev=vublk0,num-queues=$NUM_QUEUES" &&
        QEMU_RC=0 || QEMU_RC=$?
    BOOT_SECS="$(cat "$WORK/secs")"
    if [ "$QEMU_RC" != 0 ]; then
        cat "$WORK/qemu.stderr" >&2
        [ "$QEMU_RC" = 124 ] && echo "demo: QEMU timed out after 300 s" >&2
        die "QEMU failed (exit $QEMU_RC); console log in $CONSOLE, vdisk log in $VDISK_LOG"
    fi
    result() { guest_result "$CONSOLE" "$1"; }
    GUEST_RC="$(guest_exit "$CONSOLE")"
    [ "$GUEST_RC" = 0 ] || die "the guest script failed (exit '${GUEST_RC:-none}'); console log in $CONSOLE"
    G_SIZE="$(result size)"
    G_SHA="$(result sha)"
    # shellcheck disable=SC2034 # used by the eval'ed conditions in checks()
    G_SHA2="$(result sha-reread)"
    G_SERIAL="$(result serial)"
    G_QUEUES="$(result queues)"

    step "Snapshotting the image online and reading its usage (vdisk ctl)"
    CTL="$SOCKET.ctl"
    "$VDISK" ctl --socket "$CTL" snapshot create after-the-guest | indent "    "
    "$VDISK" ctl --socket "$CTL" snapshot list | indent "    "
    ALLOCATED="$("$VDISK" ctl --socket "$CTL" --json info | sed -n -E 's/.*"allocated_size":([0-9]+).*/\1/p')"
    echo "    allocated: $((${ALLOCATED:-0} / 1048576)) MiB of the ${SIZE_MIB} MiB disk"

    step "Stopping vdisk with SIGTERM"
    stop_daemon VDISK_RC "$VDISK_PID"
    VDISK_PID=""
    [ -e "$SOCKET" ] && SOCK_STATE="left behind" || SOCK_STATE="removed"
    echo "    vdisk exit status: $VDISK_RC; socket $SOCK_STATE"
    COUNTERS="$(grep -o 'counters: .*' "$VDISK_LOG" | tail -n1 || true)"
    [ -z "$COUNTERS" ] || echo "    vdisk's last log line with $COUNTERS"

    step "Checking the image from the host (qemu-img, then e2fsprogs on a raw copy)"
    qemu-img check "$IMAGE" >"$WORK/qemu-img-check.log" 2>&1 && QCHECK=clean || QCHECK="NOT clean (see $WORK/qemu-img-check.log)"
    echo "    qemu-img check: $QCHECK"
    SNAPS="$(qemu-img snapshot -l "$IMAGE" 2>/dev/null | grep -c after-the-guest || true)"
    echo "    qemu-img snapshot -l lists after-the-guest: $([ "$SNAPS" = 1 ] && echo yes || echo no)"
    FLAT="$WORK/flat.raw"
    rm -f "$FLAT"
    "$VDISK" image convert --format qcow2 "$IMAGE" "$FLAT" --to raw
    echo "    vdisk image convert --to raw: $FLAT"
    e2fsck -fn "$FLAT" >"$WORK/e2fsck.log" 2>&1 && FSCK=clean || FSCK="NOT clean (see $WORK/e2fsck.log)"
    echo "    e2fsck -fn: $FSCK"
    HELLO="$(debugfs -R "cat /hello.txt" "$FLAT" 2>/dev/null)"
    echo "    /hello.txt: $HELLO"
    rm -f "$WORK/random.bin"
    debugfs -R "dump /random.bin $WORK/random.bin" "$FLAT" >/dev/null 2>&1 || true
    H_SHA="$(sha256sum "$WORK/random.bin" 2>/dev/null | cut -d' ' -f1)"
    H_BYTES="$(stat -c %s "$WORK/random.bin" 2>/dev/null || echo 0)"
    echo "    /random.bin: $H_BYTES bytes, sha256 $H_SHA"
    rm -f "$WORK/random.bin" "$FLAT"

    step "Summary (vdisk)"
    echo "    vdisk served $IMAGE (${SIZE_MIB} MiB thin qcow2, engine $ENGINE, $NUM_QUEUES queue(s)) on $SOCKET."
    echo "    The guest ran in QEMU (TCG) for $BOOT_SECS s, boot included, and saw /dev/vda: $((${G_SIZE:-0} / 1048576)) MiB, serial '$G_SERIAL', using $G_QUEUES blk-mq queue(s) with its 1 vCPU."
    echo "    It made an ext2 filesystem, wrote /hello.txt and ${WRITE_MIB} MiB of random data, remounted and read it back."
    # The conditions are single-quoted on purpose: check() evaluates them.
    # shellcheck disable=SC2016
    {
        check "guest saw a ${SIZE_MIB} MiB disk" '[ "${G_SIZE:-0}" = $((SIZE_MIB * 1048576)) ]'
        check "guest saw the configured serial '$SERIAL'" '[ "$G_SERIAL" = "$SERIAL" ]'
        check "guest read back what it wrote after remount (sha256 ${G_SHA:0:16}...)" '[ -n "$G_SHA" ] && [ "$G_SHA" = "$G_SHA2" ]'
        check "qemu-img check: image clean" '[ "$QCHECK" = clean ]'
        check "online snapshot taken and listed by qemu-img" '[ "$SNAPS" = 1 ]'
        check "thin: $((${ALLOCATED:-0} / 1048576)) MiB allocated for a ${SIZE_MIB} MiB disk" '[ -n "$ALLOCATED" ] && [ "$ALLOCATED" -lt $((SIZE_MIB * 1048576)) ]'
        check "host e2fsck: filesystem clean" '[ "$FSCK" = clean ]'
        check "host read /random.bin (${H_BYTES} bytes) with the guest's sha256" '[ -n "$H_SHA" ] && [ "$H_SHA" = "$G_SHA" ] && [ "$H_BYTES" = $((WRITE_MIB * 1048576)) ]'
        check "host read /hello.txt from the image" '[ -n "$HELLO" ]'
        check "vdisk exited 0 on SIGTERM" '[ "$VDISK_RC" = 0 ]'
        check "vdisk removed its socket" '[ "$SOCK_STATE" = removed ]'
    }
    echo "    Logs: guest console $CONSOLE, vdisk $VDISK_LOG"
    $OK
}

# shellcheck source=scripts/demo-vswitch.sh
. "$ROOT/scripts/demo-vswitch.sh"

for part in $DEMO_PARTS; do
    case "$part" in vdisk | vswitch) ;; *) die "DEMO_PARTS: unknown part '$part' (vdisk, vswitch)" ;; esac
done

step "Installing what is missing (scripts/setup.sh)"
"$ROOT/scripts/setup.sh"

# Each part runs in a subshell with its own variables and EXIT trap (which stops its daemons
# and guests): a part that fails, even fatally, still lets the next one run.
PASSED=() FAILED=()
for part in $DEMO_PARTS; do
    set +e
    (
        set -e
        "demo_$part"
    )
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then PASSED+=("$part"); else FAILED+=("$part"); fi
done

echo
if [ "${#FAILED[@]}" = 0 ]; then
    echo "demo: all checks passed (${PASSED[*]})"
else
    echo "demo: some checks FAILED (${FAILED[*]}); see the [FAIL] lines and errors above" >&2
    exit 1
fi
