//! The replication connection: authentication, encryption and framing over one TCP stream.
//!
//! # Wire format
//!
//! Every message on the connection is a frame: a `u32` little-endian length, then that many
//! bytes.
//!
//! 1. **Handshake** (the primary dials and speaks first; each message is one frame):
//!    - [`Security::Noise`]: `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` (as the control channel of
//!      `tandem-net`), PSK = `blake3::derive_key(`[`PSK_CONTEXT`]`, cluster_secret)` — a context
//!      distinct from the control channel's, so the two keys differ. Two 48-byte messages with
//!      empty payloads. With a wrong secret the receiver cannot decrypt the first message and
//!      closes the connection: the primary sees it closed ([`TransportError::RefusedByPeer`]).
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

use std::io::{self, BufWriter, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use snow::{Builder, StatelessTransportState};

use crate::wire::{MAX_FRAME, PREFIX_LEN};

/// The Noise protocol of the replication connection.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Key-derivation context of the replication PSK (distinct from the control channel's).
pub const PSK_CONTEXT: &str = "tandem 2026-11 replication psk v1";
/// What each side sends first in [`Security::Plaintext`] mode.
pub const PLAINTEXT_HELLO: &[u8] = b"tandem replication plaintext v1";
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

/// Runs the handshake on a fresh connection; `initiator` is the primary (the dialer).
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
        self.scratch.clear();
        self.scratch.resize(PREFIX_LEN + total, 0);
        self.scratch[..PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
        let mut at = PREFIX_LEN;
        for index in 0..chunks {
            let start = index * MAX_CHUNK;
            let end = (start + MAX_CHUNK).min(body.len());
            let chunk = body.get(start..end).unwrap_or_default();
            let out = self
                .scratch
                .get_mut(at..at + chunk.len() + TAG_LEN)
                .ok_or_else(|| io::Error::other("noise buffer"))?;
            at += keys
                .write_message(next_nonce(&mut self.nonce)?, chunk, out)
                .map_err(|e| io::Error::other(format!("noise: {e}")))?;
        }
        self.out.write_all(&self.scratch[..at])
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
        }
    }

    /// Fills the read buffer; `Ok(false)` on a read timeout.
    fn fill(&mut self) -> io::Result<bool> {
        self.start = 0;
        self.end = 0;
        loop {
            match self.stream.read(&mut self.buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end = n;
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
                let mut frame = vec![0u8; PREFIX_LEN + len];
                frame[..PREFIX_LEN].copy_from_slice(&self.prefix);
                self.frame = Some((frame, PREFIX_LEN));
                self.prefix_got = 0;
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
            if self.start < self.end {
                let n = (frame.len() - *got).min(self.end - self.start);
                frame[*got..*got + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                *got += n;
            } else if frame.len() - *got >= self.buf.len() {
                // Large rest: straight into the frame.
                match self.stream.read(&mut frame[*got..]) {
                    Ok(0) => return Err(TransportError::Io(io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => *got += n,
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
        let Some((frame, _)) = self.frame.take() else {
            return Ok(None);
        };
        let Some(keys) = &self.keys else {
            return Ok(Some(frame));
        };
        let cipher = frame.get(PREFIX_LEN..).unwrap_or_default();
        let mut plain = Vec::with_capacity(frame.len());
        plain.extend_from_slice(&[0; PREFIX_LEN]);
        for piece in cipher.chunks(NOISE_MAX_MSG) {
            let Some(len) = piece.len().checked_sub(TAG_LEN) else {
                return Err(TransportError::Protocol("short noise message".into()));
            };
            let at = plain.len();
            plain.resize(at + len, 0);
            let nonce = next_nonce(&mut self.nonce)?;
            keys.read_message(nonce, piece, &mut plain[at..])
                .map_err(|_| TransportError::Protocol("frame does not decrypt".into()))?;
        }
        let body_len = u32::try_from(plain.len() - PREFIX_LEN)
            .map_err(|_| TransportError::Protocol("frame too large".into()))?;
        plain[..PREFIX_LEN].copy_from_slice(&body_len.to_le_bytes());
        Ok(Some(plain))
    }
}
