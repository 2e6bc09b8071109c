//! The inode table: FUSE node ids to backing inodes.
//!
//! Every inode the kernel knows (it looked it up and has not forgotten it) has one entry. It
//! identifies the backing inode by its kernel file handle (`tandem_backing::FileHandle`), which
//! holds no descriptor: an `O_PATH` descriptor is opened from the handle when an operation needs
//! one and kept in the entry's slot of a bounded cache ([`FdCache`]), so the descriptors of the
//! process stay few however many inodes the kernel knows. Inodes whose filesystem has no file
//! handles, and those of other filesystems mounted below the directory, keep their descriptor
//! for as long as the entry lives (pinned), as the root does. An inode with open files keeps its
//! descriptor pinned while they are open (the application's descriptors bound those).
//!
//! Entries are keyed by node id and found by backing `(st_dev, st_ino)` too, so two hard links of
//! one file are one FUSE inode: most node ids are the inode number itself, so only the others
//! (synthetic ids) need a second map. The node id is the backing `st_ino` itself when the inode is on the
//! backing directory's filesystem (so `stat` through the mount shows the real inode numbers and
//! hard links stay recognisable); inodes of other filesystems mounted below the directory get
//! synthetic ids with the top bit set. Since no descriptor keeps a backing inode alive, its
//! number may be reused by a new file while the kernel still knows the old node (deleted
//! meanwhile): the file handles differ (they carry the generation), and the new inode gets an
//! entry of its own with a synthetic node id; the old one only waits for its forget.
//!
//! The table also remembers, for each node, the last `(parent, name)` under which the kernel
//! reached it: the source of [`crate::NodeRef::path`] and of exclusion decisions.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileType};
use rustix::fs::{OFlags, Stat};
use tandem_backing::{CacheStats, FdCache, FileHandle, Slot, Slots};

use crate::lock;
use crate::mutation::FileId;
use crate::sys;
use crate::writeback::SyncHistory;

/// FUSE's node id of the root.
pub(crate) const ROOT: u64 = 1;
const SYNTHETIC: u64 = 1 << 63;
/// Deepest path the table reconstructs (a guard against a corrupted parent chain).
const MAX_DEPTH: usize = 4096;

/// Open handles of one inode, by kind (see the open policy in `fs.rs`); kept beside the table,
/// for the inodes with open handles only.
#[derive(Debug, Default)]
pub(crate) struct OpenState {
    /// Handles opened with `FOPEN_PASSTHROUGH` (readers, and writers forced to it).
    pub(crate) passthrough: u32,
    /// Cached (`FOPEN_KEEP_CACHE`) readers.
    pub(crate) cached: u32,
    /// `FOPEN_DIRECT_IO` handles without a backing file.
    pub(crate) direct: u32,
    /// The backing id shared by all passthrough handles of the inode.
    pub(crate) backing: Option<Arc<BackingId>>,
}

/// One known inode.
#[derive(Debug)]
pub(crate) struct Inode {
    pub(crate) nodeid: u64,
    pub(crate) generation: u64,
    pub(crate) id: FileId,
    pub(crate) kind: FileType,
    /// The backing inode's file handle; `None`: its descriptor is pinned in `slot`.
    handle: Option<FileHandle>,
    /// Where an open `O_PATH` descriptor of the backing inode is kept (see [`InodeTable::fd`]).
    slot: Slot,
    /// Serialises the submit and the local apply of mutations of this inode.
    pub(crate) order: Mutex<()>,
    /// Whether the last known path of the inode was excluded from replication (used when the
    /// path is no longer known, e.g. unlinked while open).
    pub(crate) excluded: AtomicBool,
    /// When the file was last synced through the mount (flush-behind, see [`crate::writeback`]).
    pub(crate) syncs: SyncHistory,
}

impl Slots for Inode {
    fn slot(&self, _: u8) -> &Slot {
        &self.slot
    }
}

/// A file name: 24 bytes, without an allocation of its own up to 22 bytes (most names).
enum Name {
    Inline { len: u8, bytes: [u8; 22] },
    Heap(Box<OsStr>),
}

impl Name {
    fn new(name: &OsStr) -> Name {
        let raw = name.as_bytes();
        match u8::try_from(raw.len()) {
            Ok(len) if raw.len() <= 22 => {
                let mut bytes = [0; 22];
                bytes[..raw.len()].copy_from_slice(raw);
                Name::Inline { len, bytes }
            }
            _ => Name::Heap(name.into()),
        }
    }

    fn as_os_str(&self) -> &OsStr {
        match self {
            Name::Inline { len, bytes } => OsStr::from_bytes(&bytes[..usize::from(*len)]),
            Name::Heap(name) => name,
        }
    }
}

struct Entry {
    inode: Arc<Inode>,
    lookups: u64,
    /// The last `(parent node id, name)` under which the kernel reached it, when known.
    link: Option<(u64, Name)>,
}

#[derive(Default)]
struct Tables {
    by_node: HashMap<u64, Entry>,
    /// Other names under which the kernel reached a node before its current `link` (hard
    /// links, mostly): the kernel may still hold entries for them, which a switch to the
    /// secondary mode must invalidate (see `names`). Few nodes have any.
    aliases: HashMap<u64, Vec<(u64, Name)>>,
    /// The node id of an identity when it is not the identity's `st_ino` on the backing
    /// filesystem (the root, other filesystems, a reused inode number); the other nodes are
    /// found in `by_node` under their `st_ino`.
    by_id: HashMap<FileId, u64>,
}

impl Tables {
    /// The node an identity is known under.
    fn nodeid_of(&self, id: FileId, root_dev: u64) -> Option<u64> {
        if let Some(&nodeid) = self.by_id.get(&id) {
            return Some(nodeid);
        }
        (id.dev == root_dev)
            .then_some(id.ino)
            .filter(|ino| self.by_node.get(ino).is_some_and(|e| e.inode.id == id))
    }
}

/// Open `O_PATH` descriptors kept for inodes without open files, at most.
pub(crate) const CACHED_DESCRIPTORS: usize = 256;

/// The table.
pub(crate) struct InodeTable {
    inner: Mutex<Tables>,
    root: Arc<Inode>,
    /// The root's `O_PATH` descriptor (also in its slot, pinned).
    root_fd: Arc<OwnedFd>,
    root_dev: u64,
    /// A descriptor of the root that `open_by_handle_at` accepts (not `O_PATH`); `None` when the
    /// backing filesystem has no file handles (every entry then pins its descriptor).
    mount: Option<OwnedFd>,
    cache: FdCache,
    next_generation: AtomicU64,
    next_synthetic: AtomicU64,
}

impl InodeTable {
    /// A table holding only the root, given its `O_PATH` descriptor, keeping at most `cached`
    /// descriptors of other inodes open.
    pub(crate) fn new(root_fd: OwnedFd, st: &Stat, cached: usize) -> InodeTable {
        let mount = sys::open_dir(root_fd.as_fd())
            .and_then(|dir| FileHandle::of_fd(dir.as_fd()).map(|_| dir))
            .inspect_err(|e| {
                tracing::warn!(
                    "the backing filesystem gives no file handles ({e}): every inode the kernel \
                     knows keeps a descriptor open"
                );
            })
            .ok();
        let root_fd = Arc::new(root_fd);
        let root = Arc::new(Inode {
            nodeid: ROOT,
            generation: 0,
            id: sys::file_id(st),
            kind: FileType::Directory,
            handle: None,
            slot: Slot::with(root_fd.clone(), true),
            order: Mutex::new(()),
            excluded: AtomicBool::new(false),
            syncs: SyncHistory::new(),
        });
        let mut tables = Tables::default();
        tables.by_id.insert(root.id, ROOT);
        tables.by_node.insert(
            ROOT,
            Entry {
                inode: root.clone(),
                lookups: 1,
                link: None,
            },
        );
        InodeTable {
            inner: Mutex::new(tables),
            root,
            root_fd,
            root_dev: st.st_dev,
            mount,
            cache: FdCache::new(cached),
            next_generation: AtomicU64::new(1),
            next_synthetic: AtomicU64::new(1),
        }
    }

    /// An `O_PATH` descriptor of the inode's backing inode: from its slot, else reopened from
    /// its file handle (`ESTALE` when the backing inode no longer exists). Hold it only for the
    /// operation at hand.
    pub(crate) fn fd(&self, inode: &Arc<Inode>) -> io::Result<Arc<OwnedFd>> {
        match (&inode.handle, &self.mount) {
            (Some(handle), Some(mount)) => self.cache.get(inode, 0, || {
                handle.open(mount.as_fd(), OFlags::PATH | OFlags::NOFOLLOW)
            }),
            _ => inode
                .slot
                .get()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE)),
        }
    }

    /// Keeps the inode's descriptor open until [`InodeTable::unpin`] (while it has open files:
    /// a file unlinked while open cannot always be reopened from its handle).
    pub(crate) fn pin(&self, inode: &Arc<Inode>) -> io::Result<()> {
        let _fd = self.fd(inode)?;
        inode.slot.pin();
        Ok(())
    }

    /// Undoes one [`InodeTable::pin`].
    pub(crate) fn unpin(&self, inode: &Inode) {
        inode.slot.unpin();
    }

    /// The descriptor cache's counters.
    pub(crate) fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The root's `O_PATH` descriptor.
    pub(crate) fn root_fd(&self) -> BorrowedFd<'_> {
        self.root_fd.as_fd()
    }

    pub(crate) fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        if nodeid == ROOT {
            return Some(self.root.clone());
        }
        lock(&self.inner)
            .by_node
            .get(&nodeid)
            .map(|e| e.inode.clone())
    }

    /// Every known inode.
    pub(crate) fn all(&self) -> Vec<Arc<Inode>> {
        lock(&self.inner)
            .by_node
            .values()
            .map(|e| e.inode.clone())
            .collect()
    }

    /// Records one more kernel reference to the inode `fd`/`st` reached as `name` in `parent`,
    /// creating the entry if needed (then `fd` goes to its slot). Returns the entry.
    pub(crate) fn remember(&self, fd: OwnedFd, st: &Stat, parent: u64, name: &OsStr) -> Arc<Inode> {
        // Only for an inode of the backing filesystem (the mount descriptor opens no other).
        let handle = match &self.mount {
            Some(_) if st.st_dev == self.root_dev => FileHandle::of_fd(fd.as_fd()).ok(),
            _ => None,
        };
        self.insert(Some(fd), handle, st, parent, name)
    }

    /// Whether [`InodeTable::remember_by_name`] can serve an inode of device `dev` (one of the
    /// backing filesystem, when it gives file handles).
    pub(crate) fn by_name_possible(&self, dev: u64) -> bool {
        self.mount.is_some() && dev == self.root_dev
    }

    /// [`InodeTable::remember`] of the entry `name` of `dir` (node `parent`), found by `stat_at`
    /// as `st`, without opening it: its file handle is taken by name. The caller guarantees that
    /// the name still designates the inode `st` describes (the kernel holds the directory's lock
    /// and nothing else changes it) and that [`InodeTable::by_name_possible`] holds.
    pub(crate) fn remember_by_name(
        &self,
        dir: BorrowedFd<'_>,
        st: &Stat,
        parent: u64,
        name: &OsStr,
    ) -> io::Result<Arc<Inode>> {
        let handle = FileHandle::of_name(dir, name)?;
        Ok(self.insert(None, Some(handle), st, parent, name))
    }

    /// Records a kernel reference to an inode given by a descriptor or a file handle (at least
    /// one of them).
    fn insert(
        &self,
        fd: Option<OwnedFd>,
        handle: Option<FileHandle>,
        st: &Stat,
        parent: u64,
        name: &OsStr,
    ) -> Arc<Inode> {
        let id = sys::file_id(st);
        let mut t = lock(&self.inner);
        if let Some(nodeid) = t.nodeid_of(id, self.root_dev) {
            if nodeid == ROOT {
                return self.root.clone();
            }
            let Tables {
                by_node, aliases, ..
            } = &mut *t;
            if let Some(entry) = by_node.get_mut(&nodeid) {
                if handle.is_none() || entry.inode.handle.is_none() || entry.inode.handle == handle
                {
                    entry.lookups += 1;
                    let old = entry.link.replace((parent, Name::new(name)));
                    if let Some((p, n)) = old
                        && (p != parent || n.as_os_str() != name)
                    {
                        let aliases = aliases.entry(nodeid).or_default();
                        if !aliases
                            .iter()
                            .any(|(ap, an)| *ap == p && an.as_os_str() == n.as_os_str())
                        {
                            aliases.push((p, n));
                        }
                    }
                    return entry.inode.clone();
                }
                // The number of a deleted inode the kernel still knows, reused by a new file:
                // the old entry keeps its node id until its forget (with no name: the name is
                // the new file's), the new one gets its own.
                entry.link = None;
            }
        }
        let nodeid = if st.st_dev == self.root_dev
            && st.st_ino != ROOT
            && st.st_ino != 0
            && st.st_ino & SYNTHETIC == 0
            && !t.by_node.contains_key(&st.st_ino)
        {
            st.st_ino
        } else {
            SYNTHETIC | self.next_synthetic.fetch_add(1, Ordering::Relaxed)
        };
        let (slot, cached) = match (&handle, fd) {
            (None, Some(fd)) => (Slot::with(Arc::new(fd), true), None),
            (None, None) => {
                // Not reached: callers give a descriptor or a handle. An empty unpinned slot
                // without a handle would fail every operation with ESTALE, not crash.
                tracing::error!(
                    nodeid,
                    "inode remembered with neither descriptor nor handle"
                );
                (Slot::default(), None)
            }
            (Some(_), fd) => (Slot::default(), fd),
        };
        let inode = Arc::new(Inode {
            nodeid,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            id,
            kind: sys::file_type(st.st_mode),
            handle,
            slot,
            order: Mutex::new(()),
            excluded: AtomicBool::new(false),
            syncs: SyncHistory::new(),
        });
        if nodeid != st.st_ino {
            t.by_id.insert(id, nodeid);
        }
        t.by_node.insert(
            nodeid,
            Entry {
                inode: inode.clone(),
                lookups: 1,
                link: Some((parent, Name::new(name))),
            },
        );
        drop(t);
        if let Some(fd) = cached {
            // The descriptor the lookup opened serves the operations that follow it.
            self.cache.insert(&inode, 0, fd);
        }
        inode
    }

    /// The kernel dropped `n` references. Returns the inode when this removed its entry, and
    /// whether its identity still named it (and not a newer inode that reused its number: then
    /// the replicator must not hear of a forget).
    pub(crate) fn forget(&self, nodeid: u64, n: u64) -> Option<(Arc<Inode>, bool)> {
        if nodeid == ROOT {
            return None;
        }
        let mut t = lock(&self.inner);
        let gone = match t.by_node.get_mut(&nodeid) {
            Some(entry) => {
                entry.lookups = entry.lookups.saturating_sub(n);
                entry.lookups == 0
            }
            None => false,
        };
        if gone && let Some(entry) = t.by_node.remove(&nodeid) {
            t.aliases.remove(&nodeid);
            let id = entry.inode.id;
            let current = match t.by_id.get(&id) {
                Some(&known) if known == nodeid => {
                    t.by_id.remove(&id);
                    true
                }
                // A newer inode reused the number: it holds the identity now.
                Some(_) => false,
                None => true,
            };
            drop(t);
            self.cache.close(&*entry.inode, 0);
            return Some((entry.inode, current));
        }
        None
    }

    /// Sets the known name of a node (after a rename or link).
    pub(crate) fn set_link(&self, nodeid: u64, parent: u64, name: &OsStr) {
        if nodeid == ROOT {
            return;
        }
        if let Some(entry) = lock(&self.inner).by_node.get_mut(&nodeid) {
            entry.link = Some((parent, Name::new(name)));
        }
    }

    /// Forgets the known name of a node if it is `(parent, name)` (after an unlink, or when the
    /// name now designates another inode).
    pub(crate) fn clear_link_if(&self, nodeid: u64, parent: u64, name: &OsStr) {
        if let Some(entry) = lock(&self.inner).by_node.get_mut(&nodeid)
            && entry
                .link
                .as_ref()
                .is_some_and(|(p, n)| *p == parent && n.as_os_str() == name)
        {
            entry.link = None;
        }
    }

    /// Every `(parent, name)` under which the kernel may hold an entry of a known node: their
    /// current links and earlier names (see `Tables::aliases`).
    pub(crate) fn names(&self) -> Vec<(u64, OsString)> {
        let t = lock(&self.inner);
        let links = t
            .by_node
            .values()
            .filter_map(|e| e.link.as_ref())
            .chain(t.aliases.values().flatten());
        links
            .map(|(parent, name)| (*parent, name.as_os_str().to_os_string()))
            .collect()
    }

    /// The known link of a node.
    pub(crate) fn link_of(&self, nodeid: u64) -> Option<(u64, OsString)> {
        let t = lock(&self.inner);
        let (parent, name) = t.by_node.get(&nodeid)?.link.as_ref()?;
        Some((*parent, name.as_os_str().to_os_string()))
    }

    /// The node id an existing backing inode is known under.
    pub(crate) fn nodeid_of(&self, id: FileId) -> Option<u64> {
        lock(&self.inner).nodeid_of(id, self.root_dev)
    }

    /// The path of a node relative to the root, from the known links; `None` if a link on the way
    /// is unknown.
    pub(crate) fn path_of(&self, nodeid: u64) -> Option<PathBuf> {
        let t = lock(&self.inner);
        let mut names: Vec<&OsStr> = Vec::new();
        let mut current = nodeid;
        while current != ROOT {
            if names.len() >= MAX_DEPTH {
                return None;
            }
            let (parent, name) = t.by_node.get(&current)?.link.as_ref()?;
            names.push(name.as_os_str());
            current = *parent;
        }
        let mut path = PathBuf::new();
        for name in names.iter().rev() {
            path.push(name);
        }
        Some(path)
    }

    /// Number of known inodes (root included).
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).by_node.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_up_to_22_bytes_are_inline() {
        for name in [
            "a",
            "twenty-two-bytes-name.",
            "a name longer than twenty-two bytes",
        ] {
            let n = Name::new(OsStr::new(name));
            assert_eq!(n.as_os_str(), name);
            assert_eq!(matches!(n, Name::Inline { .. }), name.len() <= 22);
        }
        assert_eq!(std::mem::size_of::<Name>(), 24);
    }
}
