//! Property tests: random histories of operator commands, time, message loss, delay,
//! duplication and reordering, script outcomes, interface links, crashes, restarts and freezes,
//! against two real cores.
//!
//! The world (`tandem_sim::World`) checks after *every* input a core handles the invariants
//! documented in `tandem_sim::invariants`:
//!
//! - (a) a node takes the primary role only with an up-to-date claim (`shared`/`exclusive`, the
//!   last claim persisted before its new epoch) or with a pending accepted `prim`, except the
//!   documented first-start policy (both nodes without history, `default_primary` names it);
//!   the new epoch is persisted (claim `exclusive`) before any `SetWritable(true)` of that role;
//! - (b) while the nodes are *connected* (a window without crash, restart or freeze in which,
//!   in each direction, some heartbeat network delivered every heartbeat within
//!   `timeout - pulse`, after a full round trip of heartbeats inside the window) they are never
//!   both writable, never ask for the VIP while the other holds it, and hold it together only
//!   right after a split brain heals, for a bounded time, one of them being fenced;
//! - (c) per incarnation, `start_prim`/`start_second` is never called again before its `stop_x`
//!   (graceful or `force`); a failed graceful stop is followed by the same stop with `force`; a
//!   module entering STOP has no unmatched start;
//! - (d) step identifiers are fresh, one step at a time per module, one reply per command,
//!   `poll_timeout() >= now` and it moves on after a `Tick`, and the core never panics.
//!
//! A second property lets any such history end, heals everything and checks that an operator
//! who follows the cluster's own hints reaches PRIM/SECOND ready in bounded time.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proptest::prelude::*;
use tandem_core::{Command, DefaultPrimary, Outcome};
use tandem_sim::scenario::{describe, liveness_phase};
use tandem_sim::{AdapterTiming, LinkConf, Op, ScriptTiming, World, WorldConfig};

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => Just(Command::Start),
        2 => Just(Command::Stop),
        1 => Just(Command::Restart),
        2 => Just(Command::Prim),
        2 => Just(Command::Second),
        2 => Just(Command::Swap),
        1 => Just(Command::ForceStop),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Ok),
        Just(Outcome::Failed("exit code 1".into())),
        Just(Outcome::TimedOut),
    ]
}

fn link() -> impl Strategy<Value = LinkConf> {
    prop_oneof![
        2 => Just(LinkConf::good()),
        2 => Just(LinkConf::down()),
        1 => (100u32..950).prop_map(|loss| LinkConf { loss_per_mille: loss, ..LinkConf::good() }),
        1 => (0u64..3500).prop_map(|max| LinkConf {
            delay_max: Duration::from_millis(max),
            ..LinkConf::good()
        }),
        1 => Just(LinkConf { dup_per_mille: 500, delay_max: Duration::from_millis(300), ..LinkConf::good() }),
    ]
}

fn millis(range: std::ops::Range<u64>) -> impl Strategy<Value = Duration> {
    range.prop_map(Duration::from_millis)
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0usize..2;
    prop_oneof![
        8 => (node.clone(), command()).prop_map(|(node, command)| Op::Command { node, command }),
        6 => millis(0..1000).prop_map(Op::Advance),
        3 => millis(1000..6000).prop_map(Op::Advance),
        1 => node.clone().prop_map(Op::Crash),
        2 => node.clone().prop_map(Op::Restart),
        1 => (node.clone(), millis(100..5000)).prop_map(|(node, duration)| Op::Freeze { node, duration }),
        1 => node.clone().prop_map(Op::Thaw),
        1 => (node.clone(), any::<bool>()).prop_map(|(node, up)| Op::Link { node, up }),
        2 => (node.clone(), 0usize..2, link()).prop_map(|(from, network, conf)| Op::SetLink { from, network, conf }),
        1 => (node.clone(), link()).prop_map(|(from, conf)| Op::SetChannel { from, conf }),
        1 => proptest::option::of(node.clone()).prop_map(|from| Op::Partition { from }),
        2 => Just(Op::Heal),
        2 => any::<usize>().prop_map(Op::DropInFlight),
        1 => any::<usize>().prop_map(Op::DuplicateInFlight),
        2 => any::<usize>().prop_map(Op::DeliverNow),
        3 => (node.clone(), outcome()).prop_map(|(node, outcome)| Op::FinishStep { node, outcome }),
        1 => (node, 0u32..400, 0u32..150).prop_map(|(node, fail_per_mille, hang_per_mille)| {
            Op::ScriptFaults { node, fail_per_mille, hang_per_mille }
        }),
    ]
}

/// The parts of the configuration that vary between cases.
#[derive(Clone, Debug)]
struct Setup {
    seed: u64,
    networks: usize,
    failover: bool,
    default_primary: DefaultPrimary,
    instant_per_mille: u32,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<u64>(),
        1usize..=2,
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop_oneof![
            Just(DefaultPrimary::None),
            Just(DefaultPrimary::Last),
            Just(DefaultPrimary::Node("node1".into())),
            Just(DefaultPrimary::Node("node2".into())),
        ],
        0u32..1000,
    )
        .prop_map(
            |(seed, networks, failover, default_primary, instant_per_mille)| Setup {
                seed,
                networks,
                failover,
                default_primary,
                instant_per_mille,
            },
        )
}

fn world(setup: &Setup) -> World {
    let mut config = WorldConfig::deterministic();
    config.seed = setup.seed;
    config.networks = setup.networks;
    config.link = LinkConf::good();
    config.module.failover = setup.failover;
    config.module.default_primary = setup.default_primary.clone();
    config.module.stop_timeout = Duration::from_secs(3);
    config.module.force_stop_timeout = Duration::from_secs(2);
    config.module.start_timeout = Duration::from_secs(3);
    config.scripts = ScriptTiming {
        instant_per_mille: setup.instant_per_mille,
        min: Duration::ZERO,
        max: Duration::from_millis(800),
        fail_per_mille: 0,
        hang_per_mille: 0,
    };
    config.adapters = AdapterTiming {
        vip_max: Duration::from_millis(50),
        vip_fail_per_mille: 20,
        sync_max: Duration::from_millis(1500),
        sync_fail_per_mille: 30,
    };
    config.trace.transcript = false;
    config.trace.ring = 60;
    World::new(config)
}

fn failure(world: &World, message: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!(
        "{message}\nlast events:\n{}",
        world.trace().tail(60).join("\n")
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every invariant holds after every input, whatever happens.
    #[test]
    fn invariants_hold_after_every_input(setup in setup(), ops in prop::collection::vec(op(), 1..160)) {
        let mut world = world(&setup);
        for op in ops {
            world.apply(op).map_err(|violation| failure(&world, violation))?;
        }
        world.run_for(Duration::from_secs(10)).map_err(|violation| failure(&world, violation))?;
    }

    /// Once the faults stop, an operator who follows the hints reaches PRIM/SECOND ready.
    #[test]
    fn any_history_converges_once_faults_stop(setup in setup(), ops in prop::collection::vec(op(), 1..60)) {
        let mut world = world(&setup);
        for op in ops {
            world.apply(op).map_err(|violation| failure(&world, violation))?;
        }
        // Begin as an operator would: start both modules (and `prim` if both wait for it).
        world.command(0, Command::Start);
        world.command(1, Command::Start);
        liveness_phase(&mut world, Duration::from_secs(120))
            .map_err(|message| failure(&world, format!("{message}{}", describe(&world))))?;
    }
}
