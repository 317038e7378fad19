//! Helpers of the API's integration tests: a handler that records calls and answers fixed
//! replies ([`recorder`]), and a raw HTTP/1.1 client that sends exactly the bytes a test wants
//! (malformed bodies, wrong methods) without going through `api::Client`.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod http;
pub mod recorder;

pub use http::*;
