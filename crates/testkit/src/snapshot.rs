//! What is compared about a tree, and the differences between two trees.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::sys::cstr;

/// Everything compared about one entry (`ctime` cannot be set and `atime` changes with reads:
/// neither is recorded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `dir`, `symlink`, `file`, `fifo`, `socket`, `chr` or `blk`.
    pub kind: &'static str,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (0 for directories: their sizes depend on the filesystem's history).
    pub size: u64,
    /// (seconds, nanoseconds); for directories only when asked (see [`SnapshotOptions`]).
    pub mtime: Option<(i64, i64)>,
    /// Link count.
    pub nlink: u64,
    /// Device number of a device node.
    pub rdev: u64,
    /// A symlink's target.
    pub target: Option<PathBuf>,
    /// Every xattr, POSIX ACLs included.
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
    /// A file's (data, hole) boundaries from SEEK_DATA/SEEK_HOLE, when asked (not through a
    /// FUSE mount).
    pub extents: Option<Vec<(u64, u64)>>,
    /// A file's contents themselves (files stay small).
    pub content: Option<Vec<u8>>,
}

/// Every xattr of `path` (not following a symlink); empty when they cannot be listed.
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

/// The (data, hole) boundaries of `f` below `size`, from SEEK_DATA/SEEK_HOLE.
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

/// The name of a file type, as [`Entry::kind`] holds it.
pub fn kind_name(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
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
    }
}

/// The entry at `path` (not following a symlink) and its metadata: with a directory's mtime
/// when `dir_mtime`, with a file's data/hole map when `holes`.
fn read_entry(path: &Path, dir_mtime: bool, holes: bool) -> io::Result<(Entry, fs::Metadata)> {
    let md = fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let kind = kind_name(ft);
    let (extents, content) = if ft.is_file() {
        let mut f = File::open(path)?;
        // Holes first: reading could change how unwritten extents are reported.
        let e = holes.then(|| extents(&f, md.size()));
        let mut content = Vec::new();
        f.rewind()?;
        f.read_to_end(&mut content)?;
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
        mtime: (dir_mtime || !ft.is_dir()).then(|| (md.mtime(), md.mtime_nsec())),
        nlink: md.nlink(),
        rdev: md.rdev(),
        target: ft.is_symlink().then(|| fs::read_link(path)).transpose()?,
        xattrs: xattrs(path),
        extents,
        content,
    };
    Ok((e, md))
}

/// The entry at `path` and its inode number: with a directory's mtime when `dir_mtime`, with a
/// file's data/hole map when `holes`.
pub fn try_entry(path: &Path, dir_mtime: bool, holes: bool) -> io::Result<(Entry, u64)> {
    read_entry(path, dir_mtime, holes).map(|(e, md)| (e, md.ino()))
}

/// [`try_entry`] with the data/hole map, without a directory's mtime; panics on errors.
pub fn entry(path: &Path) -> (Entry, u64) {
    entry_with(path, false)
}

/// [`entry`], with the mtime of a directory too when `dir_mtime`.
pub fn entry_with(path: &Path, dir_mtime: bool) -> (Entry, u64) {
    try_entry(path, dir_mtime, true).unwrap()
}

/// A tree as compared.
pub struct Snapshot {
    /// The entries by path relative to the root (the root's own as `.`, when recorded).
    pub entries: BTreeMap<PathBuf, Entry>,
    /// Hard-link structure: the groups of paths sharing an inode (non-directories).
    pub links: BTreeSet<Vec<PathBuf>>,
    /// Directory mtimes, the root's (`.`) included, whether or not they are in the entries too.
    pub dir_mtimes: BTreeMap<PathBuf, (i64, i64)>,
}

/// What a snapshot records.
#[derive(Clone, Copy)]
pub struct SnapshotOptions<'a> {
    /// Files' data/hole maps ([`Entry::extents`]; SEEK_DATA/SEEK_HOLE are not served by a FUSE
    /// mount).
    pub holes: bool,
    /// Directories' mtimes in their entries (else only in [`Snapshot::dir_mtimes`]).
    pub dir_mtimes: bool,
    /// The root's own entry, as `.`.
    pub root_entry: bool,
    /// What is left out (paths relative to the root; an excluded directory with all below it).
    pub exclude: Option<&'a dyn Fn(&Path) -> bool>,
}

/// The tree at `root` as `options` say.
pub fn try_snapshot(root: &Path, options: SnapshotOptions<'_>) -> io::Result<Snapshot> {
    let SnapshotOptions {
        holes,
        dir_mtimes: with_dir_mtimes,
        root_entry,
        exclude,
    } = options;
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut dir_mtimes = BTreeMap::new();
    let (e, md) = read_entry(root, with_dir_mtimes, holes)?;
    dir_mtimes.insert(PathBuf::from("."), (md.mtime(), md.mtime_nsec()));
    if root_entry {
        entries.insert(PathBuf::from("."), e);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if exclude.is_some_and(|excluded| excluded(&rel)) {
                continue;
            }
            let (e, md) = read_entry(&p, with_dir_mtimes, holes)?;
            if e.kind == "dir" {
                dir_mtimes.insert(rel.clone(), (md.mtime(), md.mtime_nsec()));
                stack.push(p.clone());
            } else {
                by_ino.entry(md.ino()).or_default().push(rel.clone());
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

/// The tree at `root` with the data/hole maps, without directory mtimes and the root's own
/// entry; panics on errors.
pub fn snapshot(root: &Path) -> Snapshot {
    snapshot_with(root, false, &|_| false)
}

/// A snapshot with directory mtimes when `dir_mtimes` (and the root's own entry, as `.`),
/// without the paths (relative to `root`) `exclude` says are excluded; panics on errors.
pub fn snapshot_with(root: &Path, dir_mtimes: bool, exclude: &dyn Fn(&Path) -> bool) -> Snapshot {
    let options = SnapshotOptions {
        holes: true,
        dir_mtimes,
        root_entry: dir_mtimes,
        exclude: Some(exclude),
    };
    try_snapshot(root, options).unwrap()
}

/// Whether two entries differ only in how zero-filled ranges are stored: ext4 may keep the
/// zeros of an unwritten (fallocated, zero-ranged) range as written blocks on one side, when
/// converting part of it ("max_zeroout"), depending on the physical extent layout, which
/// differs between two filesystems (or two places of one). Contents are equal, and every range
/// that is data on one side and a hole on the other is zeros.
pub fn zeros_stored_differently(ea: &Entry, eb: &Entry) -> bool {
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

/// Files tolerated by [`zeros_stored_differently`] at most: a systematic error in hole
/// replication (punch hole applied as zeros) would show in many files.
pub const MAX_ZEROS_STORED_DIFFERENTLY: usize = 2;

/// Differences between two trees, one line each (contents summarised), the sides named `A` and
/// `B`; the files whose zeros are stored differently (tolerated) are printed.
pub fn differences(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let names = ["A", "B"];
    let mut tolerated = Vec::new();
    let out = differences_between(a, b, names, &mut tolerated);
    print_tolerated(a, b, names, &tolerated);
    out
}

/// Differences between two trees, one line each (contents summarised), the sides named `names`;
/// `tolerated` collects the files whose zeros are stored differently (more than
/// [`MAX_ZEROS_STORED_DIFFERENTLY`] are a difference).
pub fn differences_between(
    a: &Snapshot,
    b: &Snapshot,
    names: [&str; 2],
    tolerated: &mut Vec<PathBuf>,
) -> Vec<String> {
    let [name_a, name_b] = names;
    let mut out = Vec::new();
    tolerated.clear();
    for (p, ea) in &a.entries {
        match b.entries.get(p) {
            None => out.push(format!("{}: only in {name_a} ({})", p.display(), ea.kind)),
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
                    "{}: differs{}\n    {name_a}: {ea:?}\n    {name_b}: {eb:?}",
                    p.display(),
                    if content_differs { " (contents)" } else { "" }
                ));
            }
            Some(_) => {}
        }
    }
    for (p, eb) in &b.entries {
        if !a.entries.contains_key(p) {
            out.push(format!("{}: only in {name_b} ({})", p.display(), eb.kind));
        }
    }
    if a.links != b.links {
        let only_a: Vec<_> = a.links.difference(&b.links).collect();
        let only_b: Vec<_> = b.links.difference(&a.links).collect();
        out.push(format!(
            "hard links differ: {name_a} {only_a:?}, {name_b} {only_b:?}"
        ));
    }
    if tolerated.len() > MAX_ZEROS_STORED_DIFFERENTLY {
        out.push(format!(
            "zero ranges stored differently in too many files: {tolerated:?}"
        ));
    }
    out
}

/// Prints the data/hole maps of the `tolerated` files of [`differences_between`].
pub fn print_tolerated(a: &Snapshot, b: &Snapshot, names: [&str; 2], tolerated: &[PathBuf]) {
    let [name_a, name_b] = names;
    for p in tolerated {
        eprintln!(
            "{}: zeros stored as data on one side (tolerated): {name_a} {:?}, {name_b} {:?}",
            p.display(),
            a.entries[p].extents,
            b.entries[p].extents
        );
    }
}
