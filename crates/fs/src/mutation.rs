//! The description of every mutating operation: what the replicator receives.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Identity of a file or directory in the backing directory of *this* node: `(st_dev, st_ino)`.
///
/// It identifies hard links as one file. An inode number can be reused once its inode is gone
/// (no descriptor keeps inodes alive): the mount gives a new inode that reuses the number of one
/// the kernel still knows a node of its own, and does not tell the replicator to forget an
/// identity a newer inode holds. It means nothing on the other node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// `st_dev` of the backing inode.
    pub dev: u64,
    /// `st_ino` of the backing inode.
    pub ino: u64,
}

/// A point in time with nanoseconds, as stored in inodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp {
    /// Seconds since the Unix epoch (may be negative).
    pub sec: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nsec: u32,
}

impl Timestamp {
    /// The current time of the system clock.
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }
}

impl From<Timestamp> for rustix::fs::Timespec {
    fn from(t: Timestamp) -> rustix::fs::Timespec {
        rustix::fs::Timespec {
            tv_sec: t.sec,
            tv_nsec: i64::from(t.nsec) as _,
        }
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                // Before the epoch: `e.duration()` is how far before.
                let d = e.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                if d.subsec_nanos() == 0 {
                    Timestamp {
                        sec: -secs,
                        nsec: 0,
                    }
                } else {
                    Timestamp {
                        sec: -secs - 1,
                        nsec: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> SystemTime {
        let nanos = std::time::Duration::from_nanos(u64::from(t.nsec));
        if t.sec >= 0 {
            UNIX_EPOCH + std::time::Duration::from_secs(t.sec.unsigned_abs()) + nanos
        } else {
            UNIX_EPOCH - std::time::Duration::from_secs(t.sec.unsigned_abs()) + nanos
        }
    }
}

/// Attributes of a backing inode, as read after a local apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Backing identity.
    pub id: FileId,
    /// `st_mode`, file type bits included.
    pub mode: u32,
    /// Number of hard links.
    pub nlink: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u64,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Last access.
    pub atime: Timestamp,
    /// Last modification of the contents.
    pub mtime: Timestamp,
    /// Last change of the inode.
    pub ctime: Timestamp,
}

/// A file or directory as the kernel and this node know it: how to find the target of an
/// operation both by identity and by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRef {
    /// FUSE node id (equal to the backing `st_ino` for inodes on the backing directory's own
    /// filesystem; 1 for the root).
    pub nodeid: u64,
    /// FUSE generation of that node id.
    pub generation: u64,
    /// Backing identity on this node.
    pub id: FileId,
    /// One path of the node relative to the root (`""` for the root), if known: the last name the
    /// kernel used to reach it. `None` when it was unlinked while open or its name is not known
    /// (a hard link reached under another name that was since removed).
    pub path: Option<PathBuf>,
}

/// A directory entry: a parent directory and a name in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// The parent directory.
    pub parent: NodeRef,
    /// The name in the parent (one component, never `.` or `..`).
    pub name: Cow<'a, OsStr>,
    /// The entry's path relative to the root, when the parent's path is known.
    pub path: Option<PathBuf>,
    /// Whether the path matches an `exclude` glob (or lies under an excluded directory).
    pub excluded: bool,
}

impl EntryRef<'_> {
    /// Converts the borrowed fields to owned ones.
    pub fn into_owned(self) -> EntryRef<'static> {
        EntryRef {
            parent: self.parent,
            name: Cow::Owned(self.name.into_owned()),
            path: self.path,
            excluded: self.excluded,
        }
    }
}

/// Durability the application asked for on a write: the open flags `O_SYNC`/`O_DSYNC` of the
/// file handle it wrote through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// An ordinary write: durable only at the next `fsync`/`fdatasync`.
    None,
    /// `O_DSYNC`: the data (and the metadata needed to read it) must be durable on return.
    Data,
    /// `O_SYNC`: data and all metadata must be durable on return.
    Full,
}

/// Owner given to a new inode: the caller's uid, and the caller's gid or the parent directory's
/// when it is set-group-ID (the local apply creates as root, then sets this owner).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// One mutating operation, fully described. See [`Op`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutation<'a> {
    /// Submission number, strictly increasing per mount. For any two operations that touch the
    /// same inode, or that both change the namespace, the order of `seq` is the order in which
    /// they were applied locally. Unrelated operations (data of two different files) may be
    /// applied locally in another order than `seq`, and in parallel.
    pub seq: u64,
    /// `false` when every path involved is excluded: the operation is served locally and must not
    /// be sent to the peer. For a rename, `true` as soon as one side is replicated (the replicator
    /// then looks at [`EntryRef::excluded`] of each side).
    pub replicate: bool,
    /// What the operation does.
    pub op: Op<'a>,
}

impl Mutation<'_> {
    /// Converts the borrowed fields (names, data) to owned ones, to keep the mutation beyond
    /// [`crate::Replicator::submit`].
    pub fn into_owned(self) -> Mutation<'static> {
        Mutation {
            seq: self.seq,
            replicate: self.replicate,
            op: self.op.into_owned(),
        }
    }

    /// A short name of the operation kind (`"write"`, `"rename"`, ...), for logs and counters.
    pub fn kind(&self) -> &'static str {
        self.op.kind()
    }
}

/// The operation kinds. Each carries the target by identity ([`NodeRef`]) and, for operations on
/// names, by parent and name ([`EntryRef`]). File handles (`fh`) are those of this mount; they let
/// a replicator tie writes to an open file (for example one unlinked while open).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// `write(2)` and friends: `data` at `offset`.
    Write {
        /// Target file.
        node: NodeRef,
        /// File handle written through.
        fh: u64,
        /// Offset in the file.
        offset: u64,
        /// The bytes (borrowed from the kernel request; copy them to keep them).
        data: Cow<'a, [u8]>,
        /// `O_SYNC`/`O_DSYNC` of the handle: the reply must wait for durability on both nodes.
        sync: SyncMode,
        /// The writer is not privileged: set-user-ID and set-group-ID bits are cleared with the
        /// write (the kernel asked for it).
        kill_suidgid: bool,
    },
    /// `fallocate(2)` with its raw `mode` (`FALLOC_FL_*`: keep size, punch hole, zero range...).
    Fallocate {
        /// Target file.
        node: NodeRef,
        /// File handle.
        fh: u64,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// Attribute changes: `chmod`, `chown`, `truncate`/`ftruncate`/`O_TRUNC` (`size`), `utimensat`.
    /// Times are always explicit: "now" was resolved to the primary's clock before the apply, so
    /// both nodes store the same value. Apply order: size, owner, mode, times.
    SetAttr {
        /// Target.
        node: NodeRef,
        /// File handle when the kernel gave one (`ftruncate`, `futimens`).
        fh: Option<u64>,
        /// New permission bits (`st_mode & 0o7777`).
        mode: Option<u32>,
        /// New owner.
        uid: Option<u32>,
        /// New group.
        gid: Option<u32>,
        /// New size (truncate or extend).
        size: Option<u64>,
        /// New access time.
        atime: Option<Timestamp>,
        /// New modification time.
        mtime: Option<Timestamp>,
    },
    /// `open(O_CREAT)` of a regular file that did not exist.
    Create {
        /// Where.
        entry: EntryRef<'a>,
        /// Requested mode (type and permission bits, before the umask).
        mode: u32,
        /// Caller's umask (applied unless the parent has a default ACL).
        umask: u32,
        /// Open flags of the caller.
        flags: i32,
        /// Owner of the new file.
        owner: Owner,
    },
    /// `mknod(2)`: FIFO, socket, device or regular file.
    Mknod {
        /// Where.
        entry: EntryRef<'a>,
        /// Requested mode (type and permission bits, before the umask).
        mode: u32,
        /// Caller's umask.
        umask: u32,
        /// Device number.
        rdev: u32,
        /// Owner of the new node.
        owner: Owner,
    },
    /// `mkdir(2)`.
    Mkdir {
        /// Where.
        entry: EntryRef<'a>,
        /// Requested mode (before the umask).
        mode: u32,
        /// Caller's umask.
        umask: u32,
        /// Owner of the new directory.
        owner: Owner,
    },
    /// `symlink(2)`.
    Symlink {
        /// Where.
        entry: EntryRef<'a>,
        /// Contents of the link.
        target: Cow<'a, Path>,
        /// Owner of the link.
        owner: Owner,
    },
    /// `link(2)`: a new name for an existing inode.
    Link {
        /// Existing inode.
        node: NodeRef,
        /// New name.
        new: EntryRef<'a>,
    },
    /// `unlink(2)`.
    Unlink {
        /// The name removed.
        entry: EntryRef<'a>,
        /// Identity of the inode behind the name before the removal.
        target: Option<FileId>,
    },
    /// `rmdir(2)`.
    Rmdir {
        /// The name removed.
        entry: EntryRef<'a>,
        /// Identity of the directory before the removal.
        target: Option<FileId>,
    },
    /// `renameat2(2)` with its raw flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`,
    /// `RENAME_WHITEOUT`).
    Rename {
        /// Source entry.
        from: EntryRef<'a>,
        /// Destination entry.
        to: EntryRef<'a>,
        /// `RENAME_*` flags.
        flags: u32,
        /// Identity of the inode moved (at `from` before the rename).
        moved: Option<FileId>,
        /// Identity of the inode at `to` before the rename (replaced, or exchanged).
        replaced: Option<FileId>,
    },
    /// `setxattr(2)`, including POSIX ACLs (`system.posix_acl_access`/`_default`).
    SetXattr {
        /// Target.
        node: NodeRef,
        /// Attribute name.
        name: Cow<'a, OsStr>,
        /// Attribute value.
        value: Cow<'a, [u8]>,
        /// `XATTR_CREATE`/`XATTR_REPLACE`.
        flags: i32,
    },
    /// `removexattr(2)`.
    RemoveXattr {
        /// Target.
        node: NodeRef,
        /// Attribute name.
        name: Cow<'a, OsStr>,
    },
    /// `fsync(2)`/`fdatasync(2)` of a file or directory: everything submitted before it for this
    /// node (lower `seq`) must be durable on both nodes before the completion.
    Fsync {
        /// Target.
        node: NodeRef,
        /// File or directory handle.
        fh: u64,
        /// `fdatasync` rather than `fsync`.
        datasync: bool,
    },
}

impl Op<'_> {
    /// Converts the borrowed fields to owned ones.
    pub fn into_owned(self) -> Op<'static> {
        match self {
            Op::Write {
                node,
                fh,
                offset,
                data,
                sync,
                kill_suidgid,
            } => Op::Write {
                node,
                fh,
                offset,
                data: Cow::Owned(data.into_owned()),
                sync,
                kill_suidgid,
            },
            Op::Fallocate {
                node,
                fh,
                mode,
                offset,
                len,
            } => Op::Fallocate {
                node,
                fh,
                mode,
                offset,
                len,
            },
            Op::SetAttr {
                node,
                fh,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            } => Op::SetAttr {
                node,
                fh,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            },
            Op::Create {
                entry,
                mode,
                umask,
                flags,
                owner,
            } => Op::Create {
                entry: entry.into_owned(),
                mode,
                umask,
                flags,
                owner,
            },
            Op::Mknod {
                entry,
                mode,
                umask,
                rdev,
                owner,
            } => Op::Mknod {
                entry: entry.into_owned(),
                mode,
                umask,
                rdev,
                owner,
            },
            Op::Mkdir {
                entry,
                mode,
                umask,
                owner,
            } => Op::Mkdir {
                entry: entry.into_owned(),
                mode,
                umask,
                owner,
            },
            Op::Symlink {
                entry,
                target,
                owner,
            } => Op::Symlink {
                entry: entry.into_owned(),
                target: Cow::Owned(target.into_owned()),
                owner,
            },
            Op::Link { node, new } => Op::Link {
                node,
                new: new.into_owned(),
            },
            Op::Unlink { entry, target } => Op::Unlink {
                entry: entry.into_owned(),
                target,
            },
            Op::Rmdir { entry, target } => Op::Rmdir {
                entry: entry.into_owned(),
                target,
            },
            Op::Rename {
                from,
                to,
                flags,
                moved,
                replaced,
            } => Op::Rename {
                from: from.into_owned(),
                to: to.into_owned(),
                flags,
                moved,
                replaced,
            },
            Op::SetXattr {
                node,
                name,
                value,
                flags,
            } => Op::SetXattr {
                node,
                name: Cow::Owned(name.into_owned()),
                value: Cow::Owned(value.into_owned()),
                flags,
            },
            Op::RemoveXattr { node, name } => Op::RemoveXattr {
                node,
                name: Cow::Owned(name.into_owned()),
            },
            Op::Fsync { node, fh, datasync } => Op::Fsync { node, fh, datasync },
        }
    }

    /// The primary's identities of the directories whose entries the operation changes (the
    /// parent of a created, linked or removed name; both parents of a rename, once if the same).
    pub fn parent_dirs(&self) -> Vec<FileId> {
        let mut dirs = match self {
            Op::Create { entry, .. }
            | Op::Mknod { entry, .. }
            | Op::Mkdir { entry, .. }
            | Op::Symlink { entry, .. }
            | Op::Unlink { entry, .. }
            | Op::Rmdir { entry, .. } => vec![entry.parent.id],
            Op::Link { new, .. } => vec![new.parent.id],
            Op::Rename { from, to, .. } => vec![from.parent.id, to.parent.id],
            _ => Vec::new(),
        };
        dirs.dedup();
        dirs
    }

    /// A short name of the operation kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Fallocate { .. } => "fallocate",
            Op::SetAttr { .. } => "setattr",
            Op::Create { .. } => "create",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Fsync { .. } => "fsync",
        }
    }
}

/// What the local apply of a submitted mutation did, reported to
/// [`crate::Replicator::applied`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `None` when the local apply succeeded, else its errno. The application gets this errno;
    /// if the peer applied the operation anyway, the two nodes now differ on that target.
    pub error: Option<i32>,
    /// Attributes after the apply: of the new inode for create/mknod/mkdir/symlink/link, of the
    /// target for write/fallocate/setattr/xattr ops, of the whiteout left at the source for a
    /// rename with `RENAME_WHITEOUT`. `None` for unlink/rmdir/other renames/fsync or on
    /// error. Lets the replicator carry the primary's `mtime`/`ctime` to the peer.
    pub attr: Option<Attr>,
    /// For a write: the number of bytes written locally (less than the data on a short write,
    /// e.g. `ENOSPC` in the middle).
    pub written: Option<u64>,
    /// Attributes after the apply of the directories whose entries changed
    /// ([`Op::parent_dirs`]): their `mtime`/`ctime` moved too, and the peer copies them.
    pub dirs: Vec<Attr>,
}
