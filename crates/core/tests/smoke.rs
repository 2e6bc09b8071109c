use std::collections::VecDeque;
use std::time::Duration;
use tandem_core::*;

fn settings(local: &str, peer: &str) -> NodeSettings {
    NodeSettings {
        local: local.into(),
        peer: peer.into(),
        networks: 1,
        pulse: Duration::from_millis(250),
        timeout: Duration::from_secs(2),
        modules: vec![ModuleSettings::new("demo")],
    }
}

struct Pair {
    nodes: [Node; 2],
    now: Time,
    queue: VecDeque<(usize, Input)>,
    log: Vec<String>,
}

impl Pair {
    fn run(&mut self, until: Time) {
        while self.now < until {
            while let Some((target, input)) = self.queue.pop_front() {
                let effects = self.nodes[target].handle(self.now, input);
                for effect in effects {
                    match effect {
                        Effect::Broadcast(snapshot) => self.queue.push_back((
                            1 - target,
                            Input::Heartbeat {
                                network: 0,
                                snapshot,
                            },
                        )),
                        Effect::RunScript { module, step, call } => {
                            self.log.push(format!(
                                "n{} {} {} {} {}{}",
                                target + 1,
                                call.script.file_name(),
                                call.current,
                                call.next,
                                call.action.as_str(),
                                if call.force { " force" } else { "" }
                            ));
                            self.queue.push_back((
                                target,
                                Input::StepDone {
                                    module,
                                    step,
                                    outcome: Outcome::Ok,
                                },
                            ))
                        }
                        Effect::AcquireVips { module, step }
                        | Effect::ReleaseVips { module, step }
                        | Effect::SyncData { module, step } => self.queue.push_back((
                            target,
                            Input::StepDone {
                                module,
                                step,
                                outcome: Outcome::Ok,
                            },
                        )),
                        Effect::Log { message, .. } => {
                            self.log.push(format!("n{} log {message}", target + 1))
                        }
                        _ => {}
                    }
                }
            }
            self.now = self.now.plus(Duration::from_millis(50));
            self.queue.push_back((0, Input::Tick));
            self.queue.push_back((1, Input::Tick));
        }
    }
}

#[test]
fn smoke() {
    let mut pair = Pair {
        nodes: [
            Node::new(settings("node1", "node2"), vec![], 1, Time::ZERO),
            Node::new(settings("node2", "node1"), vec![], 1, Time::ZERO),
        ],
        now: Time::ZERO,
        queue: VecDeque::new(),
        log: vec![],
    };
    // No replication here: both streams count as connected.
    for node in 0..2 {
        pair.queue.push_back((
            node,
            Input::ReplicationChanged {
                module: ModuleId(0),
                connected: true,
            },
        ));
    }
    pair.queue.push_back((
        0,
        Input::Command {
            module: ModuleId(0),
            command: Command::Prim,
            request: RequestId(1),
        },
    ));
    pair.queue.push_back((
        1,
        Input::Command {
            module: ModuleId(0),
            command: Command::Start,
            request: RequestId(2),
        },
    ));
    pair.run(Time::ZERO.plus(Duration::from_secs(5)));
    for line in &pair.log {
        println!("{line}");
    }
    let s0 = pair.nodes[0].status();
    let s1 = pair.nodes[1].status();
    println!(
        "{:?} {:?} / {:?} {:?}",
        s0.modules[0].state, s0.modules[0].ready, s1.modules[0].state, s1.modules[0].ready
    );
    assert_eq!(s0.modules[0].state, State::Prim);
    assert_eq!(s1.modules[0].state, State::Second);
    pair.log.clear();
    pair.queue.push_back((
        1,
        Input::Command {
            module: ModuleId(0),
            command: Command::Swap,
            request: RequestId(3),
        },
    ));
    pair.run(Time::ZERO.plus(Duration::from_secs(10)));
    for line in &pair.log {
        println!("{line}");
    }
    let s0 = pair.nodes[0].status();
    let s1 = pair.nodes[1].status();
    assert_eq!(s0.modules[0].state, State::Second);
    assert_eq!(s1.modules[0].state, State::Prim);
}
