//! The replication connection: authentication, encryption and framing over one TCP stream.
//!
//! # Wire format
//!
//! Every message on the connection is a frame: a `u32` little-endian length, then that many
//! bytes.
//!
//! 0. **Magic.** The dialer first writes [`MAGIC`] (8 bytes, no frame): the node-to-node port is
//!    shared with the control channel, and the accepting side's dispatcher peeks at them to hand
//!    the stream over, then consumes them ([`read_magic`]) before [`Connection::accept`].
//! 1. **Handshake** (the dialer is the Noise initiator and speaks first; each message is one
//!    frame):
//!    - [`Security::Noise`]: `Noise_NNpsk0_25519_AESGCM_BLAKE2s` (the control channel of
//!      `tandem-net` uses ChaChaPoly; AES-GCM through `ring` runs at several GB/s on CPUs with
//!      AES-NI, about 5x ChaCha20-Poly1305 here, and this connection carries all the data), PSK = `blake3::derive_key(`[`PSK_CONTEXT`]`, cluster_secret)` — a context
//!      distinct from the control channel's, so the two keys differ. Two 48-byte messages with
//!      empty payloads. With a wrong secret the acceptor cannot decrypt the first message and
//!      closes the connection: the dialer sees it closed ([`TransportError::RefusedByPeer`]).
//!    - [`Security::Plaintext`]: both sides send [`PLAINTEXT_HELLO`]; a side configured for
//!      Noise refuses it (and a plaintext side refuses a Noise message), so a configuration
//!      mismatch never runs unencrypted by accident.
//!
//!    The handshake must complete within [`HANDSHAKE_TIMEOUT`].
//! 2. **Records.** One frame carries one record of [`crate::wire`] (its body, without the wire
//!    prefix). In plaintext the transport frame *is* the wire frame (the same prefix), so a frame
//!    is written from the encoder's buffer as is. With Noise the body is cut into chunks of at
//!    most 65 519 bytes (65 535 minus the 16-byte tag), each encrypted as one Noise message with
//!    the next nonce of its direction; the frame holds the concatenated ciphertexts, and the
//!    receiver cuts it back at 65 535 bytes.
//!
//! # Roles
//!
//! Who dialed and who sends mutations are independent: in the daemon the secondary dials the
//! primary (it asks for a synchronisation), then the primary sends the tree
//! ([`crate::fullsync`]) and the mutations ([`crate::NetReplicator::start`]) over the same
//! [`Connection`], and the secondary acks ([`crate::Receiver::start`]). Each direction has its
//! own Noise key and nonce counter; a [`Connection`] hands both counters over when a replicator
//! or a receiver takes it.

use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snow::{Builder, StatelessTransportState};

use crate::wire::{self, MAX_FRAME, PREFIX_LEN, Record};

/// What a replication connection starts with, before the handshake (the port is shared with the
/// control channel).
pub const MAGIC: &[u8; 8] = b"TNDMREPL";

/// The Noise protocol of the replication connection.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_BLAKE2s";
/// Key-derivation context of the replication PSK (distinct from the control channel's).
pub const PSK_CONTEXT: &str = "tandem 2026-11 replication psk v1";
/// What each side sends first in [`Security::Plaintext`] mode.
pub const PLAINTEXT_HELLO: &[u8] = b"tandem replication plaintext v1";
/// Frames at least this large are shown to [`FrameReader::next_with`]'s `progress` while
/// they arrive.
pub(crate) const PROGRESS_MIN: usize = 256 << 10;
/// Deadline of the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest Noise message.
const NOISE_MAX_MSG: usize = 65535;
/// Size of the authentication tag of a Noise message.
const TAG_LEN: usize = 16;
/// Largest plaintext chunk of one Noise transport message.
pub(crate) const MAX_CHUNK: usize = NOISE_MAX_MSG - TAG_LEN;
/// Size of each of the two handshake messages (ephemeral key + tag of the empty payload).
const HANDSHAKE_MSG_LEN: usize = 32 + TAG_LEN;
/// Largest transport frame: the largest wire body with its Noise tags.
const MAX_TRANSPORT_FRAME: usize = MAX_FRAME + (MAX_FRAME / MAX_CHUNK + 1) * TAG_LEN;
/// Read buffer of a connection.
const READ_BUFFER: usize = 256 << 10;
/// Write buffer of a connection (small frames are coalesced; larger ones bypass it).
const WRITE_BUFFER: usize = 256 << 10;

/// How the replication connection is protected.
#[derive(Clone)]
pub enum Security {
    /// Authenticated and encrypted with Noise, keyed by the cluster secret (the default).
    Noise {
        /// The cluster secret (the PSK is derived from it with [`PSK_CONTEXT`]).
        secret: Vec<u8>,
    },
    /// **Unauthenticated, unencrypted**: only for a dedicated replication link
    /// (`plaintext_replication = true` in the configuration).
    Plaintext,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Noise { .. } => f.write_str("Noise { secret: <redacted> }"),
            Security::Plaintext => f.write_str("Plaintext"),
        }
    }
}

/// Why a replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket error.
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    /// The other side's first handshake message does not authenticate (wrong cluster secret).
    #[error("replication handshake: authentication failed (wrong cluster secret?)")]
    Auth,
    /// The other side closed the connection during the handshake (it refused our secret or
    /// our security mode).
    #[error("replication handshake: refused by the peer (wrong cluster secret or mode?)")]
    RefusedByPeer,
    /// The other side does not speak this handshake (or uses the other security mode).
    #[error("replication handshake: {0}")]
    Mismatch(String),
    /// The handshake did not complete within [`HANDSHAKE_TIMEOUT`].
    #[error("replication handshake not completed within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    /// A frame that does not decrypt or decode, or an unexpected record.
    #[error("replication protocol error: {0}")]
    Protocol(String),
    /// An internal Noise error.
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// No record arrived within the connection's read timeout ([`Connection::recv`]).
    #[error("replication connection: nothing received within {0:?}")]
    RecvTimeout(Duration),
    /// The other side closed the connection.
    #[error("replication connection closed by the peer")]
    Closed,
}

/// The transport keys of an authenticated connection (`None` in plaintext).
pub(crate) type Keys = Option<Arc<StatelessTransportState>>;

fn handshake_io(e: io::Error, on_eof: TransportError) -> TransportError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => on_eof,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout,
        _ => TransportError::Io(e),
    }
}

fn send_small(stream: &mut TcpStream, msg: &[u8]) -> Result<(), TransportError> {
    let len = u32::try_from(msg.len()).map_err(|_| TransportError::Protocol("hello".into()))?;
    let mut frame = len.to_le_bytes().to_vec();
    frame.extend_from_slice(msg);
    stream
        .write_all(&frame)
        .map_err(|e| handshake_io(e, TransportError::RefusedByPeer))
}

fn recv_small(stream: &mut TcpStream, on_eof: TransportError) -> Result<Vec<u8>, TransportError> {
    let mut prefix = [0u8; PREFIX_LEN];
    stream
        .read_exact(&mut prefix)
        .map_err(|e| handshake_io(e, on_eof))?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > 256 {
        return Err(TransportError::Mismatch(format!(
            "handshake frame of {len} bytes"
        )));
    }
    let mut msg = vec![0u8; len];
    stream
        .read_exact(&mut msg)
        .map_err(|e| handshake_io(e, TransportError::RefusedByPeer))?;
    Ok(msg)
}

fn expect_len(msg: &[u8], len: usize, what: &str) -> Result<(), TransportError> {
    if msg.len() == len {
        Ok(())
    } else {
        Err(TransportError::Mismatch(format!(
            "{what} of {} bytes, expected {len} (the other side uses another security mode?)",
            msg.len()
        )))
    }
}

/// Reads the [`MAGIC`] a dialer starts with (within [`HANDSHAKE_TIMEOUT`]); for an acceptor
/// without a dispatcher that already consumed it.
pub fn read_magic(stream: &mut TcpStream) -> Result<(), TransportError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut magic = [0u8; MAGIC.len()];
    stream
        .read_exact(&mut magic)
        .map_err(|e| handshake_io(e, TransportError::RefusedByPeer))?;
    stream.set_read_timeout(None)?;
    if &magic == MAGIC {
        Ok(())
    } else {
        Err(TransportError::Mismatch(
            "not a tandem replication connection (bad magic)".into(),
        ))
    }
}

/// An authenticated replication connection: a TCP stream after the handshake, with its keys
/// and the state of both directions (nonces, buffered bytes).
///
/// [`Connection::send`] and [`Connection::recv`] carry whole [`Record`]s, blocking, for the
/// request and synchronisation phase ([`crate::fullsync`]); then a [`crate::NetReplicator`] (the
/// primary) or a [`crate::Receiver`] (the secondary) takes the connection over, whichever side
/// dialed.
pub struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    encrypted: bool,
    reader: FrameReader,
    writer: FrameWriter,
    read_timeout: Option<Duration>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("encrypted", &self.encrypted)
            .finish()
    }
}

impl Connection {
    /// Connects to `addr` (within [`HANDSHAKE_TIMEOUT`]), writes [`MAGIC`] and runs the
    /// handshake as the initiator.
    pub fn dial(addr: SocketAddr, security: &Security) -> Result<Connection, TransportError> {
        let mut stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream
            .write_all(MAGIC)
            .map_err(|e| handshake_io(e, TransportError::RefusedByPeer))?;
        let keys = handshake(&mut stream, security, true)?;
        Connection::new(stream, keys)
    }

    /// Runs the handshake as the responder on an accepted stream whose [`MAGIC`] was already
    /// consumed (by the port's dispatcher, or [`read_magic`]). A stream that fails it is shut
    /// down.
    pub fn accept(
        mut stream: TcpStream,
        security: &Security,
    ) -> Result<Connection, TransportError> {
        match handshake(&mut stream, security, false) {
            Ok(keys) => Connection::new(stream, keys),
            Err(e) => {
                let peer = stream.peer_addr().ok();
                tracing::warn!(?peer, error = %e, "replication connection refused");
                let _ = stream.shutdown(Shutdown::Both);
                Err(e)
            }
        }
    }

    fn new(stream: TcpStream, keys: Keys) -> Result<Connection, TransportError> {
        Ok(Connection {
            peer: stream.peer_addr()?,
            encrypted: keys.is_some(),
            reader: FrameReader::new(stream.try_clone()?, keys.clone()),
            writer: FrameWriter::new(stream.try_clone()?, keys),
            stream,
            read_timeout: None,
            scratch: Vec::new(),
        })
    }

    /// The other side's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the connection is encrypted (Noise) rather than plaintext.
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// How long [`Connection::recv`] waits for a record (`None`: forever, the default).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        // A zero duration is refused by the socket: it would mean "forever".
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.stream.set_read_timeout(timeout)?;
        self.read_timeout = timeout;
        Ok(())
    }

    /// How long a blocked write may wait for the other side to read (`None`: forever, the
    /// default). A write that timed out leaves the connection unusable.
    pub fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Queues one record (sent when the buffer fills, or at [`Connection::flush`]).
    pub fn write(&mut self, record: &Record<'_>) -> Result<(), TransportError> {
        self.scratch.clear();
        wire::encode(record, &mut self.scratch).map_err(|e| {
            TransportError::Protocol(format!("{} not encodable: {e}", record.kind()))
        })?;
        self.writer.write_frame(&self.scratch).map_err(io_error)
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<(), TransportError> {
        self.writer.flush().map_err(io_error)
    }

    /// Sends one record at once ([`Connection::write`] and [`Connection::flush`]).
    pub fn send(&mut self, record: &Record<'_>) -> Result<(), TransportError> {
        self.write(record)?;
        self.flush()
    }

    /// Waits for the next record (at most the read timeout: [`TransportError::RecvTimeout`],
    /// after which the connection is still usable). The end of the stream is
    /// [`TransportError::Closed`].
    pub fn recv(&mut self) -> Result<Record<'static>, TransportError> {
        let frame = match self.reader.next() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return Err(TransportError::RecvTimeout(
                    self.read_timeout.unwrap_or_default(),
                ));
            }
            Err(TransportError::Io(e)) => return Err(io_error(e)),
            Err(e) => return Err(e),
        };
        wire::decode_frame(&frame)
            .map(Record::into_owned)
            .map_err(|e| TransportError::Protocol(format!("undecodable record: {e}")))
    }

    /// Closes both directions (the other side sees the end of the stream).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// A handle that closes the connection from another thread (to cancel a synchronisation
    /// blocked in [`Connection::recv`] or a write: they fail at once).
    pub fn abort_handle(&self) -> Result<AbortHandle, TransportError> {
        Ok(AbortHandle(self.stream.try_clone()?))
    }

    /// The stream and both directions' states, for a replicator or a receiver taking the
    /// connection over (whatever was queued is flushed first).
    pub(crate) fn into_parts(
        mut self,
    ) -> Result<(TcpStream, SocketAddr, FrameReader, FrameWriter), TransportError> {
        self.flush()?;
        Ok((self.stream, self.peer, self.reader, self.writer))
    }
}

/// Closes a [`Connection`] from another thread ([`Connection::abort_handle`]).
#[derive(Debug)]
pub struct AbortHandle(TcpStream);

impl AbortHandle {
    /// Shuts both directions down: blocked reads and writes of the connection fail, and the
    /// other side sees the end of the stream.
    pub fn abort(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// A socket error, with the end of the stream as [`TransportError::Closed`].
fn io_error(e: io::Error) -> TransportError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => TransportError::Closed,
        _ => TransportError::Io(e),
    }
}

/// Runs the handshake on a fresh connection; `initiator` is the dialer.
pub(crate) fn handshake(
    stream: &mut TcpStream,
    security: &Security,
    initiator: bool,
) -> Result<Keys, TransportError> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let keys = match security {
        Security::Plaintext => {
            if initiator {
                send_small(stream, PLAINTEXT_HELLO)?;
                let reply = recv_small(stream, TransportError::RefusedByPeer)?;
                expect_len(&reply, PLAINTEXT_HELLO.len(), "plaintext hello")?;
                if reply != PLAINTEXT_HELLO {
                    return Err(TransportError::Mismatch("not a plaintext hello".into()));
                }
            } else {
                let hello = recv_small(stream, TransportError::RefusedByPeer)?;
                expect_len(&hello, PLAINTEXT_HELLO.len(), "plaintext hello")?;
                if hello != PLAINTEXT_HELLO {
                    return Err(TransportError::Mismatch("not a plaintext hello".into()));
                }
                send_small(stream, PLAINTEXT_HELLO)?;
            }
            None
        }
        Security::Noise { secret } => {
            let psk = blake3::derive_key(PSK_CONTEXT, secret);
            let params = NOISE_PARAMS.parse()?;
            let builder = Builder::new(params).psk(0, &psk)?;
            let mut buf = [0u8; 256];
            let transport = if initiator {
                let mut noise = builder.build_initiator()?;
                let len = noise.write_message(&[], &mut buf)?;
                send_small(stream, buf.get(..len).unwrap_or_default())?;
                let reply = recv_small(stream, TransportError::RefusedByPeer)?;
                expect_len(&reply, HANDSHAKE_MSG_LEN, "noise reply")?;
                noise
                    .read_message(&reply, &mut buf)
                    .map_err(|_| TransportError::Auth)?;
                noise.into_stateless_transport_mode()?
            } else {
                let mut noise = builder.build_responder()?;
                let first = recv_small(stream, TransportError::RefusedByPeer)?;
                expect_len(&first, HANDSHAKE_MSG_LEN, "noise message")?;
                noise
                    .read_message(&first, &mut buf)
                    .map_err(|_| TransportError::Auth)?;
                let len = noise.write_message(&[], &mut buf)?;
                send_small(stream, buf.get(..len).unwrap_or_default())?;
                noise.into_stateless_transport_mode()?
            };
            Some(Arc::new(transport))
        }
    };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(keys)
}

fn next_nonce(nonce: &mut u64) -> io::Result<u64> {
    let current = *nonce;
    *nonce = current
        .checked_add(1)
        .ok_or_else(|| io::Error::other("noise nonce exhausted"))?;
    Ok(current)
}

/// Writes wire frames to the connection, encrypting them with Noise when keyed.
pub(crate) struct FrameWriter {
    out: BufWriter<TcpStream>,
    keys: Keys,
    nonce: u64,
    scratch: Vec<u8>,
}

impl FrameWriter {
    pub(crate) fn new(stream: TcpStream, keys: Keys) -> FrameWriter {
        FrameWriter {
            out: BufWriter::with_capacity(WRITE_BUFFER, stream),
            keys,
            nonce: 0,
            scratch: Vec::new(),
        }
    }

    /// Queues one whole wire frame (prefix and body); large frames are written through.
    pub(crate) fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let Some(keys) = &self.keys else {
            // Plaintext: the transport frame is the wire frame.
            return self.out.write_all(frame);
        };
        let body = frame.get(PREFIX_LEN..).unwrap_or_default();
        let chunks = body.len().div_ceil(MAX_CHUNK).max(1);
        let total = body.len() + chunks * TAG_LEN;
        let len = u32::try_from(total).map_err(|_| io::Error::other("frame too large"))?;
        // A large frame leaves piece by piece, straight from the encryption buffer to the socket
        // (what is buffered goes first): the receiver decrypts the first pieces while the next
        // are encrypted here, and the data is not copied through the buffer.
        let large = chunks > 1;
        if large {
            self.out.flush()?;
        }
        for index in 0..chunks {
            let start = index * MAX_CHUNK;
            let end = (start + MAX_CHUNK).min(body.len());
            let chunk = body.get(start..end).unwrap_or_default();
            // The first piece carries the frame's length in front.
            let at = if index == 0 { PREFIX_LEN } else { 0 };
            self.scratch.clear();
            self.scratch.resize(at + chunk.len() + TAG_LEN, 0);
            if index == 0 {
                self.scratch[..PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
            }
            let n = keys
                .write_message(next_nonce(&mut self.nonce)?, chunk, &mut self.scratch[at..])
                .map_err(|e| io::Error::other(format!("noise: {e}")))?;
            let piece = &self.scratch[..at + n];
            if large {
                self.out.get_mut().write_all(piece)?;
            } else {
                self.out.write_all(piece)?;
            }
        }
        Ok(())
    }

    /// Sends what is buffered.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads whole frames from the connection, decrypting them when keyed. Keeps a partial frame
/// across read timeouts.
pub(crate) struct FrameReader {
    stream: TcpStream,
    keys: Keys,
    nonce: u64,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    prefix: [u8; PREFIX_LEN],
    prefix_got: usize,
    /// The frame being read (prefix included), and how much of it is filled.
    frame: Option<(Vec<u8>, usize)>,
    /// With Noise: the frame decrypted so far (a prefix placeholder, then the plaintext) and how
    /// many bytes of the frame's body that covers. Pieces are decrypted as they arrive.
    plain: Vec<u8>,
    decrypted: usize,
    /// With Noise: the buffer of the last encrypted frame, reused for the next.
    spare: Vec<u8>,
    /// How long to poll the socket before blocking on it, when the previous message came that
    /// soon ([`FrameReader::set_poll`]); zero: never.
    poll: Duration,
    /// How long the last wait for data lasted (from the call of `fill` to the data).
    last_wait: Option<Duration>,
}

impl FrameReader {
    pub(crate) fn new(stream: TcpStream, keys: Keys) -> FrameReader {
        FrameReader {
            stream,
            keys,
            nonce: 0,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            prefix: [0; PREFIX_LEN],
            prefix_got: 0,
            frame: None,
            plain: Vec::new(),
            decrypted: 0,
            spare: Vec::new(),
            poll: Duration::ZERO,
            last_wait: None,
        }
    }

    /// Polls the socket for up to `poll` before blocking on it, while the last wait for a
    /// message was that short (adaptive: an idle stream blocks at once). A message that
    /// arrives while the reader polls is taken without a wake-up of this thread, which on
    /// virtual machines whose idle CPUs halt costs tens of microseconds per message.
    pub(crate) fn set_poll(&mut self, poll: Duration) {
        self.poll = poll;
    }

    /// Reads without blocking for up to `poll` (see [`FrameReader::set_poll`]): the number of
    /// bytes read into the buffer (0 at the end of the stream), or `None` when nothing came in
    /// time (then the caller blocks).
    fn poll_read(&mut self) -> io::Result<Option<usize>> {
        if self.last_wait.is_none_or(|wait| wait >= self.poll) {
            return Ok(None);
        }
        let started = Instant::now();
        loop {
            match rustix::net::recv(
                &self.stream,
                &mut self.buf[..],
                rustix::net::RecvFlags::DONTWAIT,
            ) {
                Ok((n, _)) => return Ok(Some(n)),
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            if started.elapsed() >= self.poll {
                return Ok(None);
            }
            // Other threads of this CPU go first: the poll only takes what would be idle time.
            std::thread::yield_now();
        }
    }

    /// Decrypts the Noise messages of the frame being read that have fully arrived.
    fn decrypt_ready(&mut self) -> Result<(), TransportError> {
        let FrameReader {
            keys,
            frame,
            plain,
            decrypted,
            nonce,
            ..
        } = self;
        let (Some(keys), Some((frame, got))) = (keys.as_ref(), frame.as_ref()) else {
            return Ok(());
        };
        loop {
            let remaining = frame.len() - PREFIX_LEN - *decrypted;
            let piece_len = remaining.min(NOISE_MAX_MSG);
            if piece_len == 0 || *got - PREFIX_LEN - *decrypted < piece_len {
                return Ok(());
            }
            let from = PREFIX_LEN + *decrypted;
            let piece = &frame[from..from + piece_len];
            let Some(len) = piece_len.checked_sub(TAG_LEN) else {
                return Err(TransportError::Protocol("short noise message".into()));
            };
            let at = plain.len();
            plain.resize(at + len, 0);
            keys.read_message(next_nonce(nonce)?, piece, &mut plain[at..])
                .map_err(|_| TransportError::Protocol("frame does not decrypt".into()))?;
            *decrypted += piece_len;
        }
    }

    /// Shows the frame being read, as far as it arrived (decrypted), to `progress`.
    fn show_progress(&self, progress: &mut dyn FnMut(&[u8])) {
        let Some((frame, got)) = self.frame.as_ref() else {
            return;
        };
        if self.keys.is_some() {
            progress(&self.plain);
        } else {
            progress(&frame[..*got]);
        }
    }

    /// Whether received bytes are waiting in the buffer (a frame, or part of one, can be taken
    /// without reading the socket).
    pub(crate) fn buffered(&self) -> bool {
        self.start < self.end
    }

    /// Fills the read buffer; `Ok(false)` on a read timeout.
    fn fill(&mut self) -> io::Result<bool> {
        self.start = 0;
        self.end = 0;
        let waiting = (!self.poll.is_zero()).then(Instant::now);
        if waiting.is_some() {
            match self.poll_read()? {
                Some(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some(n) => {
                    self.end = n;
                    self.last_wait = waiting.map(|at| at.elapsed());
                    return Ok(true);
                }
                None => {}
            }
        }
        loop {
            match self.stream.read(&mut self.buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end = n;
                    self.last_wait = waiting.map(|at| at.elapsed());
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next whole wire frame (prefix and body, decrypted), or `None` when the read timed
    /// out first (what was read is kept). End of stream is `UnexpectedEof`.
    pub(crate) fn next(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        self.next_with(&mut |_| {})
    }

    /// [`FrameReader::next`], showing a large frame (at least [`PROGRESS_MIN`] bytes) to
    /// `progress` each time more of it arrived: its prefix (a placeholder with Noise) and the
    /// part of the body received (decrypted) so far. Lets the receiver write the start of a
    /// large write while the rest is still on the way.
    pub(crate) fn next_with(
        &mut self,
        progress: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<Vec<u8>>, TransportError> {
        // The prefix.
        while self.frame.is_none() {
            if self.start == self.end && !self.fill()? {
                return Ok(None);
            }
            let n = (PREFIX_LEN - self.prefix_got).min(self.end - self.start);
            self.prefix[self.prefix_got..self.prefix_got + n]
                .copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            self.prefix_got += n;
            if self.prefix_got == PREFIX_LEN {
                let len = u32::from_le_bytes(self.prefix) as usize;
                let max = if self.keys.is_some() {
                    MAX_TRANSPORT_FRAME
                } else {
                    MAX_FRAME
                };
                if len > max || (self.keys.is_some() && len < TAG_LEN) {
                    return Err(TransportError::Protocol(format!("frame of {len} bytes")));
                }
                // With Noise the received (encrypted) frame is only read here: its buffer is kept
                // for the next frame, and not zeroed again (only what arrives is looked at).
                let mut frame = if self.keys.is_some() {
                    std::mem::take(&mut self.spare)
                } else {
                    Vec::new()
                };
                if frame.len() < PREFIX_LEN + len {
                    frame.resize(PREFIX_LEN + len, 0);
                } else {
                    frame.truncate(PREFIX_LEN + len);
                }
                frame[..PREFIX_LEN].copy_from_slice(&self.prefix);
                self.frame = Some((frame, PREFIX_LEN));
                self.prefix_got = 0;
                self.plain.clear();
                if self.keys.is_some() {
                    // The plaintext is at most the frame minus a tag per piece: room for all of
                    // it at once, so that appending the pieces never moves what came before.
                    let pieces = len.div_ceil(NOISE_MAX_MSG).max(1);
                    self.plain
                        .reserve(PREFIX_LEN + len.saturating_sub(pieces * TAG_LEN));
                }
                self.plain.extend_from_slice(&[0; PREFIX_LEN]);
                self.decrypted = 0;
            }
        }
        // The body.
        loop {
            let Some((frame, got)) = self.frame.as_mut() else {
                return Ok(None);
            };
            if *got == frame.len() {
                break;
            }
            let large = frame.len() >= PROGRESS_MIN;
            if self.start < self.end {
                let n = (frame.len() - *got).min(self.end - self.start);
                frame[*got..*got + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                *got += n;
                self.decrypt_ready()?;
                if large {
                    self.show_progress(progress);
                }
            } else if frame.len() - *got >= self.buf.len() {
                // Large rest: straight into the frame.
                match self.stream.read(&mut frame[*got..]) {
                    Ok(0) => return Err(TransportError::Io(io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => {
                        *got += n;
                        self.decrypt_ready()?;
                        if large {
                            self.show_progress(progress);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            } else if !self.fill()? {
                return Ok(None);
            }
        }
        if self.keys.is_none() {
            return Ok(self.frame.take().map(|(frame, _)| frame));
        }
        self.decrypt_ready()?;
        let complete = self
            .frame
            .as_ref()
            .is_some_and(|(frame, _)| self.decrypted == frame.len() - PREFIX_LEN);
        if let Some((frame, _)) = self.frame.take() {
            self.spare = frame;
        }
        if !complete {
            return Err(TransportError::Protocol("short noise message".into()));
        }
        let mut plain = std::mem::take(&mut self.plain);
        let body_len = u32::try_from(plain.len() - PREFIX_LEN)
            .map_err(|_| TransportError::Protocol("frame too large".into()))?;
        plain[..PREFIX_LEN].copy_from_slice(&body_len.to_le_bytes());
        Ok(Some(plain))
    }
}
