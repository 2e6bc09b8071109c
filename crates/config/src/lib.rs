//! tandem configuration: the TOML file of a node, parsed and validated.
//!
//! One file per node, identical on both nodes except `this_node` and the `[daemon]` paths. See
//! `examples/tandem.toml` for a commented example. [`Config::load`] reads, parses and validates a
//! file; every problem found is reported at once, each with the file, line, column, key path, what
//! is wrong and, where a set exists, the allowed values:
//!
//! ```text
//! /etc/tandem/tandem.toml:14:19: module[0].default_primary: unknown value "node3"; allowed: "none", "last", "node1", "node2"
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod duration;
mod error;
mod parse;
mod reader;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

pub use duration::parse_duration;
pub use error::{ConfigError, Diagnostic};

/// Where the configuration is read from when no `--config` or `TANDEM_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tandem/tandem.toml";
/// Default interval between heartbeats.
pub const DEFAULT_PULSE: Duration = Duration::from_millis(250);
/// Default heartbeat timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default UDP port of the heartbeats.
pub const DEFAULT_HEARTBEAT_PORT: u16 = 9021;
/// Default TCP port of the node-to-node channel.
pub const DEFAULT_CHANNEL_PORT: u16 = 9020;
/// Default state directory of the daemon.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tandem";
/// Default log directory of the daemon.
pub const DEFAULT_LOG_DIR: &str = "/var/log/tandem";
/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/tandem/tandem.sock";
/// Directory holding the default scripts directory of each module (`/etc/tandem/<module>`).
pub const DEFAULT_SCRIPTS_ROOT: &str = "/etc/tandem";
/// Default timeout of script calls (stop, forced stop, start and the others).
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default loop protection: at most this many restarts...
pub const DEFAULT_MAX_RESTARTS: u32 = 3;
/// ... within this window.
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Minimum length of the cluster secret, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (used in messages).
    pub path: PathBuf,
    /// This node's name when the file says it (per node); otherwise found from local addresses,
    /// see [`Config::local_node`]. Always one of the configured nodes.
    pub this_node: Option<String>,
    /// Cluster-wide identity and credentials.
    pub cluster: ClusterConfig,
    /// Exactly two nodes, with distinct names, in file order.
    pub nodes: Vec<NodeConfig>,
    /// Heartbeat and channel settings.
    pub heartbeat: HeartbeatConfig,
    /// Paths and start-up behaviour of the daemon (per node).
    pub daemon: DaemonConfig,
    /// The modules, in file order, with distinct names.
    pub modules: Vec<ModuleConfig>,
}

/// `[cluster]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Cluster name.
    pub name: String,
    /// Shared secret authenticating node-to-node and witness traffic: at least
    /// [`MIN_SECRET_LEN`] bytes. Redacted by `Debug`.
    pub secret: Vec<u8>,
    /// Replicate without encryption (reserved; default false).
    pub plaintext_replication: bool,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field(
                "secret",
                &format_args!("<redacted, {} bytes>", self.secret.len()),
            )
            .field("plaintext_replication", &self.plaintext_replication)
            .finish()
    }
}

/// `[[node]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// One address per heartbeat network; same count and same family per index on both nodes.
    pub addrs: Vec<IpAddr>,
}

/// `[heartbeat]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Interval between heartbeats (default 250 ms).
    pub pulse: Duration,
    /// The peer is lost after this long without heartbeats (default 2 s, at least 3 x pulse).
    pub timeout: Duration,
    /// UDP port of the heartbeats (default 9021).
    pub port: u16,
    /// TCP port of the node-to-node channel (default 9020).
    pub channel_port: u16,
    /// Index into the node addresses of the network carrying the channel and replication.
    pub channel_network: usize,
}

/// `[daemon]` (per node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// State directory (default `/var/lib/tandem`).
    pub state_dir: PathBuf,
    /// Log directory (default `/var/log/tandem`).
    pub log_dir: PathBuf,
    /// Control socket, root only (default `/run/tandem/tandem.sock`).
    pub socket: PathBuf,
    /// Start every module when the daemon starts (default false).
    pub autostart: bool,
}

/// `[[module]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleConfig {
    /// What the core needs: name, failover, default primary, script timeouts.
    pub settings: tandem_core::ModuleSettings,
    /// Directory of the module's scripts (default `/etc/tandem/<module>`).
    pub scripts_dir: PathBuf,
    /// Virtual IPs held by the primary.
    pub vips: Vec<VipConfig>,
    /// Replicated directories.
    pub replicated: Vec<ReplicatedConfig>,
    /// Loop protection: at most this many restarts (default 3)...
    pub max_restarts: u32,
    /// ... within this window (default 24 h).
    pub restart_window: Duration,
}

impl ModuleConfig {
    /// The module name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }
}

/// `[[module.vip]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    /// The virtual address.
    pub addr: IpAddr,
    /// Prefix length (default 32 for IPv4, 128 for IPv6).
    pub prefix: u8,
    /// Interface to put it on; `None`: the one whose subnet contains the address.
    pub interface: Option<String>,
    /// Announce the address (gratuitous ARP / unsolicited neighbour advertisement; default true).
    pub gratuitous_arp: bool,
}

/// `[[module.replicated]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicatedConfig {
    /// Absolute, normalised directory (no `.`, `..`, or trailing `/`); never nested in or over
    /// another replicated directory.
    pub dir: PathBuf,
    /// Glob patterns, relative to `dir`, of what is not replicated.
    pub exclude: Vec<String>,
}

impl Config {
    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is only used in messages and stored in the result.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        parse::parse(path, text)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|node| node.name == name)
    }

    /// The other node of the node named `name`; `None` if `name` is not a node.
    pub fn peer_of(&self, name: &str) -> Option<&NodeConfig> {
        self.node(name)?;
        self.nodes.iter().find(|node| node.name != name)
    }

    /// What the core needs on node `local`; `None` if `local` is not a node.
    pub fn node_settings(&self, local: &str) -> Option<tandem_core::NodeSettings> {
        let node = self.node(local)?;
        let peer = self.peer_of(local)?;
        Some(tandem_core::NodeSettings {
            local: node.name.clone(),
            peer: peer.name.clone(),
            networks: node.addrs.len(),
            pulse: self.heartbeat.pulse,
            timeout: self.heartbeat.timeout,
            modules: self.modules.iter().map(|m| m.settings.clone()).collect(),
        })
    }

    /// The module named `name` and its index; with `None`, the only module. The error lists the
    /// configured module names.
    pub fn module(&self, name: Option<&str>) -> Result<(usize, &ModuleConfig), ConfigError> {
        let names: Vec<&str> = self.modules.iter().map(ModuleConfig::name).collect();
        let error = |message: String| ConfigError::Module {
            path: self.path.clone(),
            message,
        };
        if names.is_empty() {
            return Err(error(
                "no module is configured (add a [[module]] table)".to_owned(),
            ));
        }
        match name {
            Some(name) => self
                .modules
                .iter()
                .enumerate()
                .find(|(_, m)| m.name() == name)
                .ok_or_else(|| {
                    error(format!(
                        "no module named {name:?}; configured modules: {}",
                        reader::quoted_list(&names)
                    ))
                }),
            None => match self.modules.as_slice() {
                [only] => Ok((0, only)),
                _ => Err(error(format!(
                    "{} modules are configured, choose one with -m: {}",
                    names.len(),
                    reader::quoted_list(&names)
                ))),
            },
        }
    }

    /// The local node: the one named by `this_node` if set, else the only node having one of
    /// `local_addrs` (the addresses configured on this machine).
    pub fn local_node(&self, local_addrs: &[IpAddr]) -> Result<&NodeConfig, ConfigError> {
        let error = |message: String| ConfigError::LocalNode {
            path: self.path.clone(),
            message,
        };
        if let Some(name) = &self.this_node {
            return self
                .node(name)
                .ok_or_else(|| error(format!("this_node: {name:?} is not a configured node")));
        }
        let local: Vec<&NodeConfig> = self
            .nodes
            .iter()
            .filter(|node| node.addrs.iter().any(|a| local_addrs.contains(a)))
            .collect();
        let describe = || {
            let nodes: Vec<String> = self
                .nodes
                .iter()
                .map(|node| {
                    let addrs: Vec<String> = node.addrs.iter().map(ToString::to_string).collect();
                    format!("{} ({})", node.name, addrs.join(", "))
                })
                .collect();
            nodes.join(", ")
        };
        match local.as_slice() {
            [node] => Ok(node),
            [] => Err(error(format!(
                "no address of the configured nodes {} is on this machine; fix [[node]] addrs or \
                 set this_node",
                describe()
            ))),
            _ => Err(error(format!(
                "addresses of both nodes {} are on this machine; set this_node to say which one \
                 this is",
                describe()
            ))),
        }
    }
}

/// A new cluster secret: base64 of 32 random bytes from the operating system.
///
/// # Panics
///
/// If the operating system has no random source (see [`try_generate_secret`]).
pub fn generate_secret() -> String {
    // getrandom only fails when the kernel offers neither getrandom(2) nor /dev/urandom; no
    // secret can be made safely then, and returning a weak one would be worse than stopping.
    try_generate_secret().expect("the operating system random source is unavailable")
}

/// A new cluster secret: base64 of 32 random bytes, or why the system could not provide them.
pub fn try_generate_secret() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; MIN_SECRET_LEN];
    getrandom::fill(&mut bytes).map_err(|error| match error.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::other(error.to_string()),
    })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}
