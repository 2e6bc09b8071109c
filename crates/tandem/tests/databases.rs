//! Real applications on the replicated directory (issue 4 acceptance): SQLite in WAL mode and
//! PostgreSQL keep their data in the replicated directory of the primary; the primary is crashed
//! (`kill -9` of its daemon and of the application) mid-stream; on the other node, alone, the
//! database opens (PostgreSQL after its crash recovery), is intact, and holds every transaction
//! whose commit was acknowledged to its client.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use tandem::cluster::Cluster;

const SETTLE: Duration = Duration::from_secs(60);

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Both nodes' module logs, daemon output and PostgreSQL logs, for failure messages.
fn logs(cluster: &Cluster) -> String {
    let mut text = String::new();
    for node in ["node1", "node2"] {
        let dir = cluster.node_dir(node).unwrap();
        text += &format!("==== {node} module log\n{}\n", cluster.log_tail(node, 80));
        text += &format!(
            "==== {node} daemon output\n{}\n",
            tail(&read(&dir.join("daemon.out")), 60)
        );
        let postgres = read(&dir.join("pg/postgres.log"));
        if !postgres.is_empty() {
            text += &format!("==== {node} PostgreSQL log\n{}\n", tail(&postgres, 60));
        }
    }
    text
}

fn checked(cluster: &Cluster, what: &str, node: &str, command: &mut Command) -> String {
    let output: Output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{what} on {node} failed ({}):\n{}{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        logs(cluster)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a shell command inside a node (its network and mount namespaces); it must succeed.
fn sh_ok(cluster: &Cluster, node: &str, script: &str) -> String {
    let mut command = cluster.lab.command(node, "sh").unwrap();
    command.arg("-c").arg(script);
    checked(cluster, &format!("`{script}`"), node, &mut command)
}

fn wait_alone(cluster: &Cluster, node: &str) {
    if let Err(error) = cluster.wait_state(node, "ALONE", SETTLE) {
        panic!("{error:#}\n{}", logs(cluster));
    }
}

/// Checks a ledger after the failover: the acknowledgement log is 1..=last, and the rows found
/// are 1..=m with `last <= m <= last + 1` (one more commit may have been in flight: durable on
/// both nodes, but its acknowledgement did not reach the client before the crash).
fn check_ledger(what: &str, acked: &[u64], rows: &[u64]) {
    let last = acked.last().copied().unwrap_or(0);
    assert_eq!(
        acked,
        (1..=last).collect::<Vec<_>>(),
        "{what}: the acknowledgement log"
    );
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|n| rows.binary_search(n).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} acknowledged transactions are lost (acknowledged 1..={last}, {} rows \
         found); lost: {missing:?}",
        missing.len(),
        rows.len()
    );
    let found = rows.len() as u64;
    assert!(
        rows == (1..=found).collect::<Vec<_>>() && found <= last + 1,
        "{what}: rows are not 1..=m with {last} <= m <= {}: {} rows, last {:?}",
        last + 1,
        rows.len(),
        rows.last()
    );
}

/// SQLite in WAL mode with `synchronous=FULL`: one `sqlite3` process on the primary commits
/// numbered rows, one transaction each, and logs each number outside the replicated directory
/// once its commit returned; the primary crashes mid-stream; on the other node, alone, the
/// database passes `PRAGMA integrity_check`, holds every logged row, and takes new writes.
#[test]
fn sqlite_wal_survives_failover() {
    const WANTED: u64 = 400;
    let cluster = cluster();
    bootstrap(&cluster);
    let dir = data("sqlite");
    let db = format!("{dir}/ledger.db");
    sh_ok(&cluster, "node1", &format!("mkdir -p {dir}"));
    let node1 = cluster.node_dir("node1").unwrap();
    let acks = node1.join("sqlite-acks");
    // One connection for the whole run (the WAL is never checkpointed away by a closing last
    // connection); checkpoints every 100 pages, so the crash finds both checkpointed pages in
    // the database file and committed frames in the WAL. `-bail`: the first failed statement
    // ends the process, so no number is logged after a failed commit.
    let generator = format!(
        "printf '%s\\n' 'PRAGMA journal_mode=WAL;' 'PRAGMA synchronous=FULL;' \
         'PRAGMA wal_autocheckpoint=100;' \
         'CREATE TABLE ledger(n INTEGER PRIMARY KEY, payload TEXT NOT NULL);'; \
         i=0; while :; do i=$((i+1)); \
         echo \"INSERT INTO ledger(n, payload) VALUES($i, hex(randomblob(300)));\"; \
         echo \".system echo $i >> {acks}\"; done",
        acks = acks.display()
    );
    let mut command = cluster.lab.command("node1", "bash").unwrap();
    command.arg("-c").arg(format!(
        "exec sqlite3 -bail -cmd '.timeout 10000' {db} < <({generator})"
    ));
    let writer = cluster
        .lab
        .spawn("node1", &mut command, node1.join("sqlite-writer.out"))
        .unwrap();
    eventually(SETTLE, "the SQLite writer to commit rows", || {
        if !cluster.lab.is_alive(writer) {
            panic!(
                "the SQLite writer exited:\n{}\n{}",
                read(&node1.join("sqlite-writer.out")),
                logs(&cluster)
            );
        }
        numbers(&read(&acks)).len() as u64 >= WANTED
    });
    // The WAL is in use: the file exists beside the database.
    sh_ok(&cluster, "node1", &format!("test -s {db}-wal"));

    // Crash of the primary: its daemon, then the writer.
    kill_daemon(&cluster, "node1");
    kill(&cluster, writer);
    let acked = numbers(&read(&acks));
    wait_alone(&cluster, "node2");
    // The recovery on node2 has committed frames to read from the replicated WAL.
    sh_ok(&cluster, "node2", &format!("test -s {db}-wal"));

    let output = sh_ok(
        &cluster,
        "node2",
        &format!(
            "sqlite3 -bail -cmd '.timeout 10000' {db} 'PRAGMA integrity_check;' 'PRAGMA journal_mode;' \
             'SELECT n FROM ledger ORDER BY n;'"
        ),
    );
    let mut lines = output.lines();
    assert_eq!(lines.next(), Some("ok"), "integrity_check:\n{output}");
    assert_eq!(lines.next(), Some("wal"), "journal_mode:\n{output}");
    let rows = numbers(&lines.collect::<Vec<_>>().join("\n"));
    check_ledger("SQLite ledger", &acked, &rows);
    eprintln!(
        "sqlite: {} commits acknowledged, {} rows on node2",
        acked.len(),
        rows.len()
    );

    // The new primary writes to the database.
    let next = rows.len() + 1;
    let count = sh_ok(
        &cluster,
        "node2",
        &format!(
            "sqlite3 -bail -cmd '.timeout 10000' {db} 'PRAGMA synchronous=FULL;' \
             'INSERT INTO ledger(n, payload) VALUES({next}, hex(randomblob(300)));' \
             'PRAGMA integrity_check;' 'SELECT count(*) FROM ledger;'"
        ),
    );
    assert_eq!(count, format!("ok\n{next}\n"));
}

/// The newest installed PostgreSQL's programs (Debian: `/usr/lib/postgresql/<major>/bin`).
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (scripts/install-deps.sh installs it)")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("no /usr/lib/postgresql/<major>/bin/initdb")
        .1
}

const PG_PORT: u16 = 5432;

/// A node's PostgreSQL directory outside the replicated one (socket and server log), owned by
/// `postgres`.
fn pg_node_dir(cluster: &Cluster, node: &str) -> PathBuf {
    let dir = cluster.node_dir(node).unwrap().join("pg");
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "chown postgres {}", dir.display());
    dir
}

/// `program` of PostgreSQL run as the `postgres` user inside `node` (the server refuses root).
fn as_postgres(cluster: &Cluster, node: &str, program: &str) -> Command {
    let mut command = cluster.lab.command(node, "runuser").unwrap();
    command
        .args(["-u", "postgres", "--"])
        .arg(pg_bin().join(program));
    command
}

/// Parent PID of a process (from `/proc/PID/stat`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    after.split_whitespace().nth(1)?.parse().ok()
}

fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent))
        .collect()
}

/// A PostgreSQL server this test started inside a node. Dropping it kills the postmaster and
/// its children (SIGKILL) if they still run, so no server outlives a failed test, and removes
/// the System V shared memory segment a killed server leaves.
struct Postgres<'a> {
    cluster: &'a Cluster,
    node: &'static str,
    pgdata: String,
    socket_dir: PathBuf,
    /// The postmaster's PID as this process sees it (`postmaster.pid` has the node's own).
    pid: u32,
    /// The postmaster's System V segment (`postmaster.pid`, line 7: key and id).
    shmid: Option<String>,
}

impl<'a> Postgres<'a> {
    /// `pg_ctl start` on `pgdata`, listening on a Unix socket only, in a directory of the node's
    /// own (outside the replicated directory).
    fn start(cluster: &'a Cluster, node: &'static str, pgdata: &str) -> Postgres<'a> {
        let socket_dir = pg_node_dir(cluster, node);
        let mut command = as_postgres(cluster, node, "pg_ctl");
        command
            .args(["-D", pgdata, "-l"])
            .arg(socket_dir.join("postgres.log"))
            .args(["-w", "-t", "180", "-o"])
            .arg(format!(
                "-k {} -p {PG_PORT} -c listen_addresses=''",
                socket_dir.display()
            ))
            .arg("start");
        checked(cluster, "pg_ctl start", node, &mut command);
        let pid_file = sh_ok(cluster, node, &format!("cat {pgdata}/postmaster.pid"));
        let lines: Vec<&str> = pid_file.lines().collect();
        let pid = lines[0].trim().parse().unwrap();
        let pid = cluster
            .lab
            .outer_pid(node, pid)
            .unwrap()
            .unwrap_or_else(|| panic!("no postmaster {pid} in {node}:\n{pid_file}"));
        let shmid = lines
            .get(6)
            .and_then(|line| line.split_whitespace().nth(1))
            .map(str::to_owned);
        Postgres {
            cluster,
            node,
            pgdata: pgdata.to_owned(),
            socket_dir,
            pid,
            shmid,
        }
    }

    /// A client program (run as root, connecting as `postgres` through the socket).
    fn client(&self, program: &str) -> Command {
        let mut command = self
            .cluster
            .lab
            .command(self.node, pg_bin().join(program))
            .unwrap();
        command.arg("-h").arg(&self.socket_dir).args([
            "-p",
            &PG_PORT.to_string(),
            "-U",
            "postgres",
        ]);
        command
    }

    fn run(&self, what: &str, command: &mut Command) -> String {
        checked(self.cluster, what, self.node, command)
    }

    /// `psql -c SQL` on database `postgres`, unaligned tuples only; returns the output.
    fn psql(&self, sql: &str) -> String {
        let mut command = self.client("psql");
        command.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-c",
            sql,
        ]);
        self.run(&format!("psql -c {sql:?}"), &mut command)
    }

    /// Crashes the server: SIGKILL to the postmaster (stopped first so that it forks no new
    /// child meanwhile) and to every child it had; then removes its shared memory segment (the
    /// server that recovers on the other node may not recognise it as its own).
    fn crash(&self) {
        let lab = &self.cluster.lab;
        if !lab.is_alive(self.pid) {
            return;
        }
        let _ = lab.kill(self.pid, libc::SIGSTOP);
        let children = children_of(self.pid);
        for &pid in std::iter::once(&self.pid).chain(&children) {
            let _ = lab.kill(pid, libc::SIGKILL);
        }
        for &pid in std::iter::once(&self.pid).chain(&children) {
            if let Err(error) = lab.wait_exit(pid, Duration::from_secs(10)) {
                eprintln!("postgres process {pid}: {error:#}");
            }
        }
        if let Some(shmid) = &self.shmid {
            // In the node's own IPC namespace; fails harmlessly when already removed.
            let mut ipcrm = lab.command(self.node, "ipcrm").unwrap();
            let _ = ipcrm.args(["-m", shmid]).output();
        }
    }

    /// `pg_ctl stop -m fast`; it must succeed.
    fn stop(&self) {
        let mut command = as_postgres(self.cluster, self.node, "pg_ctl");
        command.args(["-D", &self.pgdata, "-m", "fast", "-w", "-t", "120", "stop"]);
        self.run("pg_ctl stop -m fast", &mut command);
        self.cluster
            .lab
            .wait_exit(self.pid, Duration::from_secs(10))
            .unwrap();
    }
}

impl Drop for Postgres<'_> {
    fn drop(&mut self) {
        self.crash();
    }
}

fn parse_field(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// PostgreSQL with its data directory in the replicated directory of node1 (`initdb` with real
/// fsyncs, `fsync`, `synchronous_commit` and `full_page_writes` on): `pgbench -i -s 2`, a
/// 5-second `pgbench` run, then a ledger (one committed transaction per number, each logged only
/// once `psql` returned success) while `pgbench` keeps running; node1's daemon and every
/// PostgreSQL process are killed with SIGKILL mid-stream; on node2, alone, PostgreSQL starts on
/// the same directory (crash recovery), the ledger holds every acknowledged number, `pg_amcheck`
/// finds no corruption, the pgbench tables are complete and their balances agree.
#[test]
fn postgresql_survives_failover_with_every_committed_transaction() {
    const WANTED: u64 = 150;
    let cluster = cluster();
    bootstrap(&cluster);
    let pgdata = data("pg");
    sh_ok(
        &cluster,
        "node1",
        &format!("mkdir {pgdata} && chown postgres:postgres {pgdata} && chmod 700 {pgdata}"),
    );
    let started = Instant::now();
    let mut initdb = as_postgres(&cluster, "node1", "initdb");
    initdb.args([
        "-D",
        &pgdata,
        "--locale=C",
        "-E",
        "UTF8",
        "-A",
        "trust",
        "-U",
        "postgres",
    ]);
    checked(&cluster, "initdb", "node1", &mut initdb);
    eprintln!("postgres: initdb took {:?}", started.elapsed());
    sh_ok(
        &cluster,
        "node1",
        &format!(
            "printf '%s\\n' 'fsync = on' 'synchronous_commit = on' 'full_page_writes = on' \
             >> {pgdata}/postgresql.conf"
        ),
    );
    let primary = Postgres::start(&cluster, "node1", &pgdata);
    assert_eq!(
        primary.psql(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit'), \
             current_setting('full_page_writes')"
        ),
        "on|on|on\n"
    );

    // pgbench: initialisation, then a 5-second run with 4 clients.
    let mut init = primary.client("pgbench");
    init.args(["-i", "-s", "2", "postgres"]);
    primary.run("pgbench -i -s 2", &mut init);
    let mut bench = primary.client("pgbench");
    bench.args(["-c", "4", "-T", "5", "postgres"]);
    let report = primary.run("pgbench -c 4 -T 5", &mut bench);
    let tps = parse_field(&report, "tps =").unwrap_or(0.0);
    let processed = parse_field(&report, "number of transactions actually processed:");
    let failed = parse_field(&report, "number of failed transactions:").unwrap_or(0.0);
    assert!(
        tps > 0.0 && processed.is_some_and(|n| n > 0.0) && failed == 0.0,
        "pgbench report:\n{report}"
    );
    eprintln!("postgres: pgbench -c 4 -T 5: {tps} tps");
    let history_before: u64 = primary
        .psql("SELECT count(*) FROM pgbench_history")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(history_before as f64, processed.unwrap(), "{report}");
    // A checkpoint: the pages the ledger and the background load change next are written with
    // full-page images, which the recovery on node2 replays.
    primary.psql("CREATE TABLE ledger (n integer PRIMARY KEY, payload text NOT NULL)");
    primary.psql("CHECKPOINT");

    // The ledger, with pgbench running beside it.
    let node1 = cluster.node_dir("node1").unwrap();
    let mut load = primary.client("pgbench");
    // `-n`: no vacuum first (it would truncate pgbench_history).
    load.args(["-n", "-c", "2", "-T", "600", "postgres"]);
    let load = cluster
        .lab
        .spawn("node1", &mut load, node1.join("pgbench-load.out"))
        .unwrap();
    let acks = node1.join("pg-acks");
    let psql = pg_bin().join("psql");
    let writer_script = format!(
        "i=0; while :; do i=$((i+1)); \
         {psql} -X -q -v ON_ERROR_STOP=1 -h {socket} -p {PG_PORT} -U postgres -d postgres \
         -c \"INSERT INTO ledger VALUES ($i, repeat('x', 200))\" || exit 1; \
         echo $i >> {acks}; done",
        psql = psql.display(),
        socket = primary.socket_dir.display(),
        acks = acks.display()
    );
    let mut command = cluster.lab.command("node1", "sh").unwrap();
    command.arg("-c").arg(&writer_script);
    let writer = cluster
        .lab
        .spawn("node1", &mut command, node1.join("pg-writer.out"))
        .unwrap();
    eventually(SETTLE, "the ledger writer to commit rows", || {
        for (pid, name, out) in [
            (writer, "ledger writer", "pg-writer.out"),
            (load, "pgbench load", "pgbench-load.out"),
        ] {
            if !cluster.lab.is_alive(pid) {
                panic!(
                    "the {name} exited:\n{}\n{}",
                    read(&node1.join(out)),
                    logs(&cluster)
                );
            }
        }
        numbers(&read(&acks)).len() as u64 >= WANTED
    });

    // Crash of the primary: its daemon, the clients, and every PostgreSQL process.
    kill_daemon(&cluster, "node1");
    kill(&cluster, writer);
    kill(&cluster, load);
    primary.crash();
    let acked = numbers(&read(&acks));
    wait_alone(&cluster, "node2");
    // node2: crash recovery on the same directory.
    let started = Instant::now();
    let secondary = Postgres::start(&cluster, "node2", &pgdata);
    eprintln!(
        "postgres: start with crash recovery on node2 took {:?}",
        started.elapsed()
    );
    let rows = numbers(&secondary.psql("SELECT n FROM ledger ORDER BY n"));
    check_ledger("PostgreSQL ledger", &acked, &rows);
    eprintln!(
        "postgres: {} ledger commits acknowledged, {} rows on node2",
        acked.len(),
        rows.len()
    );

    let mut amcheck = secondary.client("pg_amcheck");
    amcheck.args([
        "--all",
        "--install-missing",
        "--heapallindexed",
        "--rootdescend",
    ]);
    let output = amcheck.output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "pg_amcheck ({}):\n{}{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        logs(&cluster)
    );

    // pgbench's tables: complete, and every transaction applied atomically (the balances of
    // accounts, tellers and branches and the history's deltas agree), including those of the
    // load cut by the crash.
    let consistency = secondary.psql(
        "SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_tellers), \
         (SELECT count(*) FROM pgbench_branches), (SELECT count(*) FROM pgbench_history), \
         (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM \
         pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(delta) \
         FROM pgbench_history)",
    );
    let fields: Vec<i64> = consistency
        .trim()
        .split('|')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(fields[..3], [200_000, 20, 2], "{consistency}");
    assert!(fields[3] >= history_before as i64, "{consistency}");
    assert!(
        fields[4..].iter().all(|&sum| sum == fields[7]),
        "pgbench balances disagree (accounts|tellers|branches|history): {consistency}"
    );

    // The new primary takes writes, and stops cleanly.
    let next = rows.len() + 1;
    secondary.psql(&format!(
        "INSERT INTO ledger VALUES ({next}, 'after failover')"
    ));
    secondary.stop();
}
