#!/bin/sh
# Builds the guest agent as a static x86_64 Linux binary (glibc, +crt-static) into OUTDIR and
# prints the binary's path on stdout (cargo's progress goes to stderr).
#
#   resources/guest-agent/build-static.sh OUTDIR
#
# The explicit --target keeps +crt-static off build scripts and proc macros (which must stay
# dynamic); CARGO_TARGET_DIR and other cargo settings are honoured. Fails unless `file` (or,
# without it, the absence of a PT_INTERP segment) shows a statically linked executable.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
outdir=$1
target=x86_64-unknown-linux-gnu
here=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$outdir"
# cargo prints one JSON message per artifact; the agent's carries its executable's path.
# Debug info stripped (symbols kept): ~1 MB instead of ~10 MB for the guest image.
json=$(cd "$here" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_STRIP="${CARGO_PROFILE_RELEASE_STRIP:-debuginfo}" \
    cargo build -p strata-guest-agent --release --target "$target" \
    --message-format=json-render-diagnostics)
built=$(printf '%s\n' "$json" \
    | grep '"executable":"[^"]*/strata-guest-agent"' \
    | sed 's/.*"executable":"\([^"]*\)".*/\1/' | tail -n 1)
if [ -z "$built" ] || [ ! -x "$built" ]; then
    echo "$0: cargo did not report the strata-guest-agent executable" >&2
    exit 1
fi

out="$outdir/strata-guest-agent"
cp "$built" "$out.tmp"
mv "$out.tmp" "$out"

if command -v file >/dev/null 2>&1; then
    kind=$(file -b "$out")
    case $kind in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) echo "$0: $out is not static: $kind" >&2; exit 1 ;;
    esac
elif command -v readelf >/dev/null 2>&1; then
    if readelf -l "$out" | grep -q INTERP; then
        echo "$0: $out has a program interpreter: not static" >&2
        exit 1
    fi
fi
abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
echo "$abs"
