//! The schema: walks the document, applies the defaults and validates everything, collecting
//! every problem with its position and key path.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use tandem_core::{DefaultPrimary, ModuleSettings};
use toml::Spanned;
use toml::de::DeTable;

use crate::reader::{Report, Span, Table, as_array, as_str, quoted_list};
use crate::{
    ClusterConfig, Config, ConfigError, DEFAULT_CHANNEL_PORT, DEFAULT_HEARTBEAT_PORT,
    DEFAULT_LOG_DIR, DEFAULT_MAX_RESTARTS, DEFAULT_PULSE, DEFAULT_RESTART_WINDOW,
    DEFAULT_SCRIPT_TIMEOUT, DEFAULT_SCRIPTS_ROOT, DEFAULT_SOCKET, DEFAULT_STATE_DIR,
    DEFAULT_TIMEOUT, DaemonConfig, HeartbeatConfig, MIN_SECRET_LEN, ModuleConfig, NodeConfig,
    ReplicatedConfig, VipConfig,
};

const ROOT_KEYS: &[&str] = &[
    "this_node",
    "cluster",
    "node",
    "heartbeat",
    "daemon",
    "module",
];
const CLUSTER_KEYS: &[&str] = &["name", "secret", "plaintext_replication"];
const NODE_KEYS: &[&str] = &["name", "addrs"];
const HEARTBEAT_KEYS: &[&str] = &[
    "pulse",
    "timeout",
    "port",
    "channel_port",
    "channel_network",
];
const DAEMON_KEYS: &[&str] = &["state_dir", "log_dir", "socket", "autostart"];
const MODULE_KEYS: &[&str] = &[
    "name",
    "failover",
    "default_primary",
    "scripts",
    "stop_timeout",
    "force_stop_timeout",
    "start_timeout",
    "max_restarts",
    "restart_window",
    "vip",
    "replicated",
];
const VIP_KEYS: &[&str] = &["addr", "interface", "gratuitous_arp"];
const REPLICATED_KEYS: &[&str] = &["dir", "exclude"];

const PORTS: (i128, i128) = (1, 65_535);
const GENERATE: &str = "generate one with `tandem secret`";

/// Parses and validates a whole configuration.
pub(crate) fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let (doc, errors) = DeTable::parse_recoverable(text);
    let mut report = Report::default();
    if !errors.is_empty() {
        // The tree of a document with syntax errors is partial: schema errors would mislead.
        for error in &errors {
            let span = error.span().unwrap_or(0..0);
            report.push(
                span.clone(),
                "",
                syntax_message(error.message(), text, &span),
            );
        }
    } else {
        let config = build(&mut report, path, &doc);
        if report.is_empty() {
            return Ok(config);
        }
    }
    Err(ConfigError::Invalid {
        diagnostics: report.into_diagnostics(path, text),
    })
}

fn syntax_message(message: &str, text: &str, span: &Span) -> String {
    let found = text
        .get(span.clone())
        .filter(|s| !s.trim().is_empty() && s.chars().count() <= 40 && !s.contains('\n'));
    match found {
        Some(found) if !message.contains(found) => {
            format!("TOML syntax error: {message} (at `{found}`)")
        }
        _ => format!("TOML syntax error: {message}"),
    }
}

/// Builds the configuration, with defaults standing in for what is missing or invalid (then
/// reported, so the result is only used when `report` stays empty).
fn build(report: &mut Report, path: &Path, doc: &Spanned<DeTable<'_>>) -> Config {
    let empty = DeTable::new();
    let root = Table::root(report, doc, ROOT_KEYS);

    let cluster = cluster(report, &root);
    let nodes = nodes(report, &root);
    let node_names: Vec<&str> = nodes.iter().filter_map(|n| n.name.as_deref()).collect();
    let networks = match nodes.as_slice() {
        [a, b] if a.complete && b.complete && a.addrs.len() == b.addrs.len() => a.addrs.len(),
        _ => 0,
    };
    let node_addrs: Vec<(IpAddr, String)> = nodes
        .iter()
        .flat_map(|n| {
            n.addrs
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.map(|a| (a, format!("{}.addrs[{i}]", n.path))))
        })
        .collect();

    let this_node = root.string(report, "this_node").and_then(|name| {
        let name_str = *name.get_ref();
        if node_names.contains(&name_str) {
            Some(name_str.to_owned())
        } else {
            if !node_names.is_empty() {
                let message = format!(
                    "unknown node {name_str:?}; allowed: {}",
                    quoted_list(&node_names)
                );
                report.push(name.span(), "this_node", message);
            }
            None
        }
    });

    let heartbeat = heartbeat(report, &root, &empty, networks);
    let (daemon, daemon_paths) = daemon(report, &root, &empty);

    let mut modules = Vec::new();
    let mut module_names: Vec<(String, String)> = Vec::new();
    let mut vips_seen: Vec<(IpAddr, String)> = Vec::new();
    let mut replicated_seen: Vec<Located<PathBuf>> = Vec::new();
    for table in root.tables(report, "module", MODULE_KEYS) {
        let mut ctx = ModuleContext {
            node_names: &node_names,
            node_addrs: &node_addrs,
            module_names: &mut module_names,
            vips: &mut vips_seen,
            replicated: &mut replicated_seen,
        };
        modules.push(module(report, &table, &mut ctx));
    }
    check_replicated_overlaps(report, &replicated_seen, &daemon_paths);

    Config {
        path: path.to_path_buf(),
        this_node,
        cluster,
        nodes: nodes
            .into_iter()
            .map(|n| NodeConfig {
                name: n.name.unwrap_or_default(),
                addrs: n.addrs.into_iter().flatten().collect(),
            })
            .collect(),
        heartbeat,
        daemon,
        modules,
    }
}

/// A value with the key path and span it came from, for cross-checks.
struct Located<T> {
    key: String,
    span: Span,
    value: T,
}

fn cluster(report: &mut Report, root: &Table<'_, '_>) -> ClusterConfig {
    let mut cluster = ClusterConfig {
        name: String::new(),
        secret: Vec::new(),
        plaintext_replication: false,
    };
    let Some(value) = root.get("cluster") else {
        let message = "missing required table [cluster] (name and secret)";
        report.push(0..0, "cluster", message);
        return cluster;
    };
    let Some(table) = Table::open(report, "cluster".to_owned(), value, CLUSTER_KEYS) else {
        return cluster;
    };
    if let Some(name) = table.required_string(report, "name")
        && check_name(report, table.key("name"), &name, NameRule::Cluster)
    {
        cluster.name = (*name.get_ref()).to_owned();
    }
    if let Some(secret) = table.required_string(report, "secret") {
        cluster.secret = decode_secret(report, table.key("secret"), &secret).unwrap_or_default();
    }
    cluster.plaintext_replication = table.bool_or(report, "plaintext_replication", false);
    cluster
}

fn decode_secret(report: &mut Report, key: String, secret: &Spanned<&str>) -> Option<Vec<u8>> {
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    // Never echo the secret: messages end up in logs and support snapshots.
    match engine.decode(secret.get_ref().trim()) {
        Ok(bytes) if bytes.len() >= MIN_SECRET_LEN => Some(bytes),
        Ok(bytes) => {
            let message = format!(
                "secret too short: {} bytes, at least {MIN_SECRET_LEN} are required; {GENERATE}",
                bytes.len()
            );
            report.push(secret.span(), key, message);
            None
        }
        Err(_) => {
            let message = format!("secret is not valid base64; {GENERATE}");
            report.push(secret.span(), key, message);
            None
        }
    }
}

/// A `[[node]]` as read, before the cross-node checks.
struct NodeDraft {
    path: String,
    name: Option<String>,
    /// One entry per element of `addrs`, `None` where it was invalid.
    addrs: Vec<Option<IpAddr>>,
    addr_spans: Vec<Span>,
    addrs_span: Span,
    /// `addrs` was present, an array, non-empty, and every element valid.
    complete: bool,
}

fn nodes(report: &mut Report, root: &Table<'_, '_>) -> Vec<NodeDraft> {
    let tables = root.tables(report, "node", NODE_KEYS);
    match root
        .get("node")
        .map(|v| (v.span(), v.get_ref().as_array().map(|a| a.len())))
    {
        None => report.push(
            0..0,
            "node",
            "missing [[node]] tables: a cluster has exactly 2 nodes, each with a name and addrs",
        ),
        Some((span, Some(count))) if count != 2 => {
            let span = tables.get(2).map_or(span, |t| t.span.clone());
            let message = format!("a cluster has exactly 2 nodes, found {count}");
            report.push(span, "node", message);
        }
        _ => {}
    }

    let mut drafts: Vec<NodeDraft> = Vec::new();
    let mut seen_addrs: Vec<Located<IpAddr>> = Vec::new();
    for table in &tables {
        let mut draft = NodeDraft {
            path: table.path.clone(),
            name: None,
            addrs: Vec::new(),
            addr_spans: Vec::new(),
            addrs_span: table.span.clone(),
            complete: false,
        };
        if let Some(name) = table.required_string(report, "name") {
            let name_str = *name.get_ref();
            if check_name(report, table.key("name"), &name, NameRule::Node) {
                if let Some(other) = drafts.iter().find(|d| d.name.as_deref() == Some(name_str)) {
                    let message = format!(
                        "duplicate node name {name_str:?} (also {}.name)",
                        other.path
                    );
                    report.push(name.span(), table.key("name"), message);
                } else {
                    draft.name = Some(name_str.to_owned());
                }
            }
        }
        let addrs_key = table.key("addrs");
        if let Some(value) = table.require(report, "addrs") {
            draft.addrs_span = value.span();
            if let Some(array) = as_array(report, addrs_key.clone(), value) {
                draft.complete = !array.is_empty();
                if array.is_empty() {
                    let message = "at least one address is required (one per heartbeat network)";
                    report.push(value.span(), addrs_key.clone(), message);
                }
                for (i, item) in array.iter().enumerate() {
                    let key = format!("{addrs_key}[{i}]");
                    let addr = as_str(report, key.clone(), item)
                        .and_then(|text| node_addr(report, &key, &text, &seen_addrs));
                    if let Some(addr) = addr {
                        seen_addrs.push(Located {
                            key,
                            span: item.span(),
                            value: addr,
                        });
                    }
                    draft.complete &= addr.is_some();
                    draft.addrs.push(addr);
                    draft.addr_spans.push(item.span());
                }
            }
        }
        drafts.push(draft);
    }

    if let [a, b] = drafts.as_slice() {
        for (i, (x, y)) in a.addrs.iter().zip(&b.addrs).enumerate() {
            if let (Some(x), Some(y)) = (x, y)
                && x.is_ipv4() != y.is_ipv4()
            {
                let message = format!(
                    "{} address, but {}.addrs[{i}] ({x}) is {}; the two addresses of a \
                         heartbeat network must be of the same family",
                    family(*y),
                    a.path,
                    family(*x)
                );
                report.push(
                    b.addr_spans[i].clone(),
                    format!("{}.addrs[{i}]", b.path),
                    message,
                );
            }
        }
        if a.complete && b.complete && a.addrs.len() != b.addrs.len() {
            let message = format!(
                "{} has {} but {} has {}; each node needs one address per heartbeat network, in \
                 the same order",
                b.path,
                count(b.addrs.len(), "address"),
                a.path,
                count(a.addrs.len(), "address"),
            );
            report.push(b.addrs_span.clone(), format!("{}.addrs", b.path), message);
        }
    }
    drafts
}

fn node_addr(
    report: &mut Report,
    key: &str,
    text: &Spanned<&str>,
    seen: &[Located<IpAddr>],
) -> Option<IpAddr> {
    let raw = *text.get_ref();
    let problem = match raw.trim().parse::<IpAddr>() {
        Err(_) if raw.contains('/') => format!(
            "invalid address {raw:?}: a node address has no prefix length, write it like \
             \"10.77.0.1\""
        ),
        Err(_) => format!(
            "invalid address {raw:?}: expected an IPv4 or IPv6 address such as \"10.77.0.1\" or \
             \"fd00::1\""
        ),
        Ok(ip) => match (unusable(ip), seen.iter().find(|s| s.value == ip)) {
            (Some(why), _) => format!("{ip} cannot be a node address: it is {why}"),
            (None, Some(other)) => format!("duplicate address {ip} (also {})", other.key),
            (None, None) => return Some(ip),
        },
    };
    report.push(text.span(), key, problem);
    None
}

fn heartbeat<'a, 'i>(
    report: &mut Report,
    root: &Table<'a, 'i>,
    empty: &'a DeTable<'i>,
    networks: usize,
) -> HeartbeatConfig {
    let table = Table::optional(report, root, "heartbeat", HEARTBEAT_KEYS, empty);
    let pulse = table.duration_or(report, "pulse", DEFAULT_PULSE);
    let timeout = table.duration_or(report, "timeout", DEFAULT_TIMEOUT);
    let minimum = pulse.get_ref().saturating_mul(3);
    if *timeout.get_ref() < minimum {
        let (span, key) = if table.get("timeout").is_some() {
            (timeout.span(), "timeout")
        } else {
            (pulse.span(), "pulse")
        };
        let message = format!(
            "timeout ({:?}) must be at least 3 x pulse (3 x {:?} = {minimum:?})",
            timeout.get_ref(),
            pulse.get_ref()
        );
        report.push(span, table.key(key), message);
    }
    let port = table.int_or(report, "port", PORTS, DEFAULT_HEARTBEAT_PORT);
    let channel_port = table.int_or(report, "channel_port", PORTS, DEFAULT_CHANNEL_PORT);
    let mut channel_network = 0;
    if let Some(index) = table.integer(report, "channel_network") {
        let value = *index.get_ref();
        match usize::try_from(value) {
            Ok(i) if networks == 0 || i < networks => channel_network = i,
            _ => {
                let allowed: Vec<String> = (0..networks.max(1)).map(|i| i.to_string()).collect();
                let message = format!(
                    "network {value} does not exist; allowed: {} (an index into the addrs of \
                     each node, which have {})",
                    allowed.join(", "),
                    count(networks, "address")
                );
                report.push(index.span(), table.key("channel_network"), message);
            }
        }
    }
    HeartbeatConfig {
        pulse: pulse.into_inner(),
        timeout: timeout.into_inner(),
        port: port.into_inner(),
        channel_port: channel_port.into_inner(),
        channel_network,
    }
}

fn daemon<'a, 'i>(
    report: &mut Report,
    root: &Table<'a, 'i>,
    empty: &'a DeTable<'i>,
) -> (DaemonConfig, Vec<Located<PathBuf>>) {
    let table = Table::optional(report, root, "daemon", DAEMON_KEYS, empty);
    let mut path = |key: &str, default: &str| {
        let value = path_or(report, &table, key, default);
        Located {
            key: table.key(key),
            span: value.span(),
            value: value.into_inner(),
        }
    };
    let state_dir = path("state_dir", DEFAULT_STATE_DIR);
    let log_dir = path("log_dir", DEFAULT_LOG_DIR);
    let socket = path("socket", DEFAULT_SOCKET);
    let autostart = table.bool_or(report, "autostart", false);
    let config = DaemonConfig {
        state_dir: state_dir.value.clone(),
        log_dir: log_dir.value.clone(),
        socket: socket.value.clone(),
        autostart,
    };
    (config, vec![state_dir, log_dir, socket])
}

/// What a module is checked against: the nodes and what earlier modules use.
struct ModuleContext<'c> {
    node_names: &'c [&'c str],
    node_addrs: &'c [(IpAddr, String)],
    module_names: &'c mut Vec<(String, String)>,
    vips: &'c mut Vec<(IpAddr, String)>,
    replicated: &'c mut Vec<Located<PathBuf>>,
}

fn module(report: &mut Report, table: &Table<'_, '_>, ctx: &mut ModuleContext<'_>) -> ModuleConfig {
    let mut name = String::new();
    if let Some(value) = table.required_string(report, "name") {
        let value_str = *value.get_ref();
        if check_name(report, table.key("name"), &value, NameRule::Module) {
            if let Some((_, other)) = ctx.module_names.iter().find(|(n, _)| n == value_str) {
                let message = format!("duplicate module name {value_str:?} (also {other}.name)");
                report.push(value.span(), table.key("name"), message);
            } else {
                ctx.module_names
                    .push((value_str.to_owned(), table.path.clone()));
            }
            name = value_str.to_owned();
        }
    }

    let mut settings = ModuleSettings::new(name.clone());
    settings.failover = table.bool_or(report, "failover", true);
    if let Some(value) = table.string(report, "default_primary") {
        settings.default_primary = match *value.get_ref() {
            "none" => DefaultPrimary::None,
            "last" => DefaultPrimary::Last,
            node if ctx.node_names.contains(&node) => DefaultPrimary::Node(node.to_owned()),
            other => {
                let mut allowed = vec!["none", "last"];
                allowed.extend_from_slice(ctx.node_names);
                let message = format!(
                    "unknown value {other:?}; allowed: {}",
                    quoted_list(&allowed)
                );
                report.push(value.span(), table.key("default_primary"), message);
                DefaultPrimary::None
            }
        };
    }
    let timeout = |report: &mut Report, key: &str| {
        table
            .duration_or(report, key, DEFAULT_SCRIPT_TIMEOUT)
            .into_inner()
    };
    settings.stop_timeout = timeout(report, "stop_timeout");
    settings.force_stop_timeout = timeout(report, "force_stop_timeout");
    settings.start_timeout = timeout(report, "start_timeout");

    let default_scripts = Path::new(DEFAULT_SCRIPTS_ROOT).join(&name);
    let scripts_dir = match table.string(report, "scripts") {
        Some(value) => absolute_path(report, table.key("scripts"), &value).unwrap_or_default(),
        None => default_scripts,
    };
    let max_restarts = table
        .int_or(
            report,
            "max_restarts",
            (0, u32::MAX.into()),
            DEFAULT_MAX_RESTARTS,
        )
        .into_inner();
    let restart_window = table
        .duration_or(report, "restart_window", DEFAULT_RESTART_WINDOW)
        .into_inner();

    let vips = table
        .tables(report, "vip", VIP_KEYS)
        .iter()
        .filter_map(|vip_table| vip(report, vip_table, ctx))
        .collect();
    let replicated = table
        .tables(report, "replicated", REPLICATED_KEYS)
        .iter()
        .filter_map(|replicated_table| replicated(report, replicated_table, ctx))
        .collect();

    ModuleConfig {
        settings,
        scripts_dir,
        vips,
        replicated,
        max_restarts,
        restart_window,
    }
}

fn vip(
    report: &mut Report,
    table: &Table<'_, '_>,
    ctx: &mut ModuleContext<'_>,
) -> Option<VipConfig> {
    let addr = table.required_string(report, "addr");
    let interface = table.string(report, "interface").and_then(|value| {
        let name = *value.get_ref();
        if valid_interface(name) {
            Some(name.to_owned())
        } else {
            let message = format!(
                "invalid interface name {name:?}: 1 to 15 characters, without \"/\", \":\" or \
                 whitespace"
            );
            report.push(value.span(), table.key("interface"), message);
            None
        }
    });
    let gratuitous_arp = table.bool_or(report, "gratuitous_arp", true);

    let addr = addr?;
    let key = table.key("addr");
    let (ip, prefix) = match parse_vip(addr.get_ref()) {
        Ok(parsed) => parsed,
        Err(message) => {
            report.push(addr.span(), key, message);
            return None;
        }
    };
    if let Some((_, node)) = ctx.node_addrs.iter().find(|(a, _)| *a == ip) {
        let message =
            format!("{ip} is the address of a node ({node}); a virtual IP must be another address");
        report.push(addr.span(), key, message);
        return None;
    }
    if let Some((_, other)) = ctx.vips.iter().find(|(a, _)| *a == ip) {
        let message = format!("duplicate virtual IP {ip} (also {other})");
        report.push(addr.span(), key, message);
        return None;
    }
    ctx.vips.push((ip, key));
    Some(VipConfig {
        addr: ip,
        prefix,
        interface,
        gratuitous_arp,
    })
}

/// `ADDR[/PREFIX]` of a virtual IP.
fn parse_vip(text: &str) -> Result<(IpAddr, u8), String> {
    let (ip_text, prefix_text) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip_text.trim().parse().map_err(|_| {
        format!(
            "invalid address {text:?}: expected an IPv4 or IPv6 address with an optional prefix \
             length, such as \"10.77.0.100/24\" or \"fd00::100/64\""
        )
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max,
        Some(p) => match p.trim().parse::<u8>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                return Err(format!(
                    "invalid prefix length \"/{p}\" for an {} address; allowed: 1..={max}",
                    family(ip)
                ));
            }
        },
    };
    if let Some(why) = unusable(ip) {
        return Err(format!("{ip} cannot be a virtual IP: it is {why}"));
    }
    if let IpAddr::V4(v4) = ip
        && prefix <= 30
    {
        let host_mask = u32::MAX >> prefix;
        let host = u32::from(v4) & host_mask;
        let network = Ipv4Addr::from(u32::from(v4) & !host_mask);
        if host == 0 {
            return Err(format!(
                "{ip} is the network address of {network}/{prefix}; use a host address"
            ));
        }
        if host == host_mask {
            return Err(format!(
                "{ip} is the broadcast address of {network}/{prefix}; use a host address"
            ));
        }
    }
    Ok((ip, prefix))
}

fn replicated(
    report: &mut Report,
    table: &Table<'_, '_>,
    ctx: &mut ModuleContext<'_>,
) -> Option<ReplicatedConfig> {
    let dir = table.required_string(report, "dir").and_then(|value| {
        Some((
            absolute_path(report, table.key("dir"), &value)?,
            value.span(),
        ))
    });
    let mut exclude = Vec::new();
    if let Some(array) = table.array(report, "exclude") {
        for (i, item) in array.iter().enumerate() {
            let key = format!("{}[{i}]", table.key("exclude"));
            let Some(pattern) = as_str(report, key.clone(), item) else {
                continue;
            };
            match check_glob(pattern.get_ref()) {
                Ok(()) => exclude.push((*pattern.get_ref()).to_owned()),
                Err(why) => {
                    let message = format!("invalid pattern {:?}: {why}", pattern.get_ref());
                    report.push(pattern.span(), key, message);
                }
            }
        }
    }
    let (dir, span) = dir?;
    if dir == Path::new("/") {
        let message = "the root directory cannot be replicated";
        report.push(span, table.key("dir"), message);
        return None;
    }
    ctx.replicated.push(Located {
        key: table.key("dir"),
        span,
        value: dir.clone(),
    });
    Some(ReplicatedConfig { dir, exclude })
}

/// Replicated directories must be distinct, not nested, and clear of tandem's own files.
fn check_replicated_overlaps(
    report: &mut Report,
    replicated: &[Located<PathBuf>],
    daemon_paths: &[Located<PathBuf>],
) {
    for (i, dir) in replicated.iter().enumerate() {
        let shown = dir.value.display();
        let conflict = replicated[..i].iter().find_map(|other| {
            let other_shown = other.value.display();
            if other.value == dir.value {
                Some(format!("{shown} is already replicated by {}", other.key))
            } else if dir.value.starts_with(&other.value) {
                Some(format!(
                    "{shown} is inside {other_shown} ({}); replicated directories must not be \
                     nested",
                    other.key
                ))
            } else if other.value.starts_with(&dir.value) {
                Some(format!(
                    "{shown} contains {other_shown} ({}); replicated directories must not be \
                     nested",
                    other.key
                ))
            } else {
                None
            }
        });
        let conflict = conflict.or_else(|| {
            daemon_paths.iter().find_map(|own| {
                (own.value.starts_with(&dir.value) || dir.value.starts_with(&own.value)).then(
                    || {
                        format!(
                            "{shown} overlaps {} ({}); tandem's own files cannot be replicated",
                            own.key,
                            own.value.display()
                        )
                    },
                )
            })
        });
        if let Some(message) = conflict {
            report.push(dir.span.clone(), dir.key.clone(), message);
        }
    }
}

/// An absolute path option, `default` when absent; normalised (no `.`, `//` or trailing `/`).
fn path_or(
    report: &mut Report,
    table: &Table<'_, '_>,
    key: &str,
    default: &str,
) -> Spanned<PathBuf> {
    match table.string(report, key) {
        Some(value) => {
            let path = absolute_path(report, table.key(key), &value).unwrap_or_default();
            Spanned::new(value.span(), path)
        }
        None => Spanned::new(table.span.clone(), PathBuf::from(default)),
    }
}

fn absolute_path(report: &mut Report, key: String, value: &Spanned<&str>) -> Option<PathBuf> {
    let text = *value.get_ref();
    let problem = if text.is_empty() {
        "empty path; expected an absolute path such as \"/srv/app\"".to_owned()
    } else if text.contains('\0') {
        format!("{text:?} contains a NUL character")
    } else if !text.starts_with('/') {
        format!("{text:?} is not an absolute path: it must start with \"/\"")
    } else if Path::new(text)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        format!("{text:?} must not contain \"..\"")
    } else {
        return Some(Path::new(text).components().collect());
    };
    report.push(value.span(), key, problem);
    None
}

/// Checks an exclude glob: relative, no `..`, balanced `[]` and `{}`.
fn check_glob(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty pattern".to_owned());
    }
    if pattern.starts_with('/') {
        return Err(
            "patterns are relative to the replicated directory: remove the leading \"/\""
                .to_owned(),
        );
    }
    if pattern.split('/').any(|part| part == "..") {
        return Err("\"..\" is not allowed".to_owned());
    }
    if pattern.contains('\0') {
        return Err("contains a NUL character".to_owned());
    }
    let mut chars = pattern.chars();
    let mut braces = 0usize;
    while let Some(c) = chars.next() {
        match c {
            // An escaped character is literal, whatever it is.
            '\\' => {
                chars
                    .next()
                    .ok_or_else(|| "ends with an escaping \"\\\"".to_owned())?;
            }
            '[' => {
                // `[!]a]` and `[]a]`: a `]` right after the opening (and negation) is literal.
                let mut members = 0;
                let mut negation_allowed = true;
                let mut closed = false;
                for c in chars.by_ref() {
                    if negation_allowed && (c == '!' || c == '^') {
                        negation_allowed = false;
                        continue;
                    }
                    negation_allowed = false;
                    if c == ']' && members > 0 {
                        closed = true;
                        break;
                    }
                    members += 1;
                }
                if !closed {
                    return Err("unclosed \"[\"".to_owned());
                }
            }
            '{' => braces += 1,
            '}' if braces == 0 => return Err("unmatched \"}\"".to_owned()),
            '}' => braces -= 1,
            _ => {}
        }
    }
    if braces > 0 {
        return Err("unclosed \"{\"".to_owned());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum NameRule {
    Cluster,
    Node,
    Module,
}

/// Checks a name against its rule, reporting why it is refused.
fn check_name(report: &mut Report, key: String, name: &Spanned<&str>, rule: NameRule) -> bool {
    let text = *name.get_ref();
    let (what, max, valid_char, allowed): (&str, usize, fn(char) -> bool, &str) = match rule {
        NameRule::Cluster => (
            "cluster",
            64,
            is_host_char,
            "a-z, A-Z, 0-9, \".\", \"_\", \"-\"",
        ),
        NameRule::Node => (
            "node",
            64,
            is_host_char,
            "a-z, A-Z, 0-9, \".\", \"_\", \"-\"",
        ),
        NameRule::Module => ("module", 32, is_module_char, "a-z, 0-9, \"_\", \"-\""),
    };
    let valid = text.chars().count() <= max
        && text
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && text.chars().all(valid_char);
    let problem = if !valid {
        format!(
            "invalid {what} name {text:?}; allowed: 1 to {max} characters among {allowed}, \
             starting with a letter or digit"
        )
    } else if matches!(rule, NameRule::Node) && (text == "none" || text == "last") {
        format!("{text:?} cannot be a node name: it is a keyword of default_primary")
    } else {
        return true;
    };
    report.push(name.span(), key, problem);
    false
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn is_module_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')
}

fn valid_interface(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Why `ip` cannot be a node or virtual address, if it cannot.
fn unusable(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}es")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for ok in [
            "*.tmp", "cache/**", "[!a]*", "[]]x", "{a,b}/*", "a\\[b", "x/[a-z]?",
        ] {
            assert_eq!(check_glob(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty pattern"),
            ("/abs", "patterns are relative"),
            ("a/../b", "\"..\""),
            ("[abc", "unclosed \"[\""),
            ("[]", "unclosed \"[\""),
            ("{a,b", "unclosed \"{\""),
            ("a}", "unmatched \"}\""),
            ("a\\", "escaping"),
        ] {
            let err = check_glob(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn vips() {
        assert_eq!(parse_vip("10.0.0.1"), Ok(("10.0.0.1".parse().unwrap(), 32)));
        assert_eq!(
            parse_vip("fd00::1/64"),
            Ok(("fd00::1".parse().unwrap(), 64))
        );
        assert_eq!(
            parse_vip("10.0.0.1/31"),
            Ok(("10.0.0.1".parse().unwrap(), 31))
        );
        assert_eq!(
            parse_vip("10.0.0.0/31"),
            Ok(("10.0.0.0".parse().unwrap(), 31))
        );
        assert!(
            parse_vip("10.0.0.0/24")
                .unwrap_err()
                .contains("network address of 10.0.0.0/24")
        );
        assert!(
            parse_vip("10.0.0.255/24")
                .unwrap_err()
                .contains("broadcast address")
        );
        assert!(
            parse_vip("10.0.0.1/0")
                .unwrap_err()
                .contains("allowed: 1..=32")
        );
        assert!(
            parse_vip("fd00::1/129")
                .unwrap_err()
                .contains("allowed: 1..=128")
        );
        assert!(parse_vip("224.0.0.1").unwrap_err().contains("multicast"));
        assert!(parse_vip("0.0.0.0").unwrap_err().contains("unspecified"));
        assert!(parse_vip("eth0").unwrap_err().contains("invalid address"));
    }
}
