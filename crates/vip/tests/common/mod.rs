//! Test lab: two network namespaces joined by a veth pair, removed on drop.
//!
//! Nothing outside the namespaces is touched: the veth pair is created inside the holder
//! namespace with its peer moved straight into the client namespace, and every address lives
//! on those two interfaces.
#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS...`, panicking with its stderr if it fails; returns stdout.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace named `tvip-<pid>-<n>`, deleted on drop (even when the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("tvip-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// `sysctl -w KEY=VALUE` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Runs `f` to completion on a current-thread Tokio runtime in a dedicated thread that has
    /// joined this namespace, so the code under test only ever sees the namespace.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns(2) on a valid, open namespace descriptor (kept alive by `file` for
                // the call) with CLONE_NEWNET only changes this thread's network namespace; this
                // thread is ours and runs nothing else.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build a tokio runtime");
                runtime.block_on(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// Holder and client namespaces joined by veth `vh` (holder) <-> `vc` (client).
///
/// - holder `vh`: MAC [`Lab::holder_mac`], 10.250.N.1/24, fd00:250:N::1/64
/// - client `vc`: MAC [`Lab::client_mac`], 10.250.N.2/24, fd00:250:N::2/64
pub struct Lab {
    // Field order = drop order: nothing depends on it, both are deleted.
    pub holder: Netns,
    pub client: Netns,
    pub n: u32,
}

impl Lab {
    pub fn new() -> Lab {
        let holder = Netns::new();
        let client = Netns::new();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst) % 250;
        let lab = Lab { holder, client, n };
        lab.holder.ip(&[
            "link",
            "add",
            "vh",
            "address",
            &lab.holder_mac(),
            "type",
            "veth",
            "peer",
            "name",
            "vc",
            "address",
            &lab.client_mac(),
            "netns",
            &lab.client.name,
        ]);
        lab.holder.ip(&["addr", "add", &lab.v4(1, 24), "dev", "vh"]);
        lab.client.ip(&["addr", "add", &lab.v4(2, 24), "dev", "vc"]);
        lab.holder
            .ip(&["-6", "addr", "add", &lab.v6(1, 64), "dev", "vh", "nodad"]);
        lab.client
            .ip(&["-6", "addr", "add", &lab.v6(2, 64), "dev", "vc", "nodad"]);
        lab.holder.ip(&["link", "set", "vh", "up"]);
        lab.client.ip(&["link", "set", "vc", "up"]);
        lab.wait_ready();
        lab
    }

    /// Waits until both ends are operationally up and IPv6 is configured on them. The kernel
    /// reports carrier changes through its linkwatch worker, which may batch them for up to a
    /// second; until then the interface has no IPv6 link-local address nor multicast route, and
    /// drops incoming multicast such as neighbour advertisements.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for (ns, dev) in [(&self.holder, "vh"), (&self.client, "vc")] {
            loop {
                let link = ns.ip(&["link", "show", "dev", dev]);
                let addrs = ns.ip(&["-6", "addr", "show", "dev", dev]);
                if link.contains("LOWER_UP") && link.contains("state UP") && addrs.contains("fe80")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{dev} in {} not ready: {link} {addrs}",
                    ns.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn holder_mac(&self) -> String {
        format!("02:00:00:fa:{:02x}:01", self.n)
    }

    pub fn client_mac(&self) -> String {
        format!("02:00:00:fa:{:02x}:02", self.n)
    }

    /// 10.250.N.host
    pub fn v4_addr(&self, host: u8) -> String {
        format!("10.250.{}.{host}", self.n)
    }

    /// 10.250.N.host/prefix
    pub fn v4(&self, host: u8, prefix: u8) -> String {
        format!("{}/{prefix}", self.v4_addr(host))
    }

    /// fd00:250:N::host
    pub fn v6_addr(&self, host: u16) -> String {
        format!("fd00:250:{:x}::{host:x}", self.n)
    }

    /// fd00:250:N::host/prefix
    pub fn v6(&self, host: u16, prefix: u8) -> String {
        format!("{}/{prefix}", self.v6_addr(host))
    }

    /// The client's neighbour entry for `addr` on `vc` (empty if none).
    pub fn client_neigh(&self, addr: &str) -> String {
        self.client
            .ip(&["neigh", "show", addr, "dev", "vc"])
            .trim()
            .to_owned()
    }
}

/// Polls `check` every 20 ms until it is true; panics with `what` and the last `describe()`
/// after `timeout`.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
    describe: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last: {}",
                describe()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
