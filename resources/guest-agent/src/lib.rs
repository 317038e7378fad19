//! The Strata guest agent's wire protocol, shared by the agent (this package's
//! `strata-guest-agent` binary) and the host client (`vmm::agent`).
//!
//! The test guest (`resources/test-guest`) is `no_std` and built without Cargo, so it speaks the
//! same protocol with its own small JSON code; the tests in [`protocol`] parse the replies its
//! README documents with these types, so the two cannot drift apart silently.

pub mod protocol;
