//! Shared helpers of the Linux end-to-end tests (`tests/tests/linux*.rs`).
