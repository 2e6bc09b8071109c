//! The interface between the filesystem and replication.

use std::fmt;
use std::sync::Arc;

use crate::mutation::{FileId, Mutation, Outcome};

/// Why a replicator could not complete a mutation. The application's call fails; the local apply
/// is *not* undone (see the crate documentation, "Failures").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// Replication failed; the application gets `EIO`.
    #[error("replication failed: {0}")]
    Failed(String),
    /// Fail the application's call with this errno (for example `EROFS` when the node was fenced
    /// while the operation was in flight, or `ENOSPC` from the peer).
    #[error("replication failed with errno {0}")]
    Errno(i32),
    /// The [`Completion`] was dropped without being completed (a bug in the replicator, or its
    /// shutdown); the application gets `EIO`.
    #[error("completion dropped without a result")]
    Dropped,
}

impl ReplicationError {
    /// The errno the application's call fails with.
    pub fn errno(&self) -> i32 {
        match self {
            ReplicationError::Errno(e) if *e > 0 => *e,
            _ => libc::EIO,
        }
    }
}

/// Receives the remote result of one mutation. Implemented by the filesystem's pending-reply
/// record; replicators only see it through [`Completion`].
pub(crate) trait RemoteDone: Send + Sync {
    fn remote_done(&self, result: Result<(), ReplicationError>);
}

/// The handle a replicator completes once a mutation is safe on the peer (applied, or durable for
/// [`crate::Op::Fsync`] and `O_SYNC`/`O_DSYNC` writes), or failed.
///
/// `Send + 'static`: it may be completed from any thread, at any later time. The kernel's reply to
/// the application is sent when both this completion and the local apply are done, by whichever
/// finishes last. Dropping it without calling [`Completion::complete`] completes it with
/// [`ReplicationError::Dropped`], so an application never hangs on a lost completion.
#[must_use = "a mutation's reply waits for its completion"]
pub struct Completion {
    target: Option<Arc<dyn RemoteDone>>,
}

impl Completion {
    pub(crate) fn new(target: Arc<dyn RemoteDone>) -> Completion {
        Completion {
            target: Some(target),
        }
    }

    /// A completion that goes nowhere, for tests of replicators.
    pub fn detached() -> Completion {
        Completion { target: None }
    }

    /// Reports the result of replicating the mutation. Call it exactly once (it consumes `self`).
    pub fn complete(mut self, result: Result<(), ReplicationError>) {
        if let Some(target) = self.target.take() {
            target.remote_done(result);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            target.remote_done(Err(ReplicationError::Dropped));
        }
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("pending", &self.target.is_some())
            .finish()
    }
}

/// Replication of mutations to the peer.
///
/// For every mutating operation the filesystem calls, in this order:
/// 1. [`Replicator::submit`], with the ordering locks held (see [`Mutation::seq`]);
/// 2. the local apply (in parallel with the replicator's work);
/// 3. [`Replicator::applied`] with the local result;
///
/// and replies to the kernel when the local apply is done *and* the [`Completion`] given to
/// `submit` was completed.
pub trait Replicator: Send + Sync + 'static {
    /// Starts replicating `mutation` and completes `done` when it is safe on the peer.
    ///
    /// Called on a FUSE worker thread with ordering locks held: it must not block on the network
    /// or on another mutation's completion (queue the work and return). It must copy what it needs
    /// from `mutation` (the data is borrowed from the kernel's request buffer). It may call
    /// `done.complete(..)` before returning (a replicator with nothing to do) or later from any
    /// thread. Mutations with `replicate == false` are excluded paths: complete them at once.
    fn submit(&self, mutation: &Mutation<'_>, done: Completion);

    /// The local result of mutation `seq`, after its local apply (on the same FUSE thread, ordering
    /// locks released except for fsync). Default: ignored.
    fn applied(&self, seq: u64, outcome: &Outcome) {
        let _ = (seq, outcome);
    }

    /// The mount dropped its last reference to the backing inode `id` (the kernel forgot it):
    /// no mutation submitted after this call names `id` for that inode, and the inode number may
    /// be reused by a new file from now on. Lets the peer drop its handle of the file (its table
    /// stays bounded). Called on a FUSE worker thread, without ordering locks; must not block.
    /// Default: ignored.
    fn forget(&self, id: FileId) {
        let _ = id;
    }
}

/// The replicator of a node without a peer: completes every mutation at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalOnly;

impl Replicator for LocalOnly {
    fn submit(&self, _mutation: &Mutation<'_>, done: Completion) {
        done.complete(Ok(()));
    }
}
