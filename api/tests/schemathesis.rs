//! Schemathesis (from PyPI) against `openapi.yaml` and the live server with a handler that
//! answers fixed replies (`common::recorder`): no 500, no answer that breaks the schema, every
//! check of `--checks all`.
//!
//! Installing schemathesis and the TCP→Unix proxy it needs live in `strata_tests::schemathesis`,
//! shared with the end-to-end run against the real VMM; when PyPI is unreachable the test fails
//! with the reason, it does not skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::recorder::Recorder;

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let recorder = Recorder::start(&sock);

    let output = strata_tests::schemathesis::run(&sock, 100, dir.path());

    assert!(
        output.status.success(),
        "schemathesis found problems (exit {:?})",
        output.status.code()
    );
    assert!(
        recorder.count() > 0,
        "schemathesis never reached the handler"
    );
}
