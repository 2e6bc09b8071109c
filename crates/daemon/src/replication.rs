//! The replication adapter: the module's replicated directories, their mounts, and the
//! replication stream to the peer (see `docs/replication.md`).
//!
//! # Lifecycle of a module's directories
//!
//! - **Start** (a start command while the module is in STOP): every `[[module.replicated]]`
//!   directory is mounted in place with `tandem-fs`, read-only ([`Mode::Secondary`]) until the
//!   core allows writes. A directory that cannot be mounted refuses the command.
//! - **`SetWritable(true)`**: the mounts switch to [`Mode::Primary`]; a receiver still applying
//!   a stream from the old primary is stopped first (it applied everything the old primary had
//!   acknowledged: acknowledgements follow the apply).
//! - **`SetWritable(false)`**: the mounts switch to [`Mode::Fenced`] and writes held for a lost
//!   secondary fail (they were never acknowledged).
//! - **`SyncData`** (the node becomes secondary): the mounts switch to [`Mode::Secondary`], then,
//!   for each directory, this node dials the peer (the primary), asks for the directory, receives
//!   a full copy of it and keeps the connection as the replication stream it applies. The step is
//!   done when every directory is copied and streaming.
//! - **STOP**: receivers and replicators are closed and the mounts removed: the plain
//!   directories are back, with the data.
//!
//! # The primary's side
//!
//! Every mount's replicator is a [`Switch`]: mutations go to its current target, either *local*
//! (no secondary: completed at once; the new data generation persisted when the node went ALONE
//! is the record that the secondary needs a resynchronisation) or a [`NetReplicator`] streaming
//! to the secondary. A synchronisation request from the peer (accepted on the channel port)
//! freezes the mount, copies the tree, starts a [`NetReplicator`] at the mount's next `seq` on
//! the same connection, switches the target and unfreezes; no mutation falls between the copy
//! and the stream.
//!
//! # Loss of the secondary
//!
//! A [`NetReplicator`] that gets no acknowledgement within the replication timeout (or whose
//! connection fails) *holds* its writes and the core hears `ReplicationChanged { connected:
//! false }`. The core answers by persisting a new data generation with the `exclusive` claim
//! (PRIM -> ALONE, or a new generation in ALONE); once such a record is durable
//! ([`Replication::on_persisted`]), the held writes are completed (recorded locally) and the
//! target becomes local. A primary that does not go ALONE keeps holding them until it is fenced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::Receiver as StdReceiver;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tandem_config::{Config, ModuleConfig};
use tandem_core::{Claim, ModuleId, Persisted, StepId};
use tandem_fs::{
    Completion, Exclusions, FileId, Mode, Mount, MountOptions, Mutation, Outcome, Replicator,
};
use tandem_net::ReplicationStream;
use tandem_replica::transport::Connection;
use tandem_replica::wire::Record;
use tandem_replica::{
    Applier, NetOptions, NetReplicator, Receiver, ReplicationState, Security, fullsync,
};
use tokio::sync::mpsc::UnboundedSender;

/// How long a secondary keeps asking a primary that refuses (not ready yet) or cannot be reached.
const SYNC_PATIENCE: Duration = Duration::from_secs(30);
/// Pause between two attempts.
const SYNC_RETRY: Duration = Duration::from_millis(300);
/// The secondary's read timeout while it receives a copy (the primary sends continuously).
const SYNC_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the replication adapter reports to the driver's loop.
#[derive(Debug)]
pub(crate) enum ReplicationEvent {
    /// The module's replication is connected and caught up, or not.
    Connected { module: ModuleId, connected: bool },
    /// A `SyncData` step finished.
    Synced {
        module: ModuleId,
        step: StepId,
        result: Result<(), String>,
    },
    /// A line for the module log.
    Log {
        module: ModuleId,
        level: tandem_scripts::Level,
        message: String,
    },
}

type Events = UnboundedSender<ReplicationEvent>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections only replace fields: a poisoned lock is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a mount's mutations go.
enum Target {
    /// No secondary: completed at once.
    Local,
    /// Streamed to the secondary.
    Net {
        replicator: Arc<NetReplicator>,
        /// The first `seq` sent on this stream (outcomes of earlier ones are not sent).
        first_seq: u64,
        /// The data generation when the stream started: writes held after a loss are released
        /// once a higher generation with the `exclusive` claim is persisted.
        generation: u64,
    },
}

/// The replicator of one mount: forwards to the current [`Target`].
struct Switch {
    target: RwLock<Target>,
}

impl Switch {
    fn target(&self) -> std::sync::RwLockReadGuard<'_, Target> {
        self.target.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, target: Target) -> Target {
        let mut guard = self.target.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *guard, target)
    }

    fn net(&self) -> Option<(Arc<NetReplicator>, u64)> {
        match &*self.target() {
            Target::Net {
                replicator,
                generation,
                ..
            } => Some((replicator.clone(), *generation)),
            Target::Local => None,
        }
    }
}

impl Replicator for Switch {
    fn submit(&self, mutation: &Mutation<'_>, done: Completion) {
        match &*self.target() {
            Target::Local => done.complete(Ok(())),
            Target::Net { replicator, .. } => replicator.submit(mutation, done),
        }
    }

    fn applied(&self, seq: u64, outcome: &Outcome) {
        if let Target::Net {
            replicator,
            first_seq,
            ..
        } = &*self.target()
            && seq >= *first_seq
        {
            replicator.applied(seq, outcome);
        }
    }

    fn forget(&self, id: FileId) {
        if let Target::Net { replicator, .. } = &*self.target() {
            replicator.forget(id);
        }
    }
}

/// One replicated directory of a module.
struct Dir {
    path: PathBuf,
    exclude: Vec<String>,
    switch: Arc<Switch>,
    mount: Option<Arc<Mount>>,
    /// The stream applied here while secondary.
    receiver: Option<Receiver>,
}

/// The replication state of one module.
struct ModuleState {
    name: String,
    dirs: Vec<Dir>,
    /// The last persisted record (claim and generation).
    record: Persisted,
    /// The last connection state reported to the core.
    reported: Option<bool>,
    /// A `SyncData` is running (its thread holds this number).
    sync: Option<u64>,
}

struct Inner {
    modules: Vec<Mutex<ModuleState>>,
    by_name: HashMap<String, usize>,
    security: Security,
    peer: SocketAddr,
    events: Events,
    timeout: Duration,
    next_sync: std::sync::atomic::AtomicU64,
}

/// The replication adapter of the daemon (see the module documentation).
#[derive(Clone)]
pub(crate) struct Replication {
    inner: Arc<Inner>,
}

impl Replication {
    pub(crate) fn new(
        config: &Config,
        records: &[Persisted],
        peer: SocketAddr,
        events: Events,
    ) -> Replication {
        let security = if config.cluster.plaintext_replication {
            Security::Plaintext
        } else {
            Security::Noise {
                secret: config.cluster.secret.clone(),
            }
        };
        let modules = config
            .modules
            .iter()
            .zip(records)
            .map(|(module, record)| Mutex::new(ModuleState::new(module, record.clone())))
            .collect();
        let by_name = config
            .modules
            .iter()
            .enumerate()
            .map(|(index, module)| (module.name().to_owned(), index))
            .collect();
        Replication {
            inner: Arc::new(Inner {
                modules,
                by_name,
                security,
                peer,
                events,
                // The replication timeout: the heartbeat timeout, so that a silent secondary is
                // noticed about when a silent peer would be.
                timeout: config.heartbeat.timeout,
                next_sync: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    /// Whether the module has replicated directories.
    pub(crate) fn replicates(&self, module: ModuleId) -> bool {
        self.inner
            .modules
            .get(module.0)
            .is_some_and(|m| !lock(m).dirs.is_empty())
    }

    /// Serves synchronisation requests from the peer (a thread per connection).
    pub(crate) fn serve(&self, streams: StdReceiver<ReplicationStream>) {
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tandem-repl-accept".into())
            .spawn(move || {
                for incoming in streams {
                    let this = this.clone();
                    let from = incoming.from;
                    let spawned = std::thread::Builder::new()
                        .name("tandem-repl-serve".into())
                        .spawn(move || this.serve_one(incoming));
                    if let Err(error) = spawned {
                        tracing::error!(%from, "cannot serve a replication connection: {error}");
                    }
                }
            });
        if let Err(error) = spawned {
            tracing::error!("cannot start the replication listener: {error}");
        }
    }

    /// Mounts the module's directories (read-only until writable). Called before the core
    /// hears a start command; an error refuses the command.
    pub(crate) fn mount(&self, module: ModuleId) -> Result<(), String> {
        let Some(state) = self.inner.modules.get(module.0) else {
            return Ok(());
        };
        let mut state = lock(state);
        let name = state.name.clone();
        let mut mounted = Vec::new();
        for dir in &mut state.dirs {
            if dir.mount.is_some() {
                continue;
            }
            // A dead mount left by a daemon that died (its guard may not have run).
            match tandem_fs::detach_dead_mount(&dir.path) {
                Ok(true) => tracing::warn!(path = %dir.path.display(), "detached a dead mount"),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(path = %dir.path.display(), "cannot detach a dead mount: {error}");
                }
            }
            let options = MountOptions {
                mode: Mode::Secondary,
                exclude: dir.exclude.clone(),
                // When the daemon dies, its guard stops the application first and only then
                // detaches the dead mount: the application never writes to the plain directory
                // behind replication's back.
                watchdog: false,
                ..MountOptions::default()
            };
            match Mount::mount_in_place(&dir.path, options, dir.switch.clone()) {
                Ok(mount) => {
                    mounted.push(dir.path.display().to_string());
                    dir.mount = Some(Arc::new(mount));
                }
                Err(error) => {
                    let message = format!(
                        "cannot mount the replicated directory {}: {error}",
                        dir.path.display()
                    );
                    drop(state);
                    self.unmount(module);
                    return Err(message);
                }
            }
        }
        drop(state);
        if !mounted.is_empty() {
            self.log(
                module,
                tandem_scripts::Level::Info,
                format!(
                    "module {name}: replicated directories mounted: {}",
                    mounted.join(", ")
                ),
            );
        }
        Ok(())
    }

    /// Removes the module's mounts (the module reached STOP): the plain directories are back.
    pub(crate) fn unmount(&self, module: ModuleId) {
        let Some(state) = self.inner.modules.get(module.0) else {
            return;
        };
        let mut dirs = Vec::new();
        {
            let mut state = lock(state);
            state.sync = None;
            for dir in &mut state.dirs {
                let receiver = dir.receiver.take();
                let mount = dir.mount.take();
                let old = dir.switch.set(Target::Local);
                dirs.push((dir.path.clone(), receiver, mount, old));
            }
        }
        for (path, receiver, mount, old) in dirs {
            drop(receiver);
            if let Target::Net { replicator, .. } = old {
                // Nothing is written any more (the application is stopped): close cleanly.
                replicator.fail_all();
                replicator.close();
            }
            if let Some(mount) = mount {
                match Arc::try_unwrap(mount) {
                    Ok(mount) => match mount.unmount() {
                        Ok(()) => self.log(
                            module,
                            tandem_scripts::Level::Info,
                            format!("replicated directory {} unmounted", path.display()),
                        ),
                        Err(error) => self.log(
                            module,
                            tandem_scripts::Level::Error,
                            format!("cannot unmount {}: {error}", path.display()),
                        ),
                    },
                    // A synchronisation thread still holds it: it unmounts when it lets go.
                    Err(mount) => {
                        tracing::warn!(path = %path.display(), "mount still in use, unmounted later");
                        drop(mount);
                    }
                }
            }
        }
        self.report(module, None);
    }

    /// The core's `SetWritable`.
    pub(crate) fn set_writable(&self, module: ModuleId, writable: bool) {
        let Some(state) = self.inner.modules.get(module.0) else {
            return;
        };
        let mut state = lock(state);
        for dir in &mut state.dirs {
            if writable {
                // Everything the old primary acknowledged was applied before its ack: the rest
                // was never acknowledged and may go.
                drop(dir.receiver.take());
                // A stream that ended (its writes failed or were recorded) is not used again:
                // the core allows writes again only with a record that covers them (a new
                // generation when alone); a live or holding stream stays.
                if let Some((replicator, _)) = dir.switch.net()
                    && matches!(
                        replicator.state(),
                        ReplicationState::Failed | ReplicationState::RecordingLocally
                    )
                {
                    dir.switch.set(Target::Local);
                }
            } else if let Some((replicator, _)) = dir.switch.net()
                && replicator.state() == ReplicationState::Holding
            {
                replicator.fail_all();
            }
            if let Some(mount) = &dir.mount {
                mount.set_mode(if writable {
                    Mode::Primary
                } else {
                    Mode::Fenced
                });
            }
        }
    }

    /// A record was persisted (durably) for the module: releases writes held for a lost
    /// secondary once a new generation with the `exclusive` claim is on disk.
    pub(crate) fn on_persisted(&self, module: ModuleId, record: &Persisted) {
        let Some(state) = self.inner.modules.get(module.0) else {
            return;
        };
        let mut state = lock(state);
        state.record = record.clone();
        self.release_held(module, &mut state);
    }

    fn release_held(&self, module: ModuleId, state: &mut ModuleState) {
        if state.record.claim != Claim::Exclusive {
            return;
        }
        for dir in &state.dirs {
            let Some((replicator, generation)) = dir.switch.net() else {
                continue;
            };
            if replicator.state() == ReplicationState::Holding
                && state.record.generation > generation
            {
                let held = replicator.stats().in_flight;
                replicator.record_locally();
                dir.switch.set(Target::Local);
                self.log(
                    module,
                    tandem_scripts::Level::Warn,
                    format!(
                        "replication of {} stopped: {held} writes held for the lost secondary \
                         completed alone (data generation {} recorded; the secondary will be \
                         resynchronised)",
                        dir.path.display(),
                        state.record.generation
                    ),
                );
            }
        }
    }

    /// The core's `SyncData`: makes this node a secondary of the peer for every directory.
    pub(crate) fn sync(&self, module: ModuleId, step: StepId) {
        let Some(state) = self.inner.modules.get(module.0) else {
            return;
        };
        let id = self
            .inner
            .next_sync
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut state = lock(state);
            if state.dirs.is_empty() {
                drop(state);
                self.send(ReplicationEvent::Synced {
                    module,
                    step,
                    result: Ok(()),
                });
                return;
            }
            state.sync = Some(id);
            let mut old = Vec::new();
            for dir in &mut state.dirs {
                drop(dir.receiver.take());
                if let Some(mount) = &dir.mount {
                    mount.set_mode(Mode::Secondary);
                }
                // A stream this node sent as primary (before a swap) is over: nothing is written
                // here any more, and a later promotion starts without a peer.
                old.push(dir.switch.set(Target::Local));
            }
            drop(state);
            for target in old {
                if let Target::Net { replicator, .. } = target {
                    replicator.fail_all();
                    replicator.close();
                }
            }
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tandem-repl-sync".into())
            .spawn(move || {
                let result = this.sync_all(module, id);
                if let Err(error) = &result {
                    this.log(
                        module,
                        tandem_scripts::Level::Error,
                        format!("synchronisation from the peer failed: {error}"),
                    );
                }
                this.send(ReplicationEvent::Synced {
                    module,
                    step,
                    result,
                });
            });
        if let Err(error) = spawned {
            self.send(ReplicationEvent::Synced {
                module,
                step,
                result: Err(format!("cannot start the synchronisation: {error}")),
            });
        }
    }

    fn sync_all(&self, module: ModuleId, id: u64) -> Result<(), String> {
        let state = &self.inner.modules[module.0];
        let (name, count) = {
            let state = lock(state);
            (state.name.clone(), state.dirs.len())
        };
        for index in 0..count {
            let (path, exclude, mount) = {
                let state = lock(state);
                if state.sync != Some(id) {
                    return Err("abandoned".into());
                }
                let dir = &state.dirs[index];
                (dir.path.clone(), dir.exclude.clone(), dir.mount.clone())
            };
            let mount = mount.ok_or_else(|| format!("{} is not mounted", path.display()))?;
            let exclusions = Exclusions::new(&exclude).map_err(|e| e.to_string())?;
            let started = Instant::now();
            let deadline = started + SYNC_PATIENCE;
            let mut last_why = String::new();
            let (conn, stats, next_seq) = loop {
                match self.sync_dir(&name, index, &mount, &exclusions) {
                    Ok(done) => break done,
                    Err(SyncAttempt::Retry(why)) if Instant::now() < deadline => {
                        if why != last_why {
                            self.log(
                                module,
                                tandem_scripts::Level::Info,
                                format!(
                                    "synchronisation of {} from the peer: {why}; trying again",
                                    path.display()
                                ),
                            );
                            last_why = why;
                        }
                        std::thread::sleep(SYNC_RETRY);
                        if lock(state).sync != Some(id) {
                            return Err("abandoned".into());
                        }
                    }
                    Err(SyncAttempt::Retry(why) | SyncAttempt::Fatal(why)) => {
                        return Err(format!("{}: {why}", path.display()));
                    }
                }
            };
            let root = mount
                .backing_dir()
                .try_clone_to_owned()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let receiver = Receiver::start(conn, Applier::new(root), next_seq)
                .map_err(|e| format!("{}: replication stream: {e}", path.display()))?;
            self.log(
                module,
                tandem_scripts::Level::Info,
                format!(
                    "{} synchronised from the peer: {} entries, {} bytes in {:.1} s; \
                     replication stream started",
                    path.display(),
                    stats.entries,
                    stats.bytes,
                    started.elapsed().as_secs_f64()
                ),
            );
            let mut state = lock(state);
            if state.sync != Some(id) {
                return Err("abandoned".into());
            }
            state.dirs[index].receiver = Some(receiver);
        }
        lock(state).sync = None;
        Ok(())
    }

    /// One attempt to copy directory `index` of module `name` from the peer.
    fn sync_dir(
        &self,
        name: &str,
        index: usize,
        mount: &Mount,
        exclusions: &Exclusions,
    ) -> Result<(Connection, fullsync::SyncStats, u64), SyncAttempt> {
        let retry = |e: &dyn std::fmt::Display| SyncAttempt::Retry(e.to_string());
        let mut conn =
            Connection::dial(self.inner.peer, &self.inner.security).map_err(|e| retry(&e))?;
        conn.set_read_timeout(Some(SYNC_READ_TIMEOUT))
            .map_err(|e| retry(&e))?;
        conn.send(&Record::SyncRequest {
            module: name.to_owned(),
            dir: u32::try_from(index).unwrap_or(u32::MAX),
        })
        .map_err(|e| retry(&e))?;
        let (stats, next_seq) = fullsync::receive_tree(mount.backing_dir(), exclusions, &mut conn)
            .map_err(|e| match e {
                fullsync::SyncError::Refused(why) => {
                    SyncAttempt::Retry(format!("the peer refused the synchronisation: {why}"))
                }
                other => SyncAttempt::Fatal(other.to_string()),
            })?;
        conn.set_read_timeout(None).map_err(|e| retry(&e))?;
        Ok((conn, stats, next_seq))
    }

    /// Serves one replication connection from the peer: a synchronisation request.
    fn serve_one(&self, incoming: ReplicationStream) {
        let from = incoming.from;
        let mut conn = match Connection::accept(incoming.stream, &self.inner.security) {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%from, "replication connection refused: {error}");
                for index in 0..self.inner.modules.len() {
                    self.log(
                        ModuleId(index),
                        tandem_scripts::Level::Warn,
                        format!("refused a replication connection from {from}: {error}"),
                    );
                }
                return;
            }
        };
        let _ = conn.set_read_timeout(Some(SYNC_READ_TIMEOUT));
        // A stuck secondary must not keep the mount frozen.
        let _ = conn.set_write_timeout(Some(SYNC_READ_TIMEOUT));
        let (module, dir) = match conn.recv() {
            Ok(Record::SyncRequest { module, dir }) => (module, dir),
            Ok(other) => {
                tracing::warn!(%from, "replication connection: unexpected {other:?}");
                return;
            }
            Err(error) => {
                tracing::warn!(%from, "replication connection: {error}");
                return;
            }
        };
        let Some(&index) = self.inner.by_name.get(&module) else {
            refuse(&mut conn, format!("no module {module:?} here"));
            return;
        };
        let id = ModuleId(index);
        if let Err(why) = self.serve_sync(id, dir as usize, conn) {
            self.log(
                id,
                tandem_scripts::Level::Warn,
                format!("synchronisation of the peer not served: {why}"),
            );
        }
    }

    fn serve_sync(
        &self,
        module: ModuleId,
        index: usize,
        mut conn: Connection,
    ) -> Result<(), String> {
        let state = &self.inner.modules[module.0];
        let (path, exclude, mount, switch) = {
            let state = lock(state);
            let Some(dir) = state.dirs.get(index) else {
                refuse(&mut conn, format!("no replicated directory {index}"));
                return Err(format!(
                    "the peer asked for directory {index}, which does not exist"
                ));
            };
            let Some(mount) = dir.mount.clone() else {
                refuse(&mut conn, "the module is not running here".into());
                return Ok(());
            };
            if mount.mode() != Mode::Primary {
                refuse(&mut conn, "this node is not primary (yet)".into());
                return Ok(());
            }
            if let Some((replicator, _)) = dir.switch.net() {
                match replicator.state() {
                    ReplicationState::Replicating => {
                        // The secondary starts over: its previous stream is lost.
                        replicator.abort("the secondary asked for a new synchronisation");
                        refuse(&mut conn, "the previous stream is being closed".into());
                        return Ok(());
                    }
                    ReplicationState::Holding => {
                        refuse(
                            &mut conn,
                            "writes are held for the lost stream: waiting for the new data \
                             generation"
                                .into(),
                        );
                        return Ok(());
                    }
                    ReplicationState::RecordingLocally | ReplicationState::Failed => {}
                }
            }
            (
                dir.path.clone(),
                dir.exclude.clone(),
                mount,
                dir.switch.clone(),
            )
        };
        let exclusions = Exclusions::new(&exclude).map_err(|e| e.to_string())?;
        let started = Instant::now();
        // The tree must not change between the copy and the start of the stream.
        let frozen = mount.freeze();
        if frozen.mode() != Mode::Primary {
            drop(frozen);
            refuse(&mut conn, "this node is no longer primary".into());
            return Ok(());
        }
        let next_seq = frozen.next_seq();
        let stats = fullsync::send_tree(mount.backing_dir(), &exclusions, next_seq, &mut conn)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = conn.set_read_timeout(None);
        let _ = conn.set_write_timeout(None);
        let generation = lock(state).record.generation;
        let this = self.clone();
        let lost_path = path.clone();
        let replicator = NetReplicator::start(
            conn,
            next_seq,
            NetOptions {
                timeout: self.inner.timeout,
                ..NetOptions::new(self.inner.security.clone())
            },
            move |lost| this.on_lost(module, &lost_path, lost),
        )
        .map_err(|e| format!("{}: replication stream: {e}", path.display()))?;
        switch.set(Target::Net {
            replicator: Arc::new(replicator),
            first_seq: next_seq,
            generation,
        });
        drop(frozen);
        self.log(
            module,
            tandem_scripts::Level::Info,
            format!(
                "{} copied to the peer ({} entries, {} bytes in {:.1} s, writes paused \
                 meanwhile); replication started",
                path.display(),
                stats.entries,
                stats.bytes,
                started.elapsed().as_secs_f64()
            ),
        );
        self.update_connected(module);
        Ok(())
    }

    /// A [`NetReplicator`]'s loss (from its thread).
    fn on_lost(&self, module: ModuleId, path: &std::path::Path, lost: &tandem_replica::Lost) {
        self.log(
            module,
            tandem_scripts::Level::Warn,
            format!(
                "replication of {} lost: {} ({} writes held until the loss is recorded)",
                path.display(),
                lost.reason,
                lost.held
            ),
        );
        // Not from this thread: the module state may be locked by whoever caused the loss.
        let this = self.clone();
        let _ = std::thread::Builder::new()
            .name("tandem-repl-lost".into())
            .spawn(move || {
                this.update_connected(module);
                let Some(state) = this.inner.modules.get(module.0) else {
                    return;
                };
                let mut state = lock(state);
                this.release_held(module, &mut state);
            });
    }

    /// Reports the module's connection state to the core when it changed.
    fn update_connected(&self, module: ModuleId) {
        let Some(state) = self.inner.modules.get(module.0) else {
            return;
        };
        let connected = {
            let state = lock(state);
            state.dirs.iter().all(|dir| {
                dir.switch
                    .net()
                    .is_some_and(|(r, _)| r.state() == ReplicationState::Replicating)
            })
        };
        self.report(module, Some(connected));
    }

    fn report(&self, module: ModuleId, connected: Option<bool>) {
        let Some(state) = self.inner.modules.get(module.0) else {
            return;
        };
        let connected = connected.unwrap_or(false);
        let changed = {
            let mut state = lock(state);
            if state.dirs.is_empty() {
                return;
            }
            let changed = state.reported != Some(connected);
            state.reported = Some(connected);
            changed
        };
        if changed {
            self.send(ReplicationEvent::Connected { module, connected });
        }
    }

    /// Figures for `tandem status`.
    pub(crate) fn status(&self, module: ModuleId) -> tandem_api::ReplicationStatus {
        let mut status = tandem_api::ReplicationStatus::default();
        let Some(state) = self.inner.modules.get(module.0) else {
            return status;
        };
        let state = lock(state);
        status.directories = state.dirs.len();
        let mut latency_sum = 0;
        let mut acks = 0;
        for dir in &state.dirs {
            if let Some((replicator, _)) = dir.switch.net() {
                let stats = replicator.stats();
                status.active |= replicator.state() == ReplicationState::Replicating;
                status.inflight_ops += stats.in_flight;
                status.inflight_bytes += stats.in_flight_bytes;
                status.bytes_per_second += stats.bytes_per_second;
                latency_sum += stats.ack_micros;
                acks += stats.acks;
            }
        }
        status.ack_latency_us = latency_sum.checked_div(acks).unwrap_or(0);
        status
    }

    fn log(&self, module: ModuleId, level: tandem_scripts::Level, message: String) {
        self.send(ReplicationEvent::Log {
            module,
            level,
            message,
        });
    }

    fn send(&self, event: ReplicationEvent) {
        // The loop is gone only when the daemon exits.
        let _ = self.inner.events.send(event);
    }
}

enum SyncAttempt {
    /// Try again (the primary is not ready, not reachable yet).
    Retry(String),
    /// Give up.
    Fatal(String),
}

fn refuse(conn: &mut Connection, reason: String) {
    let _ = conn.send(&Record::SyncRefused { reason });
}

impl ModuleState {
    fn new(module: &ModuleConfig, record: Persisted) -> ModuleState {
        ModuleState {
            name: module.name().to_owned(),
            dirs: module
                .replicated
                .iter()
                .map(|r| Dir {
                    path: r.dir.clone(),
                    exclude: r.exclude.clone(),
                    switch: Arc::new(Switch {
                        target: RwLock::new(Target::Local),
                    }),
                    mount: None,
                    receiver: None,
                })
                .collect(),
            record,
            reported: None,
            sync: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_magic_is_the_same_on_both_sides() {
        assert_eq!(
            &tandem_net::REPLICATION_MAGIC,
            tandem_replica::transport::MAGIC
        );
    }
}
