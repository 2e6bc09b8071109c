//! Parsing, defaults, and the shape of every class of error message.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_core::{DefaultPrimary, ModuleSettings, NodeSettings};

use crate::*;

const FILE: &str = "/etc/tandem/tandem.toml";
const SECRET: &str = "CBpgwGEuqBN5quCLAUa20BrP/4dIZekZ2DvSbgeHQ4U=";

/// 11 lines: `[[module]]` appended by [`with_module`] lands on line 13.
fn minimal() -> String {
    format!(
        r#"[cluster]
name = "demo"
secret = "{SECRET}"

[[node]]
name = "node1"
addrs = ["10.77.0.1"]

[[node]]
name = "node2"
addrs = ["10.77.0.2"]
"#
    )
}

fn with_module(module: &str) -> String {
    format!("{}\n[[module]]\n{module}", minimal())
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new(FILE), text)
}

fn diagnostics(text: &str) -> Vec<Diagnostic> {
    match parse(text) {
        Err(ConfigError::Invalid { diagnostics }) => {
            assert!(!diagnostics.is_empty());
            diagnostics
        }
        other => panic!("expected diagnostics, got {other:#?}"),
    }
}

/// The only diagnostic of `text`.
fn one(text: &str) -> Diagnostic {
    let mut all = diagnostics(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

/// `d` is at `line`, for `key`, and its message contains every one of `parts`.
#[track_caller]
fn check(d: &Diagnostic, line: usize, key: &str, parts: &[&str]) {
    assert_eq!(d.file, Path::new(FILE), "{d}");
    assert_eq!(d.line, line, "{d}");
    assert_eq!(d.key, key, "{d}");
    for part in parts {
        assert!(d.message.contains(part), "{d:?} does not contain {part:?}");
    }
    let shown = d.to_string();
    let prefix = format!("{FILE}:{line}:{}: {key}: ", d.column);
    assert!(shown.starts_with(&prefix), "{shown}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn full_example_parses_to_the_expected_structs() {
    let text = format!(
        r#"
this_node = "node1"

[cluster]
name = "demo"
secret = "{SECRET}"
plaintext_replication = false

[[node]]
name = "node1"
addrs = ["10.77.0.1", "fd00::1"]
[[node]]
name = "node2"
addrs = ["10.77.0.2", "fd00::2"]

[heartbeat]
pulse = "100ms"
timeout = "1.5s"
port = 9121
channel_port = 9120
channel_network = 1

[daemon]
state_dir = "/var/lib/tandem-a/"
log_dir = "/var/log/tandem-a"
socket = "/run/tandem-a/tandem.sock"
autostart = true

[[module]]
name = "demo"
failover = false
default_primary = "node2"
scripts = "/opt/demo/scripts"
stop_timeout = "10s"
force_stop_timeout = "5s"
start_timeout = "1m"
max_restarts = 5
restart_window = "1h30m"
  [[module.vip]]
  addr = "10.77.0.100/24"
  interface = "eth0"
  gratuitous_arp = false
  [[module.vip]]
  addr = "fd00::100"
  [[module.replicated]]
  dir = "/srv/demo/data"
  exclude = ["*.tmp", "cache/**"]

[[module]]
name = "other_1"
default_primary = "last"
"#
    );
    let config = parse(&text).unwrap();
    let mut demo = ModuleSettings::new("demo");
    demo.failover = false;
    demo.default_primary = DefaultPrimary::Node("node2".into());
    demo.stop_timeout = Duration::from_secs(10);
    demo.force_stop_timeout = Duration::from_secs(5);
    demo.start_timeout = Duration::from_secs(60);
    let mut other = ModuleSettings::new("other_1");
    other.default_primary = DefaultPrimary::Last;
    let expected = Config {
        path: PathBuf::from(FILE),
        this_node: Some("node1".into()),
        cluster: ClusterConfig {
            name: "demo".into(),
            secret: base64::Engine::decode(&base64::engine::general_purpose::STANDARD, SECRET)
                .unwrap(),
            plaintext_replication: false,
        },
        nodes: vec![
            NodeConfig {
                name: "node1".into(),
                addrs: vec![ip("10.77.0.1"), ip("fd00::1")],
            },
            NodeConfig {
                name: "node2".into(),
                addrs: vec![ip("10.77.0.2"), ip("fd00::2")],
            },
        ],
        heartbeat: HeartbeatConfig {
            pulse: Duration::from_millis(100),
            timeout: Duration::from_millis(1500),
            port: 9121,
            channel_port: 9120,
            channel_network: 1,
        },
        daemon: DaemonConfig {
            state_dir: "/var/lib/tandem-a".into(),
            log_dir: "/var/log/tandem-a".into(),
            socket: "/run/tandem-a/tandem.sock".into(),
            autostart: true,
        },
        modules: vec![
            ModuleConfig {
                settings: demo,
                scripts_dir: "/opt/demo/scripts".into(),
                vips: vec![
                    VipConfig {
                        addr: ip("10.77.0.100"),
                        prefix: 24,
                        interface: Some("eth0".into()),
                        gratuitous_arp: false,
                    },
                    VipConfig {
                        addr: ip("fd00::100"),
                        prefix: 128,
                        interface: None,
                        gratuitous_arp: true,
                    },
                ],
                replicated: vec![ReplicatedConfig {
                    dir: "/srv/demo/data".into(),
                    exclude: vec!["*.tmp".into(), "cache/**".into()],
                }],
                max_restarts: 5,
                restart_window: Duration::from_secs(5400),
            },
            ModuleConfig {
                settings: other,
                scripts_dir: "/etc/tandem/other_1".into(),
                vips: vec![],
                replicated: vec![],
                max_restarts: 3,
                restart_window: Duration::from_secs(86_400),
            },
        ],
    };
    assert_eq!(config, expected);
}

#[test]
fn defaults_apply() {
    let config = parse(&with_module("name = \"demo\"\n")).unwrap();
    assert_eq!(config.this_node, None);
    assert!(!config.cluster.plaintext_replication);
    assert_eq!(
        config.heartbeat,
        HeartbeatConfig {
            pulse: Duration::from_millis(250),
            timeout: Duration::from_secs(2),
            port: 9021,
            channel_port: 9020,
            channel_network: 0,
        }
    );
    assert_eq!(
        config.daemon,
        DaemonConfig {
            state_dir: "/var/lib/tandem".into(),
            log_dir: "/var/log/tandem".into(),
            socket: "/run/tandem/tandem.sock".into(),
            autostart: false,
        }
    );
    let module = &config.modules[0];
    assert_eq!(module.settings, ModuleSettings::new("demo"));
    assert_eq!(module.scripts_dir, Path::new("/etc/tandem/demo"));
    assert_eq!(module.max_restarts, 3);
    assert_eq!(module.restart_window, Duration::from_secs(24 * 3600));
    assert!(module.vips.is_empty() && module.replicated.is_empty());
    // No module at all is a valid (if idle) cluster.
    assert!(parse(&minimal()).unwrap().modules.is_empty());
}

#[test]
fn example_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tandem.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.path, path);
    assert_eq!(config.this_node.as_deref(), Some("node1"));
    assert_eq!(config.nodes.len(), 2);
    assert_eq!(config.nodes[0].addrs.len(), 2);
    let (index, module) = config.module(None).unwrap();
    assert_eq!((index, module.name()), (0, "demo"));
    assert_eq!(module.vips[0].prefix, 24);
    assert_eq!(module.replicated.len(), 2);
}

#[test]
fn generated_secrets_are_accepted() {
    let a = generate_secret();
    let b = generate_secret();
    assert_ne!(a, b);
    let config = parse(&minimal().replace(SECRET, &a)).unwrap();
    assert_eq!(config.cluster.secret.len(), 32);
}

#[test]
fn secret_is_never_shown() {
    let config = parse(&minimal()).unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("<redacted, 32 bytes>"), "{debug}");
    assert!(!debug.contains(&format!("{:?}", config.cluster.secret)));
    let text = minimal().replace(SECRET, "c2hvcnQgc2VjcmV0");
    let d = one(&text);
    check(
        &d,
        3,
        "cluster.secret",
        &["too short: 12 bytes", "at least 32", "tandem secret"],
    );
    assert!(!d.to_string().contains("c2hvcnQgc2VjcmV0"));
    let d = one(&minimal().replace(SECRET, "not base64!"));
    check(
        &d,
        3,
        "cluster.secret",
        &["not valid base64", "tandem secret"],
    );
    assert!(!d.to_string().contains("not base64!"));
}

#[test]
fn the_briefs_example_message() {
    let text = with_module("default_primary = \"node3\"\nname = \"demo\"\n");
    let d = one(&text);
    assert_eq!(
        d.to_string(),
        "/etc/tandem/tandem.toml:14:19: module[0].default_primary: unknown value \"node3\"; \
         allowed: \"none\", \"last\", \"node1\", \"node2\""
    );
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        d.to_string(),
        "ConfigError displays its diagnostics"
    );
}

#[test]
fn syntax_errors() {
    let text = minimal().replace("[[node]]\nname = \"node2\"", "[[node]\nname = \"node2\"");
    let all = diagnostics(&text);
    let d = &all[0];
    assert_eq!((d.line, d.key.as_str()), (9, ""), "{d}");
    assert!(d.message.starts_with("TOML syntax error: "), "{d}");
    assert!(
        d.to_string().starts_with("/etc/tandem/tandem.toml:9:"),
        "{d}"
    );

    let text = minimal().replace("name = \"node2\"", "name = \"node2");
    let d = &diagnostics(&text)[0];
    assert_eq!(d.line, 10, "{d}");
    assert!(d.message.starts_with("TOML syntax error: "), "{d}");

    let text = format!("{}name = \"again\"\n", minimal());
    let d = &diagnostics(&text)[0];
    assert_eq!((d.line, d.column), (12, 1), "{d}");
    assert!(d.message.contains("duplicate key"), "{d}");
}

#[test]
fn unknown_keys_list_the_allowed_ones() {
    let text = with_module("name = \"demo\"\n[[module.vip]]\nadress = \"10.77.0.100\"\n");
    let all = diagnostics(&text);
    // The missing required key is reported too, at the table header, which comes first.
    check(
        &all[0],
        15,
        "module[0].vip[0].addr",
        &["missing required key \"addr\""],
    );
    check(
        &all[1],
        16,
        "module[0].vip[0].adress",
        &[
            "unknown key \"adress\"",
            "allowed keys: \"addr\", \"interface\", \"gratuitous_arp\"",
        ],
    );
    assert_eq!(all.len(), 2, "{all:#?}");

    let text = format!("[witness]\naddr = \"10.0.0.9\"\n{}", minimal());
    check(
        &one(&text),
        1,
        "witness",
        &[
            "unknown key \"witness\"",
            "\"this_node\", \"cluster\", \"node\", \"heartbeat\", \"daemon\", \"module\"",
        ],
    );

    let text = format!(
        "{}[heartbeat]\npulse = \"100ms\"\ntimout = \"5s\"\n",
        minimal()
    );
    check(
        &one(&text),
        14,
        "heartbeat.timout",
        &["\"pulse\", \"timeout\", \"port\", \"channel_port\", \"channel_network\""],
    );
}

#[test]
fn wrong_types() {
    let text = format!("{}[heartbeat]\nport = \"9021\"\n", minimal());
    check(
        &one(&text),
        13,
        "heartbeat.port",
        &["expected an integer, found a string"],
    );

    let text = with_module("name = \"demo\"\nfailover = \"yes\"\n");
    check(
        &one(&text),
        15,
        "module[0].failover",
        &["expected a boolean (true or false), found a string"],
    );

    let text = format!("{}[daemon]\nautostart = 1\n", minimal());
    check(&one(&text), 13, "daemon.autostart", &["expected a boolean"]);

    let text = minimal().replace("addrs = [\"10.77.0.2\"]", "addrs = \"10.77.0.2\"");
    check(
        &one(&text),
        11,
        "node[1].addrs",
        &["expected an array, found a string"],
    );

    let text = minimal().replace("addrs = [\"10.77.0.2\"]", "addrs = [10]");
    check(
        &one(&text),
        11,
        "node[1].addrs[0]",
        &["expected a string, found an integer"],
    );

    let text = format!("module = \"demo\"\n{}", minimal());
    check(
        &one(&text),
        1,
        "module",
        &["expected an array of tables", "[[module]]"],
    );

    let text = format!("{}[module]\nname = \"demo\"\n", minimal());
    check(
        &one(&text),
        12,
        "module",
        &["expected an array of tables", "found a table"],
    );

    let text = with_module("name = \"demo\"\nvip = \"10.77.0.100\"\n");
    check(
        &one(&text),
        15,
        "module[0].vip",
        &["write each entry as [[module.vip]]", "found a string"],
    );

    let text = format!("this_node = 1\n{}", minimal());
    check(
        &one(&text),
        1,
        "this_node",
        &["expected a string, found an integer"],
    );

    let text = format!("{}[heartbeat]\nport = 70000\n", minimal());
    check(
        &one(&text),
        13,
        "heartbeat.port",
        &["70000 is out of range; allowed: 1..=65535"],
    );

    let text = with_module("name = \"demo\"\nmax_restarts = -1\n");
    check(
        &one(&text),
        15,
        "module[0].max_restarts",
        &["allowed: 0..=4294967295"],
    );
}

#[test]
fn bad_durations() {
    let text = format!("{}[heartbeat]\npulse = \"250\"\n", minimal());
    check(
        &one(&text),
        13,
        "heartbeat.pulse",
        &[
            "invalid duration \"250\": missing unit",
            "allowed units: us, ms, s, m, h, d",
        ],
    );

    let text = format!("{}[heartbeat]\ntimeout = 2\n", minimal());
    check(
        &one(&text),
        13,
        "heartbeat.timeout",
        &[
            "needs a unit",
            "\"2s\"",
            "allowed units: us, ms, s, m, h, d",
        ],
    );

    let text = with_module("name = \"demo\"\nstop_timeout = \"5 minutes\"\n");
    check(
        &one(&text),
        15,
        "module[0].stop_timeout",
        &["unknown unit \"minutes\""],
    );

    let text = with_module("name = \"demo\"\nrestart_window = \"0s\"\n");
    check(
        &one(&text),
        15,
        "module[0].restart_window",
        &["must be greater than zero"],
    );

    let text = format!("{}[heartbeat]\npulse = true\n", minimal());
    check(
        &one(&text),
        13,
        "heartbeat.pulse",
        &["expected a duration string", "found a boolean"],
    );
}

#[test]
fn bad_addresses_and_prefixes() {
    let text = minimal().replace("10.77.0.2\"", "10.77.0.300\"");
    check(
        &one(&text),
        11,
        "node[1].addrs[0]",
        &["invalid address \"10.77.0.300\"", "IPv4 or IPv6"],
    );

    let text = minimal().replace("10.77.0.2\"", "10.77.0.2/24\"");
    check(&one(&text), 11, "node[1].addrs[0]", &["no prefix length"]);

    let text = minimal().replace("10.77.0.2\"", "10.77.0.1\"");
    check(
        &one(&text),
        11,
        "node[1].addrs[0]",
        &["duplicate address 10.77.0.1 (also node[0].addrs[0])"],
    );

    let text = minimal().replace("10.77.0.2\"", "0.0.0.0\"");
    check(&one(&text), 11, "node[1].addrs[0]", &["unspecified"]);

    let vip = |addr: &str| {
        with_module(&format!(
            "name = \"demo\"\n[[module.vip]]\naddr = \"{addr}\"\n"
        ))
    };
    let d = one(&vip("10.77.0.100/33"));
    check(
        &d,
        16,
        "module[0].vip[0].addr",
        &["prefix length \"/33\"", "IPv4", "allowed: 1..=32"],
    );
    assert_eq!(d.column, 8);
    check(
        &one(&vip("fd00::1/200")),
        16,
        "module[0].vip[0].addr",
        &["IPv6", "allowed: 1..=128"],
    );
    check(
        &one(&vip("10.77.0/24")),
        16,
        "module[0].vip[0].addr",
        &["invalid address", "10.77.0.100/24"],
    );
    check(
        &one(&vip("10.77.0.1/24")),
        16,
        "module[0].vip[0].addr",
        &["address of a node (node[0].addrs[0])"],
    );
    check(
        &one(&vip("10.77.0.0/24")),
        16,
        "module[0].vip[0].addr",
        &["network address"],
    );

    let text = with_module(
        "name = \"demo\"\n[[module.vip]]\naddr = \"10.77.0.100\"\ninterface = \"a/b\"\n",
    );
    check(
        &one(&text),
        17,
        "module[0].vip[0].interface",
        &["invalid interface name \"a/b\""],
    );

    let text = with_module(
        "name = \"a\"\n[[module.vip]]\naddr = \"10.77.0.100\"\n[[module]]\nname = \"b\"\n\
         [[module.vip]]\naddr = \"10.77.0.100/24\"\n",
    );
    check(
        &one(&text),
        20,
        "module[1].vip[0].addr",
        &["duplicate virtual IP 10.77.0.100 (also module[0].vip[0].addr)"],
    );
}

#[test]
fn node_rules() {
    let extra = "\n[[node]]\nname = \"node3\"\naddrs = [\"10.77.0.3\"]\n";
    let text = format!("{}{extra}", minimal());
    check(&one(&text), 13, "node", &["exactly 2 nodes, found 3"]);

    let text = minimal().replace("name = \"node2\"", "name = \"node1\"");
    check(
        &one(&text),
        10,
        "node[1].name",
        &["duplicate node name \"node1\" (also node[0].name)"],
    );

    let text = minimal().replace("name = \"node2\"", "name = \"last\"");
    check(
        &one(&text),
        10,
        "node[1].name",
        &["keyword of default_primary"],
    );

    let text = minimal().replace("name = \"node2\"", "name = \"node 2\"");
    check(
        &one(&text),
        10,
        "node[1].name",
        &["invalid node name \"node 2\"", "allowed: 1 to 64"],
    );

    let text = minimal().replace("[\"10.77.0.2\"]", "[\"10.77.0.2\", \"10.78.0.2\"]");
    check(
        &one(&text),
        11,
        "node[1].addrs",
        &[
            "node[1] has 2 addresses but node[0] has 1 address",
            "one address per heartbeat network",
        ],
    );

    let text = minimal().replace("[\"10.77.0.2\"]", "[]");
    check(&one(&text), 11, "node[1].addrs", &["at least one address"]);

    let text = minimal().replace("[\"10.77.0.2\"]", "[\"fd00::2\"]");
    check(
        &one(&text),
        11,
        "node[1].addrs[0]",
        &[
            "IPv6 address, but node[0].addrs[0] (10.77.0.1) is IPv4",
            "same family",
        ],
    );

    let text = minimal().replace("addrs = [\"10.77.0.2\"]\n", "");
    check(
        &one(&text),
        9,
        "node[1].addrs",
        &["missing required key \"addrs\" in node[1]"],
    );

    let text = minimal().replace("[cluster]\nname = \"demo\"\n", "[cluster]\n");
    check(
        &one(&text),
        1,
        "cluster.name",
        &["missing required key \"name\""],
    );

    let text = minimal().replace(
        &format!("[cluster]\nname = \"demo\"\nsecret = \"{SECRET}\"\n"),
        "",
    );
    check(
        &one(&text),
        1,
        "cluster",
        &["missing required table [cluster]"],
    );

    check(
        &one(&format!("[cluster]\nname = \"x\"\nsecret = \"{SECRET}\"\n")),
        1,
        "node",
        &["exactly 2 nodes"],
    );
}

#[test]
fn heartbeat_rules() {
    let text = format!(
        "{}[heartbeat]\npulse = \"1s\"\ntimeout = \"2s\"\n",
        minimal()
    );
    check(
        &one(&text),
        14,
        "heartbeat.timeout",
        &["timeout (2s) must be at least 3 x pulse (3 x 1s = 3s)"],
    );
    // Without an explicit timeout, the pulse is at fault.
    let text = format!("{}[heartbeat]\npulse = \"1s\"\n", minimal());
    check(&one(&text), 13, "heartbeat.pulse", &["at least 3 x pulse"]);

    let text = format!("{}[heartbeat]\nchannel_network = 1\n", minimal());
    check(
        &one(&text),
        13,
        "heartbeat.channel_network",
        &["network 1 does not exist; allowed: 0"],
    );
    let two = minimal()
        .replace("\"10.77.0.1\"]", "\"10.77.0.1\", \"10.78.0.1\"]")
        .replace("\"10.77.0.2\"]", "\"10.77.0.2\", \"10.78.0.2\"]");
    let text = format!("{two}[heartbeat]\nchannel_network = 2\n");
    check(
        &one(&text),
        13,
        "heartbeat.channel_network",
        &["allowed: 0, 1"],
    );
    assert_eq!(
        parse(&format!("{two}[heartbeat]\nchannel_network = 1\n"))
            .unwrap()
            .heartbeat
            .channel_network,
        1
    );
}

#[test]
fn module_rules() {
    let text = with_module("name = \"Demo\"\n");
    check(
        &one(&text),
        14,
        "module[0].name",
        &[
            "invalid module name \"Demo\"",
            "1 to 32 characters among a-z, 0-9, \"_\", \"-\"",
        ],
    );
    let text = with_module("name = \"demo\"\n[[module]]\nname = \"demo\"\n");
    let d = one(&text);
    check(
        &d,
        16,
        "module[1].name",
        &["duplicate module name \"demo\" (also module[0].name)"],
    );

    let text = with_module("failover = true\n");
    check(
        &one(&text),
        13,
        "module[0].name",
        &["missing required key \"name\" in module[0]"],
    );

    let text = with_module("name = \"demo\"\nscripts = \"scripts/demo\"\n");
    check(
        &one(&text),
        15,
        "module[0].scripts",
        &["not an absolute path"],
    );
}

#[test]
fn replicated_rules() {
    let repl = |dirs: &[&str]| {
        let mut text = with_module("name = \"demo\"\n");
        for dir in dirs {
            text.push_str(&format!("[[module.replicated]]\ndir = \"{dir}\"\n"));
        }
        text
    };
    let d = one(&repl(&["srv/data"]));
    check(
        &d,
        16,
        "module[0].replicated[0].dir",
        &["not an absolute path"],
    );
    check(
        &one(&repl(&["/srv/../etc"])),
        16,
        "module[0].replicated[0].dir",
        &["\"..\""],
    );
    check(
        &one(&repl(&["/"])),
        16,
        "module[0].replicated[0].dir",
        &["root directory"],
    );
    check(
        &one(&repl(&["/srv/a", "/srv/a/"])),
        18,
        "module[0].replicated[1].dir",
        &["/srv/a is already replicated by module[0].replicated[0].dir"],
    );
    check(
        &one(&repl(&["/srv/a", "/srv/a/b"])),
        18,
        "module[0].replicated[1].dir",
        &[
            "/srv/a/b is inside /srv/a (module[0].replicated[0].dir)",
            "nested",
        ],
    );
    check(
        &one(&repl(&["/srv/a/b", "/srv"])),
        18,
        "module[0].replicated[1].dir",
        &["/srv contains /srv/a/b"],
    );
    check(
        &one(&repl(&["/var/lib"])),
        16,
        "module[0].replicated[0].dir",
        &["overlaps daemon.state_dir (/var/lib/tandem)"],
    );
    // Siblings sharing a prefix are not nested.
    let config = parse(&repl(&["/srv/a", "/srv/ab", "/srv/./c//"])).unwrap();
    let dirs: Vec<_> = config.modules[0]
        .replicated
        .iter()
        .map(|r| r.dir.clone())
        .collect();
    assert_eq!(
        dirs,
        [
            Path::new("/srv/a"),
            Path::new("/srv/ab"),
            Path::new("/srv/c")
        ]
    );

    // Across modules.
    let text = with_module(
        "name = \"a\"\n[[module.replicated]]\ndir = \"/srv/a\"\n[[module]]\nname = \"b\"\n\
         [[module.replicated]]\ndir = \"/srv/a/x\"\n",
    );
    check(
        &one(&text),
        20,
        "module[1].replicated[0].dir",
        &["inside /srv/a (module[0].replicated[0].dir)"],
    );

    let text = format!(
        "{}exclude = [\"/abs\", \"ok/**\", \"[x\"]\n",
        repl(&["/srv/a"])
    );
    let all = diagnostics(&text);
    assert_eq!(all.len(), 2, "{all:#?}");
    check(
        &all[0],
        17,
        "module[0].replicated[0].exclude[0]",
        &["invalid pattern \"/abs\"", "relative"],
    );
    check(
        &all[1],
        17,
        "module[0].replicated[0].exclude[2]",
        &["unclosed \"[\""],
    );
    assert!(all[0].column < all[1].column);
}

#[test]
fn this_node_must_be_a_node() {
    let text = format!("this_node = \"node3\"\n{}", minimal());
    let d = one(&text);
    check(
        &d,
        1,
        "this_node",
        &["unknown node \"node3\"; allowed: \"node1\", \"node2\""],
    );
    assert_eq!(d.column, 13);
}

#[test]
fn all_semantic_errors_are_reported_in_file_order() {
    let text = format!(
        "this_node = \"nodeX\"\n{}[heartbeat]\npulse = \"1s\"\ntimeout = \"1s\"\n\
         [[module]]\nname = \"Bad\"\ndefault_primary = \"nobody\"\n",
        minimal()
    );
    let all = diagnostics(&text);
    let keys: Vec<_> = all.iter().map(|d| (d.line, d.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            (1, "this_node"),
            (15, "heartbeat.timeout"),
            (17, "module[0].name"),
            (18, "module[0].default_primary"),
        ]
    );
    let shown = parse(&text).unwrap_err().to_string();
    assert_eq!(shown.lines().count(), 4, "{shown}");
    assert!(shown.lines().all(|l| l.starts_with(FILE)), "{shown}");
}

#[test]
fn columns_count_characters() {
    assert_eq!(reader::line_column("ab\ncdé f", 9), (2, 6));
    assert_eq!(reader::line_column("", 0), (1, 1));
    assert_eq!(reader::line_column("a\r\nb", 3), (2, 1));
    let text = format!("{}[[module]]\nname = \"é\"\n", minimal());
    let d = one(&text);
    assert_eq!((d.line, d.column), (13, 8));
}

#[test]
fn lookups() {
    let config = parse(&with_module("name = \"demo\"\n")).unwrap();
    assert_eq!(config.node("node2").unwrap().addrs, [ip("10.77.0.2")]);
    assert!(config.node("node3").is_none());
    assert_eq!(config.peer_of("node1").unwrap().name, "node2");
    assert_eq!(config.peer_of("node2").unwrap().name, "node1");
    assert!(config.peer_of("node3").is_none());
    assert_eq!(
        config.node_settings("node2"),
        Some(NodeSettings {
            local: "node2".into(),
            peer: "node1".into(),
            networks: 1,
            pulse: Duration::from_millis(250),
            timeout: Duration::from_secs(2),
            modules: vec![ModuleSettings::new("demo")],
        })
    );
    assert_eq!(config.node_settings("node3"), None);
    assert_eq!(config.module(None).unwrap().0, 0);
    assert_eq!(config.module(Some("demo")).unwrap().1.name(), "demo");
    let err = config.module(Some("db")).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{FILE}: no module named \"db\"; configured modules: \"demo\"")
    );

    let two = parse(&with_module("name = \"a\"\n[[module]]\nname = \"b\"\n")).unwrap();
    assert_eq!(two.module(Some("b")).unwrap().0, 1);
    let err = two.module(None).unwrap_err().to_string();
    assert!(
        err.contains("2 modules are configured, choose one with -m: \"a\", \"b\""),
        "{err}"
    );
    let none = parse(&minimal()).unwrap();
    assert!(
        none.module(None)
            .unwrap_err()
            .to_string()
            .contains("no module is configured")
    );
}

#[test]
fn local_node() {
    let config = parse(&minimal()).unwrap();
    let here = config
        .local_node(&[ip("127.0.0.1"), ip("10.77.0.2")])
        .unwrap();
    assert_eq!(here.name, "node2");
    let err = config
        .local_node(&[ip("127.0.0.1")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node1 (10.77.0.1), node2 (10.77.0.2)") && err.contains("this_node"),
        "{err}"
    );
    let err = config
        .local_node(&[ip("10.77.0.1"), ip("10.77.0.2")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("both nodes"), "{err}");
    let pinned = parse(&format!("this_node = \"node1\"\n{}", minimal())).unwrap();
    assert_eq!(pinned.local_node(&[ip("10.77.0.2")]).unwrap().name, "node1");
}

#[test]
fn unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let err = Config::load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}: cannot read", path.display())),
        "{shown}"
    );
    assert!(err.diagnostics().is_empty());

    let path = dir.path().join("tandem.toml");
    std::fs::write(&path, minimal().replace("10.77.0.2\"", "bad\"")).unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_eq!(err.diagnostics().len(), 1);
    assert!(
        err.to_string()
            .starts_with(&format!("{}:11:", path.display())),
        "{err}"
    );
}
