//! One seed, end to end: a *safety phase* where faults and operator actions rain on the cluster
//! while the invariants are checked after every event, then a *liveness phase* without faults
//! where an operator who only follows the cluster's own hints (start a stopped module, `prim` or
//! `second` where the status asks for it) must reach PRIM/SECOND ready within a bounded time.

use std::time::Duration;

use tandem_core::{Claim, Command, DefaultPrimary, ModuleSettings, NodeStatus, State};

use crate::faults;
use crate::host::{AdapterTiming, ScriptTiming};
use crate::network::LinkConf;
use crate::rng::Rng;
use crate::trace::TraceConfig;
use crate::world::{Op, Stats, World, WorldConfig};

/// How to run a seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Length of the safety phase (simulated).
    pub safety: Duration,
    /// The liveness phase must converge within this (simulated).
    pub liveness_limit: Duration,
    /// What to record.
    pub trace: TraceConfig,
    /// Trace lines printed on failure.
    pub tail: usize,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            safety: Duration::from_secs(60),
            liveness_limit: Duration::from_secs(120),
            trace: TraceConfig {
                ring: 120,
                ..TraceConfig::default()
            },
            tail: 80,
        }
    }
}

/// A seed that passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Inputs handled by the cores.
    pub handled: u64,
    /// Operations applied in the safety phase.
    pub ops: usize,
    /// Simulated time the liveness phase took to converge.
    pub converged_after: Duration,
    /// What the run went through.
    pub stats: Stats,
}

/// A seed that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedFailure {
    /// The seed.
    pub seed: u64,
    /// `safety` or `liveness`.
    pub phase: &'static str,
    /// What went wrong.
    pub message: String,
    /// The last lines of the trace.
    pub tail: Vec<String>,
}

impl std::fmt::Display for SeedFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            formatter,
            "seed {} failed in the {} phase: {}",
            self.seed, self.phase, self.message
        )?;
        writeln!(
            formatter,
            "replay: TANDEM_SIM_SEED={} cargo test -p tandem-sim --test seeds replay -- --nocapture",
            self.seed
        )?;
        writeln!(formatter, "last {} events:", self.tail.len())?;
        for line in &self.tail {
            writeln!(formatter, "  {line}")?;
        }
        Ok(())
    }
}

/// The world of a seed: topology and policies drawn from the seed too.
pub fn world_config(seed: u64, trace: TraceConfig) -> WorldConfig {
    let mut rng = Rng::new(seed ^ 0x5EED_C0F1_6000_0001);
    let names: [String; 2] = ["node1".into(), "node2".into()];
    let mut module = ModuleSettings::new("demo");
    module.failover = !rng.chance(150);
    module.default_primary = match rng.below(4) {
        0 => DefaultPrimary::Node(names[rng.index(2)].clone()),
        1 => DefaultPrimary::Last,
        _ => DefaultPrimary::None,
    };
    // Short script timeouts so that hung scripts time out within the run.
    module.stop_timeout = Duration::from_secs(3);
    module.force_stop_timeout = Duration::from_secs(2);
    module.start_timeout = Duration::from_secs(3);
    WorldConfig {
        seed,
        names,
        networks: if rng.chance(500) { 2 } else { 1 },
        pulse: Duration::from_millis(250),
        timeout: Duration::from_secs(2),
        module,
        link: LinkConf::good(),
        scripts: ScriptTiming {
            instant_per_mille: u32::try_from(rng.below(600)).unwrap_or(0),
            min: Duration::ZERO,
            max: Duration::from_millis(800),
            fail_per_mille: u32::try_from(rng.below(120)).unwrap_or(0),
            hang_per_mille: u32::try_from(rng.below(40)).unwrap_or(0),
        },
        adapters: AdapterTiming {
            vip_max: Duration::from_millis(50),
            vip_fail_per_mille: 20,
            sync_max: Duration::from_millis(1500),
            sync_fail_per_mille: 30,
        },
        trace,
    }
}

/// Runs one seed.
pub fn run_seed(seed: u64, options: &RunOptions) -> Result<SeedReport, SeedFailure> {
    let config = world_config(seed, options.trace);
    let mut world = World::new(config);
    let mut rng = Rng::new(seed ^ 0xFA17_5000_0000_0002);
    let fail = |world: &World, phase: &'static str, message: String| SeedFailure {
        seed,
        phase,
        message,
        tail: world.trace().tail(options.tail),
    };

    // Safety phase.
    let mut ops = 0;
    let mut opening = vec![
        Op::Command {
            node: 0,
            command: Command::Start,
        },
        Op::Command {
            node: 1,
            command: Command::Start,
        },
    ];
    if rng.chance(700) {
        opening.insert(
            rng.index(3),
            Op::Command {
                node: rng.index(2),
                command: Command::Prim,
            },
        );
    }
    for op in opening {
        world
            .apply(op)
            .map_err(|violation| fail(&world, "safety", violation.to_string()))?;
    }
    let safety_end = world.now().plus(options.safety);
    while world.now() < safety_end {
        let gap = faults::next_gap(&mut rng);
        world
            .run_for(gap)
            .map_err(|violation| fail(&world, "safety", violation.to_string()))?;
        let op = faults::next_op(&mut rng, &world);
        ops += 1;
        world
            .apply(op)
            .map_err(|violation| fail(&world, "safety", violation.to_string()))?;
    }

    // Liveness phase: no more faults.
    let converged_after = liveness_phase(&mut world, options.liveness_limit)
        .map_err(|message| fail(&world, "liveness", message))?;
    Ok(SeedReport {
        seed,
        handled: world.handled(),
        ops,
        converged_after,
        stats: world.stats().clone(),
    })
}

/// Ends every fault (network healed, frozen nodes resumed, crashed nodes restarted, links up,
/// scripts and adapters no longer failing), then lets an operator who only follows the
/// cluster's hints act on quiet periods (start a stopped module; `second`, `prim` or `stop`
/// where a status asks for it), until PRIM/SECOND ready holds for ten seconds in a row (with
/// `default_primary = NODE`, on that node), reached within `limit`. Returns the simulated time
/// it took to reach it, or what went wrong (including a broken invariant).
pub fn liveness_phase(world: &mut World, limit: Duration) -> Result<Duration, String> {
    let started = world.now();
    let heal = [
        Op::Heal,
        Op::Thaw(0),
        Op::Thaw(1),
        Op::Restart(0),
        Op::Restart(1),
        Op::Link { node: 0, up: true },
        Op::Link { node: 1, up: true },
        Op::ScriptFaults {
            node: 0,
            fail_per_mille: 0,
            hang_per_mille: 0,
        },
        Op::ScriptFaults {
            node: 1,
            fail_per_mille: 0,
            hang_per_mille: 0,
        },
    ];
    for op in heal {
        world.apply(op).map_err(|violation| violation.to_string())?;
    }
    world.set_adapter_timing(AdapterTiming {
        vip_fail_per_mille: 0,
        sync_fail_per_mille: 0,
        ..world.config().adapters
    });
    let deadline = started.plus(limit);
    let stable_for = Duration::from_secs(10);
    let mut last_change = world.now();
    let mut last_view = view(world);
    let mut converged_since: Option<tandem_core::Time> = None;
    loop {
        if converged(world) {
            let since = *converged_since.get_or_insert(world.now());
            if world.now().since(since) >= stable_for {
                if let DefaultPrimary::Node(preferred) = &world.config().module.default_primary {
                    let primary = (0..2).find(|&node| {
                        world
                            .module(node)
                            .is_some_and(|module| module.state == State::Prim)
                    });
                    if primary.is_some_and(|node| world.config().names[node] != *preferred) {
                        return Err(format!(
                            "default_primary {preferred} is not primary: {}",
                            describe(world)
                        ));
                    }
                }
                world
                    .check_converged_data()
                    .map_err(|violation| violation.to_string())?;
                return Ok(since.since(started));
            }
        } else {
            converged_since = None;
        }
        if world.now() >= deadline.plus(stable_for) {
            return Err(format!(
                "no PRIM/SECOND ready held for {stable_for:?} within {limit:?} of healing: {}",
                describe(world)
            ));
        }
        world
            .run_for(Duration::from_millis(250))
            .map_err(|violation| violation.to_string())?;
        let current = view(world);
        if current != last_view {
            last_view = current;
            last_change = world.now();
        } else if world.now().since(last_change) >= Duration::from_secs(3) {
            operator(world);
            last_change = world.now();
        }
    }
}

/// What the liveness loop watches for changes.
fn view(world: &World) -> Vec<Option<(State, bool, Option<String>)>> {
    (0..2)
        .map(|node| {
            world.status(node).and_then(|status| {
                status
                    .modules
                    .first()
                    .map(|module| (module.state, module.ready, module.running_step.clone()))
            })
        })
        .collect()
}

fn statuses(world: &World) -> Option<[NodeStatus; 2]> {
    Some([world.status(0)?, world.status(1)?])
}

/// PRIM ready on one node, SECOND ready on the other, nothing running, each sees the other.
pub fn converged(world: &World) -> bool {
    let Some(statuses) = statuses(world) else {
        return false;
    };
    let modules: Vec<_> = statuses
        .iter()
        .filter_map(|status| status.modules.first())
        .collect();
    if modules.len() != 2 || !statuses.iter().all(|status| status.peer_alive) {
        return false;
    }
    let settled = modules
        .iter()
        .all(|module| module.ready && module.running_step.is_none());
    let roles = [modules[0].state, modules[1].state];
    settled && (roles == [State::Prim, State::Second] || roles == [State::Second, State::Prim])
}

/// Both nodes in one line each, for failure messages.
pub fn describe(world: &World) -> String {
    let mut text = String::new();
    for node in 0..2 {
        let name = &world.config().names[node];
        match world.status(node).and_then(|status| {
            status
                .modules
                .into_iter()
                .next()
                .map(|m| (status.peer_alive, m))
        }) {
            None => text.push_str(&format!("\n    {name}: down")),
            Some((peer_alive, module)) => text.push_str(&format!(
                "\n    {name}: {} {} claim {} epoch {} primary_role {} peer_alive {peer_alive} \
                 running {:?} waiting {:?} held {:?} writable {} vip {}",
                module.state,
                if module.ready { "ready" } else { "transient" },
                module.claim.as_str(),
                module.epoch,
                module.primary_role,
                module.running_step,
                module.waiting_for,
                module.held,
                world.host(node).writable,
                world.host(node).vip,
            )),
        }
    }
    text
}

fn claim_rank(claim: Claim) -> u8 {
    match claim {
        Claim::Fresh => 0,
        Claim::Stale => 1,
        Claim::Shared => 2,
        Claim::Exclusive => 3,
    }
}

/// The operator of the liveness phase: acts only where the cluster is stuck, and only as its
/// status says (a stopped module is started; `second` or `prim` where the status asks for it).
fn operator(world: &mut World) {
    let Some(statuses) = statuses(world) else {
        return;
    };
    let modules: Vec<_> = statuses
        .iter()
        .filter_map(|status| status.modules.first().cloned())
        .collect();
    if modules.len() != 2 {
        return;
    }
    let mut acted = false;
    for (node, module) in modules.iter().enumerate() {
        if module.state == State::Stop && module.running_step.is_none() {
            world.command(node, Command::Start);
            acted = true;
        }
    }
    if acted {
        return;
    }
    for (node, module) in modules.iter().enumerate() {
        let asks_second = module.held.is_some()
            || module
                .waiting_for
                .as_deref()
                .is_some_and(|hint| hint.contains("`tandem second`"));
        if asks_second && module.state == State::Wait {
            let command = if modules[1 - node].primary_role {
                Command::Second
            } else {
                Command::Prim
            };
            world.command(node, command);
            return;
        }
    }
    // Both nodes forced: stop the one with the weaker claim (the second when equal); the stopped
    // module is started again at the next quiet period.
    let asks_stop: Vec<usize> = (0..2)
        .filter(|&node| {
            modules[node].state == State::Wait
                && modules[node]
                    .waiting_for
                    .as_deref()
                    .is_some_and(|hint| hint.contains("`tandem stop`"))
        })
        .collect();
    if let Some(&node) = asks_stop
        .iter()
        .min_by_key(|&&node| (claim_rank(modules[node].claim), 1 - node))
    {
        world.command(node, Command::Stop);
        return;
    }
    let candidates: Vec<usize> = (0..2)
        .filter(|&node| {
            modules[node].state == State::Wait
                && modules[node].running_step.is_none()
                && modules[node]
                    .waiting_for
                    .as_deref()
                    .is_some_and(|hint| hint.contains("`tandem prim`"))
        })
        .collect();
    if let Some(&node) = candidates
        .iter()
        .max_by_key(|&&node| (claim_rank(modules[node].claim), 1 - node))
    {
        world.command(node, Command::Prim);
    }
}
