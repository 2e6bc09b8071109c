//! [`NetReplicator`]: the primary's side of the replication stream, over one TCP connection to
//! the secondary's [`crate::Receiver`] (see [`crate::transport`] for the handshake and framing).
//!
//! # Data path
//!
//! [`Replicator::submit`] encodes the mutation into one frame (the write data is copied once,
//! out of the kernel's request buffer, into the frame), records its [`Completion`] as *pending*
//! and queues the frame. A small frame is then sent by the calling thread itself when no other
//! thread is sending (with Noise, encrypted on the way), else left to the thread that is (which
//! sends everything queued before it flushes): no hand-off to another thread, whose wake-up would
//! cost every small operation a scheduling delay. A large frame (over 64 KiB) is left to the
//! writer thread, so that encrypting and sending it overlaps with the local apply of the write.
//! A reader thread receives the secondary's `Ack { seq, error }` and completes the pending
//! completion. Outcomes ([`Replicator::applied`]) and forgets travel the same queue, so they keep
//! their order with the mutations, but nobody waits for them: they are not sent on their own
//! but leave with the next mutation (one message and one wake-up of the secondary per operation
//! instead of two), or after a reader tick when no mutation follows. Excluded mutations are completed at once and sent as a *skip* (a mutation
//! record with `replicate == false` whose operation is a placeholder), so the secondary's reorder
//! buffer can move past their `seq`. The queue is bounded ([`NetOptions::queue`] frames):
//! submit only waits when it is full, that is when the secondary falls that far behind (bounded
//! memory; the timeout below still runs).
//!
//! # Connection
//!
//! [`NetReplicator::start`] takes over an authenticated [`Connection`], whichever side dialed
//! (in the daemon the secondary dials and the full synchronisation runs on it first), and the
//! `seq` the secondary expects first (the synchronisation's `next_seq`);
//! [`NetReplicator::connect`] dials and starts at `seq` 1. [`NetStats::in_flight`] `== 0` means
//! every mutation sent was acknowledged.
//!
//! # States
//!
//! ```text
//!                 ack timeout / connection error / abort()
//!   Replicating ─────────────────────────────────► Holding ──record_locally()──► RecordingLocally
//!        │            (on_lost called once)            │
//!        │                                             └──────fail_all()───────► Failed
//!        └──── record_locally() / fail_all() (the daemon may decide first) ────┘
//! ```
//!
//! - **Replicating**: frames are sent; each completion completes when its ack arrives. An ack
//!   reporting a failure is weighed against the local result: if the mutation failed here too,
//!   the application gets the local error; if it succeeded here, the secondary's copy no longer
//!   matches, so the secondary is declared lost (as below) and the mutation is held, then
//!   completed by `record_locally`: a problem of the secondary alone (its disk full, say) never
//!   fails the application's call.
//! - **Holding**: entered when the oldest pending mutation has waited longer than
//!   [`NetOptions::timeout`] for its ack, or when the connection fails (closed, reset, a write
//!   error, garbage). The connection is shut down and the `on_lost` callback runs once with a
//!   [`Lost`] (the daemon turns it into the core's `ReplicationLost` input). Pending completions
//!   and the completions of every new mutation are *held*: not completed, so the application's
//!   call does not return.
//! - **RecordingLocally** (after [`NetReplicator::record_locally`], the core's PRIM -> ALONE):
//!   held and new mutations are recorded as changes to send later and completed with `Ok`. For
//!   now the record is an in-memory list of `seq`s ([`NetReplicator::recorded`]); the durable
//!   dirty log replaces it later.
//! - **Failed** (after [`NetReplicator::fail_all`]): held and new completions fail with `EIO`.
//!
//! Both final states are terminal for this replicator: reconnecting is a new `NetReplicator`.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_fs::{Completion, FileId, Mutation, NodeRef, Op, Outcome, ReplicationError, Replicator};

use crate::lock;
use crate::transport::{Connection, FrameReader, FrameWriter, Security, TransportError};
use crate::wire::{self, Record};

/// Default replication timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default capacity of the send queue, in frames.
pub const DEFAULT_QUEUE: usize = 256;

/// Settings of a [`NetReplicator`].
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Protection of the connection.
    pub security: Security,
    /// How long a mutation may wait for its ack before the secondary counts as lost.
    pub timeout: Duration,
    /// Frames queued for the writer at most (submit waits beyond it).
    pub queue: usize,
}

impl NetOptions {
    /// Options with the default timeout and queue.
    pub fn new(security: Security) -> NetOptions {
        NetOptions {
            security,
            timeout: DEFAULT_TIMEOUT,
            queue: DEFAULT_QUEUE,
        }
    }
}

/// The replication state (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationState {
    /// Mutations are sent and completed by the secondary's acks.
    Replicating,
    /// The secondary was lost: completions are held.
    Holding,
    /// Mutations are recorded locally and completed.
    RecordingLocally,
    /// Held and new completions fail with `EIO`.
    Failed,
}

/// The report of a lost secondary, given to the `on_lost` callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lost {
    /// Why (ack timeout, connection closed...).
    pub reason: String,
    /// Completions held at that moment.
    pub held: usize,
}

/// Counters of a [`NetReplicator`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames queued for the secondary (mutations, skips, outcomes, forgets).
    pub frames: u64,
    /// Bytes of those frames (before encryption).
    pub bytes: u64,
    /// Acks received.
    pub acks: u64,
    /// Mutations waiting for their ack (or held).
    pub in_flight: u64,
    /// Bytes of the frames of those mutations.
    pub in_flight_bytes: u64,
    /// Bytes queued for the secondary per second, over the interval since the previous call of
    /// [`NetReplicator::stats`] that lasted at least a second (0 before the first one).
    pub bytes_per_second: u64,
    /// Sum of the ack latencies, in microseconds (divide by `acks` for the mean).
    pub ack_micros: u64,
}

struct Pending {
    done: Completion,
    bytes: u64,
    kind: &'static str,
    since: Instant,
    /// The primary's local result (`Some(errno)` for a failure), once applied here.
    local: Option<Option<i32>>,
    /// The secondary's failure, when its ack reported one (decided with `local`).
    remote_error: Option<i32>,
}

/// What to do with a mutation the secondary failed, once the local result is known too.
enum Verdict {
    /// Not decidable yet (the local result is not known).
    Wait,
    /// Both failed: the application gets the local error (the remote one changes nothing).
    Complete(Completion),
    /// The secondary failed what succeeded here: it no longer matches. The mutation stays held
    /// and the secondary is declared lost (the reason is given).
    Diverged(String),
}

/// Decides on the pending mutation `seq` if the secondary failed it and the local result is
/// known (removes it when it completes).
fn verdict(state: &mut State, seq: u64) -> Verdict {
    let Some(p) = state.pending.get(&seq) else {
        return Verdict::Wait;
    };
    let (Some(remote), Some(local)) = (p.remote_error, p.local) else {
        return Verdict::Wait;
    };
    match local {
        None => Verdict::Diverged(format!(
            "the secondary failed {} (seq {seq}) that succeeded here: {}; its copy no longer \
             matches",
            p.kind,
            crate::sys::describe_errno(remote)
        )),
        Some(_) => match state.pending.remove(&seq) {
            Some(p) => {
                state.pending_bytes = state.pending_bytes.saturating_sub(p.bytes);
                Verdict::Complete(p.done)
            }
            None => Verdict::Wait,
        },
    }
}

struct State {
    state: ReplicationState,
    pending: BTreeMap<u64, Pending>,
    /// Sum of the `bytes` of `pending`.
    pending_bytes: u64,
    recorded: Vec<u64>,
}

impl State {
    fn take_pending(&mut self) -> BTreeMap<u64, Pending> {
        self.pending_bytes = 0;
        std::mem::take(&mut self.pending)
    }
}

/// The sending rate, measured between calls of `stats`.
struct Rate {
    since: Instant,
    bytes: u64,
    per_second: u64,
}

type OnLost = Box<dyn Fn(&Lost) + Send + Sync>;

struct Inner {
    state: Mutex<State>,
    on_lost: OnLost,
    timeout: Duration,
    /// How often the reader thread wakes up at least (ack timeout check, lazy frames).
    tick: Duration,
    /// The connection, to shut it down from any thread.
    stream: TcpStream,
    /// Set by `close`: the end of the stream is expected.
    closing: AtomicBool,
    frames: AtomicU64,
    bytes: AtomicU64,
    acks: AtomicU64,
    ack_micros: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Critical sections only move entries between maps: a poisoned lock is still consistent.
        lock(&self.state)
    }

    fn replicating(&self) -> bool {
        self.lock().state == ReplicationState::Replicating
    }

    /// Replicating -> Holding; reports it once.
    fn lose(&self, reason: String) {
        let lost = {
            let mut s = self.lock();
            if s.state != ReplicationState::Replicating {
                return;
            }
            s.state = ReplicationState::Holding;
            Lost {
                reason,
                held: s.pending.len(),
            }
        };
        tracing::warn!(reason = %lost.reason, held = lost.held, "replication lost");
        let _ = self.stream.shutdown(Shutdown::Both);
        (self.on_lost)(&lost);
    }

    /// The secondary's ack of `seq`. A success completes the mutation. A failure is weighed
    /// against the local result ([`verdict`]): the same failure here changes nothing for the
    /// application (it gets the local error), but a failure of what succeeded here means the
    /// secondary's copy no longer matches: the mutation is held and the secondary lost, so
    /// that the primary goes on alone (then completes it) instead of failing the application
    /// for the secondary's problem (a full disk there, say).
    fn ack(&self, seq: u64, error: Option<i32>) {
        let verdict = {
            let mut s = self.lock();
            if s.state != ReplicationState::Replicating {
                return;
            }
            match error {
                None => match s.pending.remove(&seq) {
                    Some(p) => {
                        s.pending_bytes = s.pending_bytes.saturating_sub(p.bytes);
                        drop(s);
                        self.count_ack(p.since);
                        p.done.complete(Ok(()));
                        return;
                    }
                    None => {
                        drop(s);
                        tracing::warn!(seq, "replication: ack of no pending mutation");
                        return;
                    }
                },
                Some(e) => {
                    let Some(p) = s.pending.get_mut(&seq) else {
                        drop(s);
                        tracing::warn!(seq, "replication: ack of no pending mutation");
                        return;
                    };
                    p.remote_error = Some(e);
                    let since = p.since;
                    self.count_ack(since);
                    verdict(&mut s, seq)
                }
            }
        };
        self.carry_out(verdict);
    }

    fn count_ack(&self, since: Instant) {
        self.acks.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.ack_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The local result of `seq` (`Some(errno)` when it failed here), for [`verdict`].
    fn local_result(&self, seq: u64, error: Option<i32>) {
        let verdict = {
            let mut s = self.lock();
            match s.pending.get_mut(&seq) {
                Some(p) => {
                    p.local = Some(error);
                    verdict(&mut s, seq)
                }
                None => return,
            }
        };
        self.carry_out(verdict);
    }

    fn carry_out(&self, verdict: Verdict) {
        match verdict {
            Verdict::Wait => {}
            Verdict::Complete(done) => done.complete(Ok(())),
            Verdict::Diverged(reason) => self.lose(reason),
        }
    }

    /// Declares the secondary lost when the oldest pending mutation waited too long.
    fn check_timeout(&self) {
        let late = {
            let s = self.lock();
            if s.state != ReplicationState::Replicating {
                return;
            }
            // The lowest seq: (nearly) the oldest, as seqs are submitted in (nearly) that order.
            s.pending
                .first_key_value()
                .map(|(seq, p)| (*seq, p.since))
                .filter(|(_, since)| since.elapsed() > self.timeout)
        };
        if let Some((seq, _)) = late {
            self.lose(format!(
                "no ack of seq {seq} within {:?} (secondary unresponsive)",
                self.timeout
            ));
        }
    }
}

/// The sending side: a queue of frames and the connection's writer; whoever takes the writer
/// sends the whole queue.
struct Out {
    queue: Mutex<Queue>,
    writer: Mutex<Sender>,
    /// Frames queued at most before a caller waits for the writer itself.
    capacity: usize,
    /// Large frames queued for the writer thread (`true`), which it sends while the submitting
    /// thread goes on with the local apply; `stop` ends the thread.
    signal: Mutex<Signal>,
    wake: Condvar,
}

/// Frames waiting to be sent, in order.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    /// When the oldest *lazy* frame (an outcome or a forget) was queued, if one waits: lazy
    /// frames are not sent on their own but with the next mutation, or by the reader thread once
    /// they waited [`Inner::tick`] (see [`NetReplicator::send_lazy`]).
    lazy_since: Option<Instant>,
}

#[derive(Default)]
struct Signal {
    pending: bool,
    stop: bool,
}

/// Frames up to this size are sent by the submitting thread itself when nobody else is sending;
/// larger ones by the writer thread, so that encrypting and sending them overlaps with the local
/// apply.
const INLINE_FRAME: usize = 64 << 10;

struct Sender {
    out: FrameWriter,
    /// A write failed (the loss is reported): later frames are dropped.
    failed: bool,
    /// `close` ran: later frames are dropped.
    closed: bool,
}

/// A [`Replicator`] sending every mutation to the secondary's [`crate::Receiver`] over TCP. See
/// the module documentation.
pub struct NetReplicator {
    inner: Arc<Inner>,
    first_seq: u64,
    rate: Mutex<Rate>,
    out: Arc<Out>,
    reader: Mutex<Option<JoinHandle<()>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for NetReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetReplicator")
            .field("state", &self.state())
            .field("peer", &self.inner.stream.peer_addr().ok())
            .finish()
    }
}

impl NetReplicator {
    /// Connects to the secondary's receiver at `addr` and authenticates (the primary dials: the
    /// mount's first mutation must be `seq` 1). `on_lost` is called once, from an internal
    /// thread, when the secondary is lost; it must not block. A refused handshake (wrong secret,
    /// other security mode) is an error here. [`Connection::dial`] then
    /// [`NetReplicator::start`].
    pub fn connect(
        addr: SocketAddr,
        options: NetOptions,
        on_lost: impl Fn(&Lost) + Send + Sync + 'static,
    ) -> Result<NetReplicator, TransportError> {
        let conn = Connection::dial(addr, &options.security)?;
        NetReplicator::start(conn, 1, options, on_lost)
    }

    /// Takes over an established connection to the secondary (whichever side dialed; after a
    /// full synchronisation on it, see [`crate::fullsync`]): from now on mutations are sent on
    /// it and the secondary's acks complete them. `first_seq` is the `seq` of the first mutation
    /// the secondary expects (the `next_seq` of the synchronisation); a mutation below it is not
    /// sent and fails. `options.security` is not used (the connection is already
    /// authenticated). `on_lost` is called once, from an internal thread, when the secondary is
    /// lost; it must not block.
    pub fn start(
        conn: Connection,
        first_seq: u64,
        options: NetOptions,
        on_lost: impl Fn(&Lost) + Send + Sync + 'static,
    ) -> Result<NetReplicator, TransportError> {
        let (stream, _peer, input, out) = conn.into_parts()?;
        // The reader wakes up this often to check the oldest pending mutation's age.
        let tick = (options.timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(50));
        stream.set_read_timeout(Some(tick))?;
        // A writer blocked on a stuck secondary is released by the ack timeout (shutdown).
        stream.set_write_timeout(None)?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                state: ReplicationState::Replicating,
                pending: BTreeMap::new(),
                pending_bytes: 0,
                recorded: Vec::new(),
            }),
            on_lost: Box::new(on_lost),
            timeout: options.timeout,
            tick,
            stream,
            closing: AtomicBool::new(false),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            ack_micros: AtomicU64::new(0),
        });
        let out = Arc::new(Out {
            queue: Mutex::new(Queue::default()),
            writer: Mutex::new(Sender {
                out,
                failed: false,
                closed: false,
            }),
            capacity: options.queue.max(1),
            signal: Mutex::new(Signal::default()),
            wake: Condvar::new(),
        });
        let writer = {
            let inner = inner.clone();
            let out = out.clone();
            std::thread::Builder::new()
                .name("tandem-repl-tx".into())
                .spawn(move || write_loop(&inner, &out))?
        };
        let reader = {
            let inner = inner.clone();
            let out = out.clone();
            std::thread::Builder::new()
                .name("tandem-repl-rx".into())
                .spawn(move || read_loop(&inner, &out, input))?
        };
        Ok(NetReplicator {
            inner,
            first_seq: first_seq.max(1),
            rate: Mutex::new(Rate {
                since: Instant::now(),
                bytes: 0,
                per_second: 0,
            }),
            out: out.clone(),
            reader: Mutex::new(Some(reader)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The `seq` of the first mutation sent on this connection.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The sending rate, updated when a second or more passed since the last update.
    fn rate(&self, bytes: u64) -> u64 {
        let mut r = lock(&self.rate);
        let elapsed = r.since.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let sent = bytes.saturating_sub(r.bytes) as f64;
            r.per_second = (sent / elapsed.as_secs_f64()) as u64;
            r.since = Instant::now();
            r.bytes = bytes;
        }
        r.per_second
    }

    /// Declares the secondary lost now, as an ack timeout would (Replicating -> Holding; the
    /// connection is shut down and `on_lost` runs once with `reason`). For the daemon, when the
    /// stream must stop (the secondary asked for a new synchronisation). Does nothing in
    /// another state.
    pub fn abort(&self, reason: &str) {
        self.inner.lose(reason.to_owned());
    }

    /// The current state.
    pub fn state(&self) -> ReplicationState {
        self.inner.lock().state
    }

    /// Holding (or still replicating) -> RecordingLocally: completes every held mutation with
    /// `Ok` after recording it, and from now on records and completes new ones at once. Does
    /// nothing after [`NetReplicator::fail_all`].
    pub fn record_locally(&self) {
        let released = {
            let mut s = self.inner.lock();
            if s.state == ReplicationState::Failed {
                return;
            }
            s.state = ReplicationState::RecordingLocally;
            let pending = s.take_pending();
            s.recorded.extend(pending.keys().copied());
            pending
        };
        let _ = self.inner.stream.shutdown(Shutdown::Both);
        for p in released.into_values() {
            p.done.complete(Ok(()));
        }
    }

    /// Holding (or still replicating) -> Failed: fails every held mutation with `EIO`, and every
    /// new one. Does nothing after [`NetReplicator::record_locally`].
    pub fn fail_all(&self) {
        let failed = {
            let mut s = self.inner.lock();
            if s.state == ReplicationState::RecordingLocally {
                return;
            }
            s.state = ReplicationState::Failed;
            s.take_pending()
        };
        let _ = self.inner.stream.shutdown(Shutdown::Both);
        for p in failed.into_values() {
            p.done.complete(Err(lost_error()));
        }
    }

    /// The `seq`s recorded locally, in the order they were recorded (held ones first, by `seq`).
    pub fn recorded(&self) -> Vec<u64> {
        self.inner.lock().recorded.clone()
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        let i = &self.inner;
        let (in_flight, in_flight_bytes) = {
            let s = i.lock();
            (s.pending.len() as u64, s.pending_bytes)
        };
        let bytes = i.bytes.load(Ordering::Relaxed);
        NetStats {
            frames: i.frames.load(Ordering::Relaxed),
            bytes,
            acks: i.acks.load(Ordering::Relaxed),
            in_flight,
            in_flight_bytes,
            bytes_per_second: self.rate(bytes),
            ack_micros: i.ack_micros.load(Ordering::Relaxed),
        }
    }

    /// Sends what is queued, then closes the connection for writing and waits for the writer
    /// (the secondary applies everything sent, then closes its side). Later records are dropped.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        {
            let mut signal = lock(&self.out.signal);
            signal.stop = true;
            self.out.wake.notify_all();
        }
        let writer = lock(&self.writer).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
        drain(&self.inner, &self.out, true);
        let mut sender = self.sender();
        if !sender.closed {
            sender.closed = true;
            if !sender.failed {
                let _ = sender.out.flush();
            }
            let _ = self.inner.stream.shutdown(Shutdown::Write);
        }
    }

    fn sender(&self) -> MutexGuard<'_, Sender> {
        // A panic while sending leaves the writer as it was: still usable (or failed).
        lock(&self.out.writer)
    }

    /// Counts `frame` and appends it to the queue (marking when the oldest lazy frame came, see
    /// [`NetReplicator::send_lazy`]); `true` when the queue is full.
    fn enqueue(&self, frame: Vec<u8>, lazy: bool) -> bool {
        self.inner.frames.fetch_add(1, Ordering::Relaxed);
        self.inner
            .bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        let mut queue = lock(&self.out.queue);
        queue.frames.push_back(frame);
        if lazy {
            queue.lazy_since.get_or_insert_with(Instant::now);
        }
        queue.frames.len() >= self.out.capacity
    }

    /// Queues a frame while replicating and sends the queue unless another thread is sending.
    fn send(&self, frame: Vec<u8>) {
        let large = frame.len() > INLINE_FRAME;
        if self.enqueue(frame, false) {
            // The secondary (or the thread sending to it) fell behind: wait for the writer,
            // which bounds memory (the ack timeout still runs and unblocks a stuck socket by
            // shutting the connection down).
            drain(&self.inner, &self.out, true);
        } else if large {
            let mut signal = lock(&self.out.signal);
            signal.pending = true;
            self.out.wake.notify_one();
        } else {
            drain(&self.inner, &self.out, false);
        }
    }

    /// The frame of `record`, while replicating (nothing is sent otherwise).
    fn record_frame(&self, record: &Record<'_>) -> Option<Vec<u8>> {
        if !self.inner.replicating() {
            return None;
        }
        wire::to_frame(record)
            .inspect_err(|e| tracing::warn!(error = %e, "replication: record not encodable"))
            .ok()
    }

    fn send_record(&self, record: &Record<'_>) {
        if let Some(frame) = self.record_frame(record) {
            self.send(frame);
        }
    }

    /// Queues a frame nobody waits for (an outcome, a forget) without sending it: it leaves with
    /// the next mutation (same order, same write), or, when no mutation follows, the reader
    /// thread sends it once it waited a tick. Sending each outcome on its own would cost every
    /// operation a second message and a second wake-up of the secondary.
    fn send_lazy(&self, record: &Record<'_>) {
        if let Some(frame) = self.record_frame(record)
            && self.enqueue(frame, true)
        {
            drain(&self.inner, &self.out, true);
        }
    }

    /// Tells the secondary that `seq` has nothing to apply.
    fn skip(&self, seq: u64) {
        let placeholder = Mutation {
            seq,
            replicate: false,
            op: Op::Fsync {
                node: NodeRef {
                    nodeid: 0,
                    generation: 0,
                    id: FileId { dev: 0, ino: 0 },
                    path: None,
                },
                fh: 0,
                datasync: false,
            },
        };
        self.send_record(&Record::Mutation(placeholder));
    }
}

fn lost_error() -> ReplicationError {
    ReplicationError::Failed("secondary lost and not allowed to record locally".into())
}

impl Drop for NetReplicator {
    fn drop(&mut self) {
        self.close();
        let _ = self.inner.stream.shutdown(Shutdown::Both);
        let reader = lock(&self.reader).take();
        if let Some(r) = reader {
            let _ = r.join();
        }
        // Completions still pending are dropped: their calls fail with EIO.
    }
}

impl Replicator for NetReplicator {
    fn submit(&self, mutation: &Mutation<'_>, done: Completion) {
        let seq = mutation.seq;
        if seq < self.first_seq {
            // Before the synchronised point: the secondary would ignore it.
            tracing::warn!(
                seq,
                first = self.first_seq,
                "replication: mutation before the stream"
            );
            done.complete(Err(ReplicationError::Failed(format!(
                "mutation {seq} precedes the replication stream (starts at {})",
                self.first_seq
            ))));
            return;
        }
        if !mutation.replicate {
            done.complete(Ok(()));
            self.skip(seq);
            return;
        }
        let extra = match &mutation.op {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        };
        let mut frame = Vec::with_capacity(256 + extra);
        if let Err(e) = wire::encode_mutation(mutation, &mut frame) {
            done.complete(Err(ReplicationError::Failed(format!(
                "mutation {seq} not encodable: {e}"
            ))));
            self.skip(seq);
            return;
        }
        let mut s = self.inner.lock();
        match s.state {
            ReplicationState::Replicating | ReplicationState::Holding => {
                let replicating = s.state == ReplicationState::Replicating;
                let bytes = frame.len() as u64;
                s.pending_bytes += bytes;
                s.pending.insert(
                    seq,
                    Pending {
                        done,
                        bytes,
                        kind: mutation.kind(),
                        since: Instant::now(),
                        local: None,
                        remote_error: None,
                    },
                );
                drop(s);
                if replicating {
                    self.send(frame);
                }
            }
            ReplicationState::RecordingLocally => {
                s.recorded.push(seq);
                drop(s);
                done.complete(Ok(()));
            }
            ReplicationState::Failed => {
                drop(s);
                done.complete(Err(lost_error()));
            }
        }
    }

    fn applied(&self, seq: u64, outcome: &Outcome) {
        self.inner.local_result(seq, outcome.error);
        self.send_lazy(&Record::Applied {
            seq,
            outcome: outcome.clone(),
        });
    }

    fn forget(&self, id: FileId) {
        self.send_lazy(&Record::Forget { id });
    }
}

/// Sends every queued frame, then flushes, if this thread gets the writer (waits for it when
/// `wait`). Frames queued by others meanwhile are sent too; a frame queued after the holder
/// looked is picked up by its own caller, which checks the queue again after the holder
/// let go.
fn drain(inner: &Inner, out: &Out, mut wait: bool) {
    loop {
        let sender = if wait {
            Some(lock(&out.writer))
        } else {
            match out.writer.try_lock() {
                Ok(s) => Some(s),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        };
        let Some(mut sender) = sender else { return };
        loop {
            let batch: Vec<Vec<u8>> = {
                let mut queue = lock(&out.queue);
                queue.lazy_since = None;
                queue.frames.drain(..).collect()
            };
            if batch.is_empty() {
                break;
            }
            for frame in batch {
                if sender.failed || sender.closed {
                    continue;
                }
                if !inner.replicating() {
                    sender.failed = true;
                    continue;
                }
                if let Err(e) = sender.out.write_frame(&frame) {
                    sender.failed = true;
                    inner.lose(format!("write to the secondary failed: {e}"));
                }
            }
        }
        if !sender.failed
            && !sender.closed
            && let Err(e) = sender.out.flush()
        {
            sender.failed = true;
            inner.lose(format!("write to the secondary failed: {e}"));
        }
        drop(sender);
        if lock(&out.queue).frames.is_empty() {
            return;
        }
        wait = false;
    }
}

/// The writer thread: sends the queue when a large frame was queued.
fn write_loop(inner: &Inner, out: &Out) {
    loop {
        {
            let mut signal = lock(&out.signal);
            while !signal.pending && !signal.stop {
                signal = out
                    .wake
                    .wait(signal)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if signal.stop {
                return;
            }
            signal.pending = false;
        }
        drain(inner, out, true);
    }
}

fn read_loop(inner: &Inner, out: &Out, mut input: FrameReader) {
    loop {
        match input.next() {
            Ok(Some(frame)) => match wire::decode_frame(&frame) {
                Ok(Record::Ack { seq, error }) => inner.ack(seq, error),
                other => {
                    inner.lose(format!("unexpected record from the secondary: {other:?}"));
                    return;
                }
            },
            Ok(None) => {}
            Err(e) => {
                if inner.closing.load(Ordering::Relaxed) && inner.lock().pending.is_empty() {
                    return;
                }
                inner.lose(format!("connection to the secondary failed: {e}"));
                return;
            }
        }
        inner.check_timeout();
        if !inner.replicating() {
            return;
        }
        let lazy_since = lock(&out.queue).lazy_since;
        if lazy_since.is_some_and(|since| since.elapsed() >= inner.tick) {
            drain(inner, out, false);
        }
    }
}
