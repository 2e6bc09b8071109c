//! The inode table: FUSE node ids to backing `O_PATH` descriptors.
//!
//! Every inode the kernel knows (it looked it up and has not forgotten it) has one entry holding
//! an `O_PATH` descriptor of the backing inode. Entries are keyed both by node id and by backing
//! `(st_dev, st_ino)`, so two hard links of one file are one FUSE inode. The node id is the
//! backing `st_ino` itself when the inode is on the backing directory's filesystem (so `stat`
//! through the mount shows the real inode numbers and hard links stay recognisable); inodes of
//! other filesystems mounted below the directory get synthetic ids with the top bit set. Since the
//! descriptor keeps the backing inode alive, its number cannot be reused while the entry exists;
//! once the kernel forgets it and the entry goes, a new file may get the same number, and then a
//! new generation.
//!
//! The table also remembers, for each node, the last `(parent, name)` under which the kernel
//! reached it: the source of [`crate::NodeRef::path`] and of exclusion decisions.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileType};
use rustix::fs::Stat;

use crate::lock;
use crate::mutation::FileId;
use crate::sys;
use crate::writeback::SyncHistory;

/// FUSE's node id of the root.
pub(crate) const ROOT: u64 = 1;
const SYNTHETIC: u64 = 1 << 63;
/// Deepest path the table reconstructs (a guard against a corrupted parent chain).
const MAX_DEPTH: usize = 4096;

/// Open handles of one inode, by kind (see the open policy in `fs.rs`).
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
    /// `O_PATH` descriptor of the backing inode.
    pub(crate) fd: OwnedFd,
    /// Serialises the submit and the local apply of mutations of this inode.
    pub(crate) order: Mutex<()>,
    /// Open handles (passthrough policy).
    pub(crate) open: Mutex<OpenState>,
    /// Whether the last known path of the inode was excluded from replication (used when the
    /// path is no longer known, e.g. unlinked while open).
    pub(crate) excluded: AtomicBool,
    /// When the file was last synced through the mount (flush-behind, see [`crate::writeback`]).
    pub(crate) syncs: SyncHistory,
}

struct Entry {
    inode: Arc<Inode>,
    lookups: u64,
}

#[derive(Default)]
struct Tables {
    by_node: HashMap<u64, Entry>,
    by_id: HashMap<FileId, u64>,
    /// Last known `(parent node id, name)` of each node.
    links: HashMap<u64, (u64, OsString)>,
}

/// The table.
pub(crate) struct InodeTable {
    inner: Mutex<Tables>,
    root: Arc<Inode>,
    root_dev: u64,
    next_generation: AtomicU64,
    next_synthetic: AtomicU64,
}

impl InodeTable {
    /// A table holding only the root, given its `O_PATH` descriptor.
    pub(crate) fn new(root_fd: OwnedFd, st: &Stat) -> InodeTable {
        let root = Arc::new(Inode {
            nodeid: ROOT,
            generation: 0,
            id: sys::file_id(st),
            kind: FileType::Directory,
            fd: root_fd,
            order: Mutex::new(()),
            open: Mutex::new(OpenState::default()),
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
            },
        );
        InodeTable {
            inner: Mutex::new(tables),
            root,
            root_dev: st.st_dev,
            next_generation: AtomicU64::new(1),
            next_synthetic: AtomicU64::new(1),
        }
    }

    pub(crate) fn root(&self) -> &Arc<Inode> {
        &self.root
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
    /// creating the entry if needed (then it keeps `fd`). Returns the entry.
    pub(crate) fn remember(&self, fd: OwnedFd, st: &Stat, parent: u64, name: &OsStr) -> Arc<Inode> {
        let id = sys::file_id(st);
        let mut t = lock(&self.inner);
        if let Some(&nodeid) = t.by_id.get(&id) {
            if nodeid == ROOT {
                return self.root.clone();
            }
            t.links.insert(nodeid, (parent, name.to_owned()));
            if let Some(entry) = t.by_node.get_mut(&nodeid) {
                entry.lookups += 1;
                return entry.inode.clone();
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
        let inode = Arc::new(Inode {
            nodeid,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            id,
            kind: sys::file_type(st.st_mode),
            fd,
            order: Mutex::new(()),
            open: Mutex::new(OpenState::default()),
            excluded: AtomicBool::new(false),
            syncs: SyncHistory::new(),
        });
        t.by_id.insert(id, nodeid);
        t.by_node.insert(
            nodeid,
            Entry {
                inode: inode.clone(),
                lookups: 1,
            },
        );
        t.links.insert(nodeid, (parent, name.to_owned()));
        inode
    }

    /// The kernel dropped `n` references. Returns the inode when this removed its entry (the
    /// caller tells the replicator before dropping it, so that its backing inode number cannot
    /// be reused before the replicator heard of the forget).
    pub(crate) fn forget(&self, nodeid: u64, n: u64) -> Option<Arc<Inode>> {
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
            t.by_id.remove(&entry.inode.id);
            t.links.remove(&nodeid);
            return Some(entry.inode);
        }
        None
    }

    /// Sets the known name of a node (after a rename or link).
    pub(crate) fn set_link(&self, nodeid: u64, parent: u64, name: &OsStr) {
        if nodeid == ROOT {
            return;
        }
        let mut t = lock(&self.inner);
        if t.by_node.contains_key(&nodeid) {
            t.links.insert(nodeid, (parent, name.to_owned()));
        }
    }

    /// Forgets the known name of a node if it is `(parent, name)` (after an unlink, or when the
    /// name now designates another inode).
    pub(crate) fn clear_link_if(&self, nodeid: u64, parent: u64, name: &OsStr) {
        let mut t = lock(&self.inner);
        if let Some((p, n)) = t.links.get(&nodeid)
            && *p == parent
            && n.as_os_str() == name
        {
            t.links.remove(&nodeid);
        }
    }

    /// The known link of a node.
    pub(crate) fn link_of(&self, nodeid: u64) -> Option<(u64, OsString)> {
        lock(&self.inner).links.get(&nodeid).cloned()
    }

    /// The node id an existing backing inode is known under.
    pub(crate) fn nodeid_of(&self, id: FileId) -> Option<u64> {
        lock(&self.inner).by_id.get(&id).copied()
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
            let (parent, name) = t.links.get(&current)?;
            names.push(name);
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
