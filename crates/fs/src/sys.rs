//! The mount's own helpers over the backing inodes (FUSE attributes and directory entries); the
//! `*at` system calls themselves are `tandem_backing::sys`, shared with the secondary's applier.

use std::ffi::OsString;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;
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
#[derive(Clone, Debug)]
pub(crate) struct DirEnt {
    pub(crate) name: OsString,
    pub(crate) ino: u64,
    pub(crate) kind: FileType,
    /// The backing filesystem's cookie of the position after this entry (`telldir`): the FUSE
    /// offset of the entry, from which a later read resumes.
    pub(crate) off: u64,
}

/// A directory being listed, read from the backing directory as the kernel asks (a buffer of
/// entries at a time, whatever the directory's size), resumable at any entry's cookie.
pub(crate) struct DirReader {
    dir: rustix::fs::Dir,
    /// The cookie of the position the next [`DirReader::next`] reads from (0: the start).
    next: u64,
}

impl DirReader {
    /// A reader of the directory `fd` (open for reading; the reader keeps its own descriptor).
    pub(crate) fn new(fd: BorrowedFd<'_>) -> io::Result<DirReader> {
        Ok(DirReader {
            dir: rustix::fs::Dir::read_from(fd)?,
            next: 0,
        })
    }

    /// Positions the reader after the entry whose cookie is `offset` (0: at the start).
    pub(crate) fn seek(&mut self, offset: u64) -> io::Result<()> {
        if offset != self.next {
            if offset == 0 {
                self.dir.rewind();
            } else {
                let cookie = i64::try_from(offset)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                self.dir.seek(cookie)?;
            }
            self.next = offset;
        }
        Ok(())
    }

    /// The next entry, `.` and `..` included, in the backing filesystem's order.
    pub(crate) fn next(&mut self) -> Option<io::Result<DirEnt>> {
        let entry = match self.dir.read()? {
            Ok(entry) => entry,
            Err(e) => return Some(Err(e.into())),
        };
        let kind = match entry.file_type() {
            rustix::fs::FileType::Directory => FileType::Directory,
            rustix::fs::FileType::Symlink => FileType::Symlink,
            rustix::fs::FileType::Fifo => FileType::NamedPipe,
            rustix::fs::FileType::Socket => FileType::Socket,
            rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
            rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
            _ => FileType::RegularFile,
        };
        // A cookie is never 0 (0 is the start), but be safe: 0 would restart the listing.
        let off = u64::try_from(entry.offset()).unwrap_or(u64::MAX).max(1);
        self.next = off;
        Some(Ok(DirEnt {
            name: OsString::from_vec(entry.file_name().to_bytes().to_vec()),
            ino: entry.ino(),
            kind,
            off,
        }))
    }
}
