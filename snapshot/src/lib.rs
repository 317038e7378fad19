//! The checkpoint store: the on-disk layout of checkpoints, their manifests, the versioned and
//! checksummed state format, the memory file and the checkpoint tree.
//!
//! This crate knows nothing of KVM; the `vmm` crate gathers the state and hands it here. It is
//! filled in by the checkpoint issues.
