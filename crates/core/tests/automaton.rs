//! Every transition of the module automaton and the order of the user scripts (spec §3,
//! `safekit.md` §1.2–1.5 and §3.3), as transcripts.
//!
//! Each test drives two real cores through `tandem_sim::World` in its deterministic setting: one
//! heartbeat network with a fixed 1 ms delay, scripts and adapters that finish at once and
//! succeed unless a test says otherwise (`World::rule`). Everything the cores ask for is written
//! as a line (`node1 script start_prim WAIT ALONE start`, `node1 vip acquire`,
//! `node1 state ALONE ready`, `node1 writable on`, `node1 persist exclusive epoch 1 last_primary`,
//! log lines, operator commands with their replies, `--` for what the test does to the world),
//! and the test compares the exact sequence. The world also checks every invariant of
//! `tandem_sim::invariants` after each input, so each transcript is a safety check as well.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_core::{
    Claim, Command, DefaultPrimary, Input, ModuleId, ModuleSettings, Node, NodeSettings, Outcome,
    RequestId, Script, State, Time,
};
use tandem_sim::{LinkConf, Op, ScriptRule, World, WorldConfig};

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

fn world() -> World {
    World::new(WorldConfig::deterministic())
}

fn world_with(change: impl FnOnce(&mut WorldConfig)) -> World {
    let mut config = WorldConfig::deterministic();
    change(&mut config);
    World::new(config)
}

/// Lets `duration` pass; any broken invariant fails the test with the trace.
fn run(world: &mut World, duration: Duration) {
    if let Err(violation) = world.run_for(duration) {
        panic!("{violation}\n{}", world.trace().tail(60).join("\n"));
    }
}

/// Asserts the transcript since the last call, line by line.
#[track_caller]
fn expect(world: &mut World, expected: &str) {
    let actual = world.take_transcript();
    if std::env::var_os("TANDEM_BLESS").is_some() {
        println!("=== {}", std::panic::Location::caller());
        for line in &actual {
            println!("        {line}");
        }
        return;
    }
    let expected: Vec<&str> = expected
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    if actual != expected {
        let mut report = String::from("transcript differs; actual:\n");
        for line in &actual {
            report.push_str(&format!("        {line}\n"));
        }
        let first = actual.iter().zip(&expected).position(|(a, e)| a != e);
        report.push_str(&format!(
            "first difference at line {}: expected {:?}",
            first.unwrap_or(actual.len().min(expected.len())) + 1,
            first
                .map(|index| expected[index])
                .or(expected.get(actual.len()).copied())
        ));
        panic!("{report}");
    }
}

fn state(world: &World, node: usize) -> (State, bool) {
    let module = world.module(node).unwrap();
    (module.state, module.ready)
}

/// Both started, `prim` on node1: PRIM on node1, SECOND on node2, transcript cleared.
fn pair_with(change: impl FnOnce(&mut WorldConfig)) -> World {
    let mut world = world_with(change);
    world.command(0, Command::Prim);
    world.command(1, Command::Start);
    run(&mut world, secs(5));
    assert_eq!(state(&world, 0), (State::Prim, true));
    assert_eq!(state(&world, 1), (State::Second, true));
    world.take_transcript();
    world
}

fn pair() -> World {
    pair_with(|_| {})
}

// ----- start ----------------------------------------------------------------------------

#[test]
fn first_start_both_fresh_wait_then_prim_on_one() {
    let mut world = world();
    world.command(0, Command::Start);
    world.command(1, Command::Start);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command start: ok: starting
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node2 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: peer node1 found
        node2 info: waiting: neither node is known to have up-to-date data: run `tandem prim` on the node whose data to keep
        node1 info: peer node2 found
        node1 info: waiting: neither node is known to have up-to-date data: run `tandem prim` on the node whose data to keep
        "#,
    );
    assert_eq!(state(&world, 0), (State::Wait, true));
    assert_eq!(state(&world, 1), (State::Wait, true));
    world.command(0, Command::Prim);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command prim: ok: forcing this node to become primary; this node has no history: its data becomes the reference copy
        node1 info: waiting: asking the peer to agree that this node becomes primary
        node2 info: agreed that node1 takes the primary role
        node1 persist exclusive epoch 1 last_primary
        node1 state WAIT transient
        node1 script transition WAIT ALONE start
        node1 vip acquire
        node1 writable on
        node1 script start_prim WAIT ALONE start
        node1 state ALONE ready
        node1 transition WAIT -> ALONE: forced primary (`tandem prim`)
        node2 persist stale epoch 0
        node2 state WAIT transient
        node2 script transition WAIT SECOND start
        node2 persist stale epoch 0
        node2 state SECOND transient
        node2 script start_second WAIT SECOND start
        node2 sync
        node2 persist shared epoch 0
        node2 state SECOND ready
        node2 transition WAIT -> SECOND: the peer is primary
        node1 persist shared epoch 1 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 0
        "#,
    );
}

#[test]
fn alone_becomes_prim_when_the_secondary_is_ready() {
    let mut world = world();
    world.command(0, Command::Prim);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command prim: ok: forcing this node to become primary; this node has no history: its data becomes the reference copy
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node2 info: peer node1 found
        node1 info: peer node2 found
        node1 persist exclusive epoch 1 last_primary
        node1 state WAIT transient
        node1 script transition WAIT ALONE start
        node1 vip acquire
        node1 writable on
        node1 script start_prim WAIT ALONE start
        node1 state ALONE ready
        node1 transition WAIT -> ALONE: forced primary (`tandem prim`)
        node2 persist fresh epoch 0
        "#,
    );
    world.command(1, Command::Start);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node2 script prestart STOP WAIT start
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 persist stale epoch 0
        node2 state WAIT transient
        node2 script transition WAIT SECOND start
        node2 state SECOND transient
        node2 script start_second WAIT SECOND start
        node2 sync
        node2 persist shared epoch 0
        node2 state SECOND ready
        node2 transition WAIT -> SECOND: the peer is primary
        node1 persist shared epoch 1 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 0
        "#,
    );
}

#[test]
fn restarted_node_with_shared_claim_and_no_peer_waits() {
    let mut world = pair();
    world.crash(0);
    world.crash(1);
    world.restart(1);
    assert_eq!(world.host(1).records[0].claim, Claim::Shared);
    world.command(1, Command::Start);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        -- crash node1
        -- crash node2
        -- restart node2 (incarnation 2)
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node2 script prestart STOP WAIT start
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: waiting: node1 is absent and this node's data may not be up to date (claim shared): waiting for it; run `tandem prim` here to force this node primary
        "#,
    );
    assert_eq!(state(&world, 1), (State::Wait, true));
}

#[test]
fn restarted_node_with_exclusive_claim_and_no_peer_goes_alone_after_the_timeout() {
    let mut world = pair();
    world.crash(1);
    run(&mut world, secs(5));
    world.crash(0);
    world.take_transcript();
    world.restart(0);
    assert_eq!(world.host(0).records[0].claim, Claim::Exclusive);
    world.command(0, Command::Start);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        -- restart node1 (incarnation 2)
        node1 command start: ok: starting
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node1 persist exclusive epoch 2 last_primary
        node1 state WAIT transient
        node1 script transition WAIT ALONE start
        node1 vip acquire
        node1 writable on
        node1 script start_prim WAIT ALONE start
        node1 state ALONE ready
        node1 transition WAIT -> ALONE: this node has the only up-to-date data and the peer is absent
        "#,
    );
}

// ----- the peer comes and goes ----------------------------------------------------------

#[test]
fn prim_becomes_alone_when_the_secondary_stops() {
    let mut world = pair();
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node2 command stop: ok: stopping
        node2 state SECOND transient
        node2 persist stale epoch 0
        node2 script stop_second SECOND WAIT stop
        node2 script transition SECOND WAIT stop
        node2 script poststop WAIT STOP stop
        node2 script transition WAIT STOP stop
        node2 state STOP ready
        node2 transition SECOND -> STOP: stop requested
        node1 persist exclusive epoch 1 last_primary
        node1 state PRIM transient
        node1 script transition PRIM ALONE auto
        node1 state ALONE ready
        node1 transition PRIM -> ALONE: the secondary is gone
        node2 persist stale epoch 0
        "#,
    );
}

#[test]
fn prim_becomes_alone_when_the_secondary_is_lost() {
    let mut world = pair();
    world.crash(1);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- crash node2
        node1 persist exclusive epoch 1 last_primary
        node1 state PRIM transient
        node1 script transition PRIM ALONE auto
        node1 state ALONE ready
        node1 transition PRIM -> ALONE: the replication to the secondary is lost
        node1 warn: peer node2 lost: no heartbeat on any network for 2s
        "#,
    );
}

#[test]
fn second_takes_over_when_the_primary_is_lost() {
    let mut world = pair();
    world.crash(0);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- crash node1
        node2 warn: peer node1 lost: no heartbeat on any network for 2s
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE auto
        node2 warn: the peer is lost: failover
        node2 script transition SECOND ALONE auto
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE auto
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: failover: the peer is lost
        "#,
    );
    assert_eq!(state(&world, 1), (State::Alone, true));
}

#[test]
fn failover_off_secondary_waits_until_prim() {
    let mut world = pair_with(|config| config.module.failover = false);
    world.crash(0);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        -- crash node1
        node2 warn: peer node1 lost: no heartbeat on any network for 2s
        node2 state SECOND transient
        node2 script stop_second SECOND WAIT auto
        node2 script transition SECOND WAIT auto
        node2 state WAIT ready
        node2 transition SECOND -> WAIT: the peer is lost and failover is off
        node2 info: waiting: node1 is absent and this node's data may not be up to date (claim shared): waiting for it; run `tandem prim` here to force this node primary
        "#,
    );
    assert_eq!(state(&world, 1), (State::Wait, true));
    world.command(1, Command::Prim);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node2 command prim: ok: forcing this node to become primary
        node2 persist exclusive epoch 2 last_primary
        node2 state WAIT transient
        node2 script transition WAIT ALONE start
        node2 vip acquire
        node2 writable on
        node2 script start_prim WAIT ALONE start
        node2 state ALONE ready
        node2 transition WAIT -> ALONE: forced primary (`tandem prim`)
        "#,
    );
}

#[test]
fn graceful_stop_of_the_primary_hands_over_after_its_stop_prim() {
    let mut world = pair();
    world.rule(
        0,
        Script::StopPrim,
        ScriptRule::Take {
            after: secs(2),
            outcome: Outcome::Ok,
        },
    );
    world.rule(
        0,
        Script::Poststop,
        ScriptRule::Take {
            after: secs(3),
            outcome: Outcome::Ok,
        },
    );
    world.command(0, Command::Stop);
    run(&mut world, secs(10));
    // node2 asks for the role only once node1 left it (after stop_prim, the VIP release and the
    // fence), and takes over while node1 still runs poststop.
    expect(
        &mut world,
        r#"
        node1 command stop: ok: stopping
        node1 state PRIM transient
        node1 script stop_prim PRIM WAIT stop
        node1 stop_prim done: ok
        node1 vip release
        node1 writable off
        node1 persist shared epoch 1 last_primary
        node1 script transition PRIM WAIT stop
        node1 script poststop WAIT STOP stop
        node2 info: node1 left the primary role: asking to take over
        node1 info: agreed that node2 takes the primary role
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE auto
        node2 script transition SECOND ALONE auto
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE auto
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: the peer left the primary role
        node1 persist shared epoch 1 last_primary
        node1 poststop done: ok
        node1 script transition WAIT STOP stop
        node1 state STOP ready
        node1 transition PRIM -> STOP: stop requested
        "#,
    );
}

#[test]
fn stop_of_the_secondary() {
    let mut world = pair();
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node2 command stop: ok: stopping
        node2 state SECOND transient
        node2 persist stale epoch 0
        node2 script stop_second SECOND WAIT stop
        node2 script transition SECOND WAIT stop
        node2 script poststop WAIT STOP stop
        node2 script transition WAIT STOP stop
        node2 state STOP ready
        node2 transition SECOND -> STOP: stop requested
        node1 persist exclusive epoch 1 last_primary
        node1 state PRIM transient
        node1 script transition PRIM ALONE auto
        node1 state ALONE ready
        node1 transition PRIM -> ALONE: the secondary is gone
        node2 persist stale epoch 0
        "#,
    );
}

#[test]
fn wait_to_stop() {
    let mut world = world();
    world.command(0, Command::Start);
    run(&mut world, secs(5));
    world.take_transcript();
    world.command(0, Command::Stop);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command stop: ok: stopping
        node1 state WAIT transient
        node1 script poststop WAIT STOP stop
        node1 script transition WAIT STOP stop
        node1 state STOP ready
        node1 transition WAIT -> STOP: stop requested
        "#,
    );
}

// ----- operator actions -----------------------------------------------------------------

#[test]
fn restart_in_prim_and_in_second() {
    let mut world = pair();
    world.command(0, Command::Restart);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command restart: ok: restarting the application scripts
        node1 state PRIM transient
        node1 script stop_prim PRIM PRIM restart
        node1 script start_prim PRIM PRIM restart
        node1 state PRIM ready
        node1 transition PRIM -> PRIM: restart
        "#,
    );
    world.command(1, Command::Restart);
    run(&mut world, secs(5));
    // A scripts-only restart of the secondary keeps it in sync: the pair stays PRIM/SECOND.
    expect(
        &mut world,
        r#"
        node2 command restart: ok: restarting the application scripts
        node2 state SECOND transient
        node2 script stop_second SECOND SECOND restart
        node2 script start_second SECOND SECOND restart
        node2 state SECOND ready
        node2 transition SECOND -> SECOND: restart
        "#,
    );
}

#[test]
fn swap_from_the_primary() {
    let mut world = pair();
    world.command(0, Command::Swap);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command swap: ok: swapping roles
        node1 state PRIM transient
        node1 script stop_prim PRIM SECOND swap
        node1 vip release
        node1 writable off
        node1 persist shared epoch 1 last_primary
        node1 persist shared epoch 1
        node1 script transition PRIM SECOND swap
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE swap
        node2 script transition SECOND ALONE swap
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE swap
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: roles swapped: the peer handed over
        node1 state SECOND transient
        node1 script start_second PRIM SECOND swap
        node1 persist shared epoch 1
        node1 sync
        node1 persist shared epoch 1
        node1 state SECOND ready
        node1 transition PRIM -> SECOND: swap requested
        node2 persist shared epoch 2 last_primary
        node2 state ALONE transient
        node2 script transition ALONE PRIM auto
        node2 state PRIM ready
        node2 transition ALONE -> PRIM: the secondary is up to date
        node1 persist shared epoch 1
        "#,
    );
}

#[test]
fn swap_from_the_secondary() {
    let mut world = pair();
    world.command(1, Command::Swap);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node2 command swap: ok: asked the primary to swap roles
        node1 state PRIM transient
        node1 script stop_prim PRIM SECOND swap
        node1 vip release
        node1 writable off
        node1 persist shared epoch 1 last_primary
        node1 persist shared epoch 1
        node1 script transition PRIM SECOND swap
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE swap
        node2 script transition SECOND ALONE swap
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE swap
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: roles swapped: the peer handed over
        node1 state SECOND transient
        node1 script start_second PRIM SECOND swap
        node1 persist shared epoch 1
        node1 sync
        node1 persist shared epoch 1
        node1 state SECOND ready
        node1 transition PRIM -> SECOND: swap requested
        node2 persist shared epoch 2 last_primary
        node2 state ALONE transient
        node2 script transition ALONE PRIM auto
        node2 state PRIM ready
        node2 transition ALONE -> PRIM: the secondary is up to date
        node1 persist shared epoch 1
        "#,
    );
}

#[test]
fn stop_script_failure_and_timeout_call_it_again_with_force() {
    let mut world = pair();
    world.rule(
        0,
        Script::StopPrim,
        ScriptRule::Take {
            after: Duration::ZERO,
            outcome: Outcome::Failed("exit code 1".into()),
        },
    );
    world.rule(
        1,
        Script::StopSecond,
        ScriptRule::Take {
            after: secs(400),
            outcome: Outcome::Ok,
        },
    );
    world.command(1, Command::Stop);
    run(&mut world, secs(600));
    expect(
        &mut world,
        r#"
        node2 command stop: ok: stopping
        node2 state SECOND transient
        node2 persist stale epoch 0
        node2 script stop_second SECOND WAIT stop
        node2 stop_second done: timed out
        node2 warn: stop_second did not stop gracefully (timed out): calling it with force
        node2 script stop_second SECOND WAIT stop force
        node2 script transition SECOND WAIT stop
        node2 script poststop WAIT STOP stop
        node2 script transition WAIT STOP stop
        node2 state STOP ready
        node2 transition SECOND -> STOP: stop requested
        node1 persist exclusive epoch 1 last_primary
        node1 state PRIM transient
        node1 script transition PRIM ALONE auto
        node1 state ALONE ready
        node1 transition PRIM -> ALONE: the secondary is gone
        node2 persist stale epoch 0
        "#,
    );
    world.command(0, Command::Stop);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command stop: ok: stopping
        node1 state ALONE transient
        node1 script stop_prim ALONE WAIT stop
        node1 stop_prim done: failed (exit code 1)
        node1 warn: stop_prim did not stop gracefully (exit code 1): calling it with force
        node1 script stop_prim ALONE WAIT stop force
        node1 vip release
        node1 writable off
        node1 persist exclusive epoch 1 last_primary
        node1 script transition ALONE WAIT stop
        node1 script poststop WAIT STOP stop
        node1 script transition WAIT STOP stop
        node1 state STOP ready
        node1 transition ALONE -> STOP: stop requested
        "#,
    );
}

#[test]
fn start_prim_failure_stops_the_module_and_the_peer_takes_over() {
    let mut world = pair();
    world.rule(
        0,
        Script::StartPrim,
        ScriptRule::Take {
            after: Duration::ZERO,
            outcome: Outcome::Failed("exit code 3".into()),
        },
    );
    world.command(0, Command::Restart);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        node1 command restart: ok: restarting the application scripts
        node1 state PRIM transient
        node1 script stop_prim PRIM PRIM restart
        node1 script start_prim PRIM PRIM restart
        node1 start_prim done: failed (exit code 3)
        node1 error: start_prim failed (exit code 3): stopping the module
        node1 script stop_prim PRIM WAIT stop
        node1 vip release
        node1 writable off
        node1 persist shared epoch 1 last_primary
        node1 script transition PRIM WAIT stop
        node1 script poststop WAIT STOP stop
        node1 script transition WAIT STOP stop
        node1 state STOP ready
        node1 transition PRIM -> STOP: stop requested
        node2 info: node1 left the primary role: asking to take over
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE auto
        node2 warn: the peer stopped the module: failover
        node2 script transition SECOND ALONE auto
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE auto
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: failover: the peer stopped the module
        node1 info: agreed that node2 takes the primary role
        node1 persist shared epoch 1 last_primary
        "#,
    );
    assert_eq!(state(&world, 0), (State::Stop, true));
    assert_eq!(state(&world, 1), (State::Alone, true));
}

#[test]
fn forcestop_aborts_running_scripts_and_forces_the_stops() {
    let mut world = pair();
    world.rule(0, Script::StopPrim, ScriptRule::Hold);
    world.command(0, Command::Stop);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command stop: ok: stopping
        node1 state PRIM transient
        node1 script stop_prim PRIM WAIT stop
        "#,
    );
    world.command(0, Command::ForceStop);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 abort scripts
        node1 command forcestop: ok: stopping at once
        node1 script stop_prim PRIM WAIT stop force
        node1 stop_prim done: failed (killed (forcestop))
        node1 vip release
        node1 writable off
        node1 persist shared epoch 1 last_primary
        node1 script transition PRIM WAIT stop
        node1 script poststop WAIT STOP stop
        node1 script transition WAIT STOP stop
        node1 state STOP ready
        node1 transition PRIM -> STOP: forcestop
        node2 info: node1 left the primary role: asking to take over
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE auto
        node2 warn: the peer stopped the module: failover
        node2 script transition SECOND ALONE auto
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE auto
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: failover: the peer stopped the module
        node1 info: agreed that node2 takes the primary role
        node1 persist shared epoch 1 last_primary
        "#,
    );
}

#[test]
fn refused_commands_say_why() {
    let mut world = pair();
    world.command(1, Command::Prim);
    world.command(0, Command::Start);
    world.command(0, Command::Second);
    world.command(1, Command::Second);
    expect(
        &mut world,
        r#"
        node2 command prim: refused: the peer node1 is primary: use `tandem swap`, or stop it first
        node1 command start: refused: already started (state PRIM)
        node1 command second: refused: this node is primary: use `tandem swap`
        node2 command second: refused: this node is already secondary
        "#,
    );
    world.rule(
        1,
        Script::StopSecond,
        ScriptRule::Take {
            after: secs(1),
            outcome: Outcome::Ok,
        },
    );
    world.command(1, Command::Restart);
    run(&mut world, Duration::from_millis(10));
    world.command(1, Command::Swap);
    world.command(0, Command::Swap);
    world.command(1, Command::Restart);
    expect(
        &mut world,
        r#"
        node2 command restart: ok: restarting the application scripts
        node2 state SECOND transient
        node2 script stop_second SECOND SECOND restart
        node2 command swap: refused: swap needs PRIM and SECOND, both ready (local SECOND transient, peer PRIM)
        node1 command swap: refused: swap needs PRIM and SECOND, both ready (local PRIM, peer SECOND transient)
        node2 command restart: refused: cannot restart while SECOND is transient
        "#,
    );
    run(&mut world, secs(5));
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    world.take_transcript();
    world.command(1, Command::Second);
    world.command(0, Command::Swap);
    world.command(1, Command::Stop);
    world.command(1, Command::ForceStop);
    world.command(1, Command::Restart);
    expect(
        &mut world,
        r#"
        node2 command second: ok: starting as secondary
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node1 command swap: refused: swap needs PRIM and SECOND, both ready (local ALONE, peer unreachable)
        node2 command stop: ok: stopping
        node2 abort scripts
        node2 command forcestop: ok: stopping at once
        node2 script poststop WAIT STOP stop
        node2 command restart: refused: cannot restart while WAIT is transient
        "#,
    );
}

// ----- policies -------------------------------------------------------------------------

#[test]
fn default_primary_node_swaps_back_when_it_returns() {
    let mut world = pair_with(|config| {
        config.module.default_primary = DefaultPrimary::Node("node1".into());
    });
    world.crash(0);
    run(&mut world, secs(5));
    world.take_transcript();
    assert_eq!(state(&world, 1), (State::Alone, true));
    world.restart(0);
    world.command(0, Command::Start);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        -- restart node1 (incarnation 2)
        node1 command start: ok: starting
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node2 info: peer node1 restarted
        node2 info: peer node1 found
        node1 info: peer node2 found
        node1 persist stale epoch 1 last_primary
        node1 state WAIT transient
        node1 script transition WAIT SECOND start
        node1 persist stale epoch 1 last_primary
        node1 state SECOND transient
        node1 script start_second WAIT SECOND start
        node1 sync
        node1 persist shared epoch 1
        node1 state SECOND ready
        node1 transition WAIT -> SECOND: the peer is primary
        node2 persist shared epoch 2 last_primary
        node2 state ALONE transient
        node2 script transition ALONE PRIM auto
        node2 state PRIM ready
        node2 transition ALONE -> PRIM: the secondary is up to date
        node2 state PRIM transient
        node2 script stop_prim PRIM SECOND swap
        node2 info: node1 is the default primary and is up to date: swapping roles
        node2 vip release
        node2 writable off
        node2 persist shared epoch 2 last_primary
        node2 persist shared epoch 2
        node2 script transition PRIM SECOND swap
        node1 persist shared epoch 1
        node1 info: node2 left the primary role: asking to take over
        node1 persist exclusive epoch 3 last_primary
        node1 state SECOND transient
        node1 script stop_second SECOND ALONE auto
        node1 script transition SECOND ALONE auto
        node1 vip acquire
        node1 writable on
        node1 script start_prim SECOND ALONE auto
        node1 state ALONE ready
        node1 transition SECOND -> ALONE: the peer left the primary role
        node2 state SECOND transient
        node2 script start_second PRIM SECOND swap
        node2 persist shared epoch 2
        node2 sync
        node2 persist shared epoch 2
        node2 state SECOND ready
        node2 transition PRIM -> SECOND: default_primary
        node1 persist shared epoch 3 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 2
        "#,
    );
}

#[test]
fn default_primary_last_at_a_simultaneous_start() {
    let mut world = pair_with(|config| config.module.default_primary = DefaultPrimary::Last);
    // node2 becomes the last primary, then both lose power in PRIM/SECOND: same data (shared).
    world.command(0, Command::Swap);
    run(&mut world, secs(5));
    world.crash(0);
    world.crash(1);
    world.restart(0);
    world.restart(1);
    assert_eq!(world.host(0).records[0].claim, Claim::Shared);
    assert_eq!(world.host(1).records[0].claim, Claim::Shared);
    world.take_transcript();
    world.command(0, Command::Start);
    world.command(1, Command::Start);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        node1 command start: ok: starting
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node2 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: peer node1 found
        node2 info: waiting: asking the peer to agree that this node becomes primary
        node1 info: peer node2 found
        node1 info: waiting: waiting for node2 to become primary
        node1 info: agreed that node2 takes the primary role
        node2 persist exclusive epoch 3 last_primary
        node2 state WAIT transient
        node2 script transition WAIT ALONE start
        node2 vip acquire
        node2 writable on
        node2 script start_prim WAIT ALONE start
        node2 state ALONE ready
        node2 transition WAIT -> ALONE: the peer agreed this node is primary
        node1 persist stale epoch 1
        node1 state WAIT transient
        node1 script transition WAIT SECOND start
        node1 persist stale epoch 1
        node1 state SECOND transient
        node1 script start_second WAIT SECOND start
        node1 sync
        node1 persist shared epoch 1
        node1 state SECOND ready
        node1 transition WAIT -> SECOND: the peer is primary
        node2 persist shared epoch 3 last_primary
        node2 state ALONE transient
        node2 script transition ALONE PRIM auto
        node2 state PRIM ready
        node2 transition ALONE -> PRIM: the secondary is up to date
        node1 persist shared epoch 1
        "#,
    );
    assert_eq!(state(&world, 1), (State::Prim, true));
}

// ----- failures of the network and of the interface -------------------------------------

#[test]
fn split_brain_heal_one_steps_down_and_is_held_until_second() {
    let mut world = pair();
    world.partition(None);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- partition node1 -> node2
        -- partition node2 -> node1
        node1 persist exclusive epoch 1 last_primary
        node1 state PRIM transient
        node1 script transition PRIM ALONE auto
        node1 state ALONE ready
        node1 transition PRIM -> ALONE: the replication to the secondary is lost
        node1 warn: peer node2 lost: no heartbeat on any network for 2s
        node2 warn: peer node1 lost: no heartbeat on any network for 2s
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE auto
        node2 warn: the peer is lost: failover
        node2 script transition SECOND ALONE auto
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE auto
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: failover: the peer is lost
        "#,
    );
    world.heal();
    run(&mut world, secs(5));
    // The later promotion (node2, epoch 2) steps down: VIP first, and it stays down.
    expect(
        &mut world,
        r#"
        -- heal the network
        node1 info: peer node2 found
        node1 persist exclusive epoch 1 last_primary
        node2 info: peer node1 found
        node2 writable off
        node2 state ALONE transient
        node2 vip release
        node2 persist exclusive epoch 2 last_primary
        node2 error: split brain: node1 is primary too (epoch 1 against 2); this node steps down and keeps its data apart: it waits for the operator (`tandem second` to resynchronise from node1, discarding this node's divergent writes)
        node2 script stop_prim ALONE WAIT auto
        node2 persist exclusive epoch 2 last_primary
        node2 script transition ALONE WAIT auto
        node2 state WAIT ready
        node2 transition ALONE -> WAIT: split brain: stepping down
        node2 info: waiting: split brain with node1: waiting for the operator
        "#,
    );
    world.command(1, Command::Second);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node2 command second: ok: starting as secondary
        node2 persist stale epoch 2 last_primary
        node2 state WAIT transient
        node2 script transition WAIT SECOND start
        node2 persist stale epoch 2 last_primary
        node2 state SECOND transient
        node2 script start_second WAIT SECOND start
        node2 sync
        node2 persist shared epoch 2
        node2 state SECOND ready
        node2 transition WAIT -> SECOND: the peer is primary
        node1 persist exclusive epoch 1 last_primary
        node1 persist shared epoch 1 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 2
        "#,
    );
}

#[test]
fn link_down_on_the_primary_fences_and_the_secondary_takes_over() {
    let mut world = pair_with(|config| config.adapters.vip_max = Duration::from_millis(100));
    world.set_link_state(0, false);
    run(&mut world, secs(5));
    // node1 grants the role only once its VIP is gone.
    expect(
        &mut world,
        r#"
        -- node1 interface link down
        node1 warn: VIP interface link is down
        node1 writable off
        node1 state PRIM transient
        node1 vip release
        node1 error: VIP interface is down: leaving the primary role so that the peer takes over
        node2 info: node1 left the primary role: asking to take over
        node1 vip release done: ok
        node1 script stop_prim PRIM WAIT auto
        node1 info: agreed that node2 takes the primary role
        node1 persist shared epoch 1 last_primary
        node1 script transition PRIM WAIT auto
        node1 state WAIT ready
        node1 transition PRIM -> WAIT: interface down
        node1 info: waiting: the VIP interface is down
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE auto
        node2 script transition SECOND ALONE auto
        node2 vip acquire
        node1 persist shared epoch 1 last_primary
        node2 vip acquire done: ok
        node2 writable on
        node2 script start_prim SECOND ALONE auto
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: the peer left the primary role
        "#,
    );
}

// ----- regressions: core bugs found by the simulation -----------------------------------

/// A secondary whose synchronisation ends after its primary is gone is not up to date: it must
/// not take over (it did, with a claim `shared` and `synced_epoch` 0, when the sync was the
/// very first one of a node without data).
#[test]
fn sync_interrupted_by_the_loss_of_the_primary_does_not_take_over() {
    let mut world = world();
    world.command(0, Command::Prim);
    run(&mut world, secs(5));
    world.sync_rule(1, ScriptRule::Hold);
    world.command(1, Command::Start);
    run(&mut world, secs(5));
    world.take_transcript();
    world.crash(0);
    run(&mut world, secs(5));
    assert!(world.finish_step(1, Outcome::Ok));
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- crash node1
        node2 warn: peer node1 lost: no heartbeat on any network for 2s
        node2 sync done: ok
        node2 warn: the primary left or changed during the synchronisation: this node's data is not known to be up to date
        node2 script stop_second SECOND WAIT auto
        node2 script transition SECOND WAIT auto
        node2 state WAIT ready
        node2 transition SECOND -> WAIT: the peer is lost before this node was up to date
        node2 info: waiting: node1 is absent and this node's data may not be up to date (claim stale): waiting for it; run `tandem prim` here to force this node primary
        "#,
    );
    assert_eq!(state(&world, 1), (State::Wait, true));
    assert_eq!(world.module(1).unwrap().claim, Claim::Stale);
}

/// A node fenced (split brain) while it is taking over abandons the promotion: no VIP, no
/// start_prim on a node that does not hold the role.
#[test]
fn fenced_during_a_takeover_does_not_acquire_the_vip_nor_start_the_app() {
    let mut world = pair();
    world.partition(None);
    world.rule(1, Script::Transition, ScriptRule::Hold);
    run(&mut world, secs(5));
    world.take_transcript();
    world.heal();
    run(&mut world, secs(1));
    assert!(world.finish_script(1, Script::Transition, Outcome::Ok));
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- heal the network
        node1 info: peer node2 found
        node1 persist exclusive epoch 1 last_primary
        node2 info: peer node1 found
        node2 writable off
        node2 persist exclusive epoch 2 last_primary
        node2 error: split brain: node1 is primary too (epoch 1 against 2); this node steps down and keeps its data apart: it waits for the operator (`tandem second` to resynchronise from node1, discarding this node's divergent writes)
        node2 transition done: ok
        node2 persist stale epoch 2 last_primary
        node2 script transition SECOND WAIT auto
        node2 state WAIT ready
        node2 transition SECOND -> WAIT: split brain: stepping down
        node2 info: waiting: split brain with node1: waiting for the operator
        node1 persist exclusive epoch 1 last_primary
        node1 persist exclusive epoch 1 last_primary
        node1 info: the replication to the secondary is lost: new data generation
        node2 persist stale epoch 2 last_primary
        "#,
    );
}

/// Two modules started at the same instant while both daemons run (one `start` with exclusive
/// data, one `prim`) used to both commit alone, each on the other's stale STOP.
#[test]
fn simultaneous_start_and_prim_do_not_both_take_the_role() {
    let mut world = pair();
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    world.command(0, Command::Stop);
    run(&mut world, secs(5));
    world.take_transcript();
    world.command(0, Command::Start);
    world.command(1, Command::Prim);
    run(&mut world, secs(10));
    // The forced node has older data than a peer that asks: it yields, with a warning.
    expect(
        &mut world,
        r#"
        node1 command start: ok: starting
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node2 command prim: ok: forcing this node to become primary; this node's data is stale: writes the peer acknowledged and this node lacks will be lost at the peer's next resynchronisation
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node2 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: waiting: asking the peer to agree that this node becomes primary
        node1 info: waiting: asking the peer to agree that this node becomes primary
        node2 warn: `tandem prim` abandoned: node1 asks to become primary and its data is newer (exclusive against stale); stop it first to force this node
        node2 info: waiting: waiting for node1 to become primary
        node2 info: agreed that node1 takes the primary role
        node1 persist exclusive epoch 2 last_primary
        node1 state WAIT transient
        node1 script transition WAIT ALONE start
        node1 vip acquire
        node1 writable on
        node1 script start_prim WAIT ALONE start
        node1 state ALONE ready
        node1 transition WAIT -> ALONE: the peer agreed this node is primary
        node2 persist stale epoch 0
        node2 state WAIT transient
        node2 script transition WAIT SECOND start
        node2 persist stale epoch 0
        node2 state SECOND transient
        node2 script start_second WAIT SECOND start
        node2 sync
        node2 persist shared epoch 0
        node2 state SECOND ready
        node2 transition WAIT -> SECOND: the peer is primary
        node1 persist shared epoch 2 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 0
        "#,
    );
}

/// A `prim` given while the module still runs its start scripts is not overridden by the
/// peer's default_primary (the forced node used to grant the role to the peer).
#[test]
fn prim_during_the_start_scripts_wins_over_default_primary() {
    let mut world = world_with(|config| {
        config.module.default_primary = DefaultPrimary::Node("node2".into());
    });
    world.rule(
        0,
        Script::Prestart,
        ScriptRule::Take {
            after: secs(3),
            outcome: Outcome::Ok,
        },
    );
    world.command(0, Command::Prim);
    world.command(1, Command::Start);
    run(&mut world, secs(10));
    // node1 becomes primary; then, node2 being the default primary and up to date, the roles
    // are swapped automatically (the policy, not a forced start, decides that second move).
    expect(
        &mut world,
        r#"
        node1 command prim: ok: forcing this node to become primary; this node has no history: its data becomes the reference copy
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node2 script prestart STOP WAIT start
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: peer node1 found
        node2 info: waiting: asking the peer to agree that this node becomes primary
        node1 info: peer node2 found
        node1 prestart done: ok
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: node2 asks to become primary too (`tandem prim` on both nodes?): run `tandem stop` on the node that must not be primary
        node2 info: agreed that node1 takes the primary role
        node1 persist exclusive epoch 1 last_primary
        node1 state WAIT transient
        node1 script transition WAIT ALONE start
        node1 vip acquire
        node1 writable on
        node1 script start_prim WAIT ALONE start
        node1 state ALONE ready
        node1 transition WAIT -> ALONE: forced primary (`tandem prim`)
        node2 persist stale epoch 0
        node2 state WAIT transient
        node2 script transition WAIT SECOND start
        node2 persist stale epoch 0
        node2 state SECOND transient
        node2 script start_second WAIT SECOND start
        node2 sync
        node2 persist shared epoch 0
        node2 state SECOND ready
        node2 transition WAIT -> SECOND: the peer is primary
        node1 persist shared epoch 1 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node1 state PRIM transient
        node1 script stop_prim PRIM SECOND swap
        node1 info: node2 is the default primary and is up to date: swapping roles
        node1 vip release
        node1 writable off
        node1 persist shared epoch 1 last_primary
        node1 persist shared epoch 1
        node1 script transition PRIM SECOND swap
        node2 persist shared epoch 0
        node2 persist exclusive epoch 2 last_primary
        node2 state SECOND transient
        node2 script stop_second SECOND ALONE swap
        node2 script transition SECOND ALONE swap
        node2 vip acquire
        node2 writable on
        node2 script start_prim SECOND ALONE swap
        node2 state ALONE ready
        node2 transition SECOND -> ALONE: roles swapped: the peer handed over
        node1 state SECOND transient
        node1 script start_second PRIM SECOND swap
        node1 persist shared epoch 1
        node1 sync
        node1 persist shared epoch 1
        node1 state SECOND ready
        node1 transition PRIM -> SECOND: default_primary
        node2 persist shared epoch 2 last_primary
        node2 state ALONE transient
        node2 script transition ALONE PRIM auto
        node2 state PRIM ready
        node2 transition ALONE -> PRIM: the secondary is up to date
        node1 persist shared epoch 1
        "#,
    );
    assert_eq!(state(&world, 0), (State::Second, true));
    assert_eq!(state(&world, 1), (State::Prim, true));
}

/// `prim` on both nodes: neither grants; the status says what to do instead of waiting
/// silently.
#[test]
fn prim_on_both_nodes_asks_the_operator_to_stop_one() {
    let mut world = world();
    world.command(0, Command::Prim);
    world.command(1, Command::Prim);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        node1 command prim: ok: forcing this node to become primary; this node has no history: its data becomes the reference copy
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node2 command prim: ok: forcing this node to become primary; this node has no history: its data becomes the reference copy
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node2 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: peer node1 found
        node2 info: waiting: asking the peer to agree that this node becomes primary
        node1 info: peer node2 found
        node1 info: waiting: asking the peer to agree that this node becomes primary
        node1 info: waiting: node2 asks to become primary too (`tandem prim` on both nodes?): run `tandem stop` on the node that must not be primary
        node2 info: waiting: node1 asks to become primary too (`tandem prim` on both nodes?): run `tandem stop` on the node that must not be primary
        "#,
    );
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    world.take_transcript();
    assert_eq!(state(&world, 0), (State::Alone, true));
}

/// A `second` accepted while the module was already becoming secondary must not linger: after
/// a failover and a step-down, the module decides afresh (it used to wait forever for "a
/// primary to synchronise from").
#[test]
fn forced_goals_are_used_up_once_the_role_is_reached() {
    let mut world = world();
    world.command(0, Command::Prim);
    run(&mut world, secs(5));
    world.rule(
        1,
        Script::Prestart,
        ScriptRule::Take {
            after: secs(1),
            outcome: Outcome::Ok,
        },
    );
    world.command(1, Command::Start);
    run(&mut world, Duration::from_millis(500));
    world.command(1, Command::Second);
    run(&mut world, secs(5));
    assert_eq!(state(&world, 1), (State::Second, true));
    world.crash(0);
    run(&mut world, secs(5));
    world.set_link_state(1, false);
    run(&mut world, secs(5));
    world.take_transcript();
    world.set_link_state(1, true);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- node2 interface link up
        node2 info: VIP interface link is up
        node2 persist exclusive epoch 3 last_primary
        node2 state WAIT transient
        node2 script transition WAIT ALONE start
        node2 vip acquire
        node2 writable on
        node2 script start_prim WAIT ALONE start
        node2 state ALONE ready
        node2 transition WAIT -> ALONE: this node has the only up-to-date data and the peer is absent
        "#,
    );
    assert_eq!(state(&world, 1), (State::Alone, true));
}

/// A node frozen (SIGSTOP) after the peer granted it the role, while the peer declared it lost,
/// revoked the grant and was forced primary, used to take the role on resuming, from the first
/// old heartbeat of its backlog: a node without data over a peer with writes.
#[test]
fn a_paused_node_does_not_use_a_grant_revoked_meanwhile() {
    let mut world = world_with(|config| {
        config.module.default_primary = DefaultPrimary::Node("node1".into());
    });
    world.command(0, Command::Start);
    world.command(1, Command::Start);
    run(&mut world, Duration::from_millis(1500));
    assert_eq!(
        world.module(1).unwrap().grant_to,
        Some(1),
        "node2 granted node1"
    );
    world.freeze(0, secs(5));
    run(&mut world, secs(2));
    world.command(1, Command::Prim);
    run(&mut world, secs(6));
    // node1 becomes the secondary of node2 first; only then does the policy (node1 is the
    // default primary) hand the role back, through a regular swap.
    expect(
        &mut world,
        r#"
        node1 command start: ok: starting
        node1 state WAIT transient
        node1 script transition STOP WAIT start
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node1 script prestart STOP WAIT start
        node2 script prestart STOP WAIT start
        node1 state WAIT ready
        node1 transition STOP -> WAIT: start
        node1 info: waiting: looking for node2
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: peer node1 found
        node2 info: waiting: waiting for node1 to become primary
        node1 info: peer node2 found
        node1 info: waiting: asking the peer to agree that this node becomes primary
        node2 info: agreed that node1 takes the primary role
        -- freeze node1 for 5s
        node2 warn: peer node1 lost: no heartbeat on any network for 2s
        node2 info: waiting: node1 is absent and this node's data may not be up to date (claim fresh): waiting for it; run `tandem prim` here to force this node primary
        node2 command prim: ok: forcing this node to become primary; this node has no history: its data becomes the reference copy
        node2 persist exclusive epoch 1 last_primary
        node2 state WAIT transient
        node2 script transition WAIT ALONE start
        node2 vip acquire
        node2 writable on
        node2 script start_prim WAIT ALONE start
        node2 state ALONE ready
        node2 transition WAIT -> ALONE: forced primary (`tandem prim`)
        -- node1 resumes with 42 inputs waiting
        node1 warn: no input for 5.247s (paused?): the peer's grants are not used for 2s
        node1 persist stale epoch 0
        node1 state WAIT transient
        node1 script transition WAIT SECOND start
        node1 persist stale epoch 0
        node1 state SECOND transient
        node1 script start_second WAIT SECOND start
        node1 sync
        node1 persist shared epoch 0
        node1 state SECOND ready
        node1 transition WAIT -> SECOND: the peer is primary
        node2 info: peer node1 found
        node2 persist shared epoch 1 last_primary
        node2 state ALONE transient
        node2 script transition ALONE PRIM auto
        node2 state PRIM ready
        node2 transition ALONE -> PRIM: the secondary is up to date
        node2 state PRIM transient
        node2 script stop_prim PRIM SECOND swap
        node2 info: node1 is the default primary and is up to date: swapping roles
        node2 vip release
        node2 writable off
        node2 persist shared epoch 1 last_primary
        node2 persist shared epoch 1
        node2 script transition PRIM SECOND swap
        node1 persist shared epoch 0
        node1 info: node2 left the primary role: asking to take over
        node1 persist exclusive epoch 2 last_primary
        node1 state SECOND transient
        node1 script stop_second SECOND ALONE auto
        node1 script transition SECOND ALONE auto
        node1 vip acquire
        node1 writable on
        node1 script start_prim SECOND ALONE auto
        node1 state ALONE ready
        node1 transition SECOND -> ALONE: the peer left the primary role
        node2 state SECOND transient
        node2 script start_second PRIM SECOND swap
        node2 persist shared epoch 1
        node2 sync
        node2 persist shared epoch 1
        node2 state SECOND ready
        node2 transition PRIM -> SECOND: default_primary
        node1 persist shared epoch 2 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 1
        "#,
    );
    assert_eq!(state(&world, 0), (State::Prim, true));
    assert_eq!(state(&world, 1), (State::Second, true));
}

/// A module waiting in WAIT after the start-up look used to make `poll_timeout()` return `now`
/// forever: a driver sleeping until then spins.
#[test]
fn an_idle_waiting_module_does_not_make_the_driver_spin() {
    let settings = NodeSettings {
        local: "node1".into(),
        peer: "node2".into(),
        networks: 1,
        pulse: Duration::from_millis(250),
        timeout: secs(2),
        modules: vec![ModuleSettings::new("demo")],
    };
    let mut node = Node::new(settings, vec![], 1, Time::ZERO);
    let mut now = Time::ZERO;
    let mut pending = Vec::new();
    let command = Input::Command {
        module: ModuleId(0),
        command: Command::Start,
        request: RequestId(1),
    };
    pending.extend(node.handle(now, command));
    // Carry out the start scripts at once, then let time pass well beyond the start-up look.
    for _ in 0..200 {
        let done: Vec<_> = pending
            .drain(..)
            .filter_map(|effect| match effect {
                tandem_core::Effect::RunScript { module, step, .. } => Some(Input::StepDone {
                    module,
                    step,
                    outcome: Outcome::Ok,
                }),
                _ => None,
            })
            .collect();
        for input in done {
            pending.extend(node.handle(now, input));
        }
        let due = node.poll_timeout().unwrap();
        assert!(due > now, "poll_timeout {due:?} does not move past {now:?}");
        now = due;
        pending.extend(node.handle(now, Input::Tick));
    }
    assert_eq!(node.status().modules[0].state, State::Wait);
    assert!(now > Time::ZERO.plus(secs(10)));
}

#[test]
fn a_secondary_that_saw_a_newer_generation_does_not_take_over() {
    // node2 restarts its scripts slowly; meanwhile node1 stops hearing it, goes ALONE (a new data
    // generation that node2 never synchronised) and is then stopped. node2 must not serve its
    // older data: it waits, stale.
    let mut world = pair();
    world.rule(
        1,
        Script::StartSecond,
        ScriptRule::Take {
            after: secs(8),
            outcome: Outcome::Ok,
        },
    );
    world.command(1, Command::Restart);
    run(&mut world, secs(1));
    world.partition(Some(1));
    run(&mut world, secs(4));
    assert_eq!(state(&world, 0), (State::Alone, true));
    world.heal();
    run(&mut world, secs(1));
    world.command(0, Command::Stop);
    run(&mut world, secs(10));
    let _ = world.take_transcript();
    assert_eq!(state(&world, 0).0, State::Stop);
    let node2 = world.module(1).unwrap();
    assert_eq!(
        node2.state,
        State::Wait,
        "node2 must not take over on older data"
    );
    assert_eq!(node2.claim, Claim::Stale);
    assert!(!node2.primary_role);
}

#[test]
fn restart_in_alone() {
    let mut world = pair();
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    let _ = world.take_transcript();
    assert_eq!(state(&world, 0), (State::Alone, true));
    world.command(0, Command::Restart);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node1 command restart: ok: restarting the application scripts
        node1 state ALONE transient
        node1 script stop_prim ALONE ALONE restart
        node1 script start_prim ALONE ALONE restart
        node1 state ALONE ready
        node1 transition ALONE -> ALONE: restart
        "#,
    );
}

#[test]
fn a_swap_abandoned_because_the_secondary_stops_ends_with_the_old_primary_alone() {
    let mut world = pair();
    world.rule(0, Script::StopPrim, ScriptRule::Hold);
    world.command(0, Command::Swap);
    run(&mut world, secs(1));
    world.command(1, Command::Stop);
    run(&mut world, secs(1));
    assert!(world.finish_script(0, Script::StopPrim, Outcome::Ok));
    run(&mut world, secs(8));
    expect(
        &mut world,
        r#"
        node1 command swap: ok: swapping roles
        node1 state PRIM transient
        node1 script stop_prim PRIM SECOND swap
        node2 command stop: ok: stopping
        node2 state SECOND transient
        node2 persist stale epoch 0
        node2 script stop_second SECOND WAIT stop
        node2 script transition SECOND WAIT stop
        node2 script poststop WAIT STOP stop
        node2 script transition WAIT STOP stop
        node2 state STOP ready
        node2 transition SECOND -> STOP: stop requested
        node1 stop_prim done: ok
        node1 vip release
        node1 writable off
        node1 persist shared epoch 1 last_primary
        node1 script transition PRIM SECOND swap
        node1 warn: the peer disappeared during the swap
        node1 state WAIT ready
        node1 warn: swap abandoned: the peer could not take the primary role
        node1 transition PRIM -> WAIT: swap abandoned: the peer could not take the primary role
        node1 persist exclusive epoch 2 last_primary
        node1 state WAIT transient
        node1 script transition WAIT ALONE start
        node1 vip acquire
        node1 writable on
        node1 script start_prim WAIT ALONE start
        node1 state ALONE ready
        node1 transition WAIT -> ALONE: the peer's module is stopped and holds no data this node lacks
        node2 persist stale epoch 0
        "#,
    );
    assert_eq!(state(&world, 0), (State::Alone, true));
    assert_eq!(state(&world, 1).0, State::Stop);
}

#[test]
fn after_a_split_brain_a_node_does_not_start_alone_over_a_peer_that_served_later() {
    // A partition makes both nodes primary; node1 then crashes; after the heal node2 stops its
    // module. node1 restarts with an exclusive claim, but node2 (reachable, module stopped)
    // served after it: node1 must wait for the operator instead of serving and orphaning node2's
    // writes.
    let mut world = pair();
    world.partition(None);
    run(&mut world, secs(6));
    assert_eq!(state(&world, 0).0, State::Alone);
    assert_eq!(state(&world, 1).0, State::Alone);
    world.crash(0);
    world.heal();
    world.command(1, Command::Stop);
    run(&mut world, secs(6));
    assert_eq!(state(&world, 1).0, State::Stop);
    world.restart(0);
    world.command(0, Command::Start);
    run(&mut world, secs(10));
    let _ = world.take_transcript();
    let node1 = world.status(0).unwrap();
    assert_eq!(node1.modules[0].state, State::Wait, "node1 must not serve");
    let waiting = node1.modules[0].waiting_for.clone().unwrap_or_default();
    assert!(
        waiting.contains("served alone after this node did"),
        "{waiting}"
    );
}

#[test]
fn a_secondary_that_never_saw_its_primary_in_prim_does_not_take_over_and_gives_its_data_up() {
    // node2 finishes its synchronisation while node1 is ALONE, but node1 never hears it (one-way
    // partition) and stays ALONE, acknowledging writes alone that replication may not carry to
    // node2. When node1 is lost, node2 must not fail over on a copy it cannot trust, and its
    // claim must no longer say `shared` (which would prefer it later to node1's writes).
    let mut world = world();
    world.command(0, Command::Prim);
    run(&mut world, secs(5));
    assert_eq!(state(&world, 0), (State::Alone, true));
    world.sync_rule(1, ScriptRule::Hold);
    world.command(1, Command::Start);
    run(&mut world, secs(5));
    world.partition(Some(1));
    assert!(world.finish_step(1, Outcome::Ok));
    run(&mut world, secs(4));
    assert_eq!(state(&world, 0), (State::Alone, true));
    assert_eq!(state(&world, 1), (State::Second, true));
    world.take_transcript();
    world.crash(0);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- crash node1
        node2 warn: peer node1 lost: no heartbeat on any network for 2s
        node2 state SECOND transient
        node2 persist stale epoch 0
        node2 script stop_second SECOND WAIT auto
        node2 script transition SECOND WAIT auto
        node2 state WAIT ready
        node2 transition SECOND -> WAIT: the peer is lost before this node was up to date
        node2 info: waiting: node1 is absent and this node's data may not be up to date (claim stale): waiting for it; run `tandem prim` here to force this node primary
        "#,
    );
    assert_eq!(world.module(1).unwrap().claim, Claim::Stale);
}

#[test]
fn an_exclusive_node_does_not_start_alone_over_a_peer_last_seen_exclusive() {
    // node1 serves ALONE (node2 stopped). A partition; an operator forces node2 primary on the
    // other side: a split brain, node2 in a newer generation. node2 is stopped; node1 goes on
    // serving in its older generation, then is stopped too. node2 restarts: its generation is
    // newer, but node1 (stopped, claim exclusive) served after it and holds writes it lacks.
    let mut world = pair();
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    assert_eq!(state(&world, 0), (State::Alone, true));
    world.partition(None);
    run(&mut world, secs(3));
    world.command(1, Command::Prim);
    run(&mut world, secs(5));
    assert_eq!(state(&world, 1), (State::Alone, true));
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    world.heal();
    run(&mut world, secs(2));
    world.command(0, Command::Stop);
    run(&mut world, secs(5));
    assert_eq!(state(&world, 0).0, State::Stop);
    world.take_transcript();
    world.command(1, Command::Start);
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node2 script prestart STOP WAIT start
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 info: waiting: looking for node1
        node2 info: waiting: node1 served alone too (claim exclusive when last seen): both nodes may hold writes the other lacks; run `tandem prim` on the node whose data to keep
        "#,
    );
    let node2 = world.module(1).unwrap();
    assert_eq!(node2.state, State::Wait, "node2 must not serve");
    assert!(!node2.primary_role);
}

// ----- replication health ---------------------------------------------------------------

/// The replication stream (the channel node1 -> node2 in the simulation) fails while heartbeats
/// go on: the primary hears of it from its replicator and goes ALONE with a new data generation;
/// the secondary resynchronises, and the pair is PRIM/SECOND again only once the stream is back
/// and caught up.
#[test]
fn replication_loss_with_heartbeats_moves_prim_to_alone_until_restored() {
    let mut world = pair();
    world.sync_rule(1, ScriptRule::Hold);
    world
        .apply(Op::SetChannel {
            from: 0,
            conf: LinkConf::down(),
        })
        .unwrap();
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- channel node1 -> node2: down
        node1 persist exclusive epoch 1 last_primary
        node1 state PRIM transient
        node1 script transition PRIM ALONE auto
        node1 state ALONE ready
        node1 transition PRIM -> ALONE: the replication to the secondary is lost
        node2 persist stale epoch 0
        node2 state SECOND transient
        node2 sync
        node2 persist stale epoch 0
        "#,
    );
    assert_eq!(state(&world, 0), (State::Alone, true));
    assert!(world.connected(), "heartbeats still arrive");
    world
        .apply(Op::SetChannel {
            from: 0,
            conf: LinkConf::fixed(Duration::from_millis(1)),
        })
        .unwrap();
    run(&mut world, secs(1));
    assert_eq!(state(&world, 0), (State::Alone, true));
    assert!(world.finish_step(1, Outcome::Ok));
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- channel node1 -> node2: loss 0‰ dup 0‰ delay 1ms..1ms
        node2 sync done: ok
        node2 persist shared epoch 0
        node2 state SECOND ready
        node2 transition SECOND -> SECOND: the primary changed
        node1 persist shared epoch 1 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 0
        "#,
    );
    assert_eq!(state(&world, 0), (State::Prim, true));
    assert_eq!(state(&world, 1), (State::Second, true));
}

/// A secondary that the heartbeats show in SECOND, synchronised with the primary's current
/// generation, while the replication stream is down (here its synchronisation is declared done
/// by the test while the stream could not carry anything): the primary stays ALONE and refuses
/// to swap; once the secondary resynchronises over a working stream, the primary goes PRIM.
#[test]
fn no_alone_to_prim_and_no_swap_while_the_replication_is_down() {
    let mut world = pair();
    world
        .apply(Op::SetChannel {
            from: 0,
            conf: LinkConf::down(),
        })
        .unwrap();
    world.sync_rule(
        1,
        ScriptRule::Take {
            after: Duration::from_millis(100),
            outcome: Outcome::Ok,
        },
    );
    run(&mut world, secs(5));
    expect(
        &mut world,
        r#"
        -- channel node1 -> node2: down
        node1 persist exclusive epoch 1 last_primary
        node1 state PRIM transient
        node1 script transition PRIM ALONE auto
        node1 state ALONE ready
        node1 transition PRIM -> ALONE: the replication to the secondary is lost
        node2 persist stale epoch 0
        node2 state SECOND transient
        node2 sync
        node2 persist stale epoch 0
        node2 sync done: ok
        node2 persist shared epoch 0
        node2 state SECOND ready
        node2 transition SECOND -> SECOND: the primary changed
        "#,
    );
    assert_eq!(state(&world, 0), (State::Alone, true));
    assert_eq!(state(&world, 1), (State::Second, true));
    let (primary, secondary) = (world.module(0).unwrap(), world.module(1).unwrap());
    assert_eq!(secondary.synced_generation, primary.generation);
    world.command(1, Command::Swap);
    world.command(0, Command::Swap);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        node2 command swap: ok: asked the primary to swap roles
        node1 command swap: refused: swap needs PRIM and SECOND, both ready (local ALONE, peer SECOND)
        node1 warn: swap abandoned: the peer is not an up-to-date secondary
        "#,
    );
    assert_eq!(state(&world, 0), (State::Alone, true));
    // The stream works again, but the secondary never received the data: still ALONE until it
    // resynchronises (here the operator restarts it).
    world
        .apply(Op::SetChannel {
            from: 0,
            conf: LinkConf::fixed(Duration::from_millis(1)),
        })
        .unwrap();
    run(&mut world, secs(5));
    assert_eq!(state(&world, 0), (State::Alone, true));
    world.command(1, Command::Stop);
    run(&mut world, secs(5));
    world.command(1, Command::Start);
    run(&mut world, secs(10));
    expect(
        &mut world,
        r#"
        -- channel node1 -> node2: loss 0‰ dup 0‰ delay 1ms..1ms
        node2 command stop: ok: stopping
        node2 state SECOND transient
        node2 persist stale epoch 0
        node2 script stop_second SECOND WAIT stop
        node2 script transition SECOND WAIT stop
        node2 script poststop WAIT STOP stop
        node2 script transition WAIT STOP stop
        node2 state STOP ready
        node2 transition SECOND -> STOP: stop requested
        node2 command start: ok: starting
        node2 state WAIT transient
        node2 script transition STOP WAIT start
        node2 script prestart STOP WAIT start
        node2 state WAIT ready
        node2 transition STOP -> WAIT: start
        node2 persist stale epoch 0
        node2 state WAIT transient
        node2 script transition WAIT SECOND start
        node2 state SECOND transient
        node2 script start_second WAIT SECOND start
        node2 sync
        node2 persist shared epoch 0
        node2 state SECOND ready
        node2 transition WAIT -> SECOND: the peer is primary
        node1 persist shared epoch 1 last_primary
        node1 state ALONE transient
        node1 script transition ALONE PRIM auto
        node1 state PRIM ready
        node1 transition ALONE -> PRIM: the secondary is up to date
        node2 persist shared epoch 0
        "#,
    );
    assert_eq!(state(&world, 0), (State::Prim, true));
    assert_eq!(state(&world, 1), (State::Second, true));
}
