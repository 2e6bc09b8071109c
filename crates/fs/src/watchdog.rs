//! A tiny helper process that removes the mount if this process dies without unmounting.
//!
//! When the process serving a FUSE mount dies, the kernel aborts the connection but the mount
//! stays, answering `ENOTCONN` to everything: the directory would be unusable until someone
//! unmounts it. The watchdog is forked right after mounting. It holds the read end of a pipe whose
//! write end only this process holds; when that end closes without the "released" byte (the
//! process died: crash, `kill -9`), the watchdog checks that the mount at the path is a dead FUSE
//! connection (`statfs` fails with `ENOTCONN`) and only then detaches it (`MNT_DETACH`), so the
//! plain directory is back. It never touches a live mount or another filesystem.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `FUSE_SUPER_MAGIC` of `statfs(2)`.
pub(crate) const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

pub(crate) struct Watchdog {
    pid: libc::pid_t,
    release: Option<OwnedFd>,
}

impl Watchdog {
    /// Forks the watchdog for the mount at `path`.
    pub(crate) fn start(path: &Path) -> io::Result<Watchdog> {
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let rfd = read_end.as_raw_fd();
        let name = c"tandem-fs-watch";
        // SAFETY: fork duplicates only the calling thread. The child runs `watch`, which makes
        // only async-signal-safe system calls on memory prepared before the fork (`cpath`,
        // `name`), never allocates, never unwinds and ends with `_exit`, so the state other
        // threads held at the time of the fork (locks, allocator) is never used in the child.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; `rfd` is open in the child (inherited), and the pointers are
            // valid because the child's address space is a copy of the parent's.
            unsafe { watch(rfd, cpath.as_ptr(), name.as_ptr()) }
        }
        drop(read_end);
        Ok(Watchdog {
            pid,
            release: Some(write_end),
        })
    }

    /// Tells the watchdog to exit without doing anything, and reaps it.
    pub(crate) fn release(&mut self) {
        if let Some(fd) = self.release.take() {
            let _ = rustix::io::write(&fd, &[1u8]);
            drop(fd);
            let mut status = 0;
            loop {
                // SAFETY: waitpid on our own child with a valid pointer to a local.
                let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
                if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.release();
    }
}

/// The child's whole life. Only raw system calls, then `_exit`.
///
/// # Safety
/// Must only be called in a freshly forked child; `path` and `name` must be valid C strings.
unsafe fn watch(rfd: libc::c_int, path: *const libc::c_char, name: *const libc::c_char) -> ! {
    // SAFETY: plain system calls with valid arguments (the caller guarantees we are a fresh
    // child and that `path` and `name` are valid C strings); nothing allocates or unwinds.
    unsafe {
        // Own session: a Ctrl-C to the parent's terminal or process group does not reach us.
        libc::setsid();
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::prctl(libc::PR_SET_NAME, name as libc::c_ulong, 0, 0, 0);
        // Keep no descriptor but the pipe: in particular not /dev/fuse (holding it would keep
        // the connection alive after the parent's death) nor the backing directory.
        if rfd > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (rfd - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (rfd + 1) as u32, u32::MAX, 0u32);
        let mut byte = 0u8;
        loop {
            let n = libc::read(rfd, (&mut byte as *mut u8).cast(), 1);
            if n == 1 {
                // Released: the parent unmounted (or is unmounting) itself.
                libc::_exit(0);
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break;
        }
        // The parent is gone. Remove the mount only if it is a dead FUSE connection: new
        // requests to an aborted connection fail with ENOTCONN. A request already in flight when
        // the connection is aborted fails with ECONNABORTED instead: ask again. A FUSE mount that
        // still answers may be one whose last descriptor is not closed yet: wait (60 s at most).
        for _ in 0..1200 {
            let mut sfs: libc::statfs = std::mem::zeroed();
            let r = libc::statfs(path, &mut sfs);
            if r != 0 {
                match *libc::__errno_location() {
                    libc::ENOTCONN => {
                        libc::umount2(path, libc::MNT_DETACH);
                        libc::_exit(0);
                    }
                    libc::ECONNABORTED | libc::EINTR => continue,
                    _ => libc::_exit(0),
                }
            }
            if sfs.f_type != FUSE_SUPER_MAGIC {
                libc::_exit(0);
            }
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            libc::nanosleep(&ts, std::ptr::null_mut());
        }
        libc::_exit(0)
    }
}
