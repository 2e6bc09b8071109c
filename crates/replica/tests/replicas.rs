//! Identical replicas after random operations (issue 4's fsx-style acceptance, in process).
//!
//! A tree is created in directory A and copied to B (`cp -a`); A is mounted with tandem-fs in
//! primary mode, replicating through the [`LoopbackReplicator`] (wire format, applier) to B.
//! Several threads run a seeded random mix of every mutating operation through the mount; then
//! A and B are compared: file types, contents, holes, modes, owners, mtimes (ns), xattrs and
//! ACLs, symlink targets, device numbers, link counts and hard-link structure.
//!
//! `REPLICA_SEED` and `REPLICA_OPS` (total operations) override the seed and the length; the
//! seed is printed. Needs root and /dev/fuse.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use tandem_fs::{Mode, Mount, MountOptions};
use tandem_replica::LoopbackReplicator;

#[test]
fn replicas_are_identical_after_random_operations() {
    let seed = seed();
    let total_ops = env_u64("REPLICA_OPS").unwrap_or(50_000);
    let threads = 4u64;
    eprintln!("REPLICA_SEED={seed} REPLICA_OPS={total_ops}");
    // A hang (a lost completion, a deadlock) must not stall the suite: report the seed and stop
    // (the mount's watchdog process detaches the mount of a dead test).
    watchdog(seed, 300);
    let (_a_dir, _b_dir, a, b) = trees();

    let rep = Arc::new(LoopbackReplicator::open(&b).unwrap());
    let options = MountOptions {
        mode: Mode::Primary,
        threads: 4,
        ..MountOptions::default()
    };
    let mut guard = MountGuard(Some(
        Mount::mount_in_place(&a, options, rep.clone()).expect("mount"),
    ));

    let (counts, ran) = run_ops(&a, seed, total_ops, threads);
    let mount_stats = guard.0.as_ref().unwrap().stats();
    guard.0.take().unwrap().unmount().expect("unmount");
    rep.flush();
    let stats = rep.stats();
    eprintln!(
        "{total_ops} operations in {ran:.1?} (seed {seed}); mount {mount_stats:?}; loopback {stats:?}"
    );

    let divergences = rep.divergences();
    assert!(
        divergences.is_empty(),
        "seed {seed}: {} divergences, first: {:#?}",
        divergences.len(),
        &divergences[..divergences.len().min(5)]
    );
    assert_eq!(mount_stats.replication_errors, 0, "seed {seed}");
    assert_eq!(
        rep.applier().pending_len(),
        0,
        "every outcome was processed"
    );
    eprintln!("applier table: {} files", rep.applier().table_len());
    assert_all_kinds(&counts, seed);
    assert_identical(&a, &b, seed);
}
