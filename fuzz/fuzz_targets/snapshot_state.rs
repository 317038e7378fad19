//! libFuzzer entry for the `snapshot_state` target: the body is [`strata_fuzz::targets::snapshot_state::run`],
//! shared with the smoke test and the random driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_fuzz::targets::snapshot_state::run(data);
});
