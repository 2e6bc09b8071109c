//! The simulated network between the two nodes.
//!
//! - Each *heartbeat network* carries datagrams: every packet may be lost, delayed by a random
//!   amount, or duplicated, which also reorders packets. The receiver filters replays and old
//!   packets with the real [`ReplayWindow`] of `tandem-proto`, as the daemon does, so the core only
//!   sees authenticated, non-replayed heartbeats (the contract of `Input::Heartbeat`).
//! - The *peer channel* is a stream: snapshots arrive in order and once, after a random delay, or
//!   are lost while the direction is down.
//!
//! Every direction (`from` node to the other) and every network has its own [`LinkConf`], so
//! partitions, one-way partitions and a single lossy network are all expressible.

use std::rc::Rc;
use std::time::Duration;

use tandem_core::{NodeSnapshot, Time};
use tandem_proto::heartbeat::{PacketHeader, ReplayWindow};

use crate::rng::Rng;

/// How one direction of one network behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConf {
    /// Packets get through at all.
    pub up: bool,
    /// Probability (per mille) that a packet is lost.
    pub loss_per_mille: u32,
    /// Probability (per mille) that a packet is delivered twice.
    pub dup_per_mille: u32,
    /// Shortest delivery delay.
    pub delay_min: Duration,
    /// Longest delivery delay.
    pub delay_max: Duration,
}

impl LinkConf {
    /// A healthy LAN: no loss, 0.1 to 5 ms.
    pub const fn good() -> LinkConf {
        LinkConf {
            up: true,
            loss_per_mille: 0,
            dup_per_mille: 0,
            delay_min: Duration::from_micros(100),
            delay_max: Duration::from_millis(5),
        }
    }

    /// No loss, always exactly `delay` (deterministic transcripts).
    pub const fn fixed(delay: Duration) -> LinkConf {
        LinkConf {
            up: true,
            loss_per_mille: 0,
            dup_per_mille: 0,
            delay_min: delay,
            delay_max: delay,
        }
    }

    /// Nothing gets through.
    pub const fn down() -> LinkConf {
        LinkConf {
            up: false,
            loss_per_mille: 1000,
            dup_per_mille: 0,
            delay_min: Duration::ZERO,
            delay_max: Duration::ZERO,
        }
    }
}

/// What carries a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    /// A heartbeat datagram on a heartbeat network.
    Heartbeat {
        /// The packet header (network, incarnation, per-network sequence number).
        header: PacketHeader,
    },
    /// A frame on the peer channel.
    Channel,
}

/// A message in flight.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Sending node.
    pub from: usize,
    /// When it was sent.
    pub sent_at: Time,
    /// Heartbeat or channel.
    pub carrier: Carrier,
    /// The sender's snapshot (shared between the copies of one broadcast).
    pub snapshot: Rc<NodeSnapshot>,
    /// What the sender knew of acknowledged writes when it sent it (`crate::data::Data::known`).
    pub known: [u64; 2],
}

impl Packet {
    /// The receiving node.
    pub fn to(&self) -> usize {
        1 - self.from
    }
}

/// What happened to the heartbeat sent on one network by one broadcast, for the invariants'
/// notion of a healthy connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatFate {
    /// The network.
    pub network: usize,
    /// Delay of the earliest copy, or `None` if every copy is lost.
    pub first_delay: Option<Duration>,
}

/// The result of one broadcast.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    /// Packets to deliver, with their arrival times.
    pub deliveries: Vec<(Time, Packet)>,
    /// Per heartbeat network, what became of the heartbeat.
    pub fates: Vec<HeartbeatFate>,
}

/// Both directions of every heartbeat network and of the peer channel.
#[derive(Clone, Debug)]
pub struct Network {
    networks: usize,
    /// `links[from][network]`.
    links: [Vec<LinkConf>; 2],
    /// `channel[from]`.
    channel: [LinkConf; 2],
    /// Latest arrival time scheduled on the channel per direction (streams keep order).
    channel_tail: [Time; 2],
    /// `packet_seq[from][network]`: the sender's per-network heartbeat counter.
    packet_seq: [Vec<u64>; 2],
    /// The receivers' replay windows.
    replay: [ReplayWindow; 2],
    rng: Rng,
}

impl Network {
    /// `networks` heartbeat networks (at least one) and a channel, all configured as `link`.
    pub fn new(networks: usize, link: LinkConf, rng: Rng) -> Network {
        let networks = networks.max(1);
        Network {
            networks,
            links: [vec![link; networks], vec![link; networks]],
            channel: [link; 2],
            channel_tail: [Time::ZERO; 2],
            packet_seq: [vec![0; networks], vec![0; networks]],
            replay: [ReplayWindow::default(), ReplayWindow::default()],
            rng,
        }
    }

    /// Number of heartbeat networks.
    pub fn networks(&self) -> usize {
        self.networks
    }

    /// The configuration of one direction of one heartbeat network.
    pub fn link(&self, from: usize, network: usize) -> Option<LinkConf> {
        self.links.get(from)?.get(network).copied()
    }

    /// Configures one direction of one heartbeat network.
    pub fn set_link(&mut self, from: usize, network: usize, conf: LinkConf) {
        if let Some(slot) = self
            .links
            .get_mut(from)
            .and_then(|links| links.get_mut(network))
        {
            *slot = conf;
        }
    }

    /// Configures one direction of the peer channel.
    pub fn set_channel(&mut self, from: usize, conf: LinkConf) {
        if let Some(slot) = self.channel.get_mut(from) {
            *slot = conf;
        }
    }

    /// Configures everything sent by `from` (every network and the channel).
    pub fn set_direction(&mut self, from: usize, conf: LinkConf) {
        for network in 0..self.networks {
            self.set_link(from, network, conf);
        }
        self.set_channel(from, conf);
    }

    /// Whether every network and the channel are configured as `conf` in both directions.
    pub fn is_uniform(&self, conf: LinkConf) -> bool {
        self.links.iter().flatten().all(|link| *link == conf)
            && self.channel.iter().all(|c| *c == conf)
    }

    /// The receiver restarted: its replay window starts empty.
    pub fn receiver_restarted(&mut self, node: usize) {
        if let Some(window) = self.replay.get_mut(node) {
            *window = ReplayWindow::default();
        }
    }

    /// The configuration of one direction of the peer channel.
    pub fn channel(&self, from: usize) -> LinkConf {
        self.channel[from & 1]
    }

    /// Sends one snapshot from `from` on every heartbeat network and on the channel; `known` is
    /// the sender's knowledge of acknowledged writes, carried along for the data model.
    pub fn broadcast(
        &mut self,
        from: usize,
        now: Time,
        snapshot: NodeSnapshot,
        known: [u64; 2],
    ) -> Sent {
        let snapshot = Rc::new(snapshot);
        let mut sent = Sent::default();
        let incarnation = snapshot.incarnation;
        for network in 0..self.networks {
            let conf = self.links[from & 1][network];
            let seq = &mut self.packet_seq[from & 1][network];
            *seq += 1;
            let header = PacketHeader {
                network: u8::try_from(network).unwrap_or(u8::MAX),
                incarnation,
                seq: *seq,
            };
            let mut first_delay = None;
            if conf.up && !self.rng.chance(conf.loss_per_mille) {
                let copies = if self.rng.chance(conf.dup_per_mille) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let delay = self.rng.duration(conf.delay_min, conf.delay_max);
                    first_delay =
                        Some(first_delay.map_or(delay, |first: Duration| first.min(delay)));
                    sent.deliveries.push((
                        now.plus(delay),
                        Packet {
                            from,
                            sent_at: now,
                            carrier: Carrier::Heartbeat { header },
                            snapshot: Rc::clone(&snapshot),
                            known,
                        },
                    ));
                }
            }
            sent.fates.push(HeartbeatFate {
                network,
                first_delay,
            });
        }
        let conf = self.channel[from & 1];
        if conf.up && !self.rng.chance(conf.loss_per_mille) {
            let delay = self.rng.duration(conf.delay_min, conf.delay_max);
            let at = now.plus(delay).max(self.channel_tail[from & 1]);
            self.channel_tail[from & 1] = at;
            sent.deliveries.push((
                at,
                Packet {
                    from,
                    sent_at: now,
                    carrier: Carrier::Channel,
                    snapshot,
                    known,
                },
            ));
        }
        sent
    }

    /// Whether the receiver's daemon hands the packet to its core (heartbeats pass the replay
    /// window; channel frames always pass).
    pub fn accept(&mut self, packet: &Packet) -> bool {
        match packet.carrier {
            Carrier::Heartbeat { header } => self.replay[packet.to() & 1].accept(header),
            Carrier::Channel => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(incarnation: u64) -> NodeSnapshot {
        NodeSnapshot {
            node: "a".into(),
            incarnation,
            seq: 1,
            modules: vec![],
        }
    }

    #[test]
    fn replay_window_drops_duplicates_and_old_packets() {
        let mut network = Network::new(1, LinkConf::fixed(Duration::from_millis(1)), Rng::new(1));
        let first = network.broadcast(0, Time(0), snapshot(1), [0; 2]);
        let second = network.broadcast(0, Time(10), snapshot(1), [0; 2]);
        let heartbeat = |sent: &Sent| {
            sent.deliveries
                .iter()
                .find(|(_, packet)| matches!(packet.carrier, Carrier::Heartbeat { .. }))
                .map(|(_, packet)| packet.clone())
        };
        let (Some(first), Some(second)) = (heartbeat(&first), heartbeat(&second)) else {
            panic!("heartbeats were lost on a perfect link");
        };
        assert!(network.accept(&second));
        assert!(!network.accept(&first), "an older packet is refused");
        assert!(!network.accept(&second), "a duplicate is refused");
        let restarted = network.broadcast(0, Time(20), snapshot(2), [0; 2]);
        let Some(restarted) = heartbeat(&restarted) else {
            panic!("lost")
        };
        assert!(
            network.accept(&restarted),
            "a new incarnation is accepted at once"
        );
    }

    #[test]
    fn down_links_lose_everything_and_channel_keeps_order() {
        let mut network = Network::new(2, LinkConf::good(), Rng::new(7));
        network.set_link(0, 1, LinkConf::down());
        let sent = network.broadcast(0, Time(0), snapshot(1), [0; 2]);
        assert_eq!(sent.fates[1].first_delay, None);
        assert!(sent.fates[0].first_delay.is_some());
        let mut last = Time::ZERO;
        for step in 0..50 {
            let sent = network.broadcast(1, Time(step * 1000), snapshot(1), [0; 2]);
            for (at, packet) in sent.deliveries {
                if packet.carrier == Carrier::Channel {
                    assert!(at >= last);
                    last = at;
                }
            }
        }
    }
}
