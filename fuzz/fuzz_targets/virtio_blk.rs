//! libFuzzer entry for the `virtio_blk` target: the body is [`strata_fuzz::targets::virtio_blk::run`],
//! shared with the smoke test and the random driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_fuzz::targets::virtio_blk::run(data);
});
