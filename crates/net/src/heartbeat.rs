//! UDP heartbeats: one socket per heartbeat network.
//!
//! Each socket is bound to this node's address on its network (port `heartbeat_port`) and sends
//! to the peer's address on the same network and port. Packets are built and checked by
//! [`tandem_proto::heartbeat`]; this module adds the network checks:
//!
//! 1. the packet must authenticate with the cluster secret ([`heartbeat::decode`]);
//! 2. it must come from the peer's configured IP address on that network, and carry that
//!    network's index (a packet captured on one network cannot be replayed on another);
//! 3. its snapshot must name the configured peer (a packet carrying our own name is a reflection
//!    of one of ours and is refused);
//! 4. it must be newer than anything accepted on that network ([`ReplayWindow`]).
//!
//! Accepted packets become [`NetEvent::Heartbeat`]; refused ones a rate-limited
//! [`NetEvent::Refused`] with `channel = "udp"`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_proto::NodeSnapshot;
use tandem_proto::heartbeat::{
    self, HeartbeatError, HeartbeatKey, MAX_PACKET_LEN, PacketHeader, ReplayWindow,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::refusal::Reporter;
use crate::{NetConfig, NetError, NetEvent};

/// Pause after a failed `recv_from`, so a persistent socket error cannot spin a core.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One heartbeat network: its socket, where the peer is, and our sequence counter.
#[derive(Debug)]
struct Link {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    /// Last sequence number sent on this network.
    seq: AtomicU64,
}

/// The sending side of the heartbeats, plus what the receive tasks need.
#[derive(Debug)]
pub(crate) struct Heartbeats {
    key: HeartbeatKey,
    incarnation: u64,
    links: Vec<Link>,
}

impl Heartbeats {
    /// Binds one UDP socket per network.
    pub(crate) async fn bind(config: &NetConfig, incarnation: u64) -> Result<Heartbeats, NetError> {
        let mut links = Vec::with_capacity(config.networks.len());
        for (network, addrs) in config.networks.iter().enumerate() {
            let local = SocketAddr::new(addrs.local, config.heartbeat_port);
            let socket =
                UdpSocket::bind(local)
                    .await
                    .map_err(|source| NetError::BindHeartbeat {
                        network,
                        addr: local,
                        source,
                    })?;
            links.push(Link {
                socket: Arc::new(socket),
                peer: SocketAddr::new(addrs.peer, config.heartbeat_port),
                seq: AtomicU64::new(0),
            });
        }
        Ok(Heartbeats {
            key: HeartbeatKey::derive(&config.cluster_secret),
            incarnation,
            links,
        })
    }

    /// Spawns one receive task per network into `tasks`.
    pub(crate) fn spawn_receivers(
        &self,
        tasks: &mut JoinSet<()>,
        config: &NetConfig,
        events: &mpsc::Sender<NetEvent>,
        reporter: &Arc<Reporter>,
        shutdown: &CancellationToken,
    ) {
        for (network, link) in self.links.iter().enumerate() {
            let receiver = Receiver {
                network,
                socket: Arc::clone(&link.socket),
                key: self.key.clone(),
                peer_ip: link.peer.ip().to_canonical(),
                local_name: config.local_name.clone(),
                peer_name: config.peer_name.clone(),
                events: events.clone(),
                reporter: Arc::clone(reporter),
            };
            tasks.spawn(receiver.run(shutdown.clone()));
        }
    }

    /// Sends `snapshot` once on every network. Never blocks: a full socket buffer or an
    /// unreachable network loses that packet (the next pulse sends a fresh one).
    pub(crate) fn send(&self, snapshot: &NodeSnapshot) {
        if snapshot.incarnation != self.incarnation {
            // The receiver would refuse it (header and snapshot incarnations must match, and the
            // sequence numbers belong to this incarnation): a bug in the caller.
            tracing::warn!(
                snapshot = snapshot.incarnation,
                net = self.incarnation,
                "heartbeat not sent: snapshot incarnation differs from the one Net was started with"
            );
            return;
        }
        for (network, link) in self.links.iter().enumerate() {
            // Networks are validated to be at most 256 at start.
            let Ok(network_byte) = u8::try_from(network) else {
                continue;
            };
            let seq = link.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            let header = PacketHeader {
                network: network_byte,
                incarnation: self.incarnation,
                seq,
            };
            let packet = heartbeat::encode(&self.key, header, snapshot);
            if let Err(error) = link.socket.try_send_to(&packet, link.peer) {
                tracing::debug!(network, peer = %link.peer, %error, "heartbeat not sent");
            }
        }
    }
}

/// Why a datagram was refused: a short class (for rate limiting) and the text.
struct Refusal {
    kind: &'static str,
    reason: String,
}

impl Refusal {
    fn new(kind: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            reason: reason.into(),
        }
    }
}

/// The receive task of one network.
struct Receiver {
    network: usize,
    socket: Arc<UdpSocket>,
    key: HeartbeatKey,
    peer_ip: IpAddr,
    local_name: String,
    peer_name: String,
    events: mpsc::Sender<NetEvent>,
    reporter: Arc<Reporter>,
}

impl Receiver {
    async fn run(self, shutdown: CancellationToken) {
        // One byte more than the largest valid packet, so an oversized datagram is seen as such
        // (the kernel truncates it to the buffer) and refused by `decode`.
        let mut buffer = vec![0u8; MAX_PACKET_LEN + 1];
        let mut window = ReplayWindow::default();
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = self.socket.recv_from(&mut buffer) => received,
            };
            let (len, from) = match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(network = self.network, %error, "heartbeat receive error");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(RECV_ERROR_PAUSE) => continue,
                    }
                }
            };
            let packet = buffer.get(..len).unwrap_or_default();
            match self.check(packet, from, &mut window) {
                Ok(snapshot) => {
                    let event = NetEvent::Heartbeat {
                        network: self.network,
                        snapshot,
                    };
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        sent = self.events.send(event) => if sent.is_err() {
                            // Nobody listens any more: the daemon is going away.
                            return;
                        },
                    }
                }
                Err(refusal) => self
                    .reporter
                    .refuse(from, "udp", refusal.kind, refusal.reason),
            }
        }
    }

    fn check(
        &self,
        packet: &[u8],
        from: SocketAddr,
        window: &mut ReplayWindow,
    ) -> Result<NodeSnapshot, Refusal> {
        let (header, snapshot) =
            heartbeat::decode(&self.key, packet).map_err(|error| match error {
                HeartbeatError::BadMac => {
                    Refusal::new("auth", "authentication failed (wrong cluster secret?)")
                }
                HeartbeatError::NotHeartbeat(why) => {
                    Refusal::new("garbage", format!("not a tandem heartbeat ({why})"))
                }
                HeartbeatError::Version(version) => Refusal::new(
                    "version",
                    format!(
                        "heartbeat of protocol version {version}, this node speaks {}",
                        tandem_proto::PROTOCOL_VERSION
                    ),
                ),
                HeartbeatError::BadPayload => Refusal::new(
                    "payload",
                    "authenticated heartbeat with a malformed payload (software version mismatch?)",
                ),
            })?;
        if from.ip().to_canonical() != self.peer_ip {
            return Err(Refusal::new(
                "source",
                format!(
                    "heartbeat from {}, but the peer's address on network {} is {}",
                    from.ip(),
                    self.network,
                    self.peer_ip
                ),
            ));
        }
        if usize::from(header.network) != self.network {
            return Err(Refusal::new(
                "network",
                format!(
                    "heartbeat for network {} arrived on network {}",
                    header.network, self.network
                ),
            ));
        }
        if snapshot.node == self.local_name {
            return Err(Refusal::new(
                "reflected",
                format!(
                    "reflected heartbeat (it carries our own node name '{}')",
                    snapshot.node
                ),
            ));
        }
        if snapshot.node != self.peer_name {
            return Err(Refusal::new(
                "node",
                format!(
                    "heartbeat from node '{}', expected the peer '{}'",
                    snapshot.node, self.peer_name
                ),
            ));
        }
        if !window.accept(header) {
            return Err(Refusal::new("replay", "replayed or out-of-date packet"));
        }
        Ok(snapshot)
    }
}
