#!/usr/bin/env bash
# Builds (or finds in the cache) the Linux guest kit and prints the kit's directory.
#
#   resources/linux-kit/build.sh stock
#
# "stock": Debian's own cloud kernel, unmodified — the package that linux-image-cloud-amd64
# depends on, fetched with apt-get download and unpacked with dpkg-deb:
#   vmlinuz   the bzImage as Debian ships it
#   vmlinux   the ELF kernel inside it (its LZ4 payload, decompressed), which boots much faster
#             under emulation because the decompressor does not run in the guest
#   config    the kernel's config, for reference
#
# The kit lives in $STRATA_KIT_CACHE (default ~/.cache/strata/kit), in a folder keyed by the
# package name and version and by this script's hash, so a machine that already built it (a
# CI machine running the suite again) reuses it, and any change to either rebuilds it.
# Needs root (or a working sudo) only to install the lz4 tool when it is missing.
set -euo pipefail

what=${1:-stock}
[ "$what" = stock ] || { echo "usage: $0 stock" >&2; exit 2; }

cache=${STRATA_KIT_CACHE:-${HOME:-/root}/.cache/strata/kit}
self_hash=$(sha256sum "$0" | cut -c1-12)

log() { echo "linux-kit: $*" >&2; }

find_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

pkg=$(find_package || true)
if [ -z "$pkg" ]; then
    log "apt lists are empty or stale: running apt-get update"
    apt-get update -qq >&2
    pkg=$(find_package)
fi
[ -n "$pkg" ] || { log "cannot find the package linux-image-cloud-amd64 depends on"; exit 1; }
version=$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
out="$cache/stock-$pkg-$version-$self_hash"

if [ -f "$out/.complete" ]; then
    echo "$out"
    exit 0
fi

if ! command -v lz4 >/dev/null; then
    log "installing lz4 (to unpack the vmlinux inside the bzImage)"
    apt-get install -y -qq lz4 >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "fetching $pkg $version"
(cd "$work" && apt-get download "$pkg=$version" >&2 2>/dev/null || apt-get download "$pkg" >&2)
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/x"

mkdir -p "$out.tmp"
cp "$work/x/boot/vmlinuz-"* "$out.tmp/vmlinuz"
cp "$work/x/boot/config-"* "$out.tmp/config"
# The bzImage's payload is a legacy-LZ4 stream (magic 02 21 4c 18) followed by padding.
offset=$(python3 - "$out.tmp/vmlinuz" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
i = data.find(bytes([0x02, 0x21, 0x4C, 0x18]))
if i < 0:
    sys.exit("no LZ4 payload in the bzImage")
print(i)
PY
)
tail -c +"$((offset + 1))" "$out.tmp/vmlinuz" | lz4 -dc > "$out.tmp/vmlinux" 2>/dev/null || true
head -c 4 "$out.tmp/vmlinux" | grep -q $'\x7fELF' || { log "the unpacked vmlinux is not an ELF file"; exit 1; }
touch "$out.tmp/.complete"
rm -rf "$out"
mv "$out.tmp" "$out"
log "kit ready in $out"
echo "$out"
