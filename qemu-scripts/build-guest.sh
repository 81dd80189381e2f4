#!/usr/bin/env bash
# build-guest.sh [OUTDIR] -- builds a tiny Linux guest for testing colo-blk under QEMU.
#
# Produces, in OUTDIR (default: qemu-scripts/guest, which is gitignored):
#   vmlinuz             Debian's linux-image-*-cloud-amd64 kernel
#   initramfs.cpio.gz   busybox-static, the virtio block modules and an /init (see below)
#   kernel-version      the `uname -r` of the kernel
#   stamp               what the build was made from (for idempotence)
#
# Idempotent: when the outputs exist and were built by this very script (same content hash)
# with the same busybox, nothing is done and no network is used. Set COLO_GUEST_REBUILD=1 to
# force a rebuild (e.g. to pick up a newer kernel).
#
# Environment:
#   COLO_GUEST_KERNEL_PKG  kernel package to use (default: what the linux-image-cloud-amd64
#                          metapackage depends on, installed version first, else candidate)
#   COLO_GUEST_REBUILD=1   rebuild even if up to date
#
# Needs: apt-get/apt-cache/dpkg (Debian), busybox-static, cpio, gzip, xz/zstd (if modules are
# compressed). apt-get update is run only when the kernel package cannot be resolved or fetched
# (that needs root).
#
# The guest's /init:
#   1. mounts /proc, /sys, /dev (devtmpfs), installs busybox applet symlinks;
#   2. insmods virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
#      virtio_blk failover net_failover virtio_net, in that order (modules that are built in are
#      simply absent; virtio_net is for tests/power_cut_vm.rs, whose guest has a network card;
#      ext4 is built into the cloud kernel);
#   3. runs the script named by `colo.script=PATH` on the kernel command line (default
#      /colo/test.sh, which run-vm.sh --script puts there via an extra cpio archive appended to
#      the initramfs); with no script it starts an interactive shell on the console;
#   4. prints "colo-init: script exit status N" and powers off (poweroff -f), so QEMU exits
#      (use with -no-reboot; a kernel panic also ends QEMU with panic=-1).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

BUSYBOX="${BUSYBOX:-/bin/busybox}"
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
    failover net_failover virtio_net)

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static)"
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is dynamically linked; install busybox-static"
for t in cpio gzip dpkg apt-get apt-cache; do
    command -v "$t" >/dev/null || die "$t not found"
done

recipe="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) $(sha256sum "$BUSYBOX" | cut -d' ' -f1)"
if [ "${COLO_GUEST_REBUILD:-0}" != 1 ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] \
    && [ -f "$out/stamp" ] && [ "$(sed -n 1p "$out/stamp")" = "$recipe" ]; then
    log "up to date: $out ($(sed -n 2p "$out/stamp"))"
    exit 0
fi

# --- which kernel -----------------------------------------------------------------------------
resolve_kernel_pkg() {
    local dep
    # The installed metapackage's dependency, if it is installed.
    dep="$(dpkg-query -W -f='${Status}\t${Depends}\n' linux-image-cloud-amd64 2>/dev/null \
        | awk -F'\t' '$1 ~ /install ok installed/ {print $2}' \
        | sed 's/[,|]/\n/g' | sed 's/(.*//; s/ //g' | grep -m1 '^linux-image-' || true)"
    if [ -z "$dep" ]; then
        # Otherwise what the candidate version depends on.
        dep="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
            | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}' || true)"
    fi
    printf '%s' "$dep"
}

apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    log "running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed (needs root and network)"
    apt_updated=1
}

pkg="${COLO_GUEST_KERNEL_PKG:-}"
if [ -z "$pkg" ]; then
    pkg="$(resolve_kernel_pkg)"
    if [ -z "$pkg" ]; then
        apt_update
        pkg="$(resolve_kernel_pkg)"
    fi
    [ -n "$pkg" ] || die "cannot resolve the kernel package behind linux-image-cloud-amd64"
fi
log "kernel package: $pkg"

work="$(mktemp -d "${TMPDIR:-/tmp}/colo-guest.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- download and unpack it -------------------------------------------------------------------
download() {
    # Sandbox user root: the _apt user could not write into a root-owned mktemp dir.
    (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
}
if ! download; then
    apt_update
    download || die "apt-get download $pkg failed"
fi
deb="$(ls "$work"/*.deb)"
dpkg-deb -x "$deb" "$work/pkg"
kver="$(find "$work/pkg/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n1)"
[ -n "$kver" ] || die "no /lib/modules in $deb"
[ -f "$work/pkg/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $deb"
log "kernel $kver from $(basename "$deb")"

# --- the initramfs tree -----------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,colo,lib/modules}
cp "$BUSYBOX" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

moddir="$work/pkg/lib/modules/$kver"
for m in "${MODULES[@]}"; do
    # Module file names use '_' or '-' interchangeably; find either.
    pat="${m//[_-]/[_-]}"
    f="$(find "$moddir/kernel" -regex ".*/$pat\.ko\(\.xz\|\.zst\|\.gz\)?" | head -n1)"
    if [ -z "$f" ]; then
        if grep -qE "/$pat\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
            log "module $m: built in"
        else
            log "module $m: not found (assuming built in)"
        fi
        continue
    fi
    case "$f" in
        *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    log "module $m: ${f#"$moddir/"}"
done
printf '%s\n' "${MODULES[@]}" >"$root/lib/modules/order"

cat >"$root/init" <<'EOF'
#!/bin/sh
# colo-blk test guest init (generated by qemu-scripts/build-guest.sh)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
echo "colo-init: up after $(cut -d' ' -f1 /proc/uptime)s"
while read -r m; do
    [ -f "/lib/modules/$m.ko" ] || continue
    insmod "/lib/modules/$m.ko" || echo "colo-init: insmod $m failed"
done </lib/modules/order

script=/colo/test.sh
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        colo.script=*) script="${arg#colo.script=}" ;;
    esac
done

if [ -f "$script" ]; then
    echo "colo-init: running $script at $(cut -d' ' -f1 /proc/uptime)s"
    sh "$script"
    rc=$?
    echo "colo-init: script exit status $rc at $(cut -d' ' -f1 /proc/uptime)s"
else
    echo "colo-init: no $script; starting a shell (exit it to power off)"
    setsid cttyhack sh
fi
sync
poweroff -f
EOF
chmod 755 "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
    | gzip -9n >"$work/initramfs.cpio.gz"

# --- install the results atomically-ish -------------------------------------------------------
cp "$work/pkg/boot/vmlinuz-$kver" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$kver" >"$out/kernel-version"
printf '%s\n%s\n' "$recipe" "$(basename "$deb")" >"$out/stamp"
log "built $out/vmlinuz and $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1))"
