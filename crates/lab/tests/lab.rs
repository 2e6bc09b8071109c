//! Lab integration tests: need root, iproute2, nftables and util-linux.

use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tandem_lab::{Lab, LabSpec, signal, wait_for};

const POLL: Duration = Duration::from_millis(20);
const SETTLE: Duration = Duration::from_secs(10);

/// The lab needs root: a test run by another user fails here rather than passing unrun.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "the lab tests need root (namespaces, mounts, nftables)"
    );
    root
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_names() -> Vec<String> {
    fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn addrs_of(link: &str) -> String {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "dev", link])
        .output()
        .expect("ip addr");
    assert!(out.status.success(), "ip addr show dev {link}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gone = no /proc entry, or a zombie.
fn pid_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            matches!(state, Some("Z") | Some("X"))
        }
    }
}

fn proc_state(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(s.rsplit(')').next()?.split_whitespace().next()?.to_owned())
}

/// Snapshot of what a lab owns, to check it is all gone after teardown.
struct Footprint {
    netns: Vec<String>,
    links: Vec<String>,
    dir: std::path::PathBuf,
    lock: std::path::PathBuf,
}

impl Footprint {
    fn of(lab: &Lab) -> Footprint {
        let mut links: Vec<String> = lab.hosts().iter().map(|h| h.veth.clone()).collect();
        links.push(lab.bridge().to_owned());
        Footprint {
            netns: lab.hosts().iter().map(|h| h.netns.clone()).collect(),
            links,
            dir: lab.dir().to_owned(),
            lock: Path::new(tandem_lab::LAB_ROOT)
                .join("locks")
                .join(lab.index().to_string()),
        }
    }

    fn assert_present(&self) {
        let ns = netns_list();
        let links = link_names();
        for n in &self.netns {
            assert!(
                ns.lines().any(|l| l.split_whitespace().next() == Some(n)),
                "netns {n} missing"
            );
        }
        for l in &self.links {
            assert!(links.contains(l), "link {l} missing");
        }
        assert!(self.dir.is_dir() && self.lock.is_file());
    }

    fn assert_gone(&self) {
        let ns = netns_list();
        let links = link_names();
        for n in &self.netns {
            assert!(
                !ns.lines().any(|l| l.split_whitespace().next() == Some(n)),
                "netns {n} left"
            );
        }
        for l in &self.links {
            assert!(!links.contains(l), "link {l} left");
        }
        assert!(!self.dir.exists(), "{} left", self.dir.display());
        assert!(!self.lock.exists(), "{} left", self.lock.display());
    }
}

#[test]
fn three_hosts_ping_each_other_and_destroy_removes_everything() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::new(["a", "b", "c"])).expect("create");
    let fp = Footprint::of(&lab);
    fp.assert_present();
    assert_eq!(lab.hosts().len(), 3);
    let idx = lab.index();
    assert_eq!(lab.host("b").expect("b").addr.octets(), [10, 231, idx, 2]);
    assert_eq!(lab.subnet_addr(100).octets(), [10, 231, idx, 100]);
    // Host side of the segment has no address at all (not even IPv6 link-local).
    assert_eq!(addrs_of(lab.bridge()).trim(), "");
    for h in lab.hosts() {
        assert_eq!(addrs_of(&h.veth).trim(), "", "{} has an address", h.veth);
    }
    // Inside: eth0 carries the address.
    let out = lab
        .run("a", &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        .expect("ip addr");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("10.231.{idx}.1/24")));
    for from in lab.hosts() {
        for to in lab.hosts() {
            if from.name == to.name {
                continue;
            }
            assert!(
                lab.ping(&from.name, to.addr),
                "{} -> {}",
                from.name,
                to.name
            );
            let a6 = to.addr6.expect("ipv6 on by default");
            wait_for(SETTLE, POLL, || Ok(lab.ping(&from.name, a6)))
                .unwrap_or_else(|e| panic!("{} -> {a6}: {e}", from.name));
        }
    }
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(lab.state_path()).expect("state")).expect("json");
    assert_eq!(state["name"], lab.name());
    assert_eq!(state["hosts"].as_array().map(Vec::len), Some(3));
    lab.destroy().expect("destroy");
    fp.assert_gone();
}

#[test]
fn two_labs_at_once_get_different_indices_and_both_work() {
    if !is_root() {
        return;
    }
    let (l1, l2) = std::thread::scope(|s| {
        let t1 = s.spawn(|| Lab::create(LabSpec::new(["x", "y"])).expect("lab 1"));
        let t2 = s.spawn(|| Lab::create(LabSpec::new(["x", "y"])).expect("lab 2"));
        (t1.join().expect("t1"), t2.join().expect("t2"))
    });
    assert_ne!(l1.index(), l2.index());
    assert_ne!(l1.name(), l2.name());
    assert_ne!(l1.host("x").expect("x").addr, l2.host("x").expect("x").addr);
    for lab in [&l1, &l2] {
        assert!(lab.ping("x", lab.host("y").expect("y").addr));
        assert!(lab.ping("y", lab.host("x").expect("x").addr));
    }
    // Isolated from each other: lab 1's x cannot reach lab 2's y.
    assert!(!l1.ping_timeout(
        "x",
        l2.host("y").expect("y").addr,
        Duration::from_millis(300)
    ));
    let (f1, f2) = (Footprint::of(&l1), Footprint::of(&l2));
    l1.destroy().expect("destroy 1");
    f1.assert_gone();
    f2.assert_present();
    assert!(l2.ping("x", l2.host("y").expect("y").addr));
    l2.destroy().expect("destroy 2");
    f2.assert_gone();
}

#[test]
fn partition_heal_and_oneway() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::new(["a", "b", "c"])).expect("create");
    let addr = |h: &str| lab.host(h).expect("host").addr;
    let short = Duration::from_millis(400);

    lab.partition("a", "b").expect("partition");
    assert!(!lab.ping_timeout("a", addr("b"), short));
    assert!(!lab.ping_timeout("b", addr("a"), short));
    let a6 = lab.host("a").expect("a").addr6.expect("v6");
    assert!(!lab.ping_timeout("b", a6, short));
    assert!(lab.ping("a", addr("c")));
    assert!(lab.ping("b", addr("c")));
    // Idempotent.
    lab.partition("a", "b").expect("partition again");
    assert_eq!(lab.partitions().len(), 2);

    lab.heal("a", "b").expect("heal");
    wait_for(SETTLE, POLL, || Ok(lab.ping("a", addr("b")))).expect("healed");
    assert!(lab.ping("b", addr("a")));
    lab.heal("a", "b").expect("heal again");

    // One way: a -> b dropped, b -> a delivered (seen with UDP).
    lab.partition_oneway("a", "b").expect("oneway");
    let sock = |h: &str| {
        let ip = IpAddr::V4(addr(h));
        lab.in_netns(h, move || UdpSocket::bind(SocketAddr::new(ip, 0)))
            .expect("enter")
            .expect("bind")
    };
    let (sa, sb) = (sock("a"), sock("b"));
    sa.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    sb.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let (pa, pb) = (sa.local_addr().expect("a"), sb.local_addr().expect("b"));
    let mut buf = [0u8; 16];
    // b -> a arrives.
    wait_for(SETTLE, POLL, || {
        sb.send_to(b"from-b", pa)?;
        Ok(sa
            .recv_from(&mut buf)
            .is_ok_and(|(n, _)| &buf[..n] == b"from-b"))
    })
    .expect("b -> a delivered");
    // a -> b never arrives (the sender sees no error: drops happen on arrival).
    for _ in 0..10 {
        sa.send_to(b"from-a", pb).expect("send succeeds locally");
        assert!(
            sb.recv_from(&mut buf).is_err(),
            "a -> b delivered despite one-way cut"
        );
    }
    assert_eq!(lab.partitions(), vec![("a".to_owned(), "b".to_owned())]);

    lab.partition("b", "c").expect("partition b c");
    lab.heal_all().expect("heal all");
    assert!(lab.partitions().is_empty());
    wait_for(SETTLE, POLL, || {
        sa.send_to(b"from-a", pb)?;
        Ok(sb
            .recv_from(&mut buf)
            .is_ok_and(|(n, _)| &buf[..n] == b"from-a"))
    })
    .expect("a -> b delivered after heal_all");
    wait_for(SETTLE, POLL, || Ok(lab.ping("b", addr("c")))).expect("b -> c after heal_all");
    assert!(lab.partition("a", "a").is_err());
    assert!(lab.partition("a", "nope").is_err());
    lab.destroy().expect("destroy");
}

#[test]
fn link_down_and_up() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::new(["a", "b"])).expect("create");
    let b = lab.host("b").expect("b").clone();
    lab.link_down("b").expect("down");
    assert!(!lab.ping_timeout("a", b.addr, Duration::from_millis(400)));
    lab.link_up("b").expect("up");
    wait_for(SETTLE, POLL, || Ok(lab.ping("a", b.addr))).expect("v4 back");
    let b6 = b.addr6.expect("v6");
    wait_for(SETTLE, POLL, || Ok(lab.ping("a", b6))).expect("v6 back");
    lab.destroy().expect("destroy");
}

#[test]
fn per_host_mount_namespaces() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::new(["node1", "node2"])).expect("create");
    let top = Path::new("/srv").join(format!("tandem-lab-test-{}", lab.name()));
    let target = top.join("data");
    assert!(!top.exists());
    for h in ["node1", "node2"] {
        let src = lab.host(h).expect("host").dir.join("data");
        lab.bind(h, &src, &target).expect("bind");
    }
    let file = target.join("f");
    let file_s = file.to_str().expect("utf8");
    lab.run("node1", &["sh", "-c", &format!("echo one > {file_s}")])
        .expect("write in node1");
    let out = lab.run("node1", &["cat", file_s]).expect("read in node1");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "one");
    assert!(
        lab.run("node2", &["cat", file_s]).is_err(),
        "node2 sees node1's file"
    );
    assert!(!file.exists(), "the host (outside) sees node1's file");
    // The data lives in node1's private directory.
    let n1 = lab.host("node1").expect("node1").dir.join("data/f");
    assert_eq!(fs::read_to_string(n1).expect("source").trim(), "one");
    // In-process view of the same namespace.
    let seen = lab.in_host("node2", || file.exists()).expect("in_host");
    assert!(!seen);
    let seen = lab
        .in_host("node1", || fs::read_to_string(&file).ok())
        .expect("in_host");
    assert_eq!(seen.as_deref().map(str::trim), Some("one"));
    // The namespace's own sysfs.
    let out = lab.run("node2", &["ls", "/sys/class/net"]).expect("ls");
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    names.sort();
    assert_eq!(names, ["eth0", "lo"]);
    assert_eq!(lab.binds().len(), 2);
    lab.destroy().expect("destroy");
    assert!(!top.exists(), "created mount points not removed");
}

#[test]
fn spawn_and_signals() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::new(["a", "b"])).expect("create");
    let log = lab.dir().join("logs/sleep.log");
    let pid = lab
        .spawn("a", Command::new("sleep").arg("1000"), &log)
        .expect("spawn");
    assert!(lab.is_alive(pid));
    assert!(lab.processes("a").expect("procs").contains(&pid));
    assert!(!lab.processes("b").expect("procs").contains(&pid));
    assert_eq!(lab.spawned().len(), 1);
    // The PID is the program's own (started directly in the host), in its own process group.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert_eq!(comm.trim(), "sleep");
    // SAFETY: getpgid has no memory-safety preconditions.
    let pgid = unsafe { libc::getpgid(pid as libc::pid_t) };
    assert_eq!(pgid, pid as libc::pid_t);

    lab.kill(pid, signal::SIGSTOP).expect("stop");
    wait_for(SETTLE, POLL, || Ok(proc_state(pid).as_deref() == Some("T"))).expect("stopped");
    assert!(lab.is_alive(pid));
    lab.kill(pid, signal::SIGCONT).expect("cont");
    wait_for(SETTLE, POLL, || Ok(proc_state(pid).as_deref() != Some("T"))).expect("running");
    lab.kill(pid, signal::SIGKILL).expect("kill");
    lab.wait_exit(pid, SETTLE).expect("exits");
    let st = lab.try_wait(pid).expect("ours").expect("exited");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    // Not ours: refused.
    assert!(lab.kill(std::process::id(), signal::SIGCONT).is_err());

    // A command built with lab.command, with env and a plain one with current_dir.
    let mut c = lab.command("b", "sh").expect("command");
    c.args(["-c", "echo \"$TANDEM_X\"; sleep 1000"])
        .env("TANDEM_X", "hello");
    let p2 = lab
        .spawn("b", &mut c, lab.dir().join("logs/b.log"))
        .expect("spawn b");
    let mut plain = Command::new("sh");
    plain.args(["-c", "pwd; sleep 1000"]).current_dir("/etc");
    let p3 = lab
        .spawn("b", &mut plain, lab.dir().join("logs/pwd.log"))
        .expect("spawn pwd");
    wait_for(SETTLE, POLL, || {
        let b = fs::read_to_string(lab.dir().join("logs/b.log")).unwrap_or_default();
        let p = fs::read_to_string(lab.dir().join("logs/pwd.log")).unwrap_or_default();
        Ok(b.trim() == "hello" && p.trim() == "/etc")
    })
    .expect("outputs logged");
    let before: Vec<u32> = vec![p2, p3];
    lab.destroy().expect("destroy");
    for p in before {
        assert!(pid_gone(p), "pid {p} survived destroy");
    }
}

#[test]
fn destroy_kills_spawned_processes() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::new(["a"])).expect("create");
    let pid = lab
        .spawn(
            "a",
            Command::new("sleep").arg("1000"),
            lab.dir().join("s.log"),
        )
        .expect("spawn");
    // Also one started behind the lab's back, found through the namespace.
    let mut c = lab.command("a", "sleep").expect("command");
    let mut stray = c.arg("1001").spawn().expect("stray");
    let fp = Footprint::of(&lab);
    lab.destroy().expect("destroy");
    assert!(pid_gone(pid));
    let _ = stray.wait(); // reap (killed by teardown)
    assert!(pid_gone(stray.id()));
    fp.assert_gone();
}

#[test]
fn drop_kills_spawned_processes() {
    if !is_root() {
        return;
    }
    let (pid, fp) = {
        let lab = Lab::create(LabSpec::new(["a"])).expect("create");
        let pid = lab
            .spawn(
                "a",
                Command::new("sleep").arg("1000"),
                lab.dir().join("s.log"),
            )
            .expect("spawn");
        (pid, Footprint::of(&lab))
    };
    assert!(pid_gone(pid));
    fp.assert_gone();
}

#[test]
fn panic_with_a_lab_still_cleans_up() {
    if !is_root() {
        return;
    }
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::create(LabSpec::new(["a", "b"])).expect("create");
        let pid = lab
            .spawn(
                "b",
                Command::new("sleep").arg("1000"),
                lab.dir().join("s.log"),
            )
            .expect("spawn");
        *seen.lock().expect("lock") = Some((pid, Footprint::of(&lab)));
        panic!("test failure while the lab is up");
    }));
    assert!(r.is_err());
    let (pid, fp) = seen.lock().expect("lock").take().expect("recorded");
    assert!(pid_gone(pid));
    fp.assert_gone();
}

#[test]
fn keep_open_and_destroy_from_state() {
    if !is_root() {
        return;
    }
    let spec = LabSpec::named("ltkeep", 252, ["n1", "n2"])
        .with_subnet([10, 231, 252])
        .with_ipv6(false);
    let lab = Lab::create(spec.clone()).expect("create");
    let fp = Footprint::of(&lab);
    let pid = lab
        .spawn(
            "n1",
            Command::new("sleep").arg("1000"),
            lab.dir().join("s.log"),
        )
        .expect("spawn");
    assert!(lab.host("n1").expect("n1").addr6.is_none());
    lab.keep().expect("keep");
    fp.assert_present();
    assert!(!pid_gone(pid));
    // A second lab with the same name is refused while this one exists.
    assert!(Lab::create(spec.clone()).is_err());
    assert!(Lab::list().expect("list").contains(&"ltkeep".to_owned()));
    {
        let opened = Lab::open("ltkeep").expect("open");
        assert_eq!(opened.spawned().len(), 1);
        assert!(opened.ping("n1", opened.host("n2").expect("n2").addr));
        let out = opened.run("n2", &["true"]);
        assert!(out.is_ok());
        // Dropping an opened handle does not destroy.
    }
    fp.assert_present();
    let opened = Lab::open("ltkeep").expect("open again");
    opened.destroy().expect("destroy");
    // The sleep was not our child's child: it is reparented and reaped by init.
    wait_for(SETTLE, POLL, || Ok(pid_gone(pid))).expect("killed");
    fp.assert_gone();
    assert!(Lab::open("ltkeep").is_err());
}

#[test]
fn dead_owner_is_reclaimed() {
    if !is_root() {
        return;
    }
    let spec = LabSpec::named("ltrecl", 251, ["a", "b"]);
    let lab = Lab::create(spec.clone()).expect("create");
    let pid = lab
        .spawn(
            "a",
            Command::new("sleep").arg("1000"),
            lab.dir().join("s.log"),
        )
        .expect("spawn");
    // Pretend the owner died: a reaped child's PID in the lock, and no teardown.
    let mut dead = Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().expect("reap");
    let lock = Path::new(tandem_lab::LAB_ROOT).join("locks/251");
    let info = format!(r#"{{"pid":{dead_pid},"start":null,"name":"ltrecl","kept":false}}"#);
    fs::write(&lock, info).expect("rewrite lock");
    std::mem::forget(lab);
    let lab = Lab::create(spec).expect("re-create over leftovers");
    wait_for(SETTLE, POLL, || Ok(pid_gone(pid))).expect("leftover process killed");
    assert!(lab.ping("a", lab.host("b").expect("b").addr));
    let fp = Footprint::of(&lab);
    lab.destroy().expect("destroy");
    fp.assert_gone();
}

#[test]
fn failed_create_cleans_up() {
    if !is_root() {
        return;
    }
    // A namespace already named like the lab's second host makes creation fail midway.
    let st = Command::new("ip")
        .args(["netns", "add", "ltfail-b"])
        .status()
        .expect("ip");
    assert!(st.success());
    let r = Lab::create(LabSpec::named("ltfail", 253, ["a", "b"]));
    let err = format!("{:#}", r.expect_err("must fail"));
    assert!(err.contains("ltfail"), "{err}");
    let ns = netns_list();
    assert!(!ns.contains("ltfail-a"), "{ns}");
    assert!(!link_names().iter().any(|l| l.starts_with("ltfail")));
    assert!(!Path::new(tandem_lab::LAB_ROOT).join("ltfail").exists());
    assert!(!Path::new(tandem_lab::LAB_ROOT).join("locks/253").exists());
    let _ = Command::new("ip")
        .args(["netns", "del", "ltfail-b"])
        .status();
}

#[test]
fn cleanup_stale_removes_dead_labs_only() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::named("ltstale", 255, ["a"])).expect("create");
    let live = Lab::create(LabSpec::new(["a"])).expect("live lab");
    let pid = lab
        .spawn(
            "a",
            Command::new("sleep").arg("1000"),
            lab.dir().join("s.log"),
        )
        .expect("spawn");
    let fp = Footprint::of(&lab);
    let mut dead = Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().expect("reap");
    let lock = Path::new(tandem_lab::LAB_ROOT).join("locks/255");
    let info = format!(r#"{{"pid":{dead_pid},"start":null,"name":"ltstale","kept":false}}"#);
    fs::write(&lock, info).expect("rewrite lock");
    std::mem::forget(lab);
    let cleaned = Lab::cleanup_stale().expect("cleanup");
    assert!(cleaned.contains(&"ltstale".to_owned()), "{cleaned:?}");
    assert!(!cleaned.contains(&live.name().to_owned()));
    wait_for(SETTLE, POLL, || Ok(pid_gone(pid))).expect("killed");
    fp.assert_gone();
    Footprint::of(&live).assert_present();
    live.destroy().expect("destroy");
}

fn stdout(lab: &Lab, host: &str, args: &[&str]) -> String {
    let out = lab.run(host, args).expect("run");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Each host is a machine of its own: its host name, its processes (PID 1 its init, which
/// reaps orphans; PIDs from a range of its own), its IPC objects; none of one host's is
/// visible from another.
#[test]
fn hosts_are_isolated_like_machines() {
    if !is_root() {
        return;
    }
    let lab = Lab::create(LabSpec::new(["node1", "node2"])).expect("create");
    for h in ["node1", "node2"] {
        assert_eq!(stdout(&lab, h, &["hostname"]).trim(), h);
        let name = lab
            .in_host(h, || {
                let mut buf = [0u8; 64];
                // SAFETY: buf is writable for its whole length.
                let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
                assert_eq!(rc, 0);
                let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                String::from_utf8_lossy(&buf[..end]).into_owned()
            })
            .expect("in_host");
        assert_eq!(name, h);
        assert_eq!(
            stdout(&lab, h, &["ps", "-o", "comm=", "-p", "1"]).trim(),
            "sh"
        );
    }

    // A process of node1: seen there under its host PID, not from node2 at all.
    let pid = lab
        .spawn(
            "node1",
            Command::new("sleep").arg("1001234"),
            lab.dir().join("sleep.log"),
        )
        .expect("spawn");
    let inner = lab.inner_pid(pid).expect("inner pid");
    assert_ne!(inner, pid, "node1's PIDs are its own");
    assert_eq!(lab.outer_pid("node1", inner).expect("outer"), Some(pid));
    assert_eq!(lab.outer_pid("node2", inner).expect("outer"), None);
    let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("number");
    let base = pid_max / 3;
    assert!(
        (base..2 * base).contains(&inner),
        "node1's PIDs start at {base}: {inner}"
    );
    let kill0 = |host: &str, pid: u32| lab.run(host, &["kill", "-0", &pid.to_string()]).is_ok();
    assert!(kill0("node1", inner), "kill -0 {inner} in node1");
    for p in [inner, pid] {
        assert!(!kill0("node2", p), "node2 can signal node1's process {p}");
    }
    let listed = |host: &str| stdout(&lab, host, &["ps", "-eo", "pid,args"]);
    assert!(
        listed("node1").contains("sleep 1001234"),
        "{}",
        listed("node1")
    );
    let node2 = listed("node2");
    assert!(!node2.contains("sleep 1001234"), "node2 lists it:\n{node2}");
    let node2_base = 2 * base;
    for line in node2.lines().skip(1) {
        let p: u32 = line
            .split_whitespace()
            .next()
            .expect("pid")
            .parse()
            .expect("pid");
        assert!(
            p == 1 || p >= node2_base,
            "node2's PIDs start at {node2_base}:\n{node2}"
        );
    }

    // System V IPC: a segment of node1 is not node2's.
    let id = stdout(&lab, "node1", &["ipcmk", "-M", "4096"]);
    let id = id.split(':').next_back().expect("id").trim().to_owned();
    assert!(stdout(&lab, "node1", &["ipcs", "-m"]).contains(&format!(" {id} ")));
    assert!(!stdout(&lab, "node2", &["ipcs", "-m"]).contains(&format!(" {id} ")));

    // Orphans are reaped by the host's init: no zombie is left behind.
    let init = lab.outer_pid("node1", 1).expect("outer").expect("init");
    lab.run(
        "node1",
        &["sh", "-c", "for i in 1 2 3; do (sleep 0.05 &); done"],
    )
    .expect("orphans");
    let children = |p: u32| -> Vec<u32> {
        fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect()
    };
    wait_for(SETTLE, POLL, || {
        Ok(children(init)
            .iter()
            .all(|&c| proc_state(c).as_deref() != Some("Z"))
            && children(init).len() == 1)
    })
    .unwrap_or_else(|e| panic!("init's children {:?}: {e:#}", children(init)));

    // The host's processes die with it.
    let fp = Footprint::of(&lab);
    lab.destroy().expect("destroy");
    assert!(pid_gone(pid) && pid_gone(init));
    fp.assert_gone();
}

/// Two labs bind on the same path: the first one's teardown leaves the mount point, which
/// the second still uses, and the second's data stays reachable inside it.
#[test]
fn a_lab_does_not_remove_a_mount_point_another_lab_uses() {
    if !is_root() {
        return;
    }
    let a = Lab::create(LabSpec::new(["n"])).expect("create a");
    let b = Lab::create(LabSpec::new(["n"])).expect("create b");
    let top = Path::new("/srv").join(format!("tandem-lab-shared-{}-{}", a.name(), b.name()));
    let target = top.join("data");
    for lab in [&a, &b] {
        let source = lab.host("n").expect("host").dir.join("data");
        lab.bind("n", &source, &target).expect("bind");
    }
    let file = target.join("f");
    let file = file.to_str().expect("utf8");
    b.run("n", &["sh", "-c", &format!("echo b > {file}")])
        .expect("write in b");
    a.destroy().expect("destroy a");
    assert!(
        target.is_dir(),
        "a's teardown removed the mount point b uses"
    );
    assert_eq!(stdout(&b, "n", &["cat", file]).trim(), "b");
    b.destroy().expect("destroy b");
    assert!(!top.exists(), "the last lab leaves its mount points");
}
