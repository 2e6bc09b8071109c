//! Heartbeat packets: authenticated with the cluster secret and protected against replay.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic "TDHB" | version u16 | network u8 | incarnation u64 | seq u64 | len u32 | payload | mac[32]
//! ```
//!
//! `payload` is a postcard-encoded [`NodeSnapshot`]; `mac` is a BLAKE3 keyed hash of everything
//! before it, keyed by a key derived from the cluster secret. The receiver checks the MAC before
//! looking at the payload, then accepts a packet only if `(incarnation, seq)` is newer than the
//! last one accepted from that sender on that network ([`ReplayWindow`]).

use crate::{NodeSnapshot, PROTOCOL_VERSION};

const MAGIC: &[u8; 4] = b"TDHB";
const HEADER_LEN: usize = 4 + 2 + 1 + 8 + 8 + 4;
const MAC_LEN: usize = 32;
/// Largest heartbeat accepted; larger datagrams are rejected before any parsing.
pub const MAX_PACKET_LEN: usize = 64 * 1024;

/// Key for heartbeat MACs, derived from the cluster secret.
#[derive(Clone)]
pub struct HeartbeatKey([u8; 32]);

impl std::fmt::Debug for HeartbeatKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("HeartbeatKey(..)")
    }
}

impl HeartbeatKey {
    /// Derives the heartbeat key from the cluster secret.
    pub fn derive(cluster_secret: &[u8]) -> HeartbeatKey {
        HeartbeatKey(blake3::derive_key(
            "tandem 2026-11 heartbeat mac v1",
            cluster_secret,
        ))
    }
}

/// Header fields of an accepted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// Index of the heartbeat network the sender sent it on.
    pub network: u8,
    /// Sender's incarnation.
    pub incarnation: u64,
    /// Per-network sequence number.
    pub seq: u64,
}

/// Why a packet was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// Not a tandem heartbeat at all (size or magic).
    #[error("not a tandem heartbeat ({0})")]
    NotHeartbeat(&'static str),
    /// A heartbeat of another protocol version.
    #[error("unsupported heartbeat protocol version {0}")]
    Version(u16),
    /// The MAC does not match: wrong cluster secret or tampering.
    #[error("heartbeat authentication failed (wrong cluster secret or forged packet)")]
    BadMac,
    /// Authenticated but the payload does not decode: a bug or a version mismatch.
    #[error("malformed heartbeat payload")]
    BadPayload,
}

/// Encodes and authenticates a heartbeat.
pub fn encode(key: &HeartbeatKey, header: PacketHeader, snapshot: &NodeSnapshot) -> Vec<u8> {
    // Serialising into a growable Vec cannot fail (see ChannelMessage::encode).
    let payload = postcard::to_stdvec(snapshot).unwrap_or_default();
    let mut packet = Vec::with_capacity(HEADER_LEN + payload.len() + MAC_LEN);
    packet.extend_from_slice(MAGIC);
    packet.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    packet.push(header.network);
    packet.extend_from_slice(&header.incarnation.to_le_bytes());
    packet.extend_from_slice(&header.seq.to_le_bytes());
    let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    packet.extend_from_slice(&payload_len.to_le_bytes());
    packet.extend_from_slice(&payload);
    let mac = blake3::keyed_hash(&key.0, &packet);
    packet.extend_from_slice(mac.as_bytes());
    packet
}

/// Checks and decodes a heartbeat. Replay is checked separately with [`ReplayWindow`].
pub fn decode(
    key: &HeartbeatKey,
    packet: &[u8],
) -> Result<(PacketHeader, NodeSnapshot), HeartbeatError> {
    if packet.len() < HEADER_LEN + MAC_LEN || packet.len() > MAX_PACKET_LEN {
        return Err(HeartbeatError::NotHeartbeat("bad length"));
    }
    if &packet[0..4] != MAGIC {
        return Err(HeartbeatError::NotHeartbeat("bad magic"));
    }
    let version = u16::from_le_bytes([packet[4], packet[5]]);
    if version != PROTOCOL_VERSION {
        return Err(HeartbeatError::Version(version));
    }
    let (body, mac) = packet.split_at(packet.len() - MAC_LEN);
    let expected = blake3::keyed_hash(&key.0, body);
    // blake3::Hash equality is constant-time.
    if expected != blake3::Hash::from_bytes(mac.try_into().map_err(|_| HeartbeatError::BadMac)?) {
        return Err(HeartbeatError::BadMac);
    }
    let read_u64 = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&body[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let header = PacketHeader {
        network: body[6],
        incarnation: read_u64(7),
        seq: read_u64(15),
    };
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&body[23..27]);
    let payload_len = usize::try_from(u32::from_le_bytes(len_bytes)).unwrap_or(usize::MAX);
    if payload_len != body.len() - HEADER_LEN {
        return Err(HeartbeatError::BadPayload);
    }
    let snapshot: NodeSnapshot =
        postcard::from_bytes(&body[HEADER_LEN..]).map_err(|_| HeartbeatError::BadPayload)?;
    if snapshot.incarnation != header.incarnation {
        return Err(HeartbeatError::BadPayload);
    }
    Ok((header, snapshot))
}

/// Remembers the newest `(incarnation, seq)` accepted per network, to refuse replayed and
/// reordered-old packets. Incarnations strictly increase across daemon restarts, so a restarted
/// peer is accepted at once while a replay of its previous life is not.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    newest: Vec<Option<(u64, u64)>>,
}

impl ReplayWindow {
    /// Returns `true` and records the packet if it is newer than anything seen on its network.
    pub fn accept(&mut self, header: PacketHeader) -> bool {
        let index = usize::from(header.network);
        if self.newest.len() <= index {
            self.newest.resize(index + 1, None);
        }
        let candidate = (header.incarnation, header.seq);
        match self.newest[index] {
            Some(newest) if candidate <= newest => false,
            _ => {
                self.newest[index] = Some(candidate);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Claim, ModuleSnapshot, State};
    use proptest::prelude::*;

    fn snapshot() -> NodeSnapshot {
        NodeSnapshot {
            node: "node1".into(),
            incarnation: 7,
            seq: 1,
            modules: vec![ModuleSnapshot {
                name: "demo".into(),
                state: State::Prim,
                ready: true,
                primary_role: true,
                claim: Claim::Shared,
                epoch: 3,
                generation: 4,
                want_primary: false,
                grant_to: None,
                swap_counter: 0,
                last_primary: true,
                synced_generation: 0,
            }],
        }
    }

    fn header(seq: u64) -> PacketHeader {
        PacketHeader {
            network: 0,
            incarnation: 7,
            seq,
        }
    }

    #[test]
    fn round_trip() {
        let key = HeartbeatKey::derive(b"secret");
        let packet = encode(&key, header(1), &snapshot());
        assert_eq!(decode(&key, &packet), Ok((header(1), snapshot())));
    }

    #[test]
    fn wrong_secret_is_refused() {
        let packet = encode(&HeartbeatKey::derive(b"secret"), header(1), &snapshot());
        assert_eq!(
            decode(&HeartbeatKey::derive(b"other"), &packet),
            Err(HeartbeatError::BadMac)
        );
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let key = HeartbeatKey::derive(b"secret");
        let packet = encode(&key, header(1), &snapshot());
        for index in 0..packet.len() {
            let mut forged = packet.clone();
            forged[index] ^= 0x01;
            assert!(decode(&key, &forged).is_err(), "flip at {index} accepted");
        }
    }

    #[test]
    fn replay_and_old_packets_are_refused() {
        let mut window = ReplayWindow::default();
        assert!(window.accept(header(5)));
        assert!(!window.accept(header(5)));
        assert!(!window.accept(header(4)));
        assert!(window.accept(header(6)));
        // A restarted peer (newer incarnation) is accepted with a low sequence number.
        assert!(window.accept(PacketHeader {
            network: 0,
            incarnation: 8,
            seq: 1
        }));
        assert!(!window.accept(header(100)));
        // Networks are independent.
        assert!(window.accept(PacketHeader {
            network: 1,
            incarnation: 8,
            seq: 1
        }));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let key = HeartbeatKey::derive(b"secret");
            let _ = decode(&key, &bytes);
            let _ = crate::ChannelMessage::decode(&bytes);
        }
    }
}
