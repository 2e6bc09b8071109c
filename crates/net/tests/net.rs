//! End-to-end tests of the networking adapter over loopback.
//!
//! Every test gets its own loopback addresses (all of 127.0.0.0/8 is on `lo` on Linux):
//! network `n` of test `t` is 127.(100+n).t.0/24, node1 is host .1, node2 host .2, and test
//! clients use other hosts. So the tests can run in parallel on the same fixed ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tandem_net::{Net, NetConfig, NetError, NetEvent, NetworkAddrs};
use tandem_proto::heartbeat::{self, HeartbeatKey, PacketHeader};
use tandem_proto::{ChannelMessage, NodeSnapshot};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const HEARTBEAT_PORT: u16 = 47121;
const CHANNEL_PORT: u16 = 47120;
/// Generous: CI has two cores shared with other builds.
const DEADLINE: Duration = Duration::from_secs(25);
const PULSE: Duration = Duration::from_millis(100);
const NAMES: [&str; 2] = ["node1", "node2"];

fn ip(network: u8, test: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 100 + network, test, host))
}

fn host_of(node: usize) -> u8 {
    if node == 0 { 1 } else { 2 }
}

fn config(test: u8, node: usize, secret: &[u8]) -> NetConfig {
    let peer = 1 - node;
    NetConfig {
        local_name: NAMES[node].into(),
        peer_name: NAMES[peer].into(),
        networks: (0..2)
            .map(|network| NetworkAddrs {
                local: ip(network, test, host_of(node)),
                peer: ip(network, test, host_of(peer)),
            })
            .collect(),
        channel_network: 0,
        heartbeat_port: HEARTBEAT_PORT,
        channel_port: CHANNEL_PORT,
        cluster_secret: secret.to_vec(),
    }
}

fn heartbeat_addr(test: u8, network: u8, node: usize) -> SocketAddr {
    SocketAddr::new(ip(network, test, host_of(node)), HEARTBEAT_PORT)
}

fn channel_addr(test: u8, node: usize) -> SocketAddr {
    SocketAddr::new(ip(0, test, host_of(node)), CHANNEL_PORT)
}

/// A tiny deterministic PRNG for garbage (xorshift64*).
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| (self.next() >> 56) as u8).collect()
    }
}

type Log = Vec<(usize, NetEvent)>;

/// Two nodes (index 0 = node1, the dialer; 1 = node2, the acceptor) and all their events.
struct Cluster {
    test: u8,
    secrets: [Vec<u8>; 2],
    nets: [Option<Net>; 2],
    incarnations: [u64; 2],
    seq: u64,
    tx: mpsc::Sender<(usize, NetEvent)>,
    rx: mpsc::Receiver<(usize, NetEvent)>,
    log: Log,
    /// Channel messages sent again at every pulse while waiting (until delivered).
    resend: Vec<(usize, ChannelMessage)>,
    shutdown: CancellationToken,
    forwarders: JoinSet<()>,
}

impl Cluster {
    fn new(test: u8, secrets: [&[u8]; 2]) -> Cluster {
        let (tx, rx) = mpsc::channel(4096);
        Cluster {
            test,
            secrets: secrets.map(<[u8]>::to_vec),
            nets: [None, None],
            incarnations: [100, 200],
            seq: 0,
            tx,
            rx,
            log: Vec::new(),
            resend: Vec::new(),
            shutdown: CancellationToken::new(),
            forwarders: JoinSet::new(),
        }
    }

    async fn with_both(test: u8, secrets: [&[u8]; 2]) -> Cluster {
        let mut cluster = Cluster::new(test, secrets);
        cluster.start(0).await;
        cluster.start(1).await;
        cluster
    }

    /// Starts a node, retrying while its previous sockets are still being released (after a
    /// plain drop, the aborted tasks close them asynchronously).
    async fn start(&mut self, node: usize) {
        let (events, mut received) = mpsc::channel(1024);
        let config = config(self.test, node, &self.secrets[node]);
        let deadline = Instant::now() + DEADLINE;
        let net = loop {
            match Net::start(
                config.clone(),
                self.incarnations[node],
                events.clone(),
                self.shutdown.child_token(),
            )
            .await
            {
                Ok(net) => break net,
                Err(error @ (NetError::BindHeartbeat { .. } | NetError::BindChannel { .. }))
                    if Instant::now() < deadline =>
                {
                    eprintln!("retrying start of {}: {error}", NAMES[node]);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot start {}: {error}", NAMES[node]),
            }
        };
        let tx = self.tx.clone();
        self.forwarders.spawn(async move {
            while let Some(event) = received.recv().await {
                if tx.send((node, event)).await.is_err() {
                    break;
                }
            }
        });
        self.nets[node] = Some(net);
    }

    fn net(&self, node: usize) -> &Net {
        self.nets[node].as_ref().expect("node is running")
    }

    fn snapshot(&mut self, node: usize) -> NodeSnapshot {
        self.seq += 1;
        NodeSnapshot {
            node: NAMES[node].into(),
            incarnation: self.incarnations[node],
            seq: self.seq,
            modules: Vec::new(),
        }
    }

    fn pulse(&mut self) {
        for node in 0..2 {
            if self.nets[node].is_some() {
                let snapshot = self.snapshot(node);
                self.net(node).send_heartbeat(&snapshot);
            }
        }
        for (node, message) in &self.resend {
            if let Some(net) = &self.nets[*node] {
                net.send_channel(message.clone());
            }
        }
    }

    /// Collects events (pulsing heartbeats from the running nodes) until `done` holds.
    async fn wait_for(&mut self, what: &str, mut done: impl FnMut(&Log) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut next_pulse = Instant::now();
        loop {
            if done(&self.log) {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {what}; events: {:#?}",
                self.log
            );
            if now >= next_pulse {
                self.pulse();
                next_pulse = now + PULSE;
            }
            if let Ok(Some(event)) =
                tokio::time::timeout_at(next_pulse.min(deadline), self.rx.recv()).await
            {
                self.log.push(event);
            }
        }
    }

    async fn wait_channel_up(&mut self) {
        self.wait_for("the channel up on both nodes", |log| {
            channel_up(log, 0) && channel_up(log, 1)
        })
        .await;
    }

    /// Sends a snapshot over the channel from each node (again at every pulse, as messages
    /// given while the channel is down are dropped) and waits for both to arrive.
    async fn exchange_channel_messages(&mut self) {
        let mut sent = Vec::new();
        for node in 0..2 {
            let snapshot = self.snapshot(node);
            sent.push(snapshot.clone());
            self.resend.push((node, ChannelMessage::Snapshot(snapshot)));
        }
        self.wait_for("channel messages both ways", |log| {
            (0..2).all(|node| {
                log.iter().any(|(receiver, event)| {
                    *receiver == 1 - node
                        && *event == NetEvent::Channel(ChannelMessage::Snapshot(sent[node].clone()))
                })
            })
        })
        .await;
        self.resend.clear();
    }

    async fn stop(&mut self, node: usize) {
        if let Some(net) = self.nets[node].take() {
            net.stop().await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn heartbeat_from_peer(log: &Log, node: usize, network: usize) -> bool {
    log.iter().any(|(receiver, event)| {
        *receiver == node
            && matches!(event, NetEvent::Heartbeat { network: got, snapshot }
                if *got == network && snapshot.node == NAMES[1 - node])
    })
}

fn heartbeats_everywhere(log: &Log) -> bool {
    (0..2).all(|node| (0..2).all(|network| heartbeat_from_peer(log, node, network)))
}

fn channel_up(log: &Log, node: usize) -> bool {
    log.iter()
        .any(|(receiver, event)| *receiver == node && matches!(event, NetEvent::ChannelUp { .. }))
}

fn channel_down(log: &Log, node: usize) -> bool {
    log.iter()
        .any(|(receiver, event)| *receiver == node && matches!(event, NetEvent::ChannelDown { .. }))
}

/// Refusals seen by `node` on `channel` from IP `from` whose reason contains `needle`.
fn refusals(log: &Log, node: usize, channel: &str, from: IpAddr, needle: &str) -> usize {
    log.iter()
        .filter(|(receiver, event)| {
            *receiver == node
                && matches!(event, NetEvent::Refused { from: source, channel: got, reason }
                    if *got == channel && source.ip() == from && reason.contains(needle))
        })
        .count()
}

fn refused(log: &Log, node: usize, channel: &str, from: IpAddr, needle: &str) -> bool {
    refusals(log, node, channel, from, needle) > 0
}

async fn udp_from(local: IpAddr) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(local, 0))
        .await
        .expect("bind test UDP socket")
}

async fn tcp_from(local: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind test TCP socket");
    socket.connect(to).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_flow_both_ways_on_every_network() {
    let mut cluster = Cluster::with_both(1, [b"secret", b"secret"]).await;
    cluster
        .wait_for(
            "heartbeats on both networks both ways",
            heartbeats_everywhere,
        )
        .await;
    for (receiver, event) in &cluster.log {
        match event {
            NetEvent::Heartbeat { snapshot, .. } => {
                let peer = 1 - receiver;
                assert_eq!(snapshot.node, NAMES[peer]);
                assert_eq!(snapshot.incarnation, cluster.incarnations[peer]);
            }
            NetEvent::Refused { .. } => panic!("unexpected refusal: {event:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_on_heartbeats_and_channel() {
    let mut cluster = Cluster::with_both(2, [b"secret", b"another secret"]).await;
    let test = cluster.test;
    cluster
        .wait_for("heartbeat and channel refusals on both nodes", |log| {
            (0..2).all(|node| {
                let peer = ip(0, test, host_of(1 - node));
                refused(
                    log,
                    node,
                    "udp",
                    peer,
                    "authentication failed (wrong cluster secret?)",
                ) && refused(log, node, "tcp", peer, "wrong cluster secret")
            })
        })
        .await;
    for (receiver, event) in &cluster.log {
        assert!(
            matches!(event, NetEvent::Refused { .. }),
            "{} got {event:?} from a peer with another secret",
            NAMES[*receiver]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_datagram_is_refused() {
    let test = 3;
    let mut cluster = Cluster::new(test, [b"secret", b"secret"]);
    // Capture a heartbeat of node1 where node2 would be.
    let capture = UdpSocket::bind(heartbeat_addr(test, 0, 1))
        .await
        .expect("bind capture");
    cluster.start(0).await;
    let mut buffer = vec![0u8; 70_000];
    let deadline = Instant::now() + DEADLINE;
    let packet = loop {
        cluster.pulse();
        if let Ok(received) = tokio::time::timeout(PULSE, capture.recv_from(&mut buffer)).await {
            let (len, _) = received.expect("receive");
            break buffer[..len].to_vec();
        }
        assert!(Instant::now() < deadline, "no heartbeat captured");
    };
    drop(capture);
    // node1 goes away (so it sends nothing newer); node2 comes up.
    cluster.stop(0).await;
    cluster.start(1).await;
    let attacker = UdpSocket::bind(heartbeat_addr(test, 0, 0))
        .await
        .expect("bind attacker");
    let target = heartbeat_addr(test, 0, 1);

    attacker.send_to(&packet, target).await.expect("send");
    cluster
        .wait_for("the captured heartbeat accepted once", |log| {
            heartbeat_from_peer(log, 1, 0)
        })
        .await;
    attacker.send_to(&packet, target).await.expect("send");
    let from = ip(0, test, 1);
    cluster
        .wait_for("the replay refused", |log| {
            refused(log, 1, "udp", from, "replayed or out-of-date packet")
        })
        .await;
    let accepted = cluster
        .log
        .iter()
        .filter(|(_, event)| matches!(event, NetEvent::Heartbeat { .. }))
        .count();
    assert_eq!(accepted, 1, "{:#?}", cluster.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_heartbeats_with_the_right_key_are_refused() {
    let test = 4;
    let mut cluster = Cluster::new(test, [b"secret", b"secret"]);
    cluster.start(1).await;
    let key = HeartbeatKey::derive(b"secret");
    let packet = |name: &str, network: u8, seq: u64| {
        let snapshot = NodeSnapshot {
            node: name.into(),
            incarnation: 7,
            seq,
            modules: Vec::new(),
        };
        heartbeat::encode(
            &key,
            PacketHeader {
                network,
                incarnation: 7,
                seq,
            },
            &snapshot,
        )
    };
    let peer_socket = udp_from(ip(0, test, 1)).await;
    let stranger = udp_from(ip(0, test, 9)).await;
    let target = heartbeat_addr(test, 0, 1);
    let peer_ip = ip(0, test, 1);

    // Reflected: carries node2's own name.
    peer_socket
        .send_to(&packet("node2", 0, 1), target)
        .await
        .expect("send");
    // Another node name.
    peer_socket
        .send_to(&packet("intruder", 0, 2), target)
        .await
        .expect("send");
    // Made for network 1, sent on network 0.
    peer_socket
        .send_to(&packet("node1", 1, 3), target)
        .await
        .expect("send");
    // Right content, wrong source address.
    stranger
        .send_to(&packet("node1", 0, 4), target)
        .await
        .expect("send");
    // Another protocol version: patch the version field (the MAC then fails or the version
    // is refused first; either way it is refused).
    let mut versioned = packet("node1", 0, 5);
    versioned[4] = 0xEE;
    peer_socket.send_to(&versioned, target).await.expect("send");
    cluster
        .wait_for("every forged heartbeat refused", |log| {
            refused(log, 1, "udp", peer_ip, "reflected")
                && refused(log, 1, "udp", peer_ip, "'intruder'")
                && refused(log, 1, "udp", peer_ip, "for network 1 arrived on network 0")
                && refused(log, 1, "udp", ip(0, test, 9), "peer's address")
                && refused(log, 1, "udp", peer_ip, "version")
        })
        .await;
    // The genuine article still passes, even with a lower sequence number than the forgeries.
    peer_socket
        .send_to(&packet("node1", 0, 1), target)
        .await
        .expect("send");
    cluster
        .wait_for("the genuine heartbeat", |log| {
            heartbeat_from_peer(log, 1, 0)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_and_the_peers_keep_working() {
    let test = 5;
    let mut cluster = Cluster::with_both(test, [b"secret", b"secret"]).await;
    let mut garbage = Garbage(0x5eed_0000_0000_0001);

    // A flood of garbage datagrams on both networks, to both nodes.
    let flooder = [
        udp_from(ip(0, test, 10)).await,
        udp_from(ip(1, test, 10)).await,
    ];
    for round in 0..300 {
        for network in 0..2u8 {
            for node in 0..2 {
                let len = (garbage.next() % 2000) as usize;
                let datagram = garbage.bytes(if round == 0 { 0 } else { len });
                let target = heartbeat_addr(test, network, node);
                flooder[usize::from(network)]
                    .send_to(&datagram, target)
                    .await
                    .expect("send");
            }
        }
    }
    let big = garbage.bytes(65_000);
    flooder[0]
        .send_to(&big, heartbeat_addr(test, 0, 1))
        .await
        .expect("send");

    // TCP: an oversized frame length, a well-sized but bogus handshake, random bytes, and a
    // client that never says anything. Sent to both nodes' listeners.
    let mut clients = Vec::new();
    for node in 0..2 {
        let to = channel_addr(test, node);
        let mut oversized = tcp_from(ip(0, test, 11), to).await;
        oversized
            .write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3])
            .await
            .expect("write");
        let mut bogus = tcp_from(ip(0, test, 13), to).await;
        let mut frame = vec![0, 0, 0, 48];
        frame.extend(garbage.bytes(48));
        bogus.write_all(&frame).await.expect("write");
        let mut random = tcp_from(ip(0, test, 14), to).await;
        random.write_all(&garbage.bytes(4096)).await.expect("write");
        let _ = random.shutdown().await;
        let silent = tcp_from(ip(0, test, 12), to).await;
        clients.extend([oversized, bogus, random, silent]);
    }

    cluster
        .wait_for("refusals of every kind of garbage on both nodes", |log| {
            (0..2).all(|node| {
                (0..2).all(|network| {
                    refused(
                        log,
                        node,
                        "udp",
                        ip(network, test, 10),
                        "not a tandem heartbeat",
                    )
                }) && refused(
                    log,
                    node,
                    "tcp",
                    ip(0, test, 11),
                    "not a tandem channel handshake",
                ) && refused(log, node, "tcp", ip(0, test, 13), "authentication failed")
                    && refusals(log, node, "tcp", ip(0, test, 14), "") > 0
                    && refused(log, node, "tcp", ip(0, test, 12), "not completed within")
            })
        })
        .await;
    // Rate limited: hundreds of garbage datagrams from one source make one event per node and
    // network.
    for node in 0..2 {
        for network in 0..2 {
            let count = refusals(&cluster.log, node, "udp", ip(network, test, 10), "");
            assert_eq!(
                count, 1,
                "refusal events from the flood: {:#?}",
                cluster.log
            );
        }
    }
    drop(clients);

    // The real peers are unaffected.
    cluster.log.clear();
    cluster
        .wait_for("heartbeats after the garbage", heartbeats_everywhere)
        .await;
    cluster.exchange_channel_messages().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_carries_messages_and_survives_restarts() {
    let test = 6;
    let mut cluster = Cluster::with_both(test, [b"secret", b"secret"]).await;
    cluster.wait_channel_up().await;
    cluster.exchange_channel_messages().await;
    // Channel traffic never reaches the event stream as Hello or Ping.
    assert!(cluster.log.iter().all(|(_, event)| !matches!(
        event,
        NetEvent::Channel(ChannelMessage::Ping | ChannelMessage::Hello { .. })
    )));

    // The acceptor (node2) restarts cleanly with a new incarnation.
    cluster.stop(1).await;
    cluster.log.clear();
    cluster
        .wait_for("node1 to see the channel down", |log| channel_down(log, 0))
        .await;
    cluster.incarnations[1] += 1;
    cluster.start(1).await;
    cluster.wait_channel_up().await;
    cluster.exchange_channel_messages().await;
    let incarnation = cluster.incarnations[1];
    cluster
        .wait_for("heartbeats of node2's new incarnation", |log| {
            log.iter().any(|(receiver, event)| {
                *receiver == 0
                    && matches!(event, NetEvent::Heartbeat { snapshot, .. }
                        if snapshot.incarnation == incarnation)
            })
        })
        .await;

    // The dialer (node1) is dropped without a clean stop (as in a crash) and restarts.
    drop(cluster.nets[0].take());
    cluster.log.clear();
    cluster
        .wait_for("node2 to see the channel down", |log| channel_down(log, 1))
        .await;
    cluster.incarnations[0] += 1;
    cluster.start(0).await;
    cluster.wait_channel_up().await;
    cluster.exchange_channel_messages().await;
    assert!(
        cluster
            .log
            .iter()
            .all(|(_, event)| !matches!(event, NetEvent::Refused { .. })),
        "{:#?}",
        cluster.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_connection_from_the_peer_replaces_the_current_one() {
    let test = 7;
    let mut cluster = Cluster::with_both(test, [b"secret", b"secret"]).await;
    cluster.wait_channel_up().await;
    // A second "node1" on other addresses: to node2 it looks like node1 restarted while the
    // old connection still seems open. The newer authenticated connection must win.
    let mut twin_config = config(test, 0, b"secret");
    for (network, addrs) in (0u8..).zip(twin_config.networks.iter_mut()) {
        addrs.local = ip(network, test, 3);
    }
    let (twin_events, mut twin_received) = mpsc::channel(1024);
    let twin = Net::start(
        twin_config,
        300,
        twin_events,
        cluster.shutdown.child_token(),
    )
    .await
    .expect("start the twin");
    let twin_ip = ip(0, test, 3);
    cluster.log.clear();
    cluster
        .wait_for("node2 to switch to the newer connection", |log| {
            log.iter().any(|(receiver, event)| {
                *receiver == 1
                    && matches!(event, NetEvent::ChannelDown { reason } if reason.contains("replaced"))
            }) && log.iter().any(|(receiver, event)| {
                *receiver == 1
                    && matches!(event, NetEvent::ChannelUp { peer_addr } if peer_addr.ip() == twin_ip)
            })
        })
        .await;
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = twin_received.recv().await {
            if matches!(event, NetEvent::ChannelUp { .. }) {
                return;
            }
        }
    })
    .await
    .expect("the twin sees its channel up");
    // Without the twin, the real node1 gets the channel back.
    twin.stop().await;
    cluster.log.clear();
    cluster.exchange_channel_messages().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_limited() {
    let test = 8;
    let mut cluster = Cluster::new(test, [b"secret", b"secret"]);
    cluster.start(1).await;
    let to = channel_addr(test, 1);
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(tcp_from(ip(0, test, 20), to).await);
    }
    cluster
        .wait_for("the connection limit refusal", |log| {
            refused(
                log,
                1,
                "tcp",
                ip(0, test, 20),
                "too many unauthenticated connections",
            )
        })
        .await;
    // Hanging up frees the slots; the real peer then gets in.
    drop(silent);
    cluster.start(0).await;
    cluster.wait_channel_up().await;
    cluster.exchange_channel_messages().await;
}

/// A connection that starts with the replication magic is handed over (magic consumed, the rest
/// intact) instead of going through the channel handshake; the channel keeps working, and one
/// that merely starts like the magic still goes to the channel handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_are_handed_over() {
    let test = 9;
    let mut cluster = Cluster::with_both(test, [b"secret", b"secret"]).await;
    cluster.wait_channel_up().await;
    let streams = cluster.nets[1]
        .as_ref()
        .and_then(Net::take_replication_streams)
        .expect("replication streams of node2");
    assert!(
        cluster.nets[1]
            .as_ref()
            .and_then(Net::take_replication_streams)
            .is_none(),
        "taken once only"
    );

    let mut client = tcp_from(ip(0, test, 3), channel_addr(test, 1)).await;
    // The magic in two pieces: the listener waits for the whole of it.
    client
        .write_all(&tandem_net::REPLICATION_MAGIC[..3])
        .await
        .expect("write");
    client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(20)).await;
    client
        .write_all(&tandem_net::REPLICATION_MAGIC[3..])
        .await
        .expect("write");
    client.write_all(b"payload").await.expect("write");
    let handed = tokio::task::spawn_blocking(move || streams.recv_timeout(DEADLINE))
        .await
        .expect("join")
        .expect("a replication stream");
    assert_eq!(handed.from.ip(), ip(0, test, 3));
    let mut stream = handed.stream;
    let mut payload = [0u8; 7];
    std::io::Read::read_exact(&mut stream, &mut payload).expect("read payload");
    assert_eq!(&payload, b"payload");

    // A near miss is channel garbage, refused as such.
    let mut near = tcp_from(ip(0, test, 4), channel_addr(test, 1)).await;
    near.write_all(b"TNDMxxxxxxxx").await.expect("write");
    cluster
        .wait_for("the near miss refused", |log| {
            log.iter()
                .any(|(node, event)| *node == 1 && matches!(event, NetEvent::Refused { .. }))
        })
        .await;
    cluster.exchange_channel_messages().await;
}
