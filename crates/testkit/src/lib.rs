//! tandem-testkit: the test support shared by the replication tests (dev-dependency only).
//!
//! - [`sys`]: thin wrappers of the system calls the tests make (xattrs, `utimensat`, `mknod`,
//!   `renameat2`, `fallocate`...);
//! - [`ops`]: the fsx-style random operations: a seedable [`Rng`], the initial tree
//!   ([`populate`]), one [`random_op`] in one of two [`Mix`]es, their [`Counts`];
//! - [`snapshot`](mod@snapshot): what is compared about a tree ([`Snapshot`], [`Entry`]) and the
//!   [`differences`] between two trees.
//!
//! The helpers panic on unexpected failures (they run inside tests, where a panic is the report)
//! unless they return an `io::Result`.

// Test support: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

pub mod ops;
pub mod snapshot;
pub mod sys;

pub use ops::*;
pub use snapshot::*;
pub use sys::*;
