//! The core's inputs and effects: the whole interface between the decisions and the world.

use std::time::Duration;

use tandem_proto::{Claim, NodeSnapshot, State};

use crate::time::Time;

/// Index of a module in [`crate::NodeSettings::modules`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(pub usize);

/// Identifies one step the core asked an adapter to carry out, so that late completions of an
/// abandoned step (after `forcestop`) are recognised and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId(pub u64);

/// Identifies an operator request so that its reply can be routed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// A user script of the module's scripts directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Script {
    /// Module start, before anything else: make sure the application is down.
    Prestart,
    /// Start the application on the primary.
    StartPrim,
    /// Stop the application on the primary.
    StopPrim,
    /// Entering SECOND.
    StartSecond,
    /// Leaving SECOND.
    StopSecond,
    /// End of module stop.
    Poststop,
    /// On every major state transition.
    Transition,
}

impl Script {
    /// The file name of the script in the scripts directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Script::Prestart => "prestart",
            Script::StartPrim => "start_prim",
            Script::StopPrim => "stop_prim",
            Script::StartSecond => "start_second",
            Script::StopSecond => "stop_second",
            Script::Poststop => "poststop",
            Script::Transition => "transition",
        }
    }

    /// Whether it is a stop script (called graceful first, then with `force`).
    pub fn is_stop(self) -> bool {
        matches!(self, Script::StopPrim | Script::StopSecond)
    }
}

/// Why a state change happens; the third argument of every script.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Operator start (or forced start with `prim`/`second`).
    Start,
    /// Operator stop, forced stop, or a failure that stops the module.
    Stop,
    /// Scripts-only restart.
    Restart,
    /// Role exchange.
    Swap,
    /// Automatic reaction to the peer or to a resource (failover, peer joined or left).
    Auto,
}

impl Action {
    /// The word passed to scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Swap => "swap",
            Action::Auto => "auto",
        }
    }
}

/// One call of a user script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptCall {
    /// Which script.
    pub script: Script,
    /// State the module is leaving (first argument).
    pub current: State,
    /// State the module is entering (second argument).
    pub next: State,
    /// Why (third argument).
    pub action: Action,
    /// The forced call of a stop script: `force` is passed as an extra first argument.
    pub force: bool,
    /// Kill the script's whole process group after this long.
    pub timeout: Duration,
}

/// How a step ended, as reported by the adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (for a script: exit code 0, or the script does not exist).
    Ok,
    /// Failed, with a message for the log (for a script: its exit code or signal).
    Failed(String),
    /// Did not finish in time; its process group was killed.
    TimedOut,
}

/// An operator command (spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Start the module; it becomes primary or secondary as the rules decide.
    Start,
    /// Stop the module on this node.
    Stop,
    /// Re-run the application scripts only.
    Restart,
    /// Force this node to become primary.
    Prim,
    /// Force this node to start as secondary.
    Second,
    /// Exchange roles of primary and secondary.
    Swap,
    /// Stop at once, abandoning running scripts.
    ForceStop,
}

impl Command {
    /// The CLI word for the command.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Start => "start",
            Command::Stop => "stop",
            Command::Restart => "restart",
            Command::Prim => "prim",
            Command::Second => "second",
            Command::Swap => "swap",
            Command::ForceStop => "forcestop",
        }
    }

    /// Parses a CLI word.
    pub fn parse(word: &str) -> Option<Command> {
        [
            Command::Start,
            Command::Stop,
            Command::Restart,
            Command::Prim,
            Command::Second,
            Command::Swap,
            Command::ForceStop,
        ]
        .into_iter()
        .find(|command| command.as_str() == word)
    }
}

/// Everything that can happen to the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Time passed; sent at least when [`crate::Node::poll_timeout`] says.
    Tick,
    /// An authenticated, non-replayed heartbeat arrived on a network.
    Heartbeat {
        /// Index of the heartbeat network.
        network: usize,
        /// The peer's snapshot.
        snapshot: NodeSnapshot,
    },
    /// A snapshot arrived on the peer channel (state only; liveness comes from heartbeats).
    ChannelSnapshot(NodeSnapshot),
    /// An operator command.
    Command {
        /// Target module.
        module: ModuleId,
        /// The command.
        command: Command,
        /// Where the reply goes.
        request: RequestId,
    },
    /// A step the core asked for finished.
    StepDone {
        /// Module of the step.
        module: ModuleId,
        /// The step.
        step: StepId,
        /// How it ended.
        outcome: Outcome,
    },
    /// The link of the module's VIP interface went up or down.
    LinkChanged {
        /// The module.
        module: ModuleId,
        /// New link state.
        up: bool,
    },
    /// The health of the module's replication stream to the peer, as its replicator sees it
    /// (the stream is a connection of its own, apart from heartbeats and the peer channel).
    /// `false` when the secondary is lost (no acknowledgement within the replication timeout, or
    /// the connection failed); `true` once the stream to the current secondary is established
    /// and every mutation sent on it has been acknowledged. Until the first report the
    /// replication counts as not connected.
    ///
    /// A primary counts its peer as an up-to-date secondary only while the replication is
    /// connected: without it, PRIM goes ALONE (a new data generation, so the secondary
    /// resynchronises), and neither ALONE -> PRIM nor a swap happens. Lost while ALONE after it
    /// was connected (a secondary synchronised meanwhile), ALONE starts a new data generation
    /// too. The replicator holds the writes it could not replicate until the new generation is
    /// persisted (a [`Effect::Persist`] with a higher generation and the `exclusive` claim), and
    /// only then records them locally and acknowledges them.
    ReplicationChanged {
        /// The module.
        module: ModuleId,
        /// The replication stream is connected and caught up.
        connected: bool,
    },
}

/// What a module persists; read back at daemon start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persisted {
    /// Freshness claim of the local data.
    pub claim: Claim,
    /// Highest promotion epoch known.
    pub epoch: u64,
    /// Data generation of the local copy (see `ModuleSnapshot::generation`).
    pub generation: u64,
    /// This node was primary when it last left the role or stopped.
    pub last_primary: bool,
    /// Highest promotion epoch seen from the peer (kept across restarts: safety knowledge).
    pub peer_epoch: u64,
    /// Highest data generation seen from the peer.
    pub peer_generation: u64,
    /// The peer was last seen with the claim `exclusive` (it served alone).
    pub peer_exclusive: bool,
    /// The module waits for the operator after a split brain.
    pub held: bool,
}

impl Default for Persisted {
    fn default() -> Persisted {
        Persisted {
            claim: Claim::Fresh,
            epoch: 0,
            generation: 0,
            last_primary: false,
            peer_epoch: 0,
            peer_generation: 0,
            peer_exclusive: false,
            held: false,
        }
    }
}

/// Severity of a module log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// Normal event.
    Info,
    /// Something needs attention.
    Warn,
    /// Something failed.
    Error,
}

/// Work the adapters must carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send this snapshot to the peer on every heartbeat network and on the peer channel.
    Broadcast(NodeSnapshot),
    /// Run a user script, then report [`Input::StepDone`].
    RunScript {
        /// Module.
        module: ModuleId,
        /// Step to report.
        step: StepId,
        /// The call.
        call: ScriptCall,
    },
    /// Kill every script of the module that is still running (forcestop).
    AbortScripts {
        /// Module.
        module: ModuleId,
    },
    /// Add the module's virtual IPs and announce them, then report [`Input::StepDone`].
    AcquireVips {
        /// Module.
        module: ModuleId,
        /// Step to report.
        step: StepId,
    },
    /// Remove the module's virtual IPs, then report [`Input::StepDone`].
    ReleaseVips {
        /// Module.
        module: ModuleId,
        /// Step to report.
        step: StepId,
    },
    /// Bring the replicated data up to date from the primary (a no-op until replication exists),
    /// then report [`Input::StepDone`].
    SyncData {
        /// Module.
        module: ModuleId,
        /// Step to report.
        step: StepId,
    },
    /// Whether the module's data accepts writes on this node. Writes are fenced (false) before
    /// the primary role is given up and allowed (true) only once it is held.
    SetWritable {
        /// Module.
        module: ModuleId,
        /// New mode.
        writable: bool,
    },
    /// Durably store the module's record before carrying out any later effect.
    Persist {
        /// Module.
        module: ModuleId,
        /// The record.
        record: Persisted,
    },
    /// Write a line to the module log.
    Log {
        /// Module, or `None` for node-level events.
        module: Option<ModuleId>,
        /// Severity.
        level: Level,
        /// Message.
        message: String,
    },
    /// The module changed state (for the event stream and the status).
    StateChanged {
        /// Module.
        module: ModuleId,
        /// New state.
        state: State,
        /// Ready or transient.
        ready: bool,
    },
    /// Answer an operator request.
    Reply {
        /// The request.
        request: RequestId,
        /// Accepted, with a message, or refused with the reason.
        result: Result<String, String>,
    },
}

/// Time a step or timer is due, for the driver's sleep.
pub(crate) fn earliest(first: Option<Time>, second: Option<Time>) -> Option<Time> {
    match (first, second) {
        (Some(first), Some(second)) => Some(first.min(second)),
        (first, second) => first.or(second),
    }
}
