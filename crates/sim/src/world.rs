//! The world: two simulated nodes, the network between them, the clock, the invariant checker
//! and the trace. Everything that happens goes through [`World::apply`] (an [`Op`]) or through
//! the passing of simulated time ([`World::run_until`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tandem_core::{
    Claim, Command, Effect, Input, ModuleId, ModuleSettings, ModuleSnapshot, NodeSettings,
    NodeStatus, Outcome, RequestId, Script, StepId, Time,
};

use crate::clock::{EventKey, EventQueue};
use crate::data::{Data, Link, WriteFate};
use crate::host::{AdapterTiming, Host, Planned, RunningStep, ScriptRule, ScriptTiming, StepWhat};
use crate::invariants::{self, Checker, CheckerConfig, InputSummary, Outside, Violation};
use crate::network::{Carrier, LinkConf, Network, Packet};
use crate::rng::Rng;
use crate::trace::{self, Kind, Trace, TraceConfig};

/// Everything that defines a world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldConfig {
    /// Seed of every random decision (network, adapters).
    pub seed: u64,
    /// Node names.
    pub names: [String; 2],
    /// Number of heartbeat networks.
    pub networks: usize,
    /// Heartbeat interval.
    pub pulse: Duration,
    /// Heartbeat timeout.
    pub timeout: Duration,
    /// The one module both nodes run.
    pub module: ModuleSettings,
    /// Initial configuration of every link.
    pub link: LinkConf,
    /// Random script behaviour.
    pub scripts: ScriptTiming,
    /// Random VIP and synchronisation behaviour.
    pub adapters: AdapterTiming,
    /// What to record.
    pub trace: TraceConfig,
}

impl WorldConfig {
    /// A world for transcripts: one network with a fixed 1 ms delay, scripts and adapters that
    /// finish at once and succeed, the transcript on. Tests change what they need.
    pub fn deterministic() -> WorldConfig {
        WorldConfig {
            seed: 0,
            names: ["node1".into(), "node2".into()],
            networks: 1,
            pulse: Duration::from_millis(250),
            timeout: Duration::from_secs(2),
            module: ModuleSettings::new("demo"),
            link: LinkConf::fixed(Duration::from_millis(1)),
            scripts: ScriptTiming::instant(),
            adapters: AdapterTiming::instant(),
            trace: TraceConfig {
                transcript: true,
                transcript_logs: true,
                ..TraceConfig::default()
            },
        }
    }

    /// The settings of node `index`.
    pub fn node_settings(&self, index: usize) -> NodeSettings {
        NodeSettings {
            local: self.names[index & 1].clone(),
            peer: self.names[1 - (index & 1)].clone(),
            networks: self.networks,
            pulse: self.pulse,
            timeout: self.timeout,
            modules: vec![self.module.clone()],
        }
    }

    /// Heartbeats slower than this are faults for the invariants: `pulse + delay < timeout`.
    pub fn healthy_delay(&self) -> Duration {
        self.timeout
            .saturating_sub(self.pulse)
            .saturating_sub(Duration::from_millis(1))
    }

    /// How long a fenced node may keep the VIP after a connection began: the longest step it
    /// may be running (a start script, or a graceful then forced stop), then two VIP requests.
    pub fn vip_grace(&self) -> Duration {
        let module = &self.module;
        module
            .start_timeout
            .max(module.stop_timeout + module.force_stop_timeout)
            + self.adapters.vip_max * 2
            + Duration::from_millis(10)
    }
}

/// Something done to the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// An operator command on a node.
    Command {
        /// Node index.
        node: usize,
        /// The command.
        command: Command,
    },
    /// Let simulated time pass.
    Advance(Duration),
    /// Power loss of a node.
    Crash(usize),
    /// Start the daemon of a crashed node again.
    Restart(usize),
    /// A frozen node resumes now.
    Thaw(usize),
    /// Stop a node's daemon (`SIGSTOP`) for a while; it then resumes with a backlog.
    Freeze {
        /// Node index.
        node: usize,
        /// How long.
        duration: Duration,
    },
    /// The VIP interface link of a node goes up or down.
    Link {
        /// Node index.
        node: usize,
        /// New state.
        up: bool,
    },
    /// Configure one direction of one heartbeat network.
    SetLink {
        /// Sending node.
        from: usize,
        /// Network.
        network: usize,
        /// Configuration.
        conf: LinkConf,
    },
    /// Configure one direction of the peer channel.
    SetChannel {
        /// Sending node.
        from: usize,
        /// Configuration.
        conf: LinkConf,
    },
    /// Cut everything sent by `from` (`None`: both directions).
    Partition {
        /// Sending node, or both.
        from: Option<usize>,
    },
    /// Every link back to the initial configuration.
    Heal,
    /// Lose a message in flight (index modulo the number in flight).
    DropInFlight(usize),
    /// Duplicate a message in flight; the copy arrives up to a second later.
    DuplicateInFlight(usize),
    /// Deliver a message in flight now (reordering it before the others).
    DeliverNow(usize),
    /// End the oldest step in progress on a node now, with this outcome.
    FinishStep {
        /// Node index.
        node: usize,
        /// Outcome.
        outcome: Outcome,
    },
    /// Change how often a node's scripts fail or hang.
    ScriptFaults {
        /// Node index.
        node: usize,
        /// Failures per mille.
        fail_per_mille: u32,
        /// Hangs (past the timeout) per mille.
        hang_per_mille: u32,
    },
}

/// What a run went through, to show that the invariants were exercised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Finished transitions, by `"FROM -> TO"`.
    pub transitions: BTreeMap<String, u64>,
    /// Times a node took the primary role (persisted a new epoch).
    pub promotions: u64,
    /// Split brains detected by a core.
    pub split_brains: u64,
    /// Pair checks made while connected with at least one writable node.
    pub connected_with_writer: u64,
    /// Pair checks made while connected with a VIP held by both (tolerated overlap).
    pub vip_overlaps: u64,
    /// Operator commands refused by a core.
    pub refused: u64,
    /// Application writes acknowledged by the writer alone (data model).
    pub writes_local: u64,
    /// Application writes acknowledged and mirrored on the secondary.
    pub writes_mirrored: u64,
    /// Application writes refused by a PRIM without a reachable mirror.
    pub writes_blocked: u64,
    /// Promotions checked against the data model without an operator `prim` (invariant (e)).
    pub data_checks: u64,
}

impl Stats {
    /// Adds another run's counts.
    pub fn add(&mut self, other: &Stats) {
        for (transition, count) in &other.transitions {
            *self.transitions.entry(transition.clone()).or_default() += count;
        }
        self.promotions += other.promotions;
        self.split_brains += other.split_brains;
        self.connected_with_writer += other.connected_with_writer;
        self.vip_overlaps += other.vip_overlaps;
        self.refused += other.refused;
        self.writes_local += other.writes_local;
        self.writes_mirrored += other.writes_mirrored;
        self.writes_blocked += other.writes_blocked;
        self.data_checks += other.data_checks;
    }

    /// Finished transitions from `from` to `to`.
    pub fn transitions(&self, from: &str, to: &str) -> u64 {
        self.transitions
            .get(&format!("{from} -> {to}"))
            .copied()
            .unwrap_or(0)
    }
}

/// A scheduled event.
#[derive(Clone, Debug)]
enum Event {
    /// A message arrives.
    Deliver(Packet),
    /// An adapter finished a step.
    Done {
        node: usize,
        incarnation: u64,
        step: StepId,
        outcome: Outcome,
    },
    /// A frozen node resumes.
    Unfreeze(usize),
    /// Application writes on the writable nodes (data model).
    Write,
    /// The replicator of a node reports the health of its replication stream.
    Replication {
        node: usize,
        incarnation: u64,
        connected: bool,
    },
}

/// What the core of one node was told, and will be told, about its replication stream (see
/// [`World::update_replication`]).
#[derive(Clone, Copy, Debug, Default)]
struct ReplicationReport {
    /// The last value delivered to the core (a new core starts with `false`).
    reported: bool,
    /// A report on its way (its event and value).
    pending: Option<(EventKey, bool)>,
}

/// Two nodes, a network, a clock.
#[derive(Debug)]
pub struct World {
    config: WorldConfig,
    now: Time,
    hosts: [Host; 2],
    queue: EventQueue<Event>,
    network: Network,
    checker: Checker,
    data: Data,
    replication: [ReplicationReport; 2],
    /// Detection delays of replication loss (a generator of its own, so that the rest of a seed
    /// is not changed by them).
    replication_rng: Rng,
    trace: Trace,
    rng: Rng,
    next_request: u64,
    requests: HashMap<RequestId, Command>,
    violation: Option<Violation>,
    handled: u64,
    stats: Stats,
}

impl World {
    /// A world at time zero with both daemons just started (every module STOP, no history).
    pub fn new(config: WorldConfig) -> World {
        let mut rng = Rng::new(config.seed);
        let network = Network::new(config.networks, config.link, rng.fork());
        let hosts = [
            Host::new(config.node_settings(0), config.scripts),
            Host::new(config.node_settings(1), config.scripts),
        ];
        let checker = Checker::new(CheckerConfig {
            names: config.names.clone(),
            networks: config.networks,
            healthy_delay: config.healthy_delay(),
            default_primary: config.module.default_primary.clone(),
            vip_grace: config.vip_grace(),
        });
        let trace = Trace::new(config.trace);
        let mut data = Data::new(config.seed);
        let mut queue = EventQueue::new();
        queue.schedule(Time::ZERO.plus(data.next_gap()), Event::Write);
        let replication_rng = Rng::new(config.seed ^ 0x4E91_0000_0000_0005);
        let mut world = World {
            config,
            now: Time::ZERO,
            hosts,
            queue,
            network,
            checker,
            data,
            replication: [ReplicationReport::default(); 2],
            replication_rng,
            trace,
            rng,
            next_request: 1,
            requests: HashMap::new(),
            violation: None,
            handled: 0,
            stats: Stats::default(),
        };
        for node in 0..2 {
            world.boot(node);
        }
        world
    }

    // ----- views ---------------------------------------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// Simulated time.
    pub fn now(&self) -> Time {
        self.now
    }

    /// A node.
    pub fn host(&self, node: usize) -> &Host {
        &self.hosts[node & 1]
    }

    /// A node's status, if it runs.
    pub fn status(&self, node: usize) -> Option<NodeStatus> {
        self.hosts[node & 1]
            .node
            .as_ref()
            .map(tandem_core::Node::status)
    }

    /// Module 0 of a node, if it runs.
    pub fn module(&self, node: usize) -> Option<ModuleSnapshot> {
        self.hosts[node & 1].module()
    }

    /// Whether the nodes are connected in the sense of the invariants.
    pub fn connected(&self) -> bool {
        self.checker.connected()
    }

    /// The data model (see [`crate::data`]).
    pub fn data(&self) -> &Data {
        &self.data
    }

    /// Checks the data of a converged pair (invariant (e) of [`crate::invariants`]): the node in
    /// PRIM holds every acknowledged write not abandoned, and the node in SECOND holds the same
    /// data.
    pub fn check_converged_data(&mut self) -> Result<(), Violation> {
        let state = |node: usize| self.module(node).map(|module| module.state);
        let primary = (0..2).find(|&node| state(node) == Some(tandem_core::State::Prim));
        if let Some(primary) = primary
            && state(1 - primary) == Some(tandem_core::State::Second)
            && let Err(violation) =
                invariants::data_converged(&self.data, primary, self.now, &self.config.names)
        {
            self.fail(violation);
        }
        self.result()
    }

    /// The first broken invariant, if any.
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// Number of inputs the cores handled.
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// What the run went through so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The trace.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// The trace, to change what it records.
    pub fn trace_mut(&mut self) -> &mut Trace {
        &mut self.trace
    }

    /// Takes the transcript recorded since the last call.
    pub fn take_transcript(&mut self) -> Vec<String> {
        self.trace.take_transcript()
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Number of messages in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight_keys().len()
    }

    /// Changes how the VIP and synchronisation adapters behave from now on.
    pub fn set_adapter_timing(&mut self, timing: AdapterTiming) {
        self.config.adapters = timing;
    }

    /// Queues a rule for the next data synchronisation on `node`.
    pub fn sync_rule(&mut self, node: usize, rule: ScriptRule) {
        self.hosts[node & 1].sync_rules.push_back(rule);
    }

    /// Queues a rule for the next call of `script` on `node`.
    pub fn rule(&mut self, node: usize, script: Script, rule: ScriptRule) {
        self.hosts[node & 1]
            .rules
            .entry(script)
            .or_default()
            .push_back(rule);
    }

    // ----- driving -------------------------------------------------------------------------

    /// Applies an operation, then checks the invariants.
    pub fn apply(&mut self, op: Op) -> Result<(), Violation> {
        match op {
            Op::Command { node, command } => self.command(node, command),
            Op::Advance(duration) => return self.run_for(duration),
            Op::Crash(node) => self.crash(node),
            Op::Restart(node) => self.restart(node),
            Op::Thaw(node) => self.thaw(node),
            Op::Freeze { node, duration } => self.freeze(node, duration),
            Op::Link { node, up } => self.set_link_state(node, up),
            Op::SetLink {
                from,
                network,
                conf,
            } => {
                self.op_line(format!(
                    "link {} net{network}: {}",
                    self.direction(from),
                    describe(conf)
                ));
                self.network.set_link(from & 1, network, conf);
            }
            Op::SetChannel { from, conf } => {
                self.op_line(format!(
                    "channel {}: {}",
                    self.direction(from),
                    describe(conf)
                ));
                self.network.set_channel(from & 1, conf);
            }
            Op::Partition { from } => self.partition(from),
            Op::Heal => self.heal(),
            Op::DropInFlight(index) => self.drop_in_flight(index),
            Op::DuplicateInFlight(index) => self.duplicate_in_flight(index),
            Op::DeliverNow(index) => self.deliver_now(index),
            Op::FinishStep { node, outcome } => {
                self.end_oldest_step(node, outcome, false);
            }
            Op::ScriptFaults {
                node,
                fail_per_mille,
                hang_per_mille,
            } => {
                let host = &mut self.hosts[node & 1];
                host.scripts.fail_per_mille = fail_per_mille;
                host.scripts.hang_per_mille = hang_per_mille;
                let name = host.name.clone();
                self.op_line(format!(
                    "{name} scripts fail {fail_per_mille}‰ hang {hang_per_mille}‰"
                ));
            }
        }
        self.update_replication();
        self.result()
    }

    /// Runs until `until` (or the first broken invariant).
    pub fn run_until(&mut self, until: Time) -> Result<(), Violation> {
        let mut same_instant = 0u32;
        while self.violation.is_none() {
            let next_event = self.queue.next_time();
            let next_tick = self.next_tick();
            let event_first = match (next_event, next_tick) {
                (None, None) => break,
                (Some(event), Some((tick, _))) => event <= tick,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            let at = if event_first {
                next_event
            } else {
                next_tick.map(|(at, _)| at)
            };
            let Some(at) = at else { break };
            if at > until {
                break;
            }
            if at == self.now {
                same_instant += 1;
                if same_instant > 100_000 {
                    self.fail_at(format!(
                        "livelock: time does not advance at {}",
                        trace::seconds(at)
                    ));
                    break;
                }
            } else {
                same_instant = 0;
            }
            self.now = self.now.max(at);
            if event_first {
                if let Some((_, event)) = self.queue.pop() {
                    self.dispatch(event);
                }
            } else if let Some((_, node)) = next_tick {
                self.input(node, Input::Tick, None, None);
            }
        }
        if self.violation.is_none() {
            self.now = self.now.max(until);
        }
        self.result()
    }

    /// Runs for `duration`.
    pub fn run_for(&mut self, duration: Duration) -> Result<(), Violation> {
        self.run_until(self.now.plus(duration))
    }

    /// Sends an operator command to a node.
    pub fn command(&mut self, node: usize, command: Command) {
        let node = node & 1;
        let request = RequestId(self.next_request);
        self.next_request += 1;
        if !self.hosts[node].up() {
            let name = self.hosts[node].name.clone();
            self.record(
                Kind::Command,
                format!("{name} command {}: node is down", command.as_str()),
                true,
            );
            return;
        }
        self.requests.insert(request, command);
        self.input(
            node,
            Input::Command {
                module: ModuleId(0),
                command,
                request,
            },
            None,
            None,
        );
    }

    /// Power loss of a node.
    pub fn crash(&mut self, node: usize) {
        let node = node & 1;
        if !self.hosts[node].up() {
            return;
        }
        self.hosts[node].crash();
        self.data.crashed(node);
        if let Some((key, _)) = self.replication[node].pending.take() {
            self.queue.cancel(key);
        }
        self.replication[node].reported = false;
        self.checker.node_crashed(node, self.now);
        self.op_line(format!("crash {}", self.hosts[node].name));
        self.check_pair();
        self.update_replication();
    }

    /// Restarts the daemon of a crashed node.
    pub fn restart(&mut self, node: usize) {
        let node = node & 1;
        if self.hosts[node].up() {
            return;
        }
        self.boot(node);
    }

    /// Freezes a node's daemon for `duration`.
    pub fn freeze(&mut self, node: usize, duration: Duration) {
        let node = node & 1;
        let host = &mut self.hosts[node];
        if !host.up() || host.frozen() {
            return;
        }
        let until = self.now.plus(duration);
        host.frozen_until = Some(until);
        let name = host.name.clone();
        self.queue.schedule(until, Event::Unfreeze(node));
        self.checker.node_event(self.now);
        self.op_line(format!("freeze {name} for {duration:?}"));
    }

    /// A frozen node resumes now and handles its backlog in order.
    pub fn thaw(&mut self, node: usize) {
        let node = node & 1;
        let host = &mut self.hosts[node];
        if host.frozen_until.is_none() {
            return;
        }
        host.frozen_until = None;
        let backlog: Vec<_> = host.backlog.drain(..).collect();
        let name = host.name.clone();
        self.checker.node_event(self.now);
        self.op_line(format!(
            "{name} resumes with {} inputs waiting",
            backlog.len()
        ));
        for (input, sent_at, known) in backlog {
            self.input(node, input, sent_at, known);
        }
    }

    /// The VIP interface link of a node goes up or down.
    pub fn set_link_state(&mut self, node: usize, up: bool) {
        let node = node & 1;
        if self.hosts[node].link_up == up {
            return;
        }
        self.hosts[node].link_up = up;
        let name = self.hosts[node].name.clone();
        self.op_line(format!(
            "{name} interface link {}",
            if up { "up" } else { "down" }
        ));
        self.input(
            node,
            Input::LinkChanged {
                module: ModuleId(0),
                up,
            },
            None,
            None,
        );
    }

    /// Cuts everything sent by `from` (`None`: both ways).
    pub fn partition(&mut self, from: Option<usize>) {
        let directions: Vec<usize> = match from {
            Some(from) => vec![from & 1],
            None => vec![0, 1],
        };
        for from in directions {
            self.op_line(format!("partition {}", self.direction(from)));
            self.network.set_direction(from, LinkConf::down());
        }
        self.update_replication();
    }

    /// Every link back to the initial configuration.
    pub fn heal(&mut self) {
        self.op_line("heal the network".into());
        for from in 0..2 {
            self.network.set_direction(from, self.config.link);
        }
        self.update_replication();
    }

    /// Ends the held or running call of `script` on `node` now with `outcome`.
    pub fn finish_script(&mut self, node: usize, script: Script, outcome: Outcome) -> bool {
        let node = node & 1;
        let step =
            self.hosts[node]
                .running
                .iter()
                .find_map(|(step, running)| match &running.what {
                    StepWhat::Script(call) if call.script == script => Some(*step),
                    _ => None,
                });
        match step {
            Some(step) => {
                self.end_step_now(node, step, outcome, true);
                true
            }
            None => false,
        }
    }

    /// Ends the oldest step in progress on `node` now with exactly this outcome; false if none
    /// runs.
    pub fn finish_step(&mut self, node: usize, outcome: Outcome) -> bool {
        self.end_oldest_step(node, outcome, true)
    }

    /// Ends the oldest step in progress on `node` now; `exact: false` (a random fault) lets a
    /// data synchronisation that could not have copied anything fail (see `dispatch`).
    fn end_oldest_step(&mut self, node: usize, outcome: Outcome, exact: bool) -> bool {
        let node = node & 1;
        match self.hosts[node].running.keys().next().copied() {
            Some(step) => {
                self.end_step_now(node, step, outcome, exact);
                true
            }
            None => false,
        }
    }

    // ----- internals -----------------------------------------------------------------------

    fn result(&self) -> Result<(), Violation> {
        match &self.violation {
            Some(violation) => Err(violation.clone()),
            None => Ok(()),
        }
    }

    fn direction(&self, from: usize) -> String {
        format!(
            "{} -> {}",
            self.config.names[from & 1],
            self.config.names[1 - (from & 1)]
        )
    }

    fn record(&mut self, kind: Kind, text: String, transcript: bool) {
        self.trace.record(self.now, kind, text, transcript);
    }

    fn op_line(&mut self, text: String) {
        self.record(Kind::Op, format!("-- {text}"), true);
    }

    fn fail(&mut self, violation: Violation) {
        if self.violation.is_none() {
            self.record(Kind::Op, format!("!! VIOLATION {violation}"), false);
            self.violation = Some(violation);
        }
    }

    fn fail_at(&mut self, message: String) {
        self.fail(Violation {
            at: self.now,
            message,
        });
    }

    fn boot(&mut self, node: usize) {
        let host = &mut self.hosts[node];
        host.boot(self.now);
        let epoch = host.records.first().map_or(0, |record| record.epoch);
        let (name, incarnation, link_up) = (host.name.clone(), host.incarnation, host.link_up);
        self.network.receiver_restarted(node);
        self.checker.node_started(node, self.now, epoch);
        if incarnation > 1 {
            self.op_line(format!("restart {name} (incarnation {incarnation})"));
        }
        if !link_up {
            self.input(
                node,
                Input::LinkChanged {
                    module: ModuleId(0),
                    up: false,
                },
                None,
                None,
            );
        }
    }

    fn next_tick(&self) -> Option<(Time, usize)> {
        let mut best: Option<(Time, usize)> = None;
        for (index, host) in self.hosts.iter().enumerate() {
            if host.frozen() {
                continue;
            }
            let Some(due) = host.node.as_ref().and_then(tandem_core::Node::poll_timeout) else {
                continue;
            };
            if best.is_none_or(|(time, _)| due < time) {
                best = Some((due, index));
            }
        }
        best
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Deliver(packet) => self.deliver(packet),
            Event::Done {
                node,
                incarnation,
                step,
                mut outcome,
            } => {
                let host = &mut self.hosts[node];
                if host.incarnation != incarnation || !host.up() {
                    return;
                }
                let Some(running) = host.running.remove(&step) else {
                    return;
                };
                if running.what == StepWhat::ReleaseVips {
                    host.vip = false;
                }
                if running.what == StepWhat::SyncData && outcome == Outcome::Ok {
                    // The data comes from the peer, which must hold the primary role, over the
                    // channel towards this node. A real adapter cannot succeed otherwise: unless a
                    // test decided the outcome, the synchronisation fails.
                    let source = self.hosts[1 - node]
                        .module()
                        .filter(|peer| peer.primary_role && self.network.channel(1 - node).up)
                        .map(|peer| peer.epoch);
                    if source.is_none() && !running.exact {
                        outcome = Outcome::Failed("the primary is unreachable".into());
                    } else {
                        self.data.synchronised(node, source);
                    }
                }
                let host = &mut self.hosts[node];
                let name = host.name.clone();
                let what = match &running.what {
                    StepWhat::Script(call) => format!(
                        "{}{}",
                        call.script.file_name(),
                        if call.force { " force" } else { "" }
                    ),
                    StepWhat::AcquireVips => "vip acquire".into(),
                    StepWhat::ReleaseVips => "vip release".into(),
                    StepWhat::SyncData => "sync".into(),
                };
                self.record(
                    Kind::Done,
                    format!("{name} {what} done: {}", trace::outcome(&outcome)),
                    running.shown,
                );
                self.input(
                    node,
                    Input::StepDone {
                        module: running.module,
                        step,
                        outcome,
                    },
                    None,
                    None,
                );
                self.check_pair();
            }
            Event::Unfreeze(node) => self.thaw(node),
            Event::Write => self.write_round(),
            Event::Replication {
                node,
                incarnation,
                connected,
            } => {
                let host = &self.hosts[node];
                if host.incarnation != incarnation || !host.up() {
                    return;
                }
                self.replication[node] = ReplicationReport {
                    reported: connected,
                    pending: None,
                };
                if self.trace.wants(Kind::Net) {
                    let text = format!(
                        "{} replication {}",
                        self.hosts[node].name,
                        if connected { "connected" } else { "lost" }
                    );
                    self.record(Kind::Net, text, false);
                }
                self.input(
                    node,
                    Input::ReplicationChanged {
                        module: ModuleId(0),
                        connected,
                    },
                    None,
                    None,
                );
            }
        }
        self.update_replication();
    }

    fn deliver(&mut self, packet: Packet) {
        let to = packet.to();
        if !self.hosts[to].up() {
            return;
        }
        if !self.network.accept(&packet) {
            return;
        }
        if self.trace.wants(Kind::Net) {
            let text = format!(
                "{} receives {:?} seq {} sent at {}",
                self.hosts[to].name,
                packet.carrier,
                packet.snapshot.seq,
                trace::seconds(packet.sent_at)
            );
            self.record(Kind::Net, text, false);
        }
        let snapshot = (*packet.snapshot).clone();
        match packet.carrier {
            Carrier::Heartbeat { header } => {
                let input = Input::Heartbeat {
                    network: usize::from(header.network),
                    snapshot,
                };
                self.input(to, input, Some(packet.sent_at), Some(packet.known));
            }
            Carrier::Channel => self.input(
                to,
                Input::ChannelSnapshot(snapshot),
                None,
                Some(packet.known),
            ),
        }
    }

    /// Hands an input to a node (or to its backlog while frozen); a snapshot comes with what its
    /// sender knew of acknowledged writes.
    fn input(&mut self, node: usize, input: Input, sent_at: Option<Time>, known: Option<[u64; 2]>) {
        self.handle_input(node, input, sent_at, known);
        self.update_replication();
    }

    fn handle_input(
        &mut self,
        node: usize,
        input: Input,
        sent_at: Option<Time>,
        known: Option<[u64; 2]>,
    ) {
        if self.violation.is_some() {
            return;
        }
        self.replicate();
        let host = &mut self.hosts[node];
        if !host.up() {
            return;
        }
        if host.frozen() {
            host.backlog.push_back((input, sent_at, known));
            return;
        }
        let summary = InputSummary::of(&input);
        let now = self.now;
        let Some(result) = host.handle(now, input) else {
            return;
        };
        self.handled += 1;
        let handled = match result {
            Ok(handled) => handled,
            Err(message) => {
                let name = self.hosts[node].name.clone();
                self.fail_at(format!("{name}: {message}"));
                return;
            }
        };
        if let Some(sent_at) = sent_at {
            self.checker.heartbeat_processed(node, sent_at, now);
        }
        if let Some(known) = known {
            self.data.learn(node, known);
        }
        let peer = &self.hosts[1 - node];
        let peer_claim = match peer.module() {
            Some(module) => module.claim,
            None => peer
                .records
                .first()
                .map_or(Claim::Fresh, |record| record.claim),
        };
        self.execute(node, &handled.effects);
        let check = self.checker.after_handle(invariants::Handled {
            node,
            now,
            input: &summary,
            before: &handled.before,
            after: &handled.after,
            effects: &handled.effects,
            poll_timeout: handled.poll_after,
            poll_before: handled.poll_before,
            peer_claim,
        });
        match check {
            Err(violation) => self.fail(violation),
            Ok(Some(promotion)) => {
                if !promotion.forced {
                    self.stats.data_checks += 1;
                }
                let check = invariants::data_at_promotion(
                    &mut self.data,
                    node,
                    promotion,
                    now,
                    &self.config.names,
                );
                if let Err(violation) = check {
                    self.fail(violation);
                }
            }
            Ok(None) => {}
        }
        self.check_pair();
    }

    /// The replication link from `node` to its peer now (see [`crate::data`]).
    fn link_from(&self, node: usize) -> Link {
        let peer = 1 - (node & 1);
        let tenure = self.module(node).filter(|module| module.primary_role);
        let mirror = tenure.is_some_and(|module| self.data.mirror[peer] == Some(module.epoch))
            && self
                .module(peer)
                .is_some_and(|module| module.state == tandem_core::State::Second);
        if !mirror {
            Link::NoMirror
        } else if self.network.channel(node).up {
            Link::Up
        } else {
            Link::Down
        }
    }

    /// Drives `Input::ReplicationChanged` from the simulated replication stream, as the
    /// replicator of the daemon will: the stream of `node` is *connected* while `node` holds the
    /// primary role, its peer is a mirror of this role tenure (its synchronisation completed
    /// while `node` was primary in this epoch, and it is still in SECOND and up), the channel
    /// `node` -> peer is up, and no write recorded for the mirror remains undelivered.
    ///
    /// Becoming connected is reported at once (the replicator sees the acknowledgement of the
    /// last mutation it sent). A loss of the stream (the channel goes down, the peer stops being
    /// a mirror: leaves SECOND, crashes) is reported after a detection delay drawn uniformly
    /// from 1 ms to the heartbeat timeout: a failed connection is seen at once, a silent one
    /// when an acknowledgement does not arrive within the replication timeout, which is no
    /// longer than the heartbeat timeout. A loss that heals before it is reported (the
    /// acknowledgements resume) is not reported at all. A write acknowledged alone (ALONE) that
    /// the mirror has not received is reported at once: the replicator completed it without the
    /// mirror's acknowledgement, so it knows that it is not caught up.
    fn update_replication(&mut self) {
        for node in 0..2 {
            if !self.hosts[node].up() {
                continue;
            }
            let behind = !self.data.pending[1 - node].is_empty();
            let connected = self.link_from(node) == Link::Up && !behind;
            let report = self.replication[node];
            let expected = report.pending.map_or(report.reported, |(_, value)| value);
            // A loss already on its way is reported sooner once a write is acknowledged alone.
            let sooner = !connected
                && behind
                && report
                    .pending
                    .is_some_and(|(key, value)| !value && key.at() > self.now);
            if connected == expected && !sooner {
                continue;
            }
            if let Some((key, _)) = report.pending {
                self.queue.cancel(key);
            }
            if connected == report.reported {
                self.replication[node].pending = None;
                continue;
            }
            let at = if connected || behind {
                self.now
            } else {
                let delay = self
                    .replication_rng
                    .duration(Duration::from_millis(1), self.config.timeout);
                self.now.plus(delay)
            };
            let incarnation = self.hosts[node].incarnation;
            let key = self.queue.schedule(
                at,
                Event::Replication {
                    node,
                    incarnation,
                    connected,
                },
            );
            self.replication[node].pending = Some((key, connected));
        }
    }

    /// Recorded changes reach a mirror whose channel is up; a secondary that is no mirror any
    /// more drops them.
    fn replicate(&mut self) {
        for node in 0..2 {
            if !self.data.pending[1 - node].is_empty() {
                let link = self.link_from(node);
                self.data.link(node, link);
            }
        }
    }

    /// One round of application writes: one write on every node that is up, writable and holds
    /// the primary role (see [`crate::data`]).
    fn write_round(&mut self) {
        self.replicate();
        for node in 0..2 {
            let host = &self.hosts[node];
            let Some(module) = host.module() else {
                continue;
            };
            if !host.writable || !module.primary_role {
                continue;
            }
            let link = self.link_from(node);
            // The claim says how writes are acknowledged: `shared` (PRIM, and the end of ALONE ->
            // PRIM) promises the secondary holds every write; `exclusive` (ALONE, and the end of
            // PRIM -> ALONE, persisted before the first write acknowledged alone) does not.
            let prim = module.claim == Claim::Shared;
            let split = self
                .module(1 - node)
                .is_some_and(|module| module.primary_role);
            let fate = self.data.write(node, self.now, prim, link, split);
            match fate {
                WriteFate::Local | WriteFate::Recorded => self.stats.writes_local += 1,
                WriteFate::Mirrored => self.stats.writes_mirrored += 1,
                WriteFate::Blocked => self.stats.writes_blocked += 1,
            }
            if self.trace.wants(Kind::Net) {
                let text = format!(
                    "{} write {}: {fate:?}",
                    self.hosts[node].name, self.data.writes
                );
                self.record(Kind::Net, text, false);
            }
        }
        let at = self.now.plus(self.data.next_gap());
        self.queue.schedule(at, Event::Write);
    }

    fn check_pair(&mut self) {
        let nodes = [outside(&self.hosts[0]), outside(&self.hosts[1])];
        if self.checker.connected() && nodes.iter().all(|node| node.up) {
            if nodes.iter().any(|node| node.writable) {
                self.stats.connected_with_writer += 1;
            }
            if nodes.iter().all(|node| node.vip) {
                self.stats.vip_overlaps += 1;
            }
        }
        if let Err(violation) = self.checker.check_pair(self.now, nodes) {
            self.fail(violation);
        }
    }

    /// Carries out the effects of one call, in order.
    fn execute(&mut self, node: usize, effects: &[Effect]) {
        let now = self.now;
        let name = self.hosts[node].name.clone();
        for effect in effects {
            if let Some((kind, text)) = trace::effect_line(&name, effect)
                && self.trace.wants(kind)
            {
                let command_log = matches!(
                    effect,
                    Effect::Log { message, .. } if message.starts_with("command ")
                );
                let transcript = kind != Kind::Net
                    && (kind != Kind::Log || (self.trace.config().transcript_logs && !command_log));
                self.record(kind, text, transcript);
            }
            match effect {
                Effect::Broadcast(snapshot) => {
                    let known = self.data.known[node];
                    let sent = self.network.broadcast(node, now, snapshot.clone(), known);
                    for fate in sent.fates {
                        self.checker
                            .heartbeat_sent(node, fate.network, now, fate.first_delay);
                    }
                    for (at, packet) in sent.deliveries {
                        self.queue.schedule(at, Event::Deliver(packet));
                    }
                }
                Effect::RunScript { module, step, call } => {
                    let planned = self.hosts[node].plan_script(call, now, &mut self.rng);
                    self.start_step(
                        node,
                        *module,
                        *step,
                        StepWhat::Script(call.clone()),
                        planned,
                    );
                }
                Effect::AbortScripts { module } => {
                    let scripts: Vec<StepId> = self.hosts[node]
                        .running
                        .iter()
                        .filter(|(_, running)| {
                            running.module == *module && matches!(running.what, StepWhat::Script(_))
                        })
                        .map(|(step, _)| *step)
                        .collect();
                    for step in scripts {
                        self.end_step_now(
                            node,
                            step,
                            Outcome::Failed("killed (forcestop)".into()),
                            false,
                        );
                    }
                }
                Effect::AcquireVips { module, step } => {
                    let other = outside(&self.hosts[1 - node]);
                    if let Err(violation) = self.checker.vip_requested(node, now, other) {
                        self.fail(violation);
                    }
                    self.hosts[node].vip = true;
                    let timing = self.config.adapters;
                    let planned = self.hosts[node].plan_vip(true, now, timing, &mut self.rng);
                    self.start_step(node, *module, *step, StepWhat::AcquireVips, planned);
                }
                Effect::ReleaseVips { module, step } => {
                    let timing = self.config.adapters;
                    let planned = self.hosts[node].plan_vip(false, now, timing, &mut self.rng);
                    self.start_step(node, *module, *step, StepWhat::ReleaseVips, planned);
                }
                Effect::SyncData { module, step } => {
                    let timing = self.config.adapters;
                    let planned = self.hosts[node].plan_sync(now, timing, &mut self.rng);
                    self.start_step(node, *module, *step, StepWhat::SyncData, planned);
                }
                Effect::SetWritable { writable, .. } => self.hosts[node].writable = *writable,
                Effect::Persist { module, record } => {
                    if let Some(slot) = self.hosts[node].records.get_mut(module.0) {
                        if record.epoch > slot.epoch {
                            self.stats.promotions += 1;
                        }
                        *slot = record.clone();
                    }
                    if record.claim == Claim::Stale {
                        self.data.gave_up(node);
                    }
                }
                Effect::Log { message, .. } => {
                    if let Some(transition) = message.strip_prefix("transition ")
                        && let Some((states, _)) = transition.split_once(':')
                    {
                        *self.stats.transitions.entry(states.to_owned()).or_default() += 1;
                    } else if message.starts_with("split brain:") {
                        self.stats.split_brains += 1;
                        self.data.split_brain();
                    }
                }
                Effect::Reply { request, result } => {
                    let command = self
                        .requests
                        .remove(request)
                        .map_or("?", |command| command.as_str());
                    let text = match result {
                        Ok(message) => format!("{name} command {command}: ok: {message}"),
                        Err(reason) => {
                            self.stats.refused += 1;
                            format!("{name} command {command}: refused: {reason}")
                        }
                    };
                    self.record(Kind::Command, text, true);
                }
                Effect::StateChanged { .. } => {}
            }
        }
    }

    fn start_step(
        &mut self,
        node: usize,
        module: ModuleId,
        step: StepId,
        what: StepWhat,
        planned: Planned,
    ) {
        let incarnation = self.hosts[node].incarnation;
        let key = planned.at.map(|at| {
            self.queue.schedule(
                at,
                Event::Done {
                    node,
                    incarnation,
                    step,
                    outcome: planned.outcome,
                },
            )
        });
        self.hosts[node].running.insert(
            step,
            RunningStep {
                module,
                what,
                key,
                shown: planned.shown,
                exact: planned.exact,
            },
        );
    }

    /// Ends a step now with `outcome`; `exact`: a test decided it (kept as is).
    fn end_step_now(&mut self, node: usize, step: StepId, outcome: Outcome, exact: bool) {
        let incarnation = self.hosts[node].incarnation;
        let Some(running) = self.hosts[node].running.get_mut(&step) else {
            return;
        };
        if let Some(key) = running.key.take() {
            self.queue.cancel(key);
        }
        running.shown = true;
        running.exact = exact;
        let key = self.queue.schedule(
            self.now,
            Event::Done {
                node,
                incarnation,
                step,
                outcome,
            },
        );
        running.key = Some(key);
    }

    fn in_flight_keys(&self) -> Vec<EventKey> {
        self.queue
            .iter()
            .filter(|(_, event)| matches!(event, Event::Deliver(_)))
            .map(|(key, _)| key)
            .collect()
    }

    fn drop_in_flight(&mut self, index: usize) {
        let keys = self.in_flight_keys();
        if keys.is_empty() {
            return;
        }
        if let Some(Event::Deliver(packet)) = self.queue.cancel(keys[index % keys.len()]) {
            if let Carrier::Heartbeat { header } = packet.carrier {
                // Conservative: the heartbeat may now be lost; the window restarts.
                self.checker.heartbeat_sent(
                    packet.from,
                    usize::from(header.network),
                    packet.sent_at,
                    None,
                );
            }
            self.op_line(format!(
                "drop a message from {}",
                self.hosts[packet.from].name
            ));
        }
    }

    fn duplicate_in_flight(&mut self, index: usize) {
        let keys = self.in_flight_keys();
        if keys.is_empty() {
            return;
        }
        let key = keys[index % keys.len()];
        let copy = self
            .queue
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, event)| event.clone());
        if let Some(copy) = copy {
            let at = key.at().plus(self.rng.millis(0, 1000));
            self.queue.schedule(at, copy);
            self.op_line("duplicate a message".into());
        }
    }

    fn deliver_now(&mut self, index: usize) {
        let keys = self.in_flight_keys();
        if keys.is_empty() {
            return;
        }
        self.queue.reschedule(keys[index % keys.len()], self.now);
        self.op_line("deliver a message now".into());
    }
}

/// A node as the pair invariants see it.
fn outside(host: &Host) -> Outside {
    Outside {
        up: host.up(),
        writable: host.writable,
        vip: host.vip,
        primary_role: host.module().is_some_and(|module| module.primary_role),
    }
}

fn describe(conf: LinkConf) -> String {
    if !conf.up {
        return "down".into();
    }
    format!(
        "loss {}‰ dup {}‰ delay {:?}..{:?}",
        conf.loss_per_mille, conf.dup_per_mille, conf.delay_min, conf.delay_max
    )
}
