//! The lab itself: creation, state, running things in hosts, faults, teardown.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::alloc;
use crate::mountpoints;
use crate::sys;
use crate::wait_until;

/// Directory under which every lab keeps its state (`<root>/<lab>/`) and the index locks
/// (`<root>/locks/<idx>`).
pub const LAB_ROOT: &str = "/run/tandem-lab";

/// Name of the interface inside every host's network namespace.
pub const HOST_INTERFACE: &str = "eth0";

/// Prefix length of a lab's IPv4 subnet.
pub const PREFIX_LEN: u8 = 24;

/// Prefix length of a lab's IPv6 subnet.
pub const PREFIX_LEN_V6: u8 = 64;

/// Highest number of hosts in one lab (host addresses are `.1` to `.99`).
pub const MAX_HOSTS: usize = 99;

/// nftables table (family `netdev`, hooked on ingress of eth0) holding the drop sets.
const NFT_TABLE: &str = "tandemlab";

/// How long teardown waits for killed processes to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long `create` waits for a host's init to be ready.
const SPAWN_WAIT: Duration = Duration::from_secs(5);

/// The init of every host (`sh -c INIT_SCRIPT init PID_BASE READY_FILE`), PID 1 of the
/// host's PID namespace: mounts the host's /proc (what `ps` and `kill` see inside), sets
/// where the host's PIDs start, says it is ready, then reaps orphans for ever (the shell's
/// `wait` reaps every child, not only its jobs) while it waits for a sleep that never ends.
const INIT_SCRIPT: &str = "mount -t proc -o nosuid,nodev,noexec proc /proc \
    && echo \"$1\" > /proc/sys/kernel/ns_last_pid && : > \"$2\" || exit 1
    while :; do sleep infinity & wait; done";

/// How long `create` waits for the first host to reach all others.
const READY_WAIT: Duration = Duration::from_secs(15);

/// What lab to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// Lab name: directory `/run/tandem-lab/<name>` and prefix of namespaces and links
    /// (`<name>-<host>`, `<name>-br`). 1 to 8 characters `[a-z0-9]`, starting with a
    /// letter, not `tl<digits>` (reserved) nor `locks`. `None` = `tl<index>`.
    pub name: Option<String>,
    /// Host names, in order: host `i` (0-based) gets address `.i+1`. 1 to 15 characters
    /// `[a-z0-9_-]`, starting with a letter or digit.
    pub hosts: Vec<String>,
    /// Fixed index (locks `/run/tandem-lab/locks/<index>`, MACs, IPv6 prefix
    /// `fd77:<index>::/64`). `None` = allocate a free one from 1..=250. Index 0 is never
    /// allocated automatically (it is meant for the demo lab).
    pub index: Option<u8>,
    /// First three octets of the IPv4 /24. `None` = `10.231.<index>`.
    pub subnet: Option<[u8; 3]>,
    /// Also give each host `fd77:<index>::<i+1>/64` (added with `nodad`).
    pub ipv6: bool,
}

impl LabSpec {
    /// An anonymous test lab (`tl<idx>`, `10.231.<idx>.0/24`, IPv6 on) with these hosts.
    pub fn new<I, S>(hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        LabSpec {
            name: None,
            hosts: hosts.into_iter().map(Into::into).collect(),
            index: None,
            subnet: None,
            ipv6: true,
        }
    }

    /// A named lab with a fixed index.
    pub fn named<I, S>(name: &str, index: u8, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        LabSpec {
            name: Some(name.to_owned()),
            index: Some(index),
            ..LabSpec::new(hosts)
        }
    }

    /// The `tandem demo` lab: `demo`, index 0, `10.77.0.0/24`, hosts node1 (.1),
    /// node2 (.2), witness (.3), client (.4); the VIP is meant to be `.100`.
    pub fn demo() -> Self {
        LabSpec::named("demo", 0, ["node1", "node2", "witness", "client"]).with_subnet([10, 77, 0])
    }

    /// Sets the IPv4 /24 (first three octets).
    pub fn with_subnet(mut self, subnet: [u8; 3]) -> Self {
        self.subnet = Some(subnet);
        self
    }

    /// Turns the per-host IPv6 addresses on or off.
    pub fn with_ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    fn validate(&self) -> Result<()> {
        if let Some(name) = &self.name {
            validate_lab_name(name)?;
        }
        if self.hosts.is_empty() || self.hosts.len() > MAX_HOSTS {
            bail!(
                "a lab needs 1 to {MAX_HOSTS} hosts, got {}",
                self.hosts.len()
            );
        }
        let mut seen = BTreeSet::new();
        for h in &self.hosts {
            let ok = (1..=15).contains(&h.len())
                && h.bytes()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && h.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-'
                });
            if !ok {
                bail!("invalid host name `{h}` (1-15 chars [a-z0-9_-], starting [a-z0-9])");
            }
            if !seen.insert(h.as_str()) {
                bail!("host `{h}` listed twice");
            }
        }
        Ok(())
    }
}

fn validate_lab_name(name: &str) -> Result<()> {
    let ok = (1..=8).contains(&name.len())
        && name.bytes().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok {
        bail!("invalid lab name `{name}` (1-8 chars [a-z0-9], starting with a letter)");
    }
    let reserved_tl =
        name.len() > 2 && name.starts_with("tl") && name[2..].bytes().all(|c| c.is_ascii_digit());
    if name == "locks" || reserved_tl {
        bail!("lab name `{name}` is reserved");
    }
    Ok(())
}

/// One host of a lab: a network namespace plus a persistent mount namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Host name as given in the spec (`node1`, ...).
    pub name: String,
    /// Network namespace name (`ip netns`), `<lab>-<host>`.
    pub netns: String,
    /// `/run/netns/<netns>`.
    pub netns_path: PathBuf,
    /// Bind-mounted mount namespace file, `<lab dir>/<host>.mnt`.
    pub mount_ns: PathBuf,
    /// Bind-mounted PID namespace file, `<lab dir>/<host>.pidns`: the host's processes see
    /// only each other, under the host's init (PID 1).
    #[serde(default)]
    pub pid_ns: PathBuf,
    /// Bind-mounted IPC namespace file, `<lab dir>/<host>.ipc` (System V and POSIX IPC).
    #[serde(default)]
    pub ipc_ns: PathBuf,
    /// Bind-mounted UTS namespace file, `<lab dir>/<host>.uts` (host name = [`Host::name`]).
    #[serde(default)]
    pub uts_ns: PathBuf,
    /// IPv4 address (prefix length [`PREFIX_LEN`]).
    pub addr: Ipv4Addr,
    /// IPv6 address (prefix length [`PREFIX_LEN_V6`]) if the lab has IPv6.
    pub addr6: Option<Ipv6Addr>,
    /// MAC address of the host's interface.
    pub mac: String,
    /// Interface name inside the namespace (always [`HOST_INTERFACE`]).
    pub interface: String,
    /// Host-side end of the veth pair, attached to the bridge.
    pub veth: String,
    /// Host-private directory `<lab dir>/<host>/` (removed with the lab).
    pub dir: PathBuf,
}

/// A process started with [`Lab::spawn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawned {
    /// Process id (that of the program itself: nsenter execs it).
    pub pid: u32,
    /// Start time in clock ticks after boot, to tell a reused PID apart.
    pub start: Option<u64>,
    /// Host it runs in.
    pub host: String,
    /// Command line, for humans.
    pub command: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Host {
    /// The host's namespace files with their `nsenter` option, those of this lab version
    /// only (a state file of an older one has no PID, IPC and UTS namespaces).
    fn ns_files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("--net=", self.netns_path.as_path()),
            ("--mount=", self.mount_ns.as_path()),
            ("--pid=", self.pid_ns.as_path()),
            ("--ipc=", self.ipc_ns.as_path()),
            ("--uts=", self.uts_ns.as_path()),
        ]
        .into_iter()
        .filter(|(_, p)| !p.as_os_str().is_empty())
    }

    /// Every namespace of the host, for [`sys::in_namespaces`].
    fn namespaces(&self) -> sys::Namespaces<'_> {
        fn some(p: &Path) -> Option<&Path> {
            (!p.as_os_str().is_empty()).then_some(p)
        }
        sys::Namespaces {
            net: Some(&self.netns_path),
            mnt: Some(&self.mount_ns),
            pid: some(&self.pid_ns),
            ipc: some(&self.ipc_ns),
            uts: some(&self.uts_ns),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Layout {
    name: String,
    index: u8,
    dir: PathBuf,
    bridge: String,
    subnet: [u8; 3],
    ipv6: bool,
    hosts: Vec<Host>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Runtime {
    /// Processes started with `spawn`.
    spawned: Vec<Spawned>,
    /// Mount-point directories created by `bind`, removed at teardown if empty.
    created_dirs: Vec<PathBuf>,
    /// Bind mounts made by `bind`: (host, source, target).
    binds: Vec<(String, PathBuf, PathBuf)>,
    /// Directed cuts (from, to): packets from `from` are dropped on arrival at `to`.
    cuts: BTreeSet<(String, String)>,
    /// Set by `keep`.
    kept: bool,
    /// Each host's init (PID 1 of its PID namespace), in host order.
    #[serde(default)]
    inits: Vec<Spawned>,
}

#[derive(Serialize)]
struct StateOut<'a> {
    version: u32,
    #[serde(flatten)]
    layout: &'a Layout,
    #[serde(flatten)]
    runtime: &'a Runtime,
}

#[derive(Deserialize)]
struct StateIn {
    #[serde(flatten)]
    layout: Layout,
    #[serde(flatten)]
    runtime: Runtime,
}

/// A running lab. See the crate documentation.
///
/// A lab made by [`Lab::create`] is destroyed when dropped (unless [`Lab::keep`] was
/// called); one obtained by [`Lab::open`] is not (call [`Lab::destroy`]).
pub struct Lab {
    root: PathBuf,
    layout: Layout,
    runtime: Mutex<Runtime>,
    children: Mutex<HashMap<u32, Child>>,
    exited: Mutex<HashMap<u32, ExitStatus>>,
    /// Destroy on drop.
    armed: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.layout.name)
            .field("index", &self.layout.index)
            .field(
                "hosts",
                &self
                    .layout
                    .hosts
                    .iter()
                    .map(|h| &h.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct LeftoverCleaner<'a> {
    root: &'a Path,
}

impl alloc::Leftovers for LeftoverCleaner<'_> {
    fn alive(&self, name: &str) -> bool {
        match load_state(self.root, name) {
            Ok((layout, _)) => layout.hosts.iter().any(|h| h.netns_path.exists()),
            Err(_) => false,
        }
    }

    fn clean(&self, name: &str) {
        clean_leftovers(self.root, name);
    }
}

fn state_file(root: &Path, name: &str) -> PathBuf {
    root.join(name).join("state.json")
}

fn load_state(root: &Path, name: &str) -> Result<(Layout, Runtime)> {
    let path = state_file(root, name);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let st: StateIn =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok((st.layout, st.runtime))
}

/// Removes everything a previous lab called `name` left (its lock is handled by the caller).
fn clean_leftovers(root: &Path, name: &str) {
    match load_state(root, name) {
        Ok((layout, runtime)) => {
            for e in teardown(root, &layout, &runtime, &mut HashMap::new(), false) {
                eprintln!("tandem-lab: cleaning leftovers of `{name}`: {e}");
            }
        }
        Err(_) => {
            let dir = root.join(name);
            if dir.exists()
                && let Err(e) = remove_lab_dir(&dir)
            {
                eprintln!("tandem-lab: cleaning leftovers of `{name}`: {e:#}");
            }
        }
    }
}

fn remove_lab_dir(dir: &Path) -> Result<()> {
    for m in sys::mounts_under(dir) {
        if let Err(e) = sys::umount(&m, true)
            && e.raw_os_error() != Some(libc::EINVAL)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("tandem-lab: umount {}: {e}", m.display());
        }
    }
    let left = sys::mounts_under(dir);
    if !left.is_empty() {
        bail!("not removing {}: still mounted: {left:?}", dir.display());
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Tears a lab down, step by step, whatever state it is in. Returns what failed.
fn teardown(
    root: &Path,
    layout: &Layout,
    runtime: &Runtime,
    children: &mut HashMap<u32, Child>,
    release_lock: bool,
) -> Vec<String> {
    let mut errors = Vec::new();

    // 1. Processes: recorded ones and everything inside our namespaces, SIGKILL, wait.
    if let Err(e) = kill_everything(layout, runtime, children) {
        errors.push(e);
    }

    // 2. Namespace files: mount namespaces (their binds and sysfs go with them), PID,
    //    IPC and UTS namespaces (whose inits died in step 1).
    for (_, file) in layout.hosts.iter().flat_map(|h| h.ns_files().skip(1)) {
        match sys::umount(file, false) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // not mounted
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                if let Err(e2) = sys::umount(file, true) {
                    errors.push(format!("umount {}: {e} / {e2}", file.display()));
                }
            }
        }
    }

    // 3. veths (deleting one end removes the pair at once; deleting the namespace alone
    //    would remove it asynchronously), then namespaces, then the bridge.
    for h in &layout.hosts {
        if sys::link_exists(&h.veth)
            && let Err(e) = sys::ip(&["link", "del", &h.veth])
            && sys::link_exists(&h.veth)
        {
            errors.push(format!("{e:#}"));
        }
    }
    for h in &layout.hosts {
        if h.netns_path.exists()
            && let Err(e) = sys::ip(&["netns", "del", &h.netns])
            && h.netns_path.exists()
        {
            errors.push(format!("{e:#}"));
        }
    }
    if sys::link_exists(&layout.bridge)
        && let Err(e) = sys::ip(&["link", "del", &layout.bridge])
        && sys::link_exists(&layout.bridge)
    {
        errors.push(format!("{e:#}"));
    }

    // 4. Mount-point directories created by `bind`, unless another lab still uses them.
    errors.extend(mountpoints::release(
        root,
        &layout.name,
        &runtime.created_dirs,
        || bind_targets_of_other_labs(root, &layout.name),
    ));

    // 5. The lab directory (host dirs, mount namespace files, state), then the lock.
    if let Err(e) = remove_lab_dir(&layout.dir) {
        errors.push(format!("{e:#}"));
    }
    if release_lock && let Err(e) = alloc::release(root, layout.index, &layout.name) {
        errors.push(format!("{e:#}"));
    }
    errors
}

fn kill_everything(
    layout: &Layout,
    runtime: &Runtime,
    children: &mut HashMap<u32, Child>,
) -> std::result::Result<(), String> {
    let own = sys::own_ns_ids();
    let mut ids = Vec::new();
    for h in &layout.hosts {
        for (_, p) in h.ns_files() {
            if let Some(id) = sys::ns_id(p) {
                if own.contains(&id) {
                    eprintln!(
                        "tandem-lab: {} is this process's own namespace; not killing by it",
                        p.display()
                    );
                    continue;
                }
                ids.push(id);
            }
        }
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        children.retain(|_, c| matches!(c.try_wait(), Ok(None)));
        for s in runtime.spawned.iter().chain(&runtime.inits) {
            if !children.contains_key(&s.pid) {
                sys::reap_if_zombie_child(s.pid, s.start);
            }
        }
        let mut targets = sys::pids_in_namespaces(&ids);
        targets.extend(
            runtime
                .spawned
                .iter()
                .chain(&runtime.inits)
                .filter(|s| sys::is_live(s.pid, s.start))
                .map(|s| s.pid),
        );
        targets.extend(children.keys().copied());
        if targets.is_empty() {
            return Ok(());
        }
        for pid in &targets {
            let _ = sys::send_signal(*pid, libc::SIGKILL);
        }
        if Instant::now() >= deadline {
            return Err(format!("processes still alive after SIGKILL: {targets:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The bind targets recorded by every lab but `name` (live or left over).
fn bind_targets_of_other_labs(root: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|other| other != name && other != "locks")
        .filter_map(|other| load_state(root, &other).ok())
        .flat_map(|(_, runtime)| runtime.binds.into_iter().map(|(_, _, target)| target))
        .collect()
}

fn nft_table_script() -> String {
    format!(
        "table netdev {NFT_TABLE} {{\n\
         \tset drop_mac {{ type ether_addr; }}\n\
         \tset drop_v4 {{ type ipv4_addr; }}\n\
         \tset drop_v6 {{ type ipv6_addr; }}\n\
         \tchain ingress {{\n\
         \t\ttype filter hook ingress device \"{HOST_INTERFACE}\" priority -500; policy accept;\n\
         \t\tether saddr @drop_mac drop\n\
         \t\tip saddr @drop_v4 drop\n\
         \t\tip6 saddr @drop_v6 drop\n\
         \t}}\n\
         }}\n"
    )
}

impl Lab {
    /// Builds a lab. On failure everything made so far is removed again.
    pub fn create(spec: LabSpec) -> Result<Lab> {
        Self::create_in(Path::new(LAB_ROOT), spec)
    }

    fn create_in(root: &Path, spec: LabSpec) -> Result<Lab> {
        spec.validate()?;
        let cleaner = LeftoverCleaner { root };
        let (index, name) = alloc::acquire(root, spec.name.as_deref(), spec.index, &cleaner)?;
        let dir = root.join(&name);
        // The index is ours now; anything still named like us is a leftover.
        if dir.exists() {
            clean_leftovers(root, &name);
        }
        let subnet = spec.subnet.unwrap_or([10, 231, index]);
        let mut used = BTreeSet::new();
        let hosts = spec
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let num = u8::try_from(i + 1).unwrap_or(u8::MAX); // <= MAX_HOSTS, validated
                let mut veth = format!("{name}-{h}");
                if veth.len() > 15 || !used.insert(veth.clone()) {
                    // No dash: cannot collide with any `<lab>-...` name.
                    veth = format!("{name}v{num}");
                    used.insert(veth.clone());
                }
                let netns = format!("{name}-{h}");
                Host {
                    name: h.clone(),
                    netns_path: Path::new("/run/netns").join(&netns),
                    netns,
                    mount_ns: dir.join(format!("{h}.mnt")),
                    pid_ns: dir.join(format!("{h}.pidns")),
                    ipc_ns: dir.join(format!("{h}.ipc")),
                    uts_ns: dir.join(format!("{h}.uts")),
                    addr: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], num),
                    addr6: spec.ipv6.then(|| {
                        Ipv6Addr::new(0xfd77, u16::from(index), 0, 0, 0, 0, 0, u16::from(num))
                    }),
                    mac: format!("02:74:6c:{index:02x}:{num:02x}:01"),
                    interface: HOST_INTERFACE.to_owned(),
                    veth,
                    dir: dir.join(h),
                }
            })
            .collect();
        let mut lab = Lab {
            root: root.to_owned(),
            layout: Layout {
                bridge: format!("{name}-br"),
                name,
                index,
                dir,
                subnet,
                ipv6: spec.ipv6,
                hosts,
            },
            runtime: Mutex::new(Runtime::default()),
            children: Mutex::new(HashMap::new()),
            exited: Mutex::new(HashMap::new()),
            armed: true,
        };
        if let Err(e) = lab.build() {
            lab.armed = false;
            let errors = lab.teardown_now(true);
            for err in &errors {
                eprintln!("tandem-lab: cleanup after failed create: {err}");
            }
            return Err(e.context(format!("creating lab `{}`", lab.layout.name)));
        }
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        let l = &self.layout;
        fs::create_dir_all(&l.dir).with_context(|| format!("creating {}", l.dir.display()))?;
        // Mount namespace files must live on a private mount (no propagation loops).
        if !sys::is_mount_point(&l.dir) {
            sys::bind_mount(&l.dir, &l.dir)
                .with_context(|| format!("bind-mounting {} on itself", l.dir.display()))?;
        }
        sys::make_private(&l.dir).with_context(|| format!("making {} private", l.dir.display()))?;
        // Record the layout before creating anything, so a crash leaves a usable record.
        self.save()?;

        sys::ip(&[
            "link",
            "add",
            &l.bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        sys::disable_ipv6(&l.bridge)?;
        sys::ip(&["link", "set", &l.bridge, "up"])?;

        // Each host numbers its processes from its own base, as two machines whose PIDs do
        // not coincide: a PID one host wrote to a shared file (a `postmaster.pid` in a
        // replicated directory) is not a live process of another.
        let pid_base = sys::pid_max() / (l.hosts.len() as u32 + 1);
        for (i, h) in (0u32..).zip(&l.hosts) {
            sys::ip(&["netns", "add", &h.netns])?;
            sys::ip(&[
                "link",
                "add",
                &h.veth,
                "type",
                "veth",
                "peer",
                "name",
                HOST_INTERFACE,
                "address",
                &h.mac,
                "netns",
                &h.netns,
            ])?;
            sys::disable_ipv6(&h.veth)?;
            sys::ip(&["link", "set", &h.veth, "master", &l.bridge, "up"])?;
            let mut batch = format!(
                "link set lo up\nlink set {HOST_INTERFACE} up\naddr add {}/{PREFIX_LEN} dev {HOST_INTERFACE}\n",
                h.addr
            );
            if let Some(a6) = h.addr6 {
                batch.push_str(&format!(
                    "addr add {a6}/{PREFIX_LEN_V6} dev {HOST_INTERFACE} nodad\n"
                ));
            }
            sys::run_with_stdin(Command::new("ip").args(["-n", &h.netns, "-b", "-"]), &batch)?;
            sys::run_with_stdin(
                self.net_command(h, "nft").args(["-f", "-"]),
                &nft_table_script(),
            )?;

            fs::create_dir_all(&h.dir).with_context(|| format!("creating {}", h.dir.display()))?;
            fs::File::create(&h.mount_ns)
                .with_context(|| format!("creating {}", h.mount_ns.display()))?;
            let mut arg = OsString::from("--mount=");
            arg.push(&h.mount_ns);
            sys::run_checked(Command::new("unshare").arg(arg).args([
                "--propagation",
                "private",
                "true",
            ]))?;
            let net_mnt = sys::Namespaces {
                net: Some(&h.netns_path),
                mnt: Some(&h.mount_ns),
                ..sys::Namespaces::default()
            };
            sys::in_namespaces(net_mnt, || -> Result<()> {
                // Other labs' namespace files (copied with the mount table) would keep those
                // namespaces alive after their `ip netns del`: drop them from our view.
                match sys::umount(Path::new("/run/netns"), true) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).context("umount /run/netns inside"),
                }
                sys::mount_sysfs().context("mounting sysfs on /sys inside")
            })??;
            self.start_init(h, pid_base * (i + 1))?;
        }

        // Ready when the first host reaches every other one.
        if let Some((first, rest)) = l.hosts.split_first() {
            for h in rest {
                let deadline = Instant::now() + READY_WAIT;
                wait_until(deadline, Duration::from_millis(20), || {
                    Ok(self.ping_timeout(&first.name, h.addr, Duration::from_millis(300)))
                })
                .with_context(|| format!("{} cannot reach {} ({})", first.name, h.name, h.addr))?;
            }
        }
        Ok(())
    }

    /// Starts `h`'s init: PID 1 of new PID, IPC and UTS namespaces (host name `h.name`)
    /// inside the host's network and mount namespaces. It mounts the host's own /proc,
    /// makes the host's PIDs start after `pid_base`, and reaps the orphans of the host
    /// until teardown kills it (and with it every process of the host). The namespaces
    /// are then kept as files beside the mount namespace's.
    fn start_init(&self, h: &Host, pid_base: u32) -> Result<()> {
        let ready = h.dir.join(".init-ready");
        let log = h.dir.join(".init.log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let net_mnt = sys::Namespaces {
            net: Some(&h.netns_path),
            mnt: Some(&h.mount_ns),
            ..sys::Namespaces::default()
        };
        let (name, marker) = (h.name.clone(), ready.clone());
        let child = sys::in_namespaces(net_mnt, move || -> io::Result<Child> {
            sys::unshare_machine(&name)?;
            Command::new("/bin/sh")
                .args(["-c", INIT_SCRIPT, "init"])
                .arg(pid_base.to_string())
                .arg(marker)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .spawn()
        })?
        .with_context(|| format!("starting the init of `{}`", h.name))?;
        let pid = child.id();
        let start = sys::proc_stat(pid).map(|st| st.start);
        lock(&self.runtime).inits.push(Spawned {
            pid,
            start,
            host: h.name.clone(),
            command: format!("init of {}", h.name),
            log: log.clone(),
        });
        lock(&self.children).insert(pid, child);
        self.save()?;
        wait_until(
            Instant::now() + SPAWN_WAIT,
            Duration::from_millis(2),
            || {
                if !sys::is_live(pid, start) {
                    bail!(
                        "it exited: {}",
                        fs::read_to_string(&log).unwrap_or_default().trim()
                    );
                }
                Ok(ready.exists())
            },
        )
        .with_context(|| format!("the init of `{}` (pid {pid})", h.name))?;
        for (kind, file) in [("pid", &h.pid_ns), ("ipc", &h.ipc_ns), ("uts", &h.uts_ns)] {
            fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
            let source = PathBuf::from(format!("/proc/{pid}/ns/{kind}"));
            sys::bind_mount(&source, file).with_context(|| {
                format!("bind-mounting {} on {}", source.display(), file.display())
            })?;
        }
        Ok(())
    }

    /// Opens an existing lab by name (e.g. `demo`, or `tl7`) from its state file. Dropping
    /// the returned handle does not destroy the lab; [`Lab::destroy`] does.
    pub fn open(name: &str) -> Result<Lab> {
        Self::open_in(Path::new(LAB_ROOT), name)
    }

    fn open_in(root: &Path, name: &str) -> Result<Lab> {
        let (layout, runtime) = load_state(root, name)?;
        Ok(Lab {
            root: root.to_owned(),
            layout,
            runtime: Mutex::new(runtime),
            children: Mutex::new(HashMap::new()),
            exited: Mutex::new(HashMap::new()),
            armed: false,
        })
    }

    /// Removes every lab whose creator died without tearing it down (and every kept lab
    /// whose namespaces are all gone, e.g. after a reboot); returns their names. Labs with
    /// a live owner are not touched. Allocation does this lazily for the index it takes;
    /// call this e.g. before or after a test run.
    pub fn cleanup_stale() -> Result<Vec<String>> {
        let root = Path::new(LAB_ROOT);
        alloc::reclaim_all(root, &LeftoverCleaner { root })
    }

    /// Names of the labs that have a state file under [`LAB_ROOT`].
    pub fn list() -> Result<Vec<String>> {
        let root = Path::new(LAB_ROOT);
        let mut names = Vec::new();
        let entries = match fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
        };
        for entry in entries.flatten() {
            if entry.path().join("state.json").is_file()
                && let Some(n) = entry.file_name().to_str()
            {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Lab name (`tl<idx>` for anonymous labs).
    pub fn name(&self) -> &str {
        &self.layout.name
    }

    /// Lab index (see [`LabSpec::index`]).
    pub fn index(&self) -> u8 {
        self.layout.index
    }

    /// The lab directory, `/run/tandem-lab/<name>/`.
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The JSON state file (layout, spawned PIDs, binds, partitions).
    pub fn state_path(&self) -> PathBuf {
        self.layout.dir.join("state.json")
    }

    /// Name of the bridge (host side, no address).
    pub fn bridge(&self) -> &str {
        &self.layout.bridge
    }

    /// All hosts, in spec order.
    pub fn hosts(&self) -> &[Host] {
        &self.layout.hosts
    }

    /// One host by name.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.layout
            .hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| anyhow!("lab `{}` has no host `{name}`", self.layout.name))
    }

    /// `<subnet>.<last>`, e.g. `subnet_addr(100)` for a VIP (`.100`-`.199` are never
    /// given to hosts).
    pub fn subnet_addr(&self, last: u8) -> Ipv4Addr {
        let s = self.layout.subnet;
        Ipv4Addr::new(s[0], s[1], s[2], last)
    }

    /// `fd77:<index>::<last>` if the lab has IPv6.
    pub fn subnet6_addr(&self, last: u8) -> Option<Ipv6Addr> {
        self.layout.ipv6.then(|| {
            Ipv6Addr::new(
                0xfd77,
                u16::from(self.layout.index),
                0,
                0,
                0,
                0,
                0,
                u16::from(last),
            )
        })
    }

    /// Whether hosts have IPv6 addresses.
    pub fn has_ipv6(&self) -> bool {
        self.layout.ipv6
    }

    /// Processes started with [`Lab::spawn`] (also those that have exited since).
    pub fn spawned(&self) -> Vec<Spawned> {
        lock(&self.runtime).spawned.clone()
    }

    /// Bind mounts made with [`Lab::bind`]: (host, source, target).
    pub fn binds(&self) -> Vec<(String, PathBuf, PathBuf)> {
        lock(&self.runtime).binds.clone()
    }

    fn net_command(&self, h: &Host, program: &str) -> Command {
        let mut arg = OsString::from("--net=");
        arg.push(&h.netns_path);
        let mut c = Command::new("nsenter");
        c.arg(arg).arg("--").arg(program);
        c
    }

    fn ns_args(h: &Host) -> Vec<OsString> {
        h.ns_files()
            .map(|(option, file)| {
                let mut arg = OsString::from(option);
                arg.push(file);
                arg
            })
            .collect()
    }

    /// A command that runs `program` inside `host`, in all its namespaces (network, mount,
    /// PID, IPC, UTS): `nsenter --net=/run/netns/<ns> --mount=<dir>/<host>.mnt
    /// --pid=<dir>/<host>.pidns --ipc=... --uts=... -- program`. Add arguments and
    /// environment as usual. nsenter forks to enter the PID namespace: the child's PID is
    /// nsenter's, which waits for the program and exits as it did; [`Lab::spawn`] starts
    /// the program itself instead. The working directory inside is `/` (entering a mount
    /// namespace resets it): [`Lab::spawn`] honours `current_dir`.
    pub fn command(&self, host: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        let h = self.host(host)?;
        let mut c = Command::new("nsenter");
        c.args(Self::ns_args(h)).arg("--").arg(program);
        Ok(c)
    }

    /// The program and arguments of `cmd`: those after nsenter's `--` if [`Lab::command`]
    /// made it for `h`, else its own.
    fn program_of(h: &Host, cmd: &Command) -> (OsString, Vec<OsString>) {
        let wrapped = cmd.get_program() == "nsenter"
            && Self::ns_args(h)
                .iter()
                .map(OsString::as_os_str)
                .eq(cmd.get_args().take(h.ns_files().count()));
        let mut args = cmd.get_args().map(OsStr::to_owned);
        if wrapped
            && args.by_ref().any(|a| a == "--")
            && let Some(program) = args.next()
        {
            return (program, args.collect());
        }
        (
            cmd.get_program().to_owned(),
            cmd.get_args().map(OsStr::to_owned).collect(),
        )
    }

    /// Runs `args[0]` with `args[1..]` in `host` and waits; a non-zero exit is an error
    /// (its stderr in the message).
    pub fn run(&self, host: &str, args: &[&str]) -> Result<Output> {
        let (program, rest) = args.split_first().context("run: empty command")?;
        let mut c = self.command(host, program)?;
        c.args(rest);
        sys::run_checked(&mut c)
    }

    /// Starts `cmd` in `host`, in its own process group, stdin from /dev/null, stdout and
    /// stderr appended to `log` (parent directories created). `cmd` may be a plain
    /// command (`Command::new("sleep").arg("1000")`: program, args, env and current_dir
    /// are carried over) or one made by [`Lab::command`] for the same host. The process is
    /// started directly inside the host's namespaces (a child of this process, not of
    /// nsenter), so the PID returned is the program's own. The PID is recorded in the lab
    /// state; teardown kills it.
    pub fn spawn(&self, host: &str, cmd: &mut Command, log: impl AsRef<Path>) -> Result<u32> {
        let h = self.host(host)?;
        let log = log.as_ref();
        if let Some(parent) = log.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let (program, args) = Self::program_of(h, cmd);
        let envs: Vec<(OsString, Option<OsString>)> = cmd
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(OsStr::to_owned)))
            .collect();
        let dir = cmd.get_current_dir().map(Path::to_owned);
        let mut c = Command::new(&program);
        c.args(&args);
        let description = sys::describe(&c);
        for (k, v) in envs {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(dir) = dir {
            c.current_dir(dir);
        }
        c.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut child = sys::in_namespaces(h.namespaces(), move || c.spawn())?
            .with_context(|| format!("spawning `{description}` in `{host}`"))?;
        let pid = child.id();
        let start = sys::proc_stat(pid).map(|s| s.start);
        let exited = child.try_wait()?;
        match exited {
            Some(st) => {
                lock(&self.exited).insert(pid, st);
            }
            None => {
                lock(&self.children).insert(pid, child);
            }
        }
        lock(&self.runtime).spawned.push(Spawned {
            pid,
            start,
            host: host.to_owned(),
            command: description,
            log: log.to_owned(),
        });
        self.save()?;
        Ok(pid)
    }

    /// PIDs of all processes (not zombies) inside any of `host`'s namespaces, its init
    /// included.
    pub fn processes(&self, host: &str) -> Result<Vec<u32>> {
        let h = self.host(host)?;
        let own = sys::own_ns_ids();
        let ids: Vec<_> = h
            .ns_files()
            .filter_map(|(_, p)| sys::ns_id(p))
            .filter(|id| !own.contains(id))
            .collect();
        Ok(sys::pids_in_namespaces(&ids).into_iter().collect())
    }

    fn belongs(&self, pid: u32) -> bool {
        if lock(&self.children).contains_key(&pid) {
            return true;
        }
        if lock(&self.runtime)
            .spawned
            .iter()
            .any(|s| s.pid == pid && sys::is_live(pid, s.start))
        {
            return true;
        }
        self.layout
            .hosts
            .iter()
            .any(|h| self.processes(&h.name).is_ok_and(|p| p.contains(&pid)))
    }

    /// Sends `signal` (e.g. [`crate::signal::SIGKILL`], `SIGSTOP`, `SIGCONT`) to `pid`,
    /// which must be a process of this lab (spawned by it or inside its namespaces).
    pub fn kill(&self, pid: u32, signal: i32) -> Result<()> {
        if !self.belongs(pid) {
            bail!("pid {pid} is not a process of lab `{}`", self.layout.name);
        }
        sys::send_signal(pid, signal).with_context(|| format!("kill({pid}, {signal})"))
    }

    /// Exit status of a process this handle spawned, once it has exited (reaps it).
    pub fn try_wait(&self, pid: u32) -> Result<Option<ExitStatus>> {
        if let Some(st) = lock(&self.exited).get(&pid) {
            return Ok(Some(*st));
        }
        let mut children = lock(&self.children);
        let child = children
            .get_mut(&pid)
            .with_context(|| format!("pid {pid} was not spawned by this lab handle"))?;
        match child.try_wait()? {
            Some(st) => {
                children.remove(&pid);
                lock(&self.exited).insert(pid, st);
                Ok(Some(st))
            }
            None => Ok(None),
        }
    }

    /// True while `pid` runs (a stopped process runs; a zombie does not). Reaps it if
    /// this handle spawned it.
    pub fn is_alive(&self, pid: u32) -> bool {
        if lock(&self.children).contains_key(&pid) {
            return matches!(self.try_wait(pid), Ok(None));
        }
        if lock(&self.exited).contains_key(&pid) {
            return false;
        }
        let start = lock(&self.runtime)
            .spawned
            .iter()
            .rev()
            .find(|s| s.pid == pid)
            .and_then(|s| s.start);
        sys::is_live(pid, start)
    }

    /// Waits until `pid` is gone (see [`Lab::is_alive`]), at most `timeout`.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> Result<()> {
        wait_until(Instant::now() + timeout, Duration::from_millis(10), || {
            Ok(!self.is_alive(pid))
        })
        .with_context(|| format!("pid {pid} still alive after {timeout:?}"))
    }

    /// Runs `f` on a thread inside `host`'s network namespace (sockets created there stay
    /// in it). The filesystem view stays the caller's.
    pub fn in_netns<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let h = self.host(host)?;
        let net = sys::Namespaces {
            net: Some(&h.netns_path),
            ..sys::Namespaces::default()
        };
        sys::in_namespaces(net, f)
    }

    /// Runs `f` on a thread inside `host`'s namespaces: paths resolve as the host sees them
    /// (its binds, its /sys, its /proc), the host name is the host's, and processes `f`
    /// starts are born in the host's PID namespace. The thread itself is not in that PID
    /// namespace (no thread can move there), so `/proc/self` does not resolve inside `f`.
    pub fn in_host<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let h = self.host(host)?;
        sys::in_namespaces(h.namespaces(), f)
    }

    /// The PID, as this process sees it, of the process that `host` knows as `pid` (a PID
    /// read from a pid file written inside, or printed by a program there). `None` if the
    /// host has no such process.
    pub fn outer_pid(&self, host: &str, pid: u32) -> Result<Option<u32>> {
        let h = self.host(host)?;
        let ns = sys::ns_id(&h.pid_ns)
            .with_context(|| format!("`{host}` has no PID namespace ({})", h.pid_ns.display()))?;
        Ok(sys::pids_in_namespaces(&[ns])
            .into_iter()
            .find(|&outer| sys::ns_pids(outer).and_then(|p| p.last().copied()) == Some(pid)))
    }

    /// The PID that the host of process `pid` (as this process sees it) knows it by.
    pub fn inner_pid(&self, pid: u32) -> Option<u32> {
        sys::ns_pids(pid)?.last().copied()
    }

    /// Bind-mounts `source` on `target` inside `host`'s mount namespace only (both
    /// absolute, as the host sees them). Creates `source` (kept at teardown unless it is
    /// under the lab directory) and the missing directories of `target`, which teardown
    /// removes if empty and no other lab binds on them (see `mountpoints`).
    pub fn bind(
        &self,
        host: &str,
        source: impl AsRef<Path>,
        target: impl AsRef<Path>,
    ) -> Result<()> {
        let (source, target) = (source.as_ref().to_owned(), target.as_ref().to_owned());
        if !source.is_absolute() || !target.is_absolute() {
            bail!(
                "bind: paths must be absolute ({} -> {})",
                source.display(),
                target.display()
            );
        }
        let (s, t) = (source.clone(), target.clone());
        // Held until the bind is in the state file, so that no other lab's teardown removes
        // the mount point meanwhile.
        let _guard = mountpoints::lock(&self.root)?;
        let made = mountpoints::made_by_labs(&self.root);
        let created = self.in_host(host, move || -> Result<Vec<PathBuf>> {
            fs::create_dir_all(&s).with_context(|| format!("creating {}", s.display()))?;
            let claimed = mountpoints::to_claim(&t, &made, Path::exists);
            fs::create_dir_all(&t).with_context(|| format!("creating {}", t.display()))?;
            sys::bind_mount(&s, &t)
                .with_context(|| format!("mount --bind {} {}", s.display(), t.display()))?;
            Ok(claimed)
        })??;
        mountpoints::register(&self.root, &created)?;
        {
            let mut rt = lock(&self.runtime);
            for d in created {
                if !rt.created_dirs.contains(&d) {
                    rt.created_dirs.push(d);
                }
            }
            rt.binds.push((host.to_owned(), source, target));
        }
        self.save()
    }

    /// Cuts `a` and `b` apart (both directions): packets are silently dropped on arrival
    /// (by source MAC and source address, nftables on ingress of eth0), so neither side
    /// gets an error, TCP connections just stall.
    pub fn partition(&self, a: &str, b: &str) -> Result<()> {
        self.change_cuts(&[a, b], |cuts| {
            cuts.insert((a.to_owned(), b.to_owned()));
            cuts.insert((b.to_owned(), a.to_owned()));
        })
    }

    /// Drops packets from `from` arriving at `to` only (replies from `to` still reach
    /// `from`, so a ping fails both ways but one-way traffic like UDP tells them apart).
    pub fn partition_oneway(&self, from: &str, to: &str) -> Result<()> {
        self.change_cuts(&[from, to], |cuts| {
            cuts.insert((from.to_owned(), to.to_owned()));
        })
    }

    /// Undoes [`Lab::partition`] / [`Lab::partition_oneway`] between `a` and `b`
    /// (both directions). Idempotent.
    pub fn heal(&self, a: &str, b: &str) -> Result<()> {
        self.change_cuts(&[a, b], |cuts| {
            cuts.remove(&(a.to_owned(), b.to_owned()));
            cuts.remove(&(b.to_owned(), a.to_owned()));
        })
    }

    /// Removes every partition.
    pub fn heal_all(&self) -> Result<()> {
        let names: Vec<String> = self.layout.hosts.iter().map(|h| h.name.clone()).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.change_cuts(&refs, BTreeSet::clear)
    }

    /// Current directed cuts (from, to).
    pub fn partitions(&self) -> Vec<(String, String)> {
        lock(&self.runtime).cuts.iter().cloned().collect()
    }

    fn change_cuts(
        &self,
        hosts: &[&str],
        f: impl FnOnce(&mut BTreeSet<(String, String)>),
    ) -> Result<()> {
        for h in hosts {
            self.host(h)?;
        }
        if hosts.len() == 2 && hosts[0] == hosts[1] {
            bail!("cannot partition host `{}` from itself", hosts[0]);
        }
        let cuts = {
            let mut rt = lock(&self.runtime);
            f(&mut rt.cuts);
            rt.cuts.clone()
        };
        for name in hosts {
            let h = self.host(name)?;
            let sources: Vec<&Host> = cuts
                .iter()
                .filter(|(_, to)| to == name)
                .filter_map(|(from, _)| self.host(from).ok())
                .collect();
            let mut script = String::new();
            for set in ["drop_mac", "drop_v4", "drop_v6"] {
                script.push_str(&format!("flush set netdev {NFT_TABLE} {set}\n"));
            }
            if !sources.is_empty() {
                let macs: Vec<&str> = sources.iter().map(|s| s.mac.as_str()).collect();
                let v4: Vec<String> = sources.iter().map(|s| s.addr.to_string()).collect();
                script.push_str(&format!(
                    "add element netdev {NFT_TABLE} drop_mac {{ {} }}\n",
                    macs.join(", ")
                ));
                script.push_str(&format!(
                    "add element netdev {NFT_TABLE} drop_v4 {{ {} }}\n",
                    v4.join(", ")
                ));
                let v6: Vec<String> = sources
                    .iter()
                    .filter_map(|s| s.addr6)
                    .map(|a| a.to_string())
                    .collect();
                if !v6.is_empty() {
                    script.push_str(&format!(
                        "add element netdev {NFT_TABLE} drop_v6 {{ {} }}\n",
                        v6.join(", ")
                    ));
                }
            }
            sys::run_with_stdin(self.net_command(h, "nft").args(["-f", "-"]), &script)?;
        }
        self.save()
    }

    /// `ip link set eth0 down` inside `host` (its IPv4 address stays, IPv6 goes).
    pub fn link_down(&self, host: &str) -> Result<()> {
        let h = self.host(host)?;
        sys::ip(&["-n", &h.netns, "link", "set", HOST_INTERFACE, "down"])?;
        Ok(())
    }

    /// `ip link set eth0 up` inside `host`, restoring its IPv6 address if it has one.
    pub fn link_up(&self, host: &str) -> Result<()> {
        let h = self.host(host)?;
        sys::ip(&["-n", &h.netns, "link", "set", HOST_INTERFACE, "up"])?;
        if let Some(a6) = h.addr6 {
            let a = format!("{a6}/{PREFIX_LEN_V6}");
            sys::ip(&[
                "-n",
                &h.netns,
                "addr",
                "replace",
                &a,
                "dev",
                HOST_INTERFACE,
                "nodad",
            ])?;
        }
        Ok(())
    }

    /// One ICMP echo exchange from `from` to `to` within 1 s (requests every 200 ms).
    pub fn ping(&self, from: &str, to: impl Into<IpAddr>) -> bool {
        self.ping_timeout(from, to, Duration::from_secs(1))
    }

    /// [`Lab::ping`] with a chosen timeout. Uses a raw socket (no `ping` binary needed).
    pub fn ping_timeout(&self, from: &str, to: impl Into<IpAddr>, timeout: Duration) -> bool {
        let to = to.into();
        match self.in_netns(from, || crate::ping::ping(to, timeout)) {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => {
                eprintln!("tandem-lab: ping {from} -> {to}: {e}");
                false
            }
            Err(e) => {
                eprintln!("tandem-lab: ping {from} -> {to}: {e:#}");
                false
            }
        }
    }

    fn save(&self) -> Result<()> {
        let rt = lock(&self.runtime);
        let text = serde_json::to_string_pretty(&StateOut {
            version: 1,
            layout: &self.layout,
            runtime: &rt,
        })?;
        let path = self.state_path();
        let tmp = self
            .layout
            .dir
            .join(format!(".state.{}.tmp", std::process::id()));
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    fn teardown_now(&self, release_lock: bool) -> Vec<String> {
        let rt = lock(&self.runtime).clone();
        let mut children = lock(&self.children);
        teardown(&self.root, &self.layout, &rt, &mut children, release_lock)
    }

    /// Removes everything: kills the lab's processes (recorded PIDs and anything inside
    /// its namespaces; SIGKILL, then waits until gone), drops the mount namespaces,
    /// deletes veths, namespaces (with their nftables state) and the bridge, removes
    /// created mount-point directories if empty, the lab directory and the lock.
    /// Idempotent; never panics; what could not be removed is logged and returned as
    /// the error.
    pub fn destroy(mut self) -> Result<()> {
        self.armed = false;
        let errors = self.teardown_now(true);
        if errors.is_empty() {
            Ok(())
        } else {
            for e in &errors {
                eprintln!("tandem-lab: destroying `{}`: {e}", self.layout.name);
            }
            Err(anyhow!(
                "destroying lab `{}`: {}",
                self.layout.name,
                errors.join("; ")
            ))
        }
    }

    /// Leaves the lab running after this handle is gone (for `tandem demo up`): marks it
    /// kept in its state and lock. Reopen it with [`Lab::open`].
    pub fn keep(mut self) -> Result<()> {
        self.armed = false;
        lock(&self.runtime).kept = true;
        self.save()?;
        alloc::mark_kept(&self.root, self.layout.index, &self.layout.name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        for e in self.teardown_now(true) {
            eprintln!("tandem-lab: dropping `{}`: {e}", self.layout.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation() {
        assert!(LabSpec::new(["node1", "node2"]).validate().is_ok());
        assert!(LabSpec::demo().validate().is_ok());
        assert!(LabSpec::new(Vec::<String>::new()).validate().is_err());
        assert!(LabSpec::new(["a", "a"]).validate().is_err());
        assert!(LabSpec::new(["Node1"]).validate().is_err());
        assert!(LabSpec::new(["a/b"]).validate().is_err());
        assert!(LabSpec::named("tl3", 3, ["a"]).validate().is_err());
        assert!(LabSpec::named("locks", 3, ["a"]).validate().is_err());
        assert!(LabSpec::named("toolongname", 3, ["a"]).validate().is_err());
        assert!(LabSpec::named("tlx", 3, ["a"]).validate().is_ok());
    }

    #[test]
    fn lab_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Lab>();
    }

    #[test]
    fn nft_script_mentions_sets() {
        let s = nft_table_script();
        assert!(s.contains("drop_mac") && s.contains("hook ingress device \"eth0\""));
    }
}
