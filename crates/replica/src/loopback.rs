//! [`LoopbackReplicator`]: replication to another directory of the same machine, through the
//! wire format, for tests and benchmarks.
//!
//! Every mutation is encoded to a frame on the FUSE thread ([`Replicator::submit`] copies the
//! data once, into the frame, and never blocks), decoded on a worker thread and applied there by
//! an [`Applier`] on the other directory; the [`Completion`] is completed after the apply (after
//! the `fsync`/`fdatasync` for [`tandem_fs::Op::Fsync`] and `O_SYNC`/`O_DSYNC` writes). The local
//! outcomes ([`Replicator::applied`]) and forgets travel as frames too.
//!
//! # Order
//!
//! The worker applies the records through the shared sequencer (reorder buffer by `seq`, `Forget`
//! barrier); see `sequencer.rs`.
//!
//! # Parallel apply (not done yet)
//!
//! One thread applies everything. The [`Applier`] is `Sync`, so the worker can become a
//! dispatcher: namespace operations as barriers, data operations hashed by target identity to a
//! few threads (in `seq` order per file), outcomes after their mutation.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tandem_fs::{Completion, FileId, Mutation, Op, Outcome, ReplicationError, Replicator};

use crate::applier::{Applier, Divergence};
use crate::sequencer::{Input, Sequencer, Target, remote_result};
use crate::wire::{self, Record};

enum Msg {
    /// An encoded mutation and its completion.
    Mutation {
        seq: u64,
        frame: Vec<u8>,
        done: Completion,
    },
    /// A `seq` with nothing to apply (excluded, or not encodable; already completed).
    Skip { seq: u64 },
    /// An encoded outcome or forget.
    Frame(Vec<u8>),
    /// Answer once everything received before is applied.
    Flush(mpsc::Sender<()>),
}

/// Counters of a [`LoopbackReplicator`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopbackStats {
    /// Mutations applied on the other directory.
    pub applied: u64,
    /// Of those, mutations that failed there (most also failed on the primary).
    pub failed: u64,
    /// Bytes of frames encoded.
    pub bytes: u64,
    /// Forgets processed.
    pub forgets: u64,
    /// Divergences found (see [`LoopbackReplicator::divergences`]).
    pub divergences: u64,
}

/// A [`Replicator`] that encodes each mutation, decodes it and applies it to another directory
/// on a worker thread. See the module documentation.
pub struct LoopbackReplicator {
    tx: Option<mpsc::Sender<Msg>>,
    shared: Arc<Target>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LoopbackReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackReplicator")
            .field("applier", &self.shared.applier)
            .finish()
    }
}

impl LoopbackReplicator {
    /// Starts the worker thread applying with `applier`. The mount's first mutation must be
    /// `seq` 1 (a fresh [`tandem_fs::Mount`]).
    pub fn new(applier: Applier) -> std::io::Result<LoopbackReplicator> {
        let shared = Arc::new(Target::new(applier));
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            sequencer: Sequencer::new(shared.clone()),
            target: shared.clone(),
            flushes: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("tandem-loopback".into())
            .spawn(move || worker.run(rx))?;
        Ok(LoopbackReplicator {
            tx: Some(tx),
            shared,
            worker: Some(handle),
        })
    }

    /// A loopback replicator applying to the directory `dir`.
    pub fn open(dir: &Path) -> std::io::Result<LoopbackReplicator> {
        LoopbackReplicator::new(Applier::open(dir)?)
    }

    /// The applier.
    pub fn applier(&self) -> &Applier {
        &self.shared.applier
    }

    /// Waits until every record sent before this call was applied (mutations, outcomes and
    /// forgets). Returns at once if the worker is gone.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.send(Msg::Flush(tx)) {
            let _ = rx.recv();
        }
    }

    /// The divergences found so far (results that differ between the primary and the copy).
    pub fn divergences(&self) -> Vec<Divergence> {
        self.shared.divergences()
    }

    /// Counters.
    pub fn stats(&self) -> LoopbackStats {
        let c = &self.shared.counters;
        LoopbackStats {
            applied: c.applied.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            forgets: c.forgets.load(Ordering::Relaxed),
            divergences: self.shared.divergence_count(),
        }
    }

    /// Queues a message for the worker; `false` if it is gone.
    fn send(&self, msg: Msg) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok())
    }

    fn send_record(&self, record: &Record<'_>) {
        match wire::to_frame(record) {
            Ok(frame) => {
                self.shared
                    .counters
                    .bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                self.send(Msg::Frame(frame));
            }
            Err(e) => tracing::warn!(error = %e, "loopback: record not encodable"),
        }
    }
}

impl Drop for LoopbackReplicator {
    fn drop(&mut self) {
        // Closing the channel ends the worker once it has applied everything queued.
        self.tx.take();
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

impl Replicator for LoopbackReplicator {
    fn submit(&self, mutation: &Mutation<'_>, done: Completion) {
        let seq = mutation.seq;
        if !mutation.replicate {
            done.complete(Ok(()));
            self.send(Msg::Skip { seq });
            return;
        }
        let extra = match &mutation.op {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        };
        let mut frame = Vec::with_capacity(256 + extra);
        match wire::encode_mutation(mutation, &mut frame) {
            Ok(()) => {
                self.shared
                    .counters
                    .bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                // If the worker is gone, the completion is dropped: the call fails with EIO.
                self.send(Msg::Mutation { seq, frame, done });
            }
            Err(e) => {
                done.complete(Err(ReplicationError::Failed(format!(
                    "mutation {seq} not encodable: {e}"
                ))));
                self.send(Msg::Skip { seq });
            }
        }
    }

    fn applied(&self, seq: u64, outcome: &Outcome) {
        self.send_record(&Record::Applied {
            seq,
            outcome: outcome.clone(),
        });
    }

    fn forget(&self, id: FileId) {
        self.send_record(&Record::Forget { id });
    }
}

struct Worker {
    sequencer: Sequencer<Completion>,
    target: Arc<Target>,
    flushes: Vec<mpsc::Sender<()>>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut done = |seq: u64, done: Completion, kind: &'static str, result| {
            done.complete(remote_result(seq, kind, result));
        };
        while let Ok(msg) = rx.recv() {
            let input = match msg {
                Msg::Flush(tx) => {
                    self.flushes.push(tx);
                    None
                }
                Msg::Mutation { seq, frame, done } => Some(Input::Mutation { seq, frame, done }),
                Msg::Skip { seq } => Some(Input::Skip { seq }),
                Msg::Frame(frame) => Some(Input::Frame(frame)),
            };
            if let Some(input) = input {
                self.sequencer.push(input, &mut done);
                self.target.applier.start_writebacks();
            }
            if !self.flushes.is_empty() && self.sequencer.idle() {
                for f in self.flushes.drain(..) {
                    let _ = f.send(());
                }
            }
        }
        if self.sequencer.waiting() > 0 {
            tracing::warn!(
                waiting = self.sequencer.waiting(),
                next = self.sequencer.next_seq(),
                "loopback stopped with mutations waiting for a lower seq"
            );
        }
    }
}
