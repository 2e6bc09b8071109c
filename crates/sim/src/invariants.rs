//! The safety invariants, checked after every input a core handles and after every change of the
//! simulated world.
//!
//! Per node (checked by [`Checker::after_handle`] on each `Node::handle` call):
//!
//! - **(a) up-to-date or forced.** When a node *takes the primary role* (its snapshot's
//!   `primary_role` goes from false to true within one `handle` call), then either an operator
//!   `prim` on that node was accepted and is still pending — not used by an earlier promotion,
//!   and the module has not since entered SECOND or ended a `handle` call in STOP (a `prim`
//!   accepted while the module stops makes it start again at once) — or its claim just before
//!   (the last claim persisted before the record of the new epoch, or the claim at the start of
//!   the call if none was persisted in it) was `Shared` or `Exclusive`. One deliberate policy
//!   exception is allowed: at the very first start, when both nodes have no history (claim
//!   `Fresh`) and the configuration names this node `default_primary` (the configuration is the
//!   operator's decision; no acknowledged write exists anywhere).
//!   In the same call it must persist the new role first: a record with a higher epoch, claim
//!   `Exclusive` and `last_primary`; `SetWritable(true)` is only ever emitted inside a role
//!   tenure that began with that record; persisted epochs never decrease; a writable node holds
//!   the primary role at the end of every call.
//! - **(c) scripts are matched.** Per incarnation: `start_prim`/`start_second` is never called
//!   while the previous start has not been followed by a call of its `stop_x` (graceful or
//!   `force`); a graceful stop that failed or timed out is followed by the same stop with `force`
//!   as the next script call; a module that enters STOP has no unmatched start.
//! - **(d) well-formed effects.** Every step the core asks for has a fresh identifier (greater than
//!   every earlier one of the incarnation) and a known module; a module never has two steps
//!   running at once (a step is running from its effect until its `StepDone` or an
//!   `AbortScripts`); every operator command gets exactly one reply; the last `StateChanged`
//!   of a call matches the module's state; `poll_timeout()` is `Some` and `>= now`; and, so
//!   that a driver that sleeps until `poll_timeout()` cannot spin, a `Tick` at `poll_timeout()`
//!   moves `poll_timeout()` forward. The core never panics (the host catches panics and reports
//!   them as violations).
//!
//! Between the nodes (checked by [`Checker::check_pair`] after every event):
//!
//! - **(b) one writer while connected**, and **one VIP holder while connected**.
//!   The two nodes are *connected* at an instant when, over a window `[w, now]`:
//!   1. no node crashed, restarted, was frozen or resumed from a freeze during the window, and
//!   2. in each direction there is a heartbeat network on which every heartbeat sent during the
//!      window arrived (first copy) within `healthy_delay` of its sending — chosen so that
//!      `pulse + healthy_delay < timeout`, hence the peer is never declared lost inside the window —
//!      and was processed at arrival, and
//!   3. a full round trip happened inside the window: each node processed a heartbeat of the
//!      other that was sent *after* that other node had itself processed a heartbeat sent in the
//!      window. (After one round each node knows the other is alive, so it no longer takes
//!      decisions that assume the peer absent; after the second round each has seen every such
//!      decision the other took before. A node that took over while it could not hear the peer
//!      is legitimately primary until that moment: without a witness nothing can prevent it.)
//!
//!   While connected, the two nodes are never both writable (`SetWritable(true)` not followed by
//!   `SetWritable(false)`, and the node has not crashed since).
//!
//!   A node holds the VIP from the moment `AcquireVips` is asked until a `ReleaseVips` completed
//!   (or a crash). While connected, a node never asks for the VIP while the other holds it,
//!   with one exception, the aftermath of a split brain: a node that took the primary role
//!   *before* the connection began (each side took over alone) may ask while the other, already
//!   fenced, still holds it (snapshots do not say who holds the address). Whenever both hold
//!   it while connected, one of them must have left the primary role, and the overlap may not
//!   last longer than `vip_grace` after the connection began — the time for the fenced node to
//!   finish the one step it was running and remove the address (it cannot interrupt a script):
//!   `max(start_timeout, stop_timeout + force_stop_timeout)` plus two VIP requests
//!   (`WorldConfig::vip_grace`).
//!   A handover (swap, stop, failover while connected) never overlaps.
//!
//! On the data (the ghost model of [`crate::data`], independent of the cores' claims):
//!
//! - **(e) no acknowledged write is lost.** When a node takes the primary role (as in (a)) and no
//!   operator `prim` is pending on it (the bookkeeping of (a)), its data holds every acknowledged
//!   write that its core can know of (acknowledged by itself, or by the peer before the peer sent
//!   a snapshot this core then handled, possibly through earlier snapshots: the causal order),
//!   except writes abandoned by an operator's forced promotion or by the resynchronisation of a
//!   node that served during a split brain, and split-brain writes. Writes acknowledged
//!   concurrently on the other side of a partition are exempt (no node can know of them without
//!   a witness), and become split-brain writes when the promotion goes through (the two sides
//!   now hold writes the other lacks); a forced promotion abandons the acknowledged writes the
//!   forced node lacks. When the liveness phase reaches
//!   PRIM/SECOND ready ([`World::check_converged_data`](crate::World::check_converged_data)),
//!   the PRIM node holds every acknowledged write not abandoned, and the SECOND holds exactly
//!   the same writes.

use std::time::Duration;

use tandem_core::{
    Claim, Command, DefaultPrimary, Effect, ModuleSnapshot, Outcome, Script, State, StepId, Time,
};

use crate::data::Data;

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// When.
    pub at: Time,
    /// What, in words.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "at {}: {}",
            crate::trace::seconds(self.at),
            self.message
        )
    }
}

/// The parts of an input the checker looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputSummary {
    /// `Input::Tick`.
    Tick,
    /// `Input::Heartbeat` or `Input::ChannelSnapshot`.
    Snapshot,
    /// `Input::Command`.
    Command(Command),
    /// `Input::StepDone`.
    StepDone {
        /// The step.
        step: StepId,
        /// It did not end with `Outcome::Ok`.
        failed: bool,
    },
    /// `Input::LinkChanged`.
    Link,
    /// `Input::ReplicationChanged`.
    Replication,
}

impl InputSummary {
    /// Summarises an input.
    pub fn of(input: &tandem_core::Input) -> InputSummary {
        use tandem_core::Input;
        match input {
            Input::Tick => InputSummary::Tick,
            Input::Heartbeat { .. } | Input::ChannelSnapshot(_) => InputSummary::Snapshot,
            Input::Command { command, .. } => InputSummary::Command(*command),
            Input::StepDone { step, outcome, .. } => InputSummary::StepDone {
                step: *step,
                failed: *outcome != Outcome::Ok,
            },
            Input::LinkChanged { .. } => InputSummary::Link,
            Input::ReplicationChanged { .. } => InputSummary::Replication,
        }
    }
}

/// One `Node::handle` call, as the checker sees it.
#[derive(Clone, Copy, Debug)]
pub struct Handled<'a> {
    /// Node index (0 or 1).
    pub node: usize,
    /// Time of the call.
    pub now: Time,
    /// The input.
    pub input: &'a InputSummary,
    /// The module's snapshot before the call.
    pub before: &'a ModuleSnapshot,
    /// The module's snapshot after the call.
    pub after: &'a ModuleSnapshot,
    /// The effects returned.
    pub effects: &'a [Effect],
    /// `poll_timeout()` after the call.
    pub poll_timeout: Option<Time>,
    /// `poll_timeout()` before the call.
    pub poll_before: Option<Time>,
    /// The peer's current claim (from its running core, or its records while it is down).
    pub peer_claim: Claim,
}

/// A node took the primary role in one `handle` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promotion {
    /// An accepted operator `prim` was pending (see (a)).
    pub forced: bool,
}

/// The step a node is running, as far as the checker knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Running {
    step: StepId,
    /// The script, with its `force` flag, when the step is a script.
    script: Option<(Script, bool)>,
}

/// What the checker remembers about one node (one incarnation).
#[derive(Clone, Debug, Default)]
struct NodeTrack {
    /// An accepted `prim` not yet used by a promotion.
    forced: bool,
    /// `start_prim` or `start_second` called and not yet followed by its stop.
    app: Option<Script>,
    /// The next script call must be this stop script with `force`.
    expect_force: Option<Script>,
    /// Highest step identifier seen.
    last_step: u64,
    /// The step the core waits for.
    running: Option<Running>,
    /// The current role tenure began with its persisted record.
    tenure_persisted: bool,
    /// Highest epoch persisted.
    last_epoch: u64,
    /// Writes allowed (effects seen so far).
    writable: bool,
    /// When the node took the primary role it holds now.
    role_since: Option<Time>,
}

/// What one node looks like from outside, for the pair invariants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outside {
    /// The node runs (not crashed).
    pub up: bool,
    /// Its data accepts writes.
    pub writable: bool,
    /// It holds the VIP.
    pub vip: bool,
    /// Its core holds the primary role.
    pub primary_role: bool,
}

/// Tracks when the two nodes are connected (see the module documentation).
#[derive(Clone, Debug)]
struct Connectivity {
    healthy_delay: Duration,
    /// `fault_mark[from][network]`: the sending time of the latest heartbeat that was lost or late.
    fault_mark: [Vec<Option<Time>>; 2],
    /// The latest crash, restart, freeze or resumption.
    node_mark: Option<Time>,
    /// Start of the current window.
    window: Time,
    /// `first[node]`: when `node` first processed a heartbeat sent inside the window.
    first: [Option<Time>; 2],
    /// `second[node]`: `node` processed a heartbeat sent after the peer's `first`.
    second: [bool; 2],
    /// When the nodes became connected.
    since: Option<Time>,
}

impl Connectivity {
    fn new(networks: usize, healthy_delay: Duration) -> Connectivity {
        let networks = networks.max(1);
        Connectivity {
            healthy_delay,
            fault_mark: [vec![None; networks], vec![None; networks]],
            node_mark: None,
            window: Time::ZERO,
            first: [None; 2],
            second: [false; 2],
            since: None,
        }
    }

    fn after(mark: Option<Time>) -> Time {
        mark.map_or(Time::ZERO, |time| Time(time.0.saturating_add(1)))
    }

    fn update_window(&mut self) {
        let mut window = Self::after(self.node_mark);
        for marks in &self.fault_mark {
            // A direction is healthy since its best network's last fault.
            let since = marks
                .iter()
                .map(|mark| Self::after(*mark))
                .min()
                .unwrap_or(Time::ZERO);
            window = window.max(since);
        }
        if window > self.window {
            self.window = window;
            self.first = [None; 2];
            self.second = [false; 2];
            self.since = None;
        }
    }

    fn connected(&self) -> bool {
        self.second[0] && self.second[1]
    }
}

/// What the checker needs to know about the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckerConfig {
    /// Node names.
    pub names: [String; 2],
    /// Number of heartbeat networks.
    pub networks: usize,
    /// Heartbeats slower than this are faults (`pulse + healthy_delay < timeout`).
    pub healthy_delay: Duration,
    /// The module's `default_primary` policy.
    pub default_primary: DefaultPrimary,
    /// How long a fenced node may keep the VIP after the connection began (see the module
    /// documentation).
    pub vip_grace: Duration,
}

/// Checks every invariant of the module documentation for a two-node cluster running module 0.
#[derive(Clone, Debug)]
pub struct Checker {
    nodes: [NodeTrack; 2],
    connectivity: Connectivity,
    config: CheckerConfig,
}

impl Checker {
    /// A checker for a cluster.
    pub fn new(config: CheckerConfig) -> Checker {
        Checker {
            nodes: [NodeTrack::default(), NodeTrack::default()],
            connectivity: Connectivity::new(config.networks, config.healthy_delay),
            config,
        }
    }

    /// The delay beyond which a heartbeat counts as a fault.
    pub fn healthy_delay(&self) -> Duration {
        self.connectivity.healthy_delay
    }

    /// Whether the nodes are connected now (see the module documentation).
    pub fn connected(&self) -> bool {
        self.connectivity.connected()
    }

    /// A node (re)started with a new incarnation whose last persisted epoch is `epoch`.
    pub fn node_started(&mut self, node: usize, now: Time, epoch: u64) {
        self.nodes[node & 1] = NodeTrack {
            last_epoch: epoch,
            ..NodeTrack::default()
        };
        self.node_event(now);
    }

    /// A node crashed: it lost its writes, its VIP and its scripts.
    pub fn node_crashed(&mut self, node: usize, now: Time) {
        self.nodes[node & 1].writable = false;
        self.node_event(now);
    }

    /// A node froze or resumed: the connection window restarts.
    pub fn node_event(&mut self, now: Time) {
        self.connectivity.node_mark = Some(now);
        self.connectivity.update_window();
    }

    /// What became of a heartbeat sent at `sent_at` by `from` on `network`.
    pub fn heartbeat_sent(
        &mut self,
        from: usize,
        network: usize,
        sent_at: Time,
        first_delay: Option<Duration>,
    ) {
        let healthy = first_delay.is_some_and(|delay| delay <= self.connectivity.healthy_delay);
        if !healthy && let Some(mark) = self.connectivity.fault_mark[from & 1].get_mut(network) {
            *mark = Some(sent_at);
            self.connectivity.update_window();
        }
    }

    /// `to` processed a heartbeat sent at `sent_at`.
    pub fn heartbeat_processed(&mut self, to: usize, sent_at: Time, now: Time) {
        let connectivity = &mut self.connectivity;
        let (to, from) = (to & 1, 1 - (to & 1));
        if sent_at >= connectivity.window && connectivity.first[to].is_none() {
            connectivity.first[to] = Some(now);
        }
        if connectivity.first[from].is_some_and(|first| sent_at >= first) {
            connectivity.second[to] = true;
        }
        if connectivity.connected() && connectivity.since.is_none() {
            connectivity.since = Some(now);
        }
    }

    fn fail(&self, node: usize, now: Time, message: String) -> Result<(), Violation> {
        Err(Violation {
            at: now,
            message: format!("{}: {message}", self.config.names[node & 1]),
        })
    }

    /// Checks one `Node::handle` call; says whether the node took the primary role in it.
    pub fn after_handle(&mut self, call: Handled<'_>) -> Result<Option<Promotion>, Violation> {
        let node = call.node & 1;
        let now = call.now;
        match call.poll_timeout {
            None => {
                return self
                    .fail(node, now, "poll_timeout() is None".into())
                    .map(|()| None);
            }
            Some(due) if due < now => {
                return self
                    .fail(node, now, format!("poll_timeout() {due:?} is before now"))
                    .map(|()| None);
            }
            Some(due)
                if *call.input == InputSummary::Tick
                    && call.poll_before.is_some_and(|before| before <= now)
                    && due <= now =>
            {
                return self
                    .fail(
                        node,
                        now,
                        "poll_timeout() does not move forward after a Tick at the due time: a \
                         driver sleeping until poll_timeout() would spin"
                            .into(),
                    )
                    .map(|()| None);
            }
            Some(_) => {}
        }

        let default_primary_here =
            self.config.default_primary == DefaultPrimary::Node(self.config.names[node].clone());
        let track = &mut self.nodes[node];
        let mut problems: Vec<String> = Vec::new();

        if let InputSummary::StepDone { step, failed } = *call.input
            && let Some(running) = track.running
            && running.step == step
        {
            track.running = None;
            if let Some((script, false)) = running.script
                && script.is_stop()
                && failed
            {
                track.expect_force = Some(script);
            }
        }

        let replies = call
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::Reply { .. }))
            .count();
        let expected_replies = usize::from(matches!(call.input, InputSummary::Command(_)));
        if replies != expected_replies {
            problems.push(format!("{replies} replies to one input ({:?})", call.input));
        }

        let mut role_persisted_now = false;
        // The claim persisted last, as the effects go: the claim "just before" a promotion.
        let mut claim = call.before.claim;
        let mut claim_at_promotion = None;
        let mut last_state = None;
        for effect in call.effects {
            let step_of = |effect: &Effect| match effect {
                Effect::RunScript { module, step, call } => {
                    Some((*module, *step, Some((call.script, call.force))))
                }
                Effect::AcquireVips { module, step }
                | Effect::ReleaseVips { module, step }
                | Effect::SyncData { module, step } => Some((*module, *step, None)),
                _ => None,
            };
            if let Some((module, step, script)) = step_of(effect) {
                if module.0 != 0 {
                    problems.push(format!("step for unknown module {module:?}"));
                }
                if step.0 <= track.last_step {
                    problems.push(format!(
                        "step {} is not fresh (last was {})",
                        step.0, track.last_step
                    ));
                }
                track.last_step = track.last_step.max(step.0);
                if let Some(running) = track.running {
                    problems.push(format!(
                        "step {} asked while step {} still runs",
                        step.0, running.step.0
                    ));
                }
                track.running = Some(Running { step, script });
                if let Some((script, force)) = script {
                    if let Some(expected) = track.expect_force.take()
                        && (expected != script || !force)
                    {
                        problems.push(format!(
                            "{} failed gracefully but the next script is {}{}",
                            expected.file_name(),
                            script.file_name(),
                            if force { " force" } else { "" }
                        ));
                    }
                    match script {
                        Script::StartPrim | Script::StartSecond => {
                            if let Some(app) = track.app {
                                problems.push(format!(
                                    "{} called while {} was never stopped",
                                    script.file_name(),
                                    app.file_name()
                                ));
                            }
                            track.app = Some(script);
                        }
                        Script::StopPrim if track.app == Some(Script::StartPrim) => {
                            track.app = None;
                        }
                        Script::StopSecond if track.app == Some(Script::StartSecond) => {
                            track.app = None;
                        }
                        _ => {}
                    }
                }
            }
            match effect {
                Effect::AbortScripts { module } => {
                    if module.0 != 0 {
                        problems.push(format!("abort for unknown module {module:?}"));
                    }
                    // The running step is abandoned: its completion will be ignored.
                    track.running = None;
                }
                Effect::SetWritable { module, writable } => {
                    if module.0 != 0 {
                        problems.push(format!("writable for unknown module {module:?}"));
                    }
                    if *writable && !track.tenure_persisted {
                        problems.push(
                            "SetWritable(true) without a persisted promotion (new epoch, \
                             exclusive claim) for this role"
                                .into(),
                        );
                    }
                    track.writable = *writable;
                }
                Effect::Persist { module, record } => {
                    if module.0 != 0 {
                        problems.push(format!("persist for unknown module {module:?}"));
                    }
                    if record.epoch < track.last_epoch {
                        problems.push(format!(
                            "persisted epoch went back from {} to {}",
                            track.last_epoch, record.epoch
                        ));
                    }
                    if record.epoch > track.last_epoch {
                        if record.claim != Claim::Exclusive || !record.last_primary {
                            problems.push(format!(
                                "new epoch {} persisted with claim {} last_primary {}",
                                record.epoch,
                                record.claim.as_str(),
                                record.last_primary
                            ));
                        }
                        role_persisted_now = true;
                        track.tenure_persisted = true;
                        claim_at_promotion.get_or_insert(claim);
                    }
                    claim = record.claim;
                    track.last_epoch = track.last_epoch.max(record.epoch);
                }
                Effect::StateChanged {
                    module,
                    state,
                    ready,
                } => {
                    if module.0 != 0 {
                        problems.push(format!("state of unknown module {module:?}"));
                    }
                    last_state = Some((*state, *ready));
                    if *state == State::Stop
                        && let Some(app) = track.app
                    {
                        problems.push(format!(
                            "module entered STOP with {} never stopped",
                            app.file_name()
                        ));
                    }
                    if *state == State::Second {
                        track.forced = false;
                    }
                }
                Effect::Reply { result: Ok(_), .. }
                    if *call.input == InputSummary::Command(Command::Prim) =>
                {
                    track.forced = true;
                }
                _ => {}
            }
        }

        if let Some(state) = last_state
            && state != (call.after.state, call.after.ready)
        {
            problems.push(format!(
                "last StateChanged {state:?} differs from the module ({} {})",
                call.after.state, call.after.ready
            ));
        }

        // (a) Taking the primary role.
        let mut promotion = None;
        if !call.before.primary_role && call.after.primary_role {
            promotion = Some(Promotion {
                forced: track.forced,
            });
            if !role_persisted_now {
                problems.push("took the primary role without persisting a new epoch".into());
            }
            let claim = claim_at_promotion.unwrap_or(call.before.claim);
            let first_start_by_policy =
                claim == Claim::Fresh && call.peer_claim == Claim::Fresh && default_primary_here;
            if !track.forced && !claim.is_up_to_date() && !first_start_by_policy {
                problems.push(format!(
                    "took the primary role with claim {} and no pending `prim`",
                    claim.as_str()
                ));
            }
            track.forced = false;
            track.role_since = Some(now);
        }
        if !call.after.primary_role {
            track.tenure_persisted = false;
            track.role_since = None;
        }
        if call.after.state == State::Stop {
            // A `prim` accepted while the module was stopping survives the stop (the module
            // starts again at once, in the same call); otherwise a stopped module forgets it.
            track.forced = false;
        }
        if track.writable && !call.after.primary_role {
            problems.push("writable without the primary role".into());
        }
        if call.after.primary_role && call.after.state == State::Stop {
            problems.push("primary role in STOP".into());
        }

        if problems.is_empty() {
            Ok(promotion)
        } else {
            self.fail(node, now, problems.join("; ")).map(|()| None)
        }
    }

    /// Checks the invariants between the two nodes.
    pub fn check_pair(&self, now: Time, nodes: [Outside; 2]) -> Result<(), Violation> {
        if !self.connected() || !nodes[0].up || !nodes[1].up {
            return Ok(());
        }
        if nodes[0].writable && nodes[1].writable {
            return Err(Violation {
                at: now,
                message: "two writers: both nodes are writable while connected".into(),
            });
        }
        if nodes[0].vip && nodes[1].vip {
            let one_fenced = !nodes[0].primary_role || !nodes[1].primary_role;
            let since = self.connectivity.since.unwrap_or(now);
            if !one_fenced {
                return Err(Violation {
                    at: now,
                    message: "both nodes hold the VIP and the primary role while connected".into(),
                });
            }
            if now.since(since) > self.config.vip_grace {
                return Err(Violation {
                    at: now,
                    message: format!(
                        "both nodes hold the VIP while connected since {} (more than {:?})",
                        crate::trace::seconds(since),
                        self.config.vip_grace
                    ),
                });
            }
        }
        Ok(())
    }

    /// `node` asks for the VIP; `other` is the other node as seen from outside.
    pub fn vip_requested(&self, node: usize, now: Time, other: Outside) -> Result<(), Violation> {
        if !other.vip || !self.connected() {
            return Ok(());
        }
        // Tolerated only as the aftermath of a split brain: this node took its role before
        // the connection began, and the other one has been fenced (the overlap is then bounded
        // by `check_pair`).
        let since = self.connectivity.since.unwrap_or(now);
        let role_before_connection = self.nodes[node & 1]
            .role_since
            .is_some_and(|taken| taken < since);
        if role_before_connection && !other.primary_role {
            return Ok(());
        }
        self.fail(
            node,
            now,
            "asks for the VIP while connected to a peer that holds it".into(),
        )
    }
}

/// Lists writes for a message: `7 (node1 at 1.250s), ...`, the first few only.
fn list_writes(missing: &[(u64, usize, Time)], names: &[String; 2]) -> String {
    let mut text: Vec<String> = missing
        .iter()
        .take(5)
        .map(|(id, writer, at)| {
            format!(
                "{id} (acknowledged by {} at {})",
                names[writer & 1],
                crate::trace::seconds(*at)
            )
        })
        .collect();
    if missing.len() > 5 {
        text.push(format!("and {} more", missing.len() - 5));
    }
    text.join(", ")
}

/// (e) `node` took the primary role: unless forced, its data holds every acknowledged write its
/// core can know of (see the module documentation); a forced promotion abandons the others.
pub fn data_at_promotion(
    data: &mut Data,
    node: usize,
    promotion: Promotion,
    now: Time,
    names: &[String; 2],
) -> Result<(), Violation> {
    let node = node & 1;
    if promotion.forced {
        data.forced(node);
        return Ok(());
    }
    let missing = data.missing(node, Some(data.known[node]));
    if missing.is_empty() {
        // Writes this node lacks and could not know of were acknowledged concurrently with this
        // promotion (partition): from now on the two branches conflict.
        let concurrent: Vec<u64> = data
            .missing(node, None)
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        data.split.extend(concurrent);
        return Ok(());
    }
    Err(Violation {
        at: now,
        message: format!(
            "{}: took the primary role without a pending `prim` while its data lacks \
             acknowledged writes it could know of: {}",
            names[node],
            list_writes(&missing, names)
        ),
    })
}

/// (e) At convergence: the PRIM node `primary` holds every acknowledged write not abandoned, and
/// the SECOND holds the same writes.
pub fn data_converged(
    data: &Data,
    primary: usize,
    now: Time,
    names: &[String; 2],
) -> Result<(), Violation> {
    let (primary, second) = (primary & 1, 1 - (primary & 1));
    let missing = data.missing(primary, None);
    if !missing.is_empty() {
        return Err(Violation {
            at: now,
            message: format!(
                "{} is PRIM ready but lacks acknowledged writes: {}",
                names[primary],
                list_writes(&missing, names)
            ),
        });
    }
    if data.held[primary] != data.held[second] {
        let only_primary = data.held[primary].difference(&data.held[second]).count();
        let only_second = data.held[second].difference(&data.held[primary]).count();
        return Err(Violation {
            at: now,
            message: format!(
                "{} is SECOND ready of {} but their data differ ({only_primary} writes only on \
                 the primary, first {:?}; {only_second} only on the secondary, first {:?})",
                names[second],
                names[primary],
                data.held[primary].difference(&data.held[second]).next(),
                data.held[second].difference(&data.held[primary]).next(),
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_needs_a_full_round_trip_inside_a_healthy_window() {
        let mut checker = Checker::new(CheckerConfig {
            names: ["a".into(), "b".into()],
            networks: 1,
            healthy_delay: Duration::from_millis(500),
            default_primary: DefaultPrimary::None,
            vip_grace: Duration::from_secs(1),
        });
        let ms = |n: u64| Time(n * 1_000_000);
        checker.heartbeat_processed(1, ms(0), ms(1));
        assert!(!checker.connected());
        checker.heartbeat_processed(0, ms(0), ms(1));
        assert!(!checker.connected(), "one round only");
        checker.heartbeat_processed(1, ms(2), ms(3));
        checker.heartbeat_processed(0, ms(2), ms(3));
        assert!(checker.connected());
        // A late heartbeat on the only network breaks the window.
        checker.heartbeat_sent(0, 0, ms(10), Some(Duration::from_secs(1)));
        assert!(!checker.connected());
        checker.heartbeat_processed(1, ms(5), ms(11));
        assert!(!checker.connected(), "sent before the fault");
        checker.heartbeat_processed(1, ms(12), ms(13));
        checker.heartbeat_processed(0, ms(12), ms(13));
        checker.heartbeat_processed(1, ms(14), ms(15));
        assert!(!checker.connected());
        checker.heartbeat_processed(0, ms(14), ms(15));
        assert!(checker.connected());
        let both = Outside {
            up: true,
            writable: true,
            vip: false,
            primary_role: true,
        };
        assert!(checker.check_pair(ms(16), [both, both]).is_err());
        checker.node_event(ms(20));
        assert!(!checker.connected());
        assert!(checker.check_pair(ms(21), [both, both]).is_ok());
    }
}
