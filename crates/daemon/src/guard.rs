//! The guard: a small process the daemon starts, which fences the node if the daemon dies.
//!
//! A daemon that is killed (`kill -9`, a crash, an abort on a persist failure) leaves behind what
//! it set up: the virtual IPs on the interface and the application its `start_prim` launched.
//! The peer takes over within the heartbeat timeout; a VIP still answering here would then be a
//! duplicate address, and the old application a second writer. The guard waits on a pipe from
//! the daemon: a clean exit writes `bye` first; end of file without it means the daemon died, and
//! the guard removes the module's VIPs and, where one was held, calls `stop_prim force` as for a
//! forced stop, logging what it does in the module log. Then it detaches the daemon's dead
//! mounts of the replicated directories (the mounts have no watchdog of their own, so that the
//! application is stopped before the plain directories are visible again).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tandem_config::Config;
use tandem_scripts::{AppLog, Level, ModuleLog, ScriptRequest, ScriptRunner};
use tandem_vip::{VipManager, VipSpec};

/// The daemon's end of the guard.
#[derive(Debug)]
pub(crate) struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Guard {
    /// Starts `tandem --config CONFIG guard --node NODE` with a pipe on its standard input.
    pub(crate) fn spawn(config: &Path, node: &str) -> Result<Guard> {
        let binary = std::env::current_exe().context("cannot find the tandem binary")?;
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .arg("guard")
            .arg("--node")
            .arg(node)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the guard process")?;
        let pipe = child.stdin.take();
        Ok(Guard { child, pipe })
    }

    /// A clean exit: the guard leaves without touching anything.
    pub(crate) fn dismiss(mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"bye\n");
        }
        let _ = self.child.wait();
    }
}

/// Runs the guard (the hidden `tandem guard` command) until the daemon exits.
pub fn run(config: &Config, node: &str) -> Result<()> {
    let mut line = String::new();
    let stdin = std::io::stdin();
    let clean = stdin.lock().read_line(&mut line).is_ok() && line.trim() == "bye";
    if clean {
        return Ok(());
    }
    fence(config, node)
}

fn fence(config: &Config, node: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let vips = VipManager::new().await.context("cannot open netlink")?;
        for module in &config.modules {
            let directory: PathBuf = config.daemon.log_dir.join(module.name());
            let log = ModuleLog::open(directory.join("module.log")).ok();
            let write = |level: Level, message: &str| {
                if let Some(log) = &log {
                    let _ = log.write(level, message);
                }
            };
            let mut held = false;
            for vip in &module.vips {
                let spec = VipSpec {
                    addr: vip.addr,
                    prefix: vip.prefix,
                    interface: vip.interface.clone(),
                    gratuitous_arp: false,
                };
                match vips.release(&spec).await {
                    Ok(report) if report.was_present() => {
                        held = true;
                        write(
                            Level::Warn,
                            &format!(
                                "guard: the daemon died; removed virtual IP {}/{}",
                                vip.addr, vip.prefix
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(error) => write(
                        Level::Error,
                        &format!(
                            "guard: cannot remove virtual IP {}/{}: {error}",
                            vip.addr, vip.prefix
                        ),
                    ),
                }
            }
            if held {
                let app = AppLog::open(directory.join("app.log"))
                    .with_context(|| format!("cannot open {}", directory.display()))?;
                let peer = config
                    .peer_of(node)
                    .map(|peer| peer.name.clone())
                    .unwrap_or_default();
                let runner =
                    ScriptRunner::new(crate::driver::script_env(config, module, node, &peer), app);
                let report = runner
                    .run(ScriptRequest {
                        name: "stop_prim".into(),
                        args: vec!["force".into(), "PRIM".into(), "STOP".into(), "stop".into()],
                        timeout: module
                            .settings
                            .force_stop_timeout
                            .max(Duration::from_secs(1)),
                        vars: vec![
                            ("TANDEM_STATE".into(), "PRIM".into()),
                            ("TANDEM_NEXT_STATE".into(), "STOP".into()),
                            ("TANDEM_ACTION".into(), "stop".into()),
                        ],
                    })
                    .await;
                write(
                    Level::Warn,
                    &format!(
                        "guard: the daemon died; stop_prim force: {} in {} ms",
                        report.outcome,
                        report.duration.as_millis()
                    ),
                );
            }
            // Only now, with the application stopped, the dead mounts go: until then every
            // access to the replicated directories failed, so nothing was written to the plain
            // directories that the peer does not have.
            for replicated in &module.replicated {
                match tandem_fs::detach_dead_mount(&replicated.dir) {
                    Ok(true) => write(
                        Level::Warn,
                        &format!(
                            "guard: the daemon died; detached its mount of {}",
                            replicated.dir.display()
                        ),
                    ),
                    Ok(false) => {}
                    Err(error) => write(
                        Level::Error,
                        &format!(
                            "guard: cannot detach the mount of {}: {error}",
                            replicated.dir.display()
                        ),
                    ),
                }
            }
        }
        Ok(())
    })
}
