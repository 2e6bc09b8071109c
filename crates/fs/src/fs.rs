//! The FUSE filesystem: serves the backing directory and funnels every mutation through
//! [`Shared::mutate`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{AtFlags, Mode as RMode, OFlags};

use crate::exclude::Exclusions;
use crate::inode::{CACHED_DESCRIPTORS, Inode, InodeTable, OpenState, ROOT};
use crate::mutation::{
    Attr, EntryRef, FileId, Mutation, NodeRef, Op, Outcome, Owner, SyncMode, Timestamp,
};
use crate::prefetch::{self, Prefetch};
use crate::replicator::{Completion, RemoteDone, ReplicationError, Replicator};
use crate::sys::{self, DirEnt, DirReader, XattrPath};
use crate::writeback::{self, SyncHistory};
use crate::{Mode, Negotiated, Stats, lock, read, write};

/// Attribute and entry time-to-live on the primary (and when fenced): every change of the tree
/// goes through this mount, so the kernel keeps its caches right by itself, and `stat`, path
/// walks and listings (`FOPEN_CACHE_DIR`) of what it knows need no request. Leaving the mode
/// drops what the kernel cached (see [`Shared::set_mode`]).
const TTL_PRIMARY: Duration = Duration::from_secs(3600);
/// On the secondary the applier changes the backing directory behind the kernel's back: no
/// caching of attributes and entries.
const TTL_SECONDARY: Duration = Duration::ZERO;

/// Drops the kernel's entries for `names` (a `(parent, name)` it may have cached) and the
/// attributes and pages of `nodes`. Errors only mean the kernel no longer knows one of them.
fn invalidate_kernel_caches(notifier: &Notifier, names: &[(u64, OsString)], nodes: &[u64]) {
    let started = std::time::Instant::now();
    for (parent, name) in names {
        let _ = notifier.inval_entry(INodeNo(*parent), name);
    }
    for &node in nodes {
        let _ = notifier.inval_inode(INodeNo(node), 0, 0);
    }
    tracing::debug!(
        names = names.len(),
        nodes = nodes.len(),
        elapsed = ?started.elapsed(),
        "kernel caches of the primary mode dropped"
    );
}

/// Entries of a directory sampled to decide whether a listing's attributes are worth sending.
const LISTING_SAMPLE: usize = 32;

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(sys::errno_of(e))
}

fn rerr(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

/// How a file handle was opened (see [`Shared::open_policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandleKind {
    Passthrough,
    Cached,
    Direct,
}

struct FileHandleState {
    inode: Arc<Inode>,
    file: OwnedFd,
    kind: HandleKind,
    /// Keeps the inode's backing id registered while this passthrough handle is open.
    _backing: Option<Arc<BackingId>>,
    sync: SyncMode,
    /// Whether this handle pinned the inode's descriptor (see [`InodeTable::pin`]).
    pinned: bool,
    /// When the file was last synced, shared by the inode's open handles.
    syncs: Arc<SyncHistory>,
}

impl DirHandle {
    /// Gives `add` the entries from the one after cookie `offset` (0: the start) until it says
    /// the reply is full. `add` answers `Some(false)`: added, `Some(true)`: full (that entry is
    /// given again by the next call, from its cookie), `None`: skipped. An error after an entry
    /// was added ends the reply early (the error comes again at the next read); before, it is
    /// the reply (an empty reply would mean the end of the directory).
    fn list(&self, offset: u64, mut add: impl FnMut(&DirEnt) -> Option<bool>) -> Result<(), Errno> {
        let mut reader = lock(&self.reader);
        reader.seek(offset).map_err(|e| errno(&e))?;
        let mut added = false;
        while let Some(ent) = reader.peek() {
            let ent = match ent {
                Ok(ent) => ent,
                Err(e) if !added => return Err(errno(&e)),
                Err(_) => break,
            };
            match add(&ent) {
                // Not sent: stays at the position, for the next call.
                Some(true) => break,
                Some(false) => added = true,
                None => {}
            }
            reader.advance();
        }
        Ok(())
    }

    /// Gives `look` up to `n` entries from the start (`.` and `..` included), read ahead: the
    /// next [`DirHandle::list`] from the start gives them without reading them again.
    fn first_entries(&self, n: usize, mut look: impl FnMut(&DirEnt)) -> Result<(), Errno> {
        let mut reader = lock(&self.reader);
        reader.seek(0).map_err(|e| errno(&e))?;
        for i in 0..n {
            match reader.ahead(i) {
                Some(Ok(ent)) => look(&ent),
                Some(Err(e)) => return Err(errno(&e)),
                None => break,
            }
        }
        Ok(())
    }
}

struct DirHandle {
    inode: Arc<Inode>,
    fd: Arc<OwnedFd>,
    /// The node id of the last subdirectory listed (0: none yet), see [`Prefetch::note_order`].
    last_subdir: AtomicU64,
    /// The listing, read as the kernel asks (see [`DirReader`]).
    reader: Mutex<DirReader>,
}

/// State shared by the FUSE worker threads and the [`crate::Mount`] handle.
pub(crate) struct Shared {
    pub(crate) table: InodeTable,
    handles: Mutex<HashMap<u64, Arc<FileHandleState>>>,
    /// Open handles per inode (node id), for the inodes that have any.
    open: Mutex<HashMap<u64, OpenState>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    /// The change time of directories (by node id) when they were last opened: see
    /// [`Shared::listed_unchanged`].
    listings: Mutex<HashMap<u64, i128>>,
    /// Listings read ahead for tree walks.
    prefetch: Prefetch,
    next_fh: AtomicU64,
    /// The mode; mutations hold it shared from admission to the end of their local apply, so
    /// that `set_mode` returns only once no mutation admitted under the old mode is still being
    /// applied.
    pub(crate) gate: RwLock<Mode>,
    /// Namespace ordering: namespace operations hold it exclusively from submit to the end of
    /// their local apply; data operations hold it shared while they resolve paths and submit.
    ns: RwLock<()>,
    seq: AtomicU64,
    replicator: Arc<dyn Replicator>,
    exclude: Exclusions,
    max_write: u32,
    stack_depth: u32,
    pub(crate) negotiated: OnceLock<Negotiated>,
    pub(crate) notifier: OnceLock<Notifier>,
    /// The thread dropping the kernel's caches after a switch to the secondary mode.
    invalidating: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when the mount was detached lazily: every request fails.
    pub(crate) closed: AtomicBool,
    submitted: AtomicU64,
    completed: AtomicU64,
    replication_errors: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        root_fd: OwnedFd,
        root_stat: &rustix::fs::Stat,
        mode: Mode,
        replicator: Arc<dyn Replicator>,
        exclude: Exclusions,
        max_write: u32,
        stack_depth: u32,
    ) -> Shared {
        Shared {
            table: InodeTable::new(root_fd, root_stat, CACHED_DESCRIPTORS),
            handles: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            prefetch: Prefetch::default(),
            next_fh: AtomicU64::new(1),
            gate: RwLock::new(mode),
            ns: RwLock::new(()),
            seq: AtomicU64::new(0),
            replicator,
            exclude,
            max_write,
            stack_depth,
            negotiated: OnceLock::new(),
            notifier: OnceLock::new(),
            invalidating: Mutex::new(None),
            closed: AtomicBool::new(false),
            submitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            replication_errors: AtomicU64::new(0),
        }
    }

    /// The `seq` the next mutation gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed) + 1
    }

    pub(crate) fn mode(&self) -> Mode {
        *read(&self.gate)
    }

    pub(crate) fn stats(&self) -> Stats {
        let submitted = self.submitted.load(Ordering::Relaxed);
        let completed = self.completed.load(Ordering::Relaxed);
        let cache = self.table.cache_stats();
        Stats {
            mutations: submitted,
            in_flight: submitted.saturating_sub(completed),
            replication_errors: self.replication_errors.load(Ordering::Relaxed),
            inodes: self.table.len(),
            open_files: lock(&self.handles).len(),
            cached_descriptors: cache.open,
            cached_descriptors_max: cache.capacity,
            reopened: cache.misses,
            listings_read_ahead: self.prefetch.stored(),
            listings_ahead_used: self.prefetch.used(),
        }
    }

    fn ttl(&self) -> Duration {
        match self.mode() {
            Mode::Secondary => TTL_SECONDARY,
            Mode::Primary | Mode::Fenced => TTL_PRIMARY,
        }
    }

    fn caps(&self) -> Negotiated {
        self.negotiated.get().copied().unwrap_or_default()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Switches the mode. Waits until every mutation admitted under the old mode has been applied
    /// locally (their replication may still be in flight).
    ///
    /// Entering the secondary mode drops the names, attributes and pages the kernel cached (with
    /// the primary's long timeouts) before the applier changes the tree behind its back. That
    /// runs on a thread of its own: invalidating a name waits for the kernel's lock of its
    /// directory, which a caller still waiting for the old stream's acknowledgement may hold
    /// until the caller of this function fails that stream. The next switch waits for it.
    pub(crate) fn set_mode(&self, mode: Mode) {
        if let Some(previous) = lock(&self.invalidating).take()
            && previous.join().is_err()
        {
            tracing::error!("the invalidation of the kernel's caches panicked");
        }
        let old = {
            let mut gate = write(&self.gate);
            let old = *gate;
            *gate = mode;
            if old == Mode::Secondary && mode != Mode::Secondary {
                // The applier changed the tree behind our back: names we remember may be stale.
                self.revalidate_links();
            }
            old
        };
        if let Some(notifier) = self.notifier.get() {
            if old == Mode::Secondary && mode != Mode::Secondary {
                // Drop pages and attributes cached while the applier wrote (they had no
                // timeout to speak of, but mmaps and cached reads keep pages). Errors only mean
                // the kernel no longer knows the inode.
                for inode in self.table.all() {
                    let _ = notifier.inval_inode(INodeNo(inode.nodeid), 0, 0);
                }
            } else if old != Mode::Secondary && mode == Mode::Secondary {
                self.prefetch.clear();
                let names = self.table.names();
                let nodes: Vec<u64> = self.table.all().iter().map(|i| i.nodeid).collect();
                let notifier = notifier.clone();
                let spawned = std::thread::Builder::new()
                    .name("tandem-fs-inval".into())
                    .spawn(move || invalidate_kernel_caches(&notifier, &names, &nodes));
                match spawned {
                    Ok(handle) => *lock(&self.invalidating) = Some(handle),
                    Err(e) => tracing::error!(
                        error = %e,
                        "cannot start the invalidation of the kernel's caches: names the \
                         kernel cached as primary may show stale entries for up to {} s",
                        TTL_PRIMARY.as_secs()
                    ),
                }
            }
        }
        tracing::info!(?old, new = ?mode, "tandem-fs mode");
    }

    fn revalidate_links(&self) {
        for inode in self.table.all() {
            if inode.nodeid == ROOT {
                continue;
            }
            let Some((parent, name)) = self.table.link_of(inode.nodeid) else {
                continue;
            };
            let same = self
                .table
                .get(parent)
                .and_then(|p| self.fd(&p).ok())
                .and_then(|p| sys::stat_at(p.as_fd(), &name).ok())
                .is_some_and(|st| sys::file_id(&st) == self.table.id(&inode));
            if !same {
                self.table.clear_link_if(inode.nodeid, parent, &name);
            }
        }
    }

    /// Drops `n` kernel references of a node; when its entry goes, tells the replicator
    /// ([`Replicator::forget`]), unless a newer inode reused its identity meanwhile.
    pub(crate) fn forget_node(&self, nodeid: u64, n: u64) {
        if let Some((inode, current)) = self.table.forget(nodeid, n) {
            if inode.kind == fuser::FileType::Directory {
                lock(&self.listings).remove(&nodeid);
            }
            if current {
                self.replicator.forget(self.table.id(&inode));
            }
        }
    }

    /// At the start of a listing, asks for the next subdirectory of the same parent (as the
    /// parent's listing gave them) to be read ahead: a tree walk opens it next.
    fn read_next_ahead(self: &Arc<Self>, dir: &DirHandle, offset: u64) {
        if offset != 0 || self.mode() == Mode::Secondary {
            return;
        }
        let Some(next) = self.prefetch.next_of(dir.inode.nodeid) else {
            return;
        };
        let weak = Arc::downgrade(self);
        self.prefetch.request(next, || {
            prefetch::spawn_reader(move |nodeid| {
                let Some(s) = weak.upgrade() else {
                    return false;
                };
                s.read_ahead(nodeid);
                true
            })
        });
    }

    /// Reads the first buffer of the directory `nodeid` for its coming opening (on the
    /// read-ahead thread). Failures only mean that the opening reads it itself.
    fn read_ahead(&self, nodeid: u64) {
        let epoch = self.prefetch.begin();
        if self.mode() == Mode::Secondary {
            return;
        }
        let Some(inode) = self.table.get(nodeid) else {
            return;
        };
        let Ok(fd) = self
            .fd(&inode)
            .and_then(|fd| sys::open_dir(fd.as_fd()).map_err(|e| errno(&e)))
        else {
            return;
        };
        let fd = Arc::new(fd);
        let mut reader = DirReader::new(Arc::clone(&fd));
        let _ = reader.ahead(0);
        self.prefetch.store(nodeid, fd, reader, epoch);
    }

    /// Records the order of the subdirectories a listing gives (see [`Prefetch::note_order`]).
    fn note_subdir(&self, dir: &DirHandle, ent: &DirEnt) {
        if ent.kind == fuser::FileType::Directory && ent.name != "." && ent.name != ".." {
            let last = dir.last_subdir.swap(ent.ino, Ordering::Relaxed);
            if last != 0 && last != ent.ino {
                self.prefetch.note_order(last, ent.ino);
            }
        }
    }

    /// Whether the directory is opened again with no change since its last opening (its
    /// change time: every entry added, removed or renamed changes it); records this opening.
    ///
    /// The kernel keeps the listing of such a directory (`FOPEN_CACHE_DIR`): it is likely
    /// listed again. Filling that cache costs the first listing about a sixth of its speed,
    /// so a directory listed once since it changed (as after a creation) is not cached. The
    /// kernel checks a cached listing against the directory's changes by itself: this only
    /// decides whether a cache is worth filling.
    fn listed_unchanged(&self, inode: &Inode, fd: BorrowedFd<'_>) -> bool {
        let Ok(st) = sys::stat_fd(fd) else {
            return false;
        };
        let ctime = i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec);
        lock(&self.listings).insert(inode.nodeid, ctime) == Some(ctime)
    }

    /// An `O_PATH` descriptor of the inode (see [`InodeTable::fd`]).
    fn fd(&self, inode: &Arc<Inode>) -> Result<Arc<OwnedFd>, Errno> {
        self.table.fd(inode).map_err(|e| errno(&e))
    }

    // ---------------------------------------------------------------- identification helpers

    fn node_ref(&self, inode: &Inode) -> NodeRef {
        NodeRef {
            nodeid: inode.nodeid,
            generation: inode.generation(),
            id: self.table.id(inode),
            path: self.table.path_of(inode.nodeid),
        }
    }

    /// Whether the node's path is excluded; when its path is unknown (unlinked while open), the
    /// last decision made while it was known.
    fn node_excluded(&self, inode: &Inode, node: &NodeRef) -> bool {
        if self.exclude.is_empty() {
            return false;
        }
        match node.path.as_deref() {
            Some(p) => {
                let excluded = self.exclude.is_excluded(p);
                inode.excluded.store(excluded, Ordering::Relaxed);
                excluded
            }
            None => inode.excluded.load(Ordering::Relaxed),
        }
    }

    /// Records the exclusion of a node the kernel just learnt (lookup, create, link).
    fn note_exclusion(&self, inode: &Inode) {
        if !self.exclude.is_empty()
            && let Some(p) = self.table.path_of(inode.nodeid)
        {
            inode
                .excluded
                .store(self.exclude.is_excluded(&p), Ordering::Relaxed);
        }
    }

    fn entry_ref<'a>(&self, parent: &Inode, name: &'a OsStr) -> EntryRef<'a> {
        let parent_ref = self.node_ref(parent);
        let path = parent_ref.path.as_ref().map(|p| p.join(name));
        let excluded = path.as_deref().is_some_and(|p| self.exclude.is_excluded(p));
        EntryRef {
            parent: parent_ref,
            name: Cow::Borrowed(name),
            path,
            excluded,
        }
    }

    fn inode(&self, ino: INodeNo) -> Result<Arc<Inode>, Errno> {
        self.table.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<FileHandleState>, Errno> {
        lock(&self.handles).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn dir_handle(&self, fh: FileHandle) -> Result<Arc<DirHandle>, Errno> {
        lock(&self.dirs).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn lookup_child(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
    ) -> Result<(Arc<Inode>, FileAttr), Errno> {
        // Opened, so that the attributes and the handle are surely those of one inode: a
        // revalidation (the kernel's LOOKUP of a name it cached) does not hold the directory's
        // lock, so a rename or an unlink may change the name between two calls by name.
        let fd = sys::open_path_at(self.fd(parent)?.as_fd(), name).map_err(|e| errno(&e))?;
        let st = sys::stat_fd(fd.as_fd()).map_err(|e| errno(&e))?;
        let inode = self.table.remember(fd, &st, parent.nodeid, name);
        self.note_exclusion(&inode);
        let attr = sys::fuse_attr(&st, inode.nodeid);
        Ok((inode, attr))
    }

    /// Adds `ent` of `dir` to a `readdirplus` reply, looked up (see [`DirHandle::list`] for
    /// the answer).
    fn add_plus(
        &self,
        reply: &mut ReplyDirectoryPlus,
        dir: &DirHandle,
        ent: &DirEnt,
        ttl: &Duration,
    ) -> Option<bool> {
        if ent.name == "." || ent.name == ".." {
            // The kernel does not instantiate these: no lookup reference is taken.
            let attr = self.getattr_of(&dir.inode).ok()?;
            return Some(reply.add(
                INodeNo(dir.inode.nodeid),
                ent.off,
                ent.name,
                ttl,
                &attr,
                Generation(0),
            ));
        }
        // Gone meanwhile: skipped.
        let (inode, attr) = self.lookup_child(&dir.inode, ent.name).ok()?;
        let full = reply.add(
            INodeNo(inode.nodeid),
            ent.off,
            ent.name,
            ttl,
            &attr,
            Generation(inode.generation()),
        );
        if full {
            // Not sent: the kernel takes no reference.
            self.forget_node(inode.nodeid, 1);
        }
        Some(full)
    }

    /// Whether most of the first entries of a listing are inodes the kernel knows (a sample of
    /// [`LISTING_SAMPLE`] entries).
    fn kernel_knows_listing(&self, dir: &DirHandle) -> bool {
        let (mut seen, mut known) = (0usize, 0usize);
        // `.` and `..` are two of the sample's entries.
        let _ = dir.first_entries(LISTING_SAMPLE + 2, |ent| {
            if ent.name != "." && ent.name != ".." {
                seen += 1;
                known += usize::from(self.table.knows(ent.ino));
            }
        });
        seen > 0 && known * 2 >= seen
    }

    fn getattr_of(&self, inode: &Arc<Inode>) -> Result<FileAttr, Errno> {
        let st = sys::stat_fd(self.fd(inode)?.as_fd()).map_err(|e| errno(&e))?;
        Ok(sys::fuse_attr(&st, inode.nodeid))
    }

    fn attr_now(&self, inode: &Arc<Inode>) -> Option<Attr> {
        let fd = self.fd(inode).ok()?;
        sys::stat_fd(fd.as_fd()).ok().map(|st| sys::attr_of(&st))
    }

    /// Where xattr calls reach the inode, with the descriptor the path names (keep it while
    /// the path is used).
    fn xattr_path(&self, inode: &Arc<Inode>) -> Result<(XattrPath, Arc<OwnedFd>), Errno> {
        if inode.kind == fuser::FileType::Symlink {
            let (parent, name) = self.table.link_of(inode.nodeid).ok_or(Errno::EOPNOTSUPP)?;
            let parent = self.table.get(parent).ok_or(Errno::EOPNOTSUPP)?;
            let fd = self.fd(&parent)?;
            let path = sys::proc_entry_path(fd.as_fd(), &name).map_err(|e| errno(&e))?;
            Ok((XattrPath::NoFollow(path), fd))
        } else {
            let fd = self.fd(inode)?;
            Ok((XattrPath::Follow(sys::proc_path(fd.as_fd())), fd))
        }
    }

    fn owner_for(&self, req: &Request, parent: &Arc<Inode>) -> Result<Owner, Errno> {
        let st = sys::stat_fd(self.fd(parent)?.as_fd()).map_err(|e| errno(&e))?;
        let gid = if st.st_mode & libc::S_ISGID != 0 {
            st.st_gid
        } else {
            req.gid()
        };
        Ok(Owner {
            uid: req.uid(),
            gid,
        })
    }

    /// Registers an open file; its inode's descriptor stays open (pinned) until it is released.
    fn insert_handle(&self, mut h: FileHandleState) -> u64 {
        h.pinned = self.table.pin(&h.inode).is_ok();
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    fn release_handle(&self, fh: u64) {
        let Some(h) = lock(&self.handles).remove(&fh) else {
            return;
        };
        if h.pinned {
            self.table.unpin(&h.inode);
        }
        let mut states = lock(&self.open);
        let Some(st) = states.get_mut(&h.inode.nodeid) else {
            return;
        };
        match h.kind {
            HandleKind::Passthrough => {
                st.passthrough = st.passthrough.saturating_sub(1);
                if st.passthrough == 0 {
                    st.backing = None;
                }
            }
            HandleKind::Cached => st.cached = st.cached.saturating_sub(1),
            HandleKind::Direct => st.direct = st.direct.saturating_sub(1),
        }
        if st.passthrough == 0 && st.cached == 0 && st.direct == 0 {
            states.remove(&h.inode.nodeid);
        }
    }

    /// The sync history of an inode with open handles (after [`Shared::open_policy`]): kept
    /// while the inode has open handles.
    fn sync_history(&self, inode: &Inode) -> Arc<SyncHistory> {
        lock(&self.open)
            .entry(inode.nodeid)
            .or_default()
            .syncs
            .clone()
    }

    /// The open policy (see the crate docs, "Open policy"): returns the kind, the `FOPEN_*` flags
    /// and, for passthrough, the inode's backing id.
    fn open_policy(
        &self,
        inode: &Inode,
        mode: Mode,
        writable: bool,
        file: &OwnedFd,
        open_backing: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> (HandleKind, FopenFlags, Option<Arc<BackingId>>) {
        let dio = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        let mut states = lock(&self.open);
        let st: &mut OpenState = states.entry(inode.nodeid).or_default();
        if st.passthrough > 0
            && let Some(backing) = st.backing.clone()
        {
            // The kernel requires every open of an inode with a passthrough open to be one too.
            // Writers keep FOPEN_DIRECT_IO so that their writes still reach us.
            st.passthrough += 1;
            let flags = if writable { dio } else { FopenFlags::empty() };
            return (HandleKind::Passthrough, flags, Some(backing));
        }
        if writable {
            st.direct += 1;
            return (HandleKind::Direct, dio, None);
        }
        if mode == Mode::Secondary {
            // Readers at native speed and coherent with the applier's writes to the backing
            // file: passthrough, unless a cached handle is open (the kernel would refuse).
            if self.caps().passthrough && st.cached == 0 {
                match open_backing(file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        st.backing = Some(id.clone());
                        st.passthrough += 1;
                        return (HandleKind::Passthrough, FopenFlags::empty(), Some(id));
                    }
                    Err(e) => tracing::debug!(error = %e, "passthrough refused; direct reads"),
                }
            }
            st.direct += 1;
            return (HandleKind::Direct, FopenFlags::FOPEN_DIRECT_IO, None);
        }
        st.cached += 1;
        (HandleKind::Cached, FopenFlags::FOPEN_KEEP_CACHE, None)
    }

    // ---------------------------------------------------------------- the mutation path

    /// The one path of every mutating operation:
    /// 1. admission: the mode must allow writes (else `EROFS`), the ordering locks are taken
    ///    (namespace lock exclusive for namespace operations; namespace lock shared plus the
    ///    inode's order lock for operations on one inode);
    /// 2. `build` describes the operation; it gets a `seq` and goes to the replicator;
    /// 3. `apply` runs locally (after dropping the locks for a `barrier`, i.e. fsync);
    /// 4. the replicator hears the local outcome; the reply goes to the kernel when both the local
    ///    apply and the replicator's completion are done.
    fn mutate<'a, R: Respond>(
        self: &Arc<Self>,
        reply: R,
        scope: Scope<'_>,
        barrier: bool,
        build: impl FnOnce() -> Result<(bool, Op<'a>), Errno>,
        apply: impl FnOnce() -> Result<Applied<R::Ok>, Errno>,
    ) {
        if self.is_closed() {
            return reply.err(Errno::EIO);
        }
        let gate = read(&self.gate);
        if !gate.writable() {
            return reply.err(Errno::EROFS);
        }
        // Lock order: inode order lock, then the namespace lock. Namespace operations take no
        // inode lock, so a data operation waiting for its inode holds nothing else.
        let (ns_excl, mut ns_shared, mut order) = match scope {
            Scope::Namespace => (Some(write(&self.ns)), None, None),
            Scope::Node(inode) => {
                let order = inode.order.lock();
                (None, Some(read(&self.ns)), Some(order))
            }
        };
        let (replicate, op) = match build() {
            Ok(v) => v,
            Err(e) => return reply.err(e),
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let join = Arc::new(Join {
            shared: self.clone(),
            state: Mutex::new(JoinState {
                reply: Some(reply),
                local: None,
                remote: None,
            }),
        });
        self.submitted.fetch_add(1, Ordering::Relaxed);
        let parents = {
            let mutation = Mutation { seq, replicate, op };
            self.replicator
                .submit(&mutation, Completion::new(join.clone()));
            if replicate {
                mutation.op.parent_dirs()
            } else {
                Vec::new()
            }
        };
        // Data operations needed the namespace lock only to name their target consistently
        // with renames in `seq` order.
        ns_shared.take();
        let result = if barrier {
            drop(order.take());
            drop(ns_excl);
            drop(gate);
            apply()
        } else {
            let r = apply();
            if ns_excl.is_some() {
                // Before the reply: a listing read ahead from before this change is not used.
                self.prefetch.changed();
            }
            drop(order.take());
            drop(ns_excl);
            drop(gate);
            r
        };
        let outcome = match &result {
            Ok(a) => Outcome {
                error: None,
                attr: a.attr,
                written: a.written,
                dirs: self.dir_attrs(&parents),
            },
            Err(e) => Outcome {
                error: Some(e.code()),
                attr: None,
                written: None,
                dirs: Vec::new(),
            },
        };
        self.replicator.applied(seq, &outcome);
        join.local_done(result.map(|a| a.value));
    }

    /// The attributes of the directories `ids` (by backing identity) as they are now.
    fn dir_attrs(&self, ids: &[FileId]) -> Vec<Attr> {
        ids.iter()
            .filter_map(|id| self.table.nodeid_of(*id))
            .filter_map(|nodeid| self.table.get(nodeid))
            .filter_map(|inode| self.fd(&inode).ok())
            .filter_map(|fd| sys::stat_fd(fd.as_fd()).ok())
            .map(|st| sys::attr_of(&st))
            .collect()
    }

    fn create_node(
        self: &Arc<Self>,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new: NewNode<'_>,
        reply: ReplyEntry,
    ) {
        let p = match self.inode(parent) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let owner = match self.owner_for(req, &p) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        let dont_mask = self.caps().dont_mask;
        let this = self.clone();
        let p2 = p.clone();
        self.mutate(
            reply,
            Scope::Namespace,
            false,
            || {
                let entry = self.entry_ref(&p, name);
                let replicate = !entry.excluded;
                let op = match new {
                    NewNode::Dir { mode, umask } => Op::Mkdir {
                        entry,
                        mode,
                        umask,
                        owner,
                    },
                    NewNode::Special { mode, umask, rdev } => Op::Mknod {
                        entry,
                        mode,
                        umask,
                        rdev,
                        owner,
                    },
                    NewNode::Symlink { target } => Op::Symlink {
                        entry,
                        target: Cow::Borrowed(target),
                        owner,
                    },
                };
                Ok((replicate, op))
            },
            move || {
                let dir = this.fd(&p2)?;
                let dir = dir.as_fd();
                let (umask, mode) = match new {
                    NewNode::Dir { mode, umask } | NewNode::Special { mode, umask, .. } => {
                        (if dont_mask { umask } else { 0 }, mode)
                    }
                    NewNode::Symlink { .. } => (0, 0o777),
                };
                let (res, own_umask) = sys::with_umask(umask, || match new {
                    NewNode::Dir { mode, .. } => {
                        rustix::fs::mkdirat(dir, name, RMode::from_raw_mode(mode & 0o7777))
                    }
                    NewNode::Special { mode, rdev, .. } => rustix::fs::mknodat(
                        dir,
                        name,
                        rustix::fs::FileType::from_raw_mode(mode),
                        RMode::from_raw_mode(mode & 0o7777),
                        sys::decode_dev(rdev),
                    ),
                    NewNode::Symlink { target } => rustix::fs::symlinkat(target, dir, name),
                });
                res.map_err(rerr)?;
                let fd = sys::open_path_at(dir, name).map_err(|e| errno(&e))?;
                if !own_umask && !matches!(new, NewNode::Symlink { .. }) {
                    sys::set_mode(fd.as_fd(), mode & !umask).map_err(|e| errno(&e))?;
                }
                this.give_owner(&fd, owner)?;
                let st = sys::stat_fd(fd.as_fd()).map_err(|e| errno(&e))?;
                let inode = this.table.remember(fd, &st, p2.nodeid, name);
                this.note_exclusion(&inode);
                Ok(Applied {
                    value: EntryOk {
                        ttl: this.ttl(),
                        attr: sys::fuse_attr(&st, inode.nodeid),
                        generation: inode.generation(),
                    },
                    attr: Some(sys::attr_of(&st)),
                    written: None,
                })
            },
        );
    }

    /// Gives a node created by us (as root) the caller's ownership, keeping set-ID bits that
    /// `chown` clears.
    fn give_owner(&self, fd: &OwnedFd, owner: Owner) -> Result<(), Errno> {
        let st = sys::stat_fd(fd.as_fd()).map_err(|e| errno(&e))?;
        if st.st_uid == owner.uid && st.st_gid == owner.gid {
            return Ok(());
        }
        sys::set_owner(fd.as_fd(), Some(owner.uid), Some(owner.gid)).map_err(|e| errno(&e))?;
        if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
            && st.st_mode & libc::S_IFMT != libc::S_IFLNK
        {
            let after = sys::stat_fd(fd.as_fd()).map_err(|e| errno(&e))?;
            if after.st_mode & 0o7777 != st.st_mode & 0o7777 {
                sys::set_mode(fd.as_fd(), st.st_mode).map_err(|e| errno(&e))?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum NewNode<'a> {
    Dir { mode: u32, umask: u32 },
    Special { mode: u32, umask: u32, rdev: u32 },
    Symlink { target: &'a Path },
}

/// Which ordering lock a mutation takes.
enum Scope<'a> {
    Namespace,
    Node(&'a Inode),
}

/// The result of a local apply.
struct Applied<T> {
    value: T,
    attr: Option<Attr>,
    written: Option<u64>,
}

/// A fuser reply type, as the mutation path sends it.
trait Respond: Send + 'static {
    type Ok: Send + 'static;
    fn ok(self, value: Self::Ok);
    fn err(self, e: Errno);
    /// The local apply succeeded but the reply is an error: undo what the success value holds
    /// for the kernel (lookup counts, file handles).
    fn abandon(_shared: &Shared, _value: Self::Ok) {}
}

impl Respond for ReplyEmpty {
    type Ok = ();
    fn ok(self, _: ()) {
        ReplyEmpty::ok(self)
    }
    fn err(self, e: Errno) {
        self.error(e)
    }
}

impl Respond for ReplyWrite {
    type Ok = u32;
    fn ok(self, n: u32) {
        self.written(n)
    }
    fn err(self, e: Errno) {
        self.error(e)
    }
}

impl Respond for ReplyAttr {
    type Ok = (Duration, FileAttr);
    fn ok(self, (ttl, attr): (Duration, FileAttr)) {
        self.attr(&ttl, &attr)
    }
    fn err(self, e: Errno) {
        self.error(e)
    }
}

struct EntryOk {
    ttl: Duration,
    attr: FileAttr,
    generation: u64,
}

impl Respond for ReplyEntry {
    type Ok = EntryOk;
    fn ok(self, v: EntryOk) {
        self.entry(&v.ttl, &v.attr, Generation(v.generation))
    }
    fn err(self, e: Errno) {
        self.error(e)
    }
    fn abandon(shared: &Shared, v: EntryOk) {
        shared.forget_node(v.attr.ino.0, 1);
    }
}

struct CreateOk {
    entry: EntryOk,
    fh: u64,
    flags: FopenFlags,
    backing: Option<Arc<BackingId>>,
}

impl Respond for ReplyCreate {
    type Ok = CreateOk;
    fn ok(self, v: CreateOk) {
        match &v.backing {
            Some(b) => self.created_passthrough(
                &v.entry.ttl,
                &v.entry.attr,
                Generation(v.entry.generation),
                FileHandle(v.fh),
                v.flags,
                b,
            ),
            None => self.created(
                &v.entry.ttl,
                &v.entry.attr,
                Generation(v.entry.generation),
                FileHandle(v.fh),
                v.flags,
            ),
        }
    }
    fn err(self, e: Errno) {
        self.error(e)
    }
    fn abandon(shared: &Shared, v: CreateOk) {
        shared.release_handle(v.fh);
        shared.forget_node(v.entry.attr.ino.0, 1);
    }
}

struct JoinState<R: Respond> {
    reply: Option<R>,
    local: Option<Result<R::Ok, Errno>>,
    remote: Option<Result<(), ReplicationError>>,
}

/// Waits for both halves of a mutation; whichever finishes last sends the reply.
struct Join<R: Respond> {
    shared: Arc<Shared>,
    state: Mutex<JoinState<R>>,
}

impl<R: Respond> Join<R> {
    fn local_done(&self, result: Result<R::Ok, Errno>) {
        let mut st = lock(&self.state);
        st.local = Some(result);
        self.finish(st);
    }

    fn finish(&self, mut st: std::sync::MutexGuard<'_, JoinState<R>>) {
        if st.local.is_none() || st.remote.is_none() {
            return;
        }
        let (Some(reply), Some(local), Some(remote)) =
            (st.reply.take(), st.local.take(), st.remote.take())
        else {
            return;
        };
        drop(st);
        self.shared.completed.fetch_add(1, Ordering::Relaxed);
        match (local, remote) {
            (Err(e), _) => reply.err(e),
            (Ok(v), Err(re)) => {
                self.shared
                    .replication_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %re, "replication failed; the call fails");
                R::abandon(&self.shared, v);
                reply.err(Errno::from_i32(re.errno()));
            }
            (Ok(v), Ok(())) => reply.ok(v),
        }
    }
}

impl<R: Respond> RemoteDone for Join<R>
where
    R::Ok: Send,
{
    fn remote_done(&self, result: Result<(), ReplicationError>) {
        let mut st = lock(&self.state);
        if st.remote.is_some() || st.reply.is_none() {
            return;
        }
        st.remote = Some(result);
        self.finish(st);
    }
}

fn sync_mode(flags: i32) -> SyncMode {
    if flags & libc::O_SYNC == libc::O_SYNC {
        SyncMode::Full
    } else if flags & libc::O_DSYNC != 0 {
        SyncMode::Data
    } else {
        SyncMode::None
    }
}

/// Flags of our own descriptor for a handle the kernel opens: read-write for any writer (so a
/// shared writable mmap's page reads work), the caller's `O_SYNC`/`O_DSYNC`; no `O_APPEND` (the
/// kernel gives explicit offsets) nor `O_DIRECT` (request buffers are not aligned).
fn backing_flags(flags: i32, writable: bool) -> OFlags {
    let mut f = if writable {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    if flags & libc::O_SYNC == libc::O_SYNC {
        f |= OFlags::SYNC;
    } else if flags & libc::O_DSYNC != 0 {
        f |= OFlags::DSYNC;
    }
    f | OFlags::CLOEXEC | OFlags::NOCTTY
}

fn time_of(t: TimeOrNow, now: Timestamp) -> Timestamp {
    match t {
        TimeOrNow::Now => now,
        TimeOrNow::SpecificTime(t) => Timestamp::from(t),
    }
}

/// The `fuser::Filesystem` face of [`Shared`].
pub(crate) struct Fs(pub(crate) Arc<Shared>);

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let s = &self.0;
        let mut got = Negotiated::default();
        let mut want = |flag: InitFlags| config.add_capabilities(flag).is_ok();
        got.direct_io_allow_mmap = want(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        got.parallel_dirops = want(InitFlags::FUSE_PARALLEL_DIROPS);
        got.readdirplus =
            want(InitFlags::FUSE_DO_READDIRPLUS) && want(InitFlags::FUSE_READDIRPLUS_AUTO);
        got.posix_acl = want(InitFlags::FUSE_POSIX_ACL);
        got.dont_mask = want(InitFlags::FUSE_DONT_MASK);
        want(InitFlags::FUSE_CACHE_SYMLINKS);
        // Not FUSE_HANDLE_KILLPRIV_V2: fuser 0.18 does not expose FATTR_KILL_SUIDGID nor
        // FUSE_OPEN_KILL_SUIDGID, so the kernel keeps clearing set-ID bits itself (as explicit
        // mode changes in setattr); writes are handled in `write`.
        // Passthrough needs CAP_SYS_ADMIN for each backing file (checked at open time).
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
            got.passthrough = config.set_max_stack_depth(s.stack_depth).is_ok();
        }
        got.max_write = match config.set_max_write(s.max_write) {
            Ok(_) => s.max_write,
            Err(max) => {
                let _ = config.set_max_write(max);
                max
            }
        };
        tracing::debug!(?got, "FUSE init");
        let _ = s.negotiated.set(got);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = &self.0;
        if s.is_closed() {
            return reply.error(Errno::EIO);
        }
        let p = match s.inode(parent) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match s.lookup_child(&p, name) {
            Ok((inode, attr)) => reply.entry(&s.ttl(), &attr, Generation(inode.generation())),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.0.forget_node(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = &self.0;
        match s.inode(ino).and_then(|i| s.getattr_of(&i)) {
            Ok(attr) => reply.attr(&s.ttl(), &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = &self.0;
        let inode = match s.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let handle = fh.and_then(|fh| s.handle(fh).ok());
        let now = Timestamp::now();
        let atime = atime.map(|t| time_of(t, now));
        let mtime = mtime.map(|t| time_of(t, now));
        let mode = mode.map(|m| m & 0o7777);
        if mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && atime.is_none()
            && mtime.is_none()
        {
            // Nothing we can change (ctime alone, BSD flags): report the attributes.
            return match s.getattr_of(&inode) {
                Ok(attr) => reply.attr(&s.ttl(), &attr),
                Err(e) => reply.error(e),
            };
        }
        let ttl = s.ttl();
        s.mutate(
            reply,
            Scope::Node(&inode),
            false,
            || {
                let node = s.node_ref(&inode);
                let replicate = !s.node_excluded(&inode, &node);
                Ok((
                    replicate,
                    Op::SetAttr {
                        node,
                        fh: fh.map(|f| f.0),
                        mode,
                        uid,
                        gid,
                        size,
                        atime,
                        mtime,
                    },
                ))
            },
            || {
                let fd = s.fd(&inode)?;
                let fd = fd.as_fd();
                if let Some(size) = size {
                    match &handle {
                        Some(h) => rustix::fs::ftruncate(&h.file, size).map_err(rerr)?,
                        None => {
                            let f = sys::reopen(fd, OFlags::WRONLY).map_err(|e| errno(&e))?;
                            rustix::fs::ftruncate(&f, size).map_err(rerr)?;
                        }
                    }
                }
                if uid.is_some() || gid.is_some() {
                    sys::set_owner(fd, uid, gid).map_err(|e| errno(&e))?;
                }
                if let Some(mode) = mode {
                    if inode.kind == fuser::FileType::Symlink {
                        return Err(Errno::EOPNOTSUPP);
                    }
                    sys::set_mode(fd, mode).map_err(|e| errno(&e))?;
                }
                if atime.is_some() || mtime.is_some() {
                    sys::set_times(fd, atime.map(Into::into), mtime.map(Into::into))
                        .map_err(|e| errno(&e))?;
                }
                let st = sys::stat_fd(fd).map_err(|e| errno(&e))?;
                Ok(Applied {
                    value: (ttl, sys::fuse_attr(&st, inode.nodeid)),
                    attr: Some(sys::attr_of(&st)),
                    written: None,
                })
            },
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let s = &self.0;
        let inode = match s.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let fd = match s.fd(&inode) {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        match rustix::fs::readlinkat(&*fd, c"", Vec::new()) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(rerr(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.0.create_node(
            req,
            parent,
            name,
            NewNode::Special { mode, umask, rdev },
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.0
            .create_node(req, parent, name, NewNode::Dir { mode, umask }, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.0
            .create_node(req, parent, link_name, NewNode::Symlink { target }, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        remove(&self.0, parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        remove(&self.0, parent, name, true, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let (p, np) = match (s.inode(parent), s.inode(newparent)) {
            (Ok(p), Ok(np)) => (p, np),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let ids = Mutex::new((None::<FileId>, None::<FileId>));
        s.mutate(
            reply,
            Scope::Namespace,
            false,
            || {
                let from = s.entry_ref(&p, name);
                let to = s.entry_ref(&np, newname);
                let (pfd, npfd) = (s.fd(&p)?, s.fd(&np)?);
                let moved = sys::stat_at(pfd.as_fd(), name)
                    .ok()
                    .map(|st| sys::file_id(&st));
                let replaced = sys::stat_at(npfd.as_fd(), newname)
                    .ok()
                    .map(|st| sys::file_id(&st));
                *lock(&ids) = (moved, replaced);
                let replicate = !(from.excluded && to.excluded);
                Ok((
                    replicate,
                    Op::Rename {
                        from,
                        to,
                        flags: flags.bits(),
                        moved,
                        replaced,
                    },
                ))
            },
            || {
                let (pfd, npfd) = (s.fd(&p)?, s.fd(&np)?);
                rustix::fs::renameat_with(
                    &*pfd,
                    name,
                    &*npfd,
                    newname,
                    rustix::fs::RenameFlags::from_bits_retain(flags.bits()),
                )
                .map_err(rerr)?;
                let (moved, replaced) = *lock(&ids);
                let moved = moved.and_then(|id| s.table.nodeid_of(id));
                let replaced = replaced.and_then(|id| s.table.nodeid_of(id));
                if let Some(m) = moved {
                    s.table.set_link(m, np.nodeid, newname);
                }
                if let Some(r) = replaced {
                    if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                        s.table.set_link(r, p.nodeid, name);
                    } else {
                        s.table.clear_link_if(r, np.nodeid, newname);
                    }
                }
                for n in [moved, replaced].into_iter().flatten() {
                    if let Some(inode) = s.table.get(n) {
                        s.note_exclusion(&inode);
                    }
                }
                // RENAME_WHITEOUT leaves a new inode at the source: its attributes (times).
                let whiteout = if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                    sys::stat_at(pfd.as_fd(), name)
                        .ok()
                        .map(|st| sys::attr_of(&st))
                } else {
                    None
                };
                Ok(Applied {
                    value: (),
                    attr: whiteout,
                    written: None,
                })
            },
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let s = &self.0;
        let (inode, np) = match (s.inode(ino), s.inode(newparent)) {
            (Ok(i), Ok(np)) => (i, np),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        s.mutate(
            reply,
            Scope::Namespace,
            false,
            || {
                let node = s.node_ref(&inode);
                let new = s.entry_ref(&np, newname);
                let replicate = !new.excluded;
                Ok((replicate, Op::Link { node, new }))
            },
            || {
                let (fd, npfd) = (s.fd(&inode)?, s.fd(&np)?);
                rustix::fs::linkat(&*fd, c"", &*npfd, newname, AtFlags::EMPTY_PATH)
                    .map_err(rerr)?;
                // A new lookup reference for the same inode, under its new name.
                let fd = sys::open_path_at(npfd.as_fd(), newname).map_err(|e| errno(&e))?;
                let st = sys::stat_fd(fd.as_fd()).map_err(|e| errno(&e))?;
                let known = s.table.remember(fd, &st, np.nodeid, newname);
                s.note_exclusion(&known);
                Ok(Applied {
                    value: EntryOk {
                        ttl: s.ttl(),
                        attr: sys::fuse_attr(&st, known.nodeid),
                        generation: known.generation(),
                    },
                    attr: Some(sys::attr_of(&st)),
                    written: None,
                })
            },
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let s = &self.0;
        if s.is_closed() {
            return reply.error(Errno::EIO);
        }
        let inode = match s.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let mode = s.mode();
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writable && mode == Mode::Secondary {
            return reply.error(Errno::EROFS);
        }
        let file = match s.fd(&inode).and_then(|fd| {
            sys::reopen(fd.as_fd(), backing_flags(flags.0, writable)).map_err(|e| errno(&e))
        }) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let (kind, fopen, backing) =
            s.open_policy(&inode, mode, writable, &file, |f| reply.open_backing(f));
        let syncs = s.sync_history(&inode);
        let fh = s.insert_handle(FileHandleState {
            inode,
            file,
            kind,
            _backing: backing.clone(),
            sync: sync_mode(flags.0),
            pinned: false,
            syncs,
        });
        match backing {
            Some(b) => reply.opened_passthrough(FileHandle(fh), fopen, &b),
            None => reply.opened(FileHandle(fh), fopen),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = &self.0;
        let h = match s.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        match sys::pread_full(h.file.as_fd(), size as usize, offset) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let s = &self.0;
        let h = match s.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        // Without FUSE_HANDLE_KILLPRIV_V2 the kernel does not clear set-ID bits on direct-I/O
        // writes: an unprivileged writer (no CAP_FSETID, estimated by uid) clears them here, as a
        // local filesystem would.
        let kill_suidgid =
            write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) || req.uid() != 0;
        let sync = match sync_mode(flags.0) {
            SyncMode::None => h.sync,
            other => other,
        };
        s.mutate(
            reply,
            Scope::Node(&h.inode),
            false,
            || {
                let node = s.node_ref(&h.inode);
                let replicate = !s.node_excluded(&h.inode, &node);
                Ok((
                    replicate,
                    Op::Write {
                        node,
                        fh: fh.0,
                        offset,
                        data: Cow::Borrowed(data),
                        sync,
                        kill_suidgid,
                    },
                ))
            },
            || {
                let (n, err) = sys::pwrite_all(h.file.as_fd(), data, offset);
                if n == 0
                    && let Some(e) = err
                {
                    return Err(errno(&e));
                }
                let mut st = sys::stat_fd(h.file.as_fd()).map_err(|e| errno(&e))?;
                if kill_suidgid {
                    let m = st.st_mode;
                    let kill = libc::S_ISUID
                        | if m & libc::S_IXGRP != 0 {
                            libc::S_ISGID
                        } else {
                            0
                        };
                    if m & kill != 0 {
                        sys::set_mode(h.file.as_fd(), m & !kill).map_err(|e| errno(&e))?;
                        st = sys::stat_fd(h.file.as_fd()).map_err(|e| errno(&e))?;
                    }
                }
                Ok(Applied {
                    value: u32::try_from(n).unwrap_or(u32::MAX),
                    attr: Some(sys::attr_of(&st)),
                    written: Some(n as u64),
                })
            },
        );
        // Flush-behind, once the local apply is done: while the secondary's acknowledgement is
        // on its way, or after the reply when this thread sent it (no peer, or it was faster).
        if sync == SyncMode::None && h.syncs.recently_synced() {
            writeback::start_writeback(h.file.as_fd(), offset, data.len() as u64);
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.release_handle(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let h = match s.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        fsync_common(s, &h.inode, fh.0, &h.file, Some(&h.syncs), datasync, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let s = &self.0;
        if s.is_closed() {
            return reply.error(Errno::EIO);
        }
        let inode = match s.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let mode = s.mode();
        let ahead = match mode {
            Mode::Secondary => None,
            _ => s.prefetch.take(inode.nodeid),
        };
        let (fd, reader) = match ahead {
            Some(ahead) => (ahead.fd, ahead.reader),
            None => match s
                .fd(&inode)
                .and_then(|fd| sys::open_dir(fd.as_fd()).map_err(|e| errno(&e)))
            {
                Ok(fd) => {
                    let fd = Arc::new(fd);
                    (Arc::clone(&fd), DirReader::new(fd))
                }
                Err(e) => return reply.error(e),
            },
        };
        let flags = match mode {
            Mode::Secondary => FopenFlags::empty(),
            _ if s.listed_unchanged(&inode, fd.as_fd()) => {
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
            }
            _ => FopenFlags::empty(),
        };
        let fh = s.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&s.dirs).insert(
            fh,
            Arc::new(DirHandle {
                inode,
                fd,
                last_subdir: AtomicU64::new(0),
                reader: Mutex::new(reader),
            }),
        );
        reply.opened(FileHandle(fh), flags);
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.0.dir_handle(fh) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        self.0.read_next_ahead(&dir, offset);
        let listed = dir.list(offset, |ent| {
            self.0.note_subdir(&dir, ent);
            Some(reply.add(INodeNo(ent.ino), ent.off, ent.kind, ent.name))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let s = &self.0;
        let ttl = s.ttl();
        let dir = match s.dir_handle(fh) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        // When the kernel knows the entries already, looking them up buys nothing: one entry
        // only, and the kernel reads the rest without attributes (it asks for them again
        // only after lookups in the directory).
        s.read_next_ahead(&dir, offset);
        let one_entry = offset == 0 && s.kernel_knows_listing(&dir);
        let mut sent = false;
        let listed = dir.list(offset, |ent| {
            if one_entry && sent {
                return Some(true);
            }
            let added = s.add_plus(&mut reply, &dir, ent, &ttl);
            sent |= added == Some(false);
            if added == Some(false) {
                s.note_subdir(&dir, ent);
            }
            added
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.0.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let d = match s.dir_handle(fh) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        fsync_common(s, &d.inode, fh.0, &d.fd, None, datasync, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = &self.0;
        match rustix::fs::fstatvfs(s.table.root_fd()) {
            Ok(v) => reply.statfs(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                u32::try_from(v.f_bsize).unwrap_or(4096),
                u32::try_from(v.f_namemax).unwrap_or(255),
                u32::try_from(v.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(rerr(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let inode = match s.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        s.mutate(
            reply,
            Scope::Node(&inode),
            false,
            || {
                let node = s.node_ref(&inode);
                let replicate = !s.node_excluded(&inode, &node);
                Ok((
                    replicate,
                    Op::SetXattr {
                        node,
                        name: Cow::Borrowed(name),
                        value: Cow::Borrowed(value),
                        flags,
                    },
                ))
            },
            || {
                let (path, _fd) = s.xattr_path(&inode)?;
                sys::xattr_set(&path, name, value, flags).map_err(|e| errno(&e))?;
                Ok(Applied {
                    value: (),
                    attr: s.attr_now(&inode),
                    written: None,
                })
            },
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let s = &self.0;
        let (path, _fd) = match s.inode(ino).and_then(|i| s.xattr_path(&i)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        if size == 0 {
            match sys::xattr_get_size(&path, name) {
                Ok(n) => reply.size(u32::try_from(n).unwrap_or(u32::MAX)),
                Err(e) => reply.error(errno(&e)),
            }
        } else {
            match sys::xattr_get(&path, name, size as usize) {
                Ok(v) => reply.data(&v),
                Err(e) => reply.error(errno(&e)),
            }
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let s = &self.0;
        let (path, _fd) = match s.inode(ino).and_then(|i| s.xattr_path(&i)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        if size == 0 {
            match sys::xattr_list_size(&path) {
                Ok(n) => reply.size(u32::try_from(n).unwrap_or(u32::MAX)),
                Err(e) => reply.error(errno(&e)),
            }
        } else {
            match sys::xattr_list(&path, size as usize) {
                Ok(v) => reply.data(&v),
                Err(e) => reply.error(errno(&e)),
            }
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let s = &self.0;
        let inode = match s.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        s.mutate(
            reply,
            Scope::Node(&inode),
            false,
            || {
                let node = s.node_ref(&inode);
                let replicate = !s.node_excluded(&inode, &node);
                Ok((
                    replicate,
                    Op::RemoveXattr {
                        node,
                        name: Cow::Borrowed(name),
                    },
                ))
            },
            || {
                let (path, _fd) = s.xattr_path(&inode)?;
                sys::xattr_remove(&path, name).map_err(|e| errno(&e))?;
                Ok(Applied {
                    value: (),
                    attr: s.attr_now(&inode),
                    written: None,
                })
            },
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel checks permissions itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let s = &self.0;
        let p = match s.inode(parent) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let owner = match s.owner_for(req, &p) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        let umask = if s.caps().dont_mask { umask } else { 0 };
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let current = s.mode();
        s.mutate(
            reply,
            Scope::Namespace,
            false,
            || {
                let entry = s.entry_ref(&p, name);
                let replicate = !entry.excluded;
                Ok((
                    replicate,
                    Op::Create {
                        entry,
                        mode,
                        umask,
                        flags,
                        owner,
                    },
                ))
            },
            || {
                // Always O_EXCL: the kernel only creates names it found missing, and it holds the
                // parent locked; an existing file here was made behind our back.
                let oflags =
                    backing_flags(flags, true) | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
                let pfd = s.fd(&p)?;
                let (res, own_umask) = sys::with_umask(umask, || {
                    rustix::fs::openat(&*pfd, name, oflags, RMode::from_raw_mode(mode & 0o7777))
                });
                let file = res.map_err(rerr)?;
                if !own_umask {
                    rustix::fs::fchmod(&file, RMode::from_raw_mode(mode & !umask & 0o7777))
                        .map_err(rerr)?;
                }
                s.give_owner(&file, owner)?;
                let opath = sys::open_path_at(pfd.as_fd(), name).map_err(|e| errno(&e))?;
                let st = sys::stat_fd(opath.as_fd()).map_err(|e| errno(&e))?;
                let inode = s.table.remember(opath, &st, p.nodeid, name);
                s.note_exclusion(&inode);
                // `create` replies also open: no inode has other handles yet, so the policy
                // gives writers FOPEN_DIRECT_IO and readers (O_CREAT|O_RDONLY) the page cache.
                let (kind, fopen, backing) =
                    s.open_policy(&inode, current, writable, &file, |_| {
                        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
                    });
                let fh = s.insert_handle(FileHandleState {
                    inode: inode.clone(),
                    file,
                    kind,
                    _backing: backing.clone(),
                    sync: sync_mode(flags),
                    pinned: false,
                    syncs: s.sync_history(&inode),
                });
                Ok(Applied {
                    value: CreateOk {
                        entry: EntryOk {
                            ttl: s.ttl(),
                            attr: sys::fuse_attr(&st, inode.nodeid),
                            generation: inode.generation(),
                        },
                        fh,
                        flags: fopen,
                        backing,
                    },
                    attr: Some(sys::attr_of(&st)),
                    written: None,
                })
            },
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let h = match s.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        s.mutate(
            reply,
            Scope::Node(&h.inode),
            false,
            || {
                let node = s.node_ref(&h.inode);
                let replicate = !s.node_excluded(&h.inode, &node);
                Ok((
                    replicate,
                    Op::Fallocate {
                        node,
                        fh: fh.0,
                        mode,
                        offset,
                        len: length,
                    },
                ))
            },
            || {
                rustix::fs::fallocate(
                    &h.file,
                    rustix::fs::FallocateFlags::from_bits_retain(mode as _),
                    offset,
                    length,
                )
                .map_err(rerr)?;
                Ok(Applied {
                    value: (),
                    attr: s.attr_now(&h.inode),
                    written: None,
                })
            },
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let s = &self.0;
        let h = match s.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(off),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(off),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(off),
            _ => return reply.error(Errno::EINVAL),
        };
        // A private descriptor: seeking the handle's own one would move a shared position.
        let res = sys::reopen(h.file.as_fd(), OFlags::RDONLY)
            .map_err(|e| errno(&e))
            .and_then(|f| rustix::fs::seek(&f, pos).map_err(rerr));
        match res {
            Ok(p) => reply.offset(i64::try_from(p).unwrap_or(i64::MAX)),
            Err(e) => reply.error(e),
        }
    }
}

fn remove(s: &Arc<Shared>, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
    let p = match s.inode(parent) {
        Ok(p) => p,
        Err(e) => return reply.error(e),
    };
    let target = Mutex::new(None::<FileId>);
    s.mutate(
        reply,
        Scope::Namespace,
        false,
        || {
            let entry = s.entry_ref(&p, name);
            let replicate = !entry.excluded;
            let id = sys::stat_at(s.fd(&p)?.as_fd(), name)
                .ok()
                .map(|st| sys::file_id(&st));
            *lock(&target) = id;
            let op = if dir {
                Op::Rmdir { entry, target: id }
            } else {
                Op::Unlink { entry, target: id }
            };
            Ok((replicate, op))
        },
        || {
            let flags = if dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            rustix::fs::unlinkat(&*s.fd(&p)?, name, flags).map_err(rerr)?;
            if let Some(n) = lock(&target).and_then(|id| s.table.nodeid_of(id)) {
                s.table.clear_link_if(n, p.nodeid, name);
            }
            Ok(Applied {
                value: (),
                attr: None,
                written: None,
            })
        },
    );
}

fn fsync_common(
    s: &Arc<Shared>,
    inode: &Arc<Inode>,
    fh: u64,
    fd: &OwnedFd,
    syncs: Option<&SyncHistory>,
    datasync: bool,
    reply: ReplyEmpty,
) {
    if s.mode() == Mode::Secondary {
        // Nothing was written through this mount: like fsync on a read-only mount.
        return reply.ok();
    }
    s.mutate(
        reply,
        Scope::Node(inode),
        true,
        || {
            let node = s.node_ref(inode);
            let replicate = !s.node_excluded(inode, &node);
            Ok((replicate, Op::Fsync { node, fh, datasync }))
        },
        || {
            if datasync {
                rustix::fs::fdatasync(fd).map_err(rerr)?;
            } else {
                rustix::fs::fsync(fd).map_err(rerr)?;
            }
            if let Some(syncs) = syncs {
                syncs.synced();
            }
            Ok(Applied {
                value: (),
                attr: None,
                written: None,
            })
        },
    );
}
