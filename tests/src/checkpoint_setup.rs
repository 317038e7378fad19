//! Shared set-up of the checkpoint end-to-end tests (`tests/tests/checkpoint*.rs`,
//! `production.rs`).
