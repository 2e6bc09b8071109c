//! Low-level helpers: running tools, /proc scanning, signals, mounts, namespaces.
//!
//! Everything with `unsafe` lives here, each block with its `// SAFETY:` argument.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// One-line rendering of a command for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn check(cmd: &Command, out: Output) -> Result<Output> {
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut msg = format!("`{}` failed ({})", describe(cmd), out.status);
    for part in [stderr.trim(), stdout.trim()] {
        if !part.is_empty() {
            msg.push_str(": ");
            msg.push_str(part);
        }
    }
    bail!(msg)
}

/// Runs `cmd` to completion (stdin closed, output captured); non-zero exit is an error.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    check(cmd, out)
}

/// Runs `cmd` with `input` on its stdin; non-zero exit is an error.
pub(crate) fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<Output> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of `{}`", describe(cmd)))?;
        // Dropping stdin closes the pipe so the tool sees EOF.
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))?;
    check(cmd, out)
}

/// `ip ARGS...`, checked.
pub(crate) fn ip(args: &[&str]) -> Result<Output> {
    run_checked(Command::new("ip").args(args))
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcStat {
    /// Single-letter state (R, S, D, T, Z, X, ...).
    pub state: char,
    /// Start time in clock ticks after boot; with the PID it identifies a process.
    pub start: u64,
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 is the state, field 22 the start time: index 22 - 3 = 19.
    let start = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, start })
}

/// True if `pid` exists, is not a zombie, and (if given) started at `start`.
pub(crate) fn is_live(pid: u32, start: Option<u64>) -> bool {
    match proc_stat(pid) {
        None => false,
        Some(st) => st.state != 'Z' && st.state != 'X' && start.is_none_or(|s| s == st.start),
    }
}

/// Reaps `pid` if it is a zombie child of this process that started at `start` (a process
/// an earlier handle of the lab spawned and dropped). Until it is reaped, a killed host's
/// init cannot finish dying: it waits for every process of its PID namespace to be reaped.
pub(crate) fn reap_if_zombie_child(pid: u32, start: Option<u64>) {
    let Some(st) = proc_stat(pid) else {
        return;
    };
    if st.state != 'Z' || start.is_some_and(|s| s != st.start) {
        return;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on one PID writes only `status`; for a process that is
    // not our child it fails with ECHILD and changes nothing.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Identity of a namespace file (nsfs device and inode), if the path is one we can stat.
pub(crate) type NsId = (u64, u64);

pub(crate) fn ns_id(path: &Path) -> Option<NsId> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The kinds of namespace a lab host has of its own (`/proc/<pid>/ns/<kind>`).
pub(crate) const HOST_NS_KINDS: [&str; 5] = ["net", "mnt", "pid", "ipc", "uts"];

/// The namespaces this process lives in (never to be treated as a lab's).
pub(crate) fn own_ns_ids() -> Vec<NsId> {
    HOST_NS_KINDS
        .iter()
        .flat_map(|k| {
            [
                ns_id(Path::new(&format!("/proc/self/ns/{k}"))),
                ns_id(Path::new(&format!("/proc/1/ns/{k}"))),
            ]
        })
        .flatten()
        .collect()
}

/// PIDs (thread-group leaders, not zombies) with any namespace of [`HOST_NS_KINDS`] in `ids`.
pub(crate) fn pids_in_namespaces(ids: &[NsId]) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    if ids.is_empty() {
        return found;
    }
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        for kind in HOST_NS_KINDS {
            if let Some(id) = ns_id(&entry.path().join("ns").join(kind))
                && ids.contains(&id)
            {
                found.insert(pid);
                break;
            }
        }
    }
    found
}

/// Sends `sig` to exactly one process.
pub(crate) fn send_signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"))?;
    // SAFETY: kill(2) has no memory-safety preconditions; pid > 0 addresses exactly one
    // process (never a process group or "all processes").
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `mount --bind source target` in the calling thread's mount namespace.
pub(crate) fn bind_mount(source: &Path, target: &Path) -> io::Result<()> {
    let (s, t) = (cpath(source)?, cpath(target)?);
    // SAFETY: s and t are valid NUL-terminated strings living across the call; a null
    // fstype/data is allowed for MS_BIND.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mount --make-private target`.
pub(crate) fn make_private(target: &Path) -> io::Result<()> {
    let t = cpath(target)?;
    // SAFETY: t is a valid NUL-terminated string living across the call; source, fstype
    // and data may be null when only changing propagation.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts a fresh sysfs on /sys (in the calling thread's mount and network namespace).
pub(crate) fn mount_sysfs() -> io::Result<()> {
    let (src, tgt, fs) = (c"sysfs", c"/sys", c"sysfs");
    // SAFETY: all pointers are valid static NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// umount2(path, flags).
pub(crate) fn umount(path: &Path, detach: bool) -> io::Result<()> {
    let p = cpath(path)?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: p is a valid NUL-terminated string living across the call.
    let rc = unsafe { libc::umount2(p.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mount points (as the calling thread sees them) equal to or below `dir`, deepest first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/thread-self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    // Later mounts stack on earlier ones; deeper paths first, later mounts first.
    found.reverse();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn is_mount_point(path: &Path) -> bool {
    mounts_under(path).iter().any(|m| m == path)
}

/// Namespace files to enter (`None`: keep the caller's).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Namespaces<'a> {
    pub net: Option<&'a Path>,
    pub mnt: Option<&'a Path>,
    /// Applies to the processes the thread starts (not to the thread itself).
    pub pid: Option<&'a Path>,
    pub ipc: Option<&'a Path>,
    pub uts: Option<&'a Path>,
}

/// Runs `f` on a fresh thread that has entered the given namespaces. The caller's threads
/// are untouched; sockets created inside stay in that network namespace after the thread
/// ends; processes the thread starts are born in the PID namespace (a thread cannot move
/// itself into one: `setns` sets the namespace of its future children).
pub(crate) fn in_namespaces<T, F>(ns: Namespaces<'_>, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let open = |p: Option<&Path>| {
        p.map(|p| File::open(p).with_context(|| format!("opening {}", p.display())))
            .transpose()
    };
    let mnt_fd = open(ns.mnt)?;
    let others = [
        (open(ns.net)?, libc::CLONE_NEWNET, "network"),
        (open(ns.pid)?, libc::CLONE_NEWPID, "PID"),
        (open(ns.ipc)?, libc::CLONE_NEWIPC, "IPC"),
        (open(ns.uts)?, libc::CLONE_NEWUTS, "UTS"),
    ];
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<T> {
            if let Some(fd) = mnt_fd {
                // Threads share their filesystem context (root, cwd) with the process;
                // setns(CLONE_NEWNS) refuses that, so give this thread its own first.
                // SAFETY: unshare(CLONE_FS) only affects the calling thread's fs context.
                if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                    return Err(io::Error::last_os_error()).context("unshare(CLONE_FS)");
                }
                // SAFETY: fd is an open namespace file owned by this closure; setns only
                // changes the calling thread's mount namespace (and its root/cwd to the
                // namespace's root).
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
                    return Err(io::Error::last_os_error()).context("setns(mount namespace)");
                }
            }
            for (fd, kind, what) in others {
                if let Some(fd) = fd {
                    // SAFETY: fd is an open namespace file of that kind owned by this
                    // closure; setns only changes the calling thread's namespace (for a
                    // PID namespace: that of the children it starts).
                    if unsafe { libc::setns(fd.as_raw_fd(), kind) } != 0 {
                        return Err(io::Error::last_os_error())
                            .with_context(|| format!("setns({what} namespace)"));
                    }
                }
            }
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Gives the calling thread new PID (for its children), IPC and UTS namespaces, with
/// `hostname` as host name. Meant for a thread made by [`in_namespaces`], which then
/// starts the namespace's init.
pub(crate) fn unshare_machine(hostname: &str) -> io::Result<()> {
    // SAFETY: unshare only changes the calling thread's namespaces (a new PID namespace
    // takes effect for the children it starts).
    if unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the pointer and length describe `hostname`'s bytes, alive across the call;
    // the thread's UTS namespace is its own since the unshare above.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The PIDs of a process in each PID namespace it belongs to, outermost first (the
/// `NSpid` line of `/proc/<pid>/status`).
pub(crate) fn ns_pids(pid: u32) -> Option<Vec<u32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// `/proc/sys/kernel/pid_max` (32768 if unreadable).
pub(crate) fn pid_max() -> u32 {
    fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768)
}

/// Writes "1" to a host-side IPv6 sysctl of interface `ifname` (missing file = no IPv6).
pub(crate) fn disable_ipv6(ifname: &str) -> Result<()> {
    let p = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match fs::write(&p, "1") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("writing {p}")),
    }
}

/// True if the host (this process's network namespace) has an interface `name`.
pub(crate) fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// BSD flock wrapper used to serialise index allocation between processes and threads.
pub(crate) struct FlockGuard {
    _file: File,
}

pub(crate) fn flock_exclusive(path: &Path) -> Result<FlockGuard> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    loop {
        // SAFETY: the descriptor is valid for the lifetime of `file`; flock has no
        // memory-safety preconditions. The lock is released when `file` is closed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(FlockGuard { _file: file });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err).with_context(|| format!("flock {}", path.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), r"/end\");
    }

    #[test]
    fn own_stat_parses() {
        let st = proc_stat(std::process::id()).expect("own stat");
        assert!(st.start > 0);
        assert!(is_live(std::process::id(), Some(st.start)));
        assert!(!is_live(std::process::id(), Some(st.start + 1)));
    }
}
