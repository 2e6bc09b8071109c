//! Thin wrappers of the system calls the tests make, on paths (never following a final symlink
//! where the call allows it).

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `p` as a C string (panics on an interior NUL).
pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `Ok` for a zero return, else the last OS error.
pub fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lsetxattr(2)`.
pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and a buffer of the given length.
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// `lremovexattr(2)`.
pub fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

/// `utimensat(2)` with `AT_SYMLINK_NOFOLLOW`.
pub fn utimens(p: &Path, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
    let c = cstr(p);
    let ts = [atime, mtime];
    // SAFETY: valid C string and an array of two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// `mknod(2)`.
pub fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
}

/// `renameat2(2)` with `flags` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`, `RENAME_WHITEOUT`).
pub fn rename2(a: &Path, b: &Path, flags: u32) -> io::Result<()> {
    let (ca, cb) = (cstr(a), cstr(b));
    // SAFETY: valid C strings.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    })
}

/// `fallocate(2)` with `mode`.
pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) })
}

/// `truncate(2)` (follows symlinks, like the call).
pub fn truncate(p: &Path, size: u64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    check(unsafe { libc::truncate(c.as_ptr(), size as i64) })
}

/// Opens a regular file for reading and writing without following a final symlink and without
/// blocking on FIFOs, with the `extra` open flags; the open's error, or an error without an
/// errno for anything but a regular file (`.ok()` for an `Option`).
pub fn open_regular(p: &Path, extra: i32) -> io::Result<File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | extra)
        .open(p)?;
    if f.metadata()?.is_file() {
        Ok(f)
    } else {
        Err(io::Error::other("not a regular file"))
    }
}

/// Page-cache counts of a file, from `cachestat(2)` (Linux 6.5).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct CacheStat {
    /// Pages in the page cache.
    pub cache: u64,
    /// Of those, dirty (not written back yet).
    pub dirty: u64,
    /// Of those, under writeback.
    pub writeback: u64,
    /// Evicted pages.
    pub evicted: u64,
    /// Recently evicted pages.
    pub recently_evicted: u64,
}

/// `cachestat(2)` of the whole of `f`.
pub fn cachestat(f: &File) -> io::Result<CacheStat> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    /// The syscall number on every architecture (the unified table); not in `libc` for all.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len: 0 };
    let mut st = CacheStat::default();
    // SAFETY: both pointers are valid for the duration of the call; the kernel writes only `st`,
    // whose layout is `struct cachestat`.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut CacheStat,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Waits until no page of `f` is dirty or under writeback (polls, up to `timeout`); returns
/// whether that happened.
pub fn wait_written_back(f: &File, timeout: std::time::Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let st = cachestat(f)?;
        if st.dirty == 0 && st.writeback == 0 {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
