//! Wire messages of tandem.
//!
//! Two nodes exchange *state snapshots*: every heartbeat (UDP, one per network and pulse) and
//! every peer-channel frame (TCP) carries the sender's full view of its modules. Snapshots are
//! idempotent, so loss, duplication and reordering on the network are harmless: the receiver keeps
//! the newest one (see [`heartbeat::ReplayWindow`]).
//!
//! This crate is pure: no I/O, no clock.

pub mod heartbeat;

use serde::{Deserialize, Serialize};

/// Version of the wire protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;

/// The synthetic state of a module on one node (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Module stopped on this node.
    Stop,
    /// Starting, stopping, or blocked waiting (peer unknown, data not up to date, ...).
    Wait,
    /// Primary without a secondary.
    Alone,
    /// Primary with a connected, up-to-date secondary.
    Prim,
    /// Secondary.
    Second,
}

impl State {
    /// The name used by the CLI, the logs and the scripts (`STOP`, `WAIT`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stop => "STOP",
            State::Wait => "WAIT",
            State::Alone => "ALONE",
            State::Prim => "PRIM",
            State::Second => "SECOND",
        }
    }

    /// The exit code of `tandem state` (spec §3).
    pub fn exit_code(self) -> i32 {
        match self {
            State::Stop => 0,
            State::Wait => 1,
            State::Alone => 2,
            State::Prim => 3,
            State::Second => 4,
        }
    }

    /// Parses the name used by the CLI (case-insensitive).
    pub fn parse(text: &str) -> Option<State> {
        match text.to_ascii_uppercase().as_str() {
            "STOP" => Some(State::Stop),
            "WAIT" => Some(State::Wait),
            "ALONE" => Some(State::Alone),
            "PRIM" => Some(State::Prim),
            "SECOND" => Some(State::Second),
            _ => None,
        }
    }

    /// Whether this state runs the application and holds the VIP.
    pub fn is_primary(self) -> bool {
        matches!(self, State::Alone | State::Prim)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// What a node may claim about the freshness of its copy of a module's data.
///
/// This is the persisted "up to date" knowledge of a node. It is ordered from weakest to
/// strongest claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Claim {
    /// The node has never been primary nor synchronised: no history at all.
    Fresh,
    /// The copy is known or suspected to be behind the peer's (left SECOND, interrupted sync).
    Stale,
    /// The copy was identical to the peer's at the last moment the two were connected (PRIM or
    /// SECOND ready, or a clean handover). Up to date, but the peer may have moved on since, so
    /// the node does not start alone on this claim.
    Shared,
    /// The node served alone: it holds acknowledged writes the peer does not have. It is the
    /// only up-to-date copy and may start alone.
    Exclusive,
}

impl Claim {
    /// Whether the data is up to date (the `uptodate` flag of `tandem status`).
    pub fn is_up_to_date(self) -> bool {
        matches!(self, Claim::Shared | Claim::Exclusive)
    }

    /// The lowercase name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Claim::Fresh => "fresh",
            Claim::Stale => "stale",
            Claim::Shared => "shared",
            Claim::Exclusive => "exclusive",
        }
    }
}

/// One module as its node sees it, sent to the peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSnapshot {
    /// Module name (identical on both nodes).
    pub name: String,
    /// Synthetic state.
    pub state: State,
    /// `true` when stable, `false` when transient (scripts running).
    pub ready: bool,
    /// Whether the node holds or is entering the primary role: true from the moment it commits to
    /// become primary until it has fenced writes when leaving the role.
    pub primary_role: bool,
    /// Freshness claim of this node's data.
    pub claim: Claim,
    /// Number of times this module became primary on either node, as far as this node knows.
    pub epoch: u64,
    /// Data generation: a new value, greater than any seen, whenever the data may diverge from
    /// what the secondary acknowledged (every promotion, and every PRIM -> ALONE).
    pub generation: u64,
    /// The node asks the peer for permission to become primary.
    pub want_primary: bool,
    /// The node granted the peer permission to become primary; the value is the peer's
    /// incarnation the grant was given to. While a grant stands, the granter does not become
    /// primary itself.
    pub grant_to: Option<u64>,
    /// Incremented each time an operator asks for a swap on this node; the primary acts on
    /// increments it has not seen.
    pub swap_counter: u64,
    /// The node was primary the last time it stopped or is primary now (`default_primary = last`).
    pub last_primary: bool,
    /// For a secondary: the primary's data generation its data was last synchronised with
    /// (0 = none). A primary counts its peer as an up-to-date secondary only when this equals
    /// its own generation.
    pub synced_generation: u64,
}

/// A node's full snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    /// Node name as configured.
    pub node: String,
    /// Identifies one run of the daemon; strictly increases across restarts of a node.
    pub incarnation: u64,
    /// Increases with every new snapshot of one incarnation, so that the receiver keeps the
    /// newest when snapshots arrive out of order over several networks.
    pub seq: u64,
    /// Every configured module.
    pub modules: Vec<ModuleSnapshot>,
}

/// A message on the peer channel (TCP 9020), after the secure handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelMessage {
    /// First message of each side: who it is and which protocol it speaks.
    Hello {
        /// Sender's node name.
        node: String,
        /// Sender's [`PROTOCOL_VERSION`].
        version: u16,
    },
    /// The sender's current snapshot.
    Snapshot(NodeSnapshot),
    /// Keeps an idle connection visibly alive.
    Ping,
}

/// Error decoding a channel message.
#[derive(Debug, thiserror::Error)]
#[error("malformed channel message: {0}")]
pub struct ChannelDecodeError(#[from] postcard::Error);

impl ChannelMessage {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain owned data into a Vec cannot fail: postcard only fails on writer
        // exhaustion, which a growable Vec does not have.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a message, rejecting anything malformed.
    pub fn decode(bytes: &[u8]) -> Result<ChannelMessage, ChannelDecodeError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}
