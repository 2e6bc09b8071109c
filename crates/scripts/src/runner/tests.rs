#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::*;

/// A temporary module: scripts directory and application log.
struct Fixture {
    dir: TempDir,
    runner: ScriptRunner,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scripts_dir = dir.path().join("scripts");
        std::fs::create_dir(&scripts_dir).unwrap();
        let env = ScriptEnv {
            scripts_dir,
            vars: vec![
                ("TANDEM_MODULE".to_owned(), "web".to_owned()),
                ("TANDEM_STATE".to_owned(), "WAIT".to_owned()),
            ],
            nofile: None,
        };
        let app_log = AppLog::open(dir.path().join("log/app.log")).unwrap();
        Fixture {
            runner: ScriptRunner::new(env, app_log),
            dir,
        }
    }

    /// Writes an executable `#!/bin/sh` script.
    fn script(&self, name: &str, body: &str) {
        let path = self.runner.env().scripts_dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn app_log(&self) -> String {
        std::fs::read_to_string(self.runner.app_log().path()).unwrap()
    }
}

fn request(name: &str, args: &[&str], timeout: Duration) -> ScriptRequest {
    ScriptRequest {
        name: name.to_owned(),
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        timeout,
        vars: Vec::new(),
    }
}

const LONG: Duration = Duration::from_secs(60);

/// Polls `check` every 20 ms until it returns `Some`, failing the test after `limit`.
async fn poll<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pids written one per line to `path` by a script, once it has written `count` of them.
async fn read_pids(path: &Path, count: usize) -> Vec<i32> {
    poll(Duration::from_secs(20), "the script's pid file", || {
        let text = std::fs::read_to_string(path).ok()?;
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (pids.len() >= count && text.ends_with('\n')).then_some(pids)
    })
    .await
}

/// Whether `pid` is a live process (zombies, which only wait to be reaped, do not count).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X" | "x"))
        }
        Err(_) => false,
    }
}

/// Waits until no live process of the group `pgid` remains (`kill(-pgid, 0)` = ESRCH, or only
/// zombies not yet reaped by pid 1 remain).
async fn assert_group_gone(pgid: i32) {
    poll(
        Duration::from_secs(20),
        "the process group to disappear",
        || (!process_group_alive(pgid)).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn missing_script_is_missing() {
    let fx = Fixture::new();
    let report = fx
        .runner
        .run(request("start_prim", &["WAIT", "PRIM", "start"], LONG))
        .await;
    assert_eq!(report.outcome, ScriptOutcome::Missing);
    assert!(report.outcome.is_success());
    assert_eq!(report.name, "start_prim");
    assert_eq!(report.args, ["WAIT", "PRIM", "start"]);
}

#[tokio::test]
async fn exit_codes_and_signals_are_reported() {
    let fx = Fixture::new();
    fx.script("start_prim", "exit 0");
    fx.script("stop_prim", "exit 3");
    fx.script("transition", "kill -USR1 $$");
    let ok = fx.runner.run(request("start_prim", &[], LONG)).await;
    assert_eq!(ok.outcome, ScriptOutcome::Exited { code: 0 });
    assert!(ok.outcome.is_success());
    let failed = fx.runner.run(request("stop_prim", &[], LONG)).await;
    assert_eq!(failed.outcome, ScriptOutcome::Exited { code: 3 });
    assert!(!failed.outcome.is_success());
    let signalled = fx.runner.run(request("transition", &[], LONG)).await;
    assert_eq!(
        signalled.outcome,
        ScriptOutcome::Signalled {
            signal: libc::SIGUSR1
        }
    );
    assert_eq!(
        signalled.outcome.to_string(),
        "killed by signal 10 (SIGUSR1)"
    );
}

#[tokio::test]
async fn args_env_and_working_directory_are_passed() {
    let fx = Fixture::new();
    let out = fx.file("out.txt");
    fx.script(
        "stop_prim",
        &format!(
            "{{ echo \"$#\"; for a in \"$@\"; do echo \"arg=$a\"; done; \
             echo \"module=$TANDEM_MODULE state=$TANDEM_STATE\"; pwd; \
             cat; }} > '{}'",
            out.display()
        ),
    );
    let report = fx
        .runner
        .run(request(
            "stop_prim",
            &["force", "PRIM", "WAIT", "two words"],
            LONG,
        ))
        .await;
    assert_eq!(report.outcome, ScriptOutcome::Exited { code: 0 });
    let text = std::fs::read_to_string(&out).unwrap();
    let scripts_dir = fx.runner.env().scripts_dir.canonicalize().unwrap();
    // `cat` read an empty stdin (/dev/null) and returned at once.
    assert_eq!(
        text,
        format!(
            "4\narg=force\narg=PRIM\narg=WAIT\narg=two words\nmodule=web state=WAIT\n{}\n",
            scripts_dir.display()
        )
    );
}

#[tokio::test]
async fn unrunnable_scripts_are_spawn_failures() {
    let fx = Fixture::new();
    let dir = &fx.runner.env().scripts_dir;
    std::fs::write(dir.join("prestart"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(dir.join("prestart"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(dir.join("poststop")).unwrap();
    std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("transition")).unwrap();
    fx.script("start_second", "exec /nonexistent/interpreter");
    std::fs::write(dir.join("stop_second"), "#!/nonexistent/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(
        dir.join("stop_second"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    let failure = |report: ScriptReport| match report.outcome {
        ScriptOutcome::SpawnFailed(msg) => msg,
        other => panic!("{}: expected SpawnFailed, got {other:?}", report.name),
    };
    let msg = failure(fx.runner.run(request("prestart", &[], LONG)).await);
    assert!(
        msg.contains("not executable") && msg.contains("644"),
        "{msg}"
    );
    let msg = failure(fx.runner.run(request("poststop", &[], LONG)).await);
    assert!(msg.contains("not a regular file"), "{msg}");
    let msg = failure(fx.runner.run(request("transition", &[], LONG)).await);
    assert!(msg.contains("dangling"), "{msg}");
    let msg = failure(
        fx.runner
            .run(request("../scripts/prestart", &[], LONG))
            .await,
    );
    assert!(msg.contains("invalid script name"), "{msg}");
    let msg = failure(fx.runner.run(request("stop_second", &[], LONG)).await);
    assert!(msg.contains("cannot execute"), "{msg}");
    // A script that runs but whose command is missing is an ordinary failure of the script.
    let report = fx.runner.run(request("start_second", &[], LONG)).await;
    assert_eq!(report.outcome, ScriptOutcome::Exited { code: 127 });
    assert!(fx.app_log().contains("[prestart] cannot run: "));
}

#[tokio::test]
async fn output_goes_to_the_app_log_between_header_and_footer() {
    let fx = Fixture::new();
    fx.script("start_prim", "echo to-stdout\necho to-stderr >&2\nexit 2");
    let report = fx
        .runner
        .run(request("start_prim", &["WAIT", "PRIM", "start"], LONG))
        .await;
    assert_eq!(report.outcome, ScriptOutcome::Exited { code: 2 });
    let log = fx.app_log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    let (ts, header) = lines[0].split_once(' ').unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 24, "{log}");
    assert_eq!(header, "[start_prim] start: WAIT PRIM start");
    assert_eq!(lines[1], "to-stdout");
    assert_eq!(lines[2], "to-stderr");
    let footer = lines[3].split_once(' ').unwrap().1;
    assert!(
        footer.starts_with("[start_prim] end: exit 2 after "),
        "{log}"
    );
    assert_eq!(fx.runner.app_log().tail(1).unwrap(), [lines[3]]);
}

/// A script that records its pid (= its process group) and two children's, then blocks.
fn blocking_script(pid_file: &Path, ignore_term: bool) -> String {
    let trap = if ignore_term { "trap '' TERM\n" } else { "" };
    format!(
        "{trap}f='{}'\necho $$ > \"$f.tmp\"\nsleep 1000 &\necho $! >> \"$f.tmp\"\n\
         sh -c 'sleep 1000; echo never' &\necho $! >> \"$f.tmp\"\nmv \"$f.tmp\" \"$f\"\n\
         sleep 1000\necho never",
        pid_file.display()
    )
}

#[tokio::test]
async fn timeout_terminates_the_whole_process_group() {
    let fx = Fixture::new();
    let pid_file = fx.file("pids");
    fx.script("stop_prim", &blocking_script(&pid_file, false));
    // A long grace: the group obeys SIGTERM, so the run must end long before the grace does.
    let runner = fx.runner.clone().with_kill_grace(Duration::from_secs(30));
    let timeout = Duration::from_secs(3);
    let report = runner
        .run(request("stop_prim", &["PRIM", "WAIT", "stop"], timeout))
        .await;
    assert_eq!(report.outcome, ScriptOutcome::TimedOut);
    assert!(report.duration >= timeout);
    assert!(
        report.duration < timeout + Duration::from_secs(15),
        "{:?}",
        report.duration
    );
    let pids = read_pids(&pid_file, 3).await;
    assert_group_gone(pids[0]).await;
    for pid in pids {
        assert!(!alive(pid), "{pid} survived");
    }
    let log = fx.app_log();
    assert!(
        log.contains("[stop_prim] timeout after 3.000 s: SIGTERM to process group"),
        "{log}"
    );
    assert!(log.contains("[stop_prim] end: timed out"), "{log}");
    assert!(!log.contains("never"), "{log}");
}

#[tokio::test]
async fn timeout_escalates_to_sigkill_when_sigterm_is_ignored() {
    let fx = Fixture::new();
    let pid_file = fx.file("pids");
    fx.script("stop_prim", &blocking_script(&pid_file, true));
    let grace = Duration::from_millis(300);
    let runner = fx.runner.clone().with_kill_grace(grace);
    let timeout = Duration::from_secs(3);
    let report = runner
        .run(request(
            "stop_prim",
            &["force", "PRIM", "WAIT", "stop"],
            timeout,
        ))
        .await;
    assert_eq!(report.outcome, ScriptOutcome::TimedOut);
    assert!(report.duration >= timeout + grace, "{:?}", report.duration);
    let pids = read_pids(&pid_file, 3).await;
    assert_group_gone(pids[0]).await;
    for pid in pids {
        assert!(!alive(pid), "{pid} survived");
    }
}

#[tokio::test]
async fn backgrounded_application_survives_a_successful_start() {
    let fx = Fixture::new();
    let pid_file = fx.file("app.pid");
    // The background process keeps the script's stdout and stderr open.
    fx.script(
        "start_prim",
        &format!(
            "sleep 1000 &\necho $! > '{0}.tmp'\nmv '{0}.tmp' '{0}'\necho started\nexit 0",
            pid_file.display()
        ),
    );
    let report = fx
        .runner
        .run(request("start_prim", &["WAIT", "PRIM", "start"], LONG))
        .await;
    assert_eq!(report.outcome, ScriptOutcome::Exited { code: 0 });
    assert!(
        report.duration < Duration::from_secs(2),
        "{:?}",
        report.duration
    );
    let app = read_pids(&pid_file, 1).await[0];
    assert!(alive(app), "the application was killed");
    assert!(process_group_alive(app_group(app)));
    // Clean up.
    kill(Pid::from_raw(app), Signal::SIGKILL).unwrap();
    poll(Duration::from_secs(20), "the application to die", || {
        (!alive(app)).then_some(())
    })
    .await;
}

/// The process group of `pid`.
fn app_group(pid: i32) -> i32 {
    nix::unistd::getpgid(Some(Pid::from_raw(pid)))
        .unwrap()
        .as_raw()
}

#[tokio::test]
async fn abort_all_kills_running_scripts() {
    let fx = Fixture::new();
    for name in ["stop_prim", "stop_second"] {
        fx.script(
            name,
            &format!(
                "f='{}'\necho $$ > \"$f.tmp\"\nmv \"$f.tmp\" \"$f\"\nsleep 1000",
                fx.file(name).display()
            ),
        );
    }
    let tasks: Vec<_> = ["stop_prim", "stop_second"]
        .into_iter()
        .map(|name| {
            let runner = fx.runner.clone();
            tokio::spawn(async move {
                runner
                    .run(request(name, &["PRIM", "WAIT", "stop"], LONG))
                    .await
            })
        })
        .collect();
    let pgids = [
        read_pids(&fx.file("stop_prim"), 1).await[0],
        read_pids(&fx.file("stop_second"), 1).await[0],
    ];
    fx.runner.abort_all();
    for task in tasks {
        let report = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            report.outcome,
            ScriptOutcome::Signalled {
                signal: libc::SIGKILL
            }
        );
    }
    for pgid in pgids {
        assert_group_gone(pgid).await;
    }
    let log = fx.app_log();
    assert!(
        log.contains("[stop_prim] end: killed by signal 9 (SIGKILL) (aborted)"),
        "{log}"
    );
    assert!(
        log.contains("[stop_second] end: killed by signal 9 (SIGKILL) (aborted)"),
        "{log}"
    );
    // The runner still works afterwards.
    fx.script("transition", "exit 0");
    let report = fx.runner.run(request("transition", &[], LONG)).await;
    assert_eq!(report.outcome, ScriptOutcome::Exited { code: 0 });
}

#[tokio::test]
async fn dropping_the_run_future_kills_the_process_group() {
    let fx = Fixture::new();
    let pid_file = fx.file("pids");
    fx.script("start_prim", &blocking_script(&pid_file, true));
    let runner = fx.runner.clone();
    let task = tokio::spawn(async move { runner.run(request("start_prim", &[], LONG)).await });
    let pids = read_pids(&pid_file, 3).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_group_gone(pids[0]).await;
    assert!(
        fx.app_log()
            .contains("[start_prim] run cancelled: SIGKILL to process group")
    );
}

/// Scripts start with the descriptor limit the daemon was started with, not the one it raised
/// for itself (an application using `select(2)` breaks past 1,024 descriptors).
#[tokio::test]
async fn scripts_get_the_descriptor_limit_they_are_given() {
    let mut fx = Fixture::new();
    fx.runner = ScriptRunner::new(
        ScriptEnv {
            nofile: Some(512),
            ..fx.runner.env().clone()
        },
        fx.runner.app_log().clone(),
    );
    let out = fx.file("nofile");
    fx.script("start_prim", &format!("ulimit -n > {}", out.display()));
    let report = fx.runner.run(request("start_prim", &[], LONG)).await;
    assert!(report.outcome.is_success(), "{report:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "512");
}
