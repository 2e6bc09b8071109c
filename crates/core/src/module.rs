//! The module automaton (spec §3; SafeKit's automaton and script order, `safekit.md` §1.2–1.5 and
//! §3.3).
//!
//! A module changes state by running a *plan*: a short list of steps (scripts, VIP moves, data
//! synchronisation, internal bookkeeping) carried out one at a time. External steps become
//! effects and the plan resumes when the adapter reports [`crate::Input::StepDone`]. When no plan
//! runs, [`Module::decide`] looks at the module, the peer and the policies and plans the next
//! transition, if any.
//!
//! Safety rests on three rules:
//! - the primary role (writes allowed) is taken only with the peer's grant while the peer is
//!   reachable, or alone when it is not and the local data is up to date (or the operator forced
//!   it);
//! - a node grants only while it holds neither the primary role nor the VIPs, and does not take
//!   the role while its grant stands;
//! - the claim about the local data is persisted before the role that justifies it is used.
//!
//! Whether the secondary is up to date comes from two sources: its snapshots (SECOND,
//! synchronised with the primary's current data generation) and the health of the replication
//! stream ([`crate::Input::ReplicationChanged`], not connected until reported). A primary counts
//! its peer as an up-to-date secondary only when both say so: with the replication lost, PRIM
//! goes ALONE (exclusive claim and a new data generation, so the secondary resynchronises), and
//! ALONE -> PRIM and a swap wait until the replication is connected again.

use std::collections::VecDeque;

use tandem_proto::{Claim, ModuleSnapshot, State};

use crate::io::{Action, Effect, Level, ModuleId, Outcome, Persisted, Script, StepId};
use crate::node::{claim_after_leaving_primary, preference_reason, starts_app};
use crate::policy::{self, Candidate, Context, Preference};
use crate::settings::ModuleSettings;
use crate::status::TransitionRecord;
use crate::time::Time;

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Goal {
    /// Stopped (or stopping).
    Stopped,
    /// Running; the rules choose the role.
    Run,
    /// Running, forced primary (`tandem prim`).
    ForcePrim,
    /// Running, forced secondary (`tandem second`).
    ForceSecond,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Run a user script.
    Script {
        script: Script,
        current: State,
        next: State,
        action: Action,
        force: bool,
    },
    /// Add and announce the VIPs.
    AcquireVips,
    /// Remove the VIPs.
    ReleaseVips,
    /// Bring the data up to date from the primary.
    SyncData,
    /// Set the visible state.
    Enter { state: State, ready: bool },
    /// Change the claim and persist it.
    SetClaim(Claim),
    /// Start a new data generation (persisted by the following `SetClaim`).
    NewGeneration,
    /// Stop accepting writes and leave the primary role; the claim becomes `Shared` if the peer
    /// is an up-to-date secondary at that moment.
    Fence,
    /// Accept writes (the primary role is already held).
    Unfence,
    /// Hand the primary role to the peer (swap).
    GrantPeer,
    /// Wait until the peer holds the primary role (swap), or is gone.
    AwaitPeerPrimary,
    /// The module is synchronised with the current primary.
    MarkSynced,
    /// Record a finished transition.
    Finish {
        from: State,
        to: State,
        reason: String,
    },
}

impl Step {
    /// A short description for the status.
    pub(crate) fn describe(&self) -> String {
        match self {
            Step::Script { script, force, .. } => {
                format!(
                    "script {}{}",
                    script.file_name(),
                    if *force { " (force)" } else { "" }
                )
            }
            Step::AcquireVips => "adding virtual IPs".into(),
            Step::ReleaseVips => "removing virtual IPs".into(),
            Step::SyncData => "synchronising data".into(),
            Step::AwaitPeerPrimary => "waiting for the peer to take the primary role".into(),
            other => format!("{other:?}"),
        }
    }
}

/// Facts about the peer that plan steps need when they run.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PeerFacts {
    /// The peer is alive and runs the module.
    pub running: bool,
    /// The peer holds the primary role.
    pub primary: bool,
    /// The peer's module is in SECOND (ready or not).
    pub second: bool,
    /// The peer is a secondary synchronised with our current data generation, and the
    /// replication stream to it is connected and caught up.
    pub second_in_sync: bool,
    /// The peer's incarnation.
    pub incarnation: Option<u64>,
    /// The peer's data generation.
    pub generation: u64,
}

/// One module on the local node.
#[derive(Clone, Debug)]
pub(crate) struct Module {
    pub id: ModuleId,
    pub settings: ModuleSettings,
    pub state: State,
    pub ready: bool,
    /// Holds or is entering the primary role: writes may be allowed.
    pub primary_role: bool,
    pub record: Persisted,
    pub goal: Goal,
    pub plan: VecDeque<Step>,
    pub current: Option<(StepId, Step)>,
    pub want_primary: bool,
    pub grant_to: Option<u64>,
    pub handing_over: bool,
    pub swap_counter: u64,
    pub peer_swap_seen: Option<u64>,
    pub local_swap: bool,
    pub hold: Option<String>,
    pub wait_reason: Option<String>,
    pub started_at: Option<Time>,
    pub link_up: bool,
    /// The application script that ran last without its stop (start_prim or start_second).
    pub app: Option<Script>,
    pub vip_held: bool,
    /// Epoch of the primary this node's data was last synchronised with (as a secondary).
    pub synced_generation: u64,
    /// Epoch of the primary the running synchronisation copies from.
    pub sync_from: Option<u64>,
    /// Since its last synchronisation, this secondary saw its primary acknowledge writes only
    /// with it (claim `shared`, PRIM) in the synchronised generation. Until then the primary is
    /// ALONE: it acknowledges writes alone, and those that replication could not carry here are
    /// missing from this node's data.
    pub primary_shared_seen: bool,
    /// The replication stream to the peer is connected and caught up (last
    /// [`crate::Input::ReplicationChanged`]; false until the first report).
    pub replication_connected: bool,
    /// The replication was lost while ALONE with a secondary synchronised with the current
    /// generation: a new generation must be persisted before writes are recorded locally.
    pub new_generation_due: bool,
    /// The data generation when the replication was last reported connected.
    pub connected_generation: Option<u64>,
    pub last_transition: Option<TransitionRecord>,
}

impl Module {
    pub(crate) fn new(id: ModuleId, settings: ModuleSettings, record: Persisted) -> Module {
        let held = record.held;
        Module {
            id,
            settings,
            state: State::Stop,
            ready: true,
            primary_role: false,
            record,
            goal: Goal::Stopped,
            plan: VecDeque::new(),
            current: None,
            want_primary: false,
            grant_to: None,
            handing_over: false,
            swap_counter: 0,
            peer_swap_seen: None,
            local_swap: false,
            hold: held.then(|| {
                "split brain before this daemon restarted: waiting for the operator (`tandem \
                 second` to resynchronise from the peer, `tandem prim` to keep this node's data)"
                    .to_owned()
            }),
            wait_reason: None,
            started_at: None,
            link_up: true,
            app: None,
            vip_held: false,
            synced_generation: 0,
            sync_from: None,
            primary_shared_seen: false,
            replication_connected: false,
            new_generation_due: false,
            connected_generation: None,
            last_transition: None,
        }
    }

    pub(crate) fn snapshot(&self) -> ModuleSnapshot {
        ModuleSnapshot {
            name: self.settings.name.clone(),
            state: self.state,
            ready: self.ready,
            primary_role: self.primary_role,
            claim: self.record.claim,
            epoch: self.record.epoch,
            want_primary: self.want_primary,
            grant_to: self.grant_to,
            swap_counter: self.swap_counter,
            last_primary: self.record.last_primary,
            generation: self.record.generation,
            synced_generation: self.synced_generation,
        }
    }

    /// Everything that, when changed, means progress (used to bound the settle loop).
    pub(crate) fn fingerprint(&self) -> (ModuleSnapshot, Goal, usize, Option<StepId>, bool) {
        (
            self.snapshot(),
            self.goal,
            self.plan.len(),
            self.current.as_ref().map(|(id, _)| *id),
            self.hold.is_some(),
        )
    }

    fn persist(&self, effects: &mut Vec<Effect>) {
        effects.push(Effect::Persist {
            module: self.id,
            record: self.record.clone(),
        });
    }

    /// Leaves the primary role at once: writes are refused from now on.
    pub(crate) fn fence(&mut self, effects: &mut Vec<Effect>) {
        if self.primary_role {
            self.primary_role = false;
            effects.push(Effect::SetWritable {
                module: self.id,
                writable: false,
            });
        }
    }

    /// Takes the primary role: new epoch, exclusive claim, persisted before anything else.
    fn commit_primary(&mut self, peer_max: (u64, u64), effects: &mut Vec<Effect>) {
        let (peer_max_epoch, peer_max_generation) = peer_max;
        self.primary_role = true;
        self.want_primary = false;
        self.local_swap = false;
        self.record.epoch = self.record.epoch.max(peer_max_epoch) + 1;
        self.record.generation = self.record.generation.max(peer_max_generation) + 1;
        self.record.claim = Claim::Exclusive;
        self.record.last_primary = true;
        self.synced_generation = 0;
        self.persist(effects);
    }

    // ----- grants --------------------------------------------------------------------------

    pub(crate) fn update_grant(
        &mut self,
        peer: Option<&ModuleSnapshot>,
        peer_incarnation: Option<u64>,
        local_name: &str,
        peer_name: &str,
        logs: &mut Vec<(Level, String)>,
    ) {
        let (Some(peer), Some(incarnation)) = (peer, peer_incarnation) else {
            if self.grant_to.take().is_some() {
                self.handing_over = false;
            }
            return;
        };
        if let Some(granted) = self.grant_to {
            let released = !peer.want_primary && !peer.primary_role && !self.handing_over;
            if granted != incarnation || released {
                self.grant_to = None;
                self.handing_over = false;
            }
        }
        // Neither the role nor the VIPs may still be held here: a node that was just fenced
        // (interface down, split brain) grants once its VIPs are removed.
        // A node that holds writes the peer lacks does not hand it the role.
        let holds_newer_data = self.record.claim == Claim::Exclusive
            && self.record.generation > peer.generation.max(peer.synced_generation);
        if holds_newer_data && peer.want_primary && self.goal == Goal::ForceSecond {
            // `tandem second` would hand the role to a peer lacking this node's writes: refused
            // here (the grant) and given up, so that the rules choose again instead of both nodes
            // waiting for each other.
            self.goal = Goal::Run;
            logs.push((
                Level::Warn,
                format!(
                    "`tandem second` abandoned: this node holds writes {peer_name} lacks; stop \
                     this node first to discard them"
                ),
            ));
        }
        if self.grant_to.is_none()
            && peer.want_primary
            && !self.primary_role
            && !self.vip_held
            && !holds_newer_data
        {
            // A pending `tandem prim` never grants, even before the start scripts are done. The
            // policy's preference holds against a peer that asks anyway (it was forced) only
            // when the claims differ: with equal claims nothing is lost whichever node serves,
            // so the operator's choice on the peer wins instead of both waiting for each other.
            let local_wins = self.goal == Goal::ForcePrim
                || (self.want_primary
                    && self.record.claim != peer.claim
                    && policy::prefer(
                        Candidate {
                            name: local_name,
                            claim: self.record.claim,
                            last_primary: self.record.last_primary,
                        },
                        Candidate {
                            name: peer_name,
                            claim: peer.claim,
                            last_primary: peer.last_primary,
                        },
                        &self.settings.default_primary,
                    ) == Preference::Local);
            if !local_wins {
                self.want_primary = false;
                self.grant_to = Some(incarnation);
                logs.push((
                    Level::Info,
                    format!("agreed that {peer_name} takes the primary role"),
                ));
            }
        }
    }

    // ----- decisions -----------------------------------------------------------------------

    /// Plans the next transition, if any. Called only when no plan runs.
    pub(crate) fn peer_facts(&self, context: &Context<'_>) -> PeerFacts {
        self.facts_about(context.peer, context.peer_incarnation)
    }

    /// The facts about a peer module (`None`: not reachable or not running the module).
    pub(crate) fn facts_about(
        &self,
        peer: Option<&ModuleSnapshot>,
        peer_incarnation: Option<u64>,
    ) -> PeerFacts {
        match peer {
            None => PeerFacts::default(),
            Some(peer) => PeerFacts {
                running: true,
                primary: peer.primary_role,
                second: peer.state == State::Second,
                // Not `ready`: a secondary restarting its scripts stays in sync.
                second_in_sync: peer.state == State::Second
                    && peer.synced_generation == self.record.generation
                    && self.primary_role
                    && self.replication_connected,
                incarnation: peer_incarnation,
                generation: peer.generation,
            },
        }
    }

    pub(crate) fn decide(
        &mut self,
        context: &Context<'_>,
        logs: &mut Vec<(Level, String)>,
        effects: &mut Vec<Effect>,
    ) {
        let facts = self.peer_facts(context);
        if self.goal == Goal::Stopped {
            if self.state != State::Stop {
                self.want_primary = false;
                self.plan_stop(false, Action::Stop, "stop requested", facts);
            }
            return;
        }
        // A forced start is used up once the module holds a role: it must not linger and force
        // a later, unrelated start (after a failover and a step-down, say).
        if matches!(self.state, State::Alone | State::Prim | State::Second)
            && matches!(self.goal, Goal::ForcePrim | Goal::ForceSecond)
        {
            if self.goal == Goal::ForcePrim && self.state == State::Second {
                logs.push((
                    Level::Warn,
                    format!(
                        "`tandem prim` dropped: this node became secondary of {} meanwhile; use \
                         `tandem swap`",
                        context.peer_name
                    ),
                ));
            }
            self.goal = Goal::Run;
        }
        match self.state {
            State::Stop => self.plan_start(),
            State::Wait => self.decide_wait(context, logs, effects),
            State::Alone | State::Prim => self.decide_primary(context, facts, logs),
            State::Second => self.decide_second(context, facts, logs, effects),
        }
    }

    fn set_waiting(&mut self, reason: String, logs: &mut Vec<(Level, String)>) {
        if self.wait_reason.as_deref() != Some(reason.as_str()) {
            logs.push((Level::Info, format!("waiting: {reason}")));
            self.wait_reason = Some(reason);
        }
    }

    fn decide_wait(
        &mut self,
        context: &Context<'_>,
        logs: &mut Vec<(Level, String)>,
        effects: &mut Vec<Effect>,
    ) {
        if let Some(hold) = self.hold.clone() {
            self.want_primary = false;
            self.set_waiting(hold, logs);
            return;
        }
        if !self.link_up {
            self.want_primary = false;
            self.set_waiting("the VIP interface is down".into(), logs);
            return;
        }
        match context.peer {
            Some(peer) if peer.primary_role => {
                if self.goal == Goal::ForcePrim {
                    logs.push((
                        Level::Warn,
                        format!(
                            "{} became primary first: starting as secondary",
                            context.peer_name
                        ),
                    ));
                }
                self.goal = Goal::Run;
                self.want_primary = false;
                self.plan_become_second(Action::Start, "the peer is primary");
            }
            Some(peer) => {
                if self.want_primary
                    && peer.grant_to == Some(context.my_incarnation)
                    && context.peer_view_settled
                {
                    let forced = self.goal == Goal::ForcePrim;
                    self.commit_primary(
                        (context.peer_max_epoch, context.peer_max_generation),
                        effects,
                    );
                    self.goal = Goal::Run;
                    let reason = if forced {
                        "forced primary (`tandem prim`)"
                    } else {
                        "the peer agreed this node is primary"
                    };
                    self.plan_become_primary(State::Wait, Action::Start, reason);
                    return;
                }
                if self.goal == Goal::ForcePrim
                    && peer.want_primary
                    && peer.claim.is_up_to_date()
                    && peer.claim > self.record.claim
                {
                    // Both ask and neither would grant: the peer has newer data and asks for
                    // the role (it was started with it, or forced too). Keep the data.
                    logs.push((
                        Level::Warn,
                        format!(
                            "`tandem prim` abandoned: {} asks to become primary and its data is \
                             newer ({} against {}); stop it first to force this node",
                            context.peer_name,
                            peer.claim.as_str(),
                            self.record.claim.as_str()
                        ),
                    ));
                    self.goal = Goal::Run;
                }
                let preference = match self.goal {
                    Goal::ForcePrim => Preference::Local,
                    Goal::ForceSecond => Preference::Peer,
                    _ => policy::prefer(
                        Candidate {
                            name: context.local_name,
                            claim: self.record.claim,
                            last_primary: self.record.last_primary,
                        },
                        Candidate {
                            name: context.peer_name,
                            claim: peer.claim,
                            last_primary: peer.last_primary,
                        },
                        &self.settings.default_primary,
                    ),
                };
                // A peer that granted us already is not asked again; a granted peer that wants
                // the role itself is not competed with.
                self.want_primary = preference == Preference::Local && self.grant_to.is_none();
                let reason =
                    if self.want_primary && peer.want_primary && peer.claim == self.record.claim {
                        // Only two forced nodes keep asking both (see `update_grant`).
                        format!(
                            "{} asks to become primary too (`tandem prim` on both nodes?): run \
                         `tandem stop` on the node that must not be primary",
                            context.peer_name
                        )
                    } else {
                        preference_reason(&preference, context.peer_name)
                    };
                self.set_waiting(reason, logs);
            }
            None => {
                self.want_primary = false;
                let peer_silent = self.grant_to.is_none();
                // Forced with the peer's daemon down: once the node has looked for it for one
                // timeout since boot (a peer not heard yet may well be primary). With its daemon
                // up and the module stopped, after the module's start-up look too (it may be
                // starting at the same time).
                let forced_now =
                    context.startup_over || (context.peer_view_settled && !context.peer_alive);
                if self.goal == Goal::ForcePrim && peer_silent && forced_now {
                    self.commit_primary(
                        (context.peer_max_epoch, context.peer_max_generation),
                        effects,
                    );
                    self.goal = Goal::Run;
                    self.plan_become_primary(
                        State::Wait,
                        Action::Start,
                        "forced primary (`tandem prim`)",
                    );
                } else if self.goal == Goal::ForceSecond {
                    self.set_waiting("waiting for a primary to synchronise from".into(), logs);
                } else if !context.startup_over {
                    self.set_waiting(format!("looking for {}", context.peer_name), logs);
                } else if self.record.claim == Claim::Exclusive
                    && peer_silent
                    && (context.peer_max_generation >= self.record.generation
                        || context.peer_max_epoch > self.record.epoch)
                {
                    // Epochs and generations are started only by a node that takes the primary
                    // role or goes ALONE, above every one it knows: the peer showed a generation
                    // at least as new as this node's, or took the primary role after this node
                    // did, so it served after (or while) this node did and may hold writes this
                    // node lacks (split brain). Taking over now could lose them.
                    self.set_waiting(
                        format!(
                            "{} served alone after this node did (data generation {} against {}): \
                             both nodes may hold writes the other lacks; run `tandem prim` on the \
                             node whose data to keep",
                            context.peer_name, context.peer_max_generation, self.record.generation
                        ),
                        logs,
                    );
                } else if self.record.claim == Claim::Exclusive
                    && peer_silent
                    && context
                        .peer_last
                        .map(|peer| peer.claim == Claim::Exclusive)
                        .unwrap_or(self.record.peer_exclusive)
                {
                    // The peer (stopped, or absent now) was last seen with the claim `exclusive`:
                    // it served alone too and has not resynchronised from this node since, so it
                    // holds writes this node lacks. Its older generation does not make them older
                    // than this node's: a node promoted while the peer served on the other side
                    // of a partition (an operator's `prim`) starts a newer generation while the
                    // peer goes on acknowledging writes in its own. As with two running
                    // exclusive nodes (`policy::prefer`), the operator chooses.
                    self.set_waiting(
                        format!(
                            "{} served alone too (claim exclusive when last seen): both nodes may \
                             hold writes the other lacks; run `tandem prim` on the node whose \
                             data to keep",
                            context.peer_name
                        ),
                        logs,
                    );
                } else if self.record.claim == Claim::Exclusive && peer_silent {
                    self.commit_primary(
                        (context.peer_max_epoch, context.peer_max_generation),
                        effects,
                    );
                    self.plan_become_primary(
                        State::Wait,
                        Action::Start,
                        "this node has the only up-to-date data and the peer is absent",
                    );
                } else if self.record.claim == Claim::Shared
                    && peer_silent
                    && context
                        .peer_stopped
                        .is_some_and(|peer| peer.claim != Claim::Exclusive)
                {
                    // The peer's daemon answers, its module is stopped, and it holds no write this
                    // node lacks (only a node that served alone does): nothing can be lost.
                    self.commit_primary(
                        (context.peer_max_epoch, context.peer_max_generation),
                        effects,
                    );
                    self.plan_become_primary(
                        State::Wait,
                        Action::Start,
                        "the peer's module is stopped and holds no data this node lacks",
                    );
                } else {
                    self.set_waiting(
                        format!(
                            "{} is absent and this node's data may not be up to date (claim \
                             {}): waiting for it; run `tandem prim` here to force this node \
                             primary",
                            context.peer_name,
                            self.record.claim.as_str()
                        ),
                        logs,
                    );
                }
            }
        }
    }

    fn decide_primary(
        &mut self,
        context: &Context<'_>,
        facts: PeerFacts,
        logs: &mut Vec<(Level, String)>,
    ) {
        self.wait_reason = None;
        if !self.primary_role {
            // Fenced by split brain or link loss: finish stepping down.
            let reason = if self.link_up {
                "split brain: stepping down"
            } else {
                "interface down"
            };
            self.plan_leave_to_wait(Action::Auto, reason, facts);
            return;
        }
        let peer_swap = context.peer.is_some_and(|peer| {
            self.peer_swap_seen
                .is_some_and(|seen| peer.swap_counter > seen)
        });
        if peer_swap {
            self.peer_swap_seen = context.peer.map(|peer| peer.swap_counter);
            self.local_swap = true;
        }
        if self.local_swap {
            self.local_swap = false;
            if self.state == State::Prim && facts.second_in_sync {
                self.plan_handover("swap requested");
                return;
            }
            logs.push((
                Level::Warn,
                "swap abandoned: the peer is not an up-to-date secondary".into(),
            ));
        }
        if let crate::settings::DefaultPrimary::Node(preferred) = &self.settings.default_primary
            && preferred == context.peer_name
            && self.state == State::Prim
            && facts.second_in_sync
        {
            logs.push((
                Level::Info,
                format!("{preferred} is the default primary and is up to date: swapping roles"),
            ));
            self.plan_handover("default_primary");
            return;
        }
        match self.state {
            State::Alone if self.new_generation_due => {
                // The replication to a secondary that synchronised with the current generation
                // was lost while this node was still ALONE: writes it acknowledges from now on
                // are missing there, so they belong to a new generation, persisted before the
                // replicator may record them locally (the secondary then resynchronises).
                self.new_generation_due = false;
                logs.push((
                    Level::Info,
                    "the replication to the secondary is lost: new data generation".into(),
                ));
                self.plan.push_back(Step::NewGeneration);
                self.plan.push_back(Step::SetClaim(Claim::Exclusive));
            }
            State::Alone if facts.second_in_sync => {
                self.plan_alone_to_prim();
            }
            State::Prim if !facts.second_in_sync => {
                let reason = match context.peer {
                    None => "the secondary is gone",
                    Some(peer)
                        if peer.state == State::Second
                            && peer.synced_generation == self.record.generation =>
                    {
                        "the replication to the secondary is lost"
                    }
                    Some(_) => "the secondary is no longer up to date",
                };
                self.plan_prim_to_alone(reason);
            }
            _ => {}
        }
    }

    fn decide_second(
        &mut self,
        context: &Context<'_>,
        facts: PeerFacts,
        logs: &mut Vec<(Level, String)>,
        effects: &mut Vec<Effect>,
    ) {
        self.wait_reason = None;
        // Only an up-to-date secondary takes over; one whose synchronisation did not complete,
        // or that has seen the primary start a newer data generation than the one it
        // synchronised with (the primary went ALONE meanwhile), waits for the operator or for the
        // primary to come back.
        let behind = context.peer_max_generation > self.synced_generation;
        if context.peer.is_some_and(|peer| {
            peer.primary_role
                && peer.claim == Claim::Shared
                && peer.generation == self.synced_generation
        }) {
            self.primary_shared_seen = true;
        }
        let up_to_date = self.record.claim.is_up_to_date() && !behind && self.primary_shared_seen;
        if behind
            && self.record.claim.is_up_to_date()
            && context.peer.is_none_or(|peer| !peer.primary_role)
        {
            logs.push((
                Level::Warn,
                format!(
                    "{} moved on to data generation {} after this node synchronised with {}: \
                     this node is not up to date",
                    context.peer_name, context.peer_max_generation, self.synced_generation
                ),
            ));
            self.plan.push_back(Step::SetClaim(Claim::Stale));
        }
        match context.peer {
            Some(peer) if peer.primary_role => {
                self.want_primary = false;
                if peer.generation != self.synced_generation {
                    self.plan_resync("the primary changed");
                }
            }
            Some(peer) => {
                if peer.grant_to == Some(context.my_incarnation)
                    && up_to_date
                    && context.peer_view_settled
                {
                    let action = if self.want_primary {
                        Action::Auto
                    } else {
                        Action::Swap
                    };
                    let reason = if action == Action::Swap {
                        "roles swapped: the peer handed over"
                    } else {
                        "the peer left the primary role"
                    };
                    self.commit_primary(
                        (context.peer_max_epoch, context.peer_max_generation),
                        effects,
                    );
                    self.plan_takeover(action, reason);
                } else if !self.link_up {
                    self.plan_leave_to_wait(Action::Auto, "the VIP interface is down", facts);
                } else if !up_to_date {
                    self.want_primary = false;
                    self.plan_leave_to_wait(
                        Action::Auto,
                        "the primary left before this node was up to date",
                        facts,
                    );
                } else if self.settings.failover {
                    if !self.want_primary {
                        logs.push((
                            Level::Info,
                            format!(
                                "{} left the primary role: asking to take over",
                                context.peer_name
                            ),
                        ));
                    }
                    self.want_primary = true;
                } else {
                    self.want_primary = false;
                    self.plan_leave_to_wait(
                        Action::Auto,
                        "the primary left and failover is off",
                        facts,
                    );
                }
            }
            None => {
                self.want_primary = false;
                let why = if context.peer_alive {
                    "the peer stopped the module"
                } else {
                    "the peer is lost"
                };
                if !self.link_up {
                    self.plan_leave_to_wait(Action::Auto, "the VIP interface is down", facts);
                } else if !up_to_date {
                    self.plan_leave_to_wait(
                        Action::Auto,
                        &format!("{why} before this node was up to date"),
                        facts,
                    );
                } else if self.settings.failover && self.grant_to.is_none() {
                    logs.push((Level::Warn, format!("{why}: failover")));
                    self.commit_primary(
                        (context.peer_max_epoch, context.peer_max_generation),
                        effects,
                    );
                    self.plan_takeover(Action::Auto, &format!("failover: {why}"));
                } else {
                    self.plan_leave_to_wait(
                        Action::Auto,
                        &format!("{why} and failover is off"),
                        facts,
                    );
                }
            }
        }
    }

    // ----- plans ---------------------------------------------------------------------------

    fn script(&mut self, script: Script, current: State, next: State, action: Action) {
        self.plan.push_back(Step::Script {
            script,
            current,
            next,
            action,
            force: false,
        });
    }

    fn plan_start(&mut self) {
        self.hold = None;
        self.wait_reason = None;
        self.plan.push_back(Step::Enter {
            state: State::Wait,
            ready: false,
        });
        self.script(Script::Transition, State::Stop, State::Wait, Action::Start);
        self.script(Script::Prestart, State::Stop, State::Wait, Action::Start);
        self.plan.push_back(Step::Enter {
            state: State::Wait,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from: State::Stop,
            to: State::Wait,
            reason: "start".into(),
        });
    }

    fn plan_become_primary(&mut self, from: State, action: Action, reason: &str) {
        self.wait_reason = None;
        self.plan.push_back(Step::Enter {
            state: from,
            ready: false,
        });
        self.plan_enter_alone(from, action, reason);
    }

    fn plan_takeover(&mut self, action: Action, reason: &str) {
        let from = State::Second;
        self.plan.push_back(Step::Enter {
            state: from,
            ready: false,
        });
        if self.app == Some(Script::StartSecond) {
            self.script(Script::StopSecond, from, State::Alone, action);
        }
        self.plan_enter_alone(from, action, reason);
    }

    /// The common end of every promotion: transition, VIPs, writes allowed, then the application.
    fn plan_enter_alone(&mut self, from: State, action: Action, reason: &str) {
        self.script(Script::Transition, from, State::Alone, action);
        self.plan.push_back(Step::AcquireVips);
        self.plan.push_back(Step::Unfence);
        self.script(Script::StartPrim, from, State::Alone, action);
        self.plan.push_back(Step::Enter {
            state: State::Alone,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from,
            to: State::Alone,
            reason: reason.into(),
        });
    }

    fn plan_become_second(&mut self, action: Action, reason: &str) {
        self.wait_reason = None;
        self.plan.push_back(Step::SetClaim(Claim::Stale));
        self.plan.push_back(Step::Enter {
            state: State::Wait,
            ready: false,
        });
        self.script(Script::Transition, State::Wait, State::Second, action);
        self.plan.push_back(Step::Enter {
            state: State::Second,
            ready: false,
        });
        self.script(Script::StartSecond, State::Wait, State::Second, action);
        self.plan.push_back(Step::SyncData);
        self.plan.push_back(Step::MarkSynced);
        self.plan.push_back(Step::Enter {
            state: State::Second,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from: State::Wait,
            to: State::Second,
            reason: reason.into(),
        });
    }

    fn plan_resync(&mut self, reason: &str) {
        self.plan.push_back(Step::SetClaim(Claim::Stale));
        self.plan.push_back(Step::Enter {
            state: State::Second,
            ready: false,
        });
        self.plan.push_back(Step::SyncData);
        self.plan.push_back(Step::MarkSynced);
        self.plan.push_back(Step::Enter {
            state: State::Second,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from: State::Second,
            to: State::Second,
            reason: reason.into(),
        });
    }

    fn plan_alone_to_prim(&mut self) {
        self.plan.push_back(Step::SetClaim(Claim::Shared));
        self.plan.push_back(Step::Enter {
            state: State::Alone,
            ready: false,
        });
        self.script(Script::Transition, State::Alone, State::Prim, Action::Auto);
        self.plan.push_back(Step::Enter {
            state: State::Prim,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from: State::Alone,
            to: State::Prim,
            reason: "the secondary is up to date".into(),
        });
    }

    fn plan_prim_to_alone(&mut self, reason: &str) {
        self.new_generation_due = false;
        // The exclusive claim and a new data generation are persisted before any write is
        // acknowledged alone: the secondary, if it comes back, sees the new generation and
        // resynchronises before the pair is PRIM/SECOND again.
        self.plan.push_back(Step::NewGeneration);
        self.plan.push_back(Step::SetClaim(Claim::Exclusive));
        self.plan.push_back(Step::Enter {
            state: State::Prim,
            ready: false,
        });
        self.script(Script::Transition, State::Prim, State::Alone, Action::Auto);
        self.plan.push_back(Step::Enter {
            state: State::Alone,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from: State::Prim,
            to: State::Alone,
            reason: reason.into(),
        });
    }

    fn plan_handover(&mut self, reason: &str) {
        let from = State::Prim;
        self.plan.push_back(Step::Enter {
            state: from,
            ready: false,
        });
        self.script(Script::StopPrim, from, State::Second, Action::Swap);
        self.plan.push_back(Step::ReleaseVips);
        self.plan.push_back(Step::Fence);
        self.plan.push_back(Step::GrantPeer);
        self.script(Script::Transition, from, State::Second, Action::Swap);
        self.plan.push_back(Step::AwaitPeerPrimary);
        self.plan.push_back(Step::Enter {
            state: State::Second,
            ready: false,
        });
        self.script(Script::StartSecond, from, State::Second, Action::Swap);
        self.plan.push_back(Step::SyncData);
        self.plan.push_back(Step::MarkSynced);
        self.plan.push_back(Step::Enter {
            state: State::Second,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from,
            to: State::Second,
            reason: reason.into(),
        });
    }

    /// Leaves ALONE, PRIM or SECOND for WAIT, running the matching stop scripts.
    fn plan_leave_to_wait(&mut self, action: Action, reason: &str, facts: PeerFacts) {
        let from = self.state;
        self.plan_release(from, State::Wait, action, false, facts);
        self.plan.push_back(Step::Enter {
            state: State::Wait,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from,
            to: State::Wait,
            reason: reason.into(),
        });
    }

    /// Called when the primary role was just lost (fenced) while a plan may run: a plan that
    /// still leads to a primary state (acquiring the VIPs, unfencing, start_prim) is abandoned
    /// for a step-down, instead of starting the application on a fenced node.
    pub(crate) fn abandon_promotion(&mut self, reason: &str, facts: PeerFacts) {
        let promoting = self.plan.iter().any(|step| match step {
            Step::AcquireVips | Step::Unfence => true,
            Step::Script { script, .. } => *script == Script::StartPrim,
            Step::Enter { state, .. } => state.is_primary(),
            _ => false,
        });
        if promoting {
            self.plan.clear();
            self.plan_leave_to_wait(Action::Auto, reason, facts);
        }
    }

    fn plan_release(
        &mut self,
        from: State,
        next: State,
        action: Action,
        force: bool,
        facts: PeerFacts,
    ) {
        self.plan.push_back(Step::Enter {
            state: from,
            ready: false,
        });
        let release_vips = self.vip_held || from.is_primary();
        // A fenced node (VIPs without the role: split brain, interface down) removes them
        // first, before any script: the peer may be serving on them already.
        let vips_first = release_vips && !self.primary_role;
        if vips_first {
            self.plan.push_back(Step::ReleaseVips);
        }
        // A secondary that leaves SECOND gives its data up for the next resynchronisation when
        // the primary goes on serving without it, and also when it never saw its primary
        // acknowledge writes with it (PRIM, claim `shared`) since its synchronisation: the
        // primary was ALONE meanwhile and acknowledged writes alone that replication may not
        // have carried here (the channel can fail before either node notices). Its `shared`
        // claim would otherwise let it be preferred to a peer that holds those writes.
        let gives_up =
            facts.primary || (!self.primary_shared_seen && self.record.claim.is_up_to_date());
        if from == State::Second && gives_up && !self.plan.contains(&Step::SetClaim(Claim::Stale)) {
            self.plan.push_back(Step::SetClaim(Claim::Stale));
        }
        if self.app == Some(Script::StartPrim) || from.is_primary() {
            self.plan.push_back(Step::Script {
                script: Script::StopPrim,
                current: from,
                next,
                action,
                force,
            });
        }
        if self.app == Some(Script::StartSecond) {
            self.plan.push_back(Step::Script {
                script: Script::StopSecond,
                current: from,
                next,
                action,
                force,
            });
        }
        if release_vips && !vips_first {
            self.plan.push_back(Step::ReleaseVips);
        }
        if self.primary_role || from.is_primary() {
            self.plan.push_back(Step::Fence);
        }
        self.script(Script::Transition, from, next, action);
    }

    /// Stops the module from whatever state it is in.
    pub(crate) fn plan_stop(
        &mut self,
        force: bool,
        action: Action,
        reason: &str,
        facts: PeerFacts,
    ) {
        let from = self.state;
        self.want_primary = false;
        self.local_swap = false;
        if from != State::Wait && from != State::Stop {
            self.plan_release(from, State::Wait, action, force, facts);
        } else {
            self.plan.push_back(Step::Enter {
                state: from,
                ready: false,
            });
            if self.app.is_some() || self.vip_held || self.primary_role {
                self.plan_release(from, State::Wait, action, force, facts);
            }
        }
        self.script(Script::Poststop, State::Wait, State::Stop, action);
        self.script(Script::Transition, State::Wait, State::Stop, action);
        self.plan.push_back(Step::Enter {
            state: State::Stop,
            ready: true,
        });
        self.plan.push_back(Step::Finish {
            from,
            to: State::Stop,
            reason: reason.into(),
        });
    }

    pub(crate) fn plan_restart(&mut self) {
        let state = self.state;
        let (stop, start) = if state.is_primary() {
            (Script::StopPrim, Script::StartPrim)
        } else {
            (Script::StopSecond, Script::StartSecond)
        };
        self.plan.push_back(Step::Enter {
            state,
            ready: false,
        });
        self.script(stop, state, state, Action::Restart);
        self.script(start, state, state, Action::Restart);
        self.plan.push_back(Step::Enter { state, ready: true });
        self.plan.push_back(Step::Finish {
            from: state,
            to: state,
            reason: "restart".into(),
        });
    }

    // ----- running plans -------------------------------------------------------------------

    /// Runs internal steps and emits the next external one. Returns whether anything happened.
    pub(crate) fn advance(
        &mut self,
        next_step: &mut u64,
        now: Time,
        facts: PeerFacts,
        effects: &mut Vec<Effect>,
        logs: &mut Vec<(Level, String)>,
    ) -> bool {
        let mut progressed = false;
        if let Some((_, Step::AwaitPeerPrimary)) = &self.current {
            if facts.primary || self.goal == Goal::Stopped {
                self.current = None;
                self.handing_over = false;
                progressed = true;
            } else if !facts.running || !facts.second {
                // The peer cannot take the role any more (it left SECOND or is gone): the swap
                // is abandoned. This node has fenced and released everything; it waits, and the
                // rules choose the primary again from the claims.
                self.current = None;
                self.handing_over = false;
                self.grant_to = None;
                self.plan.clear();
                logs.push((
                    Level::Warn,
                    "swap abandoned: the peer could not take the primary role".into(),
                ));
                self.plan.push_back(Step::Enter {
                    state: State::Wait,
                    ready: true,
                });
                self.plan.push_back(Step::Finish {
                    from: State::Prim,
                    to: State::Wait,
                    reason: "swap abandoned: the peer could not take the primary role".into(),
                });
                progressed = true;
            } else {
                return false;
            }
        }
        while self.current.is_none() {
            let Some(step) = self.plan.pop_front() else {
                break;
            };
            progressed = true;
            let step_id = StepId(*next_step);
            if let Some(effect) = self.external_effect(step_id, &step) {
                *next_step += 1;
                match &step {
                    Step::Script { script, .. } if starts_app(*script) => self.app = Some(*script),
                    Step::AcquireVips => self.vip_held = true,
                    Step::SyncData => self.sync_from = facts.primary.then_some(facts.generation),
                    _ => {}
                }
                effects.push(effect);
                self.current = Some((step_id, step));
                break;
            }
            self.run_internal(step, now, facts, effects, logs);
        }
        progressed
    }

    fn run_internal(
        &mut self,
        step: Step,
        now: Time,
        facts: PeerFacts,
        effects: &mut Vec<Effect>,
        logs: &mut Vec<(Level, String)>,
    ) {
        match step {
            Step::Enter { state, ready } => {
                if state != State::Wait {
                    self.wait_reason = None;
                }
                if (state, ready) != (self.state, self.ready) {
                    if state == State::Wait && self.state == State::Stop {
                        self.started_at = Some(now);
                    }
                    self.state = state;
                    self.ready = ready;
                    effects.push(Effect::StateChanged {
                        module: self.id,
                        state,
                        ready,
                    });
                }
            }
            Step::NewGeneration => {
                self.record.generation = self.record.generation.max(facts.generation) + 1;
            }
            Step::SetClaim(claim) => {
                self.record.claim = claim;
                self.persist(effects);
            }
            Step::Fence => {
                let in_sync = facts.second_in_sync;
                self.fence(effects);
                self.record.claim = claim_after_leaving_primary(self.record.claim, in_sync);
                self.persist(effects);
            }
            Step::Unfence => {
                if self.primary_role {
                    effects.push(Effect::SetWritable {
                        module: self.id,
                        writable: true,
                    });
                }
            }
            Step::GrantPeer => {
                if let Some(incarnation) = facts.incarnation.filter(|_| facts.running) {
                    self.grant_to = Some(incarnation);
                    self.handing_over = true;
                    self.record.last_primary = false;
                    self.persist(effects);
                } else {
                    logs.push((Level::Warn, "the peer disappeared during the swap".into()));
                }
            }
            Step::AwaitPeerPrimary => {
                self.current = Some((StepId(0), Step::AwaitPeerPrimary));
            }
            Step::MarkSynced => {
                // The synchronisation counts only if the primary it started from is still the
                // primary now: otherwise it may have ended early or copied from a node that
                // kept writing, and the data is not known to be up to date.
                let source = self.sync_from.take();
                if facts.running && facts.primary && source == Some(facts.generation) {
                    self.synced_generation = facts.generation;
                    self.primary_shared_seen = false;
                    self.record.claim = Claim::Shared;
                    self.record.last_primary = false;
                    self.persist(effects);
                } else {
                    logs.push((
                        Level::Warn,
                        "the primary left or changed during the synchronisation: this node's \
                         data is not known to be up to date"
                            .into(),
                    ));
                    // Not SECOND ready: the decisions take the module from here.
                    self.plan.clear();
                }
            }
            Step::Finish { from, to, reason } => {
                logs.push((Level::Info, format!("transition {from} -> {to}: {reason}")));
                self.record_transition(from, to, &reason, now);
            }
            Step::Script { .. } | Step::AcquireVips | Step::ReleaseVips | Step::SyncData => {}
        }
    }

    /// Handles the report of the running external step.
    pub(crate) fn complete(
        &mut self,
        step: Step,
        outcome: Outcome,
        logs: &mut Vec<(Level, String)>,
    ) {
        let failure = match &outcome {
            Outcome::Ok => None,
            Outcome::Failed(why) => Some(why.clone()),
            Outcome::TimedOut => Some("timed out".to_owned()),
        };
        match step {
            Step::Script {
                script,
                current,
                next,
                action,
                force,
            } => {
                if script.is_stop() {
                    match failure {
                        Some(why) if !force => {
                            logs.push((
                                Level::Warn,
                                format!(
                                    "{} did not stop gracefully ({why}): calling it with force",
                                    script.file_name()
                                ),
                            ));
                            self.plan.push_front(Step::Script {
                                script,
                                current,
                                next,
                                action,
                                force: true,
                            });
                        }
                        other => {
                            if let Some(why) = other {
                                logs.push((
                                    Level::Error,
                                    format!(
                                        "{} force failed ({why}); continuing",
                                        script.file_name()
                                    ),
                                ));
                            }
                            self.app = None;
                        }
                    }
                } else if let Some(why) = failure {
                    if starts_app(script) || script == Script::Prestart {
                        logs.push((
                            Level::Error,
                            format!("{} failed ({why}): stopping the module", script.file_name()),
                        ));
                        self.plan.clear();
                        self.goal = Goal::Stopped;
                    } else {
                        logs.push((
                            Level::Warn,
                            format!("{} failed ({why}); continuing", script.file_name()),
                        ));
                    }
                }
            }
            Step::AcquireVips => {
                if let Some(why) = failure {
                    logs.push((
                        Level::Error,
                        format!("virtual IPs could not be set ({why}): stopping the module"),
                    ));
                    self.plan.clear();
                    self.goal = Goal::Stopped;
                }
            }
            Step::ReleaseVips => {
                self.vip_held = false;
                if let Some(why) = failure {
                    logs.push((
                        Level::Error,
                        format!("virtual IPs could not be removed ({why})"),
                    ));
                }
            }
            Step::SyncData => {
                if let Some(why) = failure {
                    logs.push((
                        Level::Error,
                        format!("data synchronisation failed ({why}): stopping the module"),
                    ));
                    self.plan.clear();
                    self.goal = Goal::Stopped;
                }
            }
            _ => {}
        }
    }
}
