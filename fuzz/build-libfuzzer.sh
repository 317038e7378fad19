#!/usr/bin/env bash
# Builds the coverage-guided libFuzzer binaries of every target on the stable toolchain:
# LLVM's sanitizer-coverage pass (`-C passes=sancov-module`, a stable codegen option) with the
# instrumentation libFuzzer reads (8-bit counters, PC table, comparison tracing). `--target`
# keeps the flags off build scripts and proc macros. The binaries land in
# target/fuzz-stable/x86_64-unknown-linux-gnu/release/<target>.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# Every fuzz_targets/<name>.rs (not fuzz-random, which has no libFuzzer to link against).
bins=()
for f in fuzz/fuzz_targets/*.rs; do bins+=(--bin "$(basename "$f" .rs)"); done
exec cargo build --release -p strata-fuzz --features libfuzzer "${bins[@]}" \
  --target x86_64-unknown-linux-gnu --target-dir target/fuzz-stable "$@"
