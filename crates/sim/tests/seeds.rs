//! The deterministic simulation over many seeds, and the replay of one seed.
//!
//! `TANDEM_SIM_SEEDS=N` changes the number of seeds (default 2000, split over four tests so that
//! the test harness runs them in parallel); `TANDEM_SIM_FIRST=S` the first seed.
//! `TANDEM_SIM_SEED=S cargo test -p tandem-sim --test seeds replay -- --nocapture` replays one
//! seed with full tracing.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use tandem_sim::{RunOptions, Stats, TraceConfig, run_seed};

const SHARDS: u64 = 4;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn run_shard(shard: u64) {
    let count = env_u64("TANDEM_SIM_SEEDS", 2000);
    let first = env_u64("TANDEM_SIM_FIRST", 0);
    let options = RunOptions::default();
    let started = Instant::now();
    let mut handled = 0;
    let mut seeds = 0;
    let mut stats = Stats::default();
    for seed in (first..first + count).filter(|seed| seed % SHARDS == shard) {
        match run_seed(seed, &options) {
            Ok(report) => {
                handled += report.handled;
                stats.add(&report.stats);
            }
            Err(failure) => panic!("{failure}"),
        }
        seeds += 1;
    }
    println!(
        "shard {shard}: {seeds} seeds, {handled} core inputs, {:.1?}",
        started.elapsed()
    );
    println!("{stats:#?}");
    // The runs must have gone through what the invariants are about, or passing means little.
    if seeds >= 200 && std::env::var_os("TANDEM_SIM_NO_COVERAGE").is_none() {
        let at_least = |what: &str, value: u64, minimum: u64| {
            assert!(
                value >= minimum,
                "only {value} {what} over {seeds} seeds (want {minimum})"
            );
        };
        at_least(
            "failovers SECOND -> ALONE",
            stats.transitions("SECOND", "ALONE"),
            seeds / 4,
        );
        at_least(
            "swaps PRIM -> SECOND",
            stats.transitions("PRIM", "SECOND"),
            seeds / 10,
        );
        at_least("ALONE -> PRIM", stats.transitions("ALONE", "PRIM"), seeds);
        at_least(
            "PRIM -> ALONE",
            stats.transitions("PRIM", "ALONE"),
            seeds / 10,
        );
        at_least("split brains", stats.split_brains, seeds / 20);
        at_least("promotions", stats.promotions, seeds * 2);
        at_least(
            "checks while connected with a writer",
            stats.connected_with_writer,
            seeds * 200,
        );
        at_least(
            "tolerated VIP overlaps after a split brain",
            stats.vip_overlaps,
            1,
        );
        at_least("refused commands", stats.refused, seeds * 2);
    }
}

#[test]
fn seeds_shard_0() {
    run_shard(0);
}

#[test]
fn seeds_shard_1() {
    run_shard(1);
}

#[test]
fn seeds_shard_2() {
    run_shard(2);
}

#[test]
fn seeds_shard_3() {
    run_shard(3);
}

/// Replays `TANDEM_SIM_SEED` (default 0) printing every event.
#[test]
fn replay() {
    let seed = env_u64("TANDEM_SIM_SEED", 0);
    let options = RunOptions {
        trace: TraceConfig {
            echo: std::env::var_os("TANDEM_SIM_SEED").is_some(),
            verbose: std::env::var_os("TANDEM_SIM_VERBOSE").is_some(),
            transcript_logs: true,
            ..RunOptions::default().trace
        },
        ..RunOptions::default()
    };
    match run_seed(seed, &options) {
        Ok(report) => println!("seed {seed} passed: {report:?}"),
        Err(failure) => panic!("{failure}"),
    }
}

/// Runs every seed and prints one line per failing seed (exploration; not run by default).
#[test]
#[ignore = "exploration: cargo test -p tandem-sim --test seeds survey -- --ignored --nocapture"]
fn survey() {
    let count = env_u64("TANDEM_SIM_SEEDS", 1000);
    let first = env_u64("TANDEM_SIM_FIRST", 0);
    let options = RunOptions::default();
    let mut failed = 0;
    for seed in first..first + count {
        if let Err(failure) = run_seed(seed, &options) {
            failed += 1;
            println!(
                "seed {seed} {}: {}",
                failure.phase,
                failure.message.lines().next().unwrap_or("")
            );
        }
    }
    println!("{failed} of {count} seeds failed");
    assert_eq!(failed, 0);
}

/// A seed replays exactly: same trace, same number of inputs.
#[test]
fn a_seed_replays_exactly() {
    let options = RunOptions {
        trace: TraceConfig {
            ring: 100_000,
            ..TraceConfig::default()
        },
        ..RunOptions::default()
    };
    for seed in [7, 1234] {
        let config = tandem_sim::scenario::world_config(seed, options.trace);
        let run = |config: tandem_sim::WorldConfig| {
            let mut world = tandem_sim::World::new(config);
            let mut rng = tandem_sim::Rng::new(seed);
            world.command(0, tandem_core::Command::Start);
            world.command(1, tandem_core::Command::Start);
            for _ in 0..40 {
                let gap = tandem_sim::faults::next_gap(&mut rng);
                world.run_for(gap).unwrap();
                let op = tandem_sim::faults::next_op(&mut rng, &world);
                world.apply(op).unwrap();
            }
            (world.handled(), world.trace().tail(100_000))
        };
        let (first_count, first_trace) = run(config.clone());
        let (second_count, second_trace) = run(config);
        assert!(first_count > 100);
        assert_eq!(first_count, second_count);
        assert_eq!(first_trace, second_trace);
        let first = run_seed(seed, &options).unwrap();
        assert_eq!(first, run_seed(seed, &options).unwrap());
    }
}

/// A failure names the seed, the command that replays it, and the last events.
#[test]
fn a_failure_says_how_to_replay_it() {
    let failure = tandem_sim::SeedFailure {
        seed: 42,
        phase: "safety",
        message: "at 1.000s: two writers".into(),
        tail: vec![
            "     0.500s node1 writable on".into(),
            "     1.000s node2 writable on".into(),
        ],
    };
    let text = failure.to_string();
    assert!(text.starts_with("seed 42 failed in the safety phase: at 1.000s: two writers\n"));
    assert!(text.contains(
        "replay: TANDEM_SIM_SEED=42 cargo test -p tandem-sim --test seeds replay -- --nocapture"
    ));
    assert!(text.contains("last 2 events:\n       0.500s node1 writable on\n"));
}
