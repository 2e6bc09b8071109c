//! Helpers shared by the lab tests of this crate (each test binary uses some of them).

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem::cluster::{Cluster, ClusterSpec, DEFAULT_REPLICATED};
use tandem_lab::LabSpec;

/// The `tandem` binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// A lab cluster with the sample application: node1, node2 and a client.
pub fn cluster() -> Cluster {
    let spec = ClusterSpec::new(LabSpec::new(["node1", "node2", "client"]));
    Cluster::create(&spec, &binary()).unwrap()
}

/// `name` in the cluster's replicated directory.
pub fn data(name: &str) -> String {
    format!("{DEFAULT_REPLICATED}/{name}")
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Both nodes' module logs and daemon output, for failure messages.
pub fn logs(cluster: &Cluster) -> String {
    let mut text = String::new();
    for node in ["node1", "node2"] {
        text += &format!("==== {node} module log\n{}\n", cluster.log_tail(node, 80));
        let out = cluster
            .node_dir(node)
            .ok()
            .and_then(|dir| std::fs::read_to_string(dir.join("daemon.out")).ok())
            .unwrap_or_default();
        text += &format!("==== {node} daemon output\n{}\n", tail(&out, 60));
    }
    text
}

/// Node1 primary, node2 secondary; panics with both nodes' logs when it fails.
pub fn bootstrap(cluster: &Cluster) {
    if let Err(error) = cluster.bootstrap() {
        panic!("bootstrap failed: {error:#}\n{}", logs(cluster));
    }
}

/// SIGKILL to a process of the lab, and waits for it to be gone.
pub fn kill(cluster: &Cluster, pid: u32) {
    cluster.lab.kill(pid, libc::SIGKILL).unwrap();
    cluster.lab.wait_exit(pid, Duration::from_secs(10)).unwrap();
}

/// SIGKILL to a node's daemon.
pub fn kill_daemon(cluster: &Cluster, node: &str) {
    let pid = cluster.daemon_pid(node).expect("daemon running");
    kill(cluster, pid);
}

/// The numbers of a log of numbers, one per line.
pub fn numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}
