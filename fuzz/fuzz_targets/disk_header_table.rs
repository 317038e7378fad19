//! libFuzzer entry for the `disk_header_table` target: the body is [`strata_fuzz::targets::disk_header_table::run`],
//! shared with the smoke test and the random driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_fuzz::targets::disk_header_table::run(data);
});
