#!/usr/bin/env bash
# Idempotent system set-up for pytest-memleak-ebpf on Debian 12/13 and Ubuntu 22.04/24.04
# (run as root). Installs: the distro's BCC (python3-bpfcc), kernel headers for the running
# kernel, bpftool, valgrind (the tests' oracle), a C toolchain; mounts tracefs if missing.
#
# Package names differ: bpftool is a package of its own on Debian 12 and 13; on Ubuntu 22.04
# and 24.04 "bpftool" is only a virtual package, the tool comes with linux-tools-common (a
# wrapper) and linux-tools-$(uname -r) (the binary). A kernel without a headers package of its
# own gets the distribution's generic headers (linux-headers-<arch> on Debian,
# linux-headers-generic on Ubuntu) linked to /lib/modules/$(uname -r)/build; a kernel without
# linux-tools-$(uname -r) on Ubuntu gets linux-tools-generic's bpftool linked to /usr/local/sbin.
#
# SETUP_DRY_RUN=1 prints what would be installed and linked, and changes nothing.
# SETUP_OS_RELEASE names the os-release file to read (default /etc/os-release).
set -euo pipefail
log() { printf 'setup: %s\n' "$*" >&2; }
DRY="${SETUP_DRY_RUN:-0}"
run() { if [ "$DRY" = 1 ]; then log "would run: $*"; else "$@"; fi; }

if [ "$DRY" != 1 ] && [ "$(id -u)" != 0 ]; then
    log "must run as root (apt-get needs root, and so does mounting tracefs)"; exit 1
fi

OS_RELEASE="${SETUP_OS_RELEASE:-/etc/os-release}"
ID="" VERSION_ID="" ID_LIKE=""
# shellcheck disable=SC1090
[ -r "$OS_RELEASE" ] && . "$OS_RELEASE"
case "$ID" in
    debian|ubuntu) family="$ID" ;;
    *) case " $ID_LIKE " in
           *" ubuntu "*) family=ubuntu ;;
           *" debian "*) family=debian ;;
           *) log "unsupported distribution '${ID:-unknown}': this script knows Debian and Ubuntu"; exit 1 ;;
       esac ;;
esac
case "$ID:$VERSION_ID" in
    debian:12|debian:13|ubuntu:22.04|ubuntu:24.04) ;;
    *) log "untested distribution ${ID:-?} ${VERSION_ID:-?}: using the $family package names" ;;
esac

KREL="$(uname -r)"
ARCH="$(dpkg --print-architecture)"
need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep 'install ok installed' >/dev/null; }
updated=0
apt_update() { if [ $updated = 0 ]; then log "apt-get update"; run apt-get update -qq; updated=1; fi; }
# a real package (not only a virtual one) that apt can install
apt_has() { apt_update; apt-cache show "$1" 2>/dev/null | grep "^Package: $1\$" >/dev/null; }

# the allocators and libc the allocator tests build their fixtures with
for p in python3-bpfcc python3-venv valgrind gcc g++ make libc6-dev libc6-dbg sqlite3 xz-utils jq gdb procps \
         libjemalloc-dev libgoogle-perftools-dev libmimalloc-dev musl-tools; do
    have_pkg "$p" || need+=("$p")
done

# bpftool (only the tests use it)
link_tools=0
if bpftool version >/dev/null 2>&1; then
    :
elif [ "$family" = debian ] || apt_has bpftool; then
    need+=(bpftool)
else
    have_pkg linux-tools-common || need+=(linux-tools-common)
    if apt_has "linux-tools-$KREL"; then
        need+=("linux-tools-$KREL")
    else
        have_pkg linux-tools-generic || need+=(linux-tools-generic)
        link_tools=1
    fi
fi

# kernel headers
headers_ok() { [ -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] || [ -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ]; }
if [ "$family" = debian ]; then generic_headers="linux-headers-$ARCH" flavour="$ARCH"
else generic_headers=linux-headers-generic flavour=generic; fi
link_headers=0
if ! headers_ok; then
    if apt_has "linux-headers-$KREL"; then
        need+=("linux-headers-$KREL")
    else
        have_pkg "$generic_headers" || need+=("$generic_headers")
        link_headers=1
    fi
fi

if [ ${#need[@]} -gt 0 ]; then
    apt_update
    log "installing: ${need[*]}"
    if [ "$DRY" = 1 ]; then
        log "would run: apt-get install -y -qq --no-install-recommends ${need[*]}"
    else
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
fi

newest() { local f; for f in "$@"; do if [ -e "$f" ]; then printf '%s\n' "$f"; fi; done | sort -V | tail -1; }
if [ $link_headers = 1 ] && { [ "$DRY" = 1 ] || ! headers_ok; }; then
    # No header package for this kernel: link the distro's newest generic headers.
    if [ "$DRY" = 1 ]; then
        log "would link /lib/modules/$KREL/build -> the newest /usr/src/linux-headers-*-$flavour"
    else
        hdr="$(newest /usr/src/linux-headers-*-"$flavour")"
        if [ -z "$hdr" ]; then log "no kernel headers found under /usr/src"; exit 1; fi
        mkdir -p "/lib/modules/$KREL"
        ln -sfn "$hdr" "/lib/modules/$KREL/build"
        if [ "$family" = debian ]; then common="${hdr%-"$flavour"}-common"; else common="${hdr%-"$flavour"}"; fi
        [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$KREL/source"
        log "linked /lib/modules/$KREL/build -> $hdr"
    fi
fi
if [ $link_tools = 1 ]; then
    # No linux-tools package for this kernel: the wrapper in linux-tools-common finds no
    # bpftool for it, so put the generic kernel's on PATH.
    if [ "$DRY" = 1 ]; then
        log "would link /usr/local/sbin/bpftool -> the newest /usr/lib/linux-tools/*/bpftool"
    else
        tool="$(newest /usr/lib/linux-tools/*/bpftool)"
        if [ -n "$tool" ]; then ln -sfn "$tool" /usr/local/sbin/bpftool; log "linked /usr/local/sbin/bpftool -> $tool"; fi
    fi
fi

if [ ! -e /sys/kernel/tracing/uprobe_events ]; then
    run mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
if [ ! -e /sys/kernel/debug/tracing/uprobe_events ] && [ -d /sys/kernel/debug ]; then
    mountpoint -q /sys/kernel/debug || run mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
fi
log "system ready (${ID:-?} ${VERSION_ID:-?}, kernel $KREL)"
