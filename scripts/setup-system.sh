#!/usr/bin/env bash
# Idempotent system set-up for pytest-memleak-ebpf on Debian/Ubuntu (run as root).
# Installs: the distro's BCC (python3-bpfcc), kernel headers for the running kernel,
# bpftool, valgrind (the tests' oracle), a C toolchain; mounts tracefs if missing.
set -euo pipefail
log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (eBPF needs CAP_BPF/CAP_SYS_ADMIN and apt needs root)"; exit 1
fi
KREL="$(uname -r)"
need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for p in python3-bpfcc bpftool valgrind gcc g++ make libc6-dev libc6-dbg sqlite3 xz-utils jq gdb procps; do
    have_pkg "$p" || need+=("$p")
done
headers_ok() { [ -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] || [ -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ]; }
updated=0
apt_update() { if [ $updated = 0 ]; then log "apt-get update"; apt-get update -qq; updated=1; fi; }
if ! headers_ok; then
    apt_update
    if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
        need+=("linux-headers-$KREL")
    else
        need+=("linux-headers-amd64")
    fi
fi
if [ ${#need[@]} -gt 0 ]; then
    apt_update
    log "installing: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! headers_ok; then
    # No exact header package for this kernel: link the distro's newest generic headers.
    hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
    if [ -z "$hdr" ]; then log "no kernel headers found under /usr/src"; exit 1; fi
    common="${hdr%-amd64}-common"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$KREL/source"
    log "linked /lib/modules/$KREL/build -> $hdr"
fi
if [ ! -e /sys/kernel/tracing/uprobe_events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
if [ ! -e /sys/kernel/debug/tracing/uprobe_events ] && [ -d /sys/kernel/debug ]; then
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
fi
log "system ready (kernel $KREL)"
