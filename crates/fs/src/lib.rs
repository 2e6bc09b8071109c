//! tandem-fs: the replicating filesystem, mounted in place over a module's data directory.
//!
//! # What it does
//!
//! [`Mount::mount_in_place`] opens the directory (an `O_PATH` handle) *before* mounting, then
//! mounts a FUSE filesystem over the same path. Applications keep using the same path; every real
//! I/O goes through the handle with `*at` system calls (one name relative to a directory
//! descriptor, with `O_NOFOLLOW`/`RESOLVE_NO_SYMLINKS`, or the `/proc/self/fd/N` magic link of a
//! descriptor we hold), so nothing is ever resolved through the mount itself. [`Mount::unmount`]
//! (or dropping the [`Mount`]) removes the mount and the plain directory with all its data is
//! back: nothing is renamed, no symlink is involved, no file is added. If the process dies
//! without unmounting, a small watchdog process detaches the dead mount (see `watchdog.rs`).
//!
//! # Modes
//!
//! [`Mode::Primary`] serves reads and writes. [`Mode::Secondary`] is a read-only view: every
//! mutating operation, and every open for writing, fails with `EROFS`; readers are opened in
//! passthrough mode (the kernel reads the backing file directly, at native speed, and sees what
//! the replication applier writes to the backing directory at once); attributes and entries are
//! not cached (the applier changes them behind the kernel's back). [`Mode::Fenced`] is the core's
//! `SetWritable(false)`: files stay open and readable, and every mutating operation fails with
//! `EROFS` (it may later *hold* operations instead, once the split-brain rules say how long),
//! `fsync` included. On the secondary, `fsync` of a reader succeeds at once and is not a mutation
//! (nothing was written through the mount). [`Mount::set_mode`] switches at run time without unmounting (failover); it returns once every
//! mutation admitted under the old mode has been applied locally.
//!
//! # The mutation path
//!
//! Every mutating operation (write, fallocate, setattr with truncate/chmod/chown/utimens, create,
//! mknod, mkdir, symlink, link, unlink, rmdir, rename with its flags, setxattr/removexattr with
//! POSIX ACLs, fsync/fdatasync of files and directories) goes through one function:
//! 1. **admission**: the mode must allow writes; ordering locks are taken: namespace operations
//!    take the namespace lock exclusively, operations on one inode take the inode's own lock,
//!    then the namespace lock shared (only while naming their target and submitting);
//! 2. a [`Mutation`] describing the operation fully is built, gets a sequence number
//!    ([`Mutation::seq`]) and goes to [`Replicator::submit`] with a [`Completion`];
//! 3. the operation is applied locally, while the replicator works (fsync drops the ordering
//!    locks first: it orders after what was submitted before it, and does not hold back later
//!    writes while the disk flushes);
//! 4. [`Replicator::applied`] hears the local outcome ([`Outcome`]: error, attributes after the
//!    apply, bytes written);
//! 5. the kernel's reply is sent when **both** the local apply and the completion are done, by
//!    whichever finishes last (the FUSE thread does not wait: it goes on with other requests, so
//!    many operations are in flight at once, independent files in parallel).
//!
//! Exclusions: a mutation whose paths all match an `exclude` glob ([`exclude`] module) still goes
//! to the replicator, flagged `replicate: false`; it is served locally and must not be sent.
//!
//! # Failures
//!
//! If the local apply fails, the application gets its errno (after the completion). If the local
//! apply succeeded and the replicator completes with an error, the application's call fails
//! (`EIO`, or the errno of [`ReplicationError::Errno`]) **but the local change stays**: the write
//! is in the local file, the created file exists (its lookup reference and handle are released,
//! so the kernel does not see it until it looks the name up again). The application must treat
//! the region as undefined, as after any `EIO`; the replicator must record the target as dirty
//! (to be resynchronised) or fence the node. A dropped [`Completion`] counts as a failure.
//!
//! # What the replication step needs from this interface
//!
//! - **Ordering.** [`Mutation::seq`] orders conflicting operations as they were applied here:
//!   operations on the same inode, and all namespace operations, among themselves. Operations on
//!   two different files carry no order between them and may be applied in parallel on the peer.
//!   A namespace operation and a data operation on different inodes are unordered too; if the
//!   peer names files by path, it must apply in `seq` order (paths in data operations are
//!   computed under the namespace lock, consistent with `seq`), if it names them by identity, it
//!   may parallelise more.
//! - **Identification.** Open design question for the lead. Each mutation carries its target
//!   both by identity ([`NodeRef`]: FUSE node id and generation, backing `(st_dev, st_ino)`, file
//!   handle for data operations) and by name ([`EntryRef`]: parent node and name, and the path
//!   relative to the root when known). Paths alone break for files unlinked while open and for
//!   hard links; identities mean nothing on the peer, so a map from primary identity to the peer's
//!   file (filled by create/mknod/mkdir/symlink/link via [`Outcome::attr`], by lookups, or by a
//!   resync) is the likely answer. The outcome's `attr` also carries the primary's `mtime`/`ctime`
//!   for the peer to copy (times set explicitly by `utimensat` are already explicit in
//!   [`Op::SetAttr`]).
//! - **Durability.** [`Op::Fsync`] must complete only when everything submitted before it for
//!   that inode (lower `seq`) is durable on the peer. [`Op::Write`] carries [`SyncMode`] from the
//!   handle's `O_SYNC`/`O_DSYNC`: such writes complete only when durable on the peer. Local
//!   durability of those is already handled (the backing descriptor is opened with the same flags,
//!   and fsync runs locally). Per-call `RWF_SYNC`/`RWF_DSYNC` flags of `pwritev2` are not visible to
//!   a FUSE filesystem in direct-I/O mode.
//! - **Shared writable mmap** (SQLite's `-shm`): allowed (`FUSE_DIRECT_IO_ALLOW_MMAP`); dirty
//!   pages reach us as ordinary `Write` mutations at writeback or `msync`, not at each store.
//! - **Secondary side.** The applier writes through [`Mount::backing_dir`] (the handle opened
//!   before mounting); after changing metadata or data of an inode the kernel may have cached,
//!   it calls [`Mount::invalidate`] / [`Mount::invalidate_entry`] (passthrough readers need no
//!   invalidation for data).
//!
//! # Open policy and FUSE settings
//!
//! (From the measurements on this kernel in the project's research notes.)
//! - Writers: `FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES`: every `write(2)` reaches us
//!   synchronously, without a page-cache copy; `FUSE_DIRECT_IO_ALLOW_MMAP` is negotiated so that
//!   `mmap` of such files works (SQLite WAL mode needs it).
//! - Readers on the primary: `FOPEN_KEEP_CACHE` (all writes go through the mount, which keeps the
//!   cache right). On the secondary: `FOPEN_PASSTHROUGH` (needs `CAP_SYS_ADMIN`; falls back to
//!   direct reads).
//! - The kernel requires every open of an inode that has a passthrough open to be passthrough
//!   too: such writers get `FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO` with the same backing id (their
//!   writes still reach us; a writable shared mmap of such a handle would bypass us: a documented
//!   hole, only possible on inodes opened for reading on the secondary before a failover).
//! - `max_write`: [`MountOptions::max_write`] (4 MiB by default); the kernel clamps it to
//!   `fs.fuse.max_pages_limit` pages (1 MiB by default; the system setting is not changed here).
//! - No writeback cache; `default_permissions` (the kernel checks permissions), `allow_other`,
//!   `FUSE_POSIX_ACL` and `FUSE_DONT_MASK` (the caller's umask is applied by the backing
//!   filesystem through a per-thread umask, so default ACLs win as POSIX says),
//!   readdirplus, parallel directory operations; `n_threads` worker
//!   threads with cloned `/dev/fuse` descriptors. POSIX locks and `flock` are left to the kernel
//!   (local locking is right: only the primary has writers).
//! - New inodes are created by this process (root) and then given the caller's owner (the
//!   parent's group in a set-group-ID directory).

#![warn(missing_docs)]

mod error;
pub mod exclude;
mod fs;
mod inode;
mod mutation;
mod prefetch;
mod replicator;
mod sys;
mod watchdog;
pub mod writeback;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, INodeNo, SessionACL};
use rustix::fs::{Mode as RMode, OFlags};

pub use error::FsError;
pub use exclude::Exclusions;
pub use mutation::{
    Attr, EntryRef, FileId, Mutation, NodeRef, Op, Outcome, Owner, SyncMode, Timestamp,
};
pub use replicator::{Completion, LocalOnly, ReplicationError, Replicator};

/// What the mount lets local processes do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Read-write; every mutation is replicated.
    Primary,
    /// Read-only view of the replicated tree (`EROFS`); reads at native speed (passthrough).
    Secondary,
    /// The node may not write (the core's `SetWritable(false)`): mutations fail with `EROFS`,
    /// open files stay open.
    Fenced,
}

impl Mode {
    /// Whether mutations are admitted.
    pub fn writable(self) -> bool {
        self == Mode::Primary
    }
}

/// Mount settings.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Initial mode.
    pub mode: Mode,
    /// `exclude` globs relative to the directory (syntax in [`exclude`]).
    pub exclude: Vec<String>,
    /// Largest write request to ask the kernel for (bytes); clamped by the kernel.
    pub max_write: u32,
    /// FUSE worker threads (each with its own cloned `/dev/fuse` descriptor when more than one).
    pub threads: usize,
    /// Fork the watchdog that detaches the mount when this process dies (default true). A
    /// caller that must first stop the writers of a dead mount (the daemon: its guard stops the
    /// application, then calls [`detach_dead_mount`]) turns it off: while the dead mount stays,
    /// every access fails (`ENOTCONN`), so nothing can write to the plain directory unreplicated.
    pub watchdog: bool,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            mode: Mode::Primary,
            exclude: Vec::new(),
            max_write: 4 << 20,
            threads: 2,
            watchdog: true,
        }
    }
}

/// What the kernel agreed to at `FUSE_INIT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `FUSE_PASSTHROUGH` with a stacking depth (passthrough readers possible).
    pub passthrough: bool,
    /// `FUSE_DIRECT_IO_ALLOW_MMAP`.
    pub direct_io_allow_mmap: bool,
    /// `FUSE_POSIX_ACL`.
    pub posix_acl: bool,
    /// `FUSE_DONT_MASK` (we apply the umask).
    pub dont_mask: bool,
    /// `FUSE_DO_READDIRPLUS` and `FUSE_READDIRPLUS_AUTO`.
    pub readdirplus: bool,
    /// `FUSE_PARALLEL_DIROPS`.
    pub parallel_dirops: bool,
    /// `max_write` asked for (the kernel may still clamp it to `fs.fuse.max_pages_limit`).
    pub max_write: u32,
}

/// Counters of a mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Mutations submitted so far.
    pub mutations: u64,
    /// Mutations submitted and not yet replied to.
    pub in_flight: u64,
    /// Mutations whose replication failed.
    pub replication_errors: u64,
    /// Inodes the kernel knows.
    pub inodes: usize,
    /// Open file handles.
    pub open_files: usize,
    /// Descriptors of backing inodes kept open for the inodes the kernel knows (at most
    /// [`Stats::cached_descriptors_max`], plus those pinned by open files).
    pub cached_descriptors: usize,
    /// The bound of [`Stats::cached_descriptors`].
    pub cached_descriptors_max: usize,
    /// Backing inodes reopened from their file handle.
    pub reopened: usize,
    /// Listings read ahead for a tree walk (see `prefetch.rs`).
    pub listings_read_ahead: usize,
    /// Of those, the ones an opening used (the others were dropped: a namespace change came
    /// since their read, or nobody opened them).
    pub listings_ahead_used: usize,
}

/// Detaches the mount at `path` if it is a dead FUSE connection (its server died: every access
/// fails with `ENOTCONN`), so that the plain directory is back. Returns whether it did. A live
/// mount, another filesystem or a missing path are left alone (`Ok(false)`).
pub fn detach_dead_mount(path: &Path) -> io::Result<bool> {
    for _ in 0..100 {
        match rustix::fs::statfs(path) {
            Err(rustix::io::Errno::NOTCONN) => {
                rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH)?;
                return Ok(true);
            }
            // A request in flight when the connection was aborted: ask again.
            Err(rustix::io::Errno::CONNABORTED | rustix::io::Errno::INTR) => continue,
            Err(_) => return Ok(false),
            Ok(_) => return Ok(false),
        }
    }
    Ok(false)
}

/// A frozen mount (see [`Mount::freeze`]); unfreezes when dropped.
pub struct Frozen<'m> {
    gate: RwLockWriteGuard<'m, Mode>,
    shared: &'m fs::Shared,
}

impl Frozen<'_> {
    /// The `seq` the next admitted mutation will get: every mutation below it has been applied
    /// locally, none at or above it has been admitted.
    pub fn next_seq(&self) -> u64 {
        self.shared.next_seq()
    }

    /// The mode (which cannot change while frozen; [`Mount::mode`] would wait for the thaw).
    pub fn mode(&self) -> Mode {
        *self.gate
    }
}

impl std::fmt::Debug for Frozen<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen")
            .field("next_seq", &self.next_seq())
            .finish()
    }
}

/// A mounted replicating filesystem. Dropping it unmounts (errors are logged).
pub struct Mount {
    path: PathBuf,
    shared: Arc<fs::Shared>,
    session: Option<BackgroundSession>,
    watchdog: Option<watchdog::Watchdog>,
    /// `st_dev` of the mount's root, to make sure we only ever unmount our own mount.
    fuse_dev: u64,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("path", &self.path)
            .field("mode", &self.mode())
            .finish()
    }
}

fn dir_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError::Directory {
        path: path.to_owned(),
        source,
    }
}

/// `OVERLAYFS_SUPER_MAGIC`.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

impl Mount {
    /// Mounts the replicating filesystem over `dir`, serving the directory's current contents.
    ///
    /// Needs root (`mount(2)`, passthrough). Refuses a directory that already is a tandem mount.
    pub fn mount_in_place(
        dir: &Path,
        options: MountOptions,
        replicator: Arc<dyn Replicator>,
    ) -> Result<Mount, FsError> {
        let path = dir.canonicalize().map_err(dir_err(dir))?;
        if is_tandem_mount(&path) {
            return Err(FsError::AlreadyMounted(path));
        }
        let exclude = Exclusions::new(&options.exclude)?;
        // The handle to the underlying directory, opened before the mount hides it.
        let root_fd = rustix::fs::open(
            &path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            RMode::empty(),
        )
        .map_err(|e| dir_err(&path)(e.into()))?;
        let root_stat = sys::stat_fd(root_fd.as_fd()).map_err(dir_err(&path))?;
        let statfs = rustix::fs::fstatfs(&root_fd).map_err(|e| dir_err(&path)(e.into()))?;
        let statvfs = rustix::fs::fstatvfs(&root_fd).map_err(|e| dir_err(&path)(e.into()))?;
        // Passthrough stacking: one level above ext4/xfs, two above overlayfs.
        let stack_depth = if statfs.f_type as i64 == OVERLAYFS_SUPER_MAGIC {
            2
        } else {
            1
        };
        let threads = options.threads.max(1);
        let shared = Arc::new(fs::Shared::new(
            root_fd,
            &root_stat,
            options.mode,
            replicator,
            exclude,
            options.max_write.max(4096),
            stack_depth,
        ));

        let mount_err = |source: io::Error| FsError::Mount {
            path: path.clone(),
            source,
        };
        let dev_fuse =
            rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, RMode::empty())
                .map_err(|e| mount_err(e.into()))?;
        // Mirror the underlying mount's nosuid/nodev/noexec: the mount must not widen them.
        let mut flags = rustix::mount::MountFlags::empty();
        let vf = statvfs.f_flag;
        if vf.contains(rustix::fs::StatVfsMountFlags::NOSUID) {
            flags |= rustix::mount::MountFlags::NOSUID;
        }
        if vf.contains(rustix::fs::StatVfsMountFlags::NODEV) {
            flags |= rustix::mount::MountFlags::NODEV;
        }
        if vf.contains(rustix::fs::StatVfsMountFlags::NOEXEC) {
            flags |= rustix::mount::MountFlags::NOEXEC;
        }
        let data = format!(
            "fd={},rootmode={:o},user_id={},group_id={},default_permissions,allow_other",
            dev_fuse.as_raw_fd(),
            root_stat.st_mode & (libc::S_IFMT | 0o7777),
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        let data = CString::new(data).map_err(|_| mount_err(io::ErrorKind::InvalidInput.into()))?;
        rustix::mount::mount("tandem", &path, "fuse.tandem", flags, data.as_c_str())
            .map_err(|e| mount_err(e.into()))?;

        // From here on, failures must remove the mount again.
        let mut config = Config::default();
        config.acl = SessionACL::All;
        config.n_threads = Some(threads);
        config.clone_fd = threads > 1;
        let fs = fs::Fs(shared.clone());
        let session = match fuser::Session::from_fd(fs, dev_fuse, SessionACL::All, config) {
            Ok(s) => s,
            Err(e) => {
                let _ = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH);
                return Err(mount_err(e));
            }
        };
        let _ = shared.notifier.set(session.notifier());
        let session = match session.spawn() {
            Ok(s) => s,
            Err(e) => {
                let _ = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH);
                return Err(mount_err(e));
            }
        };
        let fuse_dev = match rustix::fs::stat(&path) {
            Ok(st) => st.st_dev,
            Err(e) => {
                let _ = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH);
                return Err(mount_err(e.into()));
            }
        };
        let watchdog = if options.watchdog {
            match watchdog::Watchdog::start(&path) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "no unmount watchdog");
                    None
                }
            }
        } else {
            None
        };
        tracing::info!(path = %path.display(), mode = ?options.mode, "tandem-fs mounted");
        Ok(Mount {
            path,
            shared,
            session: Some(session),
            watchdog,
            fuse_dev,
        })
    }

    /// The mount point (canonical path of the directory).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Switches the mode without unmounting; returns once no mutation admitted under the old
    /// mode is still being applied locally.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.set_mode(mode);
    }

    /// Freezes the tree: waits until every mutation admitted so far has been applied locally and
    /// holds back new ones (their callers wait) until the returned guard is dropped. Meanwhile
    /// the backing directory does not change through the mount, so it can be copied as a
    /// consistent whole (the full synchronisation of a secondary); reads go on. Do not call
    /// [`Mount::set_mode`] or [`Mount::mode`] on the same thread while frozen (use
    /// [`Frozen::mode`]).
    pub fn freeze(&self) -> Frozen<'_> {
        let gate = write(&self.shared.gate);
        Frozen {
            gate,
            shared: &self.shared,
        }
    }

    /// The handle to the underlying directory (`O_PATH`), opened before mounting: the way to
    /// reach the real files (the applier on the secondary; never the mount point's path).
    pub fn backing_dir(&self) -> BorrowedFd<'_> {
        self.shared.table.root_fd()
    }

    /// What the kernel agreed to at initialisation.
    pub fn negotiated(&self) -> Negotiated {
        self.shared.negotiated.get().copied().unwrap_or_default()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Tells the kernel to drop its cached attributes and data of a backing inode, if it knows
    /// it (after the applier changed it behind the mount).
    pub fn invalidate(&self, id: FileId) {
        if let (Some(nodeid), Some(n)) =
            (self.shared.table.nodeid_of(id), self.shared.notifier.get())
        {
            let _ = n.inval_inode(INodeNo(nodeid), 0, 0);
        }
    }

    /// Tells the kernel to forget its cached entry `name` in the directory `parent` (after the
    /// applier created, removed or renamed it behind the mount).
    pub fn invalidate_entry(&self, parent: FileId, name: &OsStr) {
        if let (Some(nodeid), Some(n)) = (
            self.shared.table.nodeid_of(parent),
            self.shared.notifier.get(),
        ) {
            let _ = n.inval_entry(INodeNo(nodeid), name);
        }
    }

    /// Unmounts and waits for the FUSE session to end; the plain directory is back.
    ///
    /// While files are open or a process has its working directory inside, the kernel refuses
    /// (`EBUSY`); this retries for a short while, then detaches the mount lazily: new lookups see
    /// the plain directory at once, and every request through what remains open fails (`EIO`), so
    /// nothing can write through this mount any more.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FsError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let unmount_err = |source: io::Error| FsError::Unmount {
            path: self.path.clone(),
            source,
        };
        // Only ever unmount our own mount: the path's top mount must still be it (or a dead FUSE
        // connection, which answers ENOTCONN: ours, if our session died).
        let ours = match rustix::fs::stat(&self.path) {
            Ok(st) => st.st_dev == self.fuse_dev,
            Err(rustix::io::Errno::NOTCONN | rustix::io::Errno::CONNABORTED) => {
                self.shared.closed.store(true, Ordering::Relaxed);
                rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH)
                    .map_err(|e| unmount_err(e.into()))?;
                drop(self.watchdog.take());
                drop(session);
                return Ok(());
            }
            Err(_) => false,
        };
        if !ours {
            tracing::warn!(path = %self.path.display(), "tandem mount already gone");
            self.shared.closed.store(true, Ordering::Relaxed);
            drop(self.watchdog.take());
            drop(session);
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let lazy = loop {
            match rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => break false,
                Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(rustix::io::Errno::BUSY) => {
                    self.shared.closed.store(true, Ordering::Relaxed);
                    rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH)
                        .map_err(|e| unmount_err(e.into()))?;
                    break true;
                }
                Err(e) => return Err(unmount_err(e.into())),
            }
        };
        drop(self.watchdog.take());
        if lazy {
            // The session ends when the last open file closes; its thread exits on its own.
            tracing::warn!(path = %self.path.display(), "busy: mount detached lazily");
            drop(session);
            return Ok(());
        }
        self.shared.closed.store(true, Ordering::Relaxed);
        tracing::info!(path = %self.path.display(), "tandem-fs unmounted");
        match session.join() {
            // The unmount above ended the connection; a worker thread reading the device at that
            // moment may be told so with ECONNABORTED instead of ENODEV (seen once in ~2,000
            // unmounts under load): the same, expected end.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                tracing::debug!(path = %self.path.display(), "session ended: connection aborted");
                Ok(())
            }
            other => other.map_err(FsError::Session),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(path = %self.path.display(), error = %e, "unmount on drop failed");
        }
    }
}

/// Whether the top mount at `path` is a tandem mount (from `/proc/self/mountinfo`).
fn is_tandem_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let target = path.as_os_str().as_bytes();
    info.split(|b| *b == b'\n').any(|line| {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            return false;
        };
        fields
            .get(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == target)
            && fields.get(sep + 1).is_some_and(|t| *t == b"fuse.tandem")
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space...).
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 3 < field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (field[i + 1] - b'0') * 64 + (field[i + 2] - b'0') * 8 + (field[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(br"/a\040b"), b"/a b".to_vec());
        assert_eq!(unescape_mountinfo(br"/plain"), b"/plain".to_vec());
        assert_eq!(unescape_mountinfo(br"/x\04"), br"/x\04".to_vec());
    }

    #[test]
    fn timestamps_round_trip() {
        use std::time::{SystemTime, UNIX_EPOCH};
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH,
        ] {
            let ts = Timestamp::from(t);
            assert!(ts.nsec < 1_000_000_000);
            assert_eq!(SystemTime::from(ts), t);
        }
        assert_eq!(
            Timestamp::from(UNIX_EPOCH - Duration::new(5, 250_000_000)),
            Timestamp {
                sec: -6,
                nsec: 750_000_000
            }
        );
    }
}
