//! libFuzzer entry for the `vsock_packets` target: the body is [`strata_fuzz::targets::vsock_packets::run`],
//! shared with the smoke test and the random driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_fuzz::targets::vsock_packets::run(data);
});
