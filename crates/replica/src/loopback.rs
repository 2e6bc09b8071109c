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
//! The worker applies mutations in `seq` order: a mutation that arrives before a lower `seq`
//! (two data operations on different files are submitted in any order) waits in a reorder buffer.
//! Every `seq` reaches the worker: excluded mutations as a skip. The primary's outcome of `seq n`
//! is processed once `n` was applied.
//!
//! A forget of inode `F` must not drop a handle that a mutation still in the reorder buffer
//! needs, nor the handle of a new file that reused `F`'s inode number on the primary. So it takes
//! effect once every mutation received before it was applied, and the records received after it
//! (outcomes, forgets, mutations of a higher `seq`) wait until then; mutations that fill the gap
//! go on. (A new file can only get `F`'s number after the forget, so every record naming the new
//! file comes after it.)
//!
//! # Parallel apply (not done yet)
//!
//! One thread applies everything. The [`Applier`] is `Sync`, so the worker can become a
//! dispatcher: namespace operations as barriers, data operations hashed by target identity to a
//! few threads (in `seq` order per file), outcomes after their mutation.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tandem_fs::{Completion, FileId, Mutation, Op, Outcome, ReplicationError, Replicator};

use crate::applier::{Applier, Divergence};
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

#[derive(Default)]
struct Counters {
    applied: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    forgets: AtomicU64,
}

struct Shared {
    applier: Applier,
    divergences: Mutex<Vec<Divergence>>,
    counters: Counters,
}

/// A [`Replicator`] that encodes each mutation, decodes it and applies it to another directory
/// on a worker thread. See the module documentation.
pub struct LoopbackReplicator {
    tx: Option<mpsc::Sender<Msg>>,
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            applier,
            divergences: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            shared: shared.clone(),
            next_seq: 1,
            max_seen: 0,
            ready: BTreeMap::new(),
            outcomes: HashMap::new(),
            forget: None,
            deferred: VecDeque::new(),
            inbox: VecDeque::new(),
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
        self.shared
            .divergences
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counters.
    pub fn stats(&self) -> LoopbackStats {
        let c = &self.shared.counters;
        LoopbackStats {
            applied: c.applied.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            forgets: c.forgets.load(Ordering::Relaxed),
            divergences: self
                .shared
                .divergences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len() as u64,
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

enum Ready {
    Apply { frame: Vec<u8>, done: Completion },
    Skip,
}

struct Worker {
    shared: Arc<Shared>,
    /// The next `seq` to apply.
    next_seq: u64,
    /// Highest `seq` received.
    max_seen: u64,
    /// Mutations received ahead of `next_seq`.
    ready: BTreeMap<u64, Ready>,
    /// Outcomes received before their mutation was applied.
    outcomes: HashMap<u64, Outcome>,
    /// A forget waiting for every `seq` up to the first value to be applied.
    forget: Option<(u64, FileId)>,
    /// Records received after a waiting forget, held until it took effect.
    deferred: VecDeque<Msg>,
    /// Deferred records to process before the channel.
    inbox: VecDeque<Msg>,
    flushes: Vec<mpsc::Sender<()>>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let msg = match self.inbox.pop_front() {
                Some(m) => m,
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            self.handle(msg);
            if !self.flushes.is_empty() && self.idle() {
                for f in self.flushes.drain(..) {
                    let _ = f.send(());
                }
            }
        }
        if !self.ready.is_empty() {
            tracing::warn!(
                waiting = self.ready.len(),
                next = self.next_seq,
                "loopback stopped with mutations waiting for a lower seq"
            );
        }
    }

    fn idle(&self) -> bool {
        self.ready.is_empty()
            && self.forget.is_none()
            && self.deferred.is_empty()
            && self.inbox.is_empty()
    }

    fn handle(&mut self, msg: Msg) {
        let waiting_forget = self.forget.map(|(after, _)| after);
        match msg {
            Msg::Flush(tx) => self.flushes.push(tx),
            Msg::Mutation { seq, .. } | Msg::Skip { seq }
                if waiting_forget.is_some_and(|after| seq > after) =>
            {
                self.deferred.push_back(msg)
            }
            Msg::Frame(_) if waiting_forget.is_some() => self.deferred.push_back(msg),
            Msg::Mutation { seq, frame, done } => {
                self.receive(seq, Ready::Apply { frame, done });
            }
            Msg::Skip { seq } => self.receive(seq, Ready::Skip),
            Msg::Frame(frame) => match wire::decode_frame(&frame) {
                Ok(Record::Applied { seq, outcome }) => {
                    if seq < self.next_seq {
                        self.outcome(seq, &outcome);
                    } else {
                        self.outcomes.insert(seq, outcome);
                    }
                }
                Ok(Record::Forget { id }) => {
                    if self.next_seq > self.max_seen {
                        self.forget_now(id);
                    } else {
                        self.forget = Some((self.max_seen, id));
                    }
                }
                Ok(other) => tracing::warn!(?other, "loopback: unexpected record"),
                Err(e) => tracing::warn!(error = %e, "loopback: undecodable record"),
            },
        }
    }

    fn receive(&mut self, seq: u64, item: Ready) {
        if seq < self.next_seq {
            tracing::warn!(seq, "loopback: seq received twice; ignored");
            return;
        }
        self.max_seen = self.max_seen.max(seq);
        self.ready.insert(seq, item);
        while let Some(item) = self.ready.remove(&self.next_seq) {
            let seq = self.next_seq;
            if let Ready::Apply { frame, done } = item {
                self.apply(seq, &frame, done);
            }
            if let Some(o) = self.outcomes.remove(&seq) {
                self.outcome(seq, &o);
            }
            self.next_seq += 1;
        }
        if let Some((after, id)) = self.forget
            && self.next_seq > after
        {
            self.forget = None;
            self.forget_now(id);
            // Replay what waited, in arrival order, before anything else.
            while let Some(m) = self.deferred.pop_back() {
                self.inbox.push_front(m);
            }
        }
    }

    fn apply(&self, seq: u64, frame: &[u8], done: Completion) {
        let c = &self.shared.counters;
        let m = match wire::decode_frame(frame) {
            Ok(Record::Mutation(m)) if m.seq == seq => m,
            other => {
                tracing::warn!(seq, ?other, "loopback: bad mutation frame");
                done.complete(Err(ReplicationError::Failed(format!(
                    "mutation {seq}: bad frame"
                ))));
                return;
            }
        };
        let result = self.shared.applier.apply(&m);
        c.applied.fetch_add(1, Ordering::Relaxed);
        done.complete(match result {
            Ok(()) => Ok(()),
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                if e == libc::ENOSPC || e == libc::EDQUOT {
                    Err(ReplicationError::Errno(e))
                } else {
                    Err(ReplicationError::Failed(format!(
                        "{} (seq {seq}) failed on the copy: errno {e}",
                        m.kind()
                    )))
                }
            }
        });
    }

    fn outcome(&self, seq: u64, outcome: &Outcome) {
        if let Err(d) = self.shared.applier.apply_outcome(seq, outcome) {
            tracing::warn!(divergence = %d, "loopback: replicas diverge");
            self.shared
                .divergences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(d);
        }
    }

    fn forget_now(&self, id: FileId) {
        self.shared.applier.forget(id);
        self.shared.counters.forgets.fetch_add(1, Ordering::Relaxed);
    }
}
