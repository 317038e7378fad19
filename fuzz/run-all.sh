#!/usr/bin/env bash
# Runs every libFuzzer target (built by build-libfuzzer.sh) for SECONDS each (default 600), one
# after another, restarting a target after each finding until its time is used up. Logs go to
# fuzz/artifacts/logs/, one line per run to fuzz/artifacts/summary (executions, libFuzzer's
# last status line with its coverage); findings to fuzz/artifacts/<target>/.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
mkdir -p fuzz/artifacts/logs
summary=fuzz/artifacts/summary
for f in fuzz/fuzz_targets/*.rs; do
  t=$(basename "$f" .rs)
  start=$(date +%s)
  n=0
  echo "START $t $(date -u +%FT%TZ)" >> "$summary"
  while :; do
    left=$(( seconds - ($(date +%s) - start) ))
    [ "$left" -le 5 ] && break
    n=$((n + 1))
    log="fuzz/artifacts/logs/$t.$n.log"
    fuzz/run-libfuzzer.sh "$t" "$left" > "$log" 2>&1
    rc=$?
    execs=$(grep -o 'number_of_executed_units: [0-9]*' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 | cut -c1-90)
    echo "  run $n exit $rc, $execs; $last" >> "$summary"
    [ "$rc" -eq 0 ] && break
  done
  echo "END $t $(date -u +%FT%TZ)" >> "$summary"
done
