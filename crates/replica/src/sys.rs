//! System call helpers of the applier: everything relative to a directory descriptor, never
//! following a symlink on the way (the same rules as tandem-fs on the primary).

use std::cell::Cell;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use tandem_fs::Timestamp;

/// `errno` of a rustix error.
pub(crate) fn rerr(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

/// `/proc/self/fd/N` for a descriptor we hold.
pub(crate) fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never contains a NUL byte.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `/proc/self/fd/N/name`: the entry `name` of a directory we hold.
pub(crate) fn proc_entry_path(dir: BorrowedFd<'_>, name: &OsStr) -> Result<CString, i32> {
    let mut bytes = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    bytes.extend_from_slice(name.as_bytes());
    CString::new(bytes).map_err(|_| libc::EINVAL)
}

/// Whether `name` is one plain path component (not empty, no `/`, no NUL, not `.` or `..`).
pub(crate) fn valid_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}

/// Whether `path` is relative and made of plain components only (`""` is the root).
pub(crate) fn valid_path(path: &Path) -> bool {
    !path.as_os_str().as_bytes().contains(&0)
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Opens an `O_PATH` handle of `path` (relative, possibly several components) below `dir`,
/// without following any symlink (the last component included) and without leaving `dir`.
pub(crate) fn open_path_beneath(dir: BorrowedFd<'_>, path: &Path) -> Result<OwnedFd, i32> {
    if !valid_path(path) {
        return Err(libc::EINVAL);
    }
    let path: &Path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat2(
        dir,
        path,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    ) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOSYS) => open_path_walk(dir, path),
        Err(e) => Err(rerr(e)),
    }
}

/// Without `openat2`: one component at a time with `O_NOFOLLOW` (components are validated).
fn open_path_walk(dir: BorrowedFd<'_>, path: &Path) -> Result<OwnedFd, i32> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut current = rustix::fs::openat(dir, ".", flags, Mode::empty()).map_err(rerr)?;
    for c in path.components() {
        if let Component::Normal(name) = c {
            current = rustix::fs::openat(&current, name, flags, Mode::empty()).map_err(rerr)?;
        }
    }
    Ok(current)
}

/// Opens the entry `name` of `dir` as an `O_PATH` handle, not following a symlink there.
pub(crate) fn open_path_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, i32> {
    open_path_beneath(dir, Path::new(name))
}

/// Opens an inode we hold an `O_PATH` descriptor of with real access flags (through the
/// `/proc/self/fd` magic link; works for files unlinked while open).
pub(crate) fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> Result<OwnedFd, i32> {
    rustix::fs::openat(
        rustix::fs::CWD,
        proc_path(fd).as_c_str(),
        flags | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(rerr)
}

/// `fstat`, also on `O_PATH` descriptors.
pub(crate) fn stat_fd(fd: BorrowedFd<'_>) -> Result<rustix::fs::Stat, i32> {
    rustix::fs::fstat(fd).map_err(rerr)
}

/// `utimensat` of the inode itself (`AT_EMPTY_PATH`, symlinks included); `None` leaves a time.
pub(crate) fn set_times(
    fd: BorrowedFd<'_>,
    atime: Option<Timestamp>,
    mtime: Option<Timestamp>,
) -> Result<(), i32> {
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
    rustix::fs::utimensat(fd, c"", &times, AtFlags::EMPTY_PATH).map_err(rerr)
}

/// `chown` of the inode itself (not a symlink's target).
pub(crate) fn set_owner(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> Result<(), i32> {
    rustix::fs::chownat(
        fd,
        c"",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH,
    )
    .map_err(rerr)
}

/// `chmod` through the `/proc/self/fd` magic link (not for symlinks).
pub(crate) fn set_mode(fd: BorrowedFd<'_>, mode: u32) -> Result<(), i32> {
    rustix::fs::chmodat(
        rustix::fs::CWD,
        proc_path(fd).as_c_str(),
        Mode::from_raw_mode(mode & 0o7777),
        AtFlags::empty(),
    )
    .map_err(rerr)
}

/// Where xattr calls reach an inode: `/proc/self/fd/N` (files, directories, special files), or
/// `/proc/self/fd/PARENT/name` with the `l*` calls (symlinks).
pub(crate) enum XattrPath {
    Follow(CString),
    NoFollow(CString),
}

pub(crate) fn xattr_set(
    path: &XattrPath,
    name: &OsStr,
    value: &[u8],
    flags: i32,
) -> Result<(), i32> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    match path {
        XattrPath::Follow(p) => rustix::fs::setxattr(p.as_c_str(), name, value, flags),
        XattrPath::NoFollow(p) => rustix::fs::lsetxattr(p.as_c_str(), name, value, flags),
    }
    .map_err(rerr)
}

pub(crate) fn xattr_remove(path: &XattrPath, name: &OsStr) -> Result<(), i32> {
    match path {
        XattrPath::Follow(p) => rustix::fs::removexattr(p.as_c_str(), name),
        XattrPath::NoFollow(p) => rustix::fs::lremovexattr(p.as_c_str(), name),
    }
    .map_err(rerr)
}

/// The 64-bit `dev_t` of the kernel's 32-bit encoding that FUSE carries (for `mknod`).
pub(crate) fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Writes all of `data` at `offset`; returns the bytes written and the error that stopped it.
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> (usize, Option<i32>) {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => return (done, Some(libc::EIO)),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return (done, Some(rerr(e))),
        }
    }
    (done, None)
}

thread_local! {
    /// Whether this thread has its own umask (`unshare(CLONE_FS)`): `None` not tried yet.
    static OWN_UMASK: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Runs `f` with the thread's umask set to `umask`, so that the filesystem applies it, or the
/// parent's default ACL instead (POSIX rules), exactly as on the primary. The thread gets its own
/// umask (`unshare(CLONE_FS)`) the first time; returns `false` as second value when it could not,
/// and the caller then masks the mode itself.
pub(crate) fn with_umask<T>(umask: u32, f: impl FnOnce() -> T) -> (T, bool) {
    let own = OWN_UMASK.with(|own| match own.get() {
        Some(v) => v,
        None => {
            // SAFETY: CLONE_FS only gives this thread its own cwd, root and umask; the descriptor
            // table stays shared, so every descriptor stays valid for every thread.
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

/// The names of the extended attributes of `path`.
pub(crate) fn xattr_list(path: &XattrPath) -> Result<Vec<std::ffi::OsString>, i32> {
    let mut buf = vec![0u8; 1024];
    let len = loop {
        let r = match path {
            XattrPath::Follow(p) => rustix::fs::listxattr(p.as_c_str(), &mut buf[..]),
            XattrPath::NoFollow(p) => rustix::fs::llistxattr(p.as_c_str(), &mut buf[..]),
        };
        match r {
            Ok(n) => break n,
            // The list grew, or the buffer is too small: ask for the size.
            Err(rustix::io::Errno::RANGE) => {
                let n = match path {
                    XattrPath::Follow(p) => rustix::fs::listxattr_query(p.as_c_str()),
                    XattrPath::NoFollow(p) => rustix::fs::llistxattr_query(p.as_c_str()),
                }
                .map_err(rerr)?;
                buf.resize(n.max(buf.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(rerr(e)),
        }
    };
    Ok(buf
        .get(..len)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| OsStr::from_bytes(n).to_owned())
        .collect())
}

/// The value of the extended attribute `name` of `path`.
pub(crate) fn xattr_get(path: &XattrPath, name: &OsStr) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; 256];
    loop {
        let r = match path {
            XattrPath::Follow(p) => rustix::fs::getxattr(p.as_c_str(), name, &mut buf[..]),
            XattrPath::NoFollow(p) => rustix::fs::lgetxattr(p.as_c_str(), name, &mut buf[..]),
        };
        match r {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {
                let n = match path {
                    XattrPath::Follow(p) => rustix::fs::getxattr_query(p.as_c_str(), name),
                    XattrPath::NoFollow(p) => rustix::fs::lgetxattr_query(p.as_c_str(), name),
                }
                .map_err(rerr)?;
                buf.resize(n.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(rerr(e)),
        }
    }
}

/// Opens the directory `path` (relative, possibly several components; `""` is `dir` itself)
/// below `dir` for reading its entries, without following any symlink, without leaving `dir`
/// and without crossing a mount point; `O_NOATIME` when allowed (reading it does not change its
/// access time).
pub(crate) fn open_dir_beneath(dir: BorrowedFd<'_>, path: &Path) -> Result<OwnedFd, i32> {
    if !valid_path(path) {
        return Err(libc::EINVAL);
    }
    let path: &Path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let base = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV;
    for flags in [base | OFlags::NOATIME, base] {
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), resolve) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::PERM) if flags.contains(OFlags::NOATIME) => {}
            Err(rustix::io::Errno::NOSYS) => {
                // Without openat2: one component at a time (components are validated).
                let mut current =
                    rustix::fs::openat(dir, ".", base, Mode::empty()).map_err(rerr)?;
                for c in path.components() {
                    if let Component::Normal(name) = c {
                        current = rustix::fs::openat(&current, name, base, Mode::empty())
                            .map_err(rerr)?;
                    }
                }
                return Ok(current);
            }
            Err(e) => return Err(rerr(e)),
        }
    }
    Err(libc::EPERM)
}

/// The names in a directory opened for reading (without `.` and `..`), sorted.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<std::ffi::OsString>, i32> {
    let fd = rustix::io::fcntl_dupfd_cloexec(dir, 0).map_err(rerr)?;
    let mut reader = rustix::fs::Dir::new(fd).map_err(rerr)?;
    let mut names = Vec::new();
    while let Some(entry) = reader.read() {
        let entry = entry.map_err(rerr)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    names.sort();
    Ok(names)
}
