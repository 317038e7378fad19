//! The checkpoint store: the on-disk layout of checkpoints, their manifests, the versioned and
//! checksummed state format, the memory file and the checkpoint tree.
//!
//! This crate knows nothing of KVM; the `vmm` crate gathers the state and hands it here. It
//! also defines the save/restore trait every device, vCPU and the VM implement ([`Persist`]).
//!
//! What this crate owns, and `FORMAT.md` (beside `Cargo.toml`) specifies byte by byte:
//! - [`state`]: the state file (magic, version, length, JSON payload, CRC-64), written
//!   atomically and verified on load with a size cap;
//! - [`memory`]: the memory file, sparse (zero pages are holes) and laid out region by region
//!   at 2 MiB-aligned offsets so a restore maps it copy-on-write; the writer takes guest memory
//!   as `(guest address, host slice)` regions, so this crate needs no vm-memory;
//! - [`manifest`]: `manifest.json`, what a checkpoint is and which files make it up;
//! - [`store`]: the location's layout, the commit protocol (a checkpoint appears by one rename
//!   of its finished temporary folder), recovery on open (leftovers removed, a committed but
//!   unrecorded checkpoint adopted), listing as a tree, and the store check;
//! - the error type [`Error`], whose every variant names the file it is about.
//!
//! Not here: gathering the state (the `vmm` crate), disk layers' format (the `disk` crate; the
//! store only names and records layer files), deleting and exporting checkpoints (later).
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
pub use manifest::{CheckpointType, Consistency, DiskRecord, Manifest, StorePath};
pub use memory::{GuestRegion, MemoryFile, MemoryRecord, MmapRegion, WriteOptions};
pub use persist::{check, Persist, StateError};
pub use store::{CheckReport, CommitInfo, OpenReport, PendingCheckpoint, Store, TreeNode};
