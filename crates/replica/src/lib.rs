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
//!   wire format to an [`Applier`] on another directory of the same machine (tests, benchmarks);
//! - [`NetReplicator`] and [`Receiver`]: the replication stream between two processes over TCP
//!   ([`transport`]: Noise keyed by the cluster secret, or plaintext on a dedicated link), with
//!   the replication timeout and the hold / record-locally / fail states of a lost secondary;
//!   both take over an established [`Connection`] (either side may have dialed; in the daemon
//!   the secondary dials and asks for a synchronisation) and start at any `seq`;
//! - [`fullsync`]: the full synchronisation that precedes the replication stream on the same
//!   connection: the primary's whole tree (entries, data without holes, hard links, xattrs and
//!   ACLs, owners, modes, times) replaces the secondary's contents.

#![warn(missing_docs)]

mod applier;
pub mod fullsync;
mod loopback;
mod net_replicator;
mod receiver;
mod sequencer;
mod sys;
pub mod transport;
pub mod wire;

pub use applier::{Applier, Divergence};
pub use fullsync::{SyncError, SyncProgress, SyncStats, receive_tree, send_tree};
pub use loopback::{LoopbackReplicator, LoopbackStats};
pub use net_replicator::{
    DEFAULT_QUEUE, DEFAULT_TIMEOUT, Lost, NetOptions, NetReplicator, NetStats, ReplicationState,
};
pub use receiver::{Receiver, ReceiverReport, ReceiverStats};
pub use transport::{Connection, MAGIC, Security, TransportError};
pub use wire::{Record, WireError};

/// Locks `m`, taking over a lock poisoned by a panicking thread: every critical section of this
/// crate leaves its data consistent at each step (entries moved between maps, counters, queues).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
