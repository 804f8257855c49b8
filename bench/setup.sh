#!/usr/bin/env bash
# Packages needed only by the benchmarks (run as root; idempotent).
#   bpfcc-tools  BCC's memleak tool (memleak-bpfcc), the comparison point in the churn benchmark
#   gcc          compiles bench/churn.c and bench/outstanding.c
#   valgrind, sqlite3, xz-utils, coreutils  the other comparison points / real programs
set -euo pipefail
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
need=()
for p in bpfcc-tools gcc libc6-dev valgrind sqlite3 xz-utils coreutils; do
    have_pkg "$p" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then echo "bench/setup.sh: need root to install ${need[*]}" >&2; exit 1; fi
    echo "bench/setup.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
