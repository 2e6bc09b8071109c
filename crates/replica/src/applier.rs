//! The secondary's applier: applies decoded mutations to a backing directory.
//!
//! Every system call is relative to a descriptor: the root handle given by the caller (opened
//! `O_PATH | O_DIRECTORY` before the secondary's mount hid the directory), or a handle of the
//! table. Paths are resolved below the root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` and names are single components, so nothing ever follows a symlink or
//! leaves the directory, whatever the stream says.
//!
//! # Identification
//!
//! The table maps the primary's [`FileId`] of a file to the local file: its kernel file handle,
//! from which an `O_PATH` descriptor and, for regular files, a read-write one are opened when a
//! mutation needs them and kept in a bounded cache ([`FdCache`]), so the descriptors of the
//! applier stay few however many files the table holds. A file unlinked here while the primary
//! may still use it keeps its descriptor (pinned) until the primary forgets it: nothing else
//! keeps its inode alive. On a filesystem without file handles every entry keeps its descriptor.
//! A mutation's target
//! is looked up in the table first; on a miss it is resolved by its root-relative path and added.
//! New inodes are added under the primary's identity when the primary's outcome arrives
//! ([`Applier::apply_outcome`]: the identity is in its attributes). Before a name disappears
//! (unlink, rmdir, rename over it), the inode behind it is added too, so a file unlinked while
//! open stays reachable. [`Applier::forget`] drops an entry (the primary's `Forget`).
//!
//! # Results and divergence
//!
//! [`Applier::apply`] returns the local result (`Ok` or an errno); the caller acknowledges with
//! it. The primary's local outcome arrives separately ([`Applier::apply_outcome`]): the applier
//! then compares both results. A difference (the primary succeeded and this node failed, or the
//! opposite, or a different errno, or a different number of bytes written) is a
//! [`Divergence`]: the two nodes may now differ on the targets it names, which the caller marks
//! dirty (to be resynchronised). With the outcome, the applier also sets the target's
//! `atime`/`mtime` to the primary's, so that both replicas carry the same times.
//!
//! # Ordering and parallelism
//!
//! The applier is `Sync`: its table and pending results are behind locks, and every operation
//! names its own descriptors. The caller decides the order; applying namespace operations in
//! `seq` order and data operations of one file in `seq` order is enough. Data operations on
//! different files may run in parallel on several threads (between two namespace operations).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, FallocateFlags, Mode, OFlags, RenameFlags};
use tandem_backing::{CacheStats, FdCache, FileHandle, Slot, Slots};
use tandem_fs::writeback::{self, SyncHistory};
use tandem_fs::{EntryRef, FileId, Mutation, NodeRef, Op, Outcome, Owner, SyncMode};

use crate::lock;
use crate::sys::{self, XattrPath, os};

/// Mutations kept waiting for the primary's outcome at most (the oldest are dropped beyond it:
/// an outcome that never came, e.g. the primary died).
const MAX_PENDING: usize = 1 << 16;

/// The result of one mutation on the secondary differs from the primary's local outcome: both
/// nodes may now differ on the files it names, which must be marked dirty (resynchronised).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "divergence at seq {seq} ({kind}): primary {primary:?}, secondary {secondary:?}{}",
    detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
)]
pub struct Divergence {
    /// The mutation.
    pub seq: u64,
    /// Its kind (`"write"`, `"rename"`...).
    pub kind: &'static str,
    /// The primary's errno (`None`: it succeeded).
    pub primary: Option<i32>,
    /// This node's errno (`None`: it succeeded).
    pub secondary: Option<i32>,
    /// The primary's identities of the files involved.
    pub ids: Vec<FileId>,
    /// The root-relative paths involved, when known.
    pub paths: Vec<PathBuf>,
    /// What else differs (bytes written, times not applied).
    pub detail: Option<String>,
}

/// One file of the table.
struct Node {
    /// The local inode's file handle; `None`: its `O_PATH` descriptor is pinned in `path`.
    handle: Option<FileHandle>,
    /// Where its `O_PATH` descriptor is kept (slot [`PATH`]).
    path: Slot,
    /// Where the read-write descriptor of a regular file is kept (slot [`FILE`]).
    file: Slot,
    /// `st_mode & S_IFMT`.
    kind: u32,
    /// Highest `seq` whose primary times were copied to this inode.
    times_seq: AtomicU64,
    /// When the file was last synced here (flush-behind, see [`tandem_fs::writeback`]).
    syncs: SyncHistory,
}

/// The slot of a node's `O_PATH` descriptor.
const PATH: u8 = 0;
/// The slot of a regular file's read-write descriptor.
const FILE: u8 = 1;

impl Slots for Node {
    fn slot(&self, index: u8) -> &Slot {
        if index == PATH {
            &self.path
        } else {
            &self.file
        }
    }
}

/// Descriptors the applier keeps open for the files of its table, at most (besides pinned ones).
pub const CACHED_DESCRIPTORS: usize = 256;

/// What the primary's outcome of a mutation is compared with.
struct Pending {
    kind: &'static str,
    result: Result<(), i32>,
    written: Option<u64>,
    /// The inode whose times the outcome's attributes set.
    target: Option<Arc<Node>>,
    /// The target is a new inode: add it to the table under the outcome's identity.
    created: bool,
    ids: Vec<FileId>,
    paths: Vec<PathBuf>,
}

/// Collected while applying one mutation.
#[derive(Default)]
struct Effects {
    /// Bytes of a write's data already written by [`Applier::write_ahead`] (skipped here).
    preapplied: usize,
    written: Option<u64>,
    target: Option<Arc<Node>>,
    created: bool,
}

/// Applies mutations to a backing directory. See the module documentation.
pub struct Applier {
    root: OwnedFd,
    /// A descriptor of the root that `open_by_handle_at` accepts (not `O_PATH`); `None` when the
    /// filesystem has no file handles.
    mount: Option<OwnedFd>,
    /// Its `st_dev`: only its inodes are reopened from handles.
    dev: u64,
    cache: FdCache,
    table: Mutex<HashMap<FileId, Arc<Node>>>,
    pending: Mutex<BTreeMap<u64, Pending>>,
    /// Writes to recently synced files whose writeback [`Applier::start_writebacks`] starts.
    behind: Mutex<Vec<Behind>>,
}

/// A range of a file to write back early (see [`tandem_fs::writeback`]).
struct Behind {
    file: Arc<OwnedFd>,
    offset: u64,
    len: u64,
}

/// Writes kept for [`Applier::start_writebacks`] at most (a hint: more are dropped).
const MAX_BEHIND: usize = 1024;

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("root", &self.root)
            .field("table", &self.table_len())
            .field("pending", &lock(&self.pending).len())
            .finish()
    }
}

impl Applier {
    /// An applier writing below `root`, a descriptor of the backing directory (`O_PATH |
    /// O_DIRECTORY` is enough).
    pub fn new(root: OwnedFd) -> Applier {
        Self::with_cache(root, CACHED_DESCRIPTORS)
    }

    /// [`Applier::new`] keeping at most `cached` descriptors open for the files of its table.
    pub fn with_cache(root: OwnedFd, cached: usize) -> Applier {
        let mount = sys::open_dir(root.as_fd())
            .and_then(|dir| FileHandle::of_fd(dir.as_fd()).map(|_| dir))
            .inspect_err(|e| {
                tracing::warn!(
                    "the backing filesystem gives no file handles ({e}): the applier keeps a \
                     descriptor open for every file it knows"
                );
            })
            .ok();
        let dev = sys::stat_fd(root.as_fd()).map(|st| st.st_dev).unwrap_or(0);
        Applier {
            root,
            mount,
            dev,
            cache: FdCache::new(cached),
            table: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            behind: Mutex::new(Vec::new()),
        }
    }

    /// Opens `dir` (`O_PATH | O_DIRECTORY`) and returns an applier writing below it.
    pub fn open(dir: &Path) -> std::io::Result<Applier> {
        let root = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Applier::new(root))
    }

    /// The root descriptor.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Number of files in the table.
    pub fn table_len(&self) -> usize {
        lock(&self.table).len()
    }

    /// The descriptor cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// A node for the inode `fd` (an `O_PATH` descriptor) refers to.
    fn new_node(&self, fd: OwnedFd) -> io::Result<Arc<Node>> {
        let st = sys::stat_fd(fd.as_fd())?;
        let handle = match &self.mount {
            Some(_) if st.st_dev == self.dev => FileHandle::of_fd(fd.as_fd()).ok(),
            _ => None,
        };
        let (path, cached) = match handle {
            None => (Slot::with(Arc::new(fd), true), None),
            Some(_) => (Slot::default(), Some(fd)),
        };
        let node = Arc::new(Node {
            handle,
            path,
            file: Slot::default(),
            kind: st.st_mode & libc::S_IFMT,
            times_seq: AtomicU64::new(0),
            syncs: SyncHistory::new(),
        });
        if let Some(fd) = cached {
            self.cache.insert(&node, PATH, fd);
        }
        Ok(node)
    }

    /// The `O_PATH` descriptor of a node (kept open while the caller holds it).
    fn path_fd(&self, node: &Arc<Node>) -> io::Result<Arc<OwnedFd>> {
        match (&node.handle, &self.mount) {
            (Some(handle), Some(mount)) => self.cache.get(node, PATH, || {
                handle.open(mount.as_fd(), OFlags::PATH | OFlags::NOFOLLOW)
            }),
            _ => node.path.get().ok_or_else(|| os(libc::ESTALE)),
        }
    }

    /// The read-write descriptor of a regular file.
    fn file(&self, node: &Arc<Node>) -> io::Result<Arc<OwnedFd>> {
        match node.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(os(libc::EISDIR)),
            _ => return Err(os(libc::EINVAL)),
        }
        self.cache.get(node, FILE, || {
            let path = self.path_fd(node)?;
            sys::reopen(path.as_fd(), OFlags::RDWR)
        })
    }

    /// Number of mutations waiting for the primary's outcome.
    pub fn pending_len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Applies one mutation; returns `Ok` or this node's errno. Keeps what the primary's outcome
    /// will be compared with ([`Applier::apply_outcome`]). Mutations with `replicate == false`
    /// must not be given (they are not sent).
    pub fn apply(&self, m: &Mutation<'_>) -> Result<(), i32> {
        self.apply_after(m, 0)
    }

    /// [`Applier::apply`] of a write whose first `preapplied` bytes of data were already
    /// written by [`Applier::write_ahead`] while the rest of its frame arrived: only the rest is
    /// written, and the result counts all of it. `preapplied` is ignored for other operations.
    pub fn apply_after(&self, m: &Mutation<'_>, preapplied: usize) -> Result<(), i32> {
        let mut fx = Effects {
            preapplied,
            ..Effects::default()
        };
        let result = self.apply_op(&m.op, &mut fx).map_err(|e| sys::errno(&e));
        let (ids, paths) = involved(&m.op);
        let mut pending = lock(&self.pending);
        pending.insert(
            m.seq,
            Pending {
                kind: m.kind(),
                result,
                written: fx.written,
                target: fx.target,
                created: fx.created,
                ids,
                paths,
            },
        );
        while pending.len() > MAX_PENDING {
            pending.pop_first();
        }
        result
    }

    /// Writes `data` at `offset` of the file `node`: the first part of a large write, applied
    /// while the rest of its frame is still arriving (the caller makes sure the write is the next
    /// mutation in `seq` order). Returns how many bytes were written (fewer than `data` when
    /// the file system wrote less); [`Applier::apply_after`] then writes the rest and reports
    /// the result, errors included.
    pub fn write_ahead(&self, node: &NodeRef, offset: u64, data: &[u8]) -> Result<usize, i32> {
        let f = self
            .node(node)
            .and_then(|n| self.file(&n))
            .map_err(|e| sys::errno(&e))?;
        match sys::pwrite_all(f.as_fd(), data, offset) {
            (0, Some(e)) => Err(sys::errno(&e)),
            (written, _) => Ok(written),
        }
    }

    /// The primary's local outcome of mutation `seq` (after [`Applier::apply`] of it): compares
    /// the results, adds a new inode to the table, copies the primary's `atime`/`mtime`.
    /// Outcomes of mutations not applied here are ignored.
    pub fn apply_outcome(&self, seq: u64, outcome: &Outcome) -> Result<(), Divergence> {
        let Some(p) = lock(&self.pending).remove(&seq) else {
            return Ok(());
        };
        let diverged = |detail: Option<String>| Divergence {
            seq,
            kind: p.kind,
            primary: outcome.error,
            secondary: p.result.err(),
            ids: p.ids.clone(),
            paths: p.paths.clone(),
            detail,
        };
        if outcome.error != p.result.err() {
            return Err(diverged(None));
        }
        if outcome.error.is_some() {
            return Ok(());
        }
        if let (Some(primary), Some(local)) = (outcome.written, p.written)
            && primary != local
        {
            return Err(diverged(Some(format!(
                "{primary} bytes written on the primary, {local} here"
            ))));
        }
        // The directories whose entries changed: their times moved on the primary too.
        for dir in &outcome.dirs {
            let node = lock(&self.table).get(&dir.id).cloned();
            if let Some(node) = node
                && node.kind == libc::S_IFDIR
                && node.times_seq.fetch_max(seq, Ordering::AcqRel) < seq
                && let Err(e) = self.path_fd(&node).and_then(|fd| {
                    sys::set_times(fd.as_fd(), Some(dir.atime.into()), Some(dir.mtime.into()))
                })
            {
                return Err(diverged(Some(format!(
                    "directory times not copied: errno {e}"
                ))));
            }
        }
        let (Some(attr), Some(node)) = (outcome.attr, p.target.as_ref()) else {
            return Ok(());
        };
        if p.created {
            lock(&self.table).insert(attr.id, node.clone());
        }
        if node.times_seq.fetch_max(seq, Ordering::AcqRel) < seq
            && let Err(e) = self.path_fd(node).and_then(|fd| {
                sys::set_times(fd.as_fd(), Some(attr.atime.into()), Some(attr.mtime.into()))
            })
        {
            return Err(diverged(Some(format!("times not copied: errno {e}"))));
        }
        Ok(())
    }

    /// Starts the writeback of the writes applied since the last call to files synced recently
    /// (flush-behind, see [`tandem_fs::writeback`]): their `fsync` is likely on its way. Call it
    /// after acknowledging them (it costs the time to queue the I/O). Returns how many ranges.
    pub fn start_writebacks(&self) -> usize {
        let behind = std::mem::take(&mut *lock(&self.behind));
        for b in &behind {
            writeback::start_writeback(b.file.as_fd(), b.offset, b.len);
        }
        behind.len()
    }

    /// The primary no longer names the inode `id`: drops its entry (and its descriptors).
    pub fn forget(&self, id: FileId) {
        lock(&self.table).remove(&id);
    }

    // ------------------------------------------------------------------------ identification

    /// The local file of a primary node: the table, else its path (then it is added).
    fn node(&self, r: &NodeRef) -> io::Result<Arc<Node>> {
        if let Some(n) = lock(&self.table).get(&r.id) {
            return Ok(n.clone());
        }
        let path = r.path.as_deref().ok_or_else(|| os(libc::ESTALE))?;
        let node = self.new_node(sys::open_path_beneath(self.root.as_fd(), path)?)?;
        Ok(lock(&self.table).entry(r.id).or_insert(node).clone())
    }

    /// A directory node.
    fn dir(&self, r: &NodeRef) -> io::Result<Arc<Node>> {
        let n = self.node(r)?;
        if n.kind != libc::S_IFDIR {
            return Err(os(libc::ENOTDIR));
        }
        Ok(n)
    }

    /// The parent directory and the (validated) name of an entry.
    fn entry<'e>(&self, e: &'e EntryRef<'_>) -> io::Result<(Arc<Node>, &'e OsStr)> {
        if !sys::valid_name(&e.name) {
            return Err(os(libc::EINVAL));
        }
        Ok((self.dir(&e.parent)?, e.name.as_ref()))
    }

    /// Adds the inode at `name` in `dir` to the table under `id` (when not there yet), before the
    /// name goes, and pins its descriptor until the primary forgets it: it may be open on the
    /// primary and still be written, and nothing else keeps it alive here once unlinked.
    fn keep(&self, dir: &Arc<Node>, name: &OsStr, id: Option<FileId>) {
        let Some(id) = id else { return };
        let known = lock(&self.table).get(&id).cloned();
        let node = match known {
            Some(node) => node,
            None => {
                let Ok(node) = self
                    .path_fd(dir)
                    .and_then(|d| sys::open_path_at(d.as_fd(), name))
                    .and_then(|fd| self.new_node(fd))
                else {
                    return;
                };
                lock(&self.table).entry(id).or_insert(node).clone()
            }
        };
        if !node.path.is_pinned() && self.path_fd(&node).is_ok() {
            node.path.pin();
        }
    }

    // ------------------------------------------------------------------------ operations

    fn apply_op(&self, op: &Op<'_>, fx: &mut Effects) -> io::Result<()> {
        match op {
            Op::Write {
                node,
                offset,
                data,
                sync,
                kill_suidgid,
                ..
            } => {
                let n = self.node(node)?;
                fx.target = Some(n.clone());
                let f = self.file(&n)?;
                let skip = fx.preapplied.min(data.len());
                let (rest, err) =
                    sys::pwrite_all(f.as_fd(), &data[skip..], offset.saturating_add(skip as u64));
                let written = skip + rest;
                fx.written = Some(written as u64);
                if written == 0
                    && let Some(e) = err
                {
                    return Err(e);
                }
                if *kill_suidgid {
                    let m = sys::stat_fd(f.as_fd())?.st_mode;
                    let kill = libc::S_ISUID
                        | if m & libc::S_IXGRP != 0 {
                            libc::S_ISGID
                        } else {
                            0
                        };
                    if m & kill != 0 {
                        sys::set_mode(f.as_fd(), m & !kill)?;
                    }
                }
                match sync {
                    SyncMode::None => {
                        if n.syncs.recently_synced() {
                            let mut behind = lock(&self.behind);
                            if behind.len() < MAX_BEHIND {
                                behind.push(Behind {
                                    file: f.clone(),
                                    offset: *offset,
                                    len: written as u64,
                                });
                            }
                        }
                    }
                    SyncMode::Data => rustix::fs::fdatasync(&*f).map_err(io::Error::from)?,
                    SyncMode::Full => rustix::fs::fsync(&*f).map_err(io::Error::from)?,
                }
                Ok(())
            }
            Op::Fallocate {
                node,
                mode,
                offset,
                len,
                ..
            } => {
                let n = self.node(node)?;
                fx.target = Some(n.clone());
                let f = self.file(&n)?;
                rustix::fs::fallocate(
                    &*f,
                    FallocateFlags::from_bits_retain(*mode as _),
                    *offset,
                    *len,
                )
                .map_err(io::Error::from)
            }
            Op::SetAttr {
                node,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                ..
            } => {
                // The primary's order: size, owner, mode, times.
                let n = self.node(node)?;
                fx.target = Some(n.clone());
                if let Some(size) = size {
                    let f = match n.kind {
                        libc::S_IFREG => self.file(&n)?,
                        _ => Arc::new(sys::reopen(self.path_fd(&n)?.as_fd(), OFlags::WRONLY)?),
                    };
                    rustix::fs::ftruncate(&*f, *size).map_err(io::Error::from)?;
                }
                let fd = self.path_fd(&n)?;
                if uid.is_some() || gid.is_some() {
                    sys::set_owner(fd.as_fd(), *uid, *gid)?;
                }
                if let Some(mode) = mode {
                    if n.kind == libc::S_IFLNK {
                        return Err(os(libc::EOPNOTSUPP));
                    }
                    sys::set_mode(fd.as_fd(), *mode)?;
                }
                if atime.is_some() || mtime.is_some() {
                    sys::set_times(fd.as_fd(), atime.map(Into::into), mtime.map(Into::into))?;
                }
                Ok(())
            }
            Op::Create {
                entry,
                mode,
                umask,
                owner,
                ..
            } => {
                let (dir, name) = self.entry(entry)?;
                // O_EXCL as on the primary: the name was free there.
                let flags = OFlags::RDWR
                    | OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NOCTTY;
                let dfd = self.path_fd(&dir)?;
                let (res, own_umask) = sys::with_umask(*umask, || {
                    rustix::fs::openat(&*dfd, name, flags, Mode::from_raw_mode(mode & 0o7777))
                });
                let file = res.map_err(io::Error::from)?;
                if !own_umask {
                    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & !umask & 0o7777))
                        .map_err(io::Error::from)?;
                }
                give_owner(file.as_fd(), *owner)?;
                let node = self.new_node(sys::open_path_at(dfd.as_fd(), name)?)?;
                self.cache.insert(&node, FILE, file);
                fx.target = Some(node);
                fx.created = true;
                Ok(())
            }
            Op::Mknod {
                entry,
                mode,
                umask,
                rdev,
                owner,
            } => self.create_node(entry, *owner, fx, *umask, *mode, |dir, name| {
                rustix::fs::mknodat(
                    dir,
                    name,
                    rustix::fs::FileType::from_raw_mode(*mode),
                    Mode::from_raw_mode(mode & 0o7777),
                    sys::decode_dev(*rdev),
                )
            }),
            Op::Mkdir {
                entry,
                mode,
                umask,
                owner,
            } => self.create_node(entry, *owner, fx, *umask, *mode, |dir, name| {
                rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode & 0o7777))
            }),
            Op::Symlink {
                entry,
                target,
                owner,
            } => {
                if target.as_os_str().is_empty() {
                    return Err(os(libc::ENOENT));
                }
                self.create_node(entry, *owner, fx, 0, libc::S_IFLNK | 0o777, |dir, name| {
                    rustix::fs::symlinkat(target.as_ref(), dir, name)
                })
            }
            Op::Link { node, new } => {
                let n = self.node(node)?;
                let (dir, name) = self.entry(new)?;
                rustix::fs::linkat(
                    &*self.path_fd(&n)?,
                    c"",
                    &*self.path_fd(&dir)?,
                    name,
                    AtFlags::EMPTY_PATH,
                )
                .map_err(io::Error::from)?;
                fx.target = Some(n);
                Ok(())
            }
            Op::Unlink { entry, target } => {
                let (dir, name) = self.entry(entry)?;
                self.keep(&dir, name, *target);
                rustix::fs::unlinkat(&*self.path_fd(&dir)?, name, AtFlags::empty())
                    .map_err(io::Error::from)
            }
            Op::Rmdir { entry, target } => {
                let (dir, name) = self.entry(entry)?;
                self.keep(&dir, name, *target);
                rustix::fs::unlinkat(&*self.path_fd(&dir)?, name, AtFlags::REMOVEDIR)
                    .map_err(io::Error::from)
            }
            Op::Rename {
                from,
                to,
                flags,
                moved,
                replaced,
            } => {
                if from.excluded && !to.excluded {
                    // A file enters the replicated tree from an excluded path: this node does not
                    // have it, only a resynchronisation can bring it.
                    return Err(os(libc::EXDEV));
                }
                let (fdir, fname) = self.entry(from)?;
                let (tdir, tname) = self.entry(to)?;
                self.keep(&fdir, fname, *moved);
                self.keep(&tdir, tname, *replaced);
                let flags = RenameFlags::from_bits_retain(*flags);
                let (ffd, tfd) = (self.path_fd(&fdir)?, self.path_fd(&tdir)?);
                rustix::fs::renameat_with(&*ffd, fname, &*tfd, tname, flags)
                    .map_err(io::Error::from)?;
                if flags.contains(RenameFlags::WHITEOUT) {
                    // The whiteout is a new inode: the outcome carries its times.
                    fx.target = Some(self.new_node(sys::open_path_at(ffd.as_fd(), fname)?)?);
                    fx.created = true;
                }
                Ok(())
            }
            Op::SetXattr {
                node,
                name,
                value,
                flags,
            } => {
                let n = self.node(node)?;
                fx.target = Some(n.clone());
                self.with_xattr_path(node, &n, |p| sys::xattr_set(p, name, value, *flags))
            }
            Op::RemoveXattr { node, name } => {
                let n = self.node(node)?;
                fx.target = Some(n.clone());
                self.with_xattr_path(node, &n, |p| sys::xattr_remove(p, name))
            }
            Op::Fsync { node, datasync, .. } => {
                let n = self.node(node)?;
                match n.kind {
                    libc::S_IFREG => {
                        let f = self.file(&n)?;
                        if *datasync {
                            rustix::fs::fdatasync(&*f).map_err(io::Error::from)?;
                        } else {
                            rustix::fs::fsync(&*f).map_err(io::Error::from)?;
                        }
                        n.syncs.synced();
                        Ok(())
                    }
                    libc::S_IFDIR => {
                        // A directory's entries and the files renamed or created in it may
                        // have been applied in any directory: flush the filesystem.
                        let d = sys::reopen(
                            self.path_fd(&n)?.as_fd(),
                            OFlags::RDONLY | OFlags::DIRECTORY,
                        )?;
                        rustix::fs::syncfs(&d).map_err(io::Error::from)
                    }
                    _ => Err(os(libc::EINVAL)),
                }
            }
        }
    }

    /// mknod, mkdir, symlink: as the primary's `create_node` (umask through the thread's own
    /// umask so that default ACLs apply; created as root, then given the caller's owner).
    fn create_node(
        &self,
        entry: &EntryRef<'_>,
        owner: Owner,
        fx: &mut Effects,
        umask: u32,
        mode: u32,
        make: impl FnOnce(BorrowedFd<'_>, &OsStr) -> rustix::io::Result<()>,
    ) -> io::Result<()> {
        let (dir, name) = self.entry(entry)?;
        let symlink = mode & libc::S_IFMT == libc::S_IFLNK;
        let dfd = self.path_fd(&dir)?;
        let (res, own_umask) = sys::with_umask(umask, || make(dfd.as_fd(), name));
        res.map_err(io::Error::from)?;
        let fd = sys::open_path_at(dfd.as_fd(), name)?;
        if !own_umask && !symlink {
            sys::set_mode(fd.as_fd(), mode & !umask)?;
        }
        give_owner(fd.as_fd(), owner)?;
        fx.target = Some(self.new_node(fd)?);
        fx.created = true;
        Ok(())
    }

    /// Runs an xattr call on the node: through `/proc/self/fd/N`, or for a symlink through its
    /// parent directory and name (the `l*` calls), as the primary does.
    fn with_xattr_path(
        &self,
        r: &NodeRef,
        n: &Arc<Node>,
        f: impl FnOnce(&XattrPath) -> io::Result<()>,
    ) -> io::Result<()> {
        if n.kind != libc::S_IFLNK {
            let fd = self.path_fd(n)?;
            return f(&XattrPath::Follow(sys::proc_path(fd.as_fd())));
        }
        let path = r.path.as_deref().ok_or_else(|| os(libc::EOPNOTSUPP))?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(os(libc::EOPNOTSUPP));
        };
        let dir = sys::open_path_beneath(self.root.as_fd(), parent)?;
        // The name must still be this symlink.
        let st =
            rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)?;
        let own = sys::stat_fd(self.path_fd(n)?.as_fd())?;
        if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino) {
            return Err(os(libc::EOPNOTSUPP));
        }
        let p = sys::proc_entry_path(dir.as_fd(), name)?;
        f(&XattrPath::NoFollow(p))
    }
}

/// Gives a node created here (as root) the caller's owner, keeping the set-ID bits `chown`
/// clears (as the primary does).
fn give_owner(fd: BorrowedFd<'_>, owner: Owner) -> io::Result<()> {
    let st = sys::stat_fd(fd)?;
    if st.st_uid == owner.uid && st.st_gid == owner.gid {
        return Ok(());
    }
    sys::set_owner(fd, Some(owner.uid), Some(owner.gid))?;
    if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
        && st.st_mode & libc::S_IFMT != libc::S_IFLNK
    {
        let after = sys::stat_fd(fd)?;
        if after.st_mode & 0o7777 != st.st_mode & 0o7777 {
            sys::set_mode(fd, st.st_mode)?;
        }
    }
    Ok(())
}

/// The identities and paths a mutation involves (what a divergence marks dirty).
fn involved(op: &Op<'_>) -> (Vec<FileId>, Vec<PathBuf>) {
    let mut ids = Vec::new();
    let mut paths = Vec::new();
    let node = |n: &NodeRef, ids: &mut Vec<FileId>, paths: &mut Vec<PathBuf>| {
        ids.push(n.id);
        paths.extend(n.path.clone());
    };
    let entry = |e: &EntryRef<'_>, paths: &mut Vec<PathBuf>| paths.extend(e.path.clone());
    match op {
        Op::Write { node: n, .. }
        | Op::Fallocate { node: n, .. }
        | Op::SetAttr { node: n, .. }
        | Op::SetXattr { node: n, .. }
        | Op::RemoveXattr { node: n, .. }
        | Op::Fsync { node: n, .. } => node(n, &mut ids, &mut paths),
        Op::Create { entry: e, .. }
        | Op::Mknod { entry: e, .. }
        | Op::Mkdir { entry: e, .. }
        | Op::Symlink { entry: e, .. } => entry(e, &mut paths),
        Op::Link { node: n, new } => {
            node(n, &mut ids, &mut paths);
            entry(new, &mut paths);
        }
        Op::Unlink { entry: e, target } | Op::Rmdir { entry: e, target } => {
            entry(e, &mut paths);
            ids.extend(*target);
        }
        Op::Rename {
            from,
            to,
            moved,
            replaced,
            ..
        } => {
            entry(from, &mut paths);
            entry(to, &mut paths);
            ids.extend(*moved);
            ids.extend(*replaced);
        }
    }
    (ids, paths)
}
