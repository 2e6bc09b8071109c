//! The node: peer liveness, the exchange of snapshots, and the modules it runs.

use tandem_proto::{Claim, ModuleSnapshot, NodeSnapshot, State};

use crate::io::{
    Action, Command, Effect, Input, Level, ModuleId, Outcome, Persisted, RequestId, Script,
    ScriptCall, StepId, earliest,
};
use crate::module::{Goal, Module, Step};
use crate::policy::{self, Preference};
use crate::settings::NodeSettings;
use crate::status::{ModuleStatus, NodeStatus, PeerStatus, TransitionRecord};
use crate::time::Time;

/// What the local node knows about its peer.
#[derive(Clone, Debug, Default)]
struct PeerView {
    /// Last heartbeat per network.
    last_heard: Vec<Option<Time>>,
    /// At least one network heard the peer within the timeout.
    alive: bool,
    /// Newest snapshot received, by `(incarnation, seq)`.
    snapshot: Option<NodeSnapshot>,
    /// Highest epoch seen in any of the peer's modules, per module.
    max_epoch: Vec<u64>,
    /// Highest data generation seen in any of the peer's modules, per module.
    max_generation: Vec<u64>,
}

/// The decision core of one node. Feed it [`Input`]s with the current time; carry out the
/// [`Effect`]s it returns, in order; call [`Node::handle`] with [`Input::Tick`] no later than
/// [`Node::poll_timeout`].
#[derive(Clone, Debug)]
pub struct Node {
    settings: NodeSettings,
    incarnation: u64,
    started_at: Time,
    now: Time,
    peer: PeerView,
    modules: Vec<Module>,
    next_step: u64,
    snapshot_seq: u64,
    next_pulse: Time,
    last_broadcast: Option<NodeSnapshot>,
    out: Vec<Effect>,
}

impl Node {
    /// A node that just started: every module STOP, with its persisted record (`records[i]` for
    /// module `i`; missing records mean a node with no history).
    pub fn new(
        settings: NodeSettings,
        records: Vec<Persisted>,
        incarnation: u64,
        now: Time,
    ) -> Node {
        let modules: Vec<Module> = settings
            .modules
            .iter()
            .enumerate()
            .map(|(index, module_settings)| {
                let record = records.get(index).cloned().unwrap_or_default();
                Module::new(ModuleId(index), module_settings.clone(), record)
            })
            .collect();
        let networks = settings.networks.max(1);
        Node {
            settings,
            incarnation,
            started_at: now,
            now,
            peer: PeerView {
                last_heard: vec![None; networks],
                max_epoch: modules
                    .iter()
                    .map(|module: &Module| module.record.peer_epoch)
                    .collect(),
                max_generation: modules
                    .iter()
                    .map(|module: &Module| module.record.peer_generation)
                    .collect(),
                ..PeerView::default()
            },
            modules,
            next_step: 1,
            snapshot_seq: 0,
            next_pulse: now,
            last_broadcast: None,
            out: Vec::new(),
        }
    }

    /// The settings the node runs with.
    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// This run's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Whether the peer is currently considered alive.
    pub fn peer_alive(&self) -> bool {
        self.peer.alive
    }

    /// Handles one input at time `now` and returns the effects to carry out, in order.
    pub fn handle(&mut self, now: Time, input: Input) -> Vec<Effect> {
        let gap = now.since(self.now);
        if gap > self.settings.timeout {
            // The driver ticks at least every pulse: a longer silence is a pause (SIGSTOP, VM
            // freeze, suspend). Inputs queued meanwhile may be old, the peer may have declared
            // this node lost and revoked its grants: grants are not used for one timeout, like
            // at boot.
            self.started_at = now;
            self.log(
                None,
                Level::Warn,
                format!(
                    "no input for {gap:?} (paused?): the peer's grants are not used for {:?}",
                    self.settings.timeout
                ),
            );
        }
        self.now = self.now.max(now);
        match input {
            Input::Tick => {}
            Input::Heartbeat { network, snapshot } => self.on_heartbeat(network, snapshot),
            Input::ChannelSnapshot(snapshot) => {
                self.on_snapshot(snapshot);
            }
            Input::Command {
                module,
                command,
                request,
            } => self.on_command(module, command, request),
            Input::StepDone {
                module,
                step,
                outcome,
            } => self.on_step_done(module, step, outcome),
            Input::LinkChanged { module, up } => self.on_link(module, up),
            Input::ReplicationChanged { module, connected } => {
                if let Some(module) = self.modules.get_mut(module.0) {
                    if connected {
                        module.connected_generation = Some(module.record.generation);
                    } else if module.replication_connected
                        && module.state == State::Alone
                        && module.primary_role
                        && module.connected_generation == Some(module.record.generation)
                    {
                        module.new_generation_due = true;
                    }
                    module.replication_connected = connected;
                }
            }
        }
        self.update_liveness();
        self.settle();
        self.maybe_broadcast();
        std::mem::take(&mut self.out)
    }

    /// The latest time at which [`Input::Tick`] must be delivered.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut due = Some(self.next_pulse);
        if self.peer.alive {
            due = earliest(due, self.liveness_deadline());
        }
        for module in &self.modules {
            if module.state == State::Wait && module.current.is_none() {
                // Only deadlines still ahead: a past one would make the driver spin.
                let deadlines = [Some(self.started_at), module.started_at]
                    .into_iter()
                    .flatten()
                    .map(|started| started.plus(self.settings.timeout))
                    .filter(|deadline| *deadline > self.now);
                for deadline in deadlines {
                    due = earliest(due, Some(deadline));
                }
            }
        }
        due.map(|time| time.max(self.now))
    }

    /// A view of everything, for `tandem status`.
    pub fn status(&self) -> NodeStatus {
        let peer_snapshot = self.peer.snapshot.as_ref();
        NodeStatus {
            node: self.settings.local.clone(),
            peer: self.settings.peer.clone(),
            peer_alive: self.peer.alive,
            incarnation: self.incarnation,
            modules: self
                .modules
                .iter()
                .map(|module| {
                    let peer_module = peer_snapshot
                        .and_then(|snapshot| find_module(snapshot, &module.settings.name));
                    ModuleStatus {
                        name: module.settings.name.clone(),
                        state: module.state,
                        ready: module.ready,
                        claim: module.record.claim,
                        primary_role: module.primary_role,
                        epoch: module.record.epoch,
                        failover: module.settings.failover,
                        waiting_for: module.wait_reason.clone(),
                        held: module.hold.clone(),
                        link_up: module.link_up,
                        vip_held: module.vip_held,
                        running_step: module.current.as_ref().map(|(_, step)| step.describe()),
                        last_transition: module.last_transition.clone(),
                        peer: PeerStatus {
                            name: self.settings.peer.clone(),
                            reachable: self.peer.alive,
                            state: peer_module.map(|peer| peer.state),
                            ready: peer_module.is_some_and(|peer| peer.ready),
                            claim: peer_module.map(|peer| peer.claim),
                            primary_role: peer_module.is_some_and(|peer| peer.primary_role),
                        },
                    }
                })
                .collect(),
        }
    }

    /// The snapshot this node sends to its peer.
    pub fn snapshot(&self) -> NodeSnapshot {
        NodeSnapshot {
            node: self.settings.local.clone(),
            incarnation: self.incarnation,
            seq: self.snapshot_seq,
            modules: self.modules.iter().map(Module::snapshot).collect(),
        }
    }

    // ----- inputs -------------------------------------------------------------------------

    fn on_heartbeat(&mut self, network: usize, snapshot: NodeSnapshot) {
        if snapshot.node != self.settings.peer {
            self.log(
                None,
                Level::Warn,
                format!("heartbeat from unknown node {:?}", snapshot.node),
            );
            return;
        }
        if let Some(slot) = self.peer.last_heard.get_mut(network) {
            *slot = Some(self.now);
        }
        self.on_snapshot(snapshot);
    }

    fn on_snapshot(&mut self, snapshot: NodeSnapshot) -> bool {
        if snapshot.node != self.settings.peer {
            return false;
        }
        let newer = match &self.peer.snapshot {
            None => true,
            Some(current) => {
                (snapshot.incarnation, snapshot.seq) > (current.incarnation, current.seq)
            }
        };
        if !newer {
            return false;
        }
        let restarted = self
            .peer
            .snapshot
            .as_ref()
            .is_some_and(|current| current.incarnation != snapshot.incarnation);
        if restarted {
            self.log(
                None,
                Level::Info,
                format!("peer {} restarted", self.settings.peer),
            );
        }
        for module in &mut self.modules {
            // The epoch and generation of a stopped module count too: it may have served before
            // it stopped, and this node must neither reuse its epoch nor ignore its writes.
            let index = module.id.0;
            if let Some(any_state) = snapshot
                .modules
                .iter()
                .find(|peer_module| peer_module.name == module.settings.name)
            {
                self.peer.max_epoch[index] = self.peer.max_epoch[index].max(any_state.epoch);
                self.peer.max_generation[index] =
                    self.peer.max_generation[index].max(any_state.generation);
            }
            if let Some(peer_module) = find_module(&snapshot, &module.settings.name)
                && (restarted || module.peer_swap_seen.is_none())
            {
                module.peer_swap_seen = Some(peer_module.swap_counter);
            }
        }
        self.peer.snapshot = Some(snapshot);
        true
    }

    fn on_command(&mut self, id: ModuleId, command: Command, request: RequestId) {
        let peer = self.peer_module(id).cloned();
        let Some(module) = self.modules.get_mut(id.0) else {
            self.out.push(Effect::Reply {
                request,
                result: Err("no such module".into()),
            });
            return;
        };
        let peer_primary = peer.as_ref().is_some_and(|peer| peer.primary_role);
        let peer_second_ready = peer
            .as_ref()
            .is_some_and(|peer| peer.state == State::Second && peer.ready);
        let peer_prim_ready = peer
            .as_ref()
            .is_some_and(|peer| peer.primary_role && peer.state.is_primary());
        let state = module.state;
        let result: Result<String, String> = match command {
            Command::Start => {
                if state == State::Stop && module.current.is_none() {
                    module.goal = Goal::Run;
                    Ok("starting".into())
                } else {
                    Err(format!("already started (state {state})"))
                }
            }
            Command::Prim => {
                if module.primary_role || state.is_primary() {
                    Err("this node is already primary".into())
                } else if peer_primary {
                    Err(format!(
                        "the peer {} is primary: use `tandem swap`, or stop it first",
                        self.settings.peer
                    ))
                } else if matches!(state, State::Stop | State::Wait) {
                    module.goal = Goal::ForcePrim;
                    module.hold = None;
                    let lost = if module.record.claim.is_up_to_date() {
                        String::new()
                    } else if module.record.claim == Claim::Fresh {
                        "; this node has no history: its data becomes the reference copy".into()
                    } else {
                        format!(
                            "; this node's data is {}: writes the peer acknowledged and this node \
                             lacks will be lost at the peer's next resynchronisation",
                            module.record.claim.as_str()
                        )
                    };
                    Ok(format!("forcing this node to become primary{lost}"))
                } else {
                    Err(format!(
                        "cannot force primary from state {state}; stop the module first"
                    ))
                }
            }
            Command::Second => {
                if module.primary_role || state.is_primary() {
                    Err("this node is primary: use `tandem swap`".into())
                } else if state == State::Second {
                    Err("this node is already secondary".into())
                } else if !peer_primary {
                    Err(format!(
                        "the peer {} is not primary: there is nothing to synchronise from",
                        self.settings.peer
                    ))
                } else {
                    module.goal = Goal::ForceSecond;
                    module.hold = None;
                    Ok("starting as secondary".into())
                }
            }
            Command::Stop => {
                if state == State::Stop && module.current.is_none() {
                    Err("already stopped".into())
                } else {
                    module.goal = Goal::Stopped;
                    Ok("stopping".into())
                }
            }
            Command::ForceStop => {
                if state == State::Stop && module.current.is_none() {
                    Err("already stopped".into())
                } else {
                    module.goal = Goal::Stopped;
                    let had_step = module.current.take().is_some();
                    module.plan.clear();
                    if had_step {
                        self.out.push(Effect::AbortScripts { module: id });
                    }
                    let mut facts = module.facts_about(peer.as_ref(), None);
                    // A forced stop counts the peer as in sync only when it is also ready.
                    facts.second_in_sync &= peer_second_ready;
                    module.plan_stop(true, Action::Stop, "forcestop", facts);
                    Ok("stopping at once".into())
                }
            }
            Command::Restart => {
                if module.current.is_some() || !module.ready {
                    Err(format!("cannot restart while {state} is transient"))
                } else if state.is_primary() || state == State::Second {
                    module.plan_restart();
                    Ok("restarting the application scripts".into())
                } else {
                    Err(format!("nothing to restart in state {state}"))
                }
            }
            Command::Swap => {
                let local_prim = state == State::Prim && module.ready && module.current.is_none();
                let local_second =
                    state == State::Second && module.ready && module.current.is_none();
                if local_prim && peer_second_ready {
                    module.local_swap = true;
                    Ok("swapping roles".into())
                } else if local_second && peer_prim_ready && peer.is_some_and(|p| p.ready) {
                    module.swap_counter += 1;
                    Ok("asked the primary to swap roles".into())
                } else {
                    Err(format!(
                        "swap needs PRIM and SECOND, both ready (local {state}{}, peer {})",
                        if module.ready { "" } else { " transient" },
                        self.peer_module(id)
                            .map(|p| format!(
                                "{}{}",
                                p.state,
                                if p.ready { "" } else { " transient" }
                            ))
                            .unwrap_or_else(|| "unreachable".into())
                    ))
                }
            }
        };
        let message = match &result {
            Ok(message) => format!("command {}: {message}", command.as_str()),
            Err(reason) => format!("command {} refused: {reason}", command.as_str()),
        };
        self.log(Some(id), Level::Info, message);
        self.out.push(Effect::Reply { request, result });
    }

    fn on_step_done(&mut self, id: ModuleId, step: StepId, outcome: Outcome) {
        let Some(module) = self.modules.get_mut(id.0) else {
            return;
        };
        let Some((current_id, current)) = module.current.take() else {
            return;
        };
        if current_id != step {
            module.current = Some((current_id, current));
            return;
        }
        let mut logs = Vec::new();
        module.complete(current, outcome, &mut logs);
        for (level, message) in logs {
            self.log(Some(id), level, message);
        }
    }

    fn on_link(&mut self, id: ModuleId, up: bool) {
        let Some(module) = self.modules.get_mut(id.0) else {
            return;
        };
        if module.link_up != up {
            module.link_up = up;
            let message = if up {
                "VIP interface link is up"
            } else {
                "VIP interface link is down"
            };
            self.log(
                Some(id),
                if up { Level::Info } else { Level::Warn },
                message.into(),
            );
        }
    }

    // ----- liveness ----------------------------------------------------------------------

    fn liveness_deadline(&self) -> Option<Time> {
        self.peer
            .last_heard
            .iter()
            .flatten()
            .max()
            .map(|last| last.plus(self.settings.timeout))
    }

    fn update_liveness(&mut self) {
        let alive = self
            .liveness_deadline()
            .is_some_and(|deadline| self.now < deadline);
        if alive != self.peer.alive {
            self.peer.alive = alive;
            let message = if alive {
                format!("peer {} found", self.settings.peer)
            } else {
                format!(
                    "peer {} lost: no heartbeat on any network for {:?}",
                    self.settings.peer, self.settings.timeout
                )
            };
            self.log(None, if alive { Level::Info } else { Level::Warn }, message);
        }
    }

    // ----- the per-module loop -----------------------------------------------------------

    /// Runs decisions and internal steps until every module waits on the world.
    fn settle(&mut self) {
        for index in 0..self.modules.len() {
            // Bounded: each round either emits an external step, completes an internal one, or
            // stops; plans are short and decisions only plan when something must change.
            for _round in 0..64 {
                let progressed = self.step_module(ModuleId(index));
                if !progressed {
                    break;
                }
            }
        }
    }

    /// The peer's module when the peer is alive and the module is stopped there.
    fn peer_stopped_module(&self, id: ModuleId) -> Option<&ModuleSnapshot> {
        if !self.peer.alive {
            return None;
        }
        let name = &self.modules.get(id.0)?.settings.name;
        self.peer.snapshot.as_ref().and_then(|snapshot| {
            snapshot
                .modules
                .iter()
                .find(|module| &module.name == name && module.state == State::Stop)
        })
    }

    fn peer_module(&self, id: ModuleId) -> Option<&ModuleSnapshot> {
        if !self.peer.alive {
            return None;
        }
        let name = &self.modules.get(id.0)?.settings.name;
        self.peer
            .snapshot
            .as_ref()
            .and_then(|snapshot| find_module(snapshot, name))
    }

    /// One round for one module; returns whether anything changed.
    fn step_module(&mut self, id: ModuleId) -> bool {
        let peer = self.peer_module(id).cloned();
        let peer_stopped = self.peer_stopped_module(id).cloned();
        let peer_last = self.modules.get(id.0).and_then(|module| {
            self.peer.snapshot.as_ref().and_then(|snapshot| {
                snapshot
                    .modules
                    .iter()
                    .find(|peer_module| peer_module.name == module.settings.name)
                    .cloned()
            })
        });
        let peer_incarnation = self
            .peer
            .snapshot
            .as_ref()
            .map(|snapshot| snapshot.incarnation);
        let now = self.now;
        let node_startup_over = now.since(self.started_at) >= self.settings.timeout;
        let timeout = self.settings.timeout;
        let local_name = self.settings.local.clone();
        let peer_name = self.settings.peer.clone();
        let peer_max_epoch = self.peer.max_epoch[id.0];
        let peer_max_generation = self.peer.max_generation[id.0];
        let my_incarnation = self.incarnation;
        let self_peer_alive = self.peer.alive;

        let mut logs: Vec<(Level, String)> = Vec::new();
        let mut effects: Vec<Effect> = Vec::new();
        let module = &mut self.modules[id.0];
        let before = module.fingerprint();
        // A module that just left STOP looks for the peer for one timeout too, like the node at
        // boot: two modules started at the same instant then see each other (and use grants)
        // before either decides alone on the other's stale STOP.
        let startup_over = node_startup_over
            && module
                .started_at
                .is_none_or(|started| now.since(started) >= timeout);
        let context = policy::Context {
            startup_over,
            peer_view_settled: node_startup_over,
            local_name: &local_name,
            peer_name: &peer_name,
            peer: peer.as_ref(),
            peer_stopped: peer_stopped.as_ref(),
            peer_last: peer_last.as_ref(),
            peer_incarnation,
            peer_alive: self_peer_alive,
            my_incarnation,
            peer_max_epoch,
            peer_max_generation,
        };
        let facts_now = module.peer_facts(&context);

        // Split brain: both hold the primary role while connected. The deterministic loser
        // fences at once, before anything else happens.
        if let Some(peer_module) = &peer
            && module.primary_role
            && peer_module.primary_role
            && policy::loses_split_brain(
                (module.record.epoch, &local_name),
                (peer_module.epoch, &peer_name),
            )
        {
            logs.push((
                Level::Error,
                format!(
                    "split brain: {peer_name} is primary too (epoch {} against {}); this node \
                     steps down and keeps its data apart: it waits for the operator \
                     (`tandem second` to resynchronise from {peer_name}, discarding this \
                     node's divergent writes)",
                    peer_module.epoch, module.record.epoch
                ),
            ));
            module.fence(&mut effects);
            module.hold = Some(format!(
                "split brain with {peer_name}: waiting for the operator"
            ));
            module.abandon_promotion("split brain: stepping down", facts_now);
        }

        // Link down on the primary: fence at once; the step-down follows.
        if module.primary_role && !module.link_up {
            logs.push((
                Level::Error,
                "VIP interface is down: leaving the primary role so that the peer takes over"
                    .into(),
            ));
            module.fence(&mut effects);
            module.abandon_promotion("interface down", facts_now);
        }

        module.update_grant(
            peer.as_ref(),
            peer_incarnation,
            &local_name,
            &peer_name,
            &mut logs,
        );

        if module.current.is_none() && module.plan.is_empty() {
            module.decide(&context, &mut logs, &mut effects);
        }

        let facts = module.peer_facts(&context);
        let progressed_step =
            module.advance(&mut self.next_step, now, facts, &mut effects, &mut logs);
        // What this node learned about the peer, and a split-brain hold, survive a restart.
        let peer_exclusive = peer_last
            .as_ref()
            .map(|peer| peer.claim == Claim::Exclusive)
            .unwrap_or(module.record.peer_exclusive);
        let knowledge = (
            peer_max_epoch,
            peer_max_generation,
            peer_exclusive,
            module.hold.is_some(),
        );
        let recorded = (
            module.record.peer_epoch,
            module.record.peer_generation,
            module.record.peer_exclusive,
            module.record.held,
        );
        if knowledge != recorded {
            module.record.peer_epoch = peer_max_epoch;
            module.record.peer_generation = peer_max_generation;
            module.record.peer_exclusive = peer_exclusive;
            module.record.held = module.hold.is_some();
            effects.push(Effect::Persist {
                module: id,
                record: module.record.clone(),
            });
        }
        let changed = module.fingerprint() != before;
        self.out.extend(effects);
        for (level, message) in logs {
            self.log(Some(id), level, message);
        }
        progressed_step || changed
    }

    fn maybe_broadcast(&mut self) {
        let mut snapshot = self.snapshot();
        let changed = match &self.last_broadcast {
            None => true,
            Some(last) => last.modules != snapshot.modules,
        };
        if changed || self.now >= self.next_pulse {
            if changed {
                self.snapshot_seq += 1;
            }
            snapshot.seq = self.snapshot_seq;
            self.next_pulse = self.now.plus(self.settings.pulse);
            self.last_broadcast = Some(snapshot.clone());
            self.out.push(Effect::Broadcast(snapshot));
        }
    }

    fn log(&mut self, module: Option<ModuleId>, level: Level, message: String) {
        self.out.push(Effect::Log {
            module,
            level,
            message,
        });
    }
}

fn find_module<'a>(snapshot: &'a NodeSnapshot, name: &str) -> Option<&'a ModuleSnapshot> {
    snapshot
        .modules
        .iter()
        .find(|module| module.name == name && module.state != State::Stop)
}

impl Module {
    /// Records a finished transition.
    pub(crate) fn record_transition(
        &mut self,
        from: State,
        to: State,
        reason: &str,
        now: Time,
    ) -> TransitionRecord {
        let record = TransitionRecord {
            from,
            to,
            reason: reason.to_owned(),
            at: now,
        };
        self.last_transition = Some(record.clone());
        record
    }

    /// The effect of a plan step that needs the world, or `None` for internal steps.
    pub(crate) fn external_effect(&self, step_id: StepId, step: &Step) -> Option<Effect> {
        let module = self.id;
        match step {
            Step::Script {
                script,
                current,
                next,
                action,
                force,
            } => {
                let timeout = if *force {
                    self.settings.force_stop_timeout
                } else if script.is_stop() {
                    self.settings.stop_timeout
                } else {
                    self.settings.start_timeout
                };
                Some(Effect::RunScript {
                    module,
                    step: step_id,
                    call: ScriptCall {
                        script: *script,
                        current: *current,
                        next: *next,
                        action: *action,
                        force: *force,
                        timeout,
                    },
                })
            }
            Step::AcquireVips => Some(Effect::AcquireVips {
                module,
                step: step_id,
            }),
            Step::ReleaseVips => Some(Effect::ReleaseVips {
                module,
                step: step_id,
            }),
            Step::SyncData => Some(Effect::SyncData {
                module,
                step: step_id,
            }),
            _ => None,
        }
    }
}

/// Whether a script call is the start of an application role.
pub(crate) fn starts_app(script: Script) -> bool {
    matches!(script, Script::StartPrim | Script::StartSecond)
}

/// Helper for plans: the claim to keep when leaving the primary role.
pub(crate) fn claim_after_leaving_primary(current: Claim, peer_in_sync: bool) -> Claim {
    if peer_in_sync { Claim::Shared } else { current }
}

/// Helper for the decision of a WAIT module with a running peer.
pub(crate) fn preference_reason(preference: &Preference, peer_name: &str) -> String {
    match preference {
        Preference::Local => "asking the peer to agree that this node becomes primary".into(),
        Preference::Peer => format!("waiting for {peer_name} to become primary"),
        Preference::Neither(reason) => reason.clone(),
    }
}
