#!/usr/bin/env bash
# install-colo-qemu.sh -- installs a QEMU whose COLO (x-colo) works (QEMU 11.x from Debian
# trixie-backports) into a private prefix on Debian 12, without changing anything system-wide.
#
# Usage: install-colo-qemu.sh        (as root, or as a user who can write the prefix)
#
# Why: QEMU 7.2 (bookworm) hangs (pc) or aborts (q35) at the first COLO checkpoint, 10.0.x never
# gets into a working COLO; 11.1.x works (docs/colo-with-qemu.md). trixie's QEMU needs trixie's
# libc (2.41), so it cannot be apt-installed on Debian 12. This script instead
#   1. derives the Debian mirror from the system's apt sources (the entry for this system's
#      release, e.g. bookworm; override with COLO_QEMU_MIRROR=URI);
#   2. runs apt with a configuration of its own (sources, lists, cache and an empty dpkg status
#      file, all under PREFIX/apt) listing trixie + trixie-backports, pinning qemu-*, seabios and
#      ipxe-qemu to trixie-backports;
#   3. resolves the whole dependency closure of qemu-system-x86 and qemu-utils (libc6 included,
#      about 90 debs, 40 MB) and downloads it into PREFIX/apt/debs (kept: re-runs are fast);
#   4. unpacks every deb with dpkg-deb -x into PREFIX/root (never runs maintainer scripts);
#   5. writes PREFIX/bin/qemu-system-x86_64 and PREFIX/bin/qemu-img: wrappers that run the binary
#      through PREFIX/root's own dynamic loader and libraries, with -L for its firmware (seabios,
#      ipxe) and QEMU_MODULE_DIR for its modules.
# QEMU 7.2 (or whatever is installed) stays as it is; nothing outside PREFIX is written.
#
# Idempotent: when PREFIX holds an install made by this very script (same script hash) and the
# wrapper runs, it only prints the version (no network). Prints the version at the end.
#
# Environment:
#   COLO_QEMU_PREFIX   install prefix (default /opt/colo-qemu)
#   COLO_QEMU_MIRROR   Debian mirror URI (default: derived from the system's apt sources)
#   COLO_QEMU_SUITE    suite to take QEMU from (default trixie-backports; its base suite,
#                      the part before '-', provides the libraries)
#   COLO_QEMU_REFRESH=1  re-resolve and re-download even if up to date (new point release)
#
# The scripts and tests find the result through COLO_QEMU (path of the wrapper, default
# /opt/colo-qemu/bin/qemu-system-x86_64).
set -euo pipefail

prefix="${COLO_QEMU_PREFIX:-/opt/colo-qemu}"
suite="${COLO_QEMU_SUITE:-trixie-backports}"
base="${suite%%-*}"
packages=(qemu-system-x86 qemu-utils)

log() { echo "install-colo-qemu: $*" >&2; }
die() { echo "install-colo-qemu: error: $*" >&2; exit 1; }

for t in apt-get apt-cache dpkg-deb sha256sum flock; do
    command -v "$t" >/dev/null || die "$t not found (this script needs Debian's apt and dpkg)"
done
[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 is supported"

mkdir -p "$prefix" || die "cannot create $prefix (run as root or set COLO_QEMU_PREFIX)"
prefix="$(cd "$prefix" && pwd)"
apt_dir="$prefix/apt"
root="$prefix/root"
bin="$prefix/bin"
mkdir -p "$apt_dir" "$bin"

# One install at a time per prefix.
exec 9>"$prefix/.lock"
flock 9

recipe="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) $suite"
if [ "${COLO_QEMU_REFRESH:-0}" != 1 ] && [ -f "$prefix/stamp" ] \
    && [ "$(sed -n 1p "$prefix/stamp")" = "$recipe" ] \
    && v="$("$bin/qemu-system-x86_64" --version 2>/dev/null | head -n1)" && [ -n "$v" ]; then
    log "up to date in $prefix"
    echo "$v"
    exit 0
fi

# --- the mirror ---------------------------------------------------------------------------------
mirror="${COLO_QEMU_MIRROR:-}"
if [ -z "$mirror" ]; then
    # shellcheck disable=SC1091
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ -n "$codename" ] || die "cannot tell this system's release from /etc/os-release; set COLO_QEMU_MIRROR"
    # The main archive's entry for this release (not -security, not -updates), as apt sees it
    # (one-line and deb822 sources alike).
    # shellcheck disable=SC2016 # apt expands $(...) in --format
    mirror="$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Created-By: Packages' \
        2>/dev/null | awk -v r="$codename" '$1 == r {print $2; exit}' || true)"
    [ -n "$mirror" ] || die "no '$codename' entry in the system's apt sources to take the mirror from; set COLO_QEMU_MIRROR=URI"
fi
mirror="${mirror%/}/"
log "mirror $mirror, QEMU from $suite, libraries from $base"

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring missing (apt-get install debian-archive-keyring)"

# --- the private apt configuration --------------------------------------------------------------
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/preferences.d" "$apt_dir/lists/partial" \
    "$apt_dir/cache" "$apt_dir/debs/partial" "$apt_dir/state"
: >"$apt_dir/status"
cat >"$apt_dir/sources.list.d/colo-qemu.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $base $suite
Components: main
Signed-By: $keyring
EOF
cat >"$apt_dir/preferences.d/colo-qemu" <<EOF
Package: qemu-* seabios ipxe-qemu
Pin: release n=$suite
Pin-Priority: 990
EOF
# Read after the system's apt.conf(.d), so these win. The system's settings (proxies, ...) are
# kept; its hooks (dpkg/update Post-Invoke: cache cleaners, appstream) are cleared, as this apt
# never installs anything and must not touch the system's state.
cat >"$apt_dir/apt.conf" <<EOF
Dir::Etc::sourcelist "/dev/null";
Dir::Etc::sourceparts "$apt_dir/sources.list.d";
Dir::Etc::preferences "/dev/null";
Dir::Etc::preferencesparts "$apt_dir/preferences.d";
Dir::State "$apt_dir/state";
Dir::State::Lists "$apt_dir/lists";
Dir::State::status "$apt_dir/status";
Dir::Cache "$apt_dir/cache";
Dir::Cache::archives "$apt_dir/debs";
APT::Architecture "amd64";
#clear APT::Architectures;
APT::Architectures { "amd64"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled "false";
Acquire::IndexTargets::deb::CNF::DefaultEnabled "false";
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear DPkg::Pre-Install-Pkgs;
EOF
papt() { apt-get -c "$apt_dir/apt.conf" "$@"; }

log "apt-get update (private lists in $apt_dir/lists)"
if ! papt update -q >"$apt_dir/update.log" 2>&1; then
    tail -n 20 "$apt_dir/update.log" >&2
    die "apt-get update of $base/$suite from $mirror failed (log: $apt_dir/update.log). Is the mirror reachable, and does $keyring hold the Debian 13 keys (apt-get install debian-archive-keyring)?"
fi

# --- the dependency closure ---------------------------------------------------------------------
# With an empty dpkg status, apt resolves everything the packages need, libc6 included. The
# simulation names every package, also those already in the cache (which --print-uris skips);
# "Inst libc6 (2.41-12 Debian:13.x/stable [amd64]) []" is cached as libc6_2.41-12_amd64.deb (an
# epoch's ':' as %3a).
resolve() {
    papt install -s "$@" 2>"$apt_dir/resolve.log" \
        | awk '$1 == "Inst" { a = ""
                              for (i = 4; i <= NF; i++) if ($i ~ /^\[[a-z0-9]+\]/) { a = $i; break }
                              gsub(/[^a-z0-9]/, "", a); v = $3; sub(/^\(/, "", v)
                              gsub(/:/, "%3a", v); print $2 "_" v "_" a ".deb" }'
}
debs_txt="$(resolve "${packages[@]}")" || true
if [ -z "$debs_txt" ]; then
    log "cannot resolve ${packages[*]} (see $apt_dir/resolve.log); retrying without qemu-utils"
    packages=(qemu-system-x86)
    debs_txt="$(resolve "${packages[@]}")" || true
    [ -n "$debs_txt" ] || { cat "$apt_dir/resolve.log" >&2; die "cannot resolve qemu-system-x86 from $suite"; }
fi
mapfile -t debs <<<"$debs_txt"
[ "${#debs[@]}" -gt 0 ] || die "apt resolved no packages for ${packages[*]}"
printf '%s\n' "${debs[@]}" | grep -q '^qemu-system-x86_' || die "qemu-system-x86 is not in the resolved set"
qver="$(printf '%s\n' "${debs[@]}" | sed -n 's/^qemu-system-x86_\([^_]*\)_.*/\1/p' | sed 's/%3a/:/')"
case "$qver" in
    *:1[1-9].*|1[1-9].*) ;;
    *) die "$suite offers qemu-system-x86 $qver; COLO needs QEMU 11 or newer" ;;
esac
log "qemu-system-x86 $qver: ${#debs[@]} packages"

log "downloading into $apt_dir/debs (cached debs are reused)"
if ! papt install -q -y --download-only "${packages[@]}" >"$apt_dir/download.log" 2>&1; then
    tail -n 20 "$apt_dir/download.log" >&2
    die "downloading the packages failed (log: $apt_dir/download.log)"
fi
for d in "${debs[@]}"; do
    [ -f "$apt_dir/debs/$d" ] || die "$d missing from $apt_dir/debs after the download"
done

# --- unpack -------------------------------------------------------------------------------------
new="$root.new"
rm -rf "$new"
mkdir -p "$new"
for d in "${debs[@]}"; do
    dpkg-deb -x "$apt_dir/debs/$d" "$new" || die "dpkg-deb -x $d failed"
done
# Absolute symlinks inside the packages point at the system's /; point them into the prefix.
while IFS= read -r -d '' l; do
    t="$(readlink "$l")"
    ln -sfn "$root$t" "$l"
done < <(find "$new" -type l -lname '/*' -print0)
ld_so="usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -e "$new/$ld_so" ] || die "no $ld_so in the unpacked libc6"
[ -x "$new/usr/bin/qemu-system-x86_64" ] || die "no usr/bin/qemu-system-x86_64 unpacked"
rm -rf "$root.old"
if [ -d "$root" ]; then mv "$root" "$root.old"; fi
mv "$new" "$root"
rm -rf "$root.old"

# --- wrappers -----------------------------------------------------------------------------------
fw=()
for d in usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu; do
    if [ -d "$root/$d" ]; then fw+=(-L "\"\$R/$d\""); fi
done
write_wrapper() {
    local name="$1" extra="$2"
    cat >"$bin/$name.tmp" <<EOF
#!/bin/sh
# Generated by colo-blk's qemu-scripts/install-colo-qemu.sh: runs $name $qver from
# $root through its own dynamic loader and libraries (trixie's libc), so it works on Debian 12.
R='$root'
export QEMU_MODULE_DIR="\$R/usr/lib/x86_64-linux-gnu/qemu"
exec "\$R/$ld_so" --argv0 "\$0" \\
    --library-path "\$R/usr/lib/x86_64-linux-gnu:\$R/lib/x86_64-linux-gnu" \\
    "\$R/usr/bin/$name" $extra "\$@"
EOF
    chmod 755 "$bin/$name.tmp"
    mv "$bin/$name.tmp" "$bin/$name"
}
write_wrapper qemu-system-x86_64 "${fw[*]}"
if [ -x "$root/usr/bin/qemu-img" ]; then
    write_wrapper qemu-img ""
else
    rm -f "$bin/qemu-img"
fi

v="$("$bin/qemu-system-x86_64" --version 2>&1 | head -n1)" \
    || die "the installed wrapper does not run: $v"
case "$v" in
    "QEMU emulator version "*) ;;
    *) die "the installed wrapper does not run: $v" ;;
esac
"$bin/qemu-system-x86_64" -machine help 2>&1 | grep -q '^q35 ' \
    || die "$bin/qemu-system-x86_64 -machine help lists no q35"
if [ -x "$bin/qemu-img" ]; then "$bin/qemu-img" --version >/dev/null || die "$bin/qemu-img does not run"; fi
printf '%s\n%s\n' "$recipe" "$qver" >"$prefix/stamp"
log "installed: $bin/qemu-system-x86_64$([ -x "$bin/qemu-img" ] && echo " and $bin/qemu-img")"
log "use it with: export COLO_QEMU=$bin/qemu-system-x86_64"
echo "$v"
