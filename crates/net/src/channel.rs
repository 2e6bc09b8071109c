//! The peer channel: one mutually authenticated, encrypted TCP connection between the nodes.
//!
//! # Wire format
//!
//! Everything on the connection is a *frame*: a `u32` big-endian length followed by that many
//! bytes. Frames are capped before any allocation: [`HANDSHAKE_MAX_FRAME`] until both sides are
//! authenticated, [`MAX_FRAME_LEN`] (1 MiB) afterwards; a longer length closes the connection.
//!
//! 1. **Noise handshake**, `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`, PSK =
//!    `blake3::derive_key("tandem 2026-11 channel psk v1", cluster_secret)`. The dialer is the
//!    Noise initiator. Two handshake messages, one frame each, with empty payloads (48 bytes
//!    each). Knowing the PSK is the authentication: with a wrong secret the responder cannot
//!    decrypt the first message and closes, and the initiator sees the connection closed.
//! 2. **Transport frames.** After the handshake, one frame carries one [`ChannelMessage`]
//!    (postcard, [`ChannelMessage::encode`]). Noise transport messages are at most 65535 bytes,
//!    so the plaintext is cut into chunks of at most 65519 bytes (65535 minus the 16-byte tag),
//!    each encrypted as one Noise message with the next nonce, and the ciphertexts are
//!    concatenated in the frame. The receiver cuts the frame back into 65535-byte pieces (the
//!    last one may be shorter) and decrypts them in order. Nonces count Noise messages per
//!    direction from 0; TCP keeps them in order.
//! 3. **Identification.** The dialer sends `Hello{node, version}`; the acceptor checks that
//!    `node` is its configured peer (never its own name: a reflected connection) and that the
//!    version is its own, then answers with its own `Hello`; the dialer checks it the same way
//!    and confirms with a `Ping`. Only then does either side report [`NetEvent::ChannelUp`], so a
//!    side that refuses the other never makes it flap up and down. The whole of steps 1 and 3
//!    must complete within [`HANDSHAKE_TIMEOUT`].
//! 4. **Traffic.** Each side sends a `Ping` when it has sent nothing for [`PING_INTERVAL`], and
//!    closes the connection when it has received nothing for [`IDLE_TIMEOUT`]. `Ping` and
//!    `Hello` are consumed here; every other message becomes [`NetEvent::Channel`].
//!
//! # Connection management
//!
//! Both nodes listen. The node with the lexicographically smaller name dials (retrying with a
//! backoff from [`BACKOFF_MIN`] to [`BACKOFF_MAX`] while it has no channel); the other only
//! accepts. At most one channel is established: a newer authenticated connection replaces the
//! current one (the peer restarted), reported as `ChannelDown` then `ChannelUp`. At most
//! [`MAX_UNAUTHENTICATED`] accepted connections may be in their handshake at a time; more are
//! closed at once. Failed handshakes, wrong peers and garbage are reported as rate-limited
//! [`NetEvent::Refused`] with `channel = "tcp"`; a peer that is simply not listening is not.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use snow::params::NoiseParams;
use snow::{Builder, StatelessTransportState};
use tandem_proto::{ChannelMessage, PROTOCOL_VERSION};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::refusal::Reporter;
use crate::{NetConfig, NetError, NetEvent};

/// The Noise protocol of the channel.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Key-derivation context of the channel PSK.
pub const PSK_CONTEXT: &str = "tandem 2026-11 channel psk v1";
/// Largest frame accepted once authenticated.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Largest frame accepted during the handshake (the real ones are 48 bytes, Hellos a few dozen).
pub const HANDSHAKE_MAX_FRAME: usize = 4096;
/// Deadline for the Noise handshake plus the Hello exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for a TCP connect by the dialer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most accepted connections that may be in their handshake at the same time.
pub const MAX_UNAUTHENTICATED: usize = 8;
/// A `Ping` is sent after this long without sending anything.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// The connection is closed after this long without receiving anything.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for writing one frame to the socket.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay of the dialer.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay of the dialer.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Messages queued for the current connection; beyond it the oldest is dropped.
pub const OUTBOX_CAPACITY: usize = 256;

/// Largest Noise message.
const NOISE_MAX_MSG: usize = 65535;
/// Size of the authentication tag of a Noise message.
const TAG_LEN: usize = 16;
/// Largest plaintext chunk of one Noise transport message.
const MAX_CHUNK: usize = NOISE_MAX_MSG - TAG_LEN;
/// Size of each of the two handshake messages (ephemeral key + tag of the empty payload).
const HANDSHAKE_MSG_LEN: usize = 32 + TAG_LEN;
/// Pause after a failed `accept` (e.g. out of file descriptors), so it cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

/// What the channel tasks need to know, fixed for the life of a `Net`.
pub(crate) struct Setup {
    local_name: String,
    peer_name: String,
    local_ip: IpAddr,
    listen_addr: SocketAddr,
    peer_addr: SocketAddr,
    psk: [u8; 32],
    params: NoiseParams,
    dial: bool,
    /// Where accepted replication connections go (see [`crate::REPLICATION_MAGIC`]).
    pub(crate) replication: Option<std::sync::mpsc::SyncSender<crate::ReplicationStream>>,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Setup")
            .field("local_name", &self.local_name)
            .field("peer_name", &self.peer_name)
            .field("listen_addr", &self.listen_addr)
            .field("peer_addr", &self.peer_addr)
            .field("dial", &self.dial)
            .finish_non_exhaustive()
    }
}

impl Setup {
    /// Derives the channel setup from a validated configuration.
    pub(crate) fn new(config: &NetConfig) -> Result<Setup, NetError> {
        let addrs = config.networks.get(config.channel_network).ok_or_else(|| {
            NetError::Config(format!(
                "channel_network {} does not exist ({} networks)",
                config.channel_network,
                config.networks.len()
            ))
        })?;
        let params: NoiseParams = NOISE_PARAMS
            .parse()
            .map_err(|error: snow::Error| NetError::Noise(error.to_string()))?;
        Ok(Setup {
            local_name: config.local_name.clone(),
            peer_name: config.peer_name.clone(),
            local_ip: addrs.local,
            listen_addr: SocketAddr::new(addrs.local, config.channel_port),
            peer_addr: SocketAddr::new(addrs.peer, config.channel_port),
            psk: blake3::derive_key(PSK_CONTEXT, &config.cluster_secret),
            params,
            dial: config.local_name < config.peer_name,
            replication: None,
        })
    }

    /// Binds the listening socket.
    pub(crate) fn listen(&self) -> Result<TcpListener, NetError> {
        let addr = self.listen_addr;
        let fail = |source| NetError::BindChannel { addr, source };
        let socket = new_tcp_socket(addr.ip()).map_err(fail)?;
        // Lets a restarted daemon listen again while old connections linger in TIME_WAIT.
        socket.set_reuseaddr(true).map_err(fail)?;
        socket.bind(addr).map_err(fail)?;
        socket.listen(64).map_err(fail)
    }

    fn noise(&self) -> snow::Builder<'_> {
        Builder::new(self.params.clone())
    }
}

fn new_tcp_socket(ip: IpAddr) -> io::Result<TcpSocket> {
    if ip.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Messages waiting to be written to the current connection.
///
/// Messages given while no channel is established are dropped: they were meant for a peer that
/// is not there, and the daemon sends its current snapshot again on `ChannelUp`. A queued
/// `Snapshot` is replaced by a newer one (snapshots are full states: only the latest matters);
/// beyond [`OUTBOX_CAPACITY`] the oldest message is dropped.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct OutboxState {
    connected: bool,
    queue: VecDeque<ChannelMessage>,
}

impl Outbox {
    fn state(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        // The critical sections cannot panic half-way through an update; a poisoned lock still
        // holds a consistent queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a message for the current connection, if any.
    pub(crate) fn push(&self, message: ChannelMessage) {
        {
            let mut state = self.state();
            if !state.connected {
                tracing::debug!("channel message dropped: no channel established");
                return;
            }
            let queued_snapshot = match &message {
                ChannelMessage::Snapshot(_) => state
                    .queue
                    .iter_mut()
                    .find(|queued| matches!(queued, ChannelMessage::Snapshot(_))),
                _ => None,
            };
            if let Some(queued) = queued_snapshot {
                *queued = message;
            } else {
                if state.queue.len() >= OUTBOX_CAPACITY {
                    state.queue.pop_front();
                    tracing::debug!("channel outbox full: oldest message dropped");
                }
                state.queue.push_back(message);
            }
        }
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<ChannelMessage> {
        self.state().queue.pop_front()
    }

    fn connect(&self) {
        let mut state = self.state();
        state.queue.clear();
        state.connected = true;
    }

    fn disconnect(&self) {
        let mut state = self.state();
        state.queue.clear();
        state.connected = false;
    }
}

/// Why a handshake (Noise plus Hello exchange) failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("handshake not completed within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    #[error("not a tandem channel handshake ({0})")]
    Garbage(String),
    #[error("authentication failed (wrong cluster secret?)")]
    Auth,
    #[error("connection closed before completing the handshake")]
    Closed,
    #[error("the peer closed the connection during the handshake (wrong cluster secret?)")]
    ClosedByPeer,
    #[error("the peer closed the connection after our Hello (it refused our name or version?)")]
    RefusedByPeer,
    #[error("connection error during the handshake: {0}")]
    Io(io::Error),
    #[error("reflected connection: the other side claims our own name '{0}'")]
    Reflected(String),
    #[error("the other side is node '{0}', expected the peer '{1}'")]
    WrongPeer(String, String),
    #[error("the other side speaks protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("protocol error during the handshake: {0}")]
    Protocol(&'static str),
    #[error("internal Noise error: {0}")]
    Internal(snow::Error),
    #[error("handshake task failed: {0}")]
    Task(String),
}

impl HandshakeError {
    /// The class used to rate-limit refusals, or `None` when this is not a refusal to report
    /// (the peer is not there, or a local failure).
    fn refusal_kind(&self) -> Option<&'static str> {
        match self {
            HandshakeError::Connect(_) => None,
            HandshakeError::Internal(_) | HandshakeError::Task(_) => None,
            HandshakeError::Timeout => Some("timeout"),
            HandshakeError::Garbage(_) | HandshakeError::Protocol(_) => Some("garbage"),
            HandshakeError::Auth | HandshakeError::ClosedByPeer => Some("auth"),
            HandshakeError::Closed | HandshakeError::Io(_) => Some("closed"),
            HandshakeError::RefusedByPeer => Some("refused"),
            HandshakeError::Reflected(_) => Some("reflected"),
            HandshakeError::WrongPeer(..) => Some("node"),
            HandshakeError::Version(_) => Some("version"),
        }
    }
}

/// The cipher states and nonces of an authenticated connection.
struct Secure {
    transport: StatelessTransportState,
    send_nonce: u64,
    recv_nonce: u64,
}

/// A connection that completed the handshake and the Hello exchange.
struct Established {
    wire: Wire,
    secure: Secure,
    peer_addr: SocketAddr,
}

/// Errors of sealing or opening a transport frame.
#[derive(Debug, thiserror::Error)]
enum CryptoError {
    #[error("message of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    #[error("frame does not decrypt")]
    Decrypt,
    #[error("nonce exhausted")]
    Nonce,
}

fn next_nonce(nonce: &mut u64) -> Result<u64, CryptoError> {
    let current = *nonce;
    *nonce = current.checked_add(1).ok_or(CryptoError::Nonce)?;
    Ok(current)
}

/// Encrypts one plaintext into one frame (see the module documentation).
fn seal(
    transport: &StatelessTransportState,
    nonce: &mut u64,
    plaintext: &[u8],
) -> Result<Bytes, CryptoError> {
    let chunks = plaintext.len().div_ceil(MAX_CHUNK).max(1);
    let total = plaintext.len() + chunks * TAG_LEN;
    if total > MAX_FRAME_LEN {
        return Err(CryptoError::TooLarge(plaintext.len()));
    }
    let mut frame = BytesMut::zeroed(total);
    let mut offset = 0;
    for index in 0..chunks {
        let start = index * MAX_CHUNK;
        let end = (start + MAX_CHUNK).min(plaintext.len());
        let chunk = plaintext.get(start..end).unwrap_or_default();
        let out = frame
            .get_mut(offset..offset + chunk.len() + TAG_LEN)
            .ok_or(CryptoError::Decrypt)?;
        let written = transport
            .write_message(next_nonce(nonce)?, chunk, out)
            .map_err(|_| CryptoError::TooLarge(plaintext.len()))?;
        offset += written;
    }
    frame.truncate(offset);
    Ok(frame.freeze())
}

/// Decrypts one frame back into its plaintext.
fn open(
    transport: &StatelessTransportState,
    nonce: &mut u64,
    frame: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if frame.is_empty() {
        return Err(CryptoError::Decrypt);
    }
    let mut plaintext = Vec::with_capacity(frame.len());
    for piece in frame.chunks(NOISE_MAX_MSG) {
        let Some(len) = piece.len().checked_sub(TAG_LEN) else {
            return Err(CryptoError::Decrypt);
        };
        let start = plaintext.len();
        plaintext.resize(start + len, 0);
        let out = plaintext.get_mut(start..).ok_or(CryptoError::Decrypt)?;
        transport
            .read_message(next_nonce(nonce)?, piece, out)
            .map_err(|_| CryptoError::Decrypt)?;
    }
    Ok(plaintext)
}

fn handshake_codec() -> LengthDelimitedCodec {
    // Default length field: u32, big-endian, not counting itself.
    LengthDelimitedCodec::builder()
        .max_frame_length(HANDSHAKE_MAX_FRAME)
        .new_codec()
}

/// Receives one handshake-phase frame; `on_close` is the error for a clean close.
async fn recv_frame(wire: &mut Wire, on_close: HandshakeError) -> Result<BytesMut, HandshakeError> {
    match wire.next().await {
        None => Err(on_close),
        Some(Ok(frame)) => Ok(frame),
        Some(Err(error)) if error.kind() == io::ErrorKind::InvalidData => {
            Err(HandshakeError::Garbage(error.to_string()))
        }
        Some(Err(error)) => Err(HandshakeError::Io(error)),
    }
}

async fn send_frame(wire: &mut Wire, frame: Bytes) -> Result<(), HandshakeError> {
    wire.send(frame).await.map_err(HandshakeError::Io)
}

/// Sends one message during the identification step.
async fn send_message(
    wire: &mut Wire,
    secure: &mut Secure,
    message: &ChannelMessage,
) -> Result<(), HandshakeError> {
    let frame = seal(&secure.transport, &mut secure.send_nonce, &message.encode())
        .map_err(|_| HandshakeError::Protocol("cannot seal a handshake message"))?;
    send_frame(wire, frame).await
}

/// Receives one message during the identification step.
async fn recv_message(
    wire: &mut Wire,
    secure: &mut Secure,
    on_close: HandshakeError,
) -> Result<ChannelMessage, HandshakeError> {
    let frame = recv_frame(wire, on_close).await?;
    let plaintext = open(&secure.transport, &mut secure.recv_nonce, &frame)
        .map_err(|_| HandshakeError::Auth)?;
    ChannelMessage::decode(&plaintext)
        .map_err(|_| HandshakeError::Protocol("malformed message after the Noise handshake"))
}

/// Checks the other side's `Hello`.
fn check_hello(setup: &Setup, message: ChannelMessage) -> Result<(), HandshakeError> {
    let ChannelMessage::Hello { node, version } = message else {
        return Err(HandshakeError::Protocol("the first message is not a Hello"));
    };
    if node == setup.local_name {
        return Err(HandshakeError::Reflected(node));
    }
    if node != setup.peer_name {
        return Err(HandshakeError::WrongPeer(node, setup.peer_name.clone()));
    }
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(version));
    }
    Ok(())
}

fn hello(setup: &Setup) -> ChannelMessage {
    ChannelMessage::Hello {
        node: setup.local_name.clone(),
        version: PROTOCOL_VERSION,
    }
}

/// Tells a replication connection (it starts with [`crate::REPLICATION_MAGIC`]) from a channel
/// connection: the former is handed to the replication adapter, magic consumed (`None`); the
/// latter is returned for the channel handshake. Nothing is consumed from a channel connection.
async fn classify(
    mut stream: TcpStream,
    from: SocketAddr,
    setup: &Setup,
) -> Result<Option<TcpStream>, HandshakeError> {
    let magic = &crate::REPLICATION_MAGIC;
    let mut buffer = [0u8; 8];
    loop {
        let n = stream.peek(&mut buffer).await.map_err(HandshakeError::Io)?;
        if n == 0 || buffer[..n] != magic[..n] {
            return Ok(Some(stream));
        }
        if n == magic.len() {
            break;
        }
        // A prefix of the magic so far: wait for the rest (bounded by the handshake timeout).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stream
        .read_exact(&mut buffer)
        .await
        .map_err(HandshakeError::Io)?;
    let Some(sink) = &setup.replication else {
        return Err(HandshakeError::Garbage(
            "replication connection, but this node does not replicate".into(),
        ));
    };
    let stream = stream
        .into_std()
        .and_then(|stream| stream.set_nonblocking(false).map(|()| stream))
        .map_err(HandshakeError::Io)?;
    if sink
        .try_send(crate::ReplicationStream { stream, from })
        .is_err()
    {
        return Err(HandshakeError::Garbage(
            "replication connection refused: too many waiting".into(),
        ));
    }
    Ok(None)
}

/// The accepting side of the handshake (Noise responder).
async fn respond(
    stream: TcpStream,
    peer_addr: SocketAddr,
    setup: &Setup,
) -> Result<Established, HandshakeError> {
    let _ = stream.set_nodelay(true);
    let mut wire = Framed::new(stream, handshake_codec());
    let mut noise = setup
        .noise()
        .psk(0, &setup.psk)
        .and_then(Builder::build_responder)
        .map_err(HandshakeError::Internal)?;
    let mut buffer = [0u8; HANDSHAKE_MAX_FRAME];

    let first = recv_frame(&mut wire, HandshakeError::Closed).await?;
    if first.len() != HANDSHAKE_MSG_LEN {
        return Err(HandshakeError::Garbage(format!(
            "first frame of {} bytes, expected {HANDSHAKE_MSG_LEN}",
            first.len()
        )));
    }
    noise
        .read_message(&first, &mut buffer)
        .map_err(|_| HandshakeError::Auth)?;
    let len = noise
        .write_message(&[], &mut buffer)
        .map_err(HandshakeError::Internal)?;
    let reply = Bytes::copy_from_slice(buffer.get(..len).unwrap_or_default());
    send_frame(&mut wire, reply).await?;
    let transport = noise
        .into_stateless_transport_mode()
        .map_err(HandshakeError::Internal)?;
    let mut secure = Secure {
        transport,
        send_nonce: 0,
        recv_nonce: 0,
    };

    let their_hello = recv_message(&mut wire, &mut secure, HandshakeError::Closed).await?;
    check_hello(setup, their_hello)?;
    send_message(&mut wire, &mut secure, &hello(setup)).await?;
    match recv_message(&mut wire, &mut secure, HandshakeError::RefusedByPeer).await? {
        ChannelMessage::Ping => {}
        _ => return Err(HandshakeError::Protocol("expected the confirmation Ping")),
    }
    wire.codec_mut().set_max_frame_length(MAX_FRAME_LEN);
    Ok(Established {
        wire,
        secure,
        peer_addr,
    })
}

/// The dialing side: connect, then the handshake (Noise initiator).
async fn dial(setup: &Setup) -> Result<Established, HandshakeError> {
    let socket = new_tcp_socket(setup.local_ip).map_err(HandshakeError::Connect)?;
    // Leave from this node's address on the channel network, so routing follows that network.
    socket
        .bind(SocketAddr::new(setup.local_ip, 0))
        .map_err(HandshakeError::Connect)?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(setup.peer_addr))
        .await
        .map_err(|_| {
            HandshakeError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        })?
        .map_err(HandshakeError::Connect)?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, initiate(stream, setup))
        .await
        .unwrap_or(Err(HandshakeError::Timeout))
}

async fn initiate(stream: TcpStream, setup: &Setup) -> Result<Established, HandshakeError> {
    let _ = stream.set_nodelay(true);
    let peer_addr = stream.peer_addr().unwrap_or(setup.peer_addr);
    let mut wire = Framed::new(stream, handshake_codec());
    let mut noise = setup
        .noise()
        .psk(0, &setup.psk)
        .and_then(Builder::build_initiator)
        .map_err(HandshakeError::Internal)?;
    let mut buffer = [0u8; HANDSHAKE_MAX_FRAME];

    let len = noise
        .write_message(&[], &mut buffer)
        .map_err(HandshakeError::Internal)?;
    send_frame(
        &mut wire,
        Bytes::copy_from_slice(buffer.get(..len).unwrap_or_default()),
    )
    .await?;
    let reply = recv_frame(&mut wire, HandshakeError::ClosedByPeer).await?;
    if reply.len() != HANDSHAKE_MSG_LEN {
        return Err(HandshakeError::Garbage(format!(
            "handshake reply of {} bytes, expected {HANDSHAKE_MSG_LEN}",
            reply.len()
        )));
    }
    noise
        .read_message(&reply, &mut buffer)
        .map_err(|_| HandshakeError::Auth)?;
    let transport = noise
        .into_stateless_transport_mode()
        .map_err(HandshakeError::Internal)?;
    let mut secure = Secure {
        transport,
        send_nonce: 0,
        recv_nonce: 0,
    };

    send_message(&mut wire, &mut secure, &hello(setup)).await?;
    let their_hello = recv_message(&mut wire, &mut secure, HandshakeError::RefusedByPeer).await?;
    check_hello(setup, their_hello)?;
    send_message(&mut wire, &mut secure, &ChannelMessage::Ping).await?;
    wire.codec_mut().set_max_frame_length(MAX_FRAME_LEN);
    Ok(Established {
        wire,
        secure,
        peer_addr,
    })
}

/// Runs one established connection until it fails, times out or is cancelled; returns why it
/// ended.
async fn run_connection(
    established: Established,
    events: mpsc::Sender<NetEvent>,
    outbox: Arc<Outbox>,
    cancel: CancellationToken,
) -> String {
    let Established { wire, secure, .. } = established;
    let Secure {
        transport,
        send_nonce,
        recv_nonce,
    } = secure;
    let (sink, stream) = wire.split();
    // Reading and writing run concurrently (so two large writes in opposite directions cannot
    // deadlock), in this one task; they share the cipher states by reference.
    tokio::select! {
        () = cancel.cancelled() => "channel closed".to_string(),
        reason = read_loop(stream, &transport, recv_nonce, &events) => reason,
        reason = write_loop(sink, &transport, send_nonce, &outbox) => reason,
    }
}

async fn read_loop(
    mut stream: SplitStream<Wire>,
    transport: &StatelessTransportState,
    mut nonce: u64,
    events: &mpsc::Sender<NetEvent>,
) -> String {
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await {
            Err(_) => {
                return format!(
                    "nothing received from the peer for {} s",
                    IDLE_TIMEOUT.as_secs()
                );
            }
            Ok(None) => return "the peer closed the connection".to_string(),
            Ok(Some(Err(error))) => return format!("receive error: {error}"),
            Ok(Some(Ok(frame))) => frame,
        };
        let plaintext = match open(transport, &mut nonce, &frame) {
            Ok(plaintext) => plaintext,
            Err(error) => return format!("bad frame from the peer: {error}"),
        };
        match ChannelMessage::decode(&plaintext) {
            Ok(ChannelMessage::Ping) => {}
            Ok(ChannelMessage::Hello { .. }) => {
                tracing::debug!("unexpected Hello on an established channel ignored");
            }
            Ok(message) => {
                if events.send(NetEvent::Channel(message)).await.is_err() {
                    return "event receiver closed".to_string();
                }
            }
            Err(error) => return format!("malformed message from the peer: {error}"),
        }
    }
}

async fn write_loop(
    mut sink: SplitSink<Wire, Bytes>,
    transport: &StatelessTransportState,
    mut nonce: u64,
    outbox: &Outbox,
) -> String {
    let mut last_sent = Instant::now();
    loop {
        let message = match outbox.pop() {
            Some(message) => message,
            None => {
                tokio::select! {
                    () = outbox.notify.notified() => continue,
                    () = tokio::time::sleep_until(last_sent + PING_INTERVAL) => ChannelMessage::Ping,
                }
            }
        };
        let frame = match seal(transport, &mut nonce, &message.encode()) {
            Ok(frame) => frame,
            Err(CryptoError::TooLarge(len)) => {
                tracing::warn!(len, "channel message too large for one frame: dropped");
                continue;
            }
            Err(error) => return format!("cannot encrypt: {error}"),
        };
        match tokio::time::timeout(WRITE_TIMEOUT, sink.send(frame)).await {
            Err(_) => {
                return format!(
                    "the peer did not take data for {} s",
                    WRITE_TIMEOUT.as_secs()
                );
            }
            Ok(Err(error)) => return format!("send error: {error}"),
            Ok(Ok(())) => last_sent = Instant::now(),
        }
    }
}

/// The background task that owns the listener, the dialer and the current connection.
pub(crate) struct Channel {
    setup: Arc<Setup>,
    listener: TcpListener,
    outbox: Arc<Outbox>,
    events: mpsc::Sender<NetEvent>,
    reporter: Arc<Reporter>,
}

/// `Ok(None)`: the connection was a replication connection, handed over.
type AcceptResult = (SocketAddr, Result<Option<Established>, HandshakeError>);

impl Channel {
    pub(crate) fn new(
        setup: Setup,
        listener: TcpListener,
        outbox: Arc<Outbox>,
        events: mpsc::Sender<NetEvent>,
        reporter: Arc<Reporter>,
    ) -> Channel {
        Channel {
            setup: Arc::new(setup),
            listener,
            outbox,
            events,
            reporter,
        }
    }

    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut accepting: JoinSet<AcceptResult> = JoinSet::new();
        let mut dialing: JoinSet<Result<Established, HandshakeError>> = JoinSet::new();
        // At most one task: the established connection; `current` cancels it.
        let mut connection: JoinSet<String> = JoinSet::new();
        let mut current: Option<CancellationToken> = None;
        let mut backoff = BACKOFF_MIN;
        let dial_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(dial_timer);

        loop {
            let may_dial = self.setup.dial && current.is_none() && dialing.is_empty();
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, from)) => self.on_accept(stream, from, &mut accepting),
                    Err(error) => {
                        tracing::debug!(%error, "accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        }
                    }
                },
                Some(joined) = accepting.join_next() => {
                    // A handshake task cannot panic by construction; if one did, its slot is
                    // simply freed.
                    if let Ok((from, result)) = joined {
                        match result {
                            Ok(Some(established)) => {
                                if !self
                                    .install(established, &mut current, &mut connection, &shutdown)
                                    .await
                                {
                                    break;
                                }
                                backoff = BACKOFF_MIN;
                            }
                            Ok(None) => {}
                            Err(error) => self.report(from, &error),
                        }
                    }
                }
                Some(joined) = dialing.join_next() => {
                    let result = joined
                        .unwrap_or_else(|error| Err(HandshakeError::Task(error.to_string())));
                    match result {
                        Ok(established) => {
                            if !self
                                .install(established, &mut current, &mut connection, &shutdown)
                                .await
                            {
                                break;
                            }
                            backoff = BACKOFF_MIN;
                        }
                        Err(error) => {
                            self.report(self.setup.peer_addr, &error);
                            dial_timer.as_mut().reset(Instant::now() + backoff);
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                Some(joined) = connection.join_next() => {
                    let reason = joined.unwrap_or_else(|error| format!("channel task failed: {error}"));
                    current = None;
                    self.outbox.disconnect();
                    if !self.emit(NetEvent::ChannelDown { reason }, &shutdown).await {
                        break;
                    }
                    if self.setup.dial {
                        dial_timer.as_mut().reset(Instant::now() + backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                () = &mut dial_timer, if may_dial => {
                    let setup = Arc::clone(&self.setup);
                    dialing.spawn(async move { dial(&setup).await });
                }
            }
        }
        // Closes the connection and abandons handshakes in progress.
        self.outbox.disconnect();
        connection.shutdown().await;
        accepting.shutdown().await;
        dialing.shutdown().await;
    }

    fn on_accept(
        &self,
        stream: TcpStream,
        from: SocketAddr,
        accepting: &mut JoinSet<AcceptResult>,
    ) {
        if accepting.len() >= MAX_UNAUTHENTICATED {
            drop(stream);
            self.reporter.refuse(
                from,
                "tcp",
                "busy",
                format!(
                    "too many unauthenticated connections (limit {MAX_UNAUTHENTICATED}): closed"
                ),
            );
            return;
        }
        let setup = Arc::clone(&self.setup);
        accepting.spawn(async move {
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                match classify(stream, from, &setup).await? {
                    Some(stream) => respond(stream, from, &setup).await.map(Some),
                    None => Ok(None),
                }
            })
            .await
            .unwrap_or(Err(HandshakeError::Timeout));
            (from, result)
        });
    }

    fn report(&self, from: SocketAddr, error: &HandshakeError) {
        match error.refusal_kind() {
            Some(kind) => self.reporter.refuse(from, "tcp", kind, error.to_string()),
            None => tracing::debug!(%from, %error, "channel handshake not completed"),
        }
    }

    /// Makes `established` the channel, replacing the current one if any. Returns `false` when
    /// the task must stop (shutting down, or nobody receives events any more).
    async fn install(
        &self,
        established: Established,
        current: &mut Option<CancellationToken>,
        connection: &mut JoinSet<String>,
        shutdown: &CancellationToken,
    ) -> bool {
        if let Some(old) = current.take() {
            old.cancel();
            while connection.join_next().await.is_some() {}
            self.outbox.disconnect();
            let reason = "replaced by a newer connection from the peer".to_string();
            if !self.emit(NetEvent::ChannelDown { reason }, shutdown).await {
                return false;
            }
        }
        let peer_addr = established.peer_addr;
        tracing::debug!(%peer_addr, "channel established");
        self.outbox.connect();
        // Reported before the connection task starts, so ChannelUp precedes its messages.
        if !self.emit(NetEvent::ChannelUp { peer_addr }, shutdown).await {
            return false;
        }
        let token = shutdown.child_token();
        connection.spawn(run_connection(
            established,
            self.events.clone(),
            Arc::clone(&self.outbox),
            token.clone(),
        ));
        *current = Some(token);
        true
    }

    /// Delivers a state event; `false` when shutting down or nobody listens any more.
    async fn emit(&self, event: NetEvent, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => false,
            sent = self.events.send(event) => sent.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (StatelessTransportState, StatelessTransportState) {
        let params: NoiseParams = NOISE_PARAMS.parse().expect("valid params");
        let psk = blake3::derive_key(PSK_CONTEXT, b"secret");
        let mut initiator = Builder::new(params.clone())
            .psk(0, &psk)
            .and_then(Builder::build_initiator)
            .expect("initiator");
        let mut responder = Builder::new(params)
            .psk(0, &psk)
            .and_then(Builder::build_responder)
            .expect("responder");
        let mut message = [0u8; 1024];
        let mut payload = [0u8; 1024];
        let len = initiator.write_message(&[], &mut message).expect("write 1");
        assert_eq!(len, HANDSHAKE_MSG_LEN);
        responder
            .read_message(&message[..len], &mut payload)
            .expect("read 1");
        let len = responder.write_message(&[], &mut message).expect("write 2");
        assert_eq!(len, HANDSHAKE_MSG_LEN);
        initiator
            .read_message(&message[..len], &mut payload)
            .expect("read 2");
        (
            initiator
                .into_stateless_transport_mode()
                .expect("transport"),
            responder
                .into_stateless_transport_mode()
                .expect("transport"),
        )
    }

    #[test]
    fn seal_open_round_trip_across_chunk_sizes() {
        let (initiator, responder) = pair();
        let (mut send_nonce, mut recv_nonce) = (0u64, 0u64);
        for size in [
            0,
            1,
            MAX_CHUNK - 1,
            MAX_CHUNK,
            MAX_CHUNK + 1,
            3 * MAX_CHUNK,
            500_000,
        ] {
            let plaintext: Vec<u8> = (0..size).map(|index| (index % 251) as u8).collect();
            let frame = seal(&initiator, &mut send_nonce, &plaintext).expect("seal");
            assert!(frame.len() <= MAX_FRAME_LEN);
            let opened = open(&responder, &mut recv_nonce, &frame).expect("open");
            assert_eq!(opened, plaintext, "size {size}");
            assert_eq!(send_nonce, recv_nonce);
        }
    }

    #[test]
    fn too_large_and_tampered_frames_are_rejected() {
        let (initiator, responder) = pair();
        let mut nonce = 0u64;
        assert!(matches!(
            seal(&initiator, &mut nonce, &vec![0u8; MAX_FRAME_LEN]),
            Err(CryptoError::TooLarge(_))
        ));
        let mut send_nonce = 0u64;
        let frame = seal(&initiator, &mut send_nonce, b"hello").expect("seal");
        let mut tampered = frame.to_vec();
        tampered[3] ^= 1;
        assert!(open(&responder, &mut 0u64, &tampered).is_err());
        assert!(open(&responder, &mut 0u64, &[]).is_err());
        assert!(open(&responder, &mut 0u64, &[1, 2, 3]).is_err());
        // Replaying a frame under the next nonce fails too.
        let mut recv_nonce = 0u64;
        assert!(open(&responder, &mut recv_nonce, &frame).is_ok());
        assert!(open(&responder, &mut recv_nonce, &frame).is_err());
    }

    #[test]
    fn outbox_keeps_latest_snapshot_and_drops_while_down() {
        let outbox = Outbox::default();
        outbox.push(ChannelMessage::Ping);
        assert!(outbox.pop().is_none(), "queued while no channel is up");
        outbox.connect();
        let snapshot = |incarnation| {
            ChannelMessage::Snapshot(tandem_proto::NodeSnapshot {
                node: "node1".into(),
                incarnation,
                seq: 0,
                modules: Vec::new(),
            })
        };
        outbox.push(snapshot(1));
        outbox.push(ChannelMessage::Ping);
        outbox.push(snapshot(2));
        assert_eq!(outbox.pop(), Some(snapshot(2)));
        assert_eq!(outbox.pop(), Some(ChannelMessage::Ping));
        assert_eq!(outbox.pop(), None);
        for _ in 0..OUTBOX_CAPACITY + 10 {
            outbox.push(ChannelMessage::Ping);
        }
        assert_eq!(outbox.state().queue.len(), OUTBOX_CAPACITY);
        outbox.disconnect();
        assert_eq!(outbox.pop(), None);
    }
}
