//! Plain views of the core's state, for `tandem status` and the control API.

use tandem_proto::{Claim, State};

use crate::time::Time;

/// A finished transition and why it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitionRecord {
    /// State left.
    pub from: State,
    /// State entered.
    pub to: State,
    /// Why.
    pub reason: String,
    /// When (core time).
    pub at: Time,
}

/// The peer as the local node sees it, for one module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// Peer node name.
    pub name: String,
    /// Heartbeats arrive.
    pub reachable: bool,
    /// The peer's state for the module, if known and running.
    pub state: Option<State>,
    /// Ready.
    pub ready: bool,
    /// The peer's data claim.
    pub claim: Option<Claim>,
    /// The peer holds the primary role.
    pub primary_role: bool,
}

/// One module on the local node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleStatus {
    /// Module name.
    pub name: String,
    /// State.
    pub state: State,
    /// Ready (stable) or transient.
    pub ready: bool,
    /// Freshness claim of the local data.
    pub claim: Claim,
    /// Holds the primary role (writes allowed).
    pub primary_role: bool,
    /// Promotion epoch.
    pub epoch: u64,
    /// Automatic failover policy.
    pub failover: bool,
    /// Why a WAIT module waits.
    pub waiting_for: Option<String>,
    /// Blocked until an operator command.
    pub held: Option<String>,
    /// Link state of the VIP interface.
    pub link_up: bool,
    /// The module's VIPs are held here.
    pub vip_held: bool,
    /// What runs now.
    pub running_step: Option<String>,
    /// The last finished transition.
    pub last_transition: Option<TransitionRecord>,
    /// The peer's view.
    pub peer: PeerStatus,
}

/// The whole node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// Local node name.
    pub node: String,
    /// Peer node name.
    pub peer: String,
    /// Heartbeats arrive from the peer.
    pub peer_alive: bool,
    /// This run's incarnation.
    pub incarnation: u64,
    /// Modules.
    pub modules: Vec<ModuleStatus>,
}
