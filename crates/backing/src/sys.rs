//! The `*at` system calls on a backing directory, shared by the primary's mount and the
//! secondary's applier.
//!
//! Every path given to the kernel here is one component (or a validated relative path) below a
//! directory descriptor, resolved with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or a
//! `/proc/self/fd/N` magic link to a descriptor we hold: nothing is resolved through a mount of
//! ours (that would recurse into FUSE) and no symlink is followed on the way.

use std::cell::Cell;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};

/// `errno` of an I/O error, `EIO` when it has none.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// An errno as an operator reads it: its message and name, and for the errors of an exhausted
/// resource, which resource (`Too many open files (EMFILE: the process has used its descriptor
/// limit, RLIMIT_NOFILE)`).
pub fn describe_errno(errno: i32) -> String {
    let message = io::Error::from_raw_os_error(errno).to_string();
    let message = message
        .strip_suffix(&format!(" (os error {errno})"))
        .unwrap_or(&message)
        .to_owned();
    let (name, resource) = match errno {
        libc::EMFILE => (
            "EMFILE",
            Some("the process has used its descriptor limit, RLIMIT_NOFILE"),
        ),
        libc::ENFILE => (
            "ENFILE",
            Some("the system's open-file table is full, fs.file-max"),
        ),
        libc::ENOMEM => ("ENOMEM", Some("out of memory")),
        libc::ENOSPC => ("ENOSPC", Some("no space or inodes left on the filesystem")),
        libc::EDQUOT => ("EDQUOT", Some("a disk quota is used up")),
        libc::EIO => ("EIO", None),
        _ => ("", None),
    };
    match (name, resource) {
        ("", _) => format!("{message} (errno {errno})"),
        (name, None) => format!("{message} ({name})"),
        (name, Some(resource)) => format!("{message} ({name}: {resource})"),
    }
}

/// Whether `errno` says a resource is exhausted (descriptors, memory, space, quota).
pub fn is_resource_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOSPC | libc::EDQUOT
    )
}

/// `/proc/self/fd/N` for a descriptor we hold.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never contains a NUL byte.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `/proc/self/fd/N/name`: the entry `name` of a directory we hold.
pub fn proc_entry_path(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<CString> {
    let mut bytes = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    bytes.extend_from_slice(name.as_bytes());
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether `name` is one plain path component (not empty, no `/`, no NUL, not `.` or `..`).
pub fn valid_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}

/// Whether `path` is relative and made of plain components only (`""` is the root).
pub fn valid_path(path: &Path) -> bool {
    !path.as_os_str().as_bytes().contains(&0)
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Opens an `O_PATH` handle of `path` (relative, possibly several components; `""` is `dir`)
/// below `dir`, without following any symlink (the last component included) and without
/// leaving `dir`.
pub fn open_path_beneath(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    open_beneath(dir, path, OFlags::PATH, ResolveFlags::empty())
}

/// Opens the entry `name` of `dir` as an `O_PATH` handle, not following a symlink there.
pub fn open_path_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    open_path_beneath(dir, Path::new(name))
}

/// Opens the directory `path` below `dir` for reading its entries, as [`open_path_beneath`]
/// resolves it, without crossing a mount point; `O_NOATIME` when allowed (reading it does not
/// change its access time).
pub fn open_dir_beneath(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let base = OFlags::RDONLY | OFlags::DIRECTORY;
    match open_beneath(dir, path, base | OFlags::NOATIME, ResolveFlags::NO_XDEV) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            open_beneath(dir, path, base, ResolveFlags::NO_XDEV)
        }
        other => other,
    }
}

fn open_beneath(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: OFlags,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    if !valid_path(path) {
        return Err(einval());
    }
    let path: &Path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat2(
        dir,
        path,
        flags,
        Mode::empty(),
        resolve | ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    ) {
        Err(rustix::io::Errno::NOSYS) => {
            // Without openat2: one component at a time (components are validated).
            let mut current = rustix::fs::openat(dir, ".", flags, Mode::empty())?;
            for c in path.components() {
                if let Component::Normal(name) = c {
                    current = rustix::fs::openat(&current, name, flags, Mode::empty())?;
                }
            }
            Ok(current)
        }
        other => Ok(other?),
    }
}

/// Opens an inode we hold a descriptor of (`O_PATH` is enough) with real access flags, through
/// the `/proc/self/fd` magic link (which does not go through a mount of ours, and works for
/// files unlinked while open).
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        rustix::fs::CWD,
        proc_path(fd).as_c_str(),
        flags | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?)
}

/// Opens a directory we hold a descriptor of for reading its entries.
pub fn open_dir(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        fd,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names in a directory opened for reading (without `.` and `..`), sorted.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let fd = rustix::io::fcntl_dupfd_cloexec(dir, 0)?;
    let mut reader = rustix::fs::Dir::new(fd)?;
    let mut names = Vec::new();
    while let Some(entry) = reader.read() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// `fstat`, also on `O_PATH` descriptors.
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(rustix::fs::fstat(fd)?)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// `utimensat` of the inode itself (`AT_EMPTY_PATH`: symlinks included); `None` leaves a time.
pub fn set_times(
    fd: BorrowedFd<'_>,
    atime: Option<Timespec>,
    mtime: Option<Timespec>,
) -> io::Result<()> {
    let omit = Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_OMIT,
    };
    let times = Timestamps {
        last_access: atime.unwrap_or(omit),
        last_modification: mtime.unwrap_or(omit),
    };
    Ok(rustix::fs::utimensat(fd, c"", &times, AtFlags::EMPTY_PATH)?)
}

/// `chown` of the inode itself (not a symlink's target).
pub fn set_owner(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    Ok(rustix::fs::chownat(
        fd,
        c"",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH,
    )?)
}

/// `chmod` through the `/proc/self/fd` magic link (not for symlinks).
pub fn set_mode(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::chmodat(
        rustix::fs::CWD,
        proc_path(fd).as_c_str(),
        Mode::from_raw_mode(mode & 0o7777),
        AtFlags::empty(),
    )?)
}

/// The 64-bit `dev_t` of the kernel's 32-bit encoding that FUSE carries (for `mknod`).
pub fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Writes all of `data` at `offset`; returns the bytes written and the error that stopped it
/// (short only if an error happened after some bytes were written).
pub fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> (usize, Option<io::Error>) {
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
pub fn pread_full(fd: BorrowedFd<'_>, size: usize, offset: u64) -> io::Result<Vec<u8>> {
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

/// Where xattr calls reach an inode: `/proc/self/fd/N` (following: files, directories, special
/// files), or `/proc/self/fd/PARENT/name` with the `l*` calls (symlinks).
pub enum XattrPath {
    /// Through the inode's own descriptor.
    Follow(CString),
    /// Through its parent and name, not following the symlink.
    NoFollow(CString),
}

/// The value of `name`, at most `size` bytes (`ERANGE` if longer).
pub fn xattr_get(path: &XattrPath, name: &OsStr, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let n = match path {
        XattrPath::Follow(p) => rustix::fs::getxattr(p.as_c_str(), name, &mut buf[..]),
        XattrPath::NoFollow(p) => rustix::fs::lgetxattr(p.as_c_str(), name, &mut buf[..]),
    }?;
    buf.truncate(n);
    Ok(buf)
}

/// The size of the value of `name`.
pub fn xattr_get_size(path: &XattrPath, name: &OsStr) -> io::Result<usize> {
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::getxattr_query(p.as_c_str(), name),
        XattrPath::NoFollow(p) => rustix::fs::lgetxattr_query(p.as_c_str(), name),
    }?)
}

/// The raw list of names (NUL-separated), at most `size` bytes (`ERANGE` if longer).
pub fn xattr_list(path: &XattrPath, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let n = match path {
        XattrPath::Follow(p) => rustix::fs::listxattr(p.as_c_str(), &mut buf[..]),
        XattrPath::NoFollow(p) => rustix::fs::llistxattr(p.as_c_str(), &mut buf[..]),
    }?;
    buf.truncate(n);
    Ok(buf)
}

/// The size of the raw list of names.
pub fn xattr_list_size(path: &XattrPath) -> io::Result<usize> {
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::listxattr_query(p.as_c_str()),
        XattrPath::NoFollow(p) => rustix::fs::llistxattr_query(p.as_c_str()),
    }?)
}

/// The names of the extended attributes (none where the filesystem has no xattrs).
pub fn xattr_names(path: &XattrPath) -> io::Result<Vec<OsString>> {
    let list = loop {
        let size = match xattr_list_size(path) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
            other => other?,
        };
        match xattr_list(path, size) {
            // The list grew meanwhile: ask again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
            other => break other?,
        }
    };
    Ok(list
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| OsStr::from_bytes(n).to_owned())
        .collect())
}

/// The whole value of `name`.
pub fn xattr_value(path: &XattrPath, name: &OsStr) -> io::Result<Vec<u8>> {
    loop {
        let size = xattr_get_size(path, name)?;
        match xattr_get(path, name, size) {
            // The value grew meanwhile: ask again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
            other => return other,
        }
    }
}

/// Sets `name` to `value` (`flags`: `XATTR_CREATE`, `XATTR_REPLACE`).
pub fn xattr_set(path: &XattrPath, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::setxattr(p.as_c_str(), name, value, flags),
        XattrPath::NoFollow(p) => rustix::fs::lsetxattr(p.as_c_str(), name, value, flags),
    }?)
}

/// Removes `name`.
pub fn xattr_remove(path: &XattrPath, name: &OsStr) -> io::Result<()> {
    Ok(match path {
        XattrPath::Follow(p) => rustix::fs::removexattr(p.as_c_str(), name),
        XattrPath::NoFollow(p) => rustix::fs::lremovexattr(p.as_c_str(), name),
    }?)
}

thread_local! {
    /// Whether this thread has its own umask (`unshare(CLONE_FS)`): `None` not tried yet.
    static OWN_UMASK: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Runs `f` with the thread's umask set to `umask`, so that the filesystem applies it, or the
/// parent's default ACL instead (POSIX rules). The thread gets its own umask
/// (`unshare(CLONE_FS)`) the first time, so the process umask (inherited by the daemon's
/// scripts) never changes. Returns `false` as second value when the thread could not get its own
/// umask; the caller then masks the mode itself.
pub fn with_umask<T>(umask: u32, f: impl FnOnce() -> T) -> (T, bool) {
    let own = OWN_UMASK.with(|own| match own.get() {
        Some(v) => v,
        None => {
            // SAFETY: CLONE_FS only gives this thread its own cwd, root and umask; the
            // descriptor table stays shared, so every descriptor stays valid for every thread.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn errnos_name_their_resource() {
        assert_eq!(
            describe_errno(libc::EMFILE),
            "Too many open files (EMFILE: the process has used its descriptor limit, \
             RLIMIT_NOFILE)"
        );
        assert!(describe_errno(libc::ENOSPC).contains("space"));
        assert!(describe_errno(libc::ENOENT).ends_with("(errno 2)"));
        assert!(is_resource_error(libc::ENFILE) && !is_resource_error(libc::ENOENT));
    }

    #[test]
    fn names_and_paths_are_validated() {
        assert!(valid_name(OsStr::new("a")));
        for bad in ["", ".", "..", "a/b"] {
            assert!(!valid_name(OsStr::new(bad)), "{bad:?}");
        }
        assert!(valid_path(Path::new("a/b")) && valid_path(Path::new("")));
        assert!(!valid_path(Path::new("../a")) && !valid_path(Path::new("/a")));
    }

    #[test]
    fn nothing_leaves_the_directory_or_follows_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", dir.path().join("d/l")).expect("symlink");
        let root = rustix::fs::open(dir.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
            .expect("open");
        assert!(open_path_beneath(root.as_fd(), Path::new("d")).is_ok());
        let link = open_path_beneath(root.as_fd(), Path::new("d/l")).expect("the link itself");
        assert_eq!(
            stat_fd(link.as_fd()).expect("stat").st_mode & libc::S_IFMT,
            libc::S_IFLNK
        );
        assert!(open_path_beneath(root.as_fd(), Path::new("d/l/passwd")).is_err());
        assert!(open_path_beneath(root.as_fd(), Path::new("../x")).is_err());
        assert_eq!(
            list_dir(open_dir(root.as_fd()).expect("dir").as_fd()).expect("list"),
            [OsString::from("d")]
        );
    }
}
