//! Shared by the replica tests: the random operations of the fsx-style test, the snapshot and
//! comparison of two trees, and helpers to run them.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_fs::Mount;

// ------------------------------------------------------------------------------------ helpers

/// splitmix64: small, seedable, good enough for choosing operations.
pub struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

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

pub fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

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

pub fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
}

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

pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) })
}

pub fn truncate(p: &Path, size: u64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    check(unsafe { libc::truncate(c.as_ptr(), size as i64) })
}

/// Opens a regular file for writing without following a final symlink and without blocking on
/// FIFOs; `None` for anything else.
pub fn open_regular(p: &Path, extra: i32) -> Option<File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | extra)
        .open(p)
        .ok()?;
    f.metadata().ok()?.is_file().then_some(f)
}

/// A POSIX ACL in the kernel's xattr format.
pub fn acl(rng: &mut Rng) -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    let mut entries = vec![(1u16, rng.below(8) as u16, UNDEFINED)];
    let named = rng.chance(60);
    if named {
        entries.push((2, rng.below(8) as u16, 1000 + rng.below(2) as u32));
    }
    entries.push((4, rng.below(8) as u16, UNDEFINED));
    if named && rng.chance(50) {
        entries.push((8, rng.below(8) as u16, 100));
    }
    if named {
        entries.push((0x10, rng.below(8) as u16, UNDEFINED));
    }
    entries.push((0x20, rng.below(8) as u16, UNDEFINED));
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

// ------------------------------------------------------------------------------------ the tree

/// The initial tree: every kind of inode, hard links, xattrs, an ACL, a sparse file.
pub fn populate(p: &Path) {
    fs::create_dir_all(p.join("d0/e")).unwrap();
    fs::create_dir(p.join("d1")).unwrap();
    fs::create_dir(p.join("d2")).unwrap();
    fs::write(p.join("f0"), b"some text\n").unwrap();
    fs::write(p.join("d0/f1"), vec![7u8; 300_000]).unwrap();
    fs::write(p.join("d1/f2"), b"x").unwrap();
    std::os::unix::fs::symlink("f0", p.join("f3")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", p.join("d1/f4")).unwrap();
    fs::hard_link(p.join("f0"), p.join("d2/f5")).unwrap();
    lsetxattr(&p.join("f0"), "user.colour", b"blue", 0).unwrap();
    lsetxattr(&p.join("d0"), "user.dirattr", b"\x00\x01binary", 0).unwrap();
    lsetxattr(&p.join("f3"), "trusted.onlink", b"x", 0).unwrap();
    let mut r = Rng(1);
    lsetxattr(&p.join("d1/f2"), "system.posix_acl_access", &acl(&mut r), 0).unwrap();
    mknod(&p.join("d0/f6"), libc::S_IFIFO | 0o640, 0).unwrap();
    let sparse = File::create(p.join("f7")).unwrap();
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(b"tail", 3 << 20).unwrap();
    drop(sparse);
    fs::write(p.join("d2/f8"), b"o").unwrap();
    std::os::unix::fs::chown(p.join("d2/f8"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(p.join("d2/f8"), fs::Permissions::from_mode(0o4751)).unwrap();
}

pub const DIRS: &[&str] = &["", "d0", "d1", "d2", "d0/e"];
pub const NAMES: &[&str] = &[
    "f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "d0", "d1", "d2", "e",
];
pub const LINK_TARGETS: &[&str] = &["f0", "f1", "d1/f2", "/nonexistent/x", "d0", "e", "f9"];

pub fn random_path(rng: &mut Rng, root: &Path) -> PathBuf {
    let dir = rng.pick(DIRS);
    // Mostly file names; directory names now and then (renames and removals of directories).
    let name = if rng.chance(85) {
        rng.pick(&NAMES[..10])
    } else {
        rng.pick(&NAMES[10..])
    };
    root.join(dir).join(name)
}

pub fn random_time(rng: &mut Rng) -> libc::timespec {
    match rng.below(10) {
        0 => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        1 => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        _ => libc::timespec {
            tv_sec: 1_000_000_000 + rng.below(700_000_000) as i64,
            tv_nsec: rng.below(1_000_000_000) as i64,
        },
    }
}

/// Counts of attempted and successful operations per kind.
pub type Counts = BTreeMap<&'static str, (u64, u64)>;

/// One random operation through the mount at `root`; errors are expected (names collide).
pub fn random_op(rng: &mut Rng, root: &Path, buf: &[u8], counts: &mut Counts) {
    let p = random_path(rng, root);
    let (kind, result): (&'static str, io::Result<()>) = match rng.below(100) {
        0..=21 => (
            "write",
            (|| {
                let extra = match rng.below(20) {
                    0 => libc::O_DSYNC,
                    1 => libc::O_SYNC,
                    2..=5 => libc::O_CREAT,
                    _ => 0,
                };
                let f = open_regular(&p, extra).ok_or(io::ErrorKind::NotFound)?;
                let len = if rng.chance(8) {
                    1 << 20
                } else {
                    1 + rng.below(64 << 10) as usize
                };
                let start = rng.below((buf.len() - len) as u64) as usize;
                let offset = rng.below(3 << 20);
                f.write_all_at(&buf[start..start + len], offset)
            })(),
        ),
        22..=27 => ("truncate", {
            let size = if rng.chance(30) {
                0
            } else {
                rng.below(4 << 20)
            };
            if rng.chance(50) {
                truncate(&p, size)
            } else {
                open_regular(&p, 0)
                    .ok_or(io::Error::from(io::ErrorKind::NotFound))
                    .and_then(|f| f.set_len(size))
            }
        }),
        28..=32 => (
            "fallocate",
            (|| {
                let f = open_regular(&p, 0).ok_or(io::ErrorKind::NotFound)?;
                let mode = *rng.pick(&[
                    0,
                    libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_ZERO_RANGE,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                ]);
                fallocate(&f, mode, rng.below(3 << 20), 1 + rng.below(1 << 20))
            })(),
        ),
        33..=37 => ("create", {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(rng.below(0o10000) as u32)
                .open(&p)
                .map(drop)
        }),
        38..=39 => ("mknod", {
            if rng.chance(80) {
                mknod(&p, libc::S_IFIFO | rng.below(0o1000) as u32, 0)
            } else {
                // /dev/null's numbers: harmless even if opened.
                mknod(&p, libc::S_IFCHR | 0o600, libc::makedev(1, 3))
            }
        }),
        40..=43 => ("mkdir", {
            fs::DirBuilder::new()
                .mode(0o700 | rng.below(0o10000) as u32)
                .create(&p)
        }),
        44..=46 => (
            "symlink",
            std::os::unix::fs::symlink(rng.pick(LINK_TARGETS), &p),
        ),
        47..=50 => ("link", fs::hard_link(random_path(rng, root), &p)),
        51..=56 => ("unlink", fs::remove_file(&p)),
        57..=58 => ("rmdir", fs::remove_dir(&p)),
        59..=66 => ("rename", {
            let flags = match rng.below(10) {
                0..=4 => 0,
                5..=6 => libc::RENAME_NOREPLACE,
                7..=8 => libc::RENAME_EXCHANGE,
                _ => libc::RENAME_WHITEOUT,
            };
            rename2(&random_path(rng, root), &p, flags)
        }),
        67..=70 => (
            "chmod",
            fs::set_permissions(&p, fs::Permissions::from_mode(rng.below(0o10000) as u32)),
        ),
        71..=73 => ("chown", {
            let ids = [0, 1000, 1234];
            std::os::unix::fs::lchown(&p, Some(*rng.pick(&ids)), Some(*rng.pick(&ids)))
        }),
        74..=78 => ("utimens", utimens(&p, random_time(rng), random_time(rng))),
        79..=84 => ("setxattr", {
            let name = *rng.pick(&["user.a", "user.b", "user.c", "trusted.t"]);
            let len = rng.below(64) as usize;
            let start = rng.below(1000) as usize;
            let flags = *rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]);
            lsetxattr(&p, name, &buf[start..start + len], flags)
        }),
        85..=87 => (
            "removexattr",
            (|| {
                if rng.chance(50) {
                    // Set then remove (random names are rarely there).
                    lsetxattr(&p, "user.r", b"r", 0)?;
                    lremovexattr(&p, "user.r")
                } else {
                    let name: &&str = rng.pick(&["user.a", "user.b", "user.c", "trusted.t"]);
                    lremovexattr(&p, name)
                }
            })(),
        ),
        88..=90 => ("acl", {
            let a = acl(rng);
            if rng.chance(30) {
                // Default ACLs (directories only): inherited by what is created below.
                lsetxattr(&p, "system.posix_acl_default", &a, 0)
            } else {
                lsetxattr(&p, "system.posix_acl_access", &a, 0)
            }
        }),
        91..=94 => (
            "fsync",
            (|| {
                if rng.chance(25) {
                    // O_DIRECTORY: the name may be a FIFO by now (opening it would block).
                    let d = fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
                        .open(p.parent().unwrap_or(root))?;
                    d.sync_all()
                } else {
                    let f = open_regular(&p, 0).ok_or(io::ErrorKind::NotFound)?;
                    if rng.chance(50) {
                        f.sync_data()
                    } else {
                        f.sync_all()
                    }
                }
            })(),
        ),
        _ => (
            "unlinked-open",
            (|| {
                // Writes, truncate, chmod and fsync to a file unlinked while open.
                let f = open_regular(&p, 0).ok_or(io::ErrorKind::NotFound)?;
                fs::remove_file(&p)?;
                for _ in 0..3 {
                    let len = 1 + rng.below(8192) as usize;
                    f.write_all_at(&buf[..len], rng.below(1 << 20))?;
                }
                f.set_len(rng.below(1 << 20))?;
                f.set_permissions(fs::Permissions::from_mode(0o600))?;
                let (n, v) = (CString::new("user.gone").unwrap(), b"1");
                // SAFETY: valid descriptor, C string and buffer.
                check(unsafe {
                    libc::fsetxattr(f.as_raw_fd(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                })?;
                f.sync_all()
            })(),
        ),
    };
    let c = counts.entry(kind).or_default();
    c.0 += 1;
    c.1 += u64::from(result.is_ok());
}

// ------------------------------------------------------------------------------------ snapshot

/// Everything compared about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    /// Not for directories: their mtimes are not replicated (see the crate's limitations).
    mtime: Option<(i64, i64)>,
    nlink: u64,
    rdev: u64,
    target: Option<PathBuf>,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    /// (data, hole) boundaries from SEEK_DATA/SEEK_HOLE.
    extents: Option<Vec<(u64, u64)>>,
    /// blake-free digest: the contents themselves (files stay small).
    content: Option<Vec<u8>>,
}

pub fn xattrs(path: &Path) -> BTreeMap<OsString, Vec<u8>> {
    let c = cstr(path);
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return out;
    }
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        // SAFETY: valid C strings and buffer.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m >= 0 {
            val.truncate(m as usize);
            out.insert(OsStr::from_bytes(name).to_owned(), val);
        }
    }
    out
}

pub fn extents(f: &File, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: valid descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: valid descriptor.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    out
}

pub fn entry(path: &Path) -> (Entry, u64) {
    entry_with(path, false)
}

/// [`entry`], with the mtime of a directory too when `dir_mtime`.
pub fn entry_with(path: &Path, dir_mtime: bool) -> (Entry, u64) {
    let md = fs::symlink_metadata(path).unwrap();
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "chr"
    } else {
        "blk"
    };
    let (extents, content) = if ft.is_file() {
        let f = File::open(path).unwrap();
        // Holes first: reading could change how unwritten extents are reported.
        let e = extents(&f, md.size());
        (Some(e), Some(fs::read(path).unwrap()))
    } else {
        (None, None)
    };
    let e = Entry {
        kind,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: if ft.is_dir() { 0 } else { md.size() },
        mtime: (dir_mtime || !ft.is_dir()).then(|| (md.mtime(), md.mtime_nsec())),
        nlink: md.nlink(),
        rdev: md.rdev(),
        target: ft.is_symlink().then(|| fs::read_link(path).unwrap()),
        xattrs: xattrs(path),
        extents,
        content,
    };
    (e, md.ino())
}

pub struct Snapshot {
    entries: BTreeMap<PathBuf, Entry>,
    /// Hard-link structure: the groups of paths sharing an inode (non-directories).
    links: BTreeSet<Vec<PathBuf>>,
}

pub fn snapshot(root: &Path) -> Snapshot {
    snapshot_with(root, false, &tandem_fs::Exclusions::default())
}

/// A snapshot with directory mtimes when `dir_mtimes` (and the root's own entry, as `""`),
/// without what `exclude` excludes.
pub fn snapshot_with(root: &Path, dir_mtimes: bool, exclude: &tandem_fs::Exclusions) -> Snapshot {
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    if dir_mtimes {
        entries.insert(PathBuf::new(), entry_with(root, true).0);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if exclude.is_excluded(&rel) {
                continue;
            }
            let (e, ino) = entry_with(&p, dir_mtimes);
            if e.kind == "dir" {
                stack.push(p.clone());
            } else {
                by_ino.entry(ino).or_default().push(rel.clone());
            }
            entries.insert(rel, e);
        }
    }
    let links = by_ino
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Snapshot { entries, links }
}

/// Differences between two trees, one line each (contents summarised).
/// Whether two entries differ only in how zero-filled ranges are stored: ext4 may keep the
/// zeros of an unwritten (fallocated, zero-ranged) range as written blocks on one side, when
/// converting part of it ("max_zeroout"), depending on the physical extent layout, which
/// differs between two filesystems (or two places of one). Contents are equal, and every range
/// that is data on one side and a hole on the other is zeros.
pub fn zeros_stored_differently(ea: &Entry, eb: &Entry) -> bool {
    let (Some(xa), Some(xb), Some(content)) = (&ea.extents, &eb.extents, &ea.content) else {
        return false;
    };
    let same_otherwise = Entry {
        extents: None,
        ..ea.clone()
    } == Entry {
        extents: None,
        ..eb.clone()
    };
    let is_data = |x: &[(u64, u64)], at: u64| x.iter().any(|&(d, h)| d <= at && at < h);
    let mut boundaries: Vec<u64> = xa.iter().chain(xb).flat_map(|&(d, h)| [d, h]).collect();
    boundaries.push(0);
    boundaries.push(content.len() as u64);
    boundaries.sort_unstable();
    boundaries.dedup();
    same_otherwise
        && boundaries.windows(2).all(|w| {
            let (from, to) = (w[0], w[1].min(content.len() as u64));
            is_data(xa, from) == is_data(xb, from)
                || content[from as usize..to.max(from) as usize]
                    .iter()
                    .all(|b| *b == 0)
        })
}

/// Files tolerated by [`zeros_stored_differently`] at most: a systematic error in hole
/// replication (punch hole applied as zeros) would show in many files.
pub const MAX_ZEROS_STORED_DIFFERENTLY: usize = 2;

pub fn differences(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let mut tolerated = Vec::new();
    for (p, ea) in &a.entries {
        match b.entries.get(p) {
            None => out.push(format!("{}: only in A ({})", p.display(), ea.kind)),
            Some(eb) if ea != eb && zeros_stored_differently(ea, eb) => {
                eprintln!(
                    "{}: zeros stored as data on one side (tolerated): A {:?}, B {:?}",
                    p.display(),
                    ea.extents,
                    eb.extents
                );
                tolerated.push(p);
            }
            Some(eb) if ea != eb => {
                let mut ea2 = ea.clone();
                let mut eb2 = eb.clone();
                let content_differs = ea2.content != eb2.content;
                ea2.content = None;
                eb2.content = None;
                out.push(format!(
                    "{}: differs{}\n    A: {ea2:?}\n    B: {eb2:?}",
                    p.display(),
                    if content_differs { " (contents)" } else { "" }
                ));
            }
            Some(_) => {}
        }
    }
    for (p, eb) in &b.entries {
        if !a.entries.contains_key(p) {
            out.push(format!("{}: only in B ({})", p.display(), eb.kind));
        }
    }
    if a.links != b.links {
        let only_a: Vec<_> = a.links.difference(&b.links).collect();
        let only_b: Vec<_> = b.links.difference(&a.links).collect();
        out.push(format!("hard links differ: A {only_a:?}, B {only_b:?}"));
    }
    if tolerated.len() > MAX_ZEROS_STORED_DIFFERENTLY {
        out.push(format!(
            "zero ranges stored differently in too many files: {tolerated:?}"
        ));
    }
    out
}

// ------------------------------------------------------------------------------------ runs

/// Unmounts on drop, even when the test fails.
pub struct MountGuard(pub Option<Mount>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            let _ = m.unmount();
        }
    }
}

pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The seed from `REPLICA_SEED`, else the clock.
pub fn seed() -> u64 {
    env_u64("REPLICA_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    })
}

/// Aborts the process after `secs` (a hang must not stall the suite).
pub fn watchdog(seed: u64, secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        eprintln!("REPLICA_SEED={seed}: still running after {secs} s; aborting");
        std::process::abort();
    });
}

/// Two temporary directories A (populated) and B (its exact copy, `cp -a`).
pub fn trees() -> (tempfile::TempDir, tempfile::TempDir, PathBuf, PathBuf) {
    let a_dir = tempfile::Builder::new()
        .prefix("tandem-replica-a")
        .tempdir()
        .unwrap();
    let b_dir = tempfile::Builder::new()
        .prefix("tandem-replica-b")
        .tempdir()
        .unwrap();
    let (a, b) = (
        a_dir.path().canonicalize().unwrap(),
        b_dir.path().canonicalize().unwrap(),
    );
    populate(&a);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(a.join("."))
        .arg(&b)
        .status()
        .unwrap();
    assert!(status.success());
    let before = differences(&snapshot(&a), &snapshot(&b));
    assert!(before.is_empty(), "cp -a did not copy exactly: {before:#?}");
    (a_dir, b_dir, a, b)
}

/// Runs `total_ops` random operations on `threads` threads below `a` (the mount).
pub fn run_ops(a: &Path, seed: u64, total_ops: u64, threads: u64) -> (Counts, Duration) {
    let started = Instant::now();
    // Random bytes, sliced by the writes.
    let mut r = Rng(seed);
    let buf: Arc<Vec<u8>> = Arc::new((0..(2 << 20)).map(|_| r.next() as u8).collect());
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let a = a.to_path_buf();
            let buf = buf.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (i + 1).wrapping_mul(0x1234_5678_9abc_def1));
                let mut counts = Counts::new();
                for _ in 0..total_ops / threads {
                    random_op(&mut rng, &a, &buf, &mut counts);
                }
                counts
            })
        })
        .collect();
    let mut counts = Counts::new();
    for w in workers {
        for (k, (n, ok)) in w.join().unwrap() {
            let c = counts.entry(k).or_default();
            c.0 += n;
            c.1 += ok;
        }
    }
    (counts, started.elapsed())
}

/// Every operation kind succeeded at least once (when tried often enough).
pub fn assert_all_kinds(counts: &Counts, seed: u64) {
    eprintln!("operations (attempted, succeeded): {counts:?}");
    for (kind, (n, ok)) in counts {
        assert!(
            *ok > 0 || *n < 20,
            "seed {seed}: no {kind} succeeded ({n} tried)"
        );
    }
}

/// The access times of every entry but symlinks (reading a symlink may change its own), without
/// what `exclude` excludes. Directories are read with `O_NOATIME` and nothing else is opened, so
/// the walk itself changes no access time.
pub fn atimes(root: &Path, exclude: &tandem_fs::Exclusions) -> BTreeMap<PathBuf, (i64, i64)> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let mut out = BTreeMap::new();
    let md = fs::symlink_metadata(root).unwrap();
    out.insert(PathBuf::new(), (md.atime(), md.atime_nsec()));
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let fd = rustix::fs::open(
            root.join(&rel),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::NOATIME,
            Mode::empty(),
        )
        .unwrap();
        let names: Vec<OsString> = rustix::fs::Dir::new(fd.try_clone().unwrap())
            .unwrap()
            .map(|e| OsStr::from_bytes(e.unwrap().file_name().to_bytes()).to_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        for name in names {
            let path = rel.join(&name);
            if exclude.is_excluded(&path) {
                continue;
            }
            let st = rustix::fs::statat(&fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW).unwrap();
            match st.st_mode & libc::S_IFMT {
                libc::S_IFLNK => continue,
                libc::S_IFDIR => stack.push(path.clone()),
                _ => {}
            }
            out.insert(path, (st.st_atime, st.st_atime_nsec as i64));
        }
    }
    out
}

/// A and B are identical.
pub fn assert_identical(a: &Path, b: &Path, seed: u64) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let diff = differences(&sa, &sb);
    assert!(
        diff.is_empty(),
        "seed {seed} (REPLICA_SEED={seed} to rerun): {} differences:\n{}",
        diff.len(),
        diff.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "identical: {} entries, {} hard-link groups of 2+, {} bytes of files",
        sa.entries.len(),
        sa.links.iter().filter(|g| g.len() > 1).count(),
        sa.entries
            .values()
            .map(|e| e.content.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
    );
}
