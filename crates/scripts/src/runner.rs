//! Runs a module's user scripts: one process group per run, output to the application log,
//! timeout with graceful then forced kill of the whole group.
//!
//! # Output: the log file itself, not pipes
//!
//! The script gets an `O_APPEND` descriptor of the application log as stdout and stderr
//! (see [`AppLog::child_stdio`]); the runner writes a header line before and a footer line after
//! each run. Pipes read by the daemon would allow a timestamp per output line, but:
//! * a script usually starts the application in the background, and the application inherits the
//!   script's stdout: with a pipe, the runner could not tell when output is finished (it would
//!   have to give up after a drain delay), and once the daemon stops reading or restarts, the
//!   application's next write to its stdout gets `SIGPIPE`/`EPIPE` and may kill it;
//! * with the file, nothing ties the application to the daemon, `run()` returns as soon as the
//!   script's main process exits, and no output is lost.
//!
//! The price: output lines are not prefixed, and a background process keeps writing to the file
//! it got even after the log is rotated.
//!
//! # Process groups
//!
//! Each script is the leader of its own process group (`setpgid(0, 0)`), so everything it starts
//! without `setsid`/`setpgid` can be signalled at once with `killpg`:
//! * normal exit: nothing is killed (what the script started in the background keeps running);
//! * timeout: `SIGTERM` to the group, up to the kill grace (default 2 s) for the group to
//!   disappear, then `SIGKILL` to the group; the outcome is [`ScriptOutcome::TimedOut`];
//! * [`ScriptRunner::abort_all`]: `SIGKILL` to the group of every running script; their `run()`
//!   report [`ScriptOutcome::Signalled`] with `SIGKILL`;
//! * the `run()` future dropped before the script exited (cancellation): `SIGKILL` to the group.
//!
//! Processes that left the group (`setsid`, `setpgid`, double fork into a new session) are out of
//! reach, by design: that is how a script starts a daemon that must survive it.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{AccessFlags, Pid, access};
use tokio::process::{Child, Command};

use crate::log::AppLog;

/// Default time given to a timed-out script's process group between `SIGTERM` and `SIGKILL`.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for the kernel to reap a process after `SIGKILL` (a process stuck in
/// uninterruptible sleep may never go); after that, tokio reaps it in the background.
const REAP_LIMIT: Duration = Duration::from_secs(5);

/// Polling period while waiting for a process group to disappear.
const POLL: Duration = Duration::from_millis(25);

/// How long to retry a spawn that fails with `ETXTBSY` (the script file is still open for
/// writing, typically by a concurrent fork of this process that has not reached `exec` yet).
const TEXT_BUSY_RETRIES: u32 = 40;

/// One call of a user script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptRequest {
    /// File name of the script in the scripts directory, e.g. `stop_prim`.
    pub name: String,
    /// Arguments, e.g. `["PRIM", "WAIT", "stop"]` or `["force", "PRIM", "WAIT", "stop"]`.
    pub args: Vec<String>,
    /// Time after which the script's process group is killed.
    pub timeout: Duration,
    /// Variables for this call only (e.g. `TANDEM_STATE`), set after [`ScriptEnv::vars`].
    pub vars: Vec<(String, String)>,
}

/// Where a module's scripts are and what they get in their environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptEnv {
    /// The module's scripts directory; also the scripts' working directory.
    pub scripts_dir: PathBuf,
    /// Variables added to the daemon's environment (`TANDEM_MODULE`, `TANDEM_NODE`,
    /// `TANDEM_STATE`, ...), supplied by the caller.
    pub vars: Vec<(String, String)>,
    /// The soft descriptor limit scripts (and the application they start) run with, when it
    /// differs from the caller's: the daemon raises its own for itself only.
    pub nofile: Option<u64>,
}

/// How a script run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptOutcome {
    /// The script does not exist (not an error: scripts are optional).
    Missing,
    /// The script exited with this code.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// The script was killed by this signal (`SIGKILL` = 9 after [`ScriptRunner::abort_all`]).
    Signalled {
        /// Signal number.
        signal: i32,
    },
    /// The script did not finish in time; its process group was killed.
    TimedOut,
    /// The script could not be started (not executable, bad interpreter, ...).
    SpawnFailed(String),
}

impl ScriptOutcome {
    /// Whether the run counts as a success: exit code 0, or no such script.
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            ScriptOutcome::Missing | ScriptOutcome::Exited { code: 0 }
        )
    }
}

impl fmt::Display for ScriptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScriptOutcome::Missing => write!(f, "not present"),
            ScriptOutcome::Exited { code } => write!(f, "exit {code}"),
            ScriptOutcome::Signalled { signal } => match Signal::try_from(*signal) {
                Ok(sig) => write!(f, "killed by signal {signal} ({})", sig.as_str()),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            ScriptOutcome::TimedOut => write!(f, "timed out, process group killed"),
            ScriptOutcome::SpawnFailed(msg) => write!(f, "cannot run: {msg}"),
        }
    }
}

/// The result of [`ScriptRunner::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptReport {
    /// Script name, from the request.
    pub name: String,
    /// Arguments, from the request.
    pub args: Vec<String>,
    /// How it ended.
    pub outcome: ScriptOutcome,
    /// Wall-clock time from the call to the end (including the kill grace after a timeout).
    pub duration: Duration,
}

/// Scripts currently running, for [`ScriptRunner::abort_all`].
#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    /// Run id -> (process group, aborted).
    running: HashMap<u64, (i32, bool)>,
    /// Number of `abort_all` calls so far.
    aborts: u64,
}

/// Runs the user scripts of one module. Cheap to clone; clones share the set of running
/// scripts, so [`ScriptRunner::abort_all`] on any clone kills the runs of all of them.
#[derive(Clone, Debug)]
pub struct ScriptRunner {
    env: Arc<ScriptEnv>,
    app_log: AppLog,
    kill_grace: Duration,
    registry: Arc<Mutex<Registry>>,
}

impl ScriptRunner {
    /// A runner for the scripts of `env`, writing their output to `app_log`.
    pub fn new(env: ScriptEnv, app_log: AppLog) -> ScriptRunner {
        ScriptRunner {
            env: Arc::new(env),
            app_log,
            kill_grace: DEFAULT_KILL_GRACE,
            registry: Arc::default(),
        }
    }

    /// Sets the time between `SIGTERM` and `SIGKILL` after a timeout (default
    /// [`DEFAULT_KILL_GRACE`]).
    pub fn with_kill_grace(mut self, grace: Duration) -> ScriptRunner {
        self.kill_grace = grace;
        self
    }

    /// The scripts directory and environment.
    pub fn env(&self) -> &ScriptEnv {
        &self.env
    }

    /// The application log the scripts write to.
    pub fn app_log(&self) -> &AppLog {
        &self.app_log
    }

    /// Runs the script `request.name` of the scripts directory with `request.args` and waits for
    /// its main process to exit (or for the timeout).
    ///
    /// Cancel-safe: dropping the future before the script exited kills its process group.
    pub async fn run(&self, request: ScriptRequest) -> ScriptReport {
        let started = Instant::now();
        let outcome = self.run_inner(&request, started).await;
        ScriptReport {
            name: request.name,
            args: request.args,
            outcome,
            duration: started.elapsed(),
        }
    }

    /// Kills (`SIGKILL`) the process group of every script running now, or started by a
    /// `run()` call that began before this call. Their `run()` return
    /// [`ScriptOutcome::Signalled`] with signal 9. Does not wait.
    pub fn abort_all(&self) {
        let mut registry = self.lock();
        registry.aborts += 1;
        for (pgid, aborted) in registry.running.values_mut() {
            *aborted = true;
            signal_group(*pgid, Signal::SIGKILL);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry is consistent after every statement; a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self, name: &str, text: &str) {
        if let Err(e) = self.app_log.write_line(&format!("[{name}] {text}")) {
            tracing::warn!(path = %self.app_log.path().display(), "cannot write the application log: {e}");
        }
    }

    async fn run_inner(&self, request: &ScriptRequest, started: Instant) -> ScriptOutcome {
        let name = request.name.as_str();
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return ScriptOutcome::SpawnFailed(format!("invalid script name {name:?}"));
        }
        let path = self.env.scripts_dir.join(name);
        match check_executable(&path) {
            Ok(true) => {}
            Ok(false) => return ScriptOutcome::Missing,
            Err(msg) => {
                self.log(name, &format!("cannot run: {msg}"));
                return ScriptOutcome::SpawnFailed(msg);
            }
        }

        let mut command = Command::new(&path);
        command
            .args(&request.args)
            .envs(self.env.vars.iter().map(|(k, v)| (k, v)))
            .envs(request.vars.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.env.scripts_dir)
            .stdin(Stdio::null())
            .stdout(self.output())
            .stderr(self.output())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(soft) = self.env.nofile {
            // SAFETY: the closure runs in the child between fork and exec and makes two
            // async-signal-safe system calls on a value copied in before the fork; it allocates
            // nothing and touches no lock.
            unsafe {
                command.pre_exec(move || {
                    let mut current = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) == 0 {
                        let lowered = libc::rlimit {
                            rlim_cur: soft.min(current.rlim_max),
                            rlim_max: current.rlim_max,
                        };
                        libc::setrlimit(libc::RLIMIT_NOFILE, &lowered);
                    }
                    Ok(())
                });
            }
        }

        let aborts_before = self.lock().aborts;
        self.log(name, &format!("start: {}", request.args.join(" ")));
        let mut child = match spawn(&mut command).await {
            Ok(child) => child,
            Err(e) => {
                let msg = if e.raw_os_error() == Some(libc::ENOEXEC) {
                    format!("cannot execute {}: {e} (missing #! line?)", path.display())
                } else {
                    format!("cannot execute {}: {e}", path.display())
                };
                self.log(name, &format!("cannot run: {msg}"));
                return ScriptOutcome::SpawnFailed(msg);
            }
        };
        // Some until the child has been waited for, which has not happened yet.
        let Some(pid) = child.id() else {
            return ScriptOutcome::SpawnFailed("the started script has no pid".to_owned());
        };
        // Pids are positive and at most 2^22 on Linux.
        let pgid = pid as i32;
        let mut guard = RunGuard::register(self, name, pgid, aborts_before);

        let outcome = match tokio::time::timeout(request.timeout, child.wait()).await {
            Ok(Ok(status)) => outcome_of(status),
            Ok(Err(e)) => {
                // Cannot happen for a child we spawned; do not leave it behind.
                signal_group(pgid, Signal::SIGKILL);
                ScriptOutcome::SpawnFailed(format!("cannot wait for the script: {e}"))
            }
            Err(_elapsed) => {
                self.log(
                    name,
                    &format!(
                        "timeout after {}: SIGTERM to process group {pgid}",
                        seconds(request.timeout)
                    ),
                );
                self.terminate_group(&mut child, pgid).await;
                ScriptOutcome::TimedOut
            }
        };
        guard.armed = false;
        let aborted = guard.aborted();
        drop(guard);
        let suffix = if aborted { " (aborted)" } else { "" };
        self.log(
            name,
            &format!(
                "end: {outcome}{suffix} after {}",
                seconds(started.elapsed())
            ),
        );
        outcome
    }

    /// Where the script's stdout/stderr go: the application log, or nowhere if it cannot be
    /// opened (running the script matters more than its output).
    fn output(&self) -> Stdio {
        match self.app_log.child_stdio() {
            Ok(file) => Stdio::from(file),
            Err(e) => {
                tracing::warn!(path = %self.app_log.path().display(), "cannot open the application log for a script: {e}");
                Stdio::null()
            }
        }
    }

    /// After a timeout: `SIGTERM` to the group, wait up to the grace for the whole group to go,
    /// then `SIGKILL` to what remains, and reap the script.
    async fn terminate_group(&self, child: &mut Child, pgid: i32) {
        signal_group(pgid, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + self.kill_grace;
        let leader_gone = tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_ok();
        if leader_gone {
            // The script exited; give its remaining children the rest of the grace.
            while process_group_alive(pgid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
            // Only signal a group that still has live members, so that a pgid freed and reused
            // by an unrelated new group in the meantime is never hit.
            if process_group_alive(pgid) {
                signal_group(pgid, Signal::SIGKILL);
            }
        } else {
            // The unreaped leader keeps the pgid reserved.
            signal_group(pgid, Signal::SIGKILL);
            if tokio::time::timeout(REAP_LIMIT, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(pgid, "script still not reaped {REAP_LIMIT:?} after SIGKILL");
            }
        }
    }
}

/// Registers a run for [`ScriptRunner::abort_all`]; on drop, unregisters it and, if the script
/// may still be running (`armed`: the future was cancelled), kills its process group.
struct RunGuard<'a> {
    runner: &'a ScriptRunner,
    name: &'a str,
    id: u64,
    pgid: i32,
    armed: bool,
}

impl<'a> RunGuard<'a> {
    fn register(
        runner: &'a ScriptRunner,
        name: &'a str,
        pgid: i32,
        aborts_before: u64,
    ) -> RunGuard<'a> {
        let mut registry = runner.lock();
        let id = registry.next_id;
        registry.next_id += 1;
        // abort_all() ran between the start of run() and now: this run is aborted too.
        let aborted = registry.aborts != aborts_before;
        if aborted {
            signal_group(pgid, Signal::SIGKILL);
        }
        registry.running.insert(id, (pgid, aborted));
        RunGuard {
            runner,
            name,
            id,
            pgid,
            armed: true,
        }
    }

    fn aborted(&self) -> bool {
        self.runner
            .lock()
            .running
            .get(&self.id)
            .is_some_and(|&(_, aborted)| aborted)
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.runner.lock().running.remove(&self.id);
        if self.armed {
            // The leader is not reaped yet (the Child is dropped after this guard, and its
            // kill_on_drop only hits the leader), so the pgid is still ours.
            signal_group(self.pgid, Signal::SIGKILL);
            let text = format!("run cancelled: SIGKILL to process group {}", self.pgid);
            self.runner.log(self.name, &text);
        }
    }
}

/// `Ok(true)`: an executable regular file; `Ok(false)`: no such file; `Err`: something that
/// cannot be run, with a message for the operator.
fn check_executable(path: &Path) -> Result<bool, String> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if path.symlink_metadata().is_ok() {
                Err(format!("{} is a dangling symbolic link", path.display()))
            } else {
                Ok(false)
            };
        }
        Err(e) => return Err(format!("cannot access {}: {e}", path.display())),
    };
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if let Err(e) = access(path, AccessFlags::X_OK) {
        return Err(format!(
            "{} is not executable (mode {:o}: {e}); make it executable with chmod +x",
            path.display(),
            meta.permissions().mode() & 0o7777
        ));
    }
    Ok(true)
}

/// Spawns, retrying for a moment on `ETXTBSY`.
async fn spawn(command: &mut Command) -> std::io::Result<Child> {
    let mut attempt = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TEXT_BUSY_RETRIES => {
                attempt += 1;
                tokio::time::sleep(POLL).await;
            }
            result => return result,
        }
    }
}

fn outcome_of(status: ExitStatus) -> ScriptOutcome {
    match (status.code(), status.signal()) {
        (Some(code), _) => ScriptOutcome::Exited { code },
        (None, Some(signal)) => ScriptOutcome::Signalled { signal },
        // Neither exited nor signalled is impossible for a waited-for child.
        (None, None) => ScriptOutcome::SpawnFailed(format!("unexpected wait status {status}")),
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Sends `signal` to the process group `pgid`; errors (the group is gone) are ignored.
fn signal_group(pgid: i32, signal: Signal) {
    // Never our own group (0) or init's (1), whatever happens.
    if pgid <= 1 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(pgid), signal)
        && e != Errno::ESRCH
    {
        tracing::warn!(
            pgid,
            "cannot send {} to process group: {e}",
            signal.as_str()
        );
    }
}

/// Whether the process group `pgid` has a member that is not a zombie.
///
/// `kill(-pgid, 0)` alone is not enough: it succeeds as long as a zombie member exists, and
/// orphans of a killed script are zombies until the system's reaper (pid 1 or a subreaper)
/// collects them, which some container inits do late or never.
pub fn process_group_alive(pgid: i32) -> bool {
    if pgid <= 1 {
        return true;
    }
    if killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|s| s.parse::<i32>().ok());
        if pgrp == Some(pgid) && !matches!(state, Some("Z" | "X" | "x")) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests;
