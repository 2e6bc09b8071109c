//! Real daemons in the lab (spec §8): each test builds its own namespaces on a private bridge,
//! runs two `tandem daemon`s and a client, breaks things, and checks what users would see. The lab
//! is removed when the test ends, also when it fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{binary, eventually, kill_daemon};
use tandem::cluster::{APP_PORT, Cluster, ClusterSpec};
use tandem_lab::LabSpec;

const SETTLE: Duration = Duration::from_secs(30);

fn spec() -> ClusterSpec {
    ClusterSpec::new(LabSpec::new(["node1", "node2", "client"]))
}

fn cluster(spec: &ClusterSpec) -> Cluster {
    Cluster::create(spec, &binary()).unwrap()
}

/// One HTTP request to the sample application on the VIP, from the client host.
fn request(cluster: &Cluster) -> Option<String> {
    let address = SocketAddr::from((cluster.vip, APP_PORT));
    cluster
        .lab
        .in_netns("client", move || -> Option<String> {
            let mut stream =
                TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).ok()?;
            answer.lines().last().map(str::to_owned)
        })
        .ok()
        .flatten()
}

fn neighbour_mac(cluster: &Cluster, address: Ipv4Addr) -> Option<String> {
    let output = cluster
        .lab
        .run("client", &["ip", "neigh", "show", &address.to_string()])
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .iter()
        .position(|word| *word == "lladdr")
        .map(|index| words[index + 1].to_lowercase())
}

fn state(cluster: &Cluster, node: &str) -> (String, bool) {
    let status = cluster.status(node).unwrap();
    let module = &status["modules"][0];
    (
        module["state"].as_str().unwrap().to_owned(),
        module["ready"].as_bool().unwrap(),
    )
}

fn log_contains(cluster: &Cluster, node: &str, needle: &str) -> bool {
    std::fs::read_to_string(cluster.module_log(node).unwrap())
        .map(|text| text.contains(needle))
        .unwrap_or(false)
}

/// Scripts that append `<node> <script> <args>` to one trace file shared by both nodes, so the
/// order of script calls across the two nodes can be checked.
fn tracing_scripts(dir: &Path, trace: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let scripts = dir.join("trace-scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    for name in [
        "prestart",
        "start_prim",
        "stop_prim",
        "start_second",
        "stop_second",
        "poststop",
        "transition",
    ] {
        let path = scripts.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$TANDEM_NODE {name} $*\" >> {trace}\n\
                 echo \"$TANDEM_MODULE $TANDEM_NODE $TANDEM_STATE $TANDEM_CONFIG\" >> {trace}.env\n",
                trace = trace.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    scripts
}

fn trace_lines(trace: &Path) -> Vec<String> {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn position(lines: &[String], wanted: &str) -> usize {
    lines
        .iter()
        .position(|line| line == wanted)
        .unwrap_or_else(|| panic!("{wanted:?} not in trace:\n{}", lines.join("\n")))
}

#[test]
fn both_start_one_prim_one_second_and_the_vip_answers() {
    let cluster = cluster(&spec());
    cluster.bootstrap().unwrap();
    assert_eq!(state(&cluster, "node1"), ("PRIM".into(), true));
    assert_eq!(state(&cluster, "node2"), ("SECOND".into(), true));
    let status = cluster.status("node1").unwrap();
    assert_eq!(status["modules"][0]["vip"]["held"], true);
    assert_eq!(status["modules"][0]["peer"]["state"], "SECOND");
    assert_eq!(status["modules"][0]["uptodate"], true);
    eventually(SETTLE, "the VIP to answer from node1", || {
        request(&cluster).is_some_and(|answer| answer.starts_with("node1: request"))
    });

    // The fields of `status --json` that the spec fixes.
    let module = &status["modules"][0];
    assert_eq!(status["node"], "node1");
    for key in ["name", "state", "ready", "uptodate"] {
        assert!(
            !module[key].is_null(),
            "status lacks modules[].{key}: {status}"
        );
    }
    assert_eq!(module["peer"]["name"], "node2");
    assert_eq!(module["peer"]["reachable"], true);
    assert_eq!(module["vip"]["addr"], format!("{}/24", cluster.vip));
    assert_eq!(module["resync"]["active"], false);
    assert!(module["resync"]["done_bytes"].is_u64() && module["resync"]["total_bytes"].is_u64());

    // `tandem state` answers with the state as exit code.
    assert_eq!(
        cluster.tandem("node1", &["state"]).unwrap().status.code(),
        Some(3)
    );
    assert_eq!(
        cluster.tandem("node2", &["state"]).unwrap().status.code(),
        Some(4)
    );
    let waited = cluster
        .tandem("node2", &["wait-state", "PRIM", "--timeout", "300ms"])
        .unwrap();
    assert_eq!(
        waited.status.code(),
        Some(11),
        "wait-state times out with 11"
    );

    // Scripts write to the module log with printi/printe; `tandem log` shows it.
    assert!(log_contains(
        &cluster,
        "node1",
        "sample application started"
    ));
    cluster
        .tandem_ok("node1", &["printe", "something", "broke"])
        .unwrap();
    let log = cluster.tandem_ok("node1", &["log", "-n", "5"]).unwrap();
    assert!(
        log.lines().any(|line| line.ends_with(" E something broke")),
        "{log}"
    );
    let app_log = cluster
        .tandem_ok("node1", &["log", "--app", "-n", "50"])
        .unwrap();
    assert!(
        app_log.contains("[start_prim] start: WAIT ALONE start"),
        "{app_log}"
    );
    // Refused commands explain themselves and exit 10.
    let refused = cluster.tandem("node2", &["prim"]).unwrap();
    assert_eq!(refused.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("node1 is primary"));
    // The human status names both nodes and their states.
    let human = cluster.tandem_ok("node1", &["status"]).unwrap();
    assert!(
        human.contains("PRIM ready") && human.contains("SECOND ready"),
        "{human}"
    );
}

#[test]
fn kill_of_the_primary_fails_over_moves_the_vip_and_the_node_comes_back_second() {
    let cluster = cluster(&spec());
    cluster.bootstrap().unwrap();
    let node1_mac = cluster.lab.host("node1").unwrap().mac.to_lowercase();
    let node2_mac = cluster.lab.host("node2").unwrap().mac.to_lowercase();
    eventually(SETTLE, "the VIP to answer from node1", || {
        request(&cluster).is_some()
    });
    assert_eq!(neighbour_mac(&cluster, cluster.vip), Some(node1_mac));

    // (2) kill -9 of the primary's daemon: node2 goes ALONE, runs start_prim, holds the VIP.
    let app_pid: i32 = std::fs::read_to_string(
        cluster
            .node_dir("node1")
            .unwrap()
            .join("log/demo/sample-app.pid"),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    kill_daemon(&cluster, "node1");
    // The dead daemon's guard fences node1: its VIP is removed and its application stopped, so
    // no duplicate address and no second copy of the application remain.
    eventually(
        SETTLE,
        "node1's guard to remove the VIP and stop the app",
        || {
            let output = cluster
                .lab
                .run("node1", &["ip", "-o", "addr", "show", "dev", "eth0"])
                .unwrap();
            let has_vip =
                String::from_utf8_lossy(&output.stdout).contains(&format!(" {}/", cluster.vip));
            let stat = std::fs::read_to_string(format!("/proc/{app_pid}/stat")).unwrap_or_default();
            let app_alive = !stat.is_empty() && stat.split_whitespace().nth(2) != Some("Z");
            !has_vip && !app_alive
        },
    );
    assert!(log_contains(
        &cluster,
        "node1",
        "guard: the daemon died; removed virtual IP"
    ));
    cluster.wait_state("node2", "ALONE", SETTLE).unwrap();
    let status = cluster.status("node2").unwrap();
    assert_eq!(status["modules"][0]["vip"]["held"], true);
    assert!(log_contains(
        &cluster,
        "node2",
        "script start_prim SECOND ALONE auto: exit 0"
    ));
    // The client's neighbour entry points at node2 without waiting for ARP expiry (minutes).
    eventually(
        Duration::from_secs(5),
        "the client's ARP entry to move to node2",
        || neighbour_mac(&cluster, cluster.vip).as_deref() == Some(node2_mac.as_str()),
    );
    eventually(SETTLE, "the VIP to answer from node2", || {
        request(&cluster).is_some_and(|answer| answer.starts_with("node2: request"))
    });

    // (3) the killed node restarts and becomes SECOND; node2 becomes PRIM.
    cluster.start_daemon("node1").unwrap();
    cluster.tandem_ok("node1", &["start"]).unwrap();
    cluster.wait_state("node1", "SECOND", SETTLE).unwrap();
    cluster.wait_state("node2", "PRIM", SETTLE).unwrap();

    let status = cluster.status("node1").unwrap();
    assert_eq!(status["modules"][0]["vip"]["held"], false);
}

#[test]
fn swap_exchanges_roles_with_scripts_in_order() {
    let mut spec = spec();
    let work = tempfile::tempdir().unwrap();
    let trace = work.path().join("trace");
    spec.scripts = Some(tracing_scripts(work.path(), &trace));
    let cluster = cluster(&spec);
    cluster.bootstrap().unwrap();
    std::fs::write(&trace, "").unwrap();

    cluster.tandem_ok("node2", &["swap"]).unwrap();
    cluster.wait_state("node2", "PRIM", SETTLE).unwrap();
    cluster.wait_state("node1", "SECOND", SETTLE).unwrap();

    let lines = trace_lines(&trace);
    let stop_prim = position(&lines, "node1 stop_prim PRIM SECOND swap");
    let stop_second = position(&lines, "node2 stop_second SECOND ALONE swap");
    let transition = position(&lines, "node2 transition SECOND ALONE swap");
    let start_prim = position(&lines, "node2 start_prim SECOND ALONE swap");
    let start_second = position(&lines, "node1 start_second PRIM SECOND swap");
    assert!(
        stop_prim < stop_second,
        "the primary stops before the secondary moves:\n{lines:#?}"
    );
    assert!(
        stop_second < transition && transition < start_prim,
        "{lines:#?}"
    );
    assert!(
        start_prim > stop_prim && start_second > stop_prim,
        "{lines:#?}"
    );
    let status = cluster.status("node2").unwrap();
    assert_eq!(status["modules"][0]["vip"]["held"], true);
    let status = cluster.status("node1").unwrap();
    assert_eq!(status["modules"][0]["vip"]["held"], false);
    // Both holders checked on the interfaces themselves.
    let address = cluster.vip.to_string();
    let holds = |node: &str| {
        let output = cluster
            .lab
            .run(node, &["ip", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        String::from_utf8_lossy(&output.stdout).contains(&format!(" {address}/"))
    };
    assert!(holds("node2") && !holds("node1"));
    // Scripts get the module, node, current state and configuration in their environment.
    let env = std::fs::read_to_string(trace.with_extension("env")).unwrap();
    let config = cluster.config_path("node1").unwrap();
    assert!(
        env.contains(&format!("demo node1 PRIM {}", config.display())),
        "{env}"
    );
}

#[test]
fn graceful_stop_of_the_primary_fails_over_after_its_stop_scripts() {
    let mut spec = spec();
    let work = tempfile::tempdir().unwrap();
    let trace = work.path().join("trace");
    spec.scripts = Some(tracing_scripts(work.path(), &trace));
    let cluster = cluster(&spec);
    cluster.bootstrap().unwrap();
    std::fs::write(&trace, "").unwrap();

    cluster.tandem_ok("node1", &["stop"]).unwrap();
    cluster.wait_state("node1", "STOP", SETTLE).unwrap();
    cluster.wait_state("node2", "ALONE", SETTLE).unwrap();
    let lines = trace_lines(&trace);
    let stop_prim = position(&lines, "node1 stop_prim PRIM WAIT stop");
    let start_prim = position(&lines, "node2 start_prim SECOND ALONE auto");
    assert!(stop_prim < start_prim, "{lines:#?}");
    position(&lines, "node1 poststop WAIT STOP stop");
    assert!(log_contains(&cluster, "node2", "left the primary role"));
}

#[test]
fn with_failover_off_the_secondary_waits() {
    let mut spec = spec();
    spec.failover = false;
    let cluster = cluster(&spec);
    cluster.bootstrap().unwrap();
    kill_daemon(&cluster, "node1");
    cluster.wait_state("node2", "WAIT", SETTLE).unwrap();
    // It stays there: watch it for three heartbeat timeouts.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(state(&cluster, "node2").0, "WAIT");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(log_contains(&cluster, "node2", "failover is off"));
    // The operator decides.
    cluster.tandem_ok("node2", &["prim"]).unwrap();
    cluster.wait_state("node2", "ALONE", SETTLE).unwrap();
}

#[test]
fn a_peer_with_the_wrong_cluster_secret_is_refused_and_logged() {
    let cluster = cluster(&spec());
    let config_path = cluster.config_path("node2").unwrap();
    let config = std::fs::read_to_string(&config_path).unwrap();
    let other = tandem_config::try_generate_secret().unwrap();
    let config: String = config
        .lines()
        .map(|line| {
            if line.starts_with("secret = ") {
                format!("secret = {other:?}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config_path, config).unwrap();
    cluster.start_daemon("node1").unwrap();
    cluster.start_daemon("node2").unwrap();
    eventually(SETTLE, "node1 to log the refused heartbeats", || {
        log_contains(&cluster, "node1", "refused udp traffic from")
            && log_contains(&cluster, "node1", "authentication failed")
    });
    eventually(SETTLE, "node1 to log the refused channel", || {
        log_contains(&cluster, "node1", "refused tcp traffic from")
    });
    let status = cluster.status("node1").unwrap();
    assert_eq!(status["peer"]["reachable"], false);
    assert_eq!(status["peer"]["channel"], false);
    // Neither sees the other: node1 forced primary runs alone; node2 waits for its peer.
    cluster.tandem_ok("node1", &["prim"]).unwrap();
    cluster.wait_state("node1", "ALONE", SETTLE).unwrap();
    cluster.tandem_ok("node2", &["start"]).unwrap();
    cluster.wait_state("node2", "WAIT", SETTLE).unwrap();
    assert_eq!(cluster.status("node2").unwrap()["peer"]["reachable"], false);
}

#[test]
fn garbage_on_the_heartbeat_and_channel_ports_is_ignored_and_logged() {
    let cluster = cluster(&spec());
    cluster.bootstrap().unwrap();
    let target = cluster.lab.host("node1").unwrap().addr;
    cluster
        .lab
        .in_netns("client", move || {
            let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut noise = |length: usize| -> Vec<u8> {
                (0..length)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (seed & 0xff) as u8
                    })
                    .collect()
            };
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            for length in [0, 1, 16, 60, 200, 1400, 9000] {
                let _ = socket.send_to(&noise(length), (target, 9021));
            }
            let mut forged = b"TDHB".to_vec();
            forged.extend(noise(120));
            let _ = socket.send_to(&forged, (target, 9021));
            for length in [1, 64, 4096, 100_000] {
                if let Ok(mut stream) = TcpStream::connect((target, 9020)) {
                    let _ = stream.write_all(&noise(length));
                }
            }
            // A silent connection must not hold the channel either.
            let _silent = TcpStream::connect((target, 9020));
        })
        .unwrap();
    eventually(SETTLE, "node1 to log the garbage", || {
        log_contains(&cluster, "node1", "refused udp traffic from")
            && log_contains(&cluster, "node1", "refused tcp traffic from")
    });
    // The daemon keeps running and the pair is intact.
    assert!(cluster.daemon_pid("node1").is_some());
    assert_eq!(state(&cluster, "node1"), ("PRIM".into(), true));
    assert_eq!(state(&cluster, "node2"), ("SECOND".into(), true));
    let status = cluster.status("node1").unwrap();
    assert_eq!(status["peer"]["reachable"], true);
}

#[test]
fn link_down_on_the_primary_fails_over() {
    let cluster = cluster(&spec());
    cluster.bootstrap().unwrap();
    cluster.lab.link_down("node1").unwrap();
    cluster.wait_state("node2", "ALONE", SETTLE).unwrap();
    eventually(SETTLE, "node1 to leave the primary role", || {
        state(&cluster, "node1").0 == "WAIT"
    });
    assert!(log_contains(&cluster, "node1", "VIP interface is down"));
    // The link comes back: node1 rejoins as secondary.
    cluster.lab.link_up("node1").unwrap();
    cluster.wait_state("node1", "SECOND", SETTLE).unwrap();
    cluster.wait_state("node2", "PRIM", SETTLE).unwrap();
}

#[test]
fn the_demo_commands_build_describe_run_in_and_remove_the_lab() {
    let demo = |args: &[&str]| {
        std::process::Command::new(binary())
            .arg("demo")
            .args(args)
            .output()
            .unwrap()
    };
    // Never tear down a demo somebody is using: the demo lab has one fixed name.
    assert!(
        !Path::new("/run/tandem-lab/demo").exists(),
        "a demo lab is running on this machine: stop it with `tandem demo down` before the tests"
    );
    let up = demo(&["up"]);
    let result = std::panic::catch_unwind(|| {
        assert!(
            up.status.success(),
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
        assert!(
            String::from_utf8_lossy(&up.stdout).contains("tandem demo exec node1 -- tandem status")
        );
        let info: serde_json::Value =
            serde_json::from_slice(&demo(&["info", "--json"]).stdout).unwrap();
        assert_eq!(info["vip"], "10.77.0.100");
        let hosts = info["hosts"].as_array().unwrap();
        let names: Vec<&str> = hosts
            .iter()
            .map(|host| host["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["node1", "node2", "witness", "client"]);
        for host in &hosts[..2] {
            assert!(host["daemon_pid"].is_u64() && host["config"].is_string());
            assert!(host["namespace"].is_string() && host["address"].is_string());
        }
        let state = demo(&["exec", "node1", "--", "tandem", "state"]);
        assert_eq!(state.status.code(), Some(3), "node1 is PRIM");
        let state = demo(&["exec", "node2", "--", "tandem", "state"]);
        assert_eq!(state.status.code(), Some(4), "node2 is SECOND");
        // Same replicated path on both nodes, different backing directories: what node1 writes
        // is on node2 when the write returns.
        let written = demo(&[
            "exec",
            "node1",
            "--",
            "sh",
            "-c",
            "echo one > /srv/tandem-demo/data/mark",
        ]);
        assert!(written.status.success());
        let read = demo(&["exec", "node2", "--", "cat", "/srv/tandem-demo/data/mark"]);
        assert!(
            read.status.success(),
            "{}",
            String::from_utf8_lossy(&read.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&read.stdout), "one\n");
    });
    let down = demo(&["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        !demo(&["info", "--json"]).status.success(),
        "the lab is gone"
    );
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    the_interactive_demo_tears_everything_down_on_ctrl_c();
}

/// Runs after the detached demo, in the same test: both use the one fixed-name demo lab.
fn the_interactive_demo_tears_everything_down_on_ctrl_c() {
    use std::io::BufRead;
    let free = || !Path::new("/run/tandem-lab/demo").exists();
    assert!(free(), "the detached demo lab is gone");
    let mut child = std::process::Command::new(binary())
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // If the test fails before the demo has ended, stop it and remove its lab anyway.
    // (`Child::kill` does nothing once the child has been waited for: no PID reuse hazard.)
    struct DemoGuard(std::process::Child);
    impl Drop for DemoGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            if Path::new("/run/tandem-lab/demo").exists() {
                let _ = std::process::Command::new(binary())
                    .args(["demo", "down"])
                    .status();
            }
        }
    }
    let mut guard = DemoGuard(child);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Keep reading until the end, so the demo can print while it shuts down.
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line.contains("Press Ctrl-C") {
                let _ = ready_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    ready_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the demo did not come up");
    // SAFETY: kill(2) of the child this test spawned.
    unsafe { libc::kill(guard.0.id() as libc::pid_t, libc::SIGINT) };
    let status = guard.0.wait().unwrap();
    let output = reader.join().unwrap();
    assert!(status.success(), "{output}");
    assert!(output.contains("demo lab removed"), "{output}");
    assert!(free(), "the lab directory is gone");
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&namespaces.stdout).contains("demo"));
}

/// Replaces one of the tracing scripts with a body of its own (which also traces).
fn override_script(scripts: &Path, trace: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = scripts.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$TANDEM_NODE {name} $*\" >> {}\n{body}\n",
            trace.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_hanging_graceful_stop_times_out_then_the_forced_stop_runs_and_the_group_is_killed() {
    let mut spec = spec();
    spec.stop_timeout = "1s".into();
    let work = tempfile::tempdir().unwrap();
    let trace = work.path().join("trace");
    let scripts = tracing_scripts(work.path(), &trace);
    let marker = work.path().join("hung.pid");
    // Graceful: start a child that would outlive us, then hang. Forced: return at once.
    override_script(
        &scripts,
        &trace,
        "stop_prim",
        &format!(
            "[ \"$1\" = force ] && exit 0\nsleep 1000 &\necho $! > {}\nsleep 1000",
            marker.display()
        ),
    );
    spec.scripts = Some(scripts);
    let cluster = cluster(&spec);
    cluster.bootstrap().unwrap();
    cluster.tandem_ok("node1", &["stop"]).unwrap();
    cluster.wait_state("node1", "STOP", SETTLE).unwrap();
    cluster.wait_state("node2", "ALONE", SETTLE).unwrap();
    let lines = trace_lines(&trace);
    let graceful = position(&lines, "node1 stop_prim PRIM WAIT stop");
    let forced = position(&lines, "node1 stop_prim force PRIM WAIT stop");
    let takeover = position(&lines, "node2 start_prim SECOND ALONE auto");
    assert!(graceful < forced && forced < takeover, "{lines:#?}");
    assert!(log_contains(&cluster, "node1", "did not stop gracefully"));
    // The whole process group of the hung call was killed, background child included.
    let child: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the hung script's child to be killed",
        || {
            let status = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            status.is_empty() || status.split_whitespace().nth(2) == Some("Z")
        },
    );
}

#[test]
fn forcestop_abandons_a_hanging_stop_script() {
    let mut spec = spec();
    spec.stop_timeout = "600s".into();
    let work = tempfile::tempdir().unwrap();
    let trace = work.path().join("trace");
    let scripts = tracing_scripts(work.path(), &trace);
    override_script(
        &scripts,
        &trace,
        "stop_prim",
        "[ \"$1\" = force ] && exit 0\nsleep 1000",
    );
    spec.scripts = Some(scripts);
    let cluster = cluster(&spec);
    cluster.bootstrap().unwrap();
    cluster.tandem_ok("node1", &["stop"]).unwrap();
    eventually(SETTLE, "the graceful stop to hang", || {
        trace_lines(&trace)
            .iter()
            .any(|line| line == "node1 stop_prim PRIM WAIT stop")
    });
    assert_eq!(state(&cluster, "node1"), ("PRIM".into(), false));
    cluster.tandem_ok("node1", &["forcestop"]).unwrap();
    cluster.wait_state("node1", "STOP", SETTLE).unwrap();
    cluster.wait_state("node2", "ALONE", SETTLE).unwrap();
    position(&trace_lines(&trace), "node1 stop_prim force PRIM WAIT stop");
}
