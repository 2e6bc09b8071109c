//! A simulated node: the core, what survives a crash (the records of `Persist` effects), and the
//! simulated adapters (scripts, VIPs, data synchronisation, fencing) with their ghost state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use tandem_core::{
    Effect, Input, ModuleId, ModuleSnapshot, Node, NodeSettings, Outcome, Persisted, Script,
    ScriptCall, StepId, Time,
};

use crate::clock::EventKey;
use crate::rng::Rng;

/// How one call of a script behaves, when a test wants to decide it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptRule {
    /// Ends after `after` with `outcome` (`after` beyond the call's timeout means `TimedOut`).
    Take {
        /// Duration.
        after: Duration,
        /// How it ends.
        outcome: Outcome,
    },
    /// Runs until the test finishes it (`World::finish_script`), or forever.
    Hold,
}

/// Random behaviour of scripts when no rule applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScriptTiming {
    /// Probability (per mille) that a call ends at once (the script does not exist or does
    /// nothing): races between the nodes then depend on the network alone.
    pub instant_per_mille: u32,
    /// Shortest run otherwise.
    pub min: Duration,
    /// Longest ordinary run.
    pub max: Duration,
    /// Probability (per mille) that a call fails.
    pub fail_per_mille: u32,
    /// Probability (per mille) that a call hangs past its timeout.
    pub hang_per_mille: u32,
}

impl ScriptTiming {
    /// Scripts that end at once and always succeed.
    pub const fn instant() -> ScriptTiming {
        ScriptTiming {
            instant_per_mille: 1000,
            min: Duration::ZERO,
            max: Duration::ZERO,
            fail_per_mille: 0,
            hang_per_mille: 0,
        }
    }
}

/// Random behaviour of the VIP and synchronisation adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterTiming {
    /// Longest VIP add or removal.
    pub vip_max: Duration,
    /// Probability (per mille) that adding the VIPs fails (removal never fails).
    pub vip_fail_per_mille: u32,
    /// Longest data synchronisation.
    pub sync_max: Duration,
    /// Probability (per mille) that a synchronisation fails.
    pub sync_fail_per_mille: u32,
}

impl AdapterTiming {
    /// Adapters that finish at once and never fail.
    pub const fn instant() -> AdapterTiming {
        AdapterTiming {
            vip_max: Duration::ZERO,
            vip_fail_per_mille: 0,
            sync_max: Duration::ZERO,
            sync_fail_per_mille: 0,
        }
    }
}

/// What a running step is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepWhat {
    /// A user script.
    Script(ScriptCall),
    /// Adding the VIPs.
    AcquireVips,
    /// Removing the VIPs.
    ReleaseVips,
    /// Synchronising data.
    SyncData,
}

/// A step an adapter carries out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningStep {
    /// Its module.
    pub module: ModuleId,
    /// What it is.
    pub what: StepWhat,
    /// The scheduled completion, or `None` while a test holds it.
    pub key: Option<EventKey>,
    /// Show its completion in the transcript.
    pub shown: bool,
    /// Its outcome was decided by a test (a rule, `World::finish_step`): the adapter does not
    /// make it honest (see `World` on data synchronisations).
    pub exact: bool,
}

/// How an adapter will end a step it just started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Completion time, or `None` when held.
    pub at: Option<Time>,
    /// Outcome.
    pub outcome: Outcome,
    /// Its completion goes in the transcript: it takes time, does not end `Ok`, or is held.
    pub shown: bool,
    /// Decided by a test rule.
    pub exact: bool,
}

impl Planned {
    fn after(now: Time, after: Duration, outcome: Outcome) -> Planned {
        let shown = !after.is_zero() || outcome != Outcome::Ok;
        Planned {
            at: Some(now.plus(after)),
            outcome,
            shown,
            exact: false,
        }
    }

    fn held() -> Planned {
        Planned {
            at: None,
            outcome: Outcome::Ok,
            shown: true,
            exact: true,
        }
    }
}

/// The result of one `Node::handle` call.
#[derive(Clone, Debug)]
pub struct Handled {
    /// Module 0 before.
    pub before: ModuleSnapshot,
    /// Module 0 after.
    pub after: ModuleSnapshot,
    /// The effects, in order.
    pub effects: Vec<Effect>,
    /// `poll_timeout()` before the call.
    pub poll_before: Option<Time>,
    /// `poll_timeout()` after the call.
    pub poll_after: Option<Time>,
}

/// One simulated node.
#[derive(Debug)]
pub struct Host {
    /// Node name.
    pub name: String,
    /// Its settings.
    pub settings: NodeSettings,
    /// The core, `None` while crashed.
    pub node: Option<Node>,
    /// Incarnation of the current (or last) run.
    pub incarnation: u64,
    /// Records of `Persist` effects: all that survives a crash.
    pub records: Vec<Persisted>,
    /// Ghost: the module's data accepts writes.
    pub writable: bool,
    /// Ghost: the VIP is (or may be) configured here.
    pub vip: bool,
    /// State of the VIP interface link.
    pub link_up: bool,
    /// Frozen (`SIGSTOP`) until then.
    pub frozen_until: Option<Time>,
    /// Inputs that arrived while frozen, with the sending time of heartbeats and what the sender
    /// of a snapshot knew of acknowledged writes.
    pub backlog: VecDeque<(Input, Option<Time>, Option<[u64; 2]>)>,
    /// Steps in progress in the adapters.
    pub running: BTreeMap<StepId, RunningStep>,
    /// The VIP adapter works on one request at a time: free from then on.
    pub vip_free_at: Time,
    /// Random script behaviour of this node.
    pub scripts: ScriptTiming,
    /// Test rules for the next calls of a script.
    pub rules: HashMap<Script, VecDeque<ScriptRule>>,
    /// Test rules for the next data synchronisations.
    pub sync_rules: VecDeque<ScriptRule>,
}

impl Host {
    /// A node that has never run.
    pub fn new(settings: NodeSettings, scripts: ScriptTiming) -> Host {
        let records = vec![Persisted::default(); settings.modules.len()];
        Host {
            name: settings.local.clone(),
            settings,
            node: None,
            incarnation: 0,
            records,
            writable: false,
            vip: false,
            link_up: true,
            frozen_until: None,
            backlog: VecDeque::new(),
            running: BTreeMap::new(),
            vip_free_at: Time::ZERO,
            scripts,
            rules: HashMap::new(),
            sync_rules: VecDeque::new(),
        }
    }

    /// The node runs (not crashed).
    pub fn up(&self) -> bool {
        self.node.is_some()
    }

    /// The node is frozen.
    pub fn frozen(&self) -> bool {
        self.frozen_until.is_some()
    }

    /// Starts the daemon: a new core with a larger incarnation and the persisted records.
    pub fn boot(&mut self, now: Time) {
        self.incarnation += 1;
        self.node = Some(Node::new(
            self.settings.clone(),
            self.records.clone(),
            self.incarnation,
            now,
        ));
        self.vip_free_at = now;
    }

    /// Power loss: the core, the running scripts, the VIP and the writable mount are gone; only
    /// the records stay.
    pub fn crash(&mut self) {
        self.node = None;
        self.writable = false;
        self.vip = false;
        self.frozen_until = None;
        self.backlog.clear();
        self.running.clear();
    }

    /// Module 0's snapshot, if the core runs.
    pub fn module(&self) -> Option<ModuleSnapshot> {
        self.node
            .as_ref()
            .and_then(|node| node.snapshot().modules.into_iter().next())
    }

    /// Runs one input through the core, catching panics.
    pub fn handle(&mut self, now: Time, input: Input) -> Option<Result<Handled, String>> {
        let node = self.node.as_mut()?;
        let before = node.snapshot().modules.into_iter().next()?;
        let poll_before = node.poll_timeout();
        let result = catch_unwind(AssertUnwindSafe(|| node.handle(now, input)));
        let effects = match result {
            Ok(effects) => effects,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_else(|| "(no message)".into());
                return Some(Err(format!("the core panicked: {message}")));
            }
        };
        let after = node.snapshot().modules.into_iter().next()?;
        let poll_after = node.poll_timeout();
        Some(Ok(Handled {
            before,
            after,
            effects,
            poll_before,
            poll_after,
        }))
    }

    /// Decides how a script call ends: a test rule if one is queued, else at random.
    pub fn plan_script(&mut self, call: &ScriptCall, now: Time, rng: &mut Rng) -> Planned {
        let rule = self
            .rules
            .get_mut(&call.script)
            .and_then(VecDeque::pop_front);
        let (after, outcome) = match rule {
            Some(ScriptRule::Hold) => return Planned::held(),
            Some(ScriptRule::Take { after, outcome }) => (after, outcome),
            None => {
                let timing = self.scripts;
                if rng.chance(timing.hang_per_mille) {
                    (call.timeout + Duration::from_secs(1), Outcome::Ok)
                } else {
                    let after = if rng.chance(timing.instant_per_mille) {
                        Duration::ZERO
                    } else {
                        rng.duration(timing.min, timing.max)
                    };
                    let outcome = if rng.chance(timing.fail_per_mille) {
                        Outcome::Failed("exit code 1".into())
                    } else {
                        Outcome::Ok
                    };
                    (after, outcome)
                }
            }
        };
        if after > call.timeout {
            // The runner kills the process group at the timeout.
            Planned::after(now, call.timeout, Outcome::TimedOut)
        } else {
            Planned::after(now, after, outcome)
        }
    }

    /// Decides how a VIP request ends. Requests run one after the other, like a real adapter
    /// must run them (an abandoned acquire must not finish after the release that follows it).
    pub fn plan_vip(
        &mut self,
        acquire: bool,
        now: Time,
        timing: AdapterTiming,
        rng: &mut Rng,
    ) -> Planned {
        let start = now.max(self.vip_free_at);
        let at = start.plus(rng.duration(Duration::ZERO, timing.vip_max));
        self.vip_free_at = at;
        let outcome = if acquire && rng.chance(timing.vip_fail_per_mille) {
            Outcome::Failed("address already in use".into())
        } else {
            Outcome::Ok
        };
        Planned::after(now, at.since(now), outcome)
    }

    /// Decides how a data synchronisation ends: a test rule if one is queued, else at random.
    pub fn plan_sync(&mut self, now: Time, timing: AdapterTiming, rng: &mut Rng) -> Planned {
        match self.sync_rules.pop_front() {
            Some(ScriptRule::Hold) => return Planned::held(),
            Some(ScriptRule::Take { after, outcome }) => {
                return Planned {
                    exact: true,
                    ..Planned::after(now, after, outcome)
                };
            }
            None => {}
        }
        let after = rng.duration(Duration::ZERO, timing.sync_max);
        let outcome = if rng.chance(timing.sync_fail_per_mille) {
            Outcome::Failed("peer channel closed".into())
        } else {
            Outcome::Ok
        };
        Planned::after(now, after, outcome)
    }
}
