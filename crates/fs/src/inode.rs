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
use std::hash::BuildHasher;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileType};
use hashbrown::{DefaultHashBuilder, HashTable};
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
    /// When the file was last synced through the mount (flush-behind, see
    /// [`crate::writeback`]), shared by its open handles.
    pub(crate) syncs: Arc<SyncHistory>,
}

/// One known inode: 104 bytes, so that with the `Arc`'s counters and the allocator's header it
/// takes a 128-byte chunk (the unit test `a_known_inode_costs_at_most_150_bytes`). Millions of
/// them are known at once: each field counts. Its backing identity is not stored: a node id is
/// the backing `st_ino` on the backing filesystem's device, except for the root and synthetic
/// node ids, whose identities the table keeps (see [`InodeTable::id`]).
#[derive(Debug)]
pub(crate) struct Inode {
    pub(crate) nodeid: u64,
    /// The FUSE generation (a counter of the table: it wraps after 2³² inodes, and only tells a
    /// reused node id apart from the inodes the kernel may still know under it).
    generation: u32,
    pub(crate) kind: FileType,
    /// The backing inode's file handle; `None`: its descriptor is pinned in `slot`.
    handle: Option<FileHandle>,
    /// Where an open `O_PATH` descriptor of the backing inode is kept (see [`InodeTable::fd`]).
    slot: Slot,
    /// Kernel references not yet forgotten. Changed with the table's lock held only (atomic
    /// for its interior mutability).
    lookups: AtomicU64,
    /// The last `(parent node id, name)` under which the kernel reached it, when known. Changed
    /// and read with the table's lock held (taken before this one) only.
    link: Mutex<Option<(u64, Name)>>,
    /// Serialises the submit and the local apply of mutations of this inode (one byte).
    pub(crate) order: parking_lot::Mutex<()>,
    /// Whether the last known path of the inode was excluded from replication (used when the
    /// path is no longer known, e.g. unlinked while open).
    pub(crate) excluded: AtomicBool,
}

impl Inode {
    /// The FUSE generation.
    pub(crate) fn generation(&self) -> u64 {
        u64::from(self.generation)
    }
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

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_os_str().fmt(f)
    }
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

#[derive(Default)]
struct Tables {
    /// The known inodes by node id: one pointer per bucket, the rest is in the inode.
    by_node: HashTable<Arc<Inode>>,
    hasher: DefaultHashBuilder,
    /// Other names under which the kernel reached a node before its current `link` (hard
    /// links, mostly): the kernel may still hold entries for them, which a switch to the
    /// secondary mode must invalidate (see `names`). Few nodes have any.
    aliases: HashMap<u64, Vec<(u64, Name)>>,
    /// The node id of an identity when it is not the identity's `st_ino` on the backing
    /// filesystem (the root, other filesystems, a reused inode number); the other nodes are
    /// found in `by_node` under their `st_ino`.
    by_id: HashMap<FileId, u64>,
    /// The identity of the nodes whose node id is not their `st_ino` (the root, synthetic node
    /// ids): the reverse of `by_id` for them.
    ids: HashMap<u64, FileId>,
    /// The backing filesystem's device.
    root_dev: u64,
}

impl Tables {
    /// The backing identity of a known node.
    fn id(&self, inode: &Inode) -> FileId {
        match self.ids.get(&inode.nodeid) {
            Some(id) => *id,
            None => FileId {
                dev: self.root_dev,
                ino: inode.nodeid,
            },
        }
    }

    fn node(&self, nodeid: u64) -> Option<&Arc<Inode>> {
        self.by_node
            .find(self.hasher.hash_one(nodeid), |i| i.nodeid == nodeid)
    }

    fn add(&mut self, inode: Arc<Inode>) {
        let hasher = &self.hasher;
        self.by_node
            .insert_unique(hasher.hash_one(inode.nodeid), inode, |i| {
                hasher.hash_one(i.nodeid)
            });
    }

    fn remove(&mut self, nodeid: u64) -> Option<Arc<Inode>> {
        let entry = self
            .by_node
            .find_entry(self.hasher.hash_one(nodeid), |i| i.nodeid == nodeid)
            .ok()?;
        Some(entry.remove().0)
    }

    /// The node an identity is known under.
    fn nodeid_of(&self, id: FileId, root_dev: u64) -> Option<u64> {
        if let Some(&nodeid) = self.by_id.get(&id) {
            return Some(nodeid);
        }
        // A node id that is not an identity's `st_ino` is in `by_id`; the others are theirs.
        (id.dev == root_dev)
            .then_some(id.ino)
            .filter(|&ino| ino & SYNTHETIC == 0 && ino != ROOT && self.node(ino).is_some())
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
    next_generation: AtomicU32,
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
            kind: FileType::Directory,
            handle: None,
            slot: Slot::with(root_fd.clone(), true),
            lookups: AtomicU64::new(1),
            link: Mutex::new(None),
            order: parking_lot::Mutex::new(()),
            excluded: AtomicBool::new(false),
        });
        let mut tables = Tables {
            root_dev: st.st_dev,
            ..Tables::default()
        };
        let root_id = sys::file_id(st);
        tables.by_id.insert(root_id, ROOT);
        tables.ids.insert(ROOT, root_id);
        tables.add(root.clone());
        InodeTable {
            inner: Mutex::new(tables),
            root,
            root_fd,
            root_dev: st.st_dev,
            mount,
            cache: FdCache::new(cached),
            next_generation: AtomicU32::new(1),
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
        lock(&self.inner).node(nodeid).cloned()
    }

    /// Every known inode.
    pub(crate) fn all(&self) -> Vec<Arc<Inode>> {
        lock(&self.inner).by_node.iter().cloned().collect()
    }

    /// Records one more kernel reference to the inode `fd`/`st` reached as `name` in `parent`,
    /// creating the entry if needed (then `fd` goes to its slot). Returns the entry.
    pub(crate) fn remember(&self, fd: OwnedFd, st: &Stat, parent: u64, name: &OsStr) -> Arc<Inode> {
        // Only for an inode of the backing filesystem (the mount descriptor opens no other).
        let handle = match &self.mount {
            Some(_) if st.st_dev == self.root_dev => FileHandle::of_fd(fd.as_fd()).ok(),
            _ => None,
        };
        self.insert(fd, handle, st, parent, name)
    }

    /// Records a kernel reference to the inode `fd` (with its handle, if any) designates.
    fn insert(
        &self,
        fd: OwnedFd,
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
            if let Some(known) = t.node(nodeid).cloned() {
                if handle.is_none() || known.handle.is_none() || known.handle == handle {
                    known.lookups.fetch_add(1, Ordering::Relaxed);
                    let old = lock(&known.link).replace((parent, Name::new(name)));
                    if let Some((p, n)) = old
                        && (p != parent || n.as_os_str() != name)
                    {
                        let aliases = t.aliases.entry(nodeid).or_default();
                        if !aliases
                            .iter()
                            .any(|(ap, an)| *ap == p && an.as_os_str() == n.as_os_str())
                        {
                            aliases.push((p, n));
                        }
                    }
                    return known;
                }
                // The number of a deleted inode the kernel still knows, reused by a new file:
                // the old entry keeps its node id until its forget (with no name: the name is
                // the new file's), the new one gets its own.
                *lock(&known.link) = None;
            }
        }
        let nodeid = if st.st_dev == self.root_dev
            && st.st_ino != ROOT
            && st.st_ino != 0
            && st.st_ino & SYNTHETIC == 0
            && t.node(st.st_ino).is_none()
        {
            st.st_ino
        } else {
            SYNTHETIC | self.next_synthetic.fetch_add(1, Ordering::Relaxed)
        };
        let (slot, cached) = match handle {
            None => (Slot::with(Arc::new(fd), true), None),
            Some(_) => (Slot::default(), Some(fd)),
        };
        let inode = Arc::new(Inode {
            nodeid,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            kind: sys::file_type(st.st_mode),
            handle,
            slot,
            lookups: AtomicU64::new(1),
            link: Mutex::new(Some((parent, Name::new(name)))),
            order: parking_lot::Mutex::new(()),
            excluded: AtomicBool::new(false),
        });
        if nodeid != st.st_ino {
            t.by_id.insert(id, nodeid);
            t.ids.insert(nodeid, id);
        }
        t.add(inode.clone());
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
        let gone = match t.node(nodeid) {
            Some(inode) => {
                let left = inode.lookups.load(Ordering::Relaxed).saturating_sub(n);
                inode.lookups.store(left, Ordering::Relaxed);
                left == 0
            }
            None => false,
        };
        if gone && let Some(inode) = t.remove(nodeid) {
            t.aliases.remove(&nodeid);
            let id = t.id(&inode);
            t.ids.remove(&nodeid);
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
            self.cache.close(&*inode, 0);
            return Some((inode, current));
        }
        None
    }

    /// Sets the known name of a node (after a rename or link).
    pub(crate) fn set_link(&self, nodeid: u64, parent: u64, name: &OsStr) {
        if nodeid == ROOT {
            return;
        }
        let t = lock(&self.inner);
        if let Some(inode) = t.node(nodeid) {
            *lock(&inode.link) = Some((parent, Name::new(name)));
        }
    }

    /// Forgets the known name of a node if it is `(parent, name)` (after an unlink, or when the
    /// name now designates another inode).
    pub(crate) fn clear_link_if(&self, nodeid: u64, parent: u64, name: &OsStr) {
        let t = lock(&self.inner);
        if let Some(inode) = t.node(nodeid) {
            let mut link = lock(&inode.link);
            if link
                .as_ref()
                .is_some_and(|(p, n)| *p == parent && n.as_os_str() == name)
            {
                *link = None;
            }
        }
    }

    /// Every `(parent, name)` under which the kernel may hold an entry of a known node: their
    /// current links and earlier names (see `Tables::aliases`).
    pub(crate) fn names(&self) -> Vec<(u64, OsString)> {
        let t = lock(&self.inner);
        let mut names: Vec<(u64, OsString)> = t
            .by_node
            .iter()
            .filter_map(|i| {
                let link = lock(&i.link);
                let (parent, name) = link.as_ref()?;
                Some((*parent, name.as_os_str().to_os_string()))
            })
            .collect();
        names.extend(
            t.aliases
                .values()
                .flatten()
                .map(|(parent, name)| (*parent, name.as_os_str().to_os_string())),
        );
        names
    }

    /// The known link of a node.
    pub(crate) fn link_of(&self, nodeid: u64) -> Option<(u64, OsString)> {
        let t = lock(&self.inner);
        let link = lock(&t.node(nodeid)?.link);
        let (parent, name) = link.as_ref()?;
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
        // Built leaf first, each name's bytes reversed, then reversed whole: one allocation
        // however deep the node (this runs for every mutation). Names hold no '/'.
        let mut reversed: Vec<u8> = Vec::new();
        let mut current = nodeid;
        let mut depth = 0;
        while current != ROOT {
            if depth >= MAX_DEPTH {
                return None;
            }
            let link = lock(&t.node(current)?.link);
            let (parent, name) = link.as_ref()?;
            if depth > 0 {
                reversed.push(b'/');
            }
            reversed.extend(name.as_os_str().as_bytes().iter().rev());
            current = *parent;
            depth += 1;
        }
        reversed.reverse();
        Some(PathBuf::from(OsString::from_vec(reversed)))
    }

    /// Whether an inode of the backing filesystem with this number is known (to the kernel).
    pub(crate) fn knows(&self, ino: u64) -> bool {
        lock(&self.inner).node(ino).is_some()
    }

    /// The backing identity of a known node.
    pub(crate) fn id(&self, inode: &Inode) -> FileId {
        if inode.nodeid & SYNTHETIC == 0 && inode.nodeid != ROOT {
            FileId {
                dev: self.root_dev,
                ino: inode.nodeid,
            }
        } else {
            lock(&self.inner).id(inode)
        }
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

    #[test]
    fn a_known_inode_costs_at_most_150_bytes() {
        // The allocation of the `Arc` (two counters and the inode) plus the allocator's header,
        // rounded up to its 16-byte chunks, plus the table's bucket (a pointer and a control
        // byte) at the lowest load the table reaches (7/16 after it doubles).
        let arc = 16 + std::mem::size_of::<Inode>();
        let chunk = (arc + 8).div_ceil(16) * 16;
        let bucket = (8.0 + 1.0) / (7.0 / 16.0);
        eprintln!(
            "Inode {} bytes, chunk {chunk}, bucket {bucket:.0}",
            std::mem::size_of::<Inode>()
        );
        assert_eq!(chunk, 128);
        assert!(chunk as f64 + bucket < 150.0, "{chunk} + {bucket}");
    }
}
