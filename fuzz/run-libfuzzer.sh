#!/usr/bin/env bash
# Runs one target's libFuzzer binary (built by build-libfuzzer.sh) for SECONDS (default 600),
# at the lowest CPU priority, keeping its corpus in fuzz/corpus/TARGET and what it finds in
# fuzz/artifacts/TARGET/. Extra arguments go to libFuzzer (e.g. -jobs=2, -seed=1).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: fuzz/run-libfuzzer.sh TARGET [SECONDS] [libFuzzer args...]}"
seconds="${2:-600}"
shift $(( $# >= 2 ? 2 : 1 ))
bin="target/fuzz-stable/x86_64-unknown-linux-gnu/release/$target"
[ -x "$bin" ] || { echo "no $bin: run fuzz/build-libfuzzer.sh first" >&2; exit 2; }
mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
# Seeds (fuzz/seeds/TARGET, checked in) are read as a second corpus; new inputs go to the first.
seeds=()
[ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
exec nice -n 19 "$bin" "fuzz/corpus/$target" "${seeds[@]}" \
  -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
  -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 "$@"
