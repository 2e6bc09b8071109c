//! What the core needs to know from the configuration. The `tandem-config` crate parses and
//! validates the TOML file and builds these plain values.

use std::time::Duration;

/// Settings of the local node and everything it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// Name of this node.
    pub local: String,
    /// Name of the peer node.
    pub peer: String,
    /// Number of heartbeat networks (at least one).
    pub networks: usize,
    /// Interval between heartbeats (default 250 ms).
    pub pulse: Duration,
    /// The peer is lost when no heartbeat arrived on any network for this long (default 2 s).
    pub timeout: Duration,
    /// Every module, in configuration order.
    pub modules: Vec<ModuleSettings>,
}

/// Which node should be primary when both could be.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum DefaultPrimary {
    /// No preference: the node that is primary stays primary.
    #[default]
    None,
    /// This node is primary whenever both run (automatic swap after reintegration).
    Node(String),
    /// The node that was primary last is preferred at start-up.
    Last,
}

/// Settings of one module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSettings {
    /// Module name.
    pub name: String,
    /// Automatic failover (default on).
    pub failover: bool,
    /// Preferred primary policy.
    pub default_primary: DefaultPrimary,
    /// Timeout of a graceful stop script call (default 300 s).
    pub stop_timeout: Duration,
    /// Timeout of a forced stop script call (default 300 s).
    pub force_stop_timeout: Duration,
    /// Timeout of start scripts, prestart, poststop and transition (default 300 s).
    pub start_timeout: Duration,
}

impl ModuleSettings {
    /// A module with the default policies.
    pub fn new(name: impl Into<String>) -> ModuleSettings {
        ModuleSettings {
            name: name.into(),
            failover: true,
            default_primary: DefaultPrimary::None,
            stop_timeout: Duration::from_secs(300),
            force_stop_timeout: Duration::from_secs(300),
            start_timeout: Duration::from_secs(300),
        }
    }
}
