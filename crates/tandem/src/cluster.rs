//! A tandem cluster in a lab: two nodes running real daemons in their own network and mount
//! namespaces, a witness host and a client host on a private bridge (spec §8). Used by
//! `tandem demo` and by the multi-process tests.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tandem_lab::{Lab, LabSpec};

/// The two cluster nodes.
pub const NODES: [&str; 2] = ["node1", "node2"];

/// Default replicated directory of the sample application.
pub const DEFAULT_REPLICATED: &str = "/srv/tandem-demo/data";

/// Port of the sample application.
pub const APP_PORT: u16 = 8080;

/// How to build the cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The lab (hosts must include node1, node2 and client).
    pub lab: LabSpec,
    /// Replicated directories (same paths on both nodes, backed by per-node directories).
    pub replicated: Vec<PathBuf>,
    /// The user's scripts directory; `None` = the sample application's scripts.
    pub scripts: Option<PathBuf>,
    /// Automatic failover.
    pub failover: bool,
    /// `default_primary` policy.
    pub default_primary: String,
    /// Heartbeat pulse and timeout, as configuration strings.
    pub pulse: String,
    /// See `pulse`.
    pub timeout: String,
    /// Last byte of the VIP in the lab's subnet.
    pub vip_last: u8,
    /// Timeout of graceful stop scripts (the forced call has the same).
    pub stop_timeout: String,
    /// Descriptor limit (soft and hard, `prlimit --nofile=N:N`) the daemons start with;
    /// `None`: inherited.
    pub nofile: Option<u64>,
}

impl ClusterSpec {
    /// Defaults for a lab spec: sample application, failover on, default heartbeat settings.
    pub fn new(lab: LabSpec) -> ClusterSpec {
        ClusterSpec {
            lab,
            replicated: vec![PathBuf::from(DEFAULT_REPLICATED)],
            scripts: None,
            failover: true,
            default_primary: "none".into(),
            pulse: "250ms".into(),
            timeout: "2s".into(),
            vip_last: 100,
            stop_timeout: "20s".into(),
            nofile: None,
        }
    }
}

/// A running cluster lab. Dropping it tears the lab down unless [`Cluster::keep`] was called.
#[derive(Debug)]
pub struct Cluster {
    /// The lab.
    pub lab: Lab,
    /// The `tandem` binary used for daemons and CLI calls.
    pub binary: PathBuf,
    /// The module's virtual IP.
    pub vip: Ipv4Addr,
    /// Replicated directories.
    pub replicated: Vec<PathBuf>,
    /// See [`ClusterSpec::nofile`].
    pub nofile: Option<u64>,
}

impl Cluster {
    /// Builds the lab, writes both nodes' configuration and scripts and binds the replicated
    /// directories. Daemons are not started yet.
    pub fn create(spec: &ClusterSpec, binary: &Path) -> Result<Cluster> {
        let lab = Lab::create(spec.lab.clone()).context("cannot build the lab")?;
        let vip = lab.subnet_addr(spec.vip_last);
        let secret = tandem_config::try_generate_secret().context("cannot generate a secret")?;
        let cluster = Cluster {
            lab,
            binary: binary.to_owned(),
            vip,
            replicated: spec.replicated.clone(),
            nofile: spec.nofile,
        };
        for node in NODES {
            cluster.prepare_node(node, spec, &secret)?;
        }
        Ok(cluster)
    }

    /// Reopens a cluster lab made by another process (`tandem demo up`).
    pub fn open(name: &str, binary: &Path) -> Result<Cluster> {
        let lab = Lab::open(name)?;
        let info_path = lab.dir().join("cluster.json");
        let info: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&info_path)
                .with_context(|| format!("cannot read {}", info_path.display()))?,
        )?;
        let vip = info["vip"]
            .as_str()
            .context("cluster.json has no vip")?
            .parse()?;
        let replicated = info["replicated"]
            .as_array()
            .map(|dirs| {
                dirs.iter()
                    .filter_map(|dir| dir.as_str())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Cluster {
            lab,
            binary: binary.to_owned(),
            vip,
            replicated,
            nofile: None,
        })
    }

    /// Leaves the lab running when this value is dropped (`tandem demo up`).
    pub fn keep(self) -> Result<()> {
        let info = json!({
            "vip": self.vip.to_string(),
            "replicated": self.replicated.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>(),
        });
        std::fs::write(
            self.lab.dir().join("cluster.json"),
            serde_json::to_vec_pretty(&info)?,
        )?;
        self.lab.keep()
    }

    /// Stops everything and removes the lab.
    pub fn destroy(self) -> Result<()> {
        self.lab.destroy()
    }

    /// A node's private directory (config, state, logs, scripts, data).
    pub fn node_dir(&self, node: &str) -> Result<PathBuf> {
        Ok(self.lab.host(node)?.dir.clone())
    }

    /// A node's configuration file.
    pub fn config_path(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node_dir(node)?.join("tandem.toml"))
    }

    /// A node's module log.
    pub fn module_log(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node_dir(node)?.join("log/demo/module.log"))
    }

    fn prepare_node(&self, node: &str, spec: &ClusterSpec, secret: &str) -> Result<()> {
        let dir = self.node_dir(node)?;
        for sub in ["state", "log", "scripts", "data"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let addr = |name: &str| -> Result<Ipv4Addr> { Ok(self.lab.host(name)?.addr) };
        let replicated: String = spec
            .replicated
            .iter()
            .map(|path| {
                format!(
                    "  [[module.replicated]]\n  dir = {:?}\n",
                    path.display().to_string()
                )
            })
            .collect();
        let config = format!(
            "# Written by the tandem lab for {node}.\n\
             this_node = {node:?}\n\n\
             [cluster]\nname = \"lab\"\nsecret = {secret:?}\n\n\
             [[node]]\nname = \"node1\"\naddrs = [\"{a1}\"]\n\n\
             [[node]]\nname = \"node2\"\naddrs = [\"{a2}\"]\n\n\
             [heartbeat]\npulse = {pulse:?}\ntimeout = {timeout:?}\n\n\
             [daemon]\nstate_dir = {state:?}\nlog_dir = {log:?}\nsocket = {socket:?}\n\n\
             [[module]]\nname = \"demo\"\nfailover = {failover}\ndefault_primary = {default_primary:?}\n\
             scripts = {scripts:?}\nstop_timeout = {stop_timeout:?}\nforce_stop_timeout = {stop_timeout:?}\nstart_timeout = \"30s\"\n\
             \x20 [[module.vip]]\n  addr = \"{vip}/24\"\n{replicated}",
            a1 = addr("node1")?,
            a2 = addr("node2")?,
            pulse = spec.pulse,
            timeout = spec.timeout,
            state = dir.join("state").display().to_string(),
            log = dir.join("log").display().to_string(),
            socket = dir.join("tandem.sock").display().to_string(),
            failover = spec.failover,
            stop_timeout = spec.stop_timeout,
            default_primary = spec.default_primary,
            scripts = dir.join("scripts").display().to_string(),
            vip = self.vip,
        );
        std::fs::write(dir.join("tandem.toml"), config)?;
        match &spec.scripts {
            Some(source) => copy_scripts(source, &dir.join("scripts"))?,
            None => write_sample_scripts(&dir.join("scripts"))?,
        }
        for (index, path) in spec.replicated.iter().enumerate() {
            self.lab
                .bind(node, dir.join("data").join(index.to_string()), path)?;
        }
        Ok(())
    }

    /// Starts a node's daemon and waits until its control API answers.
    pub fn start_daemon(&self, node: &str) -> Result<u32> {
        let dir = self.node_dir(node)?;
        let mut command = match self.nofile {
            Some(n) => {
                let mut prlimit = std::process::Command::new("prlimit");
                prlimit
                    .arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(&self.binary);
                prlimit
            }
            None => std::process::Command::new(&self.binary),
        };
        command
            .arg("--config")
            .arg(self.config_path(node)?)
            .arg("daemon");
        let pid = self.lab.spawn(node, &mut command, dir.join("daemon.out"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self
                .tandem(node, &["status", "--json"])
                .is_ok_and(|output| output.status.success())
            {
                std::fs::write(dir.join("daemon.pid"), pid.to_string())?;
                return Ok(pid);
            }
            if !self.lab.is_alive(pid) {
                let out = std::fs::read_to_string(dir.join("daemon.out")).unwrap_or_default();
                bail!("the daemon of {node} exited at start:\n{out}");
            }
            if Instant::now() > deadline {
                bail!("the daemon of {node} did not answer within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The PID of a node's daemon as last started.
    pub fn daemon_pid(&self, node: &str) -> Option<u32> {
        let text = std::fs::read_to_string(self.node_dir(node).ok()?.join("daemon.pid")).ok()?;
        text.trim()
            .parse()
            .ok()
            .filter(|&pid| self.lab.is_alive(pid))
    }

    /// Runs `tandem --config <node's config> ARGS` inside the node.
    pub fn tandem(&self, node: &str, args: &[&str]) -> Result<Output> {
        let mut command = self.lab.command(node, &self.binary)?;
        command
            .arg("--config")
            .arg(self.config_path(node)?)
            .args(args);
        command
            .output()
            .with_context(|| format!("cannot run tandem in {node}"))
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn tandem_ok(&self, node: &str, args: &[&str]) -> Result<String> {
        let output = self.tandem(node, args)?;
        if !output.status.success() {
            bail!(
                "`tandem {}` on {node} failed ({}): {}{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The node's `status --json`.
    pub fn status(&self, node: &str) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.tandem_ok(node, &["status", "--json"])?,
        )?)
    }

    /// Waits until the node's module is `state` ready.
    pub fn wait_state(&self, node: &str, state: &str, timeout: Duration) -> Result<()> {
        let seconds = format!("{}ms", timeout.as_millis());
        self.tandem_ok(node, &["wait-state", state, "--timeout", &seconds])
            .map(|_| ())
            .with_context(|| {
                format!(
                    "{node} did not reach {state} ready; its log:\n{}",
                    self.log_tail(node, 30)
                )
            })
    }

    /// The last lines of a node's module log, for error messages.
    pub fn log_tail(&self, node: &str, lines: usize) -> String {
        self.module_log(node)
            .ok()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(|text| {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            })
            .unwrap_or_default()
    }

    /// Starts both daemons, makes node1 primary (first start) and node2 secondary, and waits for
    /// PRIM/SECOND ready.
    pub fn bootstrap(&self) -> Result<()> {
        for node in NODES {
            self.start_daemon(node)?;
        }
        self.tandem_ok("node1", &["prim"])?;
        self.tandem_ok("node2", &["start"])?;
        self.wait_state("node2", "SECOND", Duration::from_secs(30))?;
        self.wait_state("node1", "PRIM", Duration::from_secs(30))?;
        Ok(())
    }

    /// `tandem demo info --json`.
    pub fn info(&self) -> Result<serde_json::Value> {
        let hosts: Vec<serde_json::Value> = self
            .lab
            .hosts()
            .iter()
            .map(|host| {
                let is_node = NODES.contains(&host.name.as_str());
                json!({
                    "name": host.name,
                    "namespace": host.netns,
                    "mount_namespace": host.mount_ns,
                    "pid_namespace": host.pid_ns,
                    "ipc_namespace": host.ipc_ns,
                    "uts_namespace": host.uts_ns,
                    "address": host.addr.to_string(),
                    "mac": host.mac,
                    "interface": host.interface,
                    "config": if is_node { Some(host.dir.join("tandem.toml")) } else { None },
                    "state_dir": if is_node { Some(host.dir.join("state")) } else { None },
                    "log_dir": if is_node { Some(host.dir.join("log")) } else { None },
                    "daemon_pid": if is_node { self.daemon_pid(&host.name) } else { None },
                })
            })
            .collect();
        Ok(json!({
            "lab": self.lab.name(),
            "dir": self.lab.dir(),
            "hosts": hosts,
            "vip": self.vip.to_string(),
            "app_url": format!("http://{}:{APP_PORT}/", self.vip),
            "replicated": self.replicated,
            "console_url": serde_json::Value::Null,
        }))
    }
}

fn copy_scripts(source: &Path, target: &Path) -> Result<()> {
    for entry in std::fs::read_dir(source)
        .with_context(|| format!("cannot read the scripts directory {}", source.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), target.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// The sample application's scripts: `start_prim` runs `tandem demo app` on the VIP, counting
/// requests in a file under the first replicated directory.
fn write_sample_scripts(target: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let stop = "#!/bin/sh\n\
        # Stops the sample application (graceful; with `force` as first argument: SIGKILL).\n\
        PIDFILE=\"$TANDEM_LOG_DIR/sample-app.pid\"\n\
        [ -f \"$PIDFILE\" ] || exit 0\n\
        PID=$(cat \"$PIDFILE\")\n\
        if [ \"$1\" = force ]; then kill -9 \"$PID\" 2>/dev/null; else kill \"$PID\" 2>/dev/null; fi\n\
        for i in $(seq 50); do kill -0 \"$PID\" 2>/dev/null || break; sleep 0.1; done\n\
        if kill -0 \"$PID\" 2>/dev/null; then exit 1; fi\n\
        rm -f \"$PIDFILE\"\n\
        tandem printi \"sample application stopped\"\n";
    let scripts = [
        (
            "start_prim",
            "#!/bin/sh\n\
             # Starts the sample application on the virtual IP.\n\
             DIR=\"${TANDEM_REPLICATED%%:*}\"\n\
             tandem demo app --listen \"$TANDEM_VIP:8080\" --dir \"$DIR\" --node \"$TANDEM_NODE\" \
             >> \"$TANDEM_LOG_DIR/sample-app.log\" 2>&1 &\n\
             echo $! > \"$TANDEM_LOG_DIR/sample-app.pid\"\n\
             tandem printi \"sample application started on $TANDEM_VIP:8080 (pid $!)\"\n"
                .to_owned(),
        ),
        ("stop_prim", stop.to_owned()),
        (
            "prestart",
            "#!/bin/sh\n\
             # Module start: make sure no copy of the application is left from an earlier run.\n\
             PIDFILE=\"$TANDEM_LOG_DIR/sample-app.pid\"\n\
             [ -f \"$PIDFILE\" ] && kill -9 \"$(cat \"$PIDFILE\")\" 2>/dev/null\n\
             rm -f \"$PIDFILE\"\n\
             exit 0\n"
                .to_owned(),
        ),
    ];
    for (name, body) in scripts {
        let path = target.join(name);
        std::fs::write(&path, body)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}
