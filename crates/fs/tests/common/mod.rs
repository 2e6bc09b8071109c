//! Helpers shared by the mount tests (run as root; /dev/fuse needed).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tandem_fs::{Completion, Mode, Mount, MountOptions, Mutation, Outcome, Replicator};
pub use tandem_testkit::{cstr, fallocate, lremovexattr, lsetxattr, rename2, xattrs};

/// Records every mutation (owned) and every outcome; completes at once.
#[derive(Default)]
pub struct Recorder {
    pub log: Mutex<Vec<Mutation<'static>>>,
    pub outcomes: Mutex<Vec<(u64, Outcome)>>,
}

impl Recorder {
    pub fn take(&self) -> Vec<Mutation<'static>> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    pub fn kinds(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().iter().map(|m| m.kind()).collect()
    }
}

impl Replicator for Recorder {
    fn submit(&self, mutation: &Mutation<'_>, done: Completion) {
        self.log.lock().unwrap().push(mutation.clone().into_owned());
        done.complete(Ok(()));
    }
    fn applied(&self, seq: u64, outcome: &Outcome) {
        self.outcomes.lock().unwrap().push((seq, outcome.clone()));
    }
}

/// A temporary directory with a mount over it; unmounts on drop, even when the test fails.
pub struct Fixture {
    pub mount: Option<Mount>,
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// A fresh temporary directory, prepared by `prepare` before mounting.
    pub fn new(
        mode: Mode,
        exclude: &[&str],
        replicator: Arc<dyn Replicator>,
        prepare: impl FnOnce(&Path),
    ) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("tandem-fs-test")
            .tempdir()
            .unwrap();
        let path = dir.path().canonicalize().unwrap();
        prepare(&path);
        let options = MountOptions {
            mode,
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            ..MountOptions::default()
        };
        let mount = Mount::mount_in_place(&path, options, replicator).expect("mount");
        Fixture {
            mount: Some(mount),
            path,
            dir,
        }
    }

    pub fn mount(&self) -> &Mount {
        self.mount.as_ref().unwrap()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    pub fn unmount(&mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount().expect("unmount");
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
    }
}

/// Whether `path` is a mount point of this process's namespace.
pub fn is_mount_point(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = path.to_str().unwrap().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp == target))
}

/// Everything observable about one tree entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub nlink: u64,
    pub ino: u64,
    pub rdev: u64,
    pub content: Option<Vec<u8>>,
    pub target: Option<PathBuf>,
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
    /// (data, hole) boundaries from SEEK_DATA/SEEK_HOLE for regular files.
    pub extents: Option<Vec<(u64, u64)>>,
}

/// Data extents of a file via SEEK_DATA/SEEK_HOLE.
pub fn extents(path: &Path) -> io::Result<Vec<(u64, u64)>> {
    let f = fs::File::open(path)?;
    let size = f.metadata()?.len();
    Ok(tandem_testkit::extents(&f, size))
}

pub fn entry(path: &Path) -> Entry {
    let md = fs::symlink_metadata(path).unwrap();
    let ft = md.file_type();
    Entry {
        kind: tandem_testkit::kind_name(ft),
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: if ft.is_dir() { 0 } else { md.size() },
        mtime: if ft.is_dir() {
            (0, 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        },
        nlink: md.nlink(),
        ino: md.ino(),
        rdev: md.rdev(),
        content: ft.is_file().then(|| fs::read(path).unwrap()),
        target: ft.is_symlink().then(|| fs::read_link(path).unwrap()),
        xattrs: xattrs(path),
        extents: ft.is_file().then(|| extents(path).unwrap()),
    }
}

/// The whole tree under `root`, keyed by relative path (root itself excluded).
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let e = entry(&p);
            if e.kind == "dir" {
                stack.push(p.clone());
            }
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), e);
        }
    }
    out
}

/// Last OS error of a failed libc call as an errno.
pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn errno_of<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}
