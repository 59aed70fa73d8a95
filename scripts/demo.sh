#!/usr/bin/env bash
# vdisk demo: serve a fresh raw image over vhost-user-blk to a real QEMU guest, let the guest
# make a filesystem on it and write a file, check that file from the host, then stop vdisk
# with SIGTERM as an operator would.
#
#   scripts/demo.sh [CONFIG]        (default configs/vdisk-demo.toml; `make demo`)
#
# Environment: VDISK_BIN=path uses that vdisk binary instead of building target/release/vdisk.
# Works unattended (CI=true, no TTY). Installs what is missing through scripts/setup.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:-$ROOT/configs/vdisk-demo.toml}"

step() { printf '\n==> %s\n' "$*"; }
die() { echo "demo: ERROR: $*" >&2; exit 1; }

[ -f "$CONFIG" ] || die "config $CONFIG not found"
CONFIG="$(realpath "$CONFIG")"
# vdisk resolves the relative paths in the config from here, as this script does.
cd "$ROOT"

# Read `key = value` or `key = "value"` from the config (the first match wins).
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

cleanup() { # on any exit: stop a vdisk we started (SIGTERM, then SIGKILL after 10 s)
    if [ -n "$VDISK_PID" ] && kill -0 "$VDISK_PID" 2>/dev/null; then
        kill -TERM "$VDISK_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$VDISK_PID" 2>/dev/null || return 0
            sleep 0.1
        done
        kill -KILL "$VDISK_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

step "Installing what is missing (scripts/setup.sh)"
"$ROOT/scripts/setup.sh"

if [ -n "${VDISK_BIN:-}" ]; then
    VDISK="$VDISK_BIN"
    step "Using vdisk from VDISK_BIN=$VDISK"
else
    step "Building vdisk (release)"
    (cd "$ROOT" && cargo build --release -p vdisk --bin vdisk)
    VDISK="$ROOT/target/release/vdisk"
fi
[ -x "$VDISK" ] || die "$VDISK is not an executable"

step "Creating a fresh ${SIZE_MIB} MiB raw image"
mkdir -p "$(dirname "$IMAGE")" "$(dirname "$SOCKET")" "$WORK"
rm -f "$IMAGE" "$CONSOLE" "$VDISK_LOG"
truncate -s "${SIZE_MIB}M" "$IMAGE"
echo "    $IMAGE ($(du -h --apparent-size "$IMAGE" | cut -f1) apparent, $(du -h "$IMAGE" | cut -f1) allocated)"

step "Starting vdisk"
# A socket left by a killed vdisk is replaced by vdisk itself; one with a live vdisk behind
# it makes vdisk refuse to start (reported below).
# Everything vdisk needs is in the config file; relative paths resolve from the repo root.
VDISK_ARGS=(serve --config "$CONFIG")
echo "    $VDISK ${VDISK_ARGS[*]}"
RUST_LOG="${RUST_LOG:-info}" "$VDISK" "${VDISK_ARGS[@]}" </dev/null >"$VDISK_LOG" 2>&1 &
VDISK_PID=$!
for _ in $(seq 1 200); do
    [ -S "$SOCKET" ] && break
    if ! kill -0 "$VDISK_PID" 2>/dev/null; then
        wait "$VDISK_PID" && rc=0 || rc=$?
        VDISK_PID=""
        tail -n 30 "$VDISK_LOG" >&2 || true
        die "vdisk exited with status $rc before its socket appeared"
    fi
    sleep 0.1
done
[ -S "$SOCKET" ] || { tail -n 30 "$VDISK_LOG" >&2; die "vdisk's socket $SOCKET did not appear within 20 s"; }
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
GUEST_DIR="${GUEST_DIR:-$ROOT/target/guest}"
INITRD="$WORK/initrd"
rm -rf "$WORK/extra"
mkdir -p "$WORK/extra"
printf '%s\n' "$GUEST_SCRIPT" >"$WORK/extra/test.sh"
chmod 755 "$WORK/extra/test.sh"
# Base initramfs + a second archive with /test.sh: the kernel unpacks both.
(cd "$WORK/extra" && echo test.sh | cpio --quiet -o -H newc --owner=0:0) >"$WORK/extra.cpio"
# Each archive must start 4-byte aligned (build-guest.sh pads the base; this is belt and braces).
cp "$GUEST_DIR/initramfs.cpio.gz" "$INITRD"
truncate -s %4 "$INITRD"
cat "$WORK/extra.cpio" >>"$INITRD"
BOOT_START=$(date +%s.%N)
set +e
timeout 300 qemu-system-x86_64 -accel tcg -m 512 -smp 1 -nodefaults -no-user-config \
    -nographic -monitor none -no-reboot \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel "$GUEST_DIR/vmlinuz" -initrd "$INITRD" \
    -append "console=ttyS0 loglevel=4 panic=-1 edd=off" \
    -chardev "socket,id=vublk0,path=$SOCKET" \
    -device "vhost-user-blk-pci,chardev=vublk0,num-queues=$NUM_QUEUES" \
    -serial stdio </dev/null 2>"$WORK/qemu.stderr" |
    tr -d '\r' | sed -u -E 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' | tee "$CONSOLE" |
    awk '!on && /GUEST-INIT/ { on = 1; sub(/^.*GUEST-INIT/, "GUEST-INIT") } on { print "    guest| " $0; fflush() }'
QEMU_RC=${PIPESTATUS[0]}
set -e
BOOT_SECS=$(echo "$(date +%s.%N) - $BOOT_START" | bc 2>/dev/null || echo "?")
if [ "$QEMU_RC" != 0 ]; then
    cat "$WORK/qemu.stderr" >&2
    [ "$QEMU_RC" = 124 ] && echo "demo: QEMU timed out after 300 s" >&2
    die "QEMU failed (exit $QEMU_RC); console log in $CONSOLE, vdisk log in $VDISK_LOG"
fi
result() { sed -n -E "s/^RESULT $1( (.*))?$/\2/p" "$CONSOLE" | tail -n1; }
GUEST_RC="$(sed -n -E 's/^GUEST-TEST: exit ([0-9]+).*/\1/p' "$CONSOLE" | tail -n1)"
[ "$GUEST_RC" = 0 ] || die "the guest script failed (exit '${GUEST_RC:-none}'); console log in $CONSOLE"
G_SIZE="$(result size)"
G_SHA="$(result sha)"
# shellcheck disable=SC2034 # used by the eval'ed conditions in checks()
G_SHA2="$(result sha-reread)"
G_SERIAL="$(result serial)"
G_QUEUES="$(result queues)"

step "Checking the image from the host (e2fsprogs, no mount needed)"
e2fsck -fn "$IMAGE" >"$WORK/e2fsck.log" 2>&1 && FSCK=clean || FSCK="NOT clean (see $WORK/e2fsck.log)"
echo "    e2fsck -fn: $FSCK"
HELLO="$(debugfs -R "cat /hello.txt" "$IMAGE" 2>/dev/null)"
echo "    /hello.txt: $HELLO"
rm -f "$WORK/random.bin"
debugfs -R "dump /random.bin $WORK/random.bin" "$IMAGE" >/dev/null 2>&1 || true
H_SHA="$(sha256sum "$WORK/random.bin" 2>/dev/null | cut -d' ' -f1)"
H_BYTES="$(stat -c %s "$WORK/random.bin" 2>/dev/null || echo 0)"
echo "    /random.bin: $H_BYTES bytes, sha256 $H_SHA"
rm -f "$WORK/random.bin"

step "Stopping vdisk with SIGTERM"
kill -TERM "$VDISK_PID"
VDISK_RC=0
for _ in $(seq 1 300); do
    kill -0 "$VDISK_PID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$VDISK_PID" 2>/dev/null; then
    VDISK_RC="still running 30 s after SIGTERM"
else
    wait "$VDISK_PID" || VDISK_RC=$?
fi
VDISK_PID=""
[ -e "$SOCKET" ] && SOCK_STATE="left behind" || SOCK_STATE="removed"
echo "    vdisk exit status: $VDISK_RC; socket $SOCK_STATE"
COUNTERS="$(grep -o 'counters: .*' "$VDISK_LOG" | tail -n1 || true)"
[ -z "$COUNTERS" ] || echo "    vdisk's last log line with $COUNTERS"

OK=true
check() { # check DESCRIPTION 'SHELL CONDITION' (the condition is eval'ed)
    if eval "$2"; then printf '    [ok]   %s\n' "$1"; else printf '    [FAIL] %s\n' "$1"; OK=false; fi
}
step "Summary"
echo "    vdisk served $IMAGE (${SIZE_MIB} MiB raw, engine $ENGINE, $NUM_QUEUES queue(s)) on $SOCKET."
echo "    The guest ran in QEMU (TCG) for ${BOOT_SECS%.*} s, boot included, and saw /dev/vda: $((${G_SIZE:-0} / 1048576)) MiB, serial '$G_SERIAL', using $G_QUEUES blk-mq queue(s) with its 1 vCPU."
echo "    It made an ext2 filesystem, wrote /hello.txt and ${WRITE_MIB} MiB of random data, remounted and read it back."
# The conditions are single-quoted on purpose: check() evaluates them.
# shellcheck disable=SC2016
checks() {
    check "guest saw a ${SIZE_MIB} MiB disk" '[ "${G_SIZE:-0}" = $((SIZE_MIB * 1048576)) ]'
    check "guest saw the configured serial '$SERIAL'" '[ "$G_SERIAL" = "$SERIAL" ]'
    check "guest read back what it wrote after remount (sha256 ${G_SHA:0:16}...)" '[ -n "$G_SHA" ] && [ "$G_SHA" = "$G_SHA2" ]'
    check "host e2fsck: filesystem clean" '[ "$FSCK" = clean ]'
    check "host read /random.bin (${H_BYTES} bytes) with the guest's sha256" '[ -n "$H_SHA" ] && [ "$H_SHA" = "$G_SHA" ] && [ "$H_BYTES" = $((WRITE_MIB * 1048576)) ]'
    check "host read /hello.txt from the image" '[ -n "$HELLO" ]'
    check "vdisk exited 0 on SIGTERM" '[ "$VDISK_RC" = 0 ]'
    check "vdisk removed its socket" '[ "$SOCK_STATE" = removed ]'
}
checks
echo "    Logs: guest console $CONSOLE, vdisk $VDISK_LOG"
if $OK; then
    echo "demo: all checks passed"
else
    echo "demo: some checks FAILED" >&2
    exit 1
fi
