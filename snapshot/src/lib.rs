//! The checkpoint store: the on-disk layout of checkpoints, their manifests, the versioned and
//! checksummed state format, the memory file and the checkpoint tree.
//!
//! This crate knows nothing of KVM; the `vmm` crate gathers the state and hands it here. It
//! also defines the save/restore trait every device, vCPU and the VM implement ([`Persist`]).
//!
//! What this crate owns, and `FORMAT.md` (beside `Cargo.toml`) specifies byte by byte:
//! - [`state`]: the state file (magic, version, length, JSON payload, CRC-64), written
//!   atomically and verified on load with a size cap;
//! - the error type [`Error`], whose every variant names the file it is about.
//!
//! Every failure on a file is an [`Error`] naming the file, never a panic.

pub mod error;
pub mod fsutil;
pub mod manifest;
pub mod memory;
pub mod persist;
pub mod state;
pub mod store;

pub use error::{Error, Result};
pub use persist::{check, Persist, StateError};
