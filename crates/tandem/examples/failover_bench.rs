//! Failover benchmark (run by `bench/failover.sh`, as root).
//!
//! 1. Failover time: from `kill -9` of the primary's daemon (its guard then removes the VIP and
//!    stops the application there) to the first successful request to the VIP from the client
//!    namespace that the *new* primary answers; over `--runs` runs (default 10), alternating the primary; p50/p95 printed.
//! 2. False failovers: `--soak` seconds (default 300) with both cores saturated by CPU hogs and a
//!    disk writer; any transition or epoch change of either node during that time is a false
//!    failover.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tandem::cluster::{APP_PORT, Cluster, ClusterSpec};
use tandem_lab::LabSpec;

fn main() -> anyhow::Result<()> {
    let mut runs = 10usize;
    let mut soak = 300u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().unwrap_or_default().parse()?,
            "--soak" => soak = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other}; use --runs N --soak SECONDS"),
        }
    }
    let binary = std::env::current_exe()?
        .parent()
        .and_then(|dir| dir.parent())
        .map(|dir| dir.join("tandem"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("target/release/tandem"));
    println!(
        "tandem failover benchmark ({}), default settings: pulse 250ms, timeout 2s",
        binary.display()
    );
    let cluster = Cluster::create(
        &ClusterSpec::new(LabSpec::new(["node1", "node2", "client"])),
        &binary,
    )?;
    cluster.bootstrap()?;

    let mut times = Vec::new();
    let mut primary = "node1";
    for run in 1..=runs {
        let secondary = if primary == "node1" { "node2" } else { "node1" };
        wait_answer(&cluster, primary, Duration::from_secs(30))?;
        let daemon = cluster
            .daemon_pid(primary)
            .ok_or_else(|| anyhow::anyhow!("no daemon on {primary}"))?;
        let started = Instant::now();
        cluster.lab.kill(daemon, libc::SIGKILL)?;
        wait_answer(&cluster, secondary, Duration::from_secs(60))?;
        let elapsed = started.elapsed();
        println!(
            "run {run:2}: {primary} killed, {secondary} answered on the VIP after {:.3} s",
            elapsed.as_secs_f64()
        );
        times.push(elapsed);
        cluster.lab.wait_exit(daemon, Duration::from_secs(10))?;
        cluster.start_daemon(primary)?;
        cluster.tandem_ok(primary, &["start"])?;
        cluster.wait_state(primary, "SECOND", Duration::from_secs(30))?;
        cluster.wait_state(secondary, "PRIM", Duration::from_secs(30))?;
        primary = secondary;
    }
    times.sort();
    let percentile =
        |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize].as_secs_f64();
    if !times.is_empty() {
        println!(
            "failover time over {} runs: p50 {:.3} s, p95 {:.3} s, min {:.3} s, max {:.3} s (target p50 <= 2.5 s)",
            times.len(),
            percentile(0.5),
            percentile(0.95),
            times[0].as_secs_f64(),
            times[times.len() - 1].as_secs_f64()
        );
    }

    if soak > 0 {
        println!("soak: {soak} s with both cores saturated (2 CPU hogs + a disk writer)...");
        let before = [cluster.status("node1")?, cluster.status("node2")?];
        let mut load = start_load(&cluster)?;
        let deadline = Instant::now() + Duration::from_secs(soak);
        let mut changes = 0;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(1));
            for (index, node) in ["node1", "node2"].iter().enumerate() {
                let now = cluster.status(node)?;
                let module = &now["modules"][0];
                let was = &before[index]["modules"][0];
                if module["state"] != was["state"]
                    || module["epoch"] != was["epoch"]
                    || module["ready"] != true
                {
                    changes += 1;
                    println!(
                        "  {node}: {} {} epoch {} (was {} epoch {})",
                        module["state"],
                        module["ready"],
                        module["epoch"],
                        was["state"],
                        was["epoch"]
                    );
                }
            }
        }
        for child in &mut load {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(cluster.lab.dir().join("load.bin"));
        println!("soak done: {} false failover observation(s)", changes);
    }
    cluster.destroy()?;
    Ok(())
}

fn start_load(cluster: &Cluster) -> anyhow::Result<Vec<Child>> {
    let mut children = Vec::new();
    for _ in 0..2 {
        children.push(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()?,
        );
    }
    let file = cluster.lab.dir().join("load.bin");
    children.push(
        Command::new("sh")
            .args(["-c", &format!("while :; do dd if=/dev/zero of={} bs=1M count=256 conv=fsync status=none; done", file.display())])
            .spawn()?,
    );
    Ok(children)
}

/// Waits until a request to the VIP from the client is answered by `node`.
fn wait_answer(cluster: &Cluster, node: &str, timeout: Duration) -> anyhow::Result<()> {
    let address = SocketAddr::from((cluster.vip, APP_PORT));
    let prefix = format!("{node}: request");
    let deadline = Instant::now() + timeout;
    loop {
        let answer = cluster.lab.in_netns("client", move || -> Option<String> {
            let mut stream =
                TcpStream::connect_timeout(&address, Duration::from_millis(200)).ok()?;
            stream
                .set_read_timeout(Some(Duration::from_millis(500)))
                .ok()?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            text.lines().last().map(str::to_owned)
        })?;
        if answer.is_some_and(|answer| answer.starts_with(&prefix)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{node} did not answer on the VIP within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
