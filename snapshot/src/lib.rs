//! The checkpoint store: the on-disk layout of checkpoints, their manifests, the versioned and
//! checksummed state format, the memory file and the checkpoint tree.
//!
//! This crate knows nothing of KVM; the `vmm` crate gathers the state and hands it here. It
//! also defines the save/restore trait every device, vCPU and the VM implement ([`Persist`]).
//! The store itself is filled in by the checkpoint issues.

pub mod persist;

pub use persist::{check, Persist, StateError};
