//! libFuzzer entry for the `agent_protocol` target: the body is [`strata_fuzz::targets::agent_protocol::run`],
//! shared with the smoke test and the random driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_fuzz::targets::agent_protocol::run(data);
});
