//! Kernel file handles (`name_to_handle_at(2)`, `open_by_handle_at(2)`): an inode's identity that
//! holds no descriptor, valid as long as the inode exists (its generation is part of it, so a
//! reused inode number does not match an old handle).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::fs::OFlags;

/// `MAX_HANDLE_SZ` of the kernel.
const MAX_HANDLE_SZ: usize = 128;

/// Bytes kept inline (ext4 needs 8, xfs 8 or 12, tmpfs 12; btrfs's 20 go to the heap).
const INLINE: usize = 13;

/// A handle's type and bytes; of a given type and length always the same variant, so that the
/// derived equality and hash are those of the handle.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    /// Handle types are small numbers (`FILEID_*`); one that is not goes to the heap.
    Inline {
        kind: u8,
        len: u8,
        data: [u8; INLINE],
    },
    Heap(Box<HeapHandle>),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct HeapHandle {
    kind: i32,
    bytes: Box<[u8]>,
}

/// A file handle of the backing filesystem: 16 bytes, with no allocation for handles of up to
/// 13 bytes. (Every inode the mount or the applier knows holds one: its size counts.)
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileHandle(Repr);

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileHandle({}:", self.kind())?;
        for b in self.bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

impl FileHandle {
    /// The handle of the inode `fd` refers to (any descriptor, `O_PATH` included).
    pub fn of_fd(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
        Self::at(fd, c"", libc::AT_EMPTY_PATH)
    }

    /// The handle of the entry `name` of directory `dir`, not following a symlink there.
    pub fn of_entry(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<FileHandle> {
        Self::at(dir, name, 0)
    }

    fn at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<FileHandle> {
        let mut raw = RawHandle {
            handle_bytes: MAX_HANDLE_SZ as libc::c_uint,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `raw` is a `struct file_handle` whose `handle_bytes` says how much room follows
        // it (MAX_HANDLE_SZ bytes, all owned by `raw`); `name` is NUL-terminated; `mount_id` is a
        // writable int. The kernel writes within those bounds only.
        let rc = unsafe {
            libc::name_to_handle_at(
                dir.as_raw_fd(),
                name.as_ptr(),
                (&raw mut raw).cast::<libc::file_handle>(),
                &mut mount_id,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
        Ok(FileHandle::from_parts(
            raw.handle_type,
            &raw.f_handle[..len],
        ))
    }

    /// A handle from its type and bytes (as [`FileHandle::kind`] and [`FileHandle::bytes`] give).
    pub fn from_parts(kind: i32, bytes: &[u8]) -> FileHandle {
        FileHandle(match u8::try_from(kind) {
            Ok(small) if bytes.len() <= INLINE => {
                let mut data = [0; INLINE];
                data[..bytes.len()].copy_from_slice(bytes);
                Repr::Inline {
                    kind: small,
                    // At most INLINE (13) here.
                    len: bytes.len() as u8,
                    data,
                }
            }
            _ => Repr::Heap(Box::new(HeapHandle {
                kind,
                bytes: bytes.into(),
            })),
        })
    }

    /// The handle type (filesystem specific).
    pub fn kind(&self) -> i32 {
        match &self.0 {
            Repr::Inline { kind, .. } => i32::from(*kind),
            Repr::Heap(h) => h.kind,
        }
    }

    /// The opaque bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, data, .. } => &data[..usize::from(*len)],
            Repr::Heap(h) => &h.bytes,
        }
    }

    /// Opens the inode with `flags` (`O_PATH`, `O_RDWR`...; `O_CLOEXEC` is added); `mount` is any
    /// descriptor on the same filesystem, but not an `O_PATH` one (the kernel refuses those:
    /// `EBADF`). Needs `CAP_DAC_READ_SEARCH`. `ESTALE` when the inode no longer exists.
    pub fn open(&self, mount: BorrowedFd<'_>, flags: OFlags) -> io::Result<OwnedFd> {
        let bytes = self.bytes();
        let mut raw = RawHandle {
            handle_bytes: bytes.len() as libc::c_uint,
            handle_type: self.kind(),
            f_handle: [0; MAX_HANDLE_SZ],
        };
        raw.f_handle[..bytes.len()].copy_from_slice(bytes);
        let flags = (flags | OFlags::CLOEXEC).bits() as libc::c_int;
        // SAFETY: `raw` is a valid `struct file_handle` of `handle_bytes` bytes that the kernel
        // only reads; `mount` is an open descriptor.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&raw mut raw).cast::<libc::file_handle>(),
                flags,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: open_by_handle_at returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_handle_reopens_its_inode_and_not_a_new_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = rustix::fs::open(dir.path(), OFlags::RDONLY | OFlags::DIRECTORY, 0.into())
            .expect("open root");
        std::fs::write(dir.path().join("f"), b"one").expect("write");
        let h = FileHandle::of_entry(root.as_fd(), c"f").expect("handle");
        let st = rustix::fs::stat(dir.path().join("f")).expect("stat");
        let fd = h
            .open(root.as_fd(), OFlags::RDONLY)
            .expect("open by handle");
        let again = rustix::fs::fstat(&fd).expect("fstat");
        assert_eq!((again.st_dev, again.st_ino), (st.st_dev, st.st_ino));
        let same = FileHandle::of_fd(fd.as_fd()).expect("handle of fd");
        assert_eq!(same, h);
        assert_eq!(FileHandle::from_parts(h.kind(), h.bytes()), h);
        drop(fd);
        std::fs::remove_file(dir.path().join("f")).expect("remove");
        std::fs::write(dir.path().join("g"), b"two").expect("write");
        let err = h
            .open(root.as_fd(), OFlags::PATH)
            .expect_err("the old inode is gone");
        assert_eq!(err.raw_os_error(), Some(libc::ESTALE));
    }

    #[test]
    fn long_handles_and_large_types_go_to_the_heap() {
        for (kind, len) in [(7, 40), (7, 14), (300, 8), (-1, 8), (1, 13), (1, 0)] {
            let bytes: Vec<u8> = (0..len).collect();
            let h = FileHandle::from_parts(kind, &bytes);
            assert_eq!((h.kind(), h.bytes()), (kind, &bytes[..]));
            assert_eq!(FileHandle::from_parts(kind, &bytes), h);
            let inline = matches!(h.0, Repr::Inline { .. });
            assert_eq!(
                inline,
                (0..=255).contains(&kind) && len <= 13,
                "{kind} {len}"
            );
        }
        assert_eq!(std::mem::size_of::<FileHandle>(), 16);
        assert_eq!(std::mem::size_of::<Option<FileHandle>>(), 16);
    }
}
