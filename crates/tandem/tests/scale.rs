//! A replicated directory of many files with daemons at a low descriptor limit (issue 11): both
//! daemons start with `prlimit --nofile=1024:1024` (soft and hard, so the daemon cannot raise
//! it); 50,000 files are created, listed, stat'ed, renamed and removed through node1's mount; the
//! pair stays PRIM/SECOND with the same daemons, the replication is never lost, both replicas
//! are identical after the renames and after the removal, and the daemons' descriptors stay
//! far below the limit. Before file handles, the secondary failed a create with `EMFILE` after
//! about a thousand files and the primary died.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tandem::cluster::{Cluster, ClusterSpec, DEFAULT_REPLICATED};
use tandem_lab::LabSpec;
use tandem_testkit::{differences, snapshot};

const FILES_PER_WRITER: usize = 12_500;
const WRITERS: usize = 4;
const LIMIT: u64 = 1024;

fn state(cluster: &Cluster, node: &str) -> String {
    cluster.status(node).unwrap()["modules"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn transitions(cluster: &Cluster, node: &str) -> Vec<String> {
    fs::read_to_string(cluster.module_log(node).unwrap())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" transition "))
        .map(str::to_owned)
        .collect()
}

fn descriptors(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Runs a shell script in node1 (through its mount); it must succeed. Returns its stdout.
fn sh(cluster: &Cluster, script: &str) -> String {
    let mut command: Command = cluster.lab.command("node1", "sh").unwrap();
    let output = command.arg("-c").arg(script).output().unwrap();
    assert!(
        output.status.success(),
        "`{script}` failed ({}): {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        logs(cluster)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn fifty_thousand_files_with_daemons_at_1024_descriptors() {
    let mut spec = ClusterSpec::new(LabSpec::new(["node1", "node2", "client"]));
    spec.nofile = Some(LIMIT);
    let cluster = Cluster::create(&spec, &binary()).unwrap();
    bootstrap(&cluster);
    let pids = [
        cluster.daemon_pid("node1").unwrap(),
        cluster.daemon_pid("node2").unwrap(),
    ];
    for pid in pids {
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        assert!(line.contains(&format!("{LIMIT}")), "{line}");
    }
    let before = [
        transitions(&cluster, "node1"),
        transitions(&cluster, "node2"),
    ];
    let dir = format!("{DEFAULT_REPLICATED}/scale");
    let total = FILES_PER_WRITER * WRITERS;
    let mut peak = [0usize; 2];
    let mut phase = |what: &str, script: String| {
        let started = Instant::now();
        let out = sh(&cluster, &script);
        for (i, pid) in pids.iter().enumerate() {
            peak[i] = peak[i].max(descriptors(*pid));
        }
        eprintln!("{what}: {:.1?}", started.elapsed());
        out
    };
    // In parallel, one writer per directory; `wait PID` gives each writer's status.
    let parallel = |body: &str| {
        format!(
            "cd {dir} && pids= && for w in $(seq 1 {WRITERS}); do (cd w$w && {body}) & \
             pids=\"$pids $!\"; done; for p in $pids; do wait $p || exit 1; done"
        )
    };
    phase(
        "create",
        format!(
            "mkdir {dir} && cd {dir} && for w in $(seq 1 {WRITERS}); do mkdir w$w; done && {}",
            parallel(&format!(
                "seq 1 {FILES_PER_WRITER} | sed 's/^/f/' | xargs touch"
            ))
        ),
    );
    let listed = phase("list", format!("find {dir} -type f | wc -l"));
    assert_eq!(listed.trim(), total.to_string());
    let stated = phase(
        "stat",
        format!("find {dir} -type f -printf '%s %m %n\\n' | sort | uniq -c"),
    );
    assert_eq!(stated.trim(), format!("{total} 0 644 1"));
    phase(
        "rename",
        parallel("perl -e 'for (glob \"f*\") { rename($_, \"r$_\") or die \"$_: $!\" }'"),
    );
    let renamed = sh(&cluster, &format!("find {dir} -type f -name 'rf*' | wc -l"));
    assert_eq!(renamed.trim(), total.to_string());

    let backing = |node: &str| cluster.node_dir(node).unwrap().join("data/0/scale");
    let identical = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let diff = differences(&snapshot(&backing("node1")), &snapshot(&backing("node2")));
            if diff.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} differences between the replicas, first: {:?}\n{}",
                diff.len(),
                &diff[..diff.len().min(5)],
                logs(&cluster)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    identical("after the renames");
    assert_eq!(
        fs::read_dir(backing("node2").join("w1")).unwrap().count(),
        FILES_PER_WRITER
    );

    phase("remove", parallel("rm -f rf*"));
    let left = sh(&cluster, &format!("find {dir} -type f | wc -l"));
    assert_eq!(left.trim(), "0");
    identical("after the removal");

    // The same daemons, the same pair, no transition (a lost replication makes PRIM go ALONE).
    assert_eq!(
        [cluster.daemon_pid("node1"), cluster.daemon_pid("node2")],
        [Some(pids[0]), Some(pids[1])],
        "a daemon restarted\n{}",
        logs(&cluster)
    );
    assert_eq!(
        (state(&cluster, "node1"), state(&cluster, "node2")),
        ("PRIM".into(), "SECOND".into())
    );
    assert_eq!(
        [
            transitions(&cluster, "node1"),
            transitions(&cluster, "node2")
        ],
        before,
        "the pair changed during the run\n{}",
        logs(&cluster)
    );
    eprintln!(
        "peak descriptors: node1 {}, node2 {} (limit {LIMIT})",
        peak[0], peak[1]
    );
    assert!(
        peak.iter().all(|&p| p < LIMIT as usize / 2),
        "descriptors {peak:?}, limit {LIMIT}"
    );
}
