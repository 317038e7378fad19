//! libFuzzer entry for the `api_request` target: the body is [`strata_fuzz::targets::api_request::run`],
//! shared with the smoke test and the random driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_fuzz::targets::api_request::run(data);
});
