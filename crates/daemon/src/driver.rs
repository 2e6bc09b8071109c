//! The driver: one event loop that feeds the core and carries out its effects.
//!
//! Every input (network event, operator request, finished step, link change, timer) goes through
//! [`tandem_core::Node::handle`]; the returned effects are carried out in order. Persist effects
//! are written synchronously before the next effect; everything slow (scripts, VIP moves) runs in
//! a task that reports back as a new input. Nothing here decides cluster behaviour.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tandem_config::{Config, ModuleConfig};
use tandem_core::{
    Command, Effect, Input, Level, ModuleId, Node, NodeStatus, Outcome, RequestId, ScriptCall,
    StepId, Time,
};
use tandem_net::{Net, NetConfig, NetEvent, NetworkAddrs};
use tandem_proto::ChannelMessage;
use tandem_scripts::{AppLog, ModuleLog, ScriptEnv, ScriptRequest, ScriptRunner};
use tandem_vip::{VipManager, VipSpec};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::persist::StateDir;
use crate::replication::{Replication, ReplicationEvent};

/// How the daemon is started.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The validated configuration.
    pub config: Config,
    /// The local node name, overriding `this_node` and address detection.
    pub node: Option<String>,
}

/// A request from the control API to the loop.
#[derive(Debug)]
pub(crate) enum ApiRequest {
    Status(oneshot::Sender<tandem_api::Status>),
    Command {
        module: usize,
        command: Command,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// What the API server shares with the loop.
#[derive(Clone)]
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub requests: mpsc::Sender<ApiRequest>,
    pub events: broadcast::Sender<tandem_api::Event>,
    pub logs: Arc<Vec<ModuleLogs>>,
}

/// The logs of one module.
#[derive(Clone)]
pub(crate) struct ModuleLogs {
    pub name: String,
    pub module: ModuleLog,
    pub app: AppLog,
    events: broadcast::Sender<tandem_api::Event>,
}

impl ModuleLogs {
    /// Writes a module log line and publishes it on the event stream.
    pub(crate) fn write(&self, level: tandem_scripts::Level, message: &str) {
        if let Err(error) = self.module.write(level, message) {
            tracing::error!("cannot write the module log of {}: {error}", self.name);
        }
        let line = format!("{} {message}", level.letter());
        // No subscriber is fine.
        let _ = self.events.send(tandem_api::Event::Log {
            module: self.name.clone(),
            line,
        });
    }
}

struct Finished {
    module: ModuleId,
    step: StepId,
    outcome: Outcome,
}

struct Driver {
    config: Arc<Config>,
    node_name: String,
    node: Node,
    /// `CLOCK_BOOTTIME` at start, in nanoseconds.
    origin: u64,
    state: StateDir,
    net: Net,
    vips: Arc<VipManager>,
    vip_specs: Vec<Vec<VipSpec>>,
    /// VIP moves of one module run one after the other, in the order the core asked for them,
    /// even when an abandoned acquire (forcestop) is still running.
    vip_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    runners: Vec<ScriptRunner>,
    logs: Arc<Vec<ModuleLogs>>,
    events: broadcast::Sender<tandem_api::Event>,
    finished: mpsc::Sender<Finished>,
    pending: HashMap<RequestId, oneshot::Sender<Result<String, String>>>,
    next_request: u64,
    tasks: TaskTracker,
    channel_up: bool,
    last_heard: Vec<Option<Instant>>,
    replication: Replication,
}

/// Runs the daemon until SIGTERM/SIGINT (modules are stopped first) or a fatal error.
pub async fn run(options: DaemonOptions) -> Result<()> {
    let nofile = crate::limits::raise();
    let config = Arc::new(options.config);
    let node_name = resolve_node_name(&config, options.node.as_deref())?;
    let settings = config
        .node_settings(&node_name)
        .with_context(|| format!("node {node_name:?} is not in the configuration"))?;
    let peer = config
        .peer_of(&node_name)
        .context("the configuration has no peer node")?
        .clone();
    let local = config
        .node(&node_name)
        .context("the local node is not configured")?
        .clone();

    let state = StateDir::open(&config.daemon.state_dir)?;
    let incarnation = state.next_incarnation()?;
    let (events, _) = broadcast::channel(1024);
    let logs = Arc::new(open_logs(&config, &events)?);
    let records = config
        .modules
        .iter()
        .map(|module| state.load(module.name()))
        .collect::<Result<Vec<_>>>()?;
    for (module_logs, record) in logs.iter().zip(&records) {
        module_logs.write(
            tandem_scripts::Level::Info,
            &format!(
                "daemon started on {node_name} (incarnation {incarnation}); data claim {}, epoch {}",
                record.claim.as_str(),
                record.epoch
            ),
        );
        module_logs.write(
            tandem_scripts::Level::Warn,
            "no witness configured: if the nodes lose each other while both run, both may \
             become primary (split brain); configure a witness",
        );
        match &nofile {
            Ok(limits) => module_logs.write(tandem_scripts::Level::Info, &limits.describe()),
            Err(e) => module_logs.write(
                tandem_scripts::Level::Warn,
                &format!("cannot raise the descriptor limit: {e}"),
            ),
        }
    }

    let origin = boottime_nanos();
    let node = Node::new(settings, records.clone(), incarnation, Time(0));

    let shutdown = CancellationToken::new();
    let (net_events, mut net_rx) = mpsc::channel(1024);
    let net_config = NetConfig {
        local_name: node_name.clone(),
        peer_name: peer.name.clone(),
        networks: local
            .addrs
            .iter()
            .zip(&peer.addrs)
            .map(|(&local, &peer)| NetworkAddrs { local, peer })
            .collect(),
        channel_network: config.heartbeat.channel_network,
        heartbeat_port: config.heartbeat.port,
        channel_port: config.heartbeat.channel_port,
        cluster_secret: config.cluster.secret.clone(),
    };
    let net = Net::start(net_config, incarnation, net_events, shutdown.clone())
        .await
        .context("cannot start node-to-node networking")?;
    let (replication_tx, mut replication_rx) = mpsc::unbounded_channel();
    let peer_channel = std::net::SocketAddr::new(
        *peer
            .addrs
            .get(config.heartbeat.channel_network)
            .context("the peer has no address on the channel network")?,
        config.heartbeat.channel_port,
    );
    let replication = Replication::new(&config, &records, peer_channel, replication_tx);
    if let Some(streams) = net.take_replication_streams() {
        replication.serve(streams);
    }

    // Three announcements 50 ms apart, then a second burst 3 s later: the first packet leaves at
    // once, and the application starts after ~100 ms rather than waiting for slow bursts.
    let announce = tandem_vip::AnnounceConfig {
        count: 3,
        interval: Duration::from_millis(50),
        second_burst_delay: Some(Duration::from_secs(3)),
    };
    let vips = Arc::new(
        VipManager::with_config(announce)
            .await
            .context("cannot open netlink")?,
    );
    let vip_specs: Vec<Vec<VipSpec>> = config
        .modules
        .iter()
        .map(|module| {
            module
                .vips
                .iter()
                .map(|vip| VipSpec {
                    addr: vip.addr,
                    prefix: vip.prefix,
                    interface: vip.interface.clone(),
                    gratuitous_arp: vip.gratuitous_arp,
                })
                .collect()
        })
        .collect();

    // Every module starts in STOP, so this node holds no VIP: any VIP still on an interface is a
    // leftover of a run that crashed, and must not answer for a primary that is not here.
    for (specs, module_logs) in vip_specs.iter().zip(logs.iter()) {
        for spec in specs {
            match vips.release(spec).await {
                Ok(report) if report.was_present() => module_logs.write(
                    tandem_scripts::Level::Warn,
                    &format!(
                        "removed virtual IP {}/{} left by an earlier run",
                        spec.addr, spec.prefix
                    ),
                ),
                Ok(_) => {}
                Err(error) => module_logs.write(
                    tandem_scripts::Level::Error,
                    &format!(
                        "cannot check virtual IP {}/{}: {error}",
                        spec.addr, spec.prefix
                    ),
                ),
            }
        }
    }

    let (link_tx, mut link_rx) = mpsc::channel::<(ModuleId, bool)>(64);
    let tasks = TaskTracker::new();
    for (index, specs) in vip_specs.iter().enumerate() {
        let Some(spec) = specs.first() else { continue };
        let interface = match vips.resolve_interface(spec).await {
            Ok(interface) => interface,
            Err(error) => {
                logs[index].write(
                    tandem_scripts::Level::Error,
                    &format!(
                        "cannot find the interface of virtual IP {}: {error}",
                        spec.addr
                    ),
                );
                // Without a watched interface the VIP cannot be trusted here: the module must not
                // become primary on this node, so its link counts as down.
                let _ = link_tx.send((ModuleId(index), false)).await;
                continue;
            }
        };
        let mut watch = match vips
            .watch_link(&interface, Duration::from_millis(100))
            .await
        {
            Ok(watch) => watch,
            Err(error) => {
                logs[index].write(
                    tandem_scripts::Level::Error,
                    &format!("cannot watch the link of {interface}: {error}"),
                );
                // Without a watched interface the VIP cannot be trusted here: the module must not
                // become primary on this node, so its link counts as down.
                let _ = link_tx.send((ModuleId(index), false)).await;
                continue;
            }
        };
        let link_tx = link_tx.clone();
        let cancel = shutdown.clone();
        tasks.spawn(async move {
            let module = ModuleId(index);
            let initial = *watch.borrow_and_update();
            if link_tx.send((module, initial)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    changed = watch.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let up = *watch.borrow_and_update();
                        if link_tx.send((module, up)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }

    let runners = config
        .modules
        .iter()
        .zip(logs.iter())
        .map(|(module, module_logs)| {
            let mut env = script_env(&config, module, &node_name, &peer.name);
            env.nofile = nofile
                .as_ref()
                .ok()
                .filter(|l| l.original != l.soft)
                .map(|l| l.original);
            ScriptRunner::new(env, module_logs.app.clone())
        })
        .collect();

    let (requests, mut request_rx) = mpsc::channel(64);
    let shared = Shared {
        config: Arc::clone(&config),
        requests,
        events: events.clone(),
        logs: Arc::clone(&logs),
    };
    let listener = crate::api::bind(&config.daemon.socket)?;
    {
        let cancel = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = crate::api::serve(listener, shared, cancel).await {
                tracing::error!("control API stopped: {error:#}");
            }
        });
    }

    // From here on, if this process dies, the guard fences the node.
    let guard = crate::guard::Guard::spawn(&config.path, &node_name)?;

    let (finished, mut finished_rx) = mpsc::channel(64);
    let n_networks = local.addrs.len();
    let n_modules = config.modules.len();
    let mut driver = Driver {
        config: Arc::clone(&config),
        node_name,
        node,
        origin,
        state,
        net,
        vips,
        vip_locks: (0..n_modules)
            .map(|_| Arc::new(tokio::sync::Mutex::new(())))
            .collect(),
        vip_specs,
        runners,
        logs,
        events,
        finished,
        pending: HashMap::new(),
        next_request: 1,
        tasks: tasks.clone(),
        channel_up: false,
        last_heard: vec![None; n_networks],
        replication,
    };

    // A module without replicated directories has no stream that could fall behind: it counts
    // as connected, so that the secondary's snapshots alone decide whether it is up to date.
    // The others are reported by their replicators.
    for index in 0..n_modules {
        if !driver.replication.replicates(ModuleId(index)) {
            driver.input(Input::ReplicationChanged {
                module: ModuleId(index),
                connected: true,
            });
        }
    }
    if config.daemon.autostart {
        for index in 0..n_modules {
            driver.command(ModuleId(index), Command::Start, None);
        }
    }
    driver.input(Input::Tick);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;
    let mut stopping = false;
    loop {
        let delay = driver
            .node
            .poll_timeout()
            .map(|time| time.since(driver.now()));
        let sleep = async {
            match delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
        };
        // Biased: pending heartbeats are handled before a timer tick, so a loop that was slow for
        // a moment does not declare a peer lost whose heartbeats are waiting in the queue.
        tokio::select! {
            biased;
            Some(event) = net_rx.recv() => driver.on_net(event),
            Some(request) = request_rx.recv() => driver.on_request(request),
            Some(done) = finished_rx.recv() => {
                driver.input(Input::StepDone { module: done.module, step: done.step, outcome: done.outcome });
            }
            Some((module, up)) = link_rx.recv() => driver.input(Input::LinkChanged { module, up }),
            Some(event) = replication_rx.recv() => driver.on_replication(event),
            () = sleep => driver.input(Input::Tick),
            _ = terminate.recv() => {
                if stopping { break; }
                stopping = true;
                driver.begin_shutdown();
            }
            _ = interrupt.recv() => {
                if stopping { break; }
                stopping = true;
                driver.begin_shutdown();
            }
        }
        if stopping && driver.all_stopped() {
            break;
        }
    }
    driver.broadcast_all("daemon stopped");
    shutdown.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    driver.net.stop().await;
    let _ = std::fs::remove_file(&config.daemon.socket);
    guard.dismiss();
    Ok(())
}

impl Driver {
    /// The core's clock: `CLOCK_BOOTTIME`, monotonic and, unlike `CLOCK_MONOTONIC`, counting
    /// the time the machine was suspended, so that a resumed node sees the gap (the core then
    /// does not trust its old view of the peer).
    fn now(&self) -> Time {
        Time(boottime_nanos().saturating_sub(self.origin))
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        let effects = self.node.handle(now, input);
        for effect in effects {
            self.execute(effect);
        }
    }

    fn command(
        &mut self,
        module: ModuleId,
        command: Command,
        reply: Option<oneshot::Sender<Result<String, String>>>,
    ) {
        if matches!(command, Command::Start | Command::Prim | Command::Second)
            && self
                .node
                .status()
                .modules
                .get(module.0)
                .is_some_and(|m| m.state == tandem_core::State::Stop && m.running_step.is_none())
            && let Err(error) = self.replication.mount(module)
        {
            self.module_log(module, tandem_scripts::Level::Error, &error);
            if let Some(reply) = reply {
                let _ = reply.send(Err(error));
            }
            return;
        }
        let request = RequestId(self.next_request);
        self.next_request += 1;
        if let Some(reply) = reply {
            self.pending.insert(request, reply);
        }
        self.input(Input::Command {
            module,
            command,
            request,
        });
    }

    fn begin_shutdown(&mut self) {
        self.broadcast_all("termination signal: stopping every module before exiting");
        for index in 0..self.config.modules.len() {
            let status = self.node.status();
            if status.modules[index].state != tandem_core::State::Stop {
                self.command(ModuleId(index), Command::Stop, None);
            }
        }
    }

    fn all_stopped(&self) -> bool {
        self.node
            .status()
            .modules
            .iter()
            .all(|module| module.state == tandem_core::State::Stop && module.running_step.is_none())
    }

    fn broadcast_all(&self, message: &str) {
        for logs in self.logs.iter() {
            logs.write(tandem_scripts::Level::Info, message);
        }
    }

    fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Heartbeat { network, snapshot } => {
                if let Some(slot) = self.last_heard.get_mut(network) {
                    *slot = Some(Instant::now());
                }
                self.input(Input::Heartbeat { network, snapshot });
            }
            NetEvent::Channel(ChannelMessage::Snapshot(snapshot)) => {
                self.input(Input::ChannelSnapshot(snapshot));
            }
            NetEvent::Channel(_) => {}
            NetEvent::ChannelUp { peer_addr } => {
                self.channel_up = true;
                self.broadcast_all(&format!("peer channel established with {peer_addr}"));
                self.net
                    .send_channel(ChannelMessage::Snapshot(self.node.snapshot()));
            }
            NetEvent::ChannelDown { reason } => {
                if self.channel_up {
                    self.channel_up = false;
                    self.broadcast_all(&format!("peer channel down: {reason}"));
                }
            }
            NetEvent::Refused {
                from,
                channel,
                reason,
            } => {
                let message = format!("refused {channel} traffic from {from}: {reason}");
                tracing::warn!("{message}");
                for logs in self.logs.iter() {
                    logs.write(tandem_scripts::Level::Warn, &message);
                }
            }
        }
    }

    fn on_replication(&mut self, event: ReplicationEvent) {
        match event {
            ReplicationEvent::Connected { module, connected } => {
                self.module_log(
                    module,
                    tandem_scripts::Level::Info,
                    if connected {
                        "replication to the peer connected and caught up"
                    } else {
                        "replication to the peer not connected"
                    },
                );
                self.input(Input::ReplicationChanged { module, connected });
            }
            ReplicationEvent::Synced {
                module,
                step,
                result,
            } => {
                let outcome = match result {
                    Ok(()) => Outcome::Ok,
                    Err(why) => Outcome::Failed(why),
                };
                self.input(Input::StepDone {
                    module,
                    step,
                    outcome,
                });
            }
            ReplicationEvent::Log {
                module,
                level,
                message,
            } => self.module_log(module, level, &message),
        }
    }

    fn on_request(&mut self, request: ApiRequest) {
        match request {
            ApiRequest::Status(reply) => {
                let _ = reply.send(self.status());
            }
            ApiRequest::Command {
                module,
                command,
                reply,
            } => {
                self.command(ModuleId(module), command, Some(reply));
            }
        }
    }

    fn execute(&mut self, effect: Effect) {
        match effect {
            Effect::Broadcast(snapshot) => {
                self.net.send_heartbeat(&snapshot);
                self.net.send_channel(ChannelMessage::Snapshot(snapshot));
            }
            Effect::RunScript { module, step, call } => self.run_script(module, step, call),
            Effect::AbortScripts { module } => {
                if let Some(runner) = self.runners.get(module.0) {
                    runner.abort_all();
                }
            }
            Effect::AcquireVips { module, step } => self.move_vips(module, step, true),
            Effect::ReleaseVips { module, step } => self.move_vips(module, step, false),
            Effect::SyncData { module, step } => self.replication.sync(module, step),
            Effect::SetWritable { module, writable } => {
                self.replication.set_writable(module, writable);
                let message = if writable {
                    "replicated data writable on this node"
                } else {
                    "replicated data fenced: writes refused on this node"
                };
                self.module_log(module, tandem_scripts::Level::Info, message);
            }
            Effect::Persist { module, record } => {
                let name = self.config.modules[module.0].name().to_owned();
                if let Err(error) = self.state.store(&name, &record) {
                    // Without durable state the safety rules cannot be kept: stop at once, so the
                    // peer takes over, rather than run on an unrecorded claim.
                    tracing::error!("{error:#}");
                    self.module_log(
                        module,
                        tandem_scripts::Level::Error,
                        &format!("FATAL: cannot persist the module state: {error:#}"),
                    );
                    std::process::exit(70);
                }
                self.replication.on_persisted(module, &record);
            }
            Effect::Log {
                module,
                level,
                message,
            } => {
                let level = match level {
                    Level::Info => tandem_scripts::Level::Info,
                    Level::Warn => tandem_scripts::Level::Warn,
                    Level::Error => tandem_scripts::Level::Error,
                };
                match module {
                    Some(module) => self.module_log(module, level, &message),
                    None => {
                        for logs in self.logs.iter() {
                            logs.write(level, &message);
                        }
                    }
                }
            }
            Effect::StateChanged {
                module,
                state,
                ready,
            } => {
                let name = self.config.modules[module.0].name().to_owned();
                self.module_log(
                    module,
                    tandem_scripts::Level::Info,
                    &format!(
                        "local state {state} {}",
                        if ready { "ready" } else { "transient" }
                    ),
                );
                let _ = self.events.send(tandem_api::Event::State {
                    module: name,
                    state: state.as_str().to_owned(),
                    ready,
                });
                if state == tandem_core::State::Stop && ready {
                    self.replication.unmount(module);
                }
            }
            Effect::Reply { request, result } => {
                if let Some(reply) = self.pending.remove(&request) {
                    let _ = reply.send(result);
                }
            }
        }
    }

    fn module_log(&self, module: ModuleId, level: tandem_scripts::Level, message: &str) {
        if let Some(logs) = self.logs.get(module.0) {
            logs.write(level, message);
        }
    }

    fn run_script(&self, module: ModuleId, step: StepId, call: ScriptCall) {
        let Some(runner) = self.runners.get(module.0).cloned() else {
            return;
        };
        let logs = self.logs[module.0].clone();
        let finished = self.finished.clone();
        let mut args = Vec::new();
        if call.force {
            args.push("force".to_owned());
        }
        args.extend([
            call.current.as_str().to_owned(),
            call.next.as_str().to_owned(),
            call.action.as_str().to_owned(),
        ]);
        let request = ScriptRequest {
            name: call.script.file_name().to_owned(),
            args: args.clone(),
            timeout: call.timeout,
            vars: vec![
                ("TANDEM_STATE".to_owned(), call.current.as_str().to_owned()),
                (
                    "TANDEM_NEXT_STATE".to_owned(),
                    call.next.as_str().to_owned(),
                ),
                ("TANDEM_ACTION".to_owned(), call.action.as_str().to_owned()),
            ],
        };
        self.tasks.spawn(async move {
            let report = runner.run(request).await;
            let summary = format!(
                "script {} {}: {} in {} ms",
                report.name,
                args.join(" "),
                report.outcome,
                report.duration.as_millis()
            );
            let outcome = match &report.outcome {
                tandem_scripts::ScriptOutcome::Missing => {
                    tracing::debug!("{summary}");
                    Outcome::Ok
                }
                tandem_scripts::ScriptOutcome::Exited { code: 0 } => {
                    logs.write(tandem_scripts::Level::Info, &summary);
                    Outcome::Ok
                }
                tandem_scripts::ScriptOutcome::TimedOut => {
                    logs.write(tandem_scripts::Level::Error, &summary);
                    Outcome::TimedOut
                }
                other => {
                    logs.write(tandem_scripts::Level::Error, &summary);
                    Outcome::Failed(other.to_string())
                }
            };
            let _ = finished
                .send(Finished {
                    module,
                    step,
                    outcome,
                })
                .await;
        });
    }

    fn move_vips(&mut self, module: ModuleId, step: StepId, acquire: bool) {
        let specs = self.vip_specs.get(module.0).cloned().unwrap_or_default();
        let vips = Arc::clone(&self.vips);
        let logs = self.logs[module.0].clone();
        let finished = self.finished.clone();
        let lock = Arc::clone(&self.vip_locks[module.0]);
        // Taken now, in the loop, so that moves start in the order they were asked for.
        let guard = Arc::clone(&lock).try_lock_owned();
        self.tasks.spawn(async move {
            let _guard = match guard {
                Ok(guard) => guard,
                Err(_) => lock.lock_owned().await,
            };
            let mut outcome = Outcome::Ok;
            for spec in &specs {
                let started = Instant::now();
                let result = if acquire {
                    vips.acquire(spec).await.map(|report| {
                        format!(
                            "virtual IP {}/{} set on {} in {} ms{}",
                            spec.addr,
                            spec.prefix,
                            report.interface,
                            started.elapsed().as_millis(),
                            if spec.gratuitous_arp {
                                " (announced)"
                            } else {
                                ""
                            }
                        )
                    })
                } else {
                    vips.release(spec).await.map(|_| {
                        format!(
                            "virtual IP {}/{} removed in {} ms",
                            spec.addr,
                            spec.prefix,
                            started.elapsed().as_millis()
                        )
                    })
                };
                match result {
                    Ok(message) => logs.write(tandem_scripts::Level::Info, &message),
                    Err(error) => {
                        let message = format!(
                            "virtual IP {}/{}: {} failed: {error}",
                            spec.addr,
                            spec.prefix,
                            if acquire { "adding" } else { "removing" }
                        );
                        logs.write(tandem_scripts::Level::Error, &message);
                        outcome = Outcome::Failed(message);
                        if acquire {
                            break;
                        }
                    }
                }
            }
            let _ = finished
                .send(Finished {
                    module,
                    step,
                    outcome,
                })
                .await;
        });
    }

    fn status(&self) -> tandem_api::Status {
        let status: NodeStatus = self.node.status();
        let now = self.now();
        let wall_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let modules = status
            .modules
            .iter()
            .zip(&self.config.modules)
            .enumerate()
            .map(|(index, (module, module_config))| {
                let vips: Vec<tandem_api::VipStatus> = module_config
                    .vips
                    .iter()
                    .map(|vip| tandem_api::VipStatus {
                        addr: format!("{}/{}", vip.addr, vip.prefix),
                        held: module.vip_held,
                    })
                    .collect();
                tandem_api::ModuleStatus {
                    name: module.name.clone(),
                    state: module.state.as_str().to_owned(),
                    ready: module.ready,
                    peer: tandem_api::PeerModule {
                        name: module.peer.name.clone(),
                        state: if module.peer.reachable {
                            Some(
                                module
                                    .peer
                                    .state
                                    .map(|state| state.as_str())
                                    .unwrap_or("STOP")
                                    .to_owned(),
                            )
                        } else {
                            None
                        },
                        ready: module.peer.ready || module.peer.state.is_none(),
                        reachable: module.peer.reachable,
                        uptodate: module
                            .peer
                            .claim
                            .filter(|_| module.peer.reachable)
                            .map(|claim| up_to_date(claim, module.peer.state)),
                    },
                    uptodate: up_to_date(module.claim, Some(module.state)),
                    data: module.claim.as_str().to_owned(),
                    writable: module.primary_role,
                    epoch: module.epoch,
                    vip: vips.first().cloned(),
                    vips,
                    replication: self.replication.status(ModuleId(index)),
                    resync: tandem_api::ResyncStatus::default(),
                    failover: module.failover,
                    waiting_for: module.waiting_for.clone(),
                    held: module.held.clone(),
                    running: module.running_step.clone(),
                    last_transition: module.last_transition.as_ref().map(|transition| {
                        let ago =
                            u64::try_from(now.since(transition.at).as_millis()).unwrap_or(u64::MAX);
                        tandem_api::Transition {
                            from: transition.from.as_str().to_owned(),
                            to: transition.to.as_str().to_owned(),
                            reason: transition.reason.clone(),
                            at_unix_ms: wall_now.saturating_sub(ago),
                        }
                    }),
                }
            })
            .collect();
        tandem_api::Status {
            node: self.node_name.clone(),
            cluster: self.config.cluster.name.clone(),
            peer: tandem_api::PeerNode {
                name: status.peer.clone(),
                reachable: status.peer_alive,
                channel: self.channel_up,
                networks: self
                    .last_heard
                    .iter()
                    .map(|heard| {
                        heard.map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
                    })
                    .collect(),
            },
            witness: None,
            modules,
        }
    }
}

/// The `uptodate` flag of the status: an exclusive claim, or a shared one while the pair is
/// connected in PRIM/SECOND. A node that left the pair with a shared claim may be stale: the peer
/// may have gone on alone, so it is not shown (nor treated) as up to date.
fn up_to_date(claim: tandem_core::Claim, state: Option<tandem_core::State>) -> bool {
    use tandem_core::{Claim, State};
    match claim {
        Claim::Exclusive => true,
        Claim::Shared => matches!(state, Some(State::Prim | State::Second | State::Alone)),
        Claim::Fresh | Claim::Stale => false,
    }
}

fn boottime_nanos() -> u64 {
    // CLOCK_BOOTTIME exists on every Linux this runs on; 0 would only make time stand still.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|spec| {
            u64::try_from(spec.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(spec.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

fn open_logs(
    config: &Config,
    events: &broadcast::Sender<tandem_api::Event>,
) -> Result<Vec<ModuleLogs>> {
    config
        .modules
        .iter()
        .map(|module| {
            let directory = config.daemon.log_dir.join(module.name());
            std::fs::create_dir_all(&directory).with_context(|| {
                format!("cannot create the log directory {}", directory.display())
            })?;
            Ok(ModuleLogs {
                name: module.name().to_owned(),
                module: ModuleLog::open(directory.join("module.log")).with_context(|| {
                    format!("cannot open the module log in {}", directory.display())
                })?,
                app: AppLog::open(directory.join("app.log")).with_context(|| {
                    format!("cannot open the application log in {}", directory.display())
                })?,
                events: events.clone(),
            })
        })
        .collect()
}

/// The environment of a module's scripts (the per-call state variables come with each call).
pub(crate) fn script_env(
    config: &Config,
    module: &ModuleConfig,
    node: &str,
    peer: &str,
) -> ScriptEnv {
    let binary_dir = std::env::current_exe()
        .ok()
        .and_then(|path| path.parent().map(PathBuf::from))
        .map(|dir| dir.display().to_string())
        .unwrap_or_default();
    let path = format!(
        "{binary_dir}:{}",
        std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        })
    );
    let mut vars = vec![
        ("TANDEM_MODULE".to_owned(), module.name().to_owned()),
        ("TANDEM_NODE".to_owned(), node.to_owned()),
        ("TANDEM_PEER".to_owned(), peer.to_owned()),
        (
            "TANDEM_CONFIG".to_owned(),
            config.path.display().to_string(),
        ),
        (
            "TANDEM_MODULE_DIR".to_owned(),
            module.scripts_dir.display().to_string(),
        ),
        (
            "TANDEM_SOCKET".to_owned(),
            config.daemon.socket.display().to_string(),
        ),
        (
            "TANDEM_LOG_DIR".to_owned(),
            config
                .daemon
                .log_dir
                .join(module.name())
                .display()
                .to_string(),
        ),
        ("PATH".to_owned(), path),
    ];
    if let Some(vip) = module.vips.first() {
        vars.push(("TANDEM_VIP".to_owned(), vip.addr.to_string()));
    }
    let replicated: Vec<String> = module
        .replicated
        .iter()
        .map(|dir| dir.dir.display().to_string())
        .collect();
    vars.push(("TANDEM_REPLICATED".to_owned(), replicated.join(":")));
    ScriptEnv {
        scripts_dir: module.scripts_dir.clone(),
        vars,
        nofile: None,
    }
}

fn resolve_node_name(config: &Config, explicit: Option<&str>) -> Result<String> {
    if let Some(name) = explicit.or(config.this_node.as_deref()) {
        if config.node(name).is_none() {
            bail!(
                "node {name:?} is not configured in {}; configured nodes: {}",
                config.path.display(),
                config
                    .nodes
                    .iter()
                    .map(|node| node.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return Ok(name.to_owned());
    }
    let local_addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("cannot list the local addresses")?
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    Ok(config
        .local_node(&local_addrs)
        .map_err(|error| anyhow::anyhow!("{error}"))?
        .name
        .clone())
}
