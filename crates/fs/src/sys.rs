//! The mount's own helpers over the backing inodes (FUSE attributes and directory entries); the
//! `*at` system calls themselves are `tandem_backing::sys`, shared with the secondary's applier.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use rustix::fs::Stat;

pub(crate) use tandem_backing::sys::errno as errno_of;
pub(crate) use tandem_backing::sys::*;

use crate::mutation::{Attr, FileId, Timestamp};

pub(crate) fn file_id(st: &Stat) -> FileId {
    FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

pub(crate) fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn timestamp(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: u32::try_from(nsec.clamp(0, 999_999_999)).unwrap_or(0),
    }
}

pub(crate) fn attr_of(st: &Stat) -> Attr {
    Attr {
        id: file_id(st),
        mode: st.st_mode,
        nlink: st.st_nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime: timestamp(st.st_atime, st.st_atime_nsec as i64),
        mtime: timestamp(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: timestamp(st.st_ctime, st.st_ctime_nsec as i64),
    }
}

fn system_time(t: Timestamp) -> std::time::SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nsec));
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.sec.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + nanos
    }
}

/// The kernel's view of a backing inode, with `ino` replaced by the FUSE node id.
pub(crate) fn fuse_attr(st: &Stat, nodeid: u64) -> FileAttr {
    let a = attr_of(st);
    FileAttr {
        ino: INodeNo(nodeid),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        // The FUSE protocol carries a 32-bit device number in the old encoding.
        rdev: encode_dev(st.st_rdev),
        blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
        flags: 0,
    }
}

/// `new_encode_dev` of the kernel: the 32-bit form FUSE carries.
fn encode_dev(dev: u64) -> u32 {
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// One directory entry of the backing directory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirEnt<'a> {
    pub(crate) name: &'a OsStr,
    pub(crate) ino: u64,
    pub(crate) kind: FileType,
    /// The backing filesystem's cookie of the position after this entry (`telldir`): the FUSE
    /// offset of the entry, from which a later read resumes.
    pub(crate) off: u64,
}

/// An entry read ahead; its name is in [`DirReader::names`].
struct Queued {
    ino: u64,
    off: u64,
    kind: FileType,
    name: Range<usize>,
}

/// Bytes read from a directory by one `getdents` (each thread has its buffer).
const GETDENTS_BUFFER: usize = 32 * 1024;

thread_local! {
    static GETDENTS: RefCell<Vec<MaybeUninit<u8>>> =
        RefCell::new(vec![MaybeUninit::uninit(); GETDENTS_BUFFER]);
}

/// A directory being listed, read from the backing directory as the kernel asks (a buffer of
/// entries at a time, whatever the directory's size), resumable at any entry's cookie.
///
/// Entries read but not yet given out wait in a queue (names in one buffer: no allocation per
/// entry), so that looking at the first entries, or a reply that fills up before its last
/// entry, does not move the backing directory's position: seeking a directory makes the
/// backing filesystem read it again (ext4's hashed directories rebuild their listing state).
pub(crate) struct DirReader {
    /// The directory, read from its position.
    fd: Arc<OwnedFd>,
    /// Read from `fd`, not yet given out, in order.
    queue: VecDeque<Queued>,
    names: Vec<u8>,
    /// The cookie of the position [`DirReader::peek`] gives from (0: the start).
    pos: u64,
    /// A read failed: the directory is positioned again before it is read.
    failed: bool,
    /// `fd` reached the end (until it is positioned again).
    ended: bool,
}

impl DirReader {
    /// A reader of the directory `fd`, open for reading (nothing else moves its position).
    pub(crate) fn new(fd: Arc<OwnedFd>) -> DirReader {
        DirReader {
            fd,
            queue: VecDeque::new(),
            names: Vec::new(),
            pos: 0,
            failed: false,
            ended: false,
        }
    }

    /// Positions the reader after the entry whose cookie is `offset` (0: at the start). After a
    /// failed read, the backing directory is positioned again, so that the error comes again
    /// (or the listing goes on) rather than an early end.
    pub(crate) fn seek(&mut self, offset: u64) -> io::Result<()> {
        if !self.failed {
            if offset == self.pos {
                return Ok(());
            }
            if let Some(i) = self.queue.iter().position(|e| e.off == offset) {
                self.queue.drain(..=i);
                self.pos = offset;
                return Ok(());
            }
        }
        self.queue.clear();
        self.names.clear();
        self.failed = false;
        self.ended = false;
        self.pos = offset;
        rustix::fs::seek(&self.fd, rustix::fs::SeekFrom::Start(offset)).map_err(|e| {
            self.failed = true;
            io::Error::from(e)
        })?;
        Ok(())
    }

    /// The `i`-th entry from the position (`.` and `..` included, in the backing filesystem's
    /// order), read ahead as needed without moving the position; `None` at the end.
    pub(crate) fn ahead(&mut self, i: usize) -> Option<io::Result<DirEnt<'_>>> {
        while self.queue.len() <= i {
            if self.ended {
                return None;
            }
            if let Err(e) = self.read() {
                self.failed = true;
                return Some(Err(e));
            }
        }
        let q = self.queue.get(i)?;
        Some(Ok(DirEnt {
            name: OsStr::from_bytes(&self.names[q.name.clone()]),
            ino: q.ino,
            kind: q.kind,
            off: q.off,
        }))
    }

    /// The entry at the position (see [`DirReader::ahead`]).
    pub(crate) fn peek(&mut self) -> Option<io::Result<DirEnt<'_>>> {
        self.ahead(0)
    }

    /// Moves the position past the entry [`DirReader::peek`] gave.
    pub(crate) fn advance(&mut self) {
        if let Some(q) = self.queue.pop_front() {
            self.pos = q.off;
        }
    }

    /// Reads one buffer of entries into the queue (none at the end: `ended`).
    fn read(&mut self) -> io::Result<()> {
        if self.queue.is_empty() {
            self.names.clear();
        } else if let Some(front) = self.queue.front()
            && front.name.start > self.names.len() / 2
        {
            // Names of entries given out are dropped from time to time.
            let start = front.name.start;
            self.names.drain(..start);
            for q in &mut self.queue {
                q.name = q.name.start - start..q.name.end - start;
            }
        }
        GETDENTS.with_borrow_mut(|buf| {
            let mut raw = rustix::fs::RawDir::new(&self.fd, buf);
            let mut any = false;
            loop {
                let entry = match raw.next() {
                    None => break,
                    Some(Ok(entry)) => entry,
                    // Entries of this buffer already queued stay; the error comes at the next.
                    Some(Err(e)) if !any => return Err(e.into()),
                    Some(Err(_)) => break,
                };
                any = true;
                let name = entry.file_name().to_bytes();
                let start = self.names.len();
                self.names.extend_from_slice(name);
                self.queue.push_back(Queued {
                    ino: entry.ino(),
                    // A cookie is never 0 (0 is the start), but be safe: 0 would restart the
                    // listing.
                    off: entry.next_entry_cookie().max(1),
                    kind: kind_of(entry.file_type()),
                    name: start..self.names.len(),
                });
                if raw.is_buffer_empty() {
                    break;
                }
            }
            if !any {
                self.ended = true;
            }
            Ok(())
        })
    }
}

fn kind_of(t: rustix::fs::FileType) -> FileType {
    match t {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::Socket => FileType::Socket,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn names_from(reader: &mut DirReader, offset: u64) -> Vec<(String, u64)> {
        reader.seek(offset).expect("seek");
        let mut out = Vec::new();
        while let Some(ent) = reader.peek() {
            let ent = ent.expect("entry");
            out.push((ent.name.to_string_lossy().into_owned(), ent.off));
            reader.advance();
        }
        out
    }

    /// Several `getdents` buffers' worth, resumed from cookies inside and outside what was
    /// read ahead, after a look at the first entries, and from the start again.
    #[test]
    fn a_listing_resumes_at_any_cookie_whatever_was_read_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wanted: BTreeSet<String> = (0..5000).map(|i| format!("entry-{i:05}")).collect();
        for name in &wanted {
            std::fs::write(dir.path().join(name), b"").expect("create");
        }
        let fd = std::fs::File::open(dir.path()).expect("open");
        let mut reader = DirReader::new(Arc::new(fd.into()));

        // A look at the first entries does not move the position.
        let first: Vec<String> = (0..10)
            .map(|i| {
                let ent = reader.ahead(i).expect("some").expect("entry");
                ent.name.to_string_lossy().into_owned()
            })
            .collect();
        let all = names_from(&mut reader, 0);
        assert_eq!(
            all.iter()
                .take(10)
                .map(|(n, _)| n.clone())
                .collect::<Vec<_>>(),
            first
        );
        let listed: BTreeSet<String> = all
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != "." && n != "..")
            .collect();
        assert_eq!(listed, wanted);
        assert_eq!(all.len(), wanted.len() + 2);
        assert!(reader.peek().is_none(), "still the end");

        // Resumed from a cookie far back (not queued: the directory is positioned again), then
        // from one a few entries on (queued: no seek), then from the start.
        for at in [100, 4000, 4003, 17] {
            let rest = names_from(&mut reader, all[at].1);
            assert_eq!(rest, all[at + 1..], "resumed after entry {at}");
        }
        reader.seek(all[2500].1).expect("seek");
        reader.ahead(50).expect("some").expect("entry");
        let rest = names_from(&mut reader, all[2530].1);
        assert_eq!(rest, all[2531..], "resumed inside what was read ahead");
        assert_eq!(names_from(&mut reader, 0), all);
    }
}
