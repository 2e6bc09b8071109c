//! The secondary's ordering of the replication stream, shared by the [`crate::LoopbackReplicator`]
//! and the network [`crate::Receiver`].
//!
//! # Order
//!
//! Mutations are applied in `seq` order: a mutation that arrives before a lower `seq` (two data
//! operations on different files are submitted in any order) waits in a reorder buffer. Every
//! `seq` arrives: excluded mutations as a skip. The primary's outcome of `seq n` is processed
//! once `n` was applied.
//!
//! A forget of inode `F` must not drop a handle that a mutation still in the reorder buffer
//! needs, nor the handle of a new file that reused `F`'s inode number on the primary. So it takes
//! effect once every mutation received before it was applied, and the records received after it
//! (outcomes, forgets, mutations of a higher `seq`) wait until then; mutations that fill the gap
//! go on. (A new file can only get `F`'s number after the forget, so every record naming the new
//! file comes after it.)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_fs::{FileId, Outcome, ReplicationError};

use crate::applier::{Applier, Divergence};
use crate::lock;
use crate::wire::{self, Record};

/// One record of the stream, as the sequencer receives it.
pub(crate) enum Input<D> {
    /// A whole encoded mutation frame (prefix included) of `seq`, and what to tell when applied.
    Mutation { seq: u64, frame: Vec<u8>, done: D },
    /// A `seq` with nothing to apply (excluded on the primary, or not encodable).
    Skip { seq: u64 },
    /// A whole encoded outcome or forget frame.
    Frame(Vec<u8>),
}

/// Counters of the apply side.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) applied: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) forgets: AtomicU64,
    pub(crate) written_ahead: AtomicU64,
    pub(crate) flushed_behind: AtomicU64,
}

/// The applier and what applying produced, shared with the handle of the owner.
pub(crate) struct Target {
    pub(crate) applier: Applier,
    pub(crate) divergences: Mutex<Vec<Divergence>>,
    /// Some divergence was found (read on every frame, without the lock).
    diverged: AtomicBool,
    pub(crate) counters: Counters,
}

impl Target {
    pub(crate) fn new(applier: Applier) -> Target {
        Target {
            applier,
            divergences: Mutex::new(Vec::new()),
            diverged: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    pub(crate) fn divergences(&self) -> Vec<Divergence> {
        lock(&self.divergences).clone()
    }

    /// Whether a divergence was found.
    pub(crate) fn diverged(&self) -> bool {
        self.diverged.load(Ordering::Acquire)
    }

    pub(crate) fn divergence_count(&self) -> u64 {
        lock(&self.divergences).len() as u64
    }
}

/// The result of applying mutation `seq` as the primary's completion sees it: `ENOSPC` and
/// `EDQUOT` travel as such, any other failure is `EIO`.
pub(crate) fn remote_result(
    seq: u64,
    kind: &str,
    result: Result<(), i32>,
) -> Result<(), ReplicationError> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e == libc::ENOSPC || e == libc::EDQUOT => Err(ReplicationError::Errno(e)),
        Err(e) => Err(ReplicationError::Failed(format!(
            "{kind} (seq {seq}) failed on the copy: errno {e}"
        ))),
    }
}

enum Ready<D> {
    Apply { frame: Vec<u8>, done: D },
    Skip,
}

/// Applies the records it is given in a valid order (see the module documentation).
pub(crate) struct Sequencer<D> {
    target: Arc<Target>,
    /// The next `seq` to apply.
    next_seq: u64,
    /// Highest `seq` received.
    max_seen: u64,
    /// Mutations received ahead of `next_seq`.
    ready: BTreeMap<u64, Ready<D>>,
    /// Outcomes received before their mutation was applied.
    outcomes: HashMap<u64, Outcome>,
    /// A forget waiting for every `seq` up to the first value to be applied.
    forget: Option<(u64, FileId)>,
    /// Records received after a waiting forget, held until it took effect.
    deferred: VecDeque<Input<D>>,
    /// Deferred records to process before the next new one.
    inbox: VecDeque<Input<D>>,
    /// A write whose first bytes were written ahead ([`Sequencer::wrote_ahead`]): its `seq`
    /// and how many bytes.
    ahead: Option<(u64, usize)>,
}

impl<D> Sequencer<D> {
    /// A sequencer whose first mutation is `seq` 1 (a fresh mount).
    pub(crate) fn new(target: Arc<Target>) -> Sequencer<D> {
        Sequencer::starting_at(target, 1)
    }

    /// A sequencer whose first mutation is `first_seq` (at least 1): the stream that follows a
    /// full synchronisation.
    pub(crate) fn starting_at(target: Arc<Target>, first_seq: u64) -> Sequencer<D> {
        let first_seq = first_seq.max(1);
        Sequencer {
            target,
            next_seq: first_seq,
            max_seen: first_seq - 1,
            ready: BTreeMap::new(),
            outcomes: HashMap::new(),
            forget: None,
            deferred: VecDeque::new(),
            inbox: VecDeque::new(),
            ahead: None,
        }
    }

    /// Whether mutation `seq` would be applied as soon as it arrives: it is the next one in
    /// order and nothing waits. Only then may the start of a large write be written ahead,
    /// while the rest of its frame arrives.
    pub(crate) fn may_write_ahead(&self, seq: u64) -> bool {
        seq == self.next_seq && self.idle()
    }

    /// The first `bytes` of the data of write `seq` were written ahead: its apply writes only
    /// the rest.
    pub(crate) fn wrote_ahead(&mut self, seq: u64, bytes: usize) {
        self.ahead = Some((seq, bytes));
    }

    /// Nothing waits (every record received was processed).
    pub(crate) fn idle(&self) -> bool {
        self.ready.is_empty()
            && self.forget.is_none()
            && self.deferred.is_empty()
            && self.inbox.is_empty()
    }

    /// Mutations waiting for a lower `seq`.
    pub(crate) fn waiting(&self) -> usize {
        self.ready.len()
    }

    /// The next `seq` to apply.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Processes one record, then whatever it released. `done(seq, token, kind, result)` is
    /// called after each apply of a mutation, with this node's result (`Err(errno)`).
    pub(crate) fn push(
        &mut self,
        input: Input<D>,
        done: &mut impl FnMut(u64, D, &'static str, Result<(), i32>),
    ) {
        self.handle(input, done);
        while let Some(input) = self.inbox.pop_front() {
            self.handle(input, done);
        }
    }

    fn handle(
        &mut self,
        input: Input<D>,
        done: &mut impl FnMut(u64, D, &'static str, Result<(), i32>),
    ) {
        let waiting_forget = self.forget.map(|(after, _)| after);
        match input {
            Input::Mutation { seq, .. } | Input::Skip { seq }
                if waiting_forget.is_some_and(|after| seq > after) =>
            {
                self.deferred.push_back(input)
            }
            Input::Frame(_) if waiting_forget.is_some() => self.deferred.push_back(input),
            Input::Mutation {
                seq,
                frame,
                done: token,
            } => self.receive(seq, Ready::Apply { frame, done: token }, done),
            Input::Skip { seq } => self.receive(seq, Ready::Skip, done),
            Input::Frame(frame) => match wire::decode_frame(&frame) {
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
                Ok(other) => tracing::warn!(?other, "replication: unexpected record"),
                Err(e) => tracing::warn!(error = %e, "replication: undecodable record"),
            },
        }
    }

    fn receive(
        &mut self,
        seq: u64,
        item: Ready<D>,
        done: &mut impl FnMut(u64, D, &'static str, Result<(), i32>),
    ) {
        if seq < self.next_seq {
            tracing::warn!(seq, "replication: seq received twice; ignored");
            return;
        }
        self.max_seen = self.max_seen.max(seq);
        self.ready.insert(seq, item);
        while let Some(item) = self.ready.remove(&self.next_seq) {
            let seq = self.next_seq;
            if let Ready::Apply { frame, done: token } = item {
                let (kind, result) = self.apply(seq, &frame);
                done(seq, token, kind, result);
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

    fn apply(&mut self, seq: u64, frame: &[u8]) -> (&'static str, Result<(), i32>) {
        let preapplied = match self.ahead.take() {
            Some((s, bytes)) if s == seq => bytes,
            Some(other) => {
                self.ahead = Some(other);
                0
            }
            None => 0,
        };
        let c = &self.target.counters;
        let m = match wire::decode_frame(frame) {
            Ok(Record::Mutation(m)) if m.seq == seq => m,
            other => {
                tracing::warn!(seq, ?other, "replication: bad mutation frame");
                c.failed.fetch_add(1, Ordering::Relaxed);
                return ("invalid frame", Err(libc::EIO));
            }
        };
        let result = self.target.applier.apply_after(&m, preapplied);
        c.applied.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        (m.kind(), result)
    }

    fn outcome(&self, seq: u64, outcome: &Outcome) {
        if let Err(d) = self.target.applier.apply_outcome(seq, outcome) {
            tracing::warn!(divergence = %d, "replication: replicas diverge");
            lock(&self.target.divergences).push(d);
            self.target.diverged.store(true, Ordering::Release);
        }
    }

    fn forget_now(&self, id: FileId) {
        self.target.applier.forget(id);
        self.target.counters.forgets.fetch_add(1, Ordering::Relaxed);
    }
}
