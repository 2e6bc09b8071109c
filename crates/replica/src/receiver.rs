//! [`Receiver`]: the secondary's side of the replication stream.
//!
//! Takes over one authenticated connection from the primary's [`crate::NetReplicator`] (see
//! [`crate::transport`]; [`Receiver::accept`] also accepts and authenticates it), and runs one
//! thread that decrypts each frame, applies it through the shared sequencer (reorder buffer by
//! `seq`, `Forget` barrier: as the [`crate::LoopbackReplicator`]) with an [`Applier`], and sends
//! `Ack { seq, error }` after each apply (after the `fsync`/`fdatasync` for `Fsync` and
//! `O_SYNC`/`O_DSYNC` writes, which the applier does before returning). Acks are flushed when
//! nothing more is buffered (several acks of a backlog leave in one segment). Reading, applying
//! and acknowledging on one thread spares every operation the wake-up of a second thread.
//!
//! Memory is bounded: the thread reads only while it applies, so when it falls behind TCP pushes
//! back to the primary (whose queue is bounded, [`crate::NetOptions::queue`]).

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::applier::{Applier, Divergence};
use crate::sequencer::{Input, Sequencer, Target};
use crate::transport::{self, Connection, FrameReader, FrameWriter, Security, TransportError};
use crate::wire::{self, Record};

/// Counters of a [`Receiver`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Mutations applied.
    pub applied: u64,
    /// Of those, mutations that failed here.
    pub failed: u64,
    /// Bytes of frames received (decrypted).
    pub bytes: u64,
    /// Forgets processed.
    pub forgets: u64,
    /// Bytes of large writes written while their frames arrived (before their apply).
    pub written_ahead: u64,
    /// Divergences found.
    pub divergences: u64,
    /// Writes to recently synced files whose writeback started at once (flush-behind).
    pub flushed_behind: u64,
}

/// How a connection ended.
#[derive(Debug)]
pub struct ReceiverReport {
    /// Counters at the end.
    pub stats: ReceiverStats,
    /// `None` when the primary closed the stream cleanly; else the error.
    pub error: Option<String>,
    /// Mutations left waiting for a lower `seq` that never came.
    pub waiting: usize,
}

/// The secondary's end of one replication connection. See the module documentation.
pub struct Receiver {
    target: Arc<Target>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The thread that reads, applies and acknowledges: its error and what was left waiting.
    reader: Option<JoinHandle<(Option<String>, usize)>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("peer", &self.peer)
            .finish()
    }
}

impl Receiver {
    /// Accepts one connection on `listener`, reads its [`transport::MAGIC`], authenticates it
    /// and starts applying its stream with `applier` (the primary dialed: the first mutation
    /// must be `seq` 1). A connection that fails the handshake is closed and reported as the
    /// error (nothing is applied). [`Connection::accept`] then [`Receiver::start`].
    pub fn accept(
        listener: &TcpListener,
        security: &Security,
        applier: Applier,
    ) -> Result<Receiver, TransportError> {
        let (mut stream, peer) = listener.accept()?;
        if let Err(e) = transport::read_magic(&mut stream) {
            tracing::warn!(%peer, error = %e, "replication connection refused");
            let _ = stream.shutdown(Shutdown::Both);
            return Err(e);
        }
        let conn = Connection::accept(stream, security)?;
        Receiver::start(conn, applier, 1)
    }

    /// Takes over an established connection from the primary (whichever side dialed; after a
    /// full synchronisation on it, see [`crate::fullsync`]) and starts applying its stream with
    /// `applier`; the first mutation expected is `first_seq` (the `next_seq` of the
    /// synchronisation).
    pub fn start(
        conn: Connection,
        applier: Applier,
        first_seq: u64,
    ) -> Result<Receiver, TransportError> {
        let (stream, peer, mut input, out) = conn.into_parts()?;
        input.set_poll(poll_window());
        // The primary's silence is not an error here (the daemon watches the peer).
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        let target = Arc::new(Target::new(applier));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let target = target.clone();
            let stop = stop.clone();
            let sequencer = Sequencer::starting_at(target.clone(), first_seq.max(1));
            let control = stream.try_clone()?;
            std::thread::Builder::new()
                .name("tandem-recv".into())
                .spawn(move || serve_loop(input, out, sequencer, &target, &stop, &control))?
        };
        Ok(Receiver {
            target,
            stream,
            peer,
            stop,
            reader: Some(reader),
        })
    }

    /// The primary's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The applier.
    pub fn applier(&self) -> &Applier {
        &self.target.applier
    }

    /// The divergences found so far.
    pub fn divergences(&self) -> Vec<Divergence> {
        self.target.divergences()
    }

    /// Counters.
    pub fn stats(&self) -> ReceiverStats {
        let c = &self.target.counters;
        ReceiverStats {
            applied: c.applied.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            forgets: c.forgets.load(Ordering::Relaxed),
            written_ahead: c.written_ahead.load(Ordering::Relaxed),
            divergences: self.target.divergence_count(),
            flushed_behind: c.flushed_behind.load(Ordering::Relaxed),
        }
    }

    /// Waits until the primary closed the stream and everything received was applied (at once
    /// when it already ended).
    pub fn wait(&mut self) -> ReceiverReport {
        let (error, waiting) = self.reader.take().map_or((None, 0), |r| {
            r.join()
                .unwrap_or_else(|_| (Some("receiver thread panicked".into()), 0))
        });
        ReceiverReport {
            stats: self.stats(),
            error,
            waiting,
        }
    }
}

impl Drop for Receiver {
    /// Stops at once: what was received and not applied yet is dropped, the connection closed.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Reads frames, applies them in order and acknowledges each, on one thread: a mutation is
/// applied as soon as it is read, with no hand-off to another thread (whose wake-up would cost
/// every operation a scheduling delay). Acknowledgements are flushed when nothing more is
/// buffered, so those of a backlog leave together. Returns the error that ended the stream, if
/// any, and how many mutations were left waiting for a lower `seq`.
///
/// A divergence (this node's result of a mutation differs from the primary's) ends the stream:
/// the connection is shut down without acknowledging anything more, so the primary counts this
/// secondary as lost, starts a new data generation and resynchronises it, instead of going on
/// with replicas that differ.
/// How long the receiver polls for the next frame before blocking (see
/// `FrameReader::set_poll`); `TANDEM_RECV_POLL_US` overrides it (0: never poll).
fn poll_window() -> Duration {
    let micros = std::env::var("TANDEM_RECV_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_POLL_US);
    Duration::from_micros(micros)
}

/// Default of [`poll_window`], in microseconds.
const DEFAULT_POLL_US: u64 = 100;

/// A large write whose data is written while its frame arrives (see [`write_ahead`]).
#[derive(Clone, Copy, Debug)]
struct Ahead {
    seq: u64,
    /// Bytes of its data written so far.
    written: usize,
    /// No more writing ahead for this frame (not the next mutation, or a write fell short).
    stopped: bool,
}

/// Data written ahead at a time, at least (fewer, larger `pwrite`s).
const WRITE_AHEAD_STEP: usize = 128 << 10;

/// Shown the part of a large frame that arrived (`view`: prefix and body so far): when it is a
/// write that will be applied as soon as it is whole (the next `seq`, nothing waiting), writes
/// the data received so far, so that the copy to the secondary's file overlaps with the
/// transfer instead of following it. The mutation's apply then writes only the rest
/// ([`Sequencer::wrote_ahead`]) and reports the result of the whole. If the stream breaks
/// before the frame is whole, the file holds the start of a write the primary never
/// acknowledged, as after a crash in the middle of a local write.
fn write_ahead(view: &[u8], sequencer: &Sequencer<()>, target: &Target, ahead: &mut Option<Ahead>) {
    if ahead.is_some_and(|a| a.stopped) || target.diverged() {
        return;
    }
    let Some(body) = view.get(wire::PREFIX_LEN..) else {
        return;
    };
    // The data of a write is the end of its frame: a partial frame decodes as the write with
    // the data received so far.
    let Ok(Record::Mutation(m)) = wire::decode(body) else {
        return;
    };
    let tandem_fs::Op::Write {
        node, offset, data, ..
    } = &m.op
    else {
        return;
    };
    let done = match *ahead {
        Some(a) if a.seq == m.seq => a.written,
        Some(_) => return,
        None if m.replicate && sequencer.may_write_ahead(m.seq) => 0,
        None => {
            *ahead = Some(Ahead {
                seq: m.seq,
                written: 0,
                stopped: true,
            });
            return;
        }
    };
    if data.len() < done + WRITE_AHEAD_STEP {
        return;
    }
    let chunk = &data[done..];
    let (written, stopped) =
        match target
            .applier
            .write_ahead(node, offset.saturating_add(done as u64), chunk)
        {
            Ok(n) => {
                target
                    .counters
                    .written_ahead
                    .fetch_add(n as u64, Ordering::Relaxed);
                (done + n, n < chunk.len())
            }
            Err(_) => (done, true),
        };
    *ahead = Some(Ahead {
        seq: m.seq,
        written,
        stopped,
    });
}

fn serve_loop(
    mut input: FrameReader,
    mut out: FrameWriter,
    mut sequencer: Sequencer<()>,
    target: &Target,
    stop: &AtomicBool,
    control: &TcpStream,
) -> (Option<String>, usize) {
    let mut ack_buf = Vec::with_capacity(64);
    let mut broken = false;
    let mut ahead: Option<Ahead> = None;
    let error = loop {
        if !input.buffered() {
            if !broken && out.flush().is_err() {
                broken = true;
            }
            // After the acknowledgements left: queuing the I/O takes time.
            let started = target.applier.start_writebacks();
            target
                .counters
                .flushed_behind
                .fetch_add(started as u64, Ordering::Relaxed);
        }
        let next = input.next_with(&mut |view| write_ahead(view, &sequencer, target, &mut ahead));
        let frame = match next {
            Ok(Some(f)) => f,
            // No read timeout is set: `None` does not happen; read again.
            Ok(None) => continue,
            Err(TransportError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break None;
            }
            Err(e) => break Some(e.to_string()),
        };
        if stop.load(Ordering::Relaxed) {
            break None;
        }
        target
            .counters
            .bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        let wrote_ahead = ahead.take();
        let item = match wire::decode_frame(&frame) {
            Ok(Record::Mutation(m)) if m.replicate => {
                if let Some(a) = wrote_ahead.filter(|a| a.seq == m.seq && a.written > 0) {
                    sequencer.wrote_ahead(a.seq, a.written);
                }
                Input::Mutation {
                    seq: m.seq,
                    frame,
                    done: (),
                }
            }
            Ok(Record::Mutation(m)) => Input::Skip { seq: m.seq },
            Ok(Record::Applied { .. } | Record::Forget { .. }) => Input::Frame(frame),
            Ok(
                r @ (Record::Ack { .. }
                | Record::SyncRequest { .. }
                | Record::SyncRefused { .. }
                | Record::SyncEntry(_)
                | Record::SyncLink { .. }
                | Record::SyncData { .. }
                | Record::SyncEnd { .. }),
            ) => {
                break Some(format!("{} received in the replication stream", r.kind()));
            }
            Err(e) => break Some(format!("undecodable frame: {e}")),
        };
        sequencer.push(item, &mut |seq, (), kind, result: Result<(), i32>| {
            if let Err(errno) = result
                && crate::sys::is_resource_error(errno)
            {
                tracing::error!(
                    seq,
                    kind,
                    "applying a mutation failed: {}",
                    crate::sys::describe_errno(errno)
                );
            }
            if broken || target.diverged() {
                return;
            }
            ack_buf.clear();
            let ack = Record::Ack {
                seq,
                error: result.err(),
            };
            if wire::encode(&ack, &mut ack_buf).is_err() || out.write_frame(&ack_buf).is_err() {
                broken = true;
            }
        });
        if target.diverged() {
            tracing::warn!(
                "replicas diverge: ending the stream so that the primary resynchronises"
            );
            let _ = control.shutdown(Shutdown::Both);
            break None;
        }
    };
    if !target.diverged() {
        let _ = out.flush();
    }
    if sequencer.waiting() > 0 {
        tracing::warn!(
            waiting = sequencer.waiting(),
            next = sequencer.next_seq(),
            "replication stream ended with mutations waiting for a lower seq"
        );
    }
    (error, sequencer.waiting())
}
