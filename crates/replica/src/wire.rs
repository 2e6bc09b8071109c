//! The wire format of the replication stream.
//!
//! A stream is a sequence of **frames**: a 4-byte little-endian body length, then the body. The
//! body starts with a record tag; every field is little-endian and fixed-size, except byte
//! strings (a `u32` length, then the bytes) and options (a `0`/`1` byte, then the value). The
//! data of a write is the raw remainder of its frame: it is never copied through a serializer,
//! and [`encode_head`] lets a transport send it straight from the kernel's request buffer
//! (`writev` of head and payload). [`decode`] borrows names and data from the frame.
//!
//! Records ([`Record`]):
//! - [`Record::Mutation`]: one [`Mutation`] (every [`Op`] kind), primary to secondary;
//! - [`Record::Applied`]: the primary's local [`Outcome`] of a mutation (its errno, the attributes
//!   after the apply: the secondary copies `atime`/`mtime` from them), primary to secondary;
//! - [`Record::Forget`]: the primary no longer names a backing inode (the secondary may drop its
//!   handle), primary to secondary;
//! - [`Record::Ack`]: the secondary's result of a mutation, secondary to primary (`seq` 0: the
//!   result of a whole full synchronisation).
//!
//! Records of the full synchronisation ([`crate::fullsync`]), before the replication stream on
//! the same connection:
//! - [`Record::SyncRequest`]: the secondary asks for a copy of one replicated directory of a
//!   module (the first record after the handshake, secondary to primary);
//! - [`Record::SyncRefused`]: the primary will not send it (why), primary to secondary;
//! - [`Record::SyncEntry`]: one entry of the tree ([`TreeEntry`]: relative path, kind, mode,
//!   owner, device number, size, times, symlink target, xattrs), parents before children;
//! - [`Record::SyncLink`]: a hard link to an entry sent earlier under another path;
//! - [`Record::SyncData`]: bytes of the last regular file sent, at an offset (the raw rest of
//!   the frame, at most [`SYNC_CHUNK`]); holes are not sent;
//! - [`Record::SyncEnd`]: the end of the tree, with the `seq` the replication stream starts at
//!   and the totals the secondary checks.
//!
//! Decoding never panics: malformed input (unknown tags, truncated fields, invalid booleans or
//! nanoseconds, trailing bytes, frames above [`MAX_FRAME`]) is a [`WireError`].

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tandem_fs::{
    Attr, EntryRef, FileId, Mutation, NodeRef, Op, Outcome, Owner, SyncMode, Timestamp,
};

/// Largest frame body (16 MiB): above the largest write the kernel sends (`max_write`, at most
/// a few MiB), with room for the header.
pub const MAX_FRAME: usize = 16 << 20;

/// Length of the frame prefix (the body length, `u32` little-endian).
pub const PREFIX_LEN: usize = 4;

/// Largest data chunk of one [`Record::SyncData`] (1 MiB).
pub const SYNC_CHUNK: usize = 1 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame ends before a field does.
    #[error("truncated frame")]
    Truncated,
    /// The body is larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// An unknown record or operation tag.
    #[error("unknown tag {0}")]
    UnknownTag(u8),
    /// A field holds a value outside its domain (boolean, option tag, nanoseconds...).
    #[error("invalid value in field {0}")]
    Invalid(&'static str),
    /// Bytes left after the last field of a record.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// One record of the replication stream. Names and data borrow from the decoded frame
/// ([`Record::into_owned`] to keep them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A mutation to apply on the secondary.
    Mutation(Mutation<'a>),
    /// The primary's local outcome of mutation `seq`.
    Applied {
        /// The mutation.
        seq: u64,
        /// Its local outcome (errno, attributes after the apply, bytes written).
        outcome: Outcome,
    },
    /// The primary dropped its last reference to the backing inode `id`.
    Forget {
        /// The primary's identity of the inode.
        id: FileId,
    },
    /// The secondary's result of mutation `seq` (`seq` 0: of a whole full synchronisation).
    Ack {
        /// The mutation.
        seq: u64,
        /// `None` when applied, else the secondary's errno.
        error: Option<i32>,
    },
    /// The secondary asks for a full copy of a replicated directory (secondary to primary).
    SyncRequest {
        /// The module's name.
        module: String,
        /// The index of the replicated directory in the module's configuration.
        dir: u32,
    },
    /// The primary refuses a [`Record::SyncRequest`].
    SyncRefused {
        /// Why (for the secondary's log).
        reason: String,
    },
    /// One entry of the tree.
    SyncEntry(TreeEntry<'a>),
    /// A hard link: `path` names the same inode as `to`, sent earlier.
    SyncLink {
        /// The new name (relative to the root).
        path: Cow<'a, Path>,
        /// The path the inode was first sent under.
        to: Cow<'a, Path>,
    },
    /// Bytes of a regular file.
    SyncData {
        /// The index of the file's [`Record::SyncEntry`] among the entries and links sent (the
        /// root is 0); always the last regular file sent.
        index: u64,
        /// Where the bytes go.
        offset: u64,
        /// The bytes (the rest of the frame; at most [`SYNC_CHUNK`]).
        data: Cow<'a, [u8]>,
    },
    /// The end of the tree.
    SyncEnd {
        /// The `seq` of the first mutation of the replication stream that follows.
        next_seq: u64,
        /// Entries and links sent (the root included).
        entries: u64,
        /// Data bytes sent.
        bytes: u64,
    },
}

/// The kind of a [`TreeEntry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    Regular,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A Unix socket.
    Socket,
}

impl EntryKind {
    /// The kind of a `st_mode`.
    pub fn from_mode(mode: u32) -> Option<EntryKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFDIR => EntryKind::Dir,
            libc::S_IFREG => EntryKind::Regular,
            libc::S_IFLNK => EntryKind::Symlink,
            libc::S_IFIFO => EntryKind::Fifo,
            libc::S_IFCHR => EntryKind::Char,
            libc::S_IFBLK => EntryKind::Block,
            libc::S_IFSOCK => EntryKind::Socket,
            _ => return None,
        })
    }

    /// The `S_IF*` bits of the kind.
    pub fn type_bits(self) -> u32 {
        match self {
            EntryKind::Dir => libc::S_IFDIR,
            EntryKind::Regular => libc::S_IFREG,
            EntryKind::Symlink => libc::S_IFLNK,
            EntryKind::Fifo => libc::S_IFIFO,
            EntryKind::Char => libc::S_IFCHR,
            EntryKind::Block => libc::S_IFBLK,
            EntryKind::Socket => libc::S_IFSOCK,
        }
    }

    fn tag(self) -> u8 {
        match self {
            EntryKind::Dir => 1,
            EntryKind::Regular => 2,
            EntryKind::Symlink => 3,
            EntryKind::Fifo => 4,
            EntryKind::Char => 5,
            EntryKind::Block => 6,
            EntryKind::Socket => 7,
        }
    }

    fn from_tag(tag: u8) -> Option<EntryKind> {
        Some(match tag {
            1 => EntryKind::Dir,
            2 => EntryKind::Regular,
            3 => EntryKind::Symlink,
            4 => EntryKind::Fifo,
            5 => EntryKind::Char,
            6 => EntryKind::Block,
            7 => EntryKind::Socket,
            _ => return None,
        })
    }
}

/// One extended attribute (POSIX ACLs are `system.posix_acl_access` and
/// `system.posix_acl_default`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xattr<'a> {
    /// Its name.
    pub name: Cow<'a, OsStr>,
    /// Its value.
    pub value: Cow<'a, [u8]>,
}

/// One entry of the tree of a full synchronisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeEntry<'a> {
    /// The path relative to the root (`""`: the root itself, always the first entry).
    pub path: Cow<'a, Path>,
    /// What it is.
    pub kind: EntryKind,
    /// The permission bits with set-user-ID, set-group-ID and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// The owner.
    pub uid: u32,
    /// The group.
    pub gid: u32,
    /// The device number (`st_rdev`) of a character or block device, else 0.
    pub rdev: u64,
    /// The size of a regular file, else 0.
    pub size: u64,
    /// Last access.
    pub atime: Timestamp,
    /// Last modification.
    pub mtime: Timestamp,
    /// The target of a symlink (`Some` exactly for symlinks).
    pub target: Option<Cow<'a, Path>>,
    /// The extended attributes, POSIX ACLs included.
    pub xattrs: Vec<Xattr<'a>>,
}

impl TreeEntry<'_> {
    /// Converts the borrowed fields to owned ones.
    pub fn into_owned(self) -> TreeEntry<'static> {
        TreeEntry {
            path: Cow::Owned(self.path.into_owned()),
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            target: self.target.map(|t| Cow::Owned(t.into_owned())),
            xattrs: self
                .xattrs
                .into_iter()
                .map(|x| Xattr {
                    name: Cow::Owned(x.name.into_owned()),
                    value: Cow::Owned(x.value.into_owned()),
                })
                .collect(),
        }
    }
}

impl Record<'_> {
    /// Converts the borrowed fields to owned ones.
    pub fn into_owned(self) -> Record<'static> {
        match self {
            Record::Mutation(m) => Record::Mutation(m.into_owned()),
            Record::Applied { seq, outcome } => Record::Applied { seq, outcome },
            Record::Forget { id } => Record::Forget { id },
            Record::Ack { seq, error } => Record::Ack { seq, error },
            Record::SyncRequest { module, dir } => Record::SyncRequest { module, dir },
            Record::SyncRefused { reason } => Record::SyncRefused { reason },
            Record::SyncEntry(e) => Record::SyncEntry(e.into_owned()),
            Record::SyncLink { path, to } => Record::SyncLink {
                path: Cow::Owned(path.into_owned()),
                to: Cow::Owned(to.into_owned()),
            },
            Record::SyncData {
                index,
                offset,
                data,
            } => Record::SyncData {
                index,
                offset,
                data: Cow::Owned(data.into_owned()),
            },
            Record::SyncEnd {
                next_seq,
                entries,
                bytes,
            } => Record::SyncEnd {
                next_seq,
                entries,
                bytes,
            },
        }
    }

    /// A short name of the record's kind (for logs and errors).
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Mutation(_) => "mutation",
            Record::Applied { .. } => "applied",
            Record::Forget { .. } => "forget",
            Record::Ack { .. } => "ack",
            Record::SyncRequest { .. } => "sync request",
            Record::SyncRefused { .. } => "sync refused",
            Record::SyncEntry(_) => "sync entry",
            Record::SyncLink { .. } => "sync link",
            Record::SyncData { .. } => "sync data",
            Record::SyncEnd { .. } => "sync end",
        }
    }
}

// Record tags.
const R_MUTATION: u8 = 1;
const R_APPLIED: u8 = 2;
const R_FORGET: u8 = 3;
const R_ACK: u8 = 4;
const R_SYNC_REQUEST: u8 = 5;
const R_SYNC_REFUSED: u8 = 6;
const R_SYNC_ENTRY: u8 = 7;
const R_SYNC_LINK: u8 = 8;
const R_SYNC_DATA: u8 = 9;
const R_SYNC_END: u8 = 10;

// Operation tags.
const OP_WRITE: u8 = 1;
const OP_FALLOCATE: u8 = 2;
const OP_SETATTR: u8 = 3;
const OP_CREATE: u8 = 4;
const OP_MKNOD: u8 = 5;
const OP_MKDIR: u8 = 6;
const OP_SYMLINK: u8 = 7;
const OP_LINK: u8 = 8;
const OP_UNLINK: u8 = 9;
const OP_RMDIR: u8 = 10;
const OP_RENAME: u8 = 11;
const OP_SETXATTR: u8 = 12;
const OP_REMOVEXATTR: u8 = 13;
const OP_FSYNC: u8 = 14;

// ------------------------------------------------------------------------------------- encoding

struct Writer<'o>(&'o mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A byte string; fails when its length does not fit a `u32` (it could not fit a frame).
    fn bytes(&mut self, v: &[u8]) -> Result<(), WireError> {
        let len = u32::try_from(v.len()).map_err(|_| WireError::TooLarge(v.len()))?;
        self.u32(len);
        self.0.extend_from_slice(v);
        Ok(())
    }
    fn path(&mut self, p: &Path) -> Result<(), WireError> {
        self.bytes(p.as_os_str().as_bytes())
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
        }
    }
    fn opt_path(&mut self, p: Option<&Path>) -> Result<(), WireError> {
        match p {
            None => {
                self.u8(0);
                Ok(())
            }
            Some(p) => {
                self.u8(1);
                self.path(p)
            }
        }
    }
    fn file_id(&mut self, id: FileId) {
        self.u64(id.dev);
        self.u64(id.ino);
    }
    fn time(&mut self, t: Timestamp) {
        self.i64(t.sec);
        self.u32(t.nsec);
    }
    fn owner(&mut self, o: Owner) {
        self.u32(o.uid);
        self.u32(o.gid);
    }
    fn node(&mut self, n: &NodeRef) -> Result<(), WireError> {
        self.u64(n.nodeid);
        self.u64(n.generation);
        self.file_id(n.id);
        self.opt_path(n.path.as_deref())
    }
    fn entry(&mut self, e: &EntryRef<'_>) -> Result<(), WireError> {
        self.node(&e.parent)?;
        self.bytes(e.name.as_bytes())?;
        self.opt_path(e.path.as_deref())?;
        self.bool(e.excluded);
        Ok(())
    }
    fn attr(&mut self, a: &Attr) {
        self.file_id(a.id);
        self.u32(a.mode);
        self.u64(a.nlink);
        self.u32(a.uid);
        self.u32(a.gid);
        self.u64(a.rdev);
        self.u64(a.size);
        self.u64(a.blocks);
        self.time(a.atime);
        self.time(a.mtime);
        self.time(a.ctime);
    }
}

/// Encodes the body of `record` without the payload of a write into `w`; returns the payload.
fn encode_body<'r>(record: &'r Record<'_>, w: &mut Writer<'_>) -> Result<&'r [u8], WireError> {
    match record {
        Record::Mutation(m) => encode_mutation_body(m, w),
        Record::Applied { seq, outcome } => {
            w.u8(R_APPLIED);
            w.u64(*seq);
            w.opt(outcome.error, Writer::i32);
            w.opt(outcome.attr.as_ref(), Writer::attr);
            w.opt(outcome.written, Writer::u64);
            // At most two: the parents of a rename.
            let count = u8::try_from(outcome.dirs.len())
                .map_err(|_| WireError::TooLarge(outcome.dirs.len()))?;
            w.u8(count);
            for dir in &outcome.dirs {
                w.attr(dir);
            }
            Ok(&[])
        }
        Record::Forget { id } => {
            w.u8(R_FORGET);
            w.file_id(*id);
            Ok(&[])
        }
        Record::Ack { seq, error } => {
            w.u8(R_ACK);
            w.u64(*seq);
            w.opt(*error, Writer::i32);
            Ok(&[])
        }
        Record::SyncRequest { module, dir } => {
            w.u8(R_SYNC_REQUEST);
            w.bytes(module.as_bytes())?;
            w.u32(*dir);
            Ok(&[])
        }
        Record::SyncRefused { reason } => {
            w.u8(R_SYNC_REFUSED);
            w.bytes(reason.as_bytes())?;
            Ok(&[])
        }
        Record::SyncEntry(e) => {
            w.u8(R_SYNC_ENTRY);
            w.path(&e.path)?;
            w.u8(e.kind.tag());
            w.u32(e.mode);
            w.u32(e.uid);
            w.u32(e.gid);
            w.u64(e.rdev);
            w.u64(e.size);
            w.time(e.atime);
            w.time(e.mtime);
            w.opt_path(e.target.as_deref())?;
            let count =
                u32::try_from(e.xattrs.len()).map_err(|_| WireError::TooLarge(e.xattrs.len()))?;
            w.u32(count);
            for x in &e.xattrs {
                w.bytes(x.name.as_bytes())?;
                w.bytes(&x.value)?;
            }
            Ok(&[])
        }
        Record::SyncLink { path, to } => {
            w.u8(R_SYNC_LINK);
            w.path(path)?;
            w.path(to)?;
            Ok(&[])
        }
        Record::SyncData {
            index,
            offset,
            data,
        } => {
            w.u8(R_SYNC_DATA);
            w.u64(*index);
            w.u64(*offset);
            // The data is the rest of the frame.
            Ok(data.as_ref())
        }
        Record::SyncEnd {
            next_seq,
            entries,
            bytes,
        } => {
            w.u8(R_SYNC_END);
            w.u64(*next_seq);
            w.u64(*entries);
            w.u64(*bytes);
            Ok(&[])
        }
    }
}

fn encode_mutation_body<'r>(
    m: &'r Mutation<'_>,
    w: &mut Writer<'_>,
) -> Result<&'r [u8], WireError> {
    w.u8(R_MUTATION);
    w.u64(m.seq);
    w.bool(m.replicate);
    encode_op(&m.op, w)
}

fn encode_op<'r>(op: &'r Op<'_>, w: &mut Writer<'_>) -> Result<&'r [u8], WireError> {
    match op {
        Op::Write {
            node,
            fh,
            offset,
            data,
            sync,
            kill_suidgid,
        } => {
            w.u8(OP_WRITE);
            w.node(node)?;
            w.u64(*fh);
            w.u64(*offset);
            w.u8(match sync {
                SyncMode::None => 0,
                SyncMode::Data => 1,
                SyncMode::Full => 2,
            });
            w.bool(*kill_suidgid);
            // The data is the rest of the frame.
            return Ok(data.as_ref());
        }
        Op::Fallocate {
            node,
            fh,
            mode,
            offset,
            len,
        } => {
            w.u8(OP_FALLOCATE);
            w.node(node)?;
            w.u64(*fh);
            w.i32(*mode);
            w.u64(*offset);
            w.u64(*len);
        }
        Op::SetAttr {
            node,
            fh,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } => {
            w.u8(OP_SETATTR);
            w.node(node)?;
            w.opt(*fh, |w, v| w.u64(v));
            w.opt(*mode, |w, v| w.u32(v));
            w.opt(*uid, |w, v| w.u32(v));
            w.opt(*gid, |w, v| w.u32(v));
            w.opt(*size, |w, v| w.u64(v));
            w.opt(*atime, |w, v| w.time(v));
            w.opt(*mtime, |w, v| w.time(v));
        }
        Op::Create {
            entry,
            mode,
            umask,
            flags,
            owner,
        } => {
            w.u8(OP_CREATE);
            w.entry(entry)?;
            w.u32(*mode);
            w.u32(*umask);
            w.i32(*flags);
            w.owner(*owner);
        }
        Op::Mknod {
            entry,
            mode,
            umask,
            rdev,
            owner,
        } => {
            w.u8(OP_MKNOD);
            w.entry(entry)?;
            w.u32(*mode);
            w.u32(*umask);
            w.u32(*rdev);
            w.owner(*owner);
        }
        Op::Mkdir {
            entry,
            mode,
            umask,
            owner,
        } => {
            w.u8(OP_MKDIR);
            w.entry(entry)?;
            w.u32(*mode);
            w.u32(*umask);
            w.owner(*owner);
        }
        Op::Symlink {
            entry,
            target,
            owner,
        } => {
            w.u8(OP_SYMLINK);
            w.entry(entry)?;
            w.path(target)?;
            w.owner(*owner);
        }
        Op::Link { node, new } => {
            w.u8(OP_LINK);
            w.node(node)?;
            w.entry(new)?;
        }
        Op::Unlink { entry, target } => {
            w.u8(OP_UNLINK);
            w.entry(entry)?;
            w.opt(*target, |w, id| w.file_id(id));
        }
        Op::Rmdir { entry, target } => {
            w.u8(OP_RMDIR);
            w.entry(entry)?;
            w.opt(*target, |w, id| w.file_id(id));
        }
        Op::Rename {
            from,
            to,
            flags,
            moved,
            replaced,
        } => {
            w.u8(OP_RENAME);
            w.entry(from)?;
            w.entry(to)?;
            w.u32(*flags);
            w.opt(*moved, |w, id| w.file_id(id));
            w.opt(*replaced, |w, id| w.file_id(id));
        }
        Op::SetXattr {
            node,
            name,
            value,
            flags,
        } => {
            w.u8(OP_SETXATTR);
            w.node(node)?;
            w.bytes(name.as_bytes())?;
            w.bytes(value)?;
            w.i32(*flags);
        }
        Op::RemoveXattr { node, name } => {
            w.u8(OP_REMOVEXATTR);
            w.node(node)?;
            w.bytes(name.as_bytes())?;
        }
        Op::Fsync { node, fh, datasync } => {
            w.u8(OP_FSYNC);
            w.node(node)?;
            w.u64(*fh);
            w.bool(*datasync);
        }
    }
    Ok(&[])
}

/// Appends the frame prefix and body of a body encoder's output to `head`; returns the payload.
fn encode_framed<'r>(
    head: &mut Vec<u8>,
    body: impl FnOnce(&mut Writer<'_>) -> Result<&'r [u8], WireError>,
) -> Result<&'r [u8], WireError> {
    let start = head.len();
    head.extend_from_slice(&[0; PREFIX_LEN]);
    let payload = match body(&mut Writer(head)) {
        Ok(p) => p,
        Err(e) => {
            head.truncate(start);
            return Err(e);
        }
    };
    let len = head.len() - start - PREFIX_LEN + payload.len();
    // `len <= MAX_FRAME` fits a u32.
    let prefix = match u32::try_from(len) {
        Ok(l) if len <= MAX_FRAME => l,
        _ => {
            head.truncate(start);
            return Err(WireError::TooLarge(len));
        }
    };
    head[start..start + PREFIX_LEN].copy_from_slice(&prefix.to_le_bytes());
    Ok(payload)
}

/// [`encode_head`] of a [`Record::Mutation`], from a borrowed mutation.
pub fn encode_mutation_head<'r>(
    m: &'r Mutation<'_>,
    head: &mut Vec<u8>,
) -> Result<&'r [u8], WireError> {
    encode_framed(head, |w| encode_mutation_body(m, w))
}

/// [`encode`] of a [`Record::Mutation`], from a borrowed mutation.
pub fn encode_mutation(m: &Mutation<'_>, out: &mut Vec<u8>) -> Result<(), WireError> {
    let payload = encode_mutation_head(m, out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends the frame prefix and body of `record` to `head`, except the data of a write, which
/// is returned: the frame is `head` (from where it started) followed by the returned payload.
/// A transport sends both with one `writev`, without copying the data.
pub fn encode_head<'r>(record: &'r Record<'_>, head: &mut Vec<u8>) -> Result<&'r [u8], WireError> {
    encode_framed(head, |w| encode_body(record, w))
}

/// Appends the whole frame of `record` (prefix, body and data) to `out`.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) -> Result<(), WireError> {
    let payload = encode_head(record, out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// The whole frame of `record` in a new buffer.
pub fn to_frame(record: &Record<'_>) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode(record, &mut out)?;
    Ok(out)
}

/// The body length announced by a frame prefix; rejects bodies above [`MAX_FRAME`].
pub fn body_len(prefix: [u8; PREFIX_LEN]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Splits the first frame off `buf`: `Ok(None)` when `buf` does not hold a whole frame yet,
/// else its body and the total length of the frame (prefix included).
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, WireError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = body_len(*prefix)?;
    let total = PREFIX_LEN + len;
    Ok(buf.get(PREFIX_LEN..total).map(|body| (body, total)))
}

/// Decodes one whole frame (prefix and body, nothing after it).
pub fn decode_frame(frame: &[u8]) -> Result<Record<'_>, WireError> {
    match split_frame(frame)? {
        None => Err(WireError::Truncated),
        Some((body, total)) if total == frame.len() => decode(body),
        Some((_, total)) => Err(WireError::Trailing(frame.len() - total)),
    }
}

// ------------------------------------------------------------------------------------- decoding

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let Some((head, rest)) = self.buf.split_first_chunk::<N>() else {
            return Err(WireError::Truncated);
        };
        self.buf = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid(field)),
        }
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn os_str(&mut self) -> Result<&'a OsStr, WireError> {
        Ok(OsStr::from_bytes(self.bytes()?))
    }
    fn path(&mut self) -> Result<&'a Path, WireError> {
        Ok(Path::new(self.os_str()?))
    }
    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| WireError::Invalid(field))
    }
    fn tree_entry(&mut self) -> Result<TreeEntry<'a>, WireError> {
        let path = Cow::Borrowed(self.path()?);
        let kind = EntryKind::from_tag(self.u8()?).ok_or(WireError::Invalid("kind"))?;
        let mode = self.u32()?;
        if mode & !0o7777 != 0 {
            return Err(WireError::Invalid("mode"));
        }
        let uid = self.u32()?;
        let gid = self.u32()?;
        let rdev = self.u64()?;
        let size = self.u64()?;
        let atime = self.time()?;
        let mtime = self.time()?;
        let target = self.opt("target", |r| r.path().map(Cow::Borrowed))?;
        if target.is_some() != (kind == EntryKind::Symlink) {
            return Err(WireError::Invalid("target"));
        }
        let count = self.u32()?;
        // Each xattr takes 8 bytes at least: no allocation beyond what the frame can hold.
        let mut xattrs = Vec::with_capacity((count as usize).min(self.buf.len() / 8));
        for _ in 0..count {
            xattrs.push(Xattr {
                name: Cow::Borrowed(self.os_str()?),
                value: Cow::Borrowed(self.bytes()?),
            });
        }
        Ok(TreeEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            rdev,
            size,
            atime,
            mtime,
            target,
            xattrs,
        })
    }
    fn opt<T>(
        &mut self,
        field: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            _ => Err(WireError::Invalid(field)),
        }
    }
    fn file_id(&mut self) -> Result<FileId, WireError> {
        Ok(FileId {
            dev: self.u64()?,
            ino: self.u64()?,
        })
    }
    fn time(&mut self) -> Result<Timestamp, WireError> {
        let sec = self.i64()?;
        let nsec = self.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(WireError::Invalid("nanoseconds"));
        }
        Ok(Timestamp { sec, nsec })
    }
    fn owner(&mut self) -> Result<Owner, WireError> {
        Ok(Owner {
            uid: self.u32()?,
            gid: self.u32()?,
        })
    }
    fn node(&mut self) -> Result<NodeRef, WireError> {
        Ok(NodeRef {
            nodeid: self.u64()?,
            generation: self.u64()?,
            id: self.file_id()?,
            path: self.opt("node path", |r| r.path().map(PathBuf::from))?,
        })
    }
    fn entry(&mut self) -> Result<EntryRef<'a>, WireError> {
        Ok(EntryRef {
            parent: self.node()?,
            name: Cow::Borrowed(self.os_str()?),
            path: self.opt("entry path", |r| r.path().map(PathBuf::from))?,
            excluded: self.bool("excluded")?,
        })
    }
    fn attr(&mut self) -> Result<Attr, WireError> {
        Ok(Attr {
            id: self.file_id()?,
            mode: self.u32()?,
            nlink: self.u64()?,
            uid: self.u32()?,
            gid: self.u32()?,
            rdev: self.u64()?,
            size: self.u64()?,
            blocks: self.u64()?,
            atime: self.time()?,
            mtime: self.time()?,
            ctime: self.time()?,
        })
    }
    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.buf.len()))
        }
    }
}

/// Decodes a frame body (without its prefix). Names and write data borrow from `body`.
pub fn decode(body: &[u8]) -> Result<Record<'_>, WireError> {
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut r = Reader { buf: body };
    let record = match r.u8()? {
        R_MUTATION => {
            let seq = r.u64()?;
            let replicate = r.bool("replicate")?;
            let op = decode_op(&mut r)?;
            Record::Mutation(Mutation { seq, replicate, op })
        }
        R_APPLIED => Record::Applied {
            seq: r.u64()?,
            outcome: Outcome {
                error: r.opt("error", |r| r.i32())?,
                attr: r.opt("attr", |r| r.attr())?,
                written: r.opt("written", |r| r.u64())?,
                dirs: {
                    let count = r.u8()?;
                    (0..count).map(|_| r.attr()).collect::<Result<_, _>>()?
                },
            },
        },
        R_FORGET => Record::Forget { id: r.file_id()? },
        R_ACK => Record::Ack {
            seq: r.u64()?,
            error: r.opt("error", |r| r.i32())?,
        },
        R_SYNC_REQUEST => Record::SyncRequest {
            module: r.string("module")?,
            dir: r.u32()?,
        },
        R_SYNC_REFUSED => Record::SyncRefused {
            reason: r.string("reason")?,
        },
        R_SYNC_ENTRY => Record::SyncEntry(r.tree_entry()?),
        R_SYNC_LINK => Record::SyncLink {
            path: Cow::Borrowed(r.path()?),
            to: Cow::Borrowed(r.path()?),
        },
        R_SYNC_DATA => {
            let index = r.u64()?;
            let offset = r.u64()?;
            // The rest of the frame is the data.
            let data = r.take(r.buf.len())?;
            if data.len() > SYNC_CHUNK {
                return Err(WireError::Invalid("sync data length"));
            }
            Record::SyncData {
                index,
                offset,
                data: Cow::Borrowed(data),
            }
        }
        R_SYNC_END => Record::SyncEnd {
            next_seq: r.u64()?,
            entries: r.u64()?,
            bytes: r.u64()?,
        },
        tag => return Err(WireError::UnknownTag(tag)),
    };
    r.finish()?;
    Ok(record)
}

fn decode_op<'a>(r: &mut Reader<'a>) -> Result<Op<'a>, WireError> {
    Ok(match r.u8()? {
        OP_WRITE => {
            let node = r.node()?;
            let fh = r.u64()?;
            let offset = r.u64()?;
            let sync = match r.u8()? {
                0 => SyncMode::None,
                1 => SyncMode::Data,
                2 => SyncMode::Full,
                _ => return Err(WireError::Invalid("sync")),
            };
            let kill_suidgid = r.bool("kill_suidgid")?;
            // The rest of the frame is the data.
            let data = r.take(r.buf.len())?;
            Op::Write {
                node,
                fh,
                offset,
                data: Cow::Borrowed(data),
                sync,
                kill_suidgid,
            }
        }
        OP_FALLOCATE => Op::Fallocate {
            node: r.node()?,
            fh: r.u64()?,
            mode: r.i32()?,
            offset: r.u64()?,
            len: r.u64()?,
        },
        OP_SETATTR => Op::SetAttr {
            node: r.node()?,
            fh: r.opt("fh", |r| r.u64())?,
            mode: r.opt("mode", |r| r.u32())?,
            uid: r.opt("uid", |r| r.u32())?,
            gid: r.opt("gid", |r| r.u32())?,
            size: r.opt("size", |r| r.u64())?,
            atime: r.opt("atime", |r| r.time())?,
            mtime: r.opt("mtime", |r| r.time())?,
        },
        OP_CREATE => Op::Create {
            entry: r.entry()?,
            mode: r.u32()?,
            umask: r.u32()?,
            flags: r.i32()?,
            owner: r.owner()?,
        },
        OP_MKNOD => Op::Mknod {
            entry: r.entry()?,
            mode: r.u32()?,
            umask: r.u32()?,
            rdev: r.u32()?,
            owner: r.owner()?,
        },
        OP_MKDIR => Op::Mkdir {
            entry: r.entry()?,
            mode: r.u32()?,
            umask: r.u32()?,
            owner: r.owner()?,
        },
        OP_SYMLINK => Op::Symlink {
            entry: r.entry()?,
            target: Cow::Borrowed(r.path()?),
            owner: r.owner()?,
        },
        OP_LINK => Op::Link {
            node: r.node()?,
            new: r.entry()?,
        },
        OP_UNLINK => Op::Unlink {
            entry: r.entry()?,
            target: r.opt("target", |r| r.file_id())?,
        },
        OP_RMDIR => Op::Rmdir {
            entry: r.entry()?,
            target: r.opt("target", |r| r.file_id())?,
        },
        OP_RENAME => Op::Rename {
            from: r.entry()?,
            to: r.entry()?,
            flags: r.u32()?,
            moved: r.opt("moved", |r| r.file_id())?,
            replaced: r.opt("replaced", |r| r.file_id())?,
        },
        OP_SETXATTR => Op::SetXattr {
            node: r.node()?,
            name: Cow::Borrowed(r.os_str()?),
            value: Cow::Borrowed(r.bytes()?),
            flags: r.i32()?,
        },
        OP_REMOVEXATTR => Op::RemoveXattr {
            node: r.node()?,
            name: Cow::Borrowed(r.os_str()?),
        },
        OP_FSYNC => Op::Fsync {
            node: r.node()?,
            fh: r.u64()?,
            datasync: r.bool("datasync")?,
        },
        tag => return Err(WireError::UnknownTag(tag)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    fn node(path: Option<&str>) -> NodeRef {
        NodeRef {
            nodeid: 42,
            generation: 7,
            id: FileId {
                dev: 0x803,
                ino: 123_456,
            },
            path: path.map(PathBuf::from),
        }
    }

    fn entry(name: &str) -> EntryRef<'static> {
        EntryRef {
            parent: node(Some("dir")),
            name: Cow::Owned(OsString::from(name)),
            path: Some(PathBuf::from("dir").join(name)),
            excluded: false,
        }
    }

    fn t(sec: i64, nsec: u32) -> Timestamp {
        Timestamp { sec, nsec }
    }

    fn owner() -> Owner {
        Owner { uid: 1000, gid: 50 }
    }

    /// One mutation of every operation kind.
    pub(crate) fn every_op() -> Vec<Op<'static>> {
        let id = |ino| FileId { dev: 1, ino };
        vec![
            Op::Write {
                node: node(Some("dir/f")),
                fh: 3,
                offset: 1 << 40,
                data: Cow::Owned(vec![0xab; 100_000]),
                sync: SyncMode::Data,
                kill_suidgid: true,
            },
            Op::Write {
                node: node(None),
                fh: 3,
                offset: 0,
                data: Cow::Owned(Vec::new()),
                sync: SyncMode::Full,
                kill_suidgid: false,
            },
            Op::Fallocate {
                node: node(Some("f")),
                fh: 9,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset: 4096,
                len: 8192,
            },
            Op::SetAttr {
                node: node(Some("")),
                fh: Some(5),
                mode: Some(0o4755),
                uid: Some(0),
                gid: None,
                size: Some(77),
                atime: Some(t(-5, 999_999_999)),
                mtime: Some(t(1_700_000_000, 1)),
            },
            Op::SetAttr {
                node: node(None),
                fh: None,
                mode: None,
                uid: None,
                gid: Some(9),
                size: None,
                atime: None,
                mtime: None,
            },
            Op::Create {
                entry: entry("new"),
                mode: libc::S_IFREG | 0o644,
                umask: 0o022,
                flags: libc::O_RDWR | libc::O_CREAT,
                owner: owner(),
            },
            Op::Mknod {
                entry: entry("fifo"),
                mode: libc::S_IFIFO | 0o600,
                umask: 0,
                rdev: 0x0103,
                owner: owner(),
            },
            Op::Mkdir {
                entry: entry("sub"),
                mode: 0o2775,
                umask: 0o002,
                owner: owner(),
            },
            Op::Symlink {
                entry: entry("link"),
                target: Cow::Owned(PathBuf::from("../some/where é")),
                owner: owner(),
            },
            Op::Link {
                node: node(Some("a")),
                new: entry("b"),
            },
            Op::Unlink {
                entry: entry("gone"),
                target: Some(id(5)),
            },
            Op::Rmdir {
                entry: entry("gone-dir"),
                target: None,
            },
            Op::Rename {
                from: entry("x"),
                to: EntryRef {
                    excluded: true,
                    path: None,
                    ..entry("y")
                },
                flags: libc::RENAME_EXCHANGE,
                moved: Some(id(1)),
                replaced: Some(id(2)),
            },
            Op::SetXattr {
                node: node(Some("f")),
                name: Cow::Owned(OsString::from("system.posix_acl_access")),
                value: Cow::Owned(vec![2, 0, 0, 0, 1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff]),
                flags: libc::XATTR_CREATE,
            },
            Op::RemoveXattr {
                node: node(Some("f")),
                name: Cow::Owned(OsString::from_vec(b"user.\xff".to_vec())),
            },
            Op::Fsync {
                node: node(Some("d")),
                fh: 11,
                datasync: true,
            },
        ]
    }

    fn every_record() -> Vec<Record<'static>> {
        let mut out: Vec<Record<'static>> = every_op()
            .into_iter()
            .enumerate()
            .map(|(i, op)| {
                Record::Mutation(Mutation {
                    seq: i as u64 + 1,
                    replicate: i % 2 == 0,
                    op,
                })
            })
            .collect();
        let attr = tandem_fs::Attr {
            id: FileId { dev: 3, ino: 4 },
            mode: libc::S_IFREG | 0o600,
            nlink: 2,
            uid: 1,
            gid: 2,
            rdev: 0,
            size: 99,
            blocks: 8,
            atime: t(1, 2),
            mtime: t(3, 4),
            ctime: t(5, 6),
        };
        out.push(Record::Applied {
            seq: 9,
            outcome: Outcome {
                error: None,
                attr: Some(attr),
                written: Some(99),
                dirs: vec![attr, attr],
            },
        });
        out.push(Record::Applied {
            seq: 10,
            outcome: Outcome {
                error: Some(libc::ENOENT),
                attr: None,
                written: None,
                dirs: Vec::new(),
            },
        });
        out.push(Record::Forget {
            id: FileId { dev: 1, ino: 2 },
        });
        out.push(Record::Ack {
            seq: 3,
            error: Some(libc::EIO),
        });
        out.push(Record::Ack {
            seq: 4,
            error: None,
        });
        out.extend(sync_records());
        out
    }

    /// One record of every full-synchronisation kind (and every entry kind).
    fn sync_records() -> Vec<Record<'static>> {
        let mut out = vec![
            Record::SyncRequest {
                module: "pg é".into(),
                dir: 3,
            },
            Record::SyncRefused {
                reason: "not primary".into(),
            },
        ];
        let kinds = [
            EntryKind::Dir,
            EntryKind::Regular,
            EntryKind::Symlink,
            EntryKind::Fifo,
            EntryKind::Char,
            EntryKind::Block,
            EntryKind::Socket,
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            out.push(Record::SyncEntry(TreeEntry {
                path: Cow::Owned(if i == 0 {
                    PathBuf::new()
                } else {
                    PathBuf::from(format!("d/e{i}"))
                }),
                kind,
                mode: [0o2775, 0o4751, 0o777, 0o600, 0o620, 0o660, 0o1755][i],
                uid: 1234,
                gid: 5678,
                rdev: if matches!(kind, EntryKind::Char | EntryKind::Block) {
                    libc::makedev(8, 1)
                } else {
                    0
                },
                size: if kind == EntryKind::Regular {
                    5 << 20
                } else {
                    0
                },
                atime: t(1_600_000_000, 5),
                mtime: t(-1, 999_999_999),
                target: (kind == EntryKind::Symlink)
                    .then(|| Cow::Owned(PathBuf::from("../../outside"))),
                xattrs: (0..i % 3)
                    .map(|n| Xattr {
                        name: Cow::Owned(OsString::from(format!("user.x{n}"))),
                        value: Cow::Owned(vec![n as u8; n * 7]),
                    })
                    .collect(),
            }));
        }
        out.push(Record::SyncLink {
            path: Cow::Owned(PathBuf::from("d2/link")),
            to: Cow::Owned(PathBuf::from("d/e1")),
        });
        out.push(Record::SyncData {
            index: 2,
            offset: 3 << 20,
            data: Cow::Owned(vec![0x5a; SYNC_CHUNK]),
        });
        out.push(Record::SyncData {
            index: 2,
            offset: 0,
            data: Cow::Owned(Vec::new()),
        });
        out.push(Record::SyncEnd {
            next_seq: 42,
            entries: 9,
            bytes: SYNC_CHUNK as u64,
        });
        out
    }

    #[test]
    fn every_record_round_trips() {
        let mut stream = Vec::new();
        for r in every_record() {
            let frame = to_frame(&r).unwrap();
            assert_eq!(decode_frame(&frame).unwrap(), r);
            // Head + payload is the same frame.
            let mut head = Vec::new();
            let payload = encode_head(&r, &mut head).unwrap();
            head.extend_from_slice(payload);
            assert_eq!(head, frame);
            if let Record::Mutation(m) = &r {
                let mut again = Vec::new();
                encode_mutation(m, &mut again).unwrap();
                assert_eq!(again, frame);
            }
            stream.extend_from_slice(&frame);
        }
        // A stream of frames splits back into the same records.
        let mut rest = &stream[..];
        let mut decoded = Vec::new();
        while let Some((body, total)) = split_frame(rest).unwrap() {
            decoded.push(decode(body).unwrap().into_owned());
            rest = &rest[total..];
        }
        assert!(rest.is_empty());
        assert_eq!(decoded, every_record());
    }

    #[test]
    fn write_data_is_borrowed_from_the_frame() {
        let frame = to_frame(&Record::Mutation(Mutation {
            seq: 1,
            replicate: true,
            op: every_op().remove(0),
        }))
        .unwrap();
        let Record::Mutation(Mutation {
            op: Op::Write { data, .. },
            ..
        }) = decode_frame(&frame).unwrap()
        else {
            panic!("not a write");
        };
        assert!(matches!(data, Cow::Borrowed(_)));
        assert_eq!(data.len(), 100_000);
    }

    #[test]
    fn truncated_and_extended_frames_are_rejected() {
        for r in every_record() {
            let frame = to_frame(&r).unwrap();
            let body = &frame[PREFIX_LEN..];
            let is_write = matches!(
                r,
                Record::Mutation(Mutation {
                    op: Op::Write { .. },
                    ..
                }) | Record::SyncData { .. }
            );
            for cut in 0..body.len() {
                let res = decode(&body[..cut]);
                if is_write && res.is_ok() {
                    // A write cut inside its data is a shorter write: the frame length guards it.
                    continue;
                }
                assert!(res.is_err(), "{r:?} cut at {cut}");
            }
            if !is_write {
                let mut longer = body.to_vec();
                longer.push(0);
                assert_eq!(decode(&longer), Err(WireError::Trailing(1)));
            }
            // A prefix that does not match the body.
            let mut bad = frame.clone();
            bad.push(0);
            assert!(decode_frame(&bad).is_err());
            assert!(decode_frame(&frame[..frame.len() - 1]).is_err());
        }
    }

    #[test]
    fn invalid_fields_are_rejected() {
        assert_eq!(decode(&[]), Err(WireError::Truncated));
        assert_eq!(decode(&[99]), Err(WireError::UnknownTag(99)));
        let mut m = vec![R_MUTATION];
        m.extend_from_slice(&1u64.to_le_bytes());
        m.push(2); // replicate must be 0 or 1
        assert_eq!(decode(&m), Err(WireError::Invalid("replicate")));
        let mut m = vec![R_MUTATION];
        m.extend_from_slice(&1u64.to_le_bytes());
        m.push(1);
        m.push(200); // unknown op
        assert_eq!(decode(&m), Err(WireError::UnknownTag(200)));
        // Nanoseconds out of range.
        let mut a = vec![R_APPLIED];
        a.extend_from_slice(&1u64.to_le_bytes());
        a.push(0);
        a.push(1);
        a.extend_from_slice(&[0; 16 + 4 + 8 + 4 + 4 + 8 + 8 + 8]);
        a.extend_from_slice(&0i64.to_le_bytes());
        a.extend_from_slice(&1_000_000_000u32.to_le_bytes());
        assert_eq!(decode(&a), Err(WireError::Invalid("nanoseconds")));
        // A byte string longer than the frame.
        let mut f = vec![R_MUTATION];
        f.extend_from_slice(&1u64.to_le_bytes());
        f.push(1);
        f.push(OP_REMOVEXATTR);
        f.extend_from_slice(&[0; 32]);
        f.push(0); // no path
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&f), Err(WireError::Truncated));
        // Frames above the limit.
        assert!(body_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
        let huge = Record::Mutation(Mutation {
            seq: 1,
            replicate: true,
            op: Op::Write {
                node: node(None),
                fh: 0,
                offset: 0,
                data: Cow::Owned(vec![0; MAX_FRAME]),
                sync: SyncMode::None,
                kill_suidgid: false,
            },
        });
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode(&huge, &mut out),
            Err(WireError::TooLarge(_))
        ));
        assert_eq!(out, vec![1, 2, 3], "nothing appended on error");
    }

    #[test]
    fn invalid_sync_fields_are_rejected() {
        let entry = |f: &dyn Fn(&mut TreeEntry<'static>)| {
            let Some(Record::SyncEntry(mut e)) = sync_records()
                .into_iter()
                .find(|r| matches!(r, Record::SyncEntry(e) if e.kind == EntryKind::Symlink))
            else {
                panic!("no symlink entry");
            };
            f(&mut e);
            let frame = to_frame(&Record::SyncEntry(e)).unwrap();
            decode_frame(&frame).map(Record::into_owned)
        };
        assert!(entry(&|_| {}).is_ok());
        assert_eq!(
            entry(&|e| e.mode = 0o10000),
            Err(WireError::Invalid("mode"))
        );
        assert_eq!(
            entry(&|e| e.target = None),
            Err(WireError::Invalid("target"))
        );
        assert_eq!(
            entry(&|e| e.kind = EntryKind::Regular),
            Err(WireError::Invalid("target"))
        );
        // An unknown kind.
        let mut body = to_frame(&Record::SyncLink {
            path: Cow::Borrowed(Path::new("")),
            to: Cow::Borrowed(Path::new("")),
        })
        .unwrap()[PREFIX_LEN..]
            .to_vec();
        body[0] = R_SYNC_ENTRY;
        body.truncate(5);
        body.push(8);
        assert_eq!(decode(&body), Err(WireError::Invalid("kind")));
        // A module name that is not UTF-8.
        let mut body = vec![R_SYNC_REQUEST];
        body.extend_from_slice(&1u32.to_le_bytes());
        body.push(0xff);
        body.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode(&body), Err(WireError::Invalid("module")));
        // A data chunk above the limit.
        let mut body = vec![R_SYNC_DATA];
        body.extend_from_slice(&[0; 16]);
        body.resize(body.len() + SYNC_CHUNK + 1, 0);
        assert_eq!(decode(&body), Err(WireError::Invalid("sync data length")));
        // A huge xattr count in a short frame fails without allocating for it.
        let Record::SyncEntry(mut e) = sync_records().remove(2) else {
            panic!("not an entry");
        };
        e.xattrs.clear();
        let mut frame = to_frame(&Record::SyncEntry(e)).unwrap();
        let len = frame.len();
        frame[len - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_frame(&frame), Err(WireError::Truncated));
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn arb_node() -> impl Strategy<Value = NodeRef> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(arb_bytes(20)),
        )
            .prop_map(|(nodeid, generation, dev, ino, path)| NodeRef {
                nodeid,
                generation,
                id: FileId { dev, ino },
                path: path.map(|p| PathBuf::from(OsString::from_vec(p))),
            })
    }

    fn arb_entry() -> impl Strategy<Value = EntryRef<'static>> {
        (
            arb_node(),
            arb_bytes(20),
            proptest::option::of(arb_bytes(20)),
            any::<bool>(),
        )
            .prop_map(|(parent, name, path, excluded)| EntryRef {
                parent,
                name: Cow::Owned(OsString::from_vec(name)),
                path: path.map(|p| PathBuf::from(OsString::from_vec(p))),
                excluded,
            })
    }

    fn arb_time() -> impl Strategy<Value = Timestamp> {
        (any::<i64>(), 0..1_000_000_000u32).prop_map(|(sec, nsec)| Timestamp { sec, nsec })
    }

    fn arb_id() -> impl Strategy<Value = FileId> {
        (any::<u64>(), any::<u64>()).prop_map(|(dev, ino)| FileId { dev, ino })
    }

    fn arb_owner() -> impl Strategy<Value = Owner> {
        (any::<u32>(), any::<u32>()).prop_map(|(uid, gid)| Owner { uid, gid })
    }

    fn arb_op() -> impl Strategy<Value = Op<'static>> {
        prop_oneof![
            (
                arb_node(),
                any::<u64>(),
                any::<u64>(),
                arb_bytes(300),
                0..3u8,
                any::<bool>()
            )
                .prop_map(|(node, fh, offset, data, s, kill_suidgid)| Op::Write {
                    node,
                    fh,
                    offset,
                    data: Cow::Owned(data),
                    sync: [SyncMode::None, SyncMode::Data, SyncMode::Full][s as usize],
                    kill_suidgid,
                }),
            (
                arb_node(),
                any::<u64>(),
                any::<i32>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(node, fh, mode, offset, len)| Op::Fallocate {
                    node,
                    fh,
                    mode,
                    offset,
                    len
                }),
            (
                arb_node(),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(arb_time()),
                proptest::option::of(arb_time())
            )
                .prop_map(|(node, fh, mode, uid, gid, size, atime, mtime)| {
                    Op::SetAttr {
                        node,
                        fh,
                        mode,
                        uid,
                        gid,
                        size,
                        atime,
                        mtime,
                    }
                }),
            (
                arb_entry(),
                any::<u32>(),
                any::<u32>(),
                any::<i32>(),
                arb_owner()
            )
                .prop_map(|(entry, mode, umask, flags, owner)| Op::Create {
                    entry,
                    mode,
                    umask,
                    flags,
                    owner
                }),
            (
                arb_entry(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                arb_owner()
            )
                .prop_map(|(entry, mode, umask, rdev, owner)| Op::Mknod {
                    entry,
                    mode,
                    umask,
                    rdev,
                    owner
                }),
            (arb_entry(), any::<u32>(), any::<u32>(), arb_owner()).prop_map(
                |(entry, mode, umask, owner)| Op::Mkdir {
                    entry,
                    mode,
                    umask,
                    owner
                }
            ),
            (arb_entry(), arb_bytes(30), arb_owner()).prop_map(|(entry, target, owner)| {
                Op::Symlink {
                    entry,
                    target: Cow::Owned(PathBuf::from(OsString::from_vec(target))),
                    owner,
                }
            }),
            (arb_node(), arb_entry()).prop_map(|(node, new)| Op::Link { node, new }),
            (arb_entry(), proptest::option::of(arb_id()))
                .prop_map(|(entry, target)| Op::Unlink { entry, target }),
            (arb_entry(), proptest::option::of(arb_id()))
                .prop_map(|(entry, target)| Op::Rmdir { entry, target }),
            (
                arb_entry(),
                arb_entry(),
                any::<u32>(),
                proptest::option::of(arb_id()),
                proptest::option::of(arb_id())
            )
                .prop_map(|(from, to, flags, moved, replaced)| Op::Rename {
                    from,
                    to,
                    flags,
                    moved,
                    replaced
                }),
            (arb_node(), arb_bytes(20), arb_bytes(100), any::<i32>()).prop_map(
                |(node, name, value, flags)| Op::SetXattr {
                    node,
                    name: Cow::Owned(OsString::from_vec(name)),
                    value: Cow::Owned(value),
                    flags,
                }
            ),
            (arb_node(), arb_bytes(20)).prop_map(|(node, name)| Op::RemoveXattr {
                node,
                name: Cow::Owned(OsString::from_vec(name)),
            }),
            (arb_node(), any::<u64>(), any::<bool>()).prop_map(|(node, fh, datasync)| Op::Fsync {
                node,
                fh,
                datasync
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in arb_bytes(200)) {
            let _ = decode(&bytes);
            let _ = decode_frame(&bytes);
            let _ = split_frame(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_tag_never_panic(
            tag in 1..=10u8,
            op in 0..=15u8,
            rest in arb_bytes(200),
        ) {
            let mut body = vec![tag];
            if tag == R_MUTATION {
                body.extend_from_slice(&7u64.to_le_bytes());
                body.push(1);
                body.push(op);
            }
            body.extend_from_slice(&rest);
            let _ = decode(&body);
        }

        #[test]
        fn random_mutations_round_trip(seq in any::<u64>(), replicate in any::<bool>(), op in arb_op()) {
            let r = Record::Mutation(Mutation { seq, replicate, op });
            let frame = to_frame(&r).unwrap();
            prop_assert_eq!(decode_frame(&frame).unwrap(), r);
        }

        #[test]
        fn random_tree_entries_round_trip(
            path in arb_bytes(40),
            kind in 1..=7u8,
            mode in 0..=0o7777u32,
            ids in (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
            times in (arb_time(), arb_time()),
            target in arb_bytes(40),
            xattrs in proptest::collection::vec((arb_bytes(20), arb_bytes(100)), 0..5),
        ) {
            let kind = EntryKind::from_tag(kind).unwrap();
            let r = Record::SyncEntry(TreeEntry {
                path: Cow::Owned(PathBuf::from(OsString::from_vec(path))),
                kind,
                mode,
                uid: ids.0,
                gid: ids.1,
                rdev: ids.2,
                size: ids.3,
                atime: times.0,
                mtime: times.1,
                target: (kind == EntryKind::Symlink)
                    .then(|| Cow::Owned(PathBuf::from(OsString::from_vec(target)))),
                xattrs: xattrs
                    .into_iter()
                    .map(|(n, v)| Xattr {
                        name: Cow::Owned(OsString::from_vec(n)),
                        value: Cow::Owned(v),
                    })
                    .collect(),
            });
            let frame = to_frame(&r).unwrap();
            prop_assert_eq!(decode_frame(&frame).unwrap(), r);
        }

        #[test]
        fn corrupted_frames_never_panic(
            op in arb_op(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut frame = to_frame(&Record::Mutation(Mutation { seq: 1, replicate: true, op })).unwrap();
            for (at, v) in flips {
                let i = at % frame.len();
                frame[i] = v;
            }
            let _ = decode_frame(&frame);
        }
    }
}
