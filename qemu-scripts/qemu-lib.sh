# qemu-lib.sh -- sourced by the qemu-scripts: what differs between the QEMU versions they run
# (Debian 12's QEMU 7.2 and the COLO-capable QEMU 11 of install-colo-qemu.sh).
# shellcheck shell=bash

# The default COLO-capable QEMU (install-colo-qemu.sh's wrapper); override with COLO_QEMU.
# shellcheck disable=SC2034 # used by the scripts that source this file
COLO_QEMU_DEFAULT=/opt/colo-qemu/bin/qemu-system-x86_64

# qemu_version BIN: prints "MAJOR MINOR" of a qemu-system-* binary, nothing if it does not run.
qemu_version() {
    "$1" --version 2>/dev/null \
        | sed -n '1s/^QEMU emulator version \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p'
}

# qemu_at_least BIN MAJOR MINOR: true when BIN is QEMU MAJOR.MINOR or newer.
qemu_at_least() {
    local v maj min
    v="$(qemu_version "$1")"
    [ -n "$v" ] || return 1
    read -r maj min <<<"$v"
    [ "$maj" -gt "$2" ] || { [ "$maj" -eq "$2" ] && [ "$min" -ge "$3" ]; }
}

# qemu_reconnect_opt BIN: the -chardev socket option that makes QEMU wait for a vhost-user
# backend and reconnect once a second. QEMU 9.2 added reconnect-ms and deprecated reconnect;
# QEMU 11 rejects reconnect=1, QEMU 7.2 knows only reconnect.
qemu_reconnect_opt() {
    [ -n "$(qemu_version "$1")" ] || return 1
    if qemu_at_least "$1" 9 2; then echo "reconnect-ms=1000"; else echo "reconnect=1"; fi
}
