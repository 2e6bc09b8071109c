//! Scale (issue 11): the descriptors of a process serving a replicated directory stay bounded
//! however many inodes the kernel knows. A primary mount replicates through the
//! [`LoopbackReplicator`] (wire format, applier) to a copy of its directory in this same process;
//! each of 100,000 files is looked up, changed (`chmod`, replicated: the applier resolves it and
//! keeps it in its table) and read back through the mount, while the process's open descriptors
//! are sampled. Before file handles, each inode the kernel knew held one descriptor in the mount
//! and one or two in the applier. Then the kernel drops its caches: its forgets shrink the
//! mount's table and, through the primary's `Forget`s, the applier's. Needs root and /dev/fuse.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use tandem_fs::{Mode, Mount, MountOptions};
use tandem_replica::LoopbackReplicator;

const FILES: usize = 100_000;
const DIRS: usize = 100;

fn path(root: &Path, i: usize) -> PathBuf {
    root.join(format!("d{}", i % DIRS)).join(format!("f{i}"))
}

/// Resident memory of this process, in bytes.
fn resident() -> usize {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

fn open_descriptors() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn descriptors_stay_bounded_while_100000_inodes_are_known() {
    watchdog(0, 600);
    let a_dir = tempfile::Builder::new()
        .prefix("tandem-scale-a")
        .tempdir()
        .unwrap();
    let b_dir = tempfile::Builder::new()
        .prefix("tandem-scale-b")
        .tempdir()
        .unwrap();
    let (a, b) = (
        a_dir.path().canonicalize().unwrap(),
        b_dir.path().canonicalize().unwrap(),
    );
    for root in [&a, &b] {
        for d in 0..DIRS {
            fs::create_dir(root.join(format!("d{d}"))).unwrap();
        }
        for i in 0..FILES {
            fs::write(path(root, i), i.to_le_bytes()).unwrap();
        }
    }
    let before = open_descriptors();
    let memory_before = resident();
    let rep = Arc::new(LoopbackReplicator::open(&b).unwrap());
    let options = MountOptions {
        mode: Mode::Primary,
        threads: 2,
        ..MountOptions::default()
    };
    let mut guard = MountGuard(Some(
        Mount::mount_in_place(&a, options, rep.clone()).unwrap(),
    ));
    // The mount itself (FUSE device per thread, the backing root, the watchdog pipe) and the
    // applier's root: a few dozen at most.
    let fixed = open_descriptors() - before;
    let mount = || guard.0.as_ref().unwrap();
    let bound = before
        + fixed
        + mount().stats().cached_descriptors_max
        + rep.applier().cache_stats().capacity * 2
        + 64;

    let mut peak = 0;
    for i in 0..FILES {
        let file = path(&a, i);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(fs::read(&file).unwrap(), i.to_le_bytes());
        if i % 5_000 == 0 {
            peak = peak.max(open_descriptors());
        }
    }
    rep.flush();
    let stats = mount().stats();
    let cache = rep.applier().cache_stats();
    let per_inode = resident().saturating_sub(memory_before) / stats.inodes.max(1);
    eprintln!(
        "{FILES} files: peak {peak} descriptors (before the mount {before}, bound {bound}); \
         {per_inode} bytes of resident memory per inode (mount and applier tables together); \
         mount {stats:?}; applier table {} files, cache {cache:?}",
        rep.applier().table_len()
    );
    assert!(
        stats.inodes > FILES / 2,
        "the kernel should still know most inodes: {stats:?}"
    );
    assert!(
        rep.applier().table_len() >= FILES,
        "every file is in the applier's table"
    );
    assert!(peak <= bound, "{peak} descriptors open, bound {bound}");
    assert!(
        stats.reopened > 0 && cache.evictions > 0,
        "the caches were exercised"
    );

    // The kernel forgets (cache drop): the mount's table shrinks, and with the primary's
    // forgets, the applier's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        rep.flush();
        let (inodes, table) = (mount().stats().inodes, rep.applier().table_len());
        if inodes < FILES / 10 && table < FILES / 10 {
            eprintln!("after the kernel forgot: mount {inodes} inodes, applier {table} files");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tables did not shrink: mount {inodes} inodes, applier {table} files"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    guard.0.take().unwrap().unmount().unwrap();
    assert!(
        rep.divergences().is_empty(),
        "{:?}",
        &rep.divergences()[..1]
    );
    for i in 0..FILES {
        let mode = fs::metadata(path(&b, i)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{}", path(&b, i).display());
    }
    drop(rep);
    assert_eq!(
        open_descriptors(),
        before,
        "every descriptor is closed again"
    );
}
