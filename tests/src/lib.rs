//! End-to-end tests of Strata: each test starts the `strata` binary, boots the test guest
//! under KVM and drives it through its serial console. This library holds the harness.
