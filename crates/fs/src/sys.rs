//! Thin wrappers over the *at syscalls used on the backing directory.
//!
//! Every path given to the kernel here is either one component relative to a backing directory
//! descriptor, or a `/proc/self/fd/N` magic link to a descriptor we hold: nothing is ever resolved
//! through the mount itself (that would recurse into FUSE).

use std::cell::Cell;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};

use crate::mutation::{Attr, FileId, Timestamp};

/// `/proc/self/fd/N` for a descriptor we hold.
pub(crate) fn proc_path(fd: BorrowedFd<'_>) -> CString {
    use std::os::fd::AsRawFd;
    // A decimal number never contains a NUL byte.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `/proc/self/fd/N/name`: the entry `name` of a directory we hold.
pub(crate) fn proc_entry_path(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<CString> {
    use std::os::fd::AsRawFd;
    let mut bytes = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    bytes.extend_from_slice(name.as_bytes());
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens an `O_PATH` handle to the entry `name` of `dir` without following a symlink there and
/// without leaving `dir` (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`; plain `openat`
/// with `O_NOFOLLOW` on kernels without `openat2`).
pub(crate) fn open_path_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat2(
        dir,
        name,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    ) {
        Err(rustix::io::Errno::NOSYS) => {
            rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(io::Error::from)
        }
        other => other.map_err(io::Error::from),
    }
}

/// Opens an inode we hold an `O_PATH` descriptor of, with real access flags (through the
/// `/proc/self/fd` magic link, which does not go through the mount).
pub(crate) fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        rustix::fs::CWD,
        proc_path(fd).as_c_str(),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// Opens a directory we hold an `O_PATH` descriptor of for reading its entries.
pub(crate) fn open_dir(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        fd,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// `fstat`, also on `O_PATH` descriptors.
pub(crate) fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    rustix::fs::fstat(fd).map_err(io::Error::from)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

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

/// The 64-bit `dev_t` of the kernel's 32-bit encoding (for `mknod`).
pub(crate) fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Writes all of `data` at `offset`; returns the bytes written (short only if an error happened
/// after some bytes were written).
pub(crate) fn pwrite_all(
    fd: BorrowedFd<'_>,
    data: &[u8],
    offset: u64,
) -> (usize, Option<io::Error>) {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => return (done, Some(io::Error::from_raw_os_error(libc::EIO))),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return (done, Some(e.into())),
        }
    }
    (done, None)
}

/// Reads up to `size` bytes at `offset` (short only at end of file).
pub(crate) fn pread_full(fd: BorrowedFd<'_>, size: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut done = 0;
    while done < size {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// One directory entry of the backing directory.
#[derive(Clone, Debug)]
pub(crate) struct DirEnt {
    pub(crate) name: OsString,
    pub(crate) ino: u64,
    pub(crate) kind: FileType,
}

/// All entries of a directory, `.` and `..` included, in the backing filesystem's order.
pub(crate) fn read_dir(fd: BorrowedFd<'_>) -> io::Result<Vec<DirEnt>> {
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    let mut out = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let kind = match entry.file_type() {
            rustix::fs::FileType::Directory => FileType::Directory,
            rustix::fs::FileType::Symlink => FileType::Symlink,
            rustix::fs::FileType::Fifo => FileType::NamedPipe,
            rustix::fs::FileType::Socket => FileType::Socket,
            rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
            rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
            _ => FileType::RegularFile,
        };
        out.push(DirEnt {
            name: OsString::from_vec(entry.file_name().to_bytes().to_vec()),
            ino: entry.ino(),
            kind,
        });
    }
    Ok(out)
}

/// `utimensat` on an `O_PATH` descriptor (`AT_EMPTY_PATH`: the inode itself, symlinks included).
pub(crate) fn set_times(
    fd: BorrowedFd<'_>,
    atime: Option<Timestamp>,
    mtime: Option<Timestamp>,
) -> io::Result<()> {
    let spec = |t: Option<Timestamp>| match t {
        Some(t) => Timespec {
            tv_sec: t.sec,
            tv_nsec: i64::from(t.nsec) as _,
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
    };
    let times = Timestamps {
        last_access: spec(atime),
        last_modification: spec(mtime),
    };
    rustix::fs::utimensat(fd, c"", &times, AtFlags::EMPTY_PATH).map_err(io::Error::from)
}

/// `chown` of the inode itself (not a symlink's target) through an `O_PATH` descriptor.
pub(crate) fn set_owner(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    rustix::fs::chownat(
        fd,
        c"",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH,
    )
    .map_err(io::Error::from)
}

/// `chmod` through the `/proc/self/fd` magic link (not for symlinks).
pub(crate) fn set_mode(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    rustix::fs::chmodat(
        rustix::fs::CWD,
        proc_path(fd).as_c_str(),
        Mode::from_raw_mode(mode & 0o7777),
        AtFlags::empty(),
    )
    .map_err(io::Error::from)
}

/// Where xattr syscalls reach an inode: `/proc/self/fd/N` (following: files and directories), or
/// `/proc/self/fd/PARENT/name` with the `l*` calls for symlinks.
pub(crate) enum XattrPath {
    Follow(CString),
    NoFollow(CString),
}

pub(crate) fn xattr_get(path: &XattrPath, name: &OsStr, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let n = match path {
        XattrPath::Follow(p) => rustix::fs::getxattr(p.as_c_str(), name, &mut buf[..]),
        XattrPath::NoFollow(p) => rustix::fs::lgetxattr(p.as_c_str(), name, &mut buf[..]),
    }?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn xattr_get_size(path: &XattrPath, name: &OsStr) -> io::Result<usize> {
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::getxattr_query(p.as_c_str(), name),
        XattrPath::NoFollow(p) => rustix::fs::lgetxattr_query(p.as_c_str(), name),
    }?)
}

pub(crate) fn xattr_list(path: &XattrPath, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let n = match path {
        XattrPath::Follow(p) => rustix::fs::listxattr(p.as_c_str(), &mut buf[..]),
        XattrPath::NoFollow(p) => rustix::fs::llistxattr(p.as_c_str(), &mut buf[..]),
    }?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn xattr_list_size(path: &XattrPath) -> io::Result<usize> {
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::listxattr_query(p.as_c_str()),
        XattrPath::NoFollow(p) => rustix::fs::llistxattr_query(p.as_c_str()),
    }?)
}

pub(crate) fn xattr_set(
    path: &XattrPath,
    name: &OsStr,
    value: &[u8],
    flags: i32,
) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::setxattr(p.as_c_str(), name, value, flags),
        XattrPath::NoFollow(p) => rustix::fs::lsetxattr(p.as_c_str(), name, value, flags),
    }?)
}

pub(crate) fn xattr_remove(path: &XattrPath, name: &OsStr) -> io::Result<()> {
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::removexattr(p.as_c_str(), name),
        XattrPath::NoFollow(p) => rustix::fs::lremovexattr(p.as_c_str(), name),
    }?)
}

thread_local! {
    /// Whether this thread has its own umask (`unshare(CLONE_FS)`): `None` not tried yet.
    static OWN_UMASK: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Runs `f` with the thread's umask set to `umask`, so that the backing filesystem applies the
/// caller's umask, or the parent's default ACL instead when it has one (POSIX rules). Each FUSE
/// worker thread gets its own umask (`unshare(CLONE_FS)`) the first time, so the process umask
/// (inherited by the daemon's scripts) never changes. Returns `false` as second value when the
/// thread could not get its own umask; the caller then masks the mode itself.
pub(crate) fn with_umask<T>(umask: u32, f: impl FnOnce() -> T) -> (T, bool) {
    let own = OWN_UMASK.with(|own| match own.get() {
        Some(v) => v,
        None => {
            // SAFETY: CLONE_FS only gives this thread its own cwd, root and umask; no descriptor
            // table is unshared, so every descriptor stays visible to every thread.
            let ok =
                unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }.is_ok();
            own.set(Some(ok));
            ok
        }
    });
    if !own {
        return (f(), false);
    }
    let old = rustix::process::umask(Mode::from_raw_mode(umask & 0o777));
    let out = f();
    rustix::process::umask(old);
    (out, true)
}

/// `errno` of an I/O error, `EIO` when it has none.
pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}
