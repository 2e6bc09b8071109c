//! Replication with real daemons in the lab (issue 4 acceptance): the replicated directory is
//! mounted in place on both nodes, writes on the primary reach the secondary before they are
//! acknowledged, and a `kill -9` of the primary loses no acknowledged write.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tandem::cluster::{Cluster, DEFAULT_REPLICATED};

const SETTLE: Duration = Duration::from_secs(60);

/// Runs a shell command inside a node (its network and mount namespaces).
fn sh(cluster: &Cluster, node: &str, script: &str) -> std::process::Output {
    let mut command = cluster.lab.command(node, "sh").unwrap();
    command.arg("-c").arg(script).output().unwrap()
}

fn sh_ok(cluster: &Cluster, node: &str, script: &str) -> String {
    let output = sh(cluster, node, script);
    assert!(
        output.status.success(),
        "`{script}` on {node} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn module_status(cluster: &Cluster, node: &str) -> serde_json::Value {
    cluster.status(node).unwrap()["modules"][0].clone()
}

fn wait_pair(cluster: &Cluster, primary: &str, secondary: &str) {
    for (node, state) in [(secondary, "SECOND"), (primary, "PRIM")] {
        if let Err(error) = cluster.wait_state(node, state, SETTLE) {
            panic!("{error:#}\n{}", logs(cluster));
        }
    }
}

/// The ledger: a writer on the primary appends numbered records to a file in the replicated
/// directory, `fdatasync`s each, and logs each acknowledged number outside it; the primary
/// (daemon and writer) is killed with SIGKILL mid-stream; after the failover every acknowledged
/// record is on the new primary, and the records of earlier rounds too. The killed node comes
/// back as secondary (full resynchronisation) and the roles alternate, 20 times.
#[test]
fn ledger_every_acknowledged_record_survives_kill_of_the_primary_20_times() {
    const ROUNDS: usize = 20;
    let cluster = cluster();
    bootstrap(&cluster);
    let (mut primary, mut secondary) = ("node1", "node2");
    let mut acked_by_round: Vec<u64> = Vec::new();
    for round in 0..ROUNDS {
        let ledger = data(&format!("ledger-{round}"));
        let acks = cluster
            .node_dir(primary)
            .unwrap()
            .join(format!("acks-{round}"));
        let writer_script = format!(
            "i=0; while :; do i=$((i+1)); echo \"$i\" >> {ledger} || exit 1; \
             sync -d {ledger} || exit 1; echo \"$i\" >> {acks}; done",
            acks = acks.display()
        );
        let mut command = cluster.lab.command(primary, "sh").unwrap();
        command.arg("-c").arg(&writer_script);
        let writer = cluster
            .lab
            .spawn(
                primary,
                &mut command,
                cluster.node_dir(primary).unwrap().join("writer.out"),
            )
            .unwrap();
        // Mid-stream: a varying number of records acknowledged.
        let wanted = 20 + (round as u64 * 37) % 150;
        eventually(SETTLE, "the writer to get acknowledgements", || {
            numbers(&std::fs::read_to_string(&acks).unwrap_or_default()).len() as u64 >= wanted
        });
        let daemon = cluster.daemon_pid(primary).unwrap();
        kill(&cluster, daemon);
        kill(&cluster, writer);
        let acked = numbers(&std::fs::read_to_string(&acks).unwrap());
        let last = *acked.last().unwrap();
        assert_eq!(
            acked,
            (1..=last).collect::<Vec<_>>(),
            "ack log of round {round}"
        );
        acked_by_round.push(last);

        cluster.wait_state(secondary, "ALONE", SETTLE).unwrap();
        // Every acknowledged record of every round is on the new primary.
        for (earlier, &last) in acked_by_round.iter().enumerate() {
            let text = sh_ok(
                &cluster,
                secondary,
                &format!("cat {}", data(&format!("ledger-{earlier}"))),
            );
            let records = numbers(&text);
            assert!(
                records.len() as u64 >= last
                    && records[..last as usize] == (1..=last).collect::<Vec<_>>()[..],
                "round {round}: ledger-{earlier} on {secondary} lacks acknowledged records \
                 (acknowledged up to {last}, found {} records)",
                records.len()
            );
        }

        // The killed node comes back as secondary of the survivor.
        cluster.start_daemon(primary).unwrap();
        cluster.tandem_ok(primary, &["start"]).unwrap();
        wait_pair(&cluster, secondary, primary);
        std::mem::swap(&mut primary, &mut secondary);
    }
}

/// On the secondary the replicated directory is read-only (EROFS) and shows the primary's
/// writes; stopping the module leaves the plain directory with the data and nothing else.
#[test]
fn secondary_is_read_only_with_replicated_data_and_stop_leaves_the_plain_directory() {
    let cluster = cluster();
    bootstrap(&cluster);
    sh_ok(
        &cluster,
        "node1",
        &format!(
            "mkdir -p {d} && echo hello > {f} && sync {f} && ln -s hello.txt {l} && \
             setfattr -n user.color -v blue {f} && chmod 640 {f}",
            d = data("dir"),
            f = data("dir/hello.txt"),
            l = data("dir/link")
        ),
    );
    // Reads on the secondary see the replicated data, at once (the write was acknowledged by
    // the secondary before `echo` returned).
    assert_eq!(
        sh_ok(&cluster, "node2", &format!("cat {}", data("dir/hello.txt"))),
        "hello\n"
    );
    assert_eq!(
        sh_ok(&cluster, "node2", &format!("readlink {}", data("dir/link"))),
        "hello.txt\n"
    );
    assert_eq!(
        sh_ok(
            &cluster,
            "node2",
            &format!(
                "getfattr --only-values -n user.color {}",
                data("dir/hello.txt")
            )
        ),
        "blue"
    );
    assert_eq!(
        sh_ok(
            &cluster,
            "node2",
            &format!("stat -c %a {}", data("dir/hello.txt"))
        ),
        "640\n"
    );
    // `tandem status` shows the replication and its figures on the primary.
    let replication = module_status(&cluster, "node1")["replication"].clone();
    assert_eq!(replication["active"], true, "{replication}");
    assert!(
        replication["ack_latency_us"].as_u64().unwrap() > 0,
        "{replication}"
    );
    assert_eq!(replication["inflight_ops"], 0, "{replication}");
    let human = cluster.tandem_ok("node1", &["status"]).unwrap();
    assert!(human.contains("replication: streaming"), "{human}");

    // Local writes on the secondary fail with EROFS.
    for attempt in [
        format!("echo x > {}", data("new.txt")),
        format!("echo x >> {}", data("dir/hello.txt")),
        format!("mkdir {}", data("newdir")),
        format!("rm {}", data("dir/hello.txt")),
        format!("touch {}", data("dir/hello.txt")),
    ] {
        let output = sh(&cluster, "node2", &attempt);
        assert!(
            !output.status.success(),
            "`{attempt}` succeeded on the secondary"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("Read-only file system"),
            "`{attempt}` on the secondary: {stderr}"
        );
    }

    // Stop both: the plain directories are back, with the data, and nothing else.
    cluster.tandem_ok("node2", &["stop"]).unwrap();
    cluster.wait_state("node2", "STOP", SETTLE).unwrap();
    cluster.tandem_ok("node1", &["stop"]).unwrap();
    cluster.wait_state("node1", "STOP", SETTLE).unwrap();
    for node in ["node1", "node2"] {
        let mounts = sh_ok(&cluster, node, "cat /proc/self/mountinfo");
        let ours = format!(" {DEFAULT_REPLICATED} ");
        assert!(
            !mounts
                .lines()
                .any(|line| line.contains(&ours) && line.contains("fuse.tandem")),
            "{node} still has a tandem mount on {DEFAULT_REPLICATED}:\n{mounts}"
        );
        assert_eq!(
            sh_ok(&cluster, node, &format!("cat {}", data("dir/hello.txt"))),
            "hello\n"
        );
        let listing = sh_ok(
            &cluster,
            node,
            &format!("cd {DEFAULT_REPLICATED} && find . | sort"),
        );
        let names: Vec<&str> = listing.lines().collect();
        assert!(
            names.iter().all(|name| *name == "."
                || name.starts_with("./dir")
                || name.starts_with("./counter")),
            "{node}: unexpected entries in the plain directory: {names:?}"
        );
        // Writable again as a plain directory.
        sh_ok(
            &cluster,
            node,
            &format!("echo plain > {}", data("plain.txt")),
        );
    }
}

/// Roles swapped twice, with writes in between: each new secondary is resynchronised from the
/// new primary and then receives its writes; the data written on each side is on both.
#[test]
fn swap_back_and_forth_keeps_replicating_both_ways() {
    let cluster = cluster();
    bootstrap(&cluster);
    let write = |node: &str, name: &str, text: &str| {
        sh_ok(
            &cluster,
            node,
            &format!("echo {text} > {f} && sync {f}", f = data(name)),
        );
    };
    let read = |node: &str, name: &str| sh_ok(&cluster, node, &format!("cat {}", data(name)));
    write("node1", "one", "written on node1");
    assert_eq!(read("node2", "one"), "written on node1\n");

    cluster.tandem_ok("node1", &["swap"]).unwrap();
    wait_pair(&cluster, "node2", "node1");
    write("node2", "two", "written on node2");
    assert_eq!(read("node1", "two"), "written on node2\n");
    assert_eq!(read("node1", "one"), "written on node1\n");

    cluster.tandem_ok("node2", &["swap"]).unwrap();
    wait_pair(&cluster, "node1", "node2");
    write("node1", "three", "written on node1 again");
    for node in ["node1", "node2"] {
        assert_eq!(read(node, "one"), "written on node1\n");
        assert_eq!(read(node, "two"), "written on node2\n");
        assert_eq!(read(node, "three"), "written on node1 again\n");
    }
    let status = module_status(&cluster, "node1");
    assert_eq!(status["replication"]["active"], true, "{status}");
}

/// The secondary dies while the primary writes: the primary's writes pause at most for the
/// replication timeout, then go on ALONE (a new data generation recorded first); the secondary
/// comes back, is resynchronised, and has every acknowledged record.
#[test]
fn loss_of_the_secondary_mid_stream_goes_alone_then_resynchronises() {
    let cluster = cluster();
    bootstrap(&cluster);
    let ledger = data("ledger");
    let acks = cluster.node_dir("node1").unwrap().join("acks");
    let mut command = cluster.lab.command("node1", "sh").unwrap();
    command.arg("-c").arg(format!(
        "i=0; while :; do i=$((i+1)); echo \"$i\" >> {ledger} || exit 1; \
         sync -d {ledger} || exit 1; echo \"$i\" >> {acks}; done",
        acks = acks.display()
    ));
    let writer = cluster
        .lab
        .spawn(
            "node1",
            &mut command,
            cluster.node_dir("node1").unwrap().join("writer.out"),
        )
        .unwrap();
    let acked = || numbers(&std::fs::read_to_string(&acks).unwrap_or_default()).len();
    eventually(SETTLE, "acknowledged records", || acked() >= 50);
    kill(&cluster, cluster.daemon_pid("node2").unwrap());
    cluster.wait_state("node1", "ALONE", SETTLE).unwrap();
    let alone_at = acked();
    eventually(SETTLE, "records acknowledged alone", || {
        acked() >= alone_at + 50
    });
    let log = cluster.log_tail("node1", 200);
    assert!(
        log.contains("replication of /srv/tandem-demo/data lost"),
        "{log}"
    );
    assert!(
        log.contains("the secondary will be resynchronised"),
        "{log}"
    );

    cluster.start_daemon("node2").unwrap();
    cluster.tandem_ok("node2", &["start"]).unwrap();
    wait_pair(&cluster, "node1", "node2");
    let back_at = acked();
    eventually(
        SETTLE,
        "records acknowledged with the secondary back",
        || acked() >= back_at + 50,
    );
    kill(&cluster, writer);
    let acked = numbers(&std::fs::read_to_string(&acks).unwrap());
    let last = *acked.last().unwrap() as usize;
    let on_node2 = numbers(&sh_ok(&cluster, "node2", &format!("cat {ledger}")));
    assert!(
        on_node2.len() >= last && on_node2[..last] == acked[..],
        "node2 lacks acknowledged records: acknowledged {last}, node2 has {}",
        on_node2.len()
    );
    // Both backing files are the same.
    let backing =
        |node: &str| std::fs::read(cluster.node_dir(node).unwrap().join("data/0/ledger")).unwrap();
    eventually(Duration::from_secs(10), "identical ledgers", || {
        backing("node1") == backing("node2")
    });
}
