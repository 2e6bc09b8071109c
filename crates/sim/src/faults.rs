//! Faults and operator actions of the safety phase, drawn from the seed.
//!
//! The mix favours what breaks clusters: partitions (both ways and one way) that heal, lossy,
//! slow and duplicating networks, crashes and restarts, freezes longer than the heartbeat
//! timeout, interface links going down, failing and hanging scripts, and every operator command
//! on either node, sensible or not.

use std::time::Duration;

use tandem_core::{Command, Outcome};

use crate::network::LinkConf;
use crate::rng::Rng;
use crate::world::{Op, World};

/// Time until the next operation.
pub fn next_gap(rng: &mut Rng) -> Duration {
    // Mostly short gaps, sometimes a quiet period long enough for a failover to complete.
    if rng.chance(150) {
        rng.millis(3000, 9000)
    } else {
        rng.millis(0, 1500)
    }
}

/// An operator command, weighted towards the ones that change roles.
pub fn command(rng: &mut Rng) -> Command {
    const COMMANDS: [(Command, u64); 7] = [
        (Command::Start, 24),
        (Command::Stop, 12),
        (Command::Restart, 8),
        (Command::Prim, 14),
        (Command::Second, 12),
        (Command::Swap, 14),
        (Command::ForceStop, 6),
    ];
    let total: u64 = COMMANDS.iter().map(|(_, weight)| weight).sum();
    let mut draw = rng.below(total);
    for (command, weight) in COMMANDS {
        if draw < weight {
            return command;
        }
        draw -= weight;
    }
    Command::Start
}

/// A degraded (but not cut) link.
pub fn bad_link(rng: &mut Rng) -> LinkConf {
    match rng.below(3) {
        0 => LinkConf {
            up: true,
            loss_per_mille: u32::try_from(rng.below(800)).unwrap_or(0) + 100,
            dup_per_mille: 0,
            delay_min: Duration::from_micros(100),
            delay_max: Duration::from_millis(20),
        },
        1 => LinkConf {
            up: true,
            loss_per_mille: 0,
            dup_per_mille: 0,
            delay_min: rng.millis(0, 500),
            delay_max: rng.millis(500, 3500),
        },
        _ => LinkConf {
            up: true,
            loss_per_mille: 50,
            dup_per_mille: 400,
            delay_min: Duration::ZERO,
            delay_max: rng.millis(1, 400),
        },
    }
}

/// The next fault or operator action.
pub fn next_op(rng: &mut Rng, world: &World) -> Op {
    let node = rng.index(2);
    let down: Vec<usize> = (0..2).filter(|&index| !world.host(index).up()).collect();
    if let Some(&crashed) = down.first()
        && rng.chance(300)
    {
        return Op::Restart(crashed);
    }
    match rng.below(100) {
        0..=39 => Op::Command {
            node,
            command: command(rng),
        },
        40..=47 => Op::Partition { from: None },
        48..=52 => Op::Partition { from: Some(node) },
        53..=64 => Op::Heal,
        65..=72 => Op::SetLink {
            from: node,
            network: rng.index(world.network().networks()),
            conf: bad_link(rng),
        },
        73..=74 => Op::SetChannel {
            from: node,
            conf: LinkConf::down(),
        },
        75..=78 => Op::Crash(node),
        79..=83 => Op::Freeze {
            node,
            duration: rng.millis(300, 5000),
        },
        84..=88 => Op::Link {
            node,
            up: !world.host(node).link_up,
        },
        89..=92 => Op::ScriptFaults {
            node,
            fail_per_mille: u32::try_from(rng.below(350)).unwrap_or(0),
            hang_per_mille: u32::try_from(rng.below(120)).unwrap_or(0),
        },
        93..=94 => Op::FinishStep {
            node,
            outcome: match rng.below(3) {
                0 => Outcome::Ok,
                1 => Outcome::Failed("exit code 2".into()),
                _ => Outcome::TimedOut,
            },
        },
        95..=96 => Op::DropInFlight(rng.index(64)),
        97 => Op::DuplicateInFlight(rng.index(64)),
        _ => Op::DeliverNow(rng.index(64)),
    }
}
