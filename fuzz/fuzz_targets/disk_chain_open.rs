//! libFuzzer entry for the `disk_chain_open` target: the body is [`strata_fuzz::targets::disk_chain_open::run`],
//! shared with the smoke test and the random driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_fuzz::targets::disk_chain_open::run(data);
});
