//! tandem-replica: the replication stream of tandem-fs mutations and the secondary's side.
//!
//! See `docs/replication.md` for the design. This crate holds:
//! - [`wire`]: the frame format of every [`tandem_fs::Mutation`], of the primary's local outcome
//!   (the attribute follow-up), of `Forget` and of acknowledgements; compact little-endian
//!   fields, write data as the raw rest of the frame, strict decoding;
//! - [`Applier`]: applies decoded mutations to the secondary's backing directory through its own
//!   handle (`*at` calls, no symlink followed), keeps the table primary identity -> local file,
//!   copies the primary's times, and reports [`Divergence`]s;
//! - [`LoopbackReplicator`]: a [`tandem_fs::Replicator`] that sends every mutation through the
//!   wire format to an [`Applier`] on another directory of the same machine (tests, benchmarks).

#![warn(missing_docs)]

mod applier;
mod loopback;
mod sys;
pub mod wire;

pub use applier::{Applier, Divergence};
pub use loopback::{LoopbackReplicator, LoopbackStats};
pub use wire::{Record, WireError};
