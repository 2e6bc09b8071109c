//! Peer liveness over several heartbeat networks: the peer is lost only when every network
//! timed out.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_core::{Effect, Input, ModuleSettings, Node, NodeSettings, NodeSnapshot, Time};

fn node(networks: usize) -> Node {
    let settings = NodeSettings {
        local: "node1".into(),
        peer: "node2".into(),
        networks,
        pulse: Duration::from_millis(250),
        timeout: Duration::from_secs(2),
        modules: vec![ModuleSettings::new("demo")],
    };
    Node::new(settings, vec![], 1, Time::ZERO)
}

fn peer_snapshot(seq: u64) -> NodeSnapshot {
    NodeSnapshot {
        node: "node2".into(),
        incarnation: 9,
        seq,
        modules: vec![],
    }
}

fn at(millis: u64) -> Time {
    Time::ZERO.plus(Duration::from_millis(millis))
}

fn logs(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Log { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_peer_is_lost_only_when_every_network_timed_out() {
    let mut node = node(2);
    let effects = node.handle(
        at(0),
        Input::Heartbeat {
            network: 0,
            snapshot: peer_snapshot(1),
        },
    );
    assert!(node.peer_alive());
    assert!(
        logs(&effects)
            .iter()
            .any(|line| line.contains("peer node2 found"))
    );
    // Network 0 goes silent; network 1 keeps delivering.
    for (seq, millis) in (2..).zip((250..=6000).step_by(250)) {
        node.handle(
            at(millis),
            Input::Heartbeat {
                network: 1,
                snapshot: peer_snapshot(seq),
            },
        );
        assert!(
            node.peer_alive(),
            "lost at {millis} ms although network 1 delivers"
        );
    }
    // Now network 1 goes silent too: lost exactly one timeout after its last heartbeat.
    node.handle(at(7999), Input::Tick);
    assert!(node.peer_alive());
    let effects = node.handle(at(8000), Input::Tick);
    assert!(!node.peer_alive());
    assert!(
        logs(&effects)
            .iter()
            .any(|line| line.contains("no heartbeat on any network"))
    );
}

#[test]
fn poll_timeout_wakes_the_driver_for_pulses_and_the_liveness_deadline() {
    let mut node = node(1);
    node.handle(
        at(0),
        Input::Heartbeat {
            network: 0,
            snapshot: peer_snapshot(1),
        },
    );
    let due = node.poll_timeout().unwrap();
    assert!(
        due <= at(250),
        "the next pulse is due within 250 ms, got {due:?}"
    );
    // Only ticks at the times the core asked for: the loss is still noticed on time.
    let mut now = at(0);
    while node.peer_alive() {
        now = node.poll_timeout().unwrap();
        assert!(now <= at(2000), "liveness deadline overshot: {now:?}");
        node.handle(now, Input::Tick);
    }
    assert_eq!(now, at(2000));
}

#[test]
fn heartbeats_from_a_stranger_are_ignored() {
    let mut node = node(1);
    let stranger = NodeSnapshot {
        node: "node3".into(),
        incarnation: 1,
        seq: 1,
        modules: vec![],
    };
    node.handle(
        at(0),
        Input::Heartbeat {
            network: 0,
            snapshot: stranger,
        },
    );
    assert!(!node.peer_alive());
}
