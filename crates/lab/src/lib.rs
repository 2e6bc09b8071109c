//! tandem-lab: a throw-away cluster on one machine, for multi-process tests and `tandem demo`.
//!
//! A lab is a Linux bridge with no uplink and no address on the host side, plus one
//! network namespace per host, joined to the bridge by a veth (`eth0` inside), loopback
//! up, one IPv4 address per host in a /24 private to the lab (optionally an IPv6 one),
//! and one persistent mount namespace per host, so several hosts can use the same paths
//! backed by different directories. Each host is also a machine of its own for processes:
//! its own PID namespace (PID 1 is the host's init, which reaps orphans; `ps` and `kill`
//! inside see the host's processes only, numbered from a range of the host's own), IPC
//! namespace (System V and POSIX IPC) and UTS namespace (`hostname` is the host's name).
//! Everything is made with `ip`, `nft`, `unshare` (and `nsenter` for running programs)
//! and a few syscalls; it needs root and iproute2, nftables and util-linux installed.
//! Nothing outside the lab's own namespaces, links and directory is touched, but for
//! the mount points of binds (see [`Lab::bind`]).
//!
//! # API
//!
//! ```text
//! LabSpec { name: Option<String>, hosts: Vec<String>, index: Option<u8>,
//!           subnet: Option<[u8; 3]>, ipv6: bool }
//!   LabSpec::new(hosts)                     anonymous test lab: tl<idx>, 10.231.<idx>.0/24
//!   LabSpec::named(name, index, hosts)      fixed name and index
//!   LabSpec::demo()                         demo, index 0, 10.77.0.0/24, node1 node2 witness client
//!   .with_subnet([a, b, c]) / .with_ipv6(bool)
//! Host { name, netns, netns_path, mount_ns, pid_ns, ipc_ns, uts_ns, addr, addr6, mac,
//!        interface, veth, dir }
//! Lab::create(spec) -> Result<Lab>          build (cleans up itself on failure); destroyed on Drop
//! Lab::open(name) -> Result<Lab>            from the state file; NOT destroyed on Drop
//! Lab::list() -> Result<Vec<String>>
//! Lab::cleanup_stale() -> Result<Vec<String>>  remove labs whose creator died
//! lab.name() index() dir() state_path() bridge() hosts() host(name) has_ipv6()
//! lab.subnet_addr(last) -> Ipv4Addr         .100-.199 are free for VIPs
//! lab.subnet6_addr(last) -> Option<Ipv6Addr>
//! lab.command(host, program) -> Result<Command>     nsenter --net --mount --pid --ipc --uts -- program
//! lab.run(host, &["prog", "arg"]) -> Result<Output>  checked
//! lab.spawn(host, &mut cmd, log) -> Result<u32>      started inside directly (the PID is the
//!                                                    program's), own process group, output to log
//! lab.spawned() processes(host) kill(pid, sig) is_alive(pid) try_wait(pid) wait_exit(pid, timeout)
//! lab.outer_pid(host, pid_inside) / lab.inner_pid(pid)   PIDs across the host's PID namespace
//! lab.in_netns(host, f) / lab.in_host(host, f)       run a closure on a thread inside the host
//! lab.bind(host, source, target) / binds()          per-host bind mount
//! lab.partition(a, b) partition_oneway(from, to) heal(a, b) heal_all() partitions()
//! lab.link_down(host) link_up(host)
//! lab.ping(from, to) -> bool / ping_timeout(from, to, timeout)   raw ICMP, no `ping` binary
//! lab.destroy() -> Result<()>   lab.keep() -> Result<()>
//! wait_until(deadline, poll, || -> Result<bool>) / wait_for(timeout, poll, ..)
//! signal::{SIGKILL, SIGSTOP, SIGCONT, SIGTERM, SIGINT}
//! ```
//!
//! `Lab` is `Send + Sync`; all methods take `&self` except `destroy` and `keep`.
//!
//! # Layout
//!
//! * Index: anonymous labs take a free index in 1..=250 with an `O_EXCL` lock file
//!   `/run/tandem-lab/locks/<idx>` holding the owner PID (and its start time), under a
//!   `flock` on `/run/tandem-lab/locks/.alloc`. A lock whose owner is dead is reclaimed
//!   after cleaning what the dead lab left; a kept lab's lock only once its namespaces are
//!   gone. Names: namespaces `<lab>-<host>`, bridge `<lab>-br`, host-side veths
//!   `<lab>-<host>` (or `<lab>v<n>` past 15 characters).
//! * Addresses: host `i` (0-based) is `<subnet>.<i+1>/24` and `fd77:<idx>::<i+1>/64`;
//!   MAC `02:74:6c:<idx>:<i+1>:01`.
//! * Directory `/run/tandem-lab/<lab>/` (a private bind mount of itself): `state.json`,
//!   `<host>.mnt` (mount namespace, made with `unshare --mount=.. --propagation private`,
//!   with its own sysfs on /sys and procfs on /proc, and without other labs'
//!   `/run/netns` entries), `<host>.pidns`, `<host>.ipc`, `<host>.uts` (the namespaces of
//!   the host's init, kept as files), `<host>/` (host-private directory; `.init.log`).
//! * Init: `/bin/sh` as PID 1 of each host (in its own process group, so a terminal's
//!   Ctrl-C does not reach it); the shell's `wait` reaps every child it is given, orphans
//!   included. Host `i` of `n` numbers its processes from `pid_max / (n + 1) * (i + 1)`,
//!   so that a PID one host wrote into a shared file (PostgreSQL's `postmaster.pid` in a
//!   replicated directory) is not a live process of another. Killing the init kills the
//!   host's every process.
//! * Faults: a `netdev` nftables table `tandemlab` on ingress of each host's eth0 with
//!   sets of source MACs and addresses to drop: silent drops on arrival, so senders get
//!   no error (an output-side drop would give them EPERM), and a VIP held by a cut host
//!   is cut with it (same MAC).
//!
//! Processes: [`Lab::spawn`] records PIDs; teardown SIGKILLs them, the inits and anything
//! else inside the lab's namespaces and waits until they are gone. PIDs in the API are as
//! the calling process sees them; a PID printed or written by a program inside is the
//! host's own ([`Lab::outer_pid`] translates).
//!
//! Mount points: the directories a bind creates on the machine's file system are listed
//! in `/run/tandem-lab/locks/mount-points`; a teardown removes one only when no other lab
//! binds on or below it (removing a directory detaches the mounts on it in every
//! namespace, another lab's included).
//!
//! # Caveats
//!
//! * The working directory of [`Lab::command`] is `/` inside (entering a mount namespace
//!   resets it); [`Lab::spawn`] honours `current_dir`.
//! * [`Lab::command`]'s nsenter forks to enter the PID namespace: its child runs the
//!   program, nsenter waits and exits as it did. Use [`Lab::spawn`] for a process whose
//!   PID matters.
//! * A closure in [`Lab::in_host`] runs on a thread that is not in the host's PID
//!   namespace (no thread can move there; the processes it starts are), so `/proc/self`
//!   does not resolve inside it.
//! * A host's mount namespace is a copy of the machine's mount table when the lab was
//!   made: file systems mounted on the machine later are not seen inside.
//! * Bind sources outside the lab directory are created but never removed.
//! * Partitions are by the peer's MAC and primary addresses, checked on arrival: ARP and
//!   neighbour discovery are cut too; a one-way cut makes a ping fail both ways (the
//!   replies are dropped), so tell directions apart with one-way traffic (UDP).
//! * `link_down` removes the host's IPv6 address (kernel default); `link_up` restores it.
#![warn(missing_docs)]

mod alloc;
mod lab;
mod mountpoints;
mod ping;
mod sys;
mod wait;

pub use lab::{
    HOST_INTERFACE, Host, LAB_ROOT, Lab, LabSpec, MAX_HOSTS, PREFIX_LEN, PREFIX_LEN_V6, Spawned,
};
pub use wait::{wait_for, wait_until};

/// Signal numbers for [`Lab::kill`].
pub mod signal {
    pub use libc::{SIGCONT, SIGINT, SIGKILL, SIGSTOP, SIGTERM};
}
