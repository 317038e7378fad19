//! The Strata differencing-disk format and everything on it: opening a chain, reads and writes
//! with copy-on-write, flush, layer creation, merge, convert, check/repair and changed-block maps.
//!
//! This crate knows nothing of KVM or virtio. It is filled in by the disk issue.
