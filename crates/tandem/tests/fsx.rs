//! fsx-style randomised operations on a replicated directory, with real daemons in the lab
//! (issue 4 acceptance): node1 PRIM, node2 SECOND; several worker *processes* on node1 run a
//! seeded random mix of every mutating operation in the same small tree (so they interfere:
//! ENOENT, EEXIST, ENOTEMPTY... are expected and only counted); then node1's and node2's backing
//! directories must be identical: types, sizes, contents, holes, modes, owners, mtimes (ns),
//! xattrs and POSIX ACLs, symlink targets, device numbers, link counts and the hard-link
//! structure. The tree is also read through node2's mount (its read-only view). The initial tree
//! (every kind of inode, hard links, xattrs, an ACL, a sparse file) is made in node1's directory
//! before the start and reaches node2 with the full synchronisation.
//!
//! The workers are this test binary re-executed inside node1's namespaces with
//! `TANDEM_FSX_WORKER` set: the `fsx_worker` test does nothing without it.
//!
//! `TANDEM_FSX_SEED`, `TANDEM_FSX_OPS` (total, default 40 000) and `TANDEM_FSX_PROCS` (default 4)
//! override the run; the seed is printed. Directory mtimes are compared too (see
//! [`directory_mtimes`]).
//!
//! Relaxations: `ctime` cannot be set and `atime` changes with reads: neither is compared.
//! ext4 may store the zeros of an unwritten (fallocated or zero-ranged) range as written blocks
//! on one side only, depending on the physical layout: a file whose contents are equal and whose
//! data/hole maps differ only over zeros is tolerated, for at most 2 files per run (a systematic
//! error, such as a punched hole replicated as written zeros, would show in many).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::logs;
use tandem::cluster::{Cluster, ClusterSpec, DEFAULT_REPLICATED};
use tandem_lab::LabSpec;

const WORKER_ENV: &str = "TANDEM_FSX_WORKER";
/// How long the workers may run at most (a hang must not stall the suite).
const WORKERS_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the replicas may take to converge after the workers exit: writes are acknowledged
/// after the secondary applied them, but the primary's times follow each mutation separately.
const CONVERGE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------ helpers

/// splitmix64: small, seedable, good enough for choosing operations.
struct Rng(u64);

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
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
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

fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

fn utimens(p: &Path, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
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

fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
}

fn rename2(a: &Path, b: &Path, flags: u32) -> io::Result<()> {
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

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) })
}

fn truncate(p: &Path, size: u64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    check(unsafe { libc::truncate(c.as_ptr(), size as i64) })
}

/// Opens a regular file for writing without following a final symlink and without blocking on
/// FIFOs; `ENOENT`-like for anything else.
fn open_regular(p: &Path, extra: i32) -> io::Result<File> {
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

/// A POSIX ACL in the kernel's xattr format (`system.posix_acl_*` bytes).
fn acl(rng: &mut Rng) -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    let mut entries = vec![(1u16, rng.below(8) as u16, UNDEFINED)]; // USER_OBJ
    let named = rng.chance(60);
    if named {
        entries.push((2, rng.below(8) as u16, 1000 + rng.below(2) as u32)); // USER
    }
    entries.push((4, rng.below(8) as u16, UNDEFINED)); // GROUP_OBJ
    if named && rng.chance(50) {
        entries.push((8, rng.below(8) as u16, 100)); // GROUP
    }
    if named {
        entries.push((0x10, rng.below(8) as u16, UNDEFINED)); // MASK
    }
    entries.push((0x20, rng.below(8) as u16, UNDEFINED)); // OTHER
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

// ------------------------------------------------------------------------------------ the tree

/// The initial tree: every kind of inode, hard links, xattrs, an ACL, a sparse file.
fn populate(p: &Path) {
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
    let a = acl(&mut Rng(1));
    lsetxattr(&p.join("d1/f2"), "system.posix_acl_access", &a, 0).unwrap();
    mknod(&p.join("d0/f6"), libc::S_IFIFO | 0o640, 0).unwrap();
    let sparse = File::create(p.join("f7")).unwrap();
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(b"tail", 3 << 20).unwrap();
    drop(sparse);
    fs::write(p.join("d2/f8"), b"o").unwrap();
    std::os::unix::fs::chown(p.join("d2/f8"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(p.join("d2/f8"), fs::Permissions::from_mode(0o4751)).unwrap();
}

const DIRS: &[&str] = &["", "d0", "d1", "d2", "d0/e"];
const NAMES: &[&str] = &[
    "f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "d0", "d1", "d2", "e",
];
const XATTR_NAMES: &[&str] = &["user.a", "user.b", "user.c", "trusted.t"];
const LINK_TARGETS: &[&str] = &["f0", "f1", "d1/f2", "/nonexistent/x", "d0", "e", "f9"];

fn random_path(rng: &mut Rng, root: &Path) -> PathBuf {
    let dir = rng.pick(DIRS);
    // Mostly file names; directory names now and then (renames and removals of directories).
    let name = if rng.chance(85) {
        rng.pick(&NAMES[..10])
    } else {
        rng.pick(&NAMES[10..])
    };
    root.join(dir).join(name)
}

fn random_time(rng: &mut Rng) -> libc::timespec {
    let (tv_sec, tv_nsec) = match rng.below(10) {
        0 => (0, libc::UTIME_NOW),
        1 => (0, libc::UTIME_OMIT),
        _ => (
            1_000_000_000 + rng.below(700_000_000) as i64,
            rng.below(1_000_000_000) as i64,
        ),
    };
    libc::timespec { tv_sec, tv_nsec }
}

/// Attempted and successful operations per kind, and failures per errno.
#[derive(Default, Debug, serde::Serialize, serde::Deserialize)]
struct Counts {
    ops: BTreeMap<String, (u64, u64)>,
    errors: BTreeMap<String, u64>,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        for (kind, (n, ok)) in other.ops {
            let c = self.ops.entry(kind).or_default();
            c.0 += n;
            c.1 += ok;
        }
        for (e, n) in other.errors {
            *self.errors.entry(e).or_default() += n;
        }
    }
}

fn errno_name(e: &io::Error) -> String {
    let Some(n) = e.raw_os_error() else {
        return "not-regular".into();
    };
    let names = [
        (libc::ENOENT, "ENOENT"),
        (libc::EEXIST, "EEXIST"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::ELOOP, "ELOOP"),
        (libc::ENODATA, "ENODATA"),
        (libc::EPERM, "EPERM"),
        (libc::ENXIO, "ENXIO"),
        (libc::EXDEV, "EXDEV"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::EIO, "EIO"),
        (libc::EROFS, "EROFS"),
        (libc::ESTALE, "ESTALE"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EACCES, "EACCES"),
    ];
    names
        .iter()
        .find(|(code, _)| *code == n)
        .map_or_else(|| format!("errno {n}"), |(_, name)| (*name).to_owned())
}

/// Errors that no race explains: the mount or the replication failed.
const FORBIDDEN: &[&str] = &["EIO", "EROFS", "ESTALE", "ENOTCONN", "ENOSPC"];

/// One random operation below `root` (the mount); errors are expected (names collide).
fn random_op(rng: &mut Rng, root: &Path, buf: &[u8], counts: &mut Counts) {
    let p = random_path(rng, root);
    let (kind, result): (&str, io::Result<()>) = match rng.below(100) {
        0..=17 => ("write", {
            let extra = match rng.below(20) {
                0 => libc::O_DSYNC,
                1 => libc::O_SYNC,
                2..=5 => libc::O_CREAT,
                _ => 0,
            };
            let len = if rng.chance(5) {
                1 << 20
            } else {
                1 + rng.below(64 << 10) as usize
            };
            let start = rng.below((buf.len() - len) as u64) as usize;
            let offset = rng.below(3 << 20);
            open_regular(&p, extra).and_then(|f| f.write_all_at(&buf[start..start + len], offset))
        }),
        18..=21 => ("append", {
            let extra = if rng.chance(10) { libc::O_SYNC } else { 0 };
            let len = 1 + rng.below(16 << 10) as usize;
            let start = rng.below((buf.len() - len) as u64) as usize;
            open_regular(&p, libc::O_APPEND | extra)
                .and_then(|mut f| f.write_all(&buf[start..start + len]))
        }),
        22..=27 => ("truncate", {
            let size = if rng.chance(30) {
                0
            } else {
                rng.below(4 << 20)
            };
            if rng.chance(50) {
                truncate(&p, size)
            } else {
                open_regular(&p, 0).and_then(|f| f.set_len(size))
            }
        }),
        28..=32 => ("fallocate", {
            let mode = rng.pick(&[
                0,
                libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_ZERO_RANGE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ]);
            let (offset, len) = (rng.below(3 << 20), 1 + rng.below(1 << 20));
            open_regular(&p, 0).and_then(|f| fallocate(&f, mode, offset, len))
        }),
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
        59..=66 => {
            let (kind, flags) = match rng.below(10) {
                0..=4 => ("rename", 0),
                5..=6 => ("rename-noreplace", libc::RENAME_NOREPLACE),
                7..=8 => ("rename-exchange", libc::RENAME_EXCHANGE),
                _ => ("rename-whiteout", libc::RENAME_WHITEOUT),
            };
            (kind, rename2(&random_path(rng, root), &p, flags))
        }
        67..=70 => (
            "chmod",
            fs::set_permissions(&p, fs::Permissions::from_mode(rng.below(0o10000) as u32)),
        ),
        71..=73 => ("chown", {
            let ids = [0, 1000, 1234];
            std::os::unix::fs::lchown(&p, Some(rng.pick(&ids)), Some(rng.pick(&ids)))
        }),
        74..=78 => ("utimens", utimens(&p, random_time(rng), random_time(rng))),
        79..=84 => ("setxattr", {
            let name = rng.pick(XATTR_NAMES);
            let len = rng.below(64) as usize;
            let start = rng.below(1000) as usize;
            let flags = rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]);
            lsetxattr(&p, name, &buf[start..start + len], flags)
        }),
        85..=87 => ("removexattr", {
            if rng.chance(50) {
                // Set then remove (random names are rarely there).
                lsetxattr(&p, "user.r", b"r", 0).and_then(|()| lremovexattr(&p, "user.r"))
            } else {
                lremovexattr(&p, rng.pick(XATTR_NAMES))
            }
        }),
        88..=90 => {
            let a = acl(rng);
            if rng.chance(30) {
                // Default ACLs (directories only): inherited by what is created below.
                (
                    "acl-default",
                    lsetxattr(&p, "system.posix_acl_default", &a, 0),
                )
            } else {
                ("acl", lsetxattr(&p, "system.posix_acl_access", &a, 0))
            }
        }
        91..=94 => {
            if rng.chance(25) {
                // O_DIRECTORY: the name may be a FIFO by now (opening it would block).
                let d = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
                    .open(p.parent().unwrap_or(root));
                ("fsync-dir", d.and_then(|d| d.sync_all()))
            } else if rng.chance(50) {
                ("fdatasync", open_regular(&p, 0).and_then(|f| f.sync_data()))
            } else {
                ("fsync", open_regular(&p, 0).and_then(|f| f.sync_all()))
            }
        }
        _ => ("unlinked-open", {
            // A file unlinked while open is still written, truncated, chmod'ed and synced.
            (|| {
                let f = open_regular(&p, 0)?;
                fs::remove_file(&p)?;
                for _ in 0..3 {
                    let len = 1 + rng.below(8192) as usize;
                    f.write_all_at(&buf[..len], rng.below(1 << 20))?;
                }
                f.set_len(rng.below(1 << 20))?;
                f.set_permissions(fs::Permissions::from_mode(0o600))?;
                f.sync_all()
            })()
        }),
    };
    let c = counts.ops.entry(kind.to_owned()).or_default();
    c.0 += 1;
    match result {
        Ok(()) => c.1 += 1,
        Err(e) => {
            *counts
                .errors
                .entry(format!("{kind}:{}", errno_name(&e)))
                .or_default() += 1;
        }
    }
}

// ------------------------------------------------------------------------------------ snapshot

/// Everything compared about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    /// Files, symlinks, devices: compared. Directories: see [`directory_mtimes`].
    mtime: Option<(i64, i64)>,
    nlink: u64,
    rdev: u64,
    target: Option<PathBuf>,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    /// (data, hole) boundaries from SEEK_DATA/SEEK_HOLE (`None` through a FUSE mount).
    extents: Option<Vec<(u64, u64)>>,
    /// The contents themselves (files stay small).
    content: Option<Vec<u8>>,
}

fn xattrs(path: &Path) -> BTreeMap<OsString, Vec<u8>> {
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

fn extents(f: &File, size: u64) -> Vec<(u64, u64)> {
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

fn entry(path: &Path, holes: bool) -> io::Result<(Entry, u64)> {
    let md = fs::symlink_metadata(path)?;
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
        let mut f = File::open(path)?;
        // Holes first: reading could change how unwritten extents are reported.
        let e = holes.then(|| extents(&f, md.size()));
        let mut content = Vec::new();
        io::Seek::rewind(&mut f)?;
        io::Read::read_to_end(&mut f, &mut content)?;
        (e, Some(content))
    } else {
        (None, None)
    };
    let e = Entry {
        kind,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: if ft.is_dir() { 0 } else { md.size() },
        mtime: (!ft.is_dir()).then(|| (md.mtime(), md.mtime_nsec())),
        nlink: md.nlink(),
        rdev: md.rdev(),
        target: ft.is_symlink().then(|| fs::read_link(path)).transpose()?,
        xattrs: xattrs(path),
        extents,
        content,
    };
    Ok((e, md.ino()))
}

struct Snapshot {
    entries: BTreeMap<PathBuf, Entry>,
    /// Hard-link structure: the groups of paths sharing an inode (non-directories).
    links: BTreeSet<Vec<PathBuf>>,
    /// Directory mtimes, the root's (`.`) included.
    dir_mtimes: BTreeMap<PathBuf, (i64, i64)>,
}

/// The tree at `root` (itself as `.`); `holes`: with the data/hole maps.
fn snapshot(root: &Path, holes: bool) -> io::Result<Snapshot> {
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut dir_mtimes = BTreeMap::new();
    let md = fs::symlink_metadata(root)?;
    dir_mtimes.insert(PathBuf::from("."), (md.mtime(), md.mtime_nsec()));
    entries.insert(PathBuf::from("."), entry(root, holes)?.0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let (e, ino) = entry(&p, holes)?;
            if e.kind == "dir" {
                let md = fs::symlink_metadata(&p)?;
                dir_mtimes.insert(rel.clone(), (md.mtime(), md.mtime_nsec()));
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
    Ok(Snapshot {
        entries,
        links,
        dir_mtimes,
    })
}

/// Whether two entries differ only in how zero-filled ranges are stored (see the module
/// documentation): contents equal, and every range that is data on one side and a hole on the
/// other holds zeros.
fn zeros_stored_differently(ea: &Entry, eb: &Entry) -> bool {
    let (Some(xa), Some(xb), Some(content)) = (&ea.extents, &eb.extents, &ea.content) else {
        return false;
    };
    let without = |e: &Entry| Entry {
        extents: None,
        ..e.clone()
    };
    let is_data = |x: &[(u64, u64)], at: u64| x.iter().any(|&(d, h)| d <= at && at < h);
    let mut bounds: Vec<u64> = xa.iter().chain(xb).flat_map(|&(d, h)| [d, h]).collect();
    bounds.extend([0, content.len() as u64]);
    bounds.sort_unstable();
    bounds.dedup();
    without(ea) == without(eb)
        && bounds.windows(2).all(|w| {
            let (from, to) = (w[0], w[1].min(content.len() as u64));
            is_data(xa, from) == is_data(xb, from)
                || content[from as usize..to.max(from) as usize]
                    .iter()
                    .all(|b| *b == 0)
        })
}

/// Files tolerated by [`zeros_stored_differently`] at most.
const MAX_ZEROS_STORED_DIFFERENTLY: usize = 2;

/// Differences between two trees, one line each (contents summarised); `tolerated` collects the
/// files whose zeros are stored differently.
fn differences(a: &Snapshot, b: &Snapshot, tolerated: &mut Vec<PathBuf>) -> Vec<String> {
    let mut out = Vec::new();
    tolerated.clear();
    for (p, ea) in &a.entries {
        match b.entries.get(p) {
            None => out.push(format!("{}: only on node1 ({})", p.display(), ea.kind)),
            Some(eb) if ea != eb && zeros_stored_differently(ea, eb) => tolerated.push(p.clone()),
            Some(eb) if ea != eb => {
                let content_differs = ea.content != eb.content;
                let (ea, eb) = (
                    Entry {
                        content: None,
                        ..ea.clone()
                    },
                    Entry {
                        content: None,
                        ..eb.clone()
                    },
                );
                out.push(format!(
                    "{}: differs{}\n    node1: {ea:?}\n    node2: {eb:?}",
                    p.display(),
                    if content_differs { " (contents)" } else { "" }
                ));
            }
            Some(_) => {}
        }
    }
    for (p, eb) in &b.entries {
        if !a.entries.contains_key(p) {
            out.push(format!("{}: only on node2 ({})", p.display(), eb.kind));
        }
    }
    if a.links != b.links {
        let only_a: Vec<_> = a.links.difference(&b.links).collect();
        let only_b: Vec<_> = b.links.difference(&a.links).collect();
        out.push(format!(
            "hard links differ: node1 {only_a:?}, node2 {only_b:?}"
        ));
    }
    if tolerated.len() > MAX_ZEROS_STORED_DIFFERENTLY {
        out.push(format!(
            "zero ranges stored differently in too many files: {tolerated:?}"
        ));
    }
    out
}

/// Directories whose mtimes differ. They are not replicated when they change as a side effect:
/// the primary's outcome carries the attributes of a mutation's *target* (the new inode of a
/// create or mkdir, nothing for unlink, rmdir and rename), so the parent directories' mtimes are
/// the secondary's own clock at its apply. They usually coincide anyway, because both nodes'
/// kernels stamp from the same coarse clock tick and the secondary applies within the same tick;
/// under load an apply crosses a tick now and then. A later chmod, chown, xattr change or
/// utimens of the directory itself copies the primary's times again.
fn directory_mtimes(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    a.dir_mtimes
        .iter()
        .filter_map(|(p, ma)| {
            let mb = b.dir_mtimes.get(p)?;
            (ma != mb).then(|| format!("{:?}: node1 {ma:?}, node2 {mb:?}", p))
        })
        .collect()
}

// ------------------------------------------------------------------------------------ workers

/// A worker process (this binary re-executed inside node1 with `TANDEM_FSX_WORKER=ROOT SEED
/// INDEX OPS`): runs its operations, prints its counts. Does nothing without the variable.
#[test]
fn fsx_worker() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let fields: Vec<&str> = spec.split(' ').collect();
    let [root, seed, index, ops] = fields[..] else {
        panic!("{WORKER_ENV}={spec}: expected ROOT SEED INDEX OPS");
    };
    let (root, seed, index, ops): (PathBuf, u64, u64, u64) = (
        root.into(),
        seed.parse().unwrap(),
        index.parse().unwrap(),
        ops.parse().unwrap(),
    );
    // Random bytes, sliced by the writes (the same in every worker).
    let mut r = Rng(seed);
    let buf: Vec<u8> = (0..(2 << 20)).map(|_| r.next() as u8).collect();
    let mut rng = Rng(seed ^ (index + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let mut counts = Counts::default();
    for _ in 0..ops {
        random_op(&mut rng, &root, &buf, &mut counts);
    }
    println!("FSX-COUNTS {}", serde_json::to_string(&counts).unwrap());
}

// ------------------------------------------------------------------------------------ the test

/// A node's module state and its transitions so far: no new transition across the run means no
/// loss of the replication (a divergence ends the stream and the pair resynchronises, which
/// would hide it), no failover.
fn module_state(cluster: &Cluster, node: &str) -> (String, Vec<String>) {
    let state = cluster.status(node).unwrap()["modules"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let log = fs::read_to_string(cluster.module_log(node).unwrap()).unwrap_or_default();
    let transitions = log
        .lines()
        .filter(|l| l.contains(" transition "))
        .map(str::to_owned)
        .collect();
    (state, transitions)
}

#[test]
fn fsx_replicas_are_identical_after_random_operations_from_several_processes() {
    let seed = env_u64("TANDEM_FSX_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let total_ops = env_u64("TANDEM_FSX_OPS").unwrap_or(40_000);
    let procs = env_u64("TANDEM_FSX_PROCS").unwrap_or(4).max(1);
    eprintln!("TANDEM_FSX_SEED={seed} TANDEM_FSX_OPS={total_ops} TANDEM_FSX_PROCS={procs}");
    let started = Instant::now();

    let spec = ClusterSpec::new(LabSpec::new(["node1", "node2", "client"]));
    let cluster = Cluster::create(&spec, Path::new(env!("CARGO_BIN_EXE_tandem"))).unwrap();
    let backing = |node: &str| cluster.node_dir(node).unwrap().join("data/0");
    // The initial tree goes to node2 with the full synchronisation.
    populate(&backing("node1"));
    if let Err(error) = cluster.bootstrap() {
        panic!("bootstrap failed: {error:#}\n{}", logs(&cluster));
    }
    let before = [
        module_state(&cluster, "node1"),
        module_state(&cluster, "node2"),
    ];
    eprintln!("cluster ready after {:.1?}", started.elapsed());

    // The workers: this binary, inside node1.
    let exe = std::env::current_exe().unwrap();
    let ran = Instant::now();
    let workers: Vec<(u32, PathBuf)> = (0..procs)
        .map(|i| {
            let log = cluster
                .node_dir("node1")
                .unwrap()
                .join(format!("fsx-worker-{i}.out"));
            let mut command = cluster.lab.command("node1", &exe).unwrap();
            command
                .args(["--exact", "fsx_worker", "--nocapture", "--test-threads=1"])
                .env(
                    WORKER_ENV,
                    format!(
                        "{DEFAULT_REPLICATED} {seed} {i} {}",
                        total_ops / procs + u64::from(i < total_ops % procs)
                    ),
                );
            let pid = cluster.lab.spawn("node1", &mut command, &log).unwrap();
            (pid, log)
        })
        .collect();
    let mut counts = Counts::default();
    for (pid, log) in &workers {
        let waited = cluster.lab.wait_exit(*pid, WORKERS_TIMEOUT);
        let out = fs::read_to_string(log).unwrap_or_default();
        if let Err(error) = waited {
            panic!(
                "seed {seed}: worker {pid} hangs: {error:#}\n{out}\n{}",
                logs(&cluster)
            );
        }
        let status = cluster.lab.try_wait(*pid).unwrap().unwrap();
        assert!(
            status.success(),
            "seed {seed}: worker {pid} failed ({status}):\n{out}\n{}",
            logs(&cluster)
        );
        let line = out
            .lines()
            .find_map(|l| l.split_once("FSX-COUNTS ").map(|(_, counts)| counts))
            .unwrap_or_else(|| panic!("seed {seed}: worker {pid} printed no counts:\n{out}"));
        counts.add(serde_json::from_str(line).unwrap());
    }
    let ran = ran.elapsed();
    let attempted: u64 = counts.ops.values().map(|c| c.0).sum();
    let succeeded: u64 = counts.ops.values().map(|c| c.1).sum();
    let mut by_errno = BTreeMap::<&str, u64>::new();
    for (kind_errno, n) in &counts.errors {
        *by_errno
            .entry(kind_errno.rsplit(':').next().unwrap())
            .or_default() += n;
    }
    eprintln!(
        "{attempted} operations ({succeeded} succeeded) by {procs} processes in {ran:.1?}\n\
         per kind (attempted, succeeded): {:?}\nerrors (expected from the races): {by_errno:?}",
        counts.ops
    );
    assert_eq!(attempted, total_ops);
    for (kind, (n, ok)) in &counts.ops {
        assert!(
            *ok > 0 || *n < 20,
            "seed {seed}: no {kind} succeeded ({n} tried)"
        );
    }
    let forbidden: Vec<_> = counts
        .errors
        .iter()
        .filter(|(e, _)| FORBIDDEN.iter().any(|f| e.ends_with(&format!(":{f}"))))
        .collect();
    assert!(
        forbidden.is_empty(),
        "seed {seed}: errors that no race explains: {forbidden:?}\n{}",
        logs(&cluster)
    );

    // The pair stayed PRIM/SECOND, without any loss of the replication stream.
    let after = [
        module_state(&cluster, "node1"),
        module_state(&cluster, "node2"),
    ];
    assert_eq!(
        before,
        after,
        "seed {seed}: the pair changed during the run\n{}",
        logs(&cluster)
    );
    assert_eq!(
        (after[0].0.as_str(), after[1].0.as_str()),
        ("PRIM", "SECOND")
    );

    // Both backing directories are identical (acknowledged writes are applied on node2; the
    // primary's times follow each mutation: poll briefly).
    let deadline = Instant::now() + CONVERGE;
    let mut tolerated = Vec::new();
    let (a, b) = loop {
        let (a, b) = (
            snapshot(&backing("node1"), true).unwrap(),
            snapshot(&backing("node2"), true).unwrap(),
        );
        let diff = differences(&a, &b, &mut tolerated);
        if diff.is_empty() {
            break (a, b);
        }
        if Instant::now() > deadline {
            panic!(
                "seed {seed} (TANDEM_FSX_SEED={seed} to rerun): {} differences between node1's \
                 and node2's replicas:\n{}\n{}",
                diff.len(),
                diff.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
                logs(&cluster)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for p in &tolerated {
        eprintln!(
            "{}: zeros stored as data on one side (tolerated): node1 {:?}, node2 {:?}",
            p.display(),
            a.entries[p].extents,
            b.entries[p].extents
        );
    }
    let files = a.entries.values().filter(|e| e.kind == "file").count();
    eprintln!(
        "identical: {} entries ({files} files, {} bytes), {} hard-link groups of 2+, {} with \
         xattrs, {} data segments",
        a.entries.len(),
        a.entries
            .values()
            .map(|e| e.content.as_ref().map_or(0, Vec::len))
            .sum::<usize>(),
        a.links.iter().filter(|g| g.len() > 1).count(),
        a.entries.values().filter(|e| !e.xattrs.is_empty()).count(),
        a.entries
            .values()
            .filter_map(|e| e.extents.as_ref())
            .map(|x| x.len())
            .sum::<usize>(),
    );
    // The secondary's applier found no divergence (the primary's result of every mutation was
    // this node's result too).
    let out = fs::read_to_string(cluster.node_dir("node2").unwrap().join("daemon.out")).unwrap();
    assert!(
        !out.contains("diverge"),
        "seed {seed}: node2 reports diverging replicas\n{}",
        logs(&cluster)
    );
    // Directory mtimes too: the primary's outcome of a namespace operation carries its parent
    // directories' times.
    let dir_mtimes = directory_mtimes(&a, &b);
    assert!(
        dir_mtimes.is_empty(),
        "seed {seed}: {} of {} directory mtimes differ between the replicas:\n{}",
        dir_mtimes.len(),
        a.dir_mtimes.len(),
        dir_mtimes.join("\n")
    );

    // node2's mount (its read-only view, inside its namespaces) shows the same tree.
    let mount = cluster
        .lab
        .in_host("node2", || snapshot(Path::new(DEFAULT_REPLICATED), false))
        .unwrap()
        .unwrap();
    let strip = |s: &Snapshot| -> BTreeMap<PathBuf, Entry> {
        s.entries
            .iter()
            .map(|(p, e)| {
                (
                    p.clone(),
                    Entry {
                        extents: None,
                        ..e.clone()
                    },
                )
            })
            .collect()
    };
    let (through_mount, backing_b) = (strip(&mount), strip(&b));
    let mismatched: Vec<String> = backing_b
        .iter()
        .filter(|(p, e)| through_mount.get(*p) != Some(e))
        .map(|(p, e)| {
            let shown = through_mount.get(p).map(|m| Entry {
                content: None,
                ..m.clone()
            });
            let contents = match (
                &e.content,
                through_mount.get(p).and_then(|m| m.content.as_ref()),
            ) {
                (Some(x), Some(y)) if x != y => format!(
                    " (contents: {} bytes in the backing file, {} read through the mount, first \
                     difference at {:?})",
                    x.len(),
                    y.len(),
                    x.iter().zip(y).position(|(a, b)| a != b)
                ),
                _ => String::new(),
            };
            let e = Entry {
                content: None,
                ..e.clone()
            };
            format!(
                "{}{contents}:\n    backing {e:?}\n    mount   {shown:?}",
                p.display()
            )
        })
        .chain(
            through_mount
                .keys()
                .filter(|p| !backing_b.contains_key(*p))
                .map(|p| format!("{}: only through the mount", p.display())),
        )
        .collect();
    assert!(
        mismatched.is_empty(),
        "seed {seed}: node2's mount shows something else than its backing directory for {} \
         entries:\n{}",
        mismatched.len(),
        mismatched[..mismatched.len().min(10)].join("\n")
    );
    assert_eq!(
        mount.links, b.links,
        "seed {seed}: hard links through node2's mount"
    );
    eprintln!(
        "node2's mount shows the same tree; total {:.1?}",
        started.elapsed()
    );
}
