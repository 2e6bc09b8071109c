//! The control API of the tandem daemon.
//!
//! The daemon serves HTTP/1.1 with JSON bodies. Today it listens on a root-only Unix socket (the
//! CLI's transport); the web console and REST clients of a later issue get the same resources
//! over HTTPS. Resources:
//!
//! | method | path | body / answer |
//! |---|---|---|
//! | GET | `/v1/status` | [`Status`] |
//! | POST | `/v1/modules/{module}/commands/{command}` | [`CommandReply`]; 409 with [`ApiError`] when refused |
//! | GET | `/v1/modules/{module}/log?n=N&app=BOOL` | [`LogLines`] |
//! | POST | `/v1/modules/{module}/log` | [`LogWrite`] (`printi` / `printe`) |
//! | GET | `/v1/events` | a stream of [`Event`], one JSON object per line |
//!
//! `command` is one of `start stop restart prim second swap forcestop`. Errors always come as
//! [`ApiError`] with an HTTP status: 400 bad request, 404 unknown module or path, 409 refused by
//! the cluster rules, 503 daemon shutting down.
//!
//! Only this crate and the daemon's API server know JSON; the core's types are mirrored here.

mod client;

pub use client::{Client, ClientError, EventStream};

use serde::{Deserialize, Serialize};

/// `GET /v1/status`: the local node's view of every module, including what it knows of the peer.
/// The field names are part of the contract (spec §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Local node name.
    pub node: String,
    /// Cluster name.
    pub cluster: String,
    /// The peer node.
    pub peer: PeerNode,
    /// Whether a witness is configured (none yet: safety under partition is weaker).
    pub witness: Option<String>,
    /// Every module.
    pub modules: Vec<ModuleStatus>,
}

/// The peer node as a whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerNode {
    /// Peer name.
    pub name: String,
    /// Heartbeats arrive on at least one network.
    pub reachable: bool,
    /// The secure peer channel (TCP 9020) is established.
    pub channel: bool,
    /// Per heartbeat network: milliseconds since the last heartbeat, if any.
    pub networks: Vec<Option<u64>>,
}

/// One module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Module name.
    pub name: String,
    /// `STOP`, `WAIT`, `ALONE`, `PRIM` or `SECOND`.
    pub state: String,
    /// Stable (`true`) or transient.
    pub ready: bool,
    /// The peer's state for this module.
    pub peer: PeerModule,
    /// The local data is up to date.
    pub uptodate: bool,
    /// The freshness claim behind `uptodate`: `fresh`, `stale`, `shared`, `exclusive`.
    pub data: String,
    /// Writes are accepted here.
    pub writable: bool,
    /// Promotion epoch.
    pub epoch: u64,
    /// The first virtual IP and whether this node holds it.
    pub vip: Option<VipStatus>,
    /// Every virtual IP.
    pub vips: Vec<VipStatus>,
    /// Replication figures (zero until replication exists).
    pub replication: ReplicationStatus,
    /// Resynchronisation progress.
    pub resync: ResyncStatus,
    /// Automatic failover.
    pub failover: bool,
    /// Why the module waits, when it does.
    pub waiting_for: Option<String>,
    /// Blocked until an operator acts.
    pub held: Option<String>,
    /// What runs now (script, VIP move, ...).
    pub running: Option<String>,
    /// The last transition.
    pub last_transition: Option<Transition>,
}

/// The peer's view of a module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerModule {
    /// Peer name.
    pub name: String,
    /// The peer's state, or `null` when unknown (unreachable or module stopped there shows STOP).
    pub state: Option<String>,
    /// Ready.
    pub ready: bool,
    /// Heartbeats arrive.
    pub reachable: bool,
    /// The peer's data is up to date.
    pub uptodate: Option<bool>,
}

/// A virtual IP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    /// Address with prefix, e.g. `10.77.0.100/24`.
    pub addr: String,
    /// Held by this node.
    pub held: bool,
}

/// Replication figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// Replicated directories of the module.
    #[serde(default)]
    pub directories: usize,
    /// Replication is running.
    pub active: bool,
    /// Operations in flight.
    pub inflight_ops: u64,
    /// Bytes in flight.
    pub inflight_bytes: u64,
    /// Throughput, bytes per second.
    pub bytes_per_second: u64,
    /// Median acknowledgement latency, microseconds.
    pub ack_latency_us: u64,
}

/// Resynchronisation progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// A resync runs.
    pub active: bool,
    /// Bytes copied.
    pub done_bytes: u64,
    /// Bytes to copy.
    pub total_bytes: u64,
}

/// A finished transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// State left.
    pub from: String,
    /// State entered.
    pub to: String,
    /// Why.
    pub reason: String,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// Answer to an accepted command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    /// What the daemon will do.
    pub message: String,
}

/// Any error answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Human-readable reason.
    pub error: String,
}

/// `GET .../log`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLines {
    /// The last lines, oldest first.
    pub lines: Vec<String>,
}

/// `POST .../log` (`printi` / `printe`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogWrite {
    /// `info` or `error`.
    pub level: String,
    /// The message.
    pub message: String,
}

/// One item of `GET /v1/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A module changed state.
    State {
        /// Module.
        module: String,
        /// New state.
        state: String,
        /// Ready.
        ready: bool,
    },
    /// A line was written to a module log.
    Log {
        /// Module.
        module: String,
        /// The formatted line.
        line: String,
    },
    /// Sent when the stream opens and then every few seconds, so clients detect a dead daemon.
    Heartbeat,
}
