//! Full synchronisation: the primary copies its whole tree to the secondary over a
//! [`Connection`], before the replication stream starts on the same connection.
//!
//! # Protocol
//!
//! ```text
//!   secondary (dials)                                  primary (accepts)
//!   Connection::dial ── MAGIC, handshake ─────────────► dispatcher, Connection::accept
//!   SyncRequest { module, dir } ──────────────────────►
//!                      ◄───────────────────────────── SyncRefused { reason }   (and stop), or:
//!   receive_tree                                       freeze the mount; send_tree:
//!     remove the old contents ◄────────────────────── SyncEntry (the root: path "")
//!     create entries         ◄────────────────────── SyncEntry / SyncLink / SyncData ...
//!     times, syncfs          ◄────────────────────── SyncEnd { next_seq, entries, bytes }
//!   Ack { seq: 0, error } ────────────────────────────► (send_tree returns)
//!   Receiver::start(conn, applier, next_seq)           NetReplicator::start(conn, next_seq, ..)
//!                                                      swap the mount's replicator, unfreeze
//! ```
//!
//! The caller sends the [`Record::SyncRequest`] and, on the primary, checks it and answers a
//! refusal; [`send_tree`] and [`receive_tree`] do the rest. The primary's mount is frozen
//! (`tandem_fs::Mount::freeze`) during [`send_tree`], so the tree does not change under it, and
//! `next_seq` is the frozen mount's next `seq`: the replication stream resumes exactly there.
//!
//! # The tree
//!
//! [`send_tree`] walks the tree below `root` (an `O_PATH` handle of the backing directory)
//! depth first, entries of a directory in name order and consecutively, every directory before
//! what it holds. Every call is relative to a descriptor: directories are opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` from the root, names with
//! `AT_SYMLINK_NOFOLLOW`/`O_NOFOLLOW`, so nothing follows a symlink, leaves the root or enters
//! another mount. Excluded entries ([`Exclusions::is_entry_excluded`]) are skipped with all
//! they hold. Each entry ([`TreeEntry`]) carries its kind, mode (set-ID and sticky bits
//! included), owner, device number, size, access and modification times (ns), symlink target
//! and every extended attribute (POSIX ACLs included). A non-directory whose inode was already
//! sent under another path is a [`Record::SyncLink`] to that path. A regular file's data follows
//! its entry as [`Record::SyncData`] chunks of at most [`SYNC_CHUNK`] bytes; only the ranges
//! `SEEK_DATA`/`SEEK_HOLE` report as data are sent, so sparse files stay sparse (the size is
//! set with `ftruncate`). Files and directories are read with `O_NOATIME`, so the copy does not
//! change the primary's access times (reading a symlink's target still may, under `relatime`).
//!
//! [`receive_tree`] first removes everything below its root that is not excluded (the copy
//! replaces the secondary's previous contents; symlinks are removed as links, never followed;
//! a directory that still holds excluded entries stays, and is reused when the primary has a
//! directory there), then creates each entry and gives it the primary's owner, extended
//! attributes (extra ones, such as ACLs inherited from a default ACL, are removed), mode and
//! times, in that order (`chown` clears set-ID bits and file capabilities; setting an ACL
//! changes the mode), writes data at its offsets, re-creates hard links, sets directory times
//! last, deepest first (creating entries changes them), then `syncfs` and acknowledges with
//! `Ack { seq: 0, error: None }`, or with its errno when something failed. The root gets the
//! primary root's owner, mode, xattrs and times too. It checks the stream strictly: paths
//! relative and plain, never excluded, parents present, data only for the last file and within
//! its size, and the totals of [`Record::SyncEnd`].
//!
//! # Failure
//!
//! Any failure stops the synchronisation; the secondary's tree is then partial and must not be
//! used (the daemon keeps it `Stale` until a synchronisation succeeds). A secondary that fails
//! acknowledges with its errno before returning, so the primary's [`send_tree`] fails with
//! [`SyncError::Remote`] (or with the transport error when the secondary closed first).
//!
//! # Progress
//!
//! The `*_with` variants take a [`SyncProgress`], counters another thread may read while the
//! copy runs.
//!
//! # Limits
//!
//! Directory depth costs one descriptor per level while removing on the secondary. Mount points
//! below the root are refused (`EXDEV`). Times of symlinks are copied, but the primary's own
//! symlink access times may move when their targets are read.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom};
use tandem_fs::{Exclusions, Timestamp};

use crate::sys::{self, XattrPath};
use crate::transport::{Connection, TransportError};
use crate::wire::{EntryKind, Record, SYNC_CHUNK, TreeEntry, Xattr};

/// What a full synchronisation copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Entries and hard links (the root included).
    pub entries: u64,
    /// Regular files (hard links not counted again).
    pub files: u64,
    /// Data bytes (holes not counted).
    pub bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Counters of a synchronisation in progress, readable from another thread (share it in an
/// `Arc`).
#[derive(Debug, Default)]
pub struct SyncProgress {
    entries: AtomicU64,
    bytes: AtomicU64,
}

impl SyncProgress {
    /// Entries and links sent or received so far.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Data bytes sent or received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Why a full synchronisation failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A local system call failed on an entry of the tree.
    #[error("{op} {}: {source}", display_path(path))]
    Io {
        /// What was done (`"mkdir"`, `"read"`...).
        op: &'static str,
        /// The entry, relative to the root (`""`: the root).
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The other side does not follow the protocol (unexpected or inconsistent records).
    #[error("full synchronisation protocol error: {0}")]
    Protocol(String),
    /// The primary refused the synchronisation ([`Record::SyncRefused`]).
    #[error("full synchronisation refused by the primary: {0}")]
    Refused(String),
    /// The secondary failed to apply the copy and acknowledged with this errno.
    #[error("full synchronisation failed on the secondary: {}", io::Error::from_raw_os_error(*.0))]
    Remote(i32),
    /// The connection failed.
    #[error("full synchronisation: {0}")]
    Transport(#[from] TransportError),
}

impl SyncError {
    /// The errno the secondary acknowledges a failure with.
    pub fn errno(&self) -> i32 {
        match self {
            SyncError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            SyncError::Protocol(_) => libc::EPROTO,
            SyncError::Refused(_) => libc::EPERM,
            SyncError::Remote(e) => *e,
            SyncError::Transport(_) => libc::EIO,
        }
    }
}

fn display_path(p: &Path) -> std::path::Display<'_> {
    if p.as_os_str().is_empty() {
        Path::new(".").display()
    } else {
        p.display()
    }
}

/// A [`SyncError::Io`] from an errno.
fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> SyncError + 'p {
    move |source| SyncError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A [`SyncError::Io`] from a rustix error.
fn rio_err<'p>(
    op: &'static str,
    path: &'p Path,
) -> impl FnOnce(rustix::io::Errno) -> SyncError + 'p {
    move |e| io_err(op, path)(e.into())
}

fn time(sec: i64, nsec: u64) -> Timestamp {
    Timestamp {
        sec,
        // `stat` nanoseconds are below 10^9.
        nsec: u32::try_from(nsec).unwrap_or(0),
    }
}

// ------------------------------------------------------------------------------------- sending

/// Sends the tree below `root` (an `O_PATH` handle of the directory; the tree must not change
/// meanwhile), except what `exclude` excludes, then [`Record::SyncEnd`] with `next_seq`, and
/// waits for the secondary's `Ack { seq: 0 }` for at most the connection's read timeout (see
/// [`Connection::set_read_timeout`]; the secondary acknowledges after its `syncfs`). Writes
/// block while the secondary does not read: give the connection a write timeout
/// ([`Connection::set_write_timeout`]) so that a stuck secondary cannot hold a frozen mount
/// forever. See the module documentation.
pub fn send_tree(
    root: BorrowedFd<'_>,
    exclude: &Exclusions,
    next_seq: u64,
    conn: &mut Connection,
) -> Result<SyncStats, SyncError> {
    send_tree_with(root, exclude, next_seq, conn, &SyncProgress::default())
}

/// [`send_tree`], counting what was sent in `progress`.
pub fn send_tree_with(
    root: BorrowedFd<'_>,
    exclude: &Exclusions,
    next_seq: u64,
    conn: &mut Connection,
    progress: &SyncProgress,
) -> Result<SyncStats, SyncError> {
    let started = Instant::now();
    let mut sender = Sender {
        root,
        exclude,
        conn,
        progress,
        stats: SyncStats::default(),
        inodes: HashMap::new(),
        buf: Vec::new(),
    };
    match sender.walk().and_then(|()| {
        sender.conn.write(&Record::SyncEnd {
            next_seq,
            entries: sender.stats.entries,
            bytes: sender.stats.bytes,
        })?;
        sender.conn.flush()?;
        Ok(())
    }) {
        Ok(()) => {}
        Err(SyncError::Transport(e)) => {
            // The secondary may have stopped reading because it failed: its reason comes first.
            return Err(remote_failure(sender.conn).unwrap_or(SyncError::Transport(e)));
        }
        Err(e) => {
            // Tell the secondary to stop: it waits for more records.
            sender.conn.shutdown();
            return Err(e);
        }
    }
    let mut stats = sender.stats;
    match sender.conn.recv()? {
        Record::Ack {
            seq: 0,
            error: None,
        } => {}
        Record::Ack {
            seq: 0,
            error: Some(errno),
        } => return Err(SyncError::Remote(errno)),
        other => {
            return Err(SyncError::Protocol(format!(
                "{} instead of the acknowledgement of the synchronisation",
                other.kind()
            )));
        }
    }
    stats.elapsed = started.elapsed();
    tracing::info!(
        entries = stats.entries,
        files = stats.files,
        bytes = stats.bytes,
        elapsed = ?stats.elapsed,
        "full synchronisation sent"
    );
    Ok(stats)
}

/// The secondary's failure acknowledgement, if it sent one before closing.
fn remote_failure(conn: &mut Connection) -> Option<SyncError> {
    conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    match conn.recv() {
        Ok(Record::Ack {
            seq: 0,
            error: Some(errno),
        }) => Some(SyncError::Remote(errno)),
        _ => None,
    }
}

struct Sender<'s> {
    root: BorrowedFd<'s>,
    exclude: &'s Exclusions,
    conn: &'s mut Connection,
    progress: &'s SyncProgress,
    stats: SyncStats,
    /// Non-directories with several links: `(st_dev, st_ino)` -> the path first sent.
    inodes: HashMap<(u64, u64), PathBuf>,
    buf: Vec<u8>,
}

impl Sender<'_> {
    fn walk(&mut self) -> Result<(), SyncError> {
        let root_path = PathBuf::new();
        let dir =
            sys::open_dir_beneath(self.root, &root_path).map_err(io_err("open", &root_path))?;
        let st = rustix::fs::fstat(&dir).map_err(rio_err("stat", &root_path))?;
        let xattrs = read_xattrs(&XattrPath::Follow(sys::proc_path(dir.as_fd())), &root_path)?;
        self.send_entry(TreeEntry {
            path: Cow::Borrowed(&root_path),
            kind: EntryKind::Dir,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: 0,
            size: 0,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            target: None,
            xattrs,
        })?;
        drop(dir);
        let mut stack = vec![root_path];
        while let Some(path) = stack.pop() {
            let subdirs = self.send_dir(&path)?;
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// Sends the entries of the directory `rel` (and the data of its files); returns its
    /// subdirectories.
    fn send_dir(&mut self, rel: &Path) -> Result<Vec<PathBuf>, SyncError> {
        let dir = sys::open_dir_beneath(self.root, rel).map_err(io_err("open", rel))?;
        let names = sys::list_dir(dir.as_fd()).map_err(io_err("read directory", rel))?;
        let mut subdirs = Vec::new();
        for name in names {
            if self.exclude.is_entry_excluded(rel, &name) {
                continue;
            }
            let path = rel.join(&name);
            let st = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(rio_err("stat", &path))?;
            let Some(kind) = EntryKind::from_mode(st.st_mode) else {
                return Err(io_err("stat", &path)(sys::os(libc::EINVAL)));
            };
            if kind != EntryKind::Dir && st.st_nlink > 1 {
                let key = (st.st_dev, st.st_ino);
                if let Some(first) = self.inodes.get(&key) {
                    let first = first.clone();
                    self.count_entry();
                    self.conn.write(&Record::SyncLink {
                        path: Cow::Borrowed(&path),
                        to: Cow::Borrowed(&first),
                    })?;
                    continue;
                }
                self.inodes.insert(key, path.clone());
            }
            let target = match kind {
                EntryKind::Symlink => Some(Cow::Owned(PathBuf::from(OsString::from_vec(
                    rustix::fs::readlinkat(&dir, name.as_os_str(), Vec::new())
                        .map_err(rio_err("readlink", &path))?
                        .into_bytes(),
                )))),
                _ => None,
            };
            let entry_path =
                sys::proc_entry_path(dir.as_fd(), &name).map_err(io_err("xattrs", &path))?;
            let xattrs = read_xattrs(&XattrPath::NoFollow(entry_path), &path)?;
            let index = self.stats.entries;
            self.send_entry(TreeEntry {
                path: Cow::Borrowed(&path),
                kind,
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
                rdev: if matches!(kind, EntryKind::Char | EntryKind::Block) {
                    st.st_rdev
                } else {
                    0
                },
                size: if kind == EntryKind::Regular {
                    u64::try_from(st.st_size).unwrap_or(0)
                } else {
                    0
                },
                atime: time(st.st_atime, st.st_atime_nsec),
                mtime: time(st.st_mtime, st.st_mtime_nsec),
                target,
                xattrs,
            })?;
            match kind {
                EntryKind::Regular => {
                    self.stats.files += 1;
                    self.send_data(dir.as_fd(), &name, &path, &st, index)?;
                }
                EntryKind::Dir => subdirs.push(path),
                _ => {}
            }
        }
        Ok(subdirs)
    }

    fn count_entry(&mut self) {
        self.stats.entries += 1;
        self.progress.entries.fetch_add(1, Ordering::Relaxed);
    }

    fn send_entry(&mut self, entry: TreeEntry<'_>) -> Result<(), SyncError> {
        self.count_entry();
        self.conn.write(&Record::SyncEntry(entry))?;
        Ok(())
    }

    /// Sends the data ranges of a regular file (not its holes).
    fn send_data(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        st: &rustix::fs::Stat,
        index: u64,
    ) -> Result<(), SyncError> {
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size == 0 {
            return Ok(());
        }
        let base = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(dir, name, base | OFlags::NOATIME, Mode::empty()) {
            Err(rustix::io::Errno::PERM) => rustix::fs::openat(dir, name, base, Mode::empty()),
            other => other,
        }
        .map_err(rio_err("open", path))?;
        let opened = rustix::fs::fstat(&file).map_err(rio_err("stat", path))?;
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) {
            // The tree changed under us (it should be frozen).
            return Err(io_err("open", path)(sys::os(libc::ESTALE)));
        }
        self.buf.resize(SYNC_CHUNK, 0);
        let mut pos = 0u64;
        while pos < size {
            let data = match rustix::fs::seek(&file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // No data after `pos`: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => break,
                // No SEEK_DATA here: everything is data.
                Err(rustix::io::Errno::INVAL) => pos,
                Err(e) => return Err(rio_err("seek", path)(e)),
            };
            if data >= size {
                break;
            }
            let hole = match rustix::fs::seek(&file, SeekFrom::Hole(data)) {
                Ok(h) => h.min(size),
                Err(rustix::io::Errno::INVAL) => size,
                Err(e) => return Err(rio_err("seek", path)(e)),
            };
            let mut at = data;
            while at < hole {
                let want = usize::try_from(hole - at).map_or(SYNC_CHUNK, |n| n.min(SYNC_CHUNK));
                let chunk = &mut self.buf[..want];
                let n = loop {
                    match rustix::io::pread(&file, &mut *chunk, at) {
                        Err(rustix::io::Errno::INTR) => {}
                        other => break other.map_err(rio_err("read", path))?,
                    }
                };
                if n == 0 {
                    // Shorter than its size (it should be frozen): the rest stays a hole.
                    return Ok(());
                }
                self.conn.write(&Record::SyncData {
                    index,
                    offset: at,
                    data: Cow::Borrowed(&self.buf[..n]),
                })?;
                at += n as u64;
                self.stats.bytes += n as u64;
                self.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            pos = hole;
        }
        Ok(())
    }
}

/// Every extended attribute of an entry.
fn read_xattrs(at: &XattrPath, path: &Path) -> Result<Vec<Xattr<'static>>, SyncError> {
    let names = sys::xattr_names(at).map_err(io_err("list xattrs", path))?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        match sys::xattr_value(at, &name) {
            Ok(value) => out.push(Xattr {
                name: Cow::Owned(name),
                value: Cow::Owned(value),
            }),
            // Removed meanwhile (it should be frozen).
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(io_err("get xattr", path)(e)),
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------ receiving

/// Receives the tree sent by [`send_tree`] into `root` (an `O_PATH` handle of the secondary's
/// backing directory): removes the previous contents except what `exclude` excludes, creates
/// the primary's tree, `syncfs`, and acknowledges. Returns the stats and the `next_seq` the
/// replication stream starts at. Records are awaited for at most the connection's read
/// timeout. The caller has sent the [`Record::SyncRequest`]; a [`Record::SyncRefused`] answer
/// is [`SyncError::Refused`] and leaves the tree untouched. See the module documentation.
pub fn receive_tree(
    root: BorrowedFd<'_>,
    exclude: &Exclusions,
    conn: &mut Connection,
) -> Result<(SyncStats, u64), SyncError> {
    receive_tree_with(root, exclude, conn, &SyncProgress::default())
}

/// [`receive_tree`], counting what was received in `progress`.
pub fn receive_tree_with(
    root: BorrowedFd<'_>,
    exclude: &Exclusions,
    conn: &mut Connection,
    progress: &SyncProgress,
) -> Result<(SyncStats, u64), SyncError> {
    let started = Instant::now();
    let root_entry = match conn.recv()? {
        Record::SyncRefused { reason } => return Err(SyncError::Refused(reason)),
        Record::SyncEntry(e) if e.path.as_os_str().is_empty() && e.kind == EntryKind::Dir => e,
        other => {
            let e = SyncError::Protocol(format!(
                "{} instead of the root entry or a refusal",
                other.kind()
            ));
            let _ = conn.send(&Record::Ack {
                seq: 0,
                error: Some(e.errno()),
            });
            return Err(e);
        }
    };
    let mut rx = TreeReceiver {
        root,
        exclude,
        progress,
        stats: SyncStats::default(),
        file: None,
        parent: None,
        dirs: Vec::new(),
    };
    let result = (|| {
        rx.wipe()?;
        rx.root(&root_entry)?;
        loop {
            match conn.recv()? {
                Record::SyncEntry(e) => rx.entry(&e)?,
                Record::SyncLink { path, to } => rx.link(&path, &to)?,
                Record::SyncData {
                    index,
                    offset,
                    data,
                } => rx.data(index, offset, &data)?,
                Record::SyncEnd {
                    next_seq,
                    entries,
                    bytes,
                } => {
                    rx.finish(entries, bytes)?;
                    return Ok(next_seq);
                }
                other => {
                    return Err(SyncError::Protocol(format!(
                        "{} during the synchronisation",
                        other.kind()
                    )));
                }
            }
        }
    })();
    match result {
        Ok(next_seq) => {
            conn.send(&Record::Ack {
                seq: 0,
                error: None,
            })?;
            let mut stats = rx.stats;
            stats.elapsed = started.elapsed();
            tracing::info!(
                entries = stats.entries,
                files = stats.files,
                bytes = stats.bytes,
                elapsed = ?stats.elapsed,
                next_seq,
                "full synchronisation received"
            );
            Ok((stats, next_seq))
        }
        Err(e) => {
            tracing::warn!(error = %e, "full synchronisation failed");
            let _ = conn.send(&Record::Ack {
                seq: 0,
                error: Some(e.errno()),
            });
            Err(e)
        }
    }
}

/// The regular file whose data is being received.
struct OpenFile {
    index: u64,
    path: PathBuf,
    fd: OwnedFd,
    entry: TreeEntry<'static>,
}

/// A directory whose times are set at the end.
struct DirTimes {
    path: PathBuf,
    atime: Timestamp,
    mtime: Timestamp,
}

struct TreeReceiver<'r> {
    root: BorrowedFd<'r>,
    exclude: &'r Exclusions,
    progress: &'r SyncProgress,
    stats: SyncStats,
    file: Option<OpenFile>,
    /// The last parent directory used (entries of a directory arrive together).
    parent: Option<(PathBuf, OwnedFd)>,
    dirs: Vec<DirTimes>,
}

/// One directory being emptied.
struct WipeLevel {
    fd: OwnedFd,
    path: PathBuf,
    /// Names left to look at, in reverse order.
    names: Vec<OsString>,
    /// Something stays in it (excluded).
    kept: bool,
}

impl TreeReceiver<'_> {
    /// Removes everything below the root that is not excluded, without following symlinks,
    /// leaving the root or entering another mount.
    fn wipe(&mut self) -> Result<(), SyncError> {
        let level = |fd: OwnedFd, path: PathBuf| -> Result<WipeLevel, SyncError> {
            let mut names = sys::list_dir(fd.as_fd()).map_err(io_err("read directory", &path))?;
            names.reverse();
            Ok(WipeLevel {
                fd,
                path,
                names,
                kept: false,
            })
        };
        let root = PathBuf::new();
        let fd = sys::open_dir_beneath(self.root, &root).map_err(io_err("open", &root))?;
        let mut stack = vec![level(fd, root)?];
        let mut removed = 0u64;
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.pop() else {
                // Done with this directory: remove it unless something stays in it.
                let Some(done) = stack.pop() else { break };
                if let Some(parent) = stack.last_mut() {
                    if done.kept {
                        parent.kept = true;
                    } else {
                        drop(done.fd);
                        let name = done.path.file_name().unwrap_or_default();
                        rustix::fs::unlinkat(&parent.fd, name, AtFlags::REMOVEDIR)
                            .map_err(rio_err("rmdir", &done.path))?;
                        removed += 1;
                    }
                }
                continue;
            };
            let path = top.path.join(&name);
            if self.exclude.is_entry_excluded(&top.path, &name) {
                top.kept = true;
                continue;
            }
            let st = rustix::fs::statat(&top.fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(rio_err("stat", &path))?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let fd = sys::open_dir_beneath(top.fd.as_fd(), Path::new(&name))
                    .map_err(io_err("open", &path))?;
                stack.push(level(fd, path)?);
            } else {
                rustix::fs::unlinkat(&top.fd, name.as_os_str(), AtFlags::empty())
                    .map_err(rio_err("unlink", &path))?;
                removed += 1;
            }
        }
        tracing::debug!(removed, "previous contents removed");
        Ok(())
    }

    /// The root entry: the root's owner, xattrs and mode now, its times at the end.
    fn root(&mut self, e: &TreeEntry<'_>) -> Result<(), SyncError> {
        let path = PathBuf::new();
        self.count_entry();
        let at = XattrPath::Follow(sys::proc_path(self.root));
        set_meta(self.root, &at, e, &path)?;
        self.dirs.push(DirTimes {
            path,
            atime: e.atime,
            mtime: e.mtime,
        });
        Ok(())
    }

    fn count_entry(&mut self) {
        self.stats.entries += 1;
        self.progress.entries.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks a path of the stream; returns its parent and name.
    fn check_path<'p>(&self, path: &'p Path) -> Result<(&'p Path, &'p OsStr), SyncError> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(SyncError::Protocol(format!(
                "entry path {:?} has no name",
                path
            )));
        };
        if !sys::valid_path(path) {
            return Err(SyncError::Protocol(format!(
                "entry path {path:?} is not a plain relative path"
            )));
        }
        if self.exclude.is_excluded(path) {
            return Err(SyncError::Protocol(format!(
                "entry {} is excluded here (exclusions differ between the nodes?)",
                path.display()
            )));
        }
        Ok((parent, name))
    }

    /// The `O_PATH` handle of a parent directory (the last one is kept).
    fn parent_fd(&mut self, parent: &Path) -> Result<BorrowedFd<'_>, SyncError> {
        if parent.as_os_str().is_empty() {
            return Ok(self.root);
        }
        let cached = matches!(&self.parent, Some((p, _)) if p == parent);
        if !cached {
            let fd = sys::open_path_beneath(self.root, parent).map_err(io_err("open", parent))?;
            self.parent = Some((parent.to_owned(), fd));
        }
        match &self.parent {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(io_err("open", parent)(sys::os(libc::ENOENT))),
        }
    }

    /// Gives the file whose data was received its owner, xattrs, mode and times.
    fn finish_file(&mut self) -> Result<(), SyncError> {
        let Some(f) = self.file.take() else {
            return Ok(());
        };
        let at = XattrPath::Follow(sys::proc_path(f.fd.as_fd()));
        set_meta(f.fd.as_fd(), &at, &f.entry, &f.path)?;
        sys::set_times(
            f.fd.as_fd(),
            Some(f.entry.atime.into()),
            Some(f.entry.mtime.into()),
        )
        .map_err(io_err("set times", &f.path))
    }

    fn entry(&mut self, e: &TreeEntry<'_>) -> Result<(), SyncError> {
        self.finish_file()?;
        let path: &Path = &e.path;
        let (parent, name) = self.check_path(path)?;
        let index = self.stats.entries;
        self.count_entry();
        let dir = self.parent_fd(parent)?;
        let create_mode = Mode::from_raw_mode(0o600);
        match e.kind {
            EntryKind::Dir => match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {
                    // Kept by the removal because it holds excluded entries: reuse it.
                    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(rio_err("stat", path))?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                        return Err(io_err("mkdir", path)(sys::os(libc::EEXIST)));
                    }
                }
                Err(err) => return Err(rio_err("mkdir", path)(err)),
            },
            EntryKind::Regular => {
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::NOCTTY
                        | OFlags::CLOEXEC,
                    create_mode,
                )
                .map_err(rio_err("create", path))?;
                rustix::fs::ftruncate(&fd, e.size).map_err(rio_err("truncate", path))?;
                self.stats.files += 1;
                self.file = Some(OpenFile {
                    index,
                    path: path.to_owned(),
                    fd,
                    entry: e.clone().into_owned(),
                });
                return Ok(());
            }
            EntryKind::Symlink => {
                let target = e.target.as_deref().unwrap_or(Path::new(""));
                rustix::fs::symlinkat(target, dir, name).map_err(rio_err("symlink", path))?;
            }
            EntryKind::Fifo | EntryKind::Char | EntryKind::Block | EntryKind::Socket => {
                let file_type = FileType::from_raw_mode(e.kind.type_bits());
                rustix::fs::mknodat(dir, name, file_type, create_mode, e.rdev)
                    .map_err(rio_err("mknod", path))?;
            }
        }
        let fd = sys::open_path_at(dir, name).map_err(io_err("open", path))?;
        let at =
            XattrPath::NoFollow(sys::proc_entry_path(dir, name).map_err(io_err("xattrs", path))?);
        set_meta(fd.as_fd(), &at, e, path)?;
        if e.kind == EntryKind::Dir {
            self.dirs.push(DirTimes {
                path: path.to_owned(),
                atime: e.atime,
                mtime: e.mtime,
            });
        } else {
            sys::set_times(fd.as_fd(), Some(e.atime.into()), Some(e.mtime.into()))
                .map_err(io_err("set times", path))?;
        }
        Ok(())
    }

    fn link(&mut self, path: &Path, to: &Path) -> Result<(), SyncError> {
        self.finish_file()?;
        let (parent, name) = self.check_path(path)?;
        self.check_path(to)?;
        self.count_entry();
        let target = sys::open_path_beneath(self.root, to).map_err(io_err("open", to))?;
        if sys::stat_fd(target.as_fd())
            .map_err(io_err("stat", to))?
            .st_mode
            & libc::S_IFMT
            == libc::S_IFDIR
        {
            return Err(SyncError::Protocol(format!(
                "hard link {} to the directory {}",
                path.display(),
                to.display()
            )));
        }
        let dir = self.parent_fd(parent)?;
        rustix::fs::linkat(&target, "", dir, name, AtFlags::EMPTY_PATH)
            .map_err(rio_err("link", path))
    }

    fn data(&mut self, index: u64, offset: u64, data: &[u8]) -> Result<(), SyncError> {
        let Some(f) = self.file.as_ref().filter(|f| f.index == index) else {
            return Err(SyncError::Protocol(format!(
                "data for entry {index}, which is not the file being received"
            )));
        };
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > f.entry.size) {
            return Err(SyncError::Protocol(format!(
                "data at {offset}+{} beyond the size {} of {}",
                data.len(),
                f.entry.size,
                f.path.display()
            )));
        }
        if let (_, Some(errno)) = sys::pwrite_all(f.fd.as_fd(), data, offset) {
            return Err(io_err("write", &f.path)(errno));
        }
        self.stats.bytes += data.len() as u64;
        self.progress
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The end: checks the totals, sets directory times (deepest first), `syncfs`.
    fn finish(&mut self, entries: u64, bytes: u64) -> Result<(), SyncError> {
        self.finish_file()?;
        if (entries, bytes) != (self.stats.entries, self.stats.bytes) {
            return Err(SyncError::Protocol(format!(
                "the primary sent {entries} entries and {bytes} bytes, {} and {} arrived",
                self.stats.entries, self.stats.bytes
            )));
        }
        self.parent = None;
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
        for d in &dirs {
            let fd;
            let dir = if d.path.as_os_str().is_empty() {
                self.root
            } else {
                fd = sys::open_path_beneath(self.root, &d.path).map_err(io_err("open", &d.path))?;
                fd.as_fd()
            };
            sys::set_times(dir, Some(d.atime.into()), Some(d.mtime.into()))
                .map_err(io_err("set times", &d.path))?;
        }
        let root = PathBuf::new();
        let fd = sys::open_dir_beneath(self.root, &root).map_err(io_err("open", &root))?;
        rustix::fs::syncfs(&fd).map_err(rio_err("syncfs", &root))
    }
}

/// Gives an entry the primary's owner, extended attributes (exactly: extra ones are removed)
/// and mode (not for symlinks), in that order.
fn set_meta(
    fd: BorrowedFd<'_>,
    at: &XattrPath,
    e: &TreeEntry<'_>,
    path: &Path,
) -> Result<(), SyncError> {
    sys::set_owner(fd, Some(e.uid), Some(e.gid)).map_err(io_err("chown", path))?;
    let existing = sys::xattr_names(at).map_err(io_err("list xattrs", path))?;
    for name in existing {
        if !e.xattrs.iter().any(|x| *x.name == *name) {
            match sys::xattr_remove(at, &name) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(io_err("remove xattr", path)(e)),
            }
        }
    }
    for x in &e.xattrs {
        sys::xattr_set(at, &x.name, &x.value, 0).map_err(io_err("set xattr", path))?;
    }
    if e.kind != EntryKind::Symlink {
        sys::set_mode(fd, e.mode).map_err(io_err("chmod", path))?;
    }
    Ok(())
}
