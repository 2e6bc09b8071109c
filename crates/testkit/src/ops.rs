//! The fsx-style random operations: a seedable generator, the initial tree, one random mutating
//! operation at a time in a small tree (names collide on purpose: errors are expected and only
//! counted), and the counts.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys::{
    check, fallocate, lremovexattr, lsetxattr, mknod, open_regular, rename2, truncate, utimens,
};

// ------------------------------------------------------------------------------------ rng

/// splitmix64: small, seedable, good enough for choosing operations.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// True with a probability of `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The value of the environment variable `name` as a number, if set and valid.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The seed from the environment variable `name`, else the clock.
pub fn seed_from_env(name: &str) -> u64 {
    env_u64(name).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    })
}

/// A POSIX ACL in the kernel's xattr format (`system.posix_acl_*` bytes).
pub fn acl(rng: &mut Rng) -> Vec<u8> {
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

/// The directories of the tree the operations choose from (relative; `""` is the root).
pub const DIRS: &[&str] = &["", "d0", "d1", "d2", "d0/e"];
/// The names the operations choose from: file names first, then directory names.
pub const NAMES: &[&str] = &[
    "f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "d0", "d1", "d2", "e",
];
/// The xattr names set and removed.
pub const XATTR_NAMES: &[&str] = &["user.a", "user.b", "user.c", "trusted.t"];
/// The targets of the symlinks created (some dangling, some directories).
pub const LINK_TARGETS: &[&str] = &["f0", "f1", "d1/f2", "/nonexistent/x", "d0", "e", "f9"];

/// A random path below `root`: one of [`NAMES`] in one of [`DIRS`].
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

/// A random time for `utimensat`: now, omitted, or a time in 2001..2023 with nanoseconds.
pub fn random_time(rng: &mut Rng) -> libc::timespec {
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

// ------------------------------------------------------------------------------------ counts

/// Attempted and successful operations per kind, and failures per kind and errno
/// (`kind:ENAME`, see [`errno_name`]).
#[derive(Default, Debug, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// (attempted, succeeded) per operation kind.
    pub ops: BTreeMap<String, (u64, u64)>,
    /// Failures per `kind:ENAME`.
    pub errors: BTreeMap<String, u64>,
}

impl Counts {
    /// Counts one operation of `kind` and its result.
    pub fn record(&mut self, kind: &str, result: &io::Result<()>) {
        let c = self.ops.entry(kind.to_owned()).or_default();
        c.0 += 1;
        match result {
            Ok(()) => c.1 += 1,
            Err(e) => {
                *self
                    .errors
                    .entry(format!("{kind}:{}", errno_name(e)))
                    .or_default() += 1;
            }
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: Counts) {
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

/// The symbolic name of `e`'s errno (`errno N` for the rare ones), `not-regular` for an error
/// without one (from [`open_regular`]).
pub fn errno_name(e: &io::Error) -> String {
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

// ------------------------------------------------------------------------------------ operations

/// The two mixes of [`random_op`]. Both run every kind of mutating operation with the same
/// weights otherwise; a seed gives each mix the sequence it always gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// The in-process replica tests' mix: positioned writes only (22 %, 1 MiB in 8 % of them);
    /// the file of a write, fallocate or fsync is opened before its parameters are drawn (a
    /// failed open draws none); the file unlinked while open also gets an xattr; one kind per
    /// call (`rename`, `acl`, `fsync` whatever the flags or variant).
    Replica,
    /// The lab fsx test's mix: positioned writes (18 %, 1 MiB in 5 % of them) and appends (4 %);
    /// the file is opened after the parameters are drawn; the kinds tell the variants apart
    /// (`rename-noreplace`, `rename-exchange`, `rename-whiteout`, `acl-default`, `fsync-dir`,
    /// `fdatasync`).
    Fsx,
}

impl Mix {
    /// `coarse` in the replica mix, `fine` in the fsx one.
    fn kind(self, coarse: &'static str, fine: &'static str) -> &'static str {
        match self {
            Mix::Replica => coarse,
            Mix::Fsx => fine,
        }
    }

    /// The replica mix opens the regular file before drawing the operation's parameters: its
    /// file, or its error (returned by the caller before anything else is drawn).
    fn open_early(self, p: &Path, extra: i32) -> io::Result<Option<File>> {
        match self {
            Mix::Replica => open_regular(p, extra).map(Some),
            Mix::Fsx => Ok(None),
        }
    }
}

/// The file [`Mix::open_early`] opened, else opened now.
fn opened(early: Option<File>, p: &Path, extra: i32) -> io::Result<File> {
    early.map_or_else(|| open_regular(p, extra), Ok)
}

/// One random operation below `root` (typically a mount), counted in `counts`; errors are
/// expected (names collide). `buf` holds the random bytes written (at least 2 MiB).
pub fn random_op(rng: &mut Rng, root: &Path, buf: &[u8], mix: Mix, counts: &mut Counts) {
    let p = random_path(rng, root);
    let (kind, result): (&'static str, io::Result<()>) = match rng.below(100) {
        18..=21 if mix == Mix::Fsx => ("append", {
            let extra = if rng.chance(10) { libc::O_SYNC } else { 0 };
            let len = 1 + rng.below(16 << 10) as usize;
            let start = rng.below((buf.len() - len) as u64) as usize;
            open_regular(&p, libc::O_APPEND | extra)
                .and_then(|mut f| f.write_all(&buf[start..start + len]))
        }),
        0..=21 => (
            "write",
            (|| {
                let extra = match rng.below(20) {
                    0 => libc::O_DSYNC,
                    1 => libc::O_SYNC,
                    2..=5 => libc::O_CREAT,
                    _ => 0,
                };
                let early = mix.open_early(&p, extra)?;
                let big = match mix {
                    Mix::Replica => 8,
                    Mix::Fsx => 5,
                };
                let len = if rng.chance(big) {
                    1 << 20
                } else {
                    1 + rng.below(64 << 10) as usize
                };
                let start = rng.below((buf.len() - len) as u64) as usize;
                let offset = rng.below(3 << 20);
                opened(early, &p, extra)?.write_all_at(&buf[start..start + len], offset)
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
                open_regular(&p, 0).and_then(|f| f.set_len(size))
            }
        }),
        28..=32 => (
            "fallocate",
            (|| {
                let early = mix.open_early(&p, 0)?;
                let mode = *rng.pick(&[
                    0,
                    libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_ZERO_RANGE,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                ]);
                let (offset, len) = (rng.below(3 << 20), 1 + rng.below(1 << 20));
                fallocate(&opened(early, &p, 0)?, mode, offset, len)
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
        59..=66 => {
            let (kind, flags) = match rng.below(10) {
                0..=4 => ("rename", 0),
                5..=6 => ("rename-noreplace", libc::RENAME_NOREPLACE),
                7..=8 => ("rename-exchange", libc::RENAME_EXCHANGE),
                _ => ("rename-whiteout", libc::RENAME_WHITEOUT),
            };
            (
                mix.kind("rename", kind),
                rename2(&random_path(rng, root), &p, flags),
            )
        }
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
            let name = *rng.pick(XATTR_NAMES);
            let len = rng.below(64) as usize;
            let start = rng.below(1000) as usize;
            let flags = *rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]);
            lsetxattr(&p, name, &buf[start..start + len], flags)
        }),
        85..=87 => ("removexattr", {
            if rng.chance(50) {
                // Set then remove (random names are rarely there).
                lsetxattr(&p, "user.r", b"r", 0).and_then(|()| lremovexattr(&p, "user.r"))
            } else {
                let name: &&str = rng.pick(XATTR_NAMES);
                lremovexattr(&p, name)
            }
        }),
        88..=90 => {
            let a = acl(rng);
            if rng.chance(30) {
                // Default ACLs (directories only): inherited by what is created below.
                (
                    mix.kind("acl", "acl-default"),
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
                (mix.kind("fsync", "fsync-dir"), d.and_then(|d| d.sync_all()))
            } else {
                match mix.open_early(&p, 0) {
                    Err(e) => ("fsync", Err(e)),
                    Ok(early) => {
                        let data_only = rng.chance(50);
                        let kind = if data_only { "fdatasync" } else { "fsync" };
                        let f = opened(early, &p, 0);
                        let synced = if data_only {
                            f.and_then(|f| f.sync_data())
                        } else {
                            f.and_then(|f| f.sync_all())
                        };
                        (mix.kind("fsync", kind), synced)
                    }
                }
            }
        }
        _ => ("unlinked-open", {
            // A file unlinked while open is still written, truncated, chmod'ed (and, in the
            // replica mix, given an xattr) and synced.
            (|| {
                let f = open_regular(&p, 0)?;
                fs::remove_file(&p)?;
                for _ in 0..3 {
                    let len = 1 + rng.below(8192) as usize;
                    f.write_all_at(&buf[..len], rng.below(1 << 20))?;
                }
                f.set_len(rng.below(1 << 20))?;
                f.set_permissions(fs::Permissions::from_mode(0o600))?;
                if mix == Mix::Replica {
                    let (n, v) = (CString::new("user.gone").unwrap(), b"1");
                    // SAFETY: valid descriptor, C string and buffer.
                    check(unsafe {
                        libc::fsetxattr(f.as_raw_fd(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                    })?;
                }
                f.sync_all()
            })()
        }),
    };
    counts.record(kind, &result);
}
