//! Shared by the replica tests: the runs of the fsx-style test (the random operations, the
//! snapshot and comparison of two trees come from `tandem-testkit`, re-exported here).
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_fs::Mount;
pub use tandem_testkit::*;

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

/// The seed from `REPLICA_SEED`, else the clock.
pub fn seed() -> u64 {
    seed_from_env("REPLICA_SEED")
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
    let buf: Arc<Vec<u8>> = Arc::new((0..(2 << 20)).map(|_| r.next_u64() as u8).collect());
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let a = a.to_path_buf();
            let buf = buf.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (i + 1).wrapping_mul(0x1234_5678_9abc_def1));
                let mut counts = Counts::default();
                for _ in 0..total_ops / threads {
                    random_op(&mut rng, &a, &buf, Mix::Replica, &mut counts);
                }
                counts
            })
        })
        .collect();
    let mut counts = Counts::default();
    for w in workers {
        counts.add(w.join().unwrap());
    }
    (counts, started.elapsed())
}

/// Every operation kind succeeded at least once (when tried often enough).
pub fn assert_all_kinds(counts: &Counts, seed: u64) {
    eprintln!("operations (attempted, succeeded): {:?}", counts.ops);
    for (kind, (n, ok)) in &counts.ops {
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
