//! The Strata differencing-disk format and everything on it: opening a chain, reads and writes
//! with copy-on-write, flush, layer creation, merge, convert, check/repair and changed-cluster
//! maps. This crate knows nothing of KVM or virtio; it is tested on temporary files.
//!
//! - [`format`](mod@format): the bytes of a layer file (header, L1 entries, extended L2 entries); `FORMAT.md`
//!   beside `Cargo.toml` is the normative description, including the crash-consistency and
//!   merge protocols.
//! - [`Chain`]: an open chain (a raw base or a layer under any number of layers), the object a
//!   virtio-blk device holds. It is `Send`; reads take `&self`, writes `&mut self`; all I/O is
//!   positional (`pread`/`pwrite`). Its metadata is read on demand into bounded caches
//!   ([`CacheLimits`]); [`Chain::push_layer`] puts a new layer on it while open.
//! - [`create_empty`], [`create_layer`], [`merge()`], [`convert`], [`check`], [`info`],
//!   [`map`], [`changed_clusters`]: the operations behind `strata disk`, whose command-line
//!   front end is [`cli`].
//!
//! Testing: every randomised test (the proptests, the crash tests, the fuzz smoke test) prints
//! `seed = N (replay with STRATA_TEST_SEED=N)` when it fails, and setting `STRATA_TEST_SEED`
//! replays that seed (`tests/common/mod.rs`). `disk::fuzzing` (hidden) holds the fuzz targets'
//! entry points, shared with a smoke test that runs on the stable toolchain (`fuzz/README.md`).
//!
//! Choices where the design is silent: a file is a Strata layer if it starts with the magic
//! `STRATADK` or its name ends in `.strata` (so a layer with a damaged magic is reported, not
//! mistaken for a raw image); anything else is a raw image. Parents are recorded by their path
//! relative to the child's directory when they are in it or below (the bare file name when
//! both share a directory), otherwise by absolute path; and a parent outside the child's
//! directory opens only when the caller allows it ([`ParentPolicy`], [`parent`]).

pub mod chain;
pub mod cli;
#[doc(hidden)]
pub mod crafted;
mod error;
#[doc(hidden)]
pub mod file;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
mod layer;
pub mod merge;
pub mod ops;
pub mod parent;
mod progress;
mod sys;
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod test_seed;

pub use chain::{
    create_empty, create_layer, create_layer_unsynced, create_layer_with, CacheLimits, Chain,
    CreateOptions, OpenOptions, Source,
};
pub use error::{error_chain, DiskError, Result};
pub use file::sync_created;
pub use layer::Format;
pub use merge::{merge, MergeDirection, MergeProgress};
pub use ops::{
    changed_clusters, check, convert, info, map, ChainInfo, ChangeMap, CheckReport, MapRange,
};
pub use parent::ParentPolicy;
