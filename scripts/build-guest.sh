#!/usr/bin/env bash
# Build the small Linux guest the end-to-end tests and the demo boot under QEMU:
#   target/guest/vmlinuz            Debian 12's 6.1 kernel (from the linux-image package)
#   target/guest/initramfs.cpio.gz  busybox-static + the virtio/ext4 modules + /init, and
#                                   /bin/tcpblast (tests/guest-tools, linked static here)
#
# /init mounts proc, sys and devtmpfs, insmods the modules, prints "GUEST-INIT: ready", then:
#   - if /test.sh exists: runs it (output on the serial console), prints
#     "GUEST-TEST: exit RC", syncs and powers off (`poweroff -f`);
#   - otherwise: starts a shell on the console.
# A test supplies its own /test.sh by appending a second (uncompressed or gzip) cpio archive
# to initramfs.cpio.gz: the kernel unpacks concatenated archives in order, so the base image
# is built once and never per test. Each archive must start 4-byte aligned: the base is
# zero-padded to a multiple of 512 bytes, so plain `cat base extra >initrd` is enough. Test scripts report with lines like "RESULT key value".
#
# Idempotent: does nothing when the outputs exist and were built by this same script
# (a stamp records the script's checksum and the kernel package). FORCE=1 rebuilds.
# Needs: apt (apt-get download works unprivileged too), dpkg-deb, busybox-static, cpio, gzip,
# cargo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${GUEST_DIR:-$ROOT/target/guest}"
DL="$OUT/dl"
BUSYBOX="${BUSYBOX:-/bin/busybox}"

# Load order matters: insmod does no dependency resolution.
VIRTIO_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    failover net_failover virtio_net virtio_blk)
# ext4 (which also mounts ext2, as made by busybox mke2fs) for tests and the demo.
FS_MODULES=(crc16 mbcache jbd2 crc32c_generic ext4)

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

for tool in apt-cache apt-get dpkg-deb cpio gzip sha256sum cargo; do
    command -v "$tool" >/dev/null || die "'$tool' not found (run scripts/setup.sh)"
done
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: install busybox-static (scripts/setup.sh)"
if ! file_out="$(LC_ALL=C file -L "$BUSYBOX" 2>/dev/null)" || [[ "$file_out" != *"statically linked"* ]]; then
    # `file` may be absent; fall back to ldd's verdict.
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
        die "$BUSYBOX is dynamically linked; the guest needs busybox-static"
    fi
fi

# Which kernel: the one Debian's linux-image-amd64 metapackage currently points at.
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
PKG="$(kernel_pkg || true)"
if [ -z "$PKG" ]; then
    if [ "$(id -u)" = 0 ]; then
        log "apt lists are empty; running apt-get update"
        apt-get update -qq
        PKG="$(kernel_pkg || true)"
    fi
fi
[ -n "$PKG" ] || die "cannot find the kernel package: 'apt-cache depends linux-image-amd64' names none (run apt-get update)"

SELF_SUM="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
TOOLS="$ROOT/tests/guest-tools"
TOOLS_SUM="$(cat "$TOOLS/Cargo.toml" "$TOOLS"/src/*.rs | sha256sum | cut -d' ' -f1)"
STAMP_WANT="$PKG $SELF_SUM $TOOLS_SUM"
if [ "${FORCE:-0}" != 1 ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ] &&
    [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP_WANT" ]; then
    log "guest already built in $OUT ($PKG); FORCE=1 to rebuild"
    exit 0
fi

mkdir -p "$DL"
cached_deb() { find "$DL" -maxdepth 1 -name "${PKG}_*.deb" | head -n1; }
DEB="$(cached_deb)"
if [ -z "$DEB" ]; then
    log "downloading $PKG"
    rm -f "$DL"/*.deb
    # As root, apt warns that its _apt user cannot write here and downloads unsandboxed:
    # harmless, so that one line is filtered out.
    if ! (cd "$DL" && apt-get download -q "$PKG") 2>"$DL/apt.err"; then
        cat "$DL/apt.err" >&2
        die "apt-get download $PKG failed"
    fi
    grep -v "unsandboxed" "$DL/apt.err" >&2 || true
    DEB="$(cached_deb)"
    [ -n "$DEB" ] || die "apt-get download $PKG produced no .deb in $DL"
fi
log "using $(basename "$DEB")"

WORK="$(mktemp -d "$OUT/work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Extract only what we need: the kernel image and the handful of modules.
KX="$WORK/kernel"
mkdir -p "$KX"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$KX" --wildcards \
    './boot/vmlinuz-*' './lib/modules/*/kernel/drivers/virtio/*' \
    './lib/modules/*/kernel/drivers/net/*failover*' './lib/modules/*/kernel/net/core/failover.ko*' \
    './lib/modules/*/kernel/drivers/net/virtio_net.ko*' './lib/modules/*/kernel/drivers/block/virtio_blk.ko*' \
    './lib/modules/*/kernel/lib/crc16.ko*' './lib/modules/*/kernel/fs/mbcache.ko*' \
    './lib/modules/*/kernel/fs/jbd2/*' './lib/modules/*/kernel/crypto/crc32c_generic.ko*' \
    './lib/modules/*/kernel/fs/ext4/*'
VMLINUZ="$(find "$KX/boot" -name 'vmlinuz-*' | head -n1)"
[ -n "$VMLINUZ" ] || die "no boot/vmlinuz-* in $DEB"
KVER="$(basename "$(ls -d "$KX"/lib/modules/*)")"
MODDIR="$KX/lib/modules/$KVER/kernel"

# The initramfs tree.
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,etc,lib/modules,root}
cp "$BUSYBOX" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"

# The guest has no libc: the tools link statically (glibc's static-pie; they use no NSS).
log "building the guest tools (tests/guest-tools)"
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" cargo build --quiet --release --locked \
    --manifest-path "$ROOT/Cargo.toml" -p guest-tools --target-dir "$OUT/tools-target"
cp "$OUT/tools-target/release/tcpblast" "$R/bin/tcpblast"

find_module() {
    local f
    f="$(find "$MODDIR" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" | head -n1)"
    [ -n "$f" ] || return 1
    case "$f" in
    *.xz) xz -dc "$f" >"$R/lib/modules/$1.ko" ;;
    *.zst) zstd -qdc "$f" >"$R/lib/modules/$1.ko" ;;
    *) cp "$f" "$R/lib/modules/$1.ko" ;;
    esac
}
: >"$R/etc/modules"
for m in "${VIRTIO_MODULES[@]}"; do
    find_module "$m" || die "module $m not found in $PKG"
    echo "$m" >>"$R/etc/modules"
done
for m in "${FS_MODULES[@]}"; do
    if find_module "$m"; then echo "$m" >>"$R/etc/modules"; else log "warning: optional module $m not found"; fi
done

cat >"$R/init" <<'EOF'
#!/bin/sh
# Guest init (scripts/build-guest.sh). Markers for the host: "GUEST-INIT: ready",
# "GUEST-TEST: start", "GUEST-TEST: exit RC"; test scripts print "RESULT ..." lines.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m.ko" || echo "GUEST-INIT: insmod $m failed"
done
# insmod virtio_blk probes the disks synchronously and devtmpfs creates /dev/vd* before
# it returns, so the disks are usable from here on.
echo "GUEST-INIT: ready kernel=$(uname -r) disks=$(cd /sys/block && ls -d vd* 2>/dev/null | tr '\n' ' ')"
if [ -f /test.sh ]; then
    echo "GUEST-TEST: start"
    sh /test.sh
    echo "GUEST-TEST: exit $?"
    sync
    poweroff -f
    sleep 5
fi
echo "GUEST-INIT: no /test.sh, starting a shell (poweroff -f to quit)"
exec setsid cttyhack sh
EOF
chmod 755 "$R/init"

mkdir -p "$OUT"
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0) |
    gzip -9n >"$WORK/initramfs.cpio.gz"
# Zero-pad to a 512-byte boundary: the kernel skips zeros between concatenated archives but
# needs the next archive to start 4-byte aligned, so `cat initramfs.cpio.gz extra.cpio` works.
# (zcat warns about the trailing zeros; the kernel does not care.)
truncate -s %512 "$WORK/initramfs.cpio.gz"
cp "$VMLINUZ" "$WORK/vmlinuz"
mv "$WORK/vmlinuz" "$OUT/vmlinuz"
mv "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
echo "$KVER" >"$OUT/kernel-release"
echo "$STAMP_WANT" >"$OUT/stamp"
log "built $OUT/vmlinuz ($KVER) and $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
