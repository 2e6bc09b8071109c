//! Node-to-node networking of tandem: UDP heartbeats and the secure peer channel.
//!
//! This crate is an adapter. It carries snapshots and channel messages between the two nodes,
//! authenticates them with the cluster secret, and reports what it sees as [`NetEvent`]s; it
//! makes no cluster decisions.
//!
//! - **Heartbeats** (UDP, default port 9021): one socket per heartbeat network, bound to this
//!   node's address on that network. [`Net::send_heartbeat`] sends one authenticated packet per
//!   network; received packets are authenticated, checked against the peer's address and name
//!   and against replay, and delivered as [`NetEvent::Heartbeat`]. See the `heartbeat` module.
//! - **Peer channel** (TCP, default port 9020): one Noise-encrypted, mutually authenticated
//!   connection on the channel network, kept up in the background. [`Net::send_channel`] queues
//!   a message for it; received messages are delivered as [`NetEvent::Channel`], its state as
//!   [`NetEvent::ChannelUp`] / [`NetEvent::ChannelDown`]. See the `channel` module for the wire
//!   format.
//! - Anything refused (wrong secret, garbage, replay, wrong peer, handshake timeout) becomes a
//!   rate-limited [`NetEvent::Refused`]: at most one per source address, channel and kind of
//!   refusal every 10 s, the next one counting those suppressed. Nothing received can make this
//!   crate panic.
//!
//! All tasks run on the current tokio runtime and stop when the shutdown token is cancelled or
//! the [`Net`] is dropped; [`Net::stop`] also waits for them (and so for the sockets to close).

mod channel;
mod heartbeat;
mod refusal;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tandem_proto::{ChannelMessage, NodeSnapshot};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use refusal::REFUSAL_WINDOW;

/// Default TCP port of the peer channel (spec §7).
pub const DEFAULT_CHANNEL_PORT: u16 = 9020;
/// Default UDP port of the heartbeats (spec §7).
pub const DEFAULT_HEARTBEAT_PORT: u16 = 9021;

/// What the networking adapter needs to know.
#[derive(Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// This node's name.
    pub local_name: String,
    /// The peer's name. The node whose name is smaller (byte-wise) dials the channel.
    pub peer_name: String,
    /// The heartbeat networks, indexed from 0 in this order (the same order on both nodes).
    pub networks: Vec<NetworkAddrs>,
    /// Index in `networks` of the network that carries the TCP channel.
    pub channel_network: usize,
    /// UDP port of the heartbeats on both nodes ([`DEFAULT_HEARTBEAT_PORT`]).
    pub heartbeat_port: u16,
    /// TCP port of the channel on both nodes ([`DEFAULT_CHANNEL_PORT`]).
    pub channel_port: u16,
    /// The cluster secret; heartbeat and channel keys are derived from it.
    pub cluster_secret: Vec<u8>,
}

impl std::fmt::Debug for NetConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NetConfig")
            .field("local_name", &self.local_name)
            .field("peer_name", &self.peer_name)
            .field("networks", &self.networks)
            .field("channel_network", &self.channel_network)
            .field("heartbeat_port", &self.heartbeat_port)
            .field("channel_port", &self.channel_port)
            .field("cluster_secret", &"<redacted>")
            .finish()
    }
}

/// The two ends of one heartbeat network.
///
/// Both addresses must be of the same family. IPv6 link-local addresses cannot be used (there
/// is no interface scope here); use global or unique-local IPv6 addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkAddrs {
    /// This node's address on the network (sockets are bound to it).
    pub local: IpAddr,
    /// The peer's address on the network (packets are sent to it, and must come from it).
    pub peer: IpAddr,
}

/// What the networking adapter reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// An authenticated, fresh heartbeat from the peer arrived on `network`.
    Heartbeat {
        /// Index of the heartbeat network it arrived on.
        network: usize,
        /// The peer's snapshot.
        snapshot: NodeSnapshot,
    },
    /// A message arrived on the peer channel (`Hello` and `Ping` are handled internally and
    /// never reported).
    Channel(ChannelMessage),
    /// The peer channel is established (authenticated and identified); messages given to
    /// [`Net::send_channel`] from now on go to this connection.
    ChannelUp {
        /// The peer's address of the connection.
        peer_addr: SocketAddr,
    },
    /// The peer channel was lost; the adapter reconnects on its own.
    ChannelDown {
        /// Why, for the log.
        reason: String,
    },
    /// Input was refused. Rate limited: at most one per source address, channel and kind of
    /// refusal every [`REFUSAL_WINDOW`].
    Refused {
        /// Where it came from (for the channel dialer: the peer it dialed).
        from: SocketAddr,
        /// `"udp"` (heartbeats) or `"tcp"` (peer channel).
        channel: &'static str,
        /// What was wrong, for the log.
        reason: String,
    },
}

/// Errors starting the networking adapter.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configuration cannot work.
    #[error("invalid network configuration: {0}")]
    Config(String),
    /// A heartbeat socket could not be bound.
    #[error("cannot bind the heartbeat socket of network {network} to UDP {addr}: {source}")]
    BindHeartbeat {
        /// Index of the network.
        network: usize,
        /// The local address that failed.
        addr: SocketAddr,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The channel listener could not be bound.
    #[error("cannot listen for the peer channel on TCP {addr}: {source}")]
    BindChannel {
        /// The local address that failed.
        addr: SocketAddr,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The Noise protocol could not be set up (a build problem, not a configuration one).
    #[error("cannot set up the Noise protocol: {0}")]
    Noise(String),
}

/// The first bytes a replication connection sends on the channel port (TCP 9020 by default):
/// the channel's listener hands such connections, these bytes consumed, to the replication
/// adapter ([`Net::take_replication_streams`]) instead of the channel handshake. The
/// replication connection authenticates on its own (`tandem-replica`'s transport).
pub const REPLICATION_MAGIC: [u8; 8] = *b"TNDMREPL";

/// Accepted replication connections waiting at most for the replication adapter.
const REPLICATION_BACKLOG: usize = 8;

/// An accepted replication connection (not yet authenticated), in blocking mode.
#[derive(Debug)]
pub struct ReplicationStream {
    /// The connection, after [`REPLICATION_MAGIC`].
    pub stream: std::net::TcpStream,
    /// Where it came from.
    pub from: SocketAddr,
}

/// The running networking adapter.
///
/// Dropping it stops its tasks (they are aborted; sockets close shortly after). [`Net::stop`]
/// stops them and waits until they are gone.
#[derive(Debug)]
pub struct Net {
    heartbeats: heartbeat::Heartbeats,
    outbox: Arc<channel::Outbox>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    replication: std::sync::Mutex<Option<std::sync::mpsc::Receiver<ReplicationStream>>>,
}

impl Net {
    /// Binds sockets and spawns tasks on the current tokio runtime; events go to `events`.
    ///
    /// `incarnation` identifies this run of the daemon; it must be the `incarnation` of every
    /// snapshot given to [`Net::send_heartbeat`]. The tasks stop when `shutdown` is cancelled.
    pub async fn start(
        config: NetConfig,
        incarnation: u64,
        events: mpsc::Sender<NetEvent>,
        shutdown: CancellationToken,
    ) -> Result<Net, NetError> {
        validate(&config)?;
        let mut setup = channel::Setup::new(&config)?;
        let (replication_tx, replication_rx) = std::sync::mpsc::sync_channel(REPLICATION_BACKLOG);
        setup.replication = Some(replication_tx);
        let heartbeats = heartbeat::Heartbeats::bind(&config, incarnation).await?;
        let listener = setup.listen()?;

        let cancel = shutdown.child_token();
        let reporter = Arc::new(refusal::Reporter::new(events.clone()));
        let outbox = Arc::new(channel::Outbox::default());
        let mut tasks = JoinSet::new();
        heartbeats.spawn_receivers(&mut tasks, &config, &events, &reporter, &cancel);
        let channel = channel::Channel::new(setup, listener, Arc::clone(&outbox), events, reporter);
        tasks.spawn(channel.run(cancel.clone()));
        Ok(Net {
            heartbeats,
            outbox,
            cancel,
            tasks,
            replication: std::sync::Mutex::new(Some(replication_rx)),
        })
    }

    /// Sends `snapshot` once on every heartbeat network. Non-blocking, best effort: a packet
    /// that cannot be sent right now is lost (the next pulse sends a fresh one).
    pub fn send_heartbeat(&self, snapshot: &NodeSnapshot) {
        self.heartbeats.send(snapshot);
    }

    /// Queues `message` for the peer channel. Non-blocking. Dropped when no channel is
    /// established (send the current snapshot again on [`NetEvent::ChannelUp`]); a queued
    /// `Snapshot` is replaced by a newer one; when the queue is full the oldest is dropped.
    pub fn send_channel(&self, message: ChannelMessage) {
        self.outbox.push(message);
    }

    /// The replication connections accepted on the channel port (see [`REPLICATION_MAGIC`]);
    /// `Some` on the first call only. While nobody takes them, at most a few wait, later ones
    /// are closed.
    pub fn take_replication_streams(&self) -> Option<std::sync::mpsc::Receiver<ReplicationStream>> {
        self.replication
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Stops all tasks and waits for them to end, so that the sockets are closed on return.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The JoinSet aborts the tasks when dropped; cancelling first lets them end cleanly.
        self.cancel.cancel();
    }
}

fn validate(config: &NetConfig) -> Result<(), NetError> {
    let fail = |message: String| Err(NetError::Config(message));
    if config.local_name.is_empty() || config.peer_name.is_empty() {
        return fail("node names must not be empty".into());
    }
    if config.local_name == config.peer_name {
        return fail(format!(
            "local and peer node have the same name '{}'",
            config.local_name
        ));
    }
    if config.networks.is_empty() {
        return fail("at least one heartbeat network is needed".into());
    }
    if config.networks.len() > usize::from(u8::MAX) + 1 {
        return fail(format!(
            "{} heartbeat networks, at most 256",
            config.networks.len()
        ));
    }
    if config.channel_network >= config.networks.len() {
        return fail(format!(
            "channel_network {} does not exist ({} heartbeat networks)",
            config.channel_network,
            config.networks.len()
        ));
    }
    for (index, addrs) in config.networks.iter().enumerate() {
        if addrs.local.is_ipv4() != addrs.peer.is_ipv4() {
            return fail(format!(
                "network {index}: local address {} and peer address {} are of different families",
                addrs.local, addrs.peer
            ));
        }
        if addrs.local == addrs.peer {
            return fail(format!(
                "network {index}: local and peer address are the same ({})",
                addrs.local
            ));
        }
    }
    if config.heartbeat_port == 0 || config.channel_port == 0 {
        return fail("ports must not be 0 (the peer uses the same fixed ports)".into());
    }
    if config.cluster_secret.is_empty() {
        return fail("the cluster secret is empty".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetConfig {
        NetConfig {
            local_name: "node1".into(),
            peer_name: "node2".into(),
            networks: vec![NetworkAddrs {
                local: IpAddr::from([127, 0, 0, 1]),
                peer: IpAddr::from([127, 0, 0, 2]),
            }],
            channel_network: 0,
            heartbeat_port: DEFAULT_HEARTBEAT_PORT,
            channel_port: DEFAULT_CHANNEL_PORT,
            cluster_secret: b"secret".to_vec(),
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&config()).is_ok());
        let mut bad = config();
        bad.peer_name = "node1".into();
        assert!(validate(&bad).is_err());
        let mut bad = config();
        bad.channel_network = 1;
        assert!(validate(&bad).is_err());
        let mut bad = config();
        bad.networks.clear();
        assert!(validate(&bad).is_err());
        let mut bad = config();
        bad.cluster_secret.clear();
        assert!(validate(&bad).is_err());
        let mut bad = config();
        bad.networks[0].peer = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
        assert!(validate(&bad).is_err());
    }

    #[test]
    fn secret_is_not_printed() {
        let printed = format!("{:?}", config());
        assert!(!printed.contains("115, 101"), "{printed}");
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn net_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Net>();
    }
}
