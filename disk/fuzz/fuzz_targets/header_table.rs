//! Fuzzes the layer header, L1-table and extended L2-table parsers with arbitrary bytes: they must never
//! panic, and whatever they accept must re-encode to the same meaning. The body is
//! `disk::fuzzing::header_table`, shared with the smoke test in `tests/smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    disk::fuzzing::header_table(data);
});
