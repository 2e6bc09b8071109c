//! Full synchronisation over a real loopback [`Connection`]: a rich tree is copied over a target
//! holding junk, then both trees are compared; refusals and failures; and the replication stream
//! that follows a synchronisation on the same connection, driven by a tandem-fs mount.
//!
//! Needs root (chown, mknod, trusted xattrs) and /dev/fuse (the last test).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use tandem_fs::{
    Completion, Exclusions, FileId, LocalOnly, Mode, Mount, MountOptions, Mutation, Outcome,
    Replicator,
};
use tandem_replica::fullsync::{self, SyncError, SyncProgress};
use tandem_replica::transport::{self, Connection};
use tandem_replica::wire::Record;
use tandem_replica::{
    Applier, Lost, NetOptions, NetReplicator, Receiver, ReplicationState, Security, TransportError,
};

fn noise(secret: &str) -> Security {
    Security::Noise {
        secret: secret.as_bytes().to_vec(),
    }
}

fn tempdir(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let p = d.path().canonicalize().unwrap();
    (d, p)
}

fn open_root(dir: &Path) -> OwnedFd {
    rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap()
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// The exclusions of these tests: `*.tmp` at any depth and the top-level `cache`.
fn exclusions() -> Exclusions {
    Exclusions::new(&["**/*.tmp", "cache"]).unwrap()
}

/// Deterministic pseudo-random bytes.
fn noise_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A POSIX ACL (`user::rwx, user:1234:r-x, group::r--, mask::r-x, other::---`) in the kernel's
/// xattr format.
fn acl_bytes(default_perm: u16) -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 7u16, UNDEFINED),
        (2, 5, 1234),
        (4, 4, UNDEFINED),
        (0x10, default_perm, UNDEFINED),
        (0x20, 0, UNDEFINED),
    ] {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// The source tree: every kind of entry, sparse and large files, hard links across directories,
/// symlinks (one dangling), xattrs, ACLs, odd modes and owners, specific times, and excluded
/// entries.
fn rich_tree(p: &Path) {
    let dir = |rel: &str, mode: u32| {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(p.join(rel))
            .unwrap();
        fs::set_permissions(p.join(rel), fs::Permissions::from_mode(mode)).unwrap();
    };
    dir("nested", 0o755);
    dir("nested/a", 0o750);
    dir("nested/a/b", 0o700);
    dir("nested/a/b/c", 0o755);
    dir("shared", 0o2775); // set-group-ID
    dir("public", 0o1777); // sticky
    dir("empty", 0o555);
    dir("acl", 0o770);
    fs::write(p.join("nested/a/b/c/deep.txt"), b"deep\n").unwrap();
    fs::write(p.join("empty-file"), b"").unwrap();
    // Sparse: holes at the start, in the middle and at the end.
    let sparse = File::create(p.join("sparse")).unwrap();
    sparse.write_all_at(&noise_bytes(10, 1), 1 << 20).unwrap();
    sparse
        .write_all_at(&noise_bytes(3 * 4096, 2), 5 << 20)
        .unwrap();
    sparse.set_len(8 << 20).unwrap();
    drop(sparse);
    // Entirely a hole.
    File::create(p.join("all-hole"))
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    // 5 MiB of data (more than one chunk), not a multiple of the chunk size.
    fs::write(p.join("nested/big"), noise_bytes((5 << 20) + 123, 3)).unwrap();
    // Hard links across directories (one in an excluded name: not sent, the others are).
    fs::write(p.join("nested/a/linked"), b"linked contents").unwrap();
    fs::hard_link(p.join("nested/a/linked"), p.join("shared/linked-too")).unwrap();
    fs::hard_link(p.join("nested/a/linked"), p.join("public/third-name")).unwrap();
    fs::hard_link(p.join("nested/a/linked"), p.join("public/excluded.tmp")).unwrap();
    // Symlinks: relative, absolute and dangling, and one to a directory.
    std::os::unix::fs::symlink("nested/a/linked", p.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", p.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../nested", p.join("shared/to-dir")).unwrap();
    // A hard link to a symlink.
    fs::hard_link(p.join("dangling"), p.join("nested/dangling-too")).unwrap();
    // Special files.
    mknod(&p.join("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(
        &p.join("nested/null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    )
    .unwrap();
    mknod(
        &p.join("nested/loop"),
        libc::S_IFBLK | 0o600,
        libc::makedev(7, 200),
    )
    .unwrap();
    mknod(&p.join("socket"), libc::S_IFSOCK | 0o755, 0).unwrap();
    // Extended attributes and ACLs.
    lsetxattr(&p.join("nested/big"), "user.colour", b"blue", 0).unwrap();
    lsetxattr(&p.join("nested/big"), "user.empty", b"", 0).unwrap();
    lsetxattr(&p.join("nested"), "user.dir", b"\x00\x01binary", 0).unwrap();
    lsetxattr(&p.join("dangling"), "trusted.onlink", b"x", 0).unwrap();
    lsetxattr(&p.join("fifo"), "trusted.fifo", b"f", 0).unwrap();
    lsetxattr(
        &p.join("nested/a/linked"),
        "user.big",
        &noise_bytes(3000, 4),
        0,
    )
    .unwrap();
    lsetxattr(&p.join("acl"), "system.posix_acl_default", &acl_bytes(5), 0).unwrap();
    lsetxattr(&p.join("acl"), "system.posix_acl_access", &acl_bytes(7), 0).unwrap();
    // Inherits the default ACL...
    fs::write(p.join("acl/inherited"), b"i").unwrap();
    // ... and this one had its ACL removed afterwards: the target must not keep the inherited one.
    fs::write(p.join("acl/plain"), b"p").unwrap();
    lremovexattr(&p.join("acl/plain"), "system.posix_acl_access").unwrap();
    fs::set_permissions(p.join("acl/plain"), fs::Permissions::from_mode(0o604)).unwrap();
    // Odd modes and owners.
    fs::write(p.join("setuid"), b"#!/bin/true\n").unwrap();
    std::os::unix::fs::chown(p.join("setuid"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(p.join("setuid"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::write(p.join("no-access"), b"secret").unwrap();
    fs::set_permissions(p.join("no-access"), fs::Permissions::from_mode(0o000)).unwrap();
    std::os::unix::fs::chown(p.join("shared"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(p.join("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    std::os::unix::fs::lchown(p.join("link-rel"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::chown(p.join("nested/null"), Some(0), Some(5678)).unwrap();
    // Excluded entries: never sent.
    fs::write(p.join("top.tmp"), b"excluded").unwrap();
    fs::write(p.join("nested/a/scratch.tmp"), b"excluded").unwrap();
    fs::create_dir(p.join("cache")).unwrap();
    fs::write(p.join("cache/blob"), b"excluded").unwrap();
    fs::write(
        p.join("nested/cache"),
        b"not excluded: only the top-level cache is",
    )
    .unwrap();
    // The root.
    lsetxattr(p, "user.root", b"r", 0).unwrap();
    std::os::unix::fs::chown(p, Some(1234), Some(5678)).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(0o2751)).unwrap();
    // Times last, deepest first (creating entries changed the directories' times).
    let mut all = vec![PathBuf::new()];
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap().path();
            if fs::symlink_metadata(&e).unwrap().is_dir() {
                stack.push(e.clone());
            }
            all.push(e.strip_prefix(p).unwrap().to_path_buf());
        }
    }
    all.sort_by_key(|r| std::cmp::Reverse(r.components().count()));
    for (i, rel) in all.iter().enumerate() {
        let i = i as i64;
        utimens(
            &p.join(rel),
            ts(1_500_000_000 + i * 1000, 123_456_789 - i),
            ts(1_600_000_000 + i * 77, 987_654_321 - i),
        )
        .unwrap();
    }
}

/// What the target holds before the copy: junk to remove (files, directories, symlinks pointing
/// outside it, entries where the source has another kind), and excluded entries to keep.
fn junk_tree(p: &Path, outside: &Path) {
    fs::write(outside.join("precious"), b"must survive").unwrap();
    fs::create_dir(outside.join("dir")).unwrap();
    fs::write(outside.join("dir/also-precious"), b"must survive too").unwrap();
    fs::write(p.join("junk"), b"junk").unwrap();
    fs::create_dir_all(p.join("old/deeper/deepest")).unwrap();
    fs::write(p.join("old/deeper/deepest/f"), b"junk").unwrap();
    fs::set_permissions(p.join("old/deeper"), fs::Permissions::from_mode(0o000)).unwrap();
    std::os::unix::fs::symlink(outside.join("precious"), p.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("dir"), p.join("old/escape-dir")).unwrap();
    // Where the source has a file, a directory; where it has a directory, a symlink to outside.
    fs::create_dir(p.join("sparse")).unwrap();
    fs::write(p.join("sparse/inside"), b"junk").unwrap();
    std::os::unix::fs::symlink(outside.join("dir"), p.join("empty")).unwrap();
    // Same names as the source, other contents.
    fs::create_dir_all(p.join("nested/a")).unwrap();
    fs::write(p.join("nested/a/linked"), b"old contents").unwrap();
    lsetxattr(&p.join("nested"), "user.stale", b"s", 0).unwrap();
    lsetxattr(p, "user.stale-root", b"s", 0).unwrap();
    mknod(&p.join("old-fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    // Excluded: kept as they are.
    fs::write(p.join("keep.tmp"), b"kept").unwrap();
    fs::write(p.join("nested/a/keep-too.tmp"), b"kept too").unwrap();
    fs::create_dir_all(p.join("cache/sub")).unwrap();
    fs::write(p.join("cache/sub/kept"), b"kept cache").unwrap();
    std::os::unix::fs::symlink(outside.join("precious"), p.join("cache/link")).unwrap();
}

fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// The primary's side of the port: accepts one stream, consumes the magic (the dispatcher's
/// job), authenticates.
fn accept(listener: &TcpListener, security: &Security) -> Connection {
    let (mut stream, _) = listener.accept().unwrap();
    transport::read_magic(&mut stream).unwrap();
    Connection::accept(stream, security).unwrap()
}

type Received = Result<(fullsync::SyncStats, u64), SyncError>;

/// The secondary's side: dials, asks for a synchronisation of `module`'s directory 0, receives
/// the tree into `dir`. Returns the connection with the result.
fn spawn_secondary(
    addr: SocketAddr,
    security: Security,
    dir: PathBuf,
    exclude: Exclusions,
    progress: Arc<SyncProgress>,
) -> JoinHandle<(Connection, Received)> {
    std::thread::spawn(move || {
        let mut conn = Connection::dial(addr, &security).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        conn.send(&Record::SyncRequest {
            module: "app".into(),
            dir: 0,
        })
        .unwrap();
        let root = open_root(&dir);
        let r = fullsync::receive_tree_with(root.as_fd(), &exclude, &mut conn, &progress);
        (conn, r)
    })
}

/// The primary's side of the request.
fn expect_request(conn: &mut Connection) {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        conn.recv().unwrap(),
        Record::SyncRequest {
            module: "app".into(),
            dir: 0
        }
    );
}

fn full_sync(security: Security) {
    let (_a_dir, a) = tempdir("tandem-sync-a");
    let (_b_dir, b) = tempdir("tandem-sync-b");
    let (_o_dir, outside) = tempdir("tandem-sync-outside");
    rich_tree(&a);
    junk_tree(&b, &outside);
    let exclude = exclusions();
    let atimes_before = atimes(&a, &exclude);
    let (listener, addr) = listen();
    let progress = Arc::new(SyncProgress::default());
    let secondary = spawn_secondary(
        addr,
        security.clone(),
        b.clone(),
        exclude.clone(),
        progress.clone(),
    );
    let mut conn = accept(&listener, &security);
    assert_eq!(conn.encrypted(), matches!(security, Security::Noise { .. }));
    expect_request(&mut conn);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let root = open_root(&a);
    let sent = fullsync::send_tree(root.as_fd(), &exclude, 4242, &mut conn).unwrap();
    let (_conn_b, received) = secondary.join().unwrap();
    let (received, next_seq) = received.unwrap();
    eprintln!("sent {sent:?}; received {received:?}; progress {progress:?}");
    assert_eq!(next_seq, 4242);
    assert_eq!(
        (sent.entries, sent.files, sent.bytes),
        (received.entries, received.files, received.bytes)
    );
    assert_eq!(progress.entries(), received.entries);
    assert_eq!(progress.bytes(), received.bytes);
    // Holes are not sent: the sparse files carry 10 bytes and 3 blocks (rounded to blocks).
    let big = (5u64 << 20) + 123;
    assert!(sent.bytes >= big + 10 + 3 * 4096, "{sent:?}");
    assert!(
        sent.bytes <= big + 4 * 4096 + 3 * 4096 + 100_000,
        "{sent:?}"
    );

    // The access times travelled, and the copy did not change the source's.
    for (side, root) in [("source", &a), ("target", &b)] {
        let now = atimes(root, &exclude);
        let changed: Vec<_> = now
            .iter()
            .filter(|(p, t)| atimes_before.get(*p) != Some(*t))
            .map(|(p, t)| {
                format!(
                    "{}: {t:?} instead of {:?}",
                    p.display(),
                    atimes_before.get(p)
                )
            })
            .collect();
        assert!(
            changed.is_empty() && now.len() == atimes_before.len(),
            "{side} access times:\n{}",
            changed.join("\n")
        );
    }
    // The excluded fourth name of the hard-linked file stays on the source only: drop it there
    // (keeping its directory's times) so that the link counts compare.
    let public = fs::symlink_metadata(a.join("public")).unwrap();
    fs::remove_file(a.join("public/excluded.tmp")).unwrap();
    utimens(
        &a.join("public"),
        ts(public.atime(), public.atime_nsec()),
        ts(public.mtime(), public.mtime_nsec()),
    )
    .unwrap();
    // Identical (contents, holes, modes, owners, mtimes of everything, xattrs and ACLs, symlink
    // targets, device numbers, link counts and structure), apart from excluded entries.
    let (sa, sb) = (
        snapshot_with(&a, true, &|p| exclude.is_excluded(p)),
        snapshot_with(&b, true, &|p| exclude.is_excluded(p)),
    );
    let diff = differences(&sa, &sb);
    assert!(
        diff.is_empty(),
        "{} differences:\n{}",
        diff.len(),
        diff.join("\n")
    );
    let sparse = File::open(b.join("sparse")).unwrap();
    assert_eq!(
        extents(&sparse, 8 << 20),
        vec![(1 << 20, (1 << 20) + 4096), (5 << 20, (5 << 20) + 3 * 4096)],
        "holes at the start, in the middle and at the end"
    );
    assert!(b.join("sparse").metadata().unwrap().blocks() <= 4 * 8);
    assert!(
        extents(&File::open(b.join("all-hole")).unwrap(), 3 << 20).is_empty(),
        "a file that is all hole stays so"
    );
    // Hard links: the excluded name is not there, the three others share one inode.
    let ino = |p: &str| fs::symlink_metadata(b.join(p)).unwrap().ino();
    assert_eq!(ino("nested/a/linked"), ino("shared/linked-too"));
    assert_eq!(ino("nested/a/linked"), ino("public/third-name"));
    assert_eq!(ino("dangling"), ino("nested/dangling-too"));
    assert!(!b.join("public/excluded.tmp").exists());
    assert_eq!(
        fs::read(b.join("nested/a/linked")).unwrap(),
        b"linked contents"
    );
    assert_eq!(
        fs::metadata(b.join("setuid")).unwrap().mode() & 0o7777,
        0o6755,
        "set-ID bits survive the chown"
    );
    assert!(xattrs(&b.join("acl/plain")).is_empty(), "no inherited ACL");
    // Excluded entries of the source were not sent; those of the target were kept.
    assert!(!b.join("top.tmp").exists());
    assert!(!b.join("nested/a/scratch.tmp").exists());
    assert!(!b.join("cache/blob").exists());
    assert_eq!(fs::read(b.join("keep.tmp")).unwrap(), b"kept");
    assert_eq!(
        fs::read(b.join("nested/a/keep-too.tmp")).unwrap(),
        b"kept too"
    );
    assert_eq!(fs::read(b.join("cache/sub/kept")).unwrap(), b"kept cache");
    assert!(
        fs::symlink_metadata(b.join("cache/link"))
            .unwrap()
            .is_symlink()
    );
    // Junk is gone; what its symlinks pointed to is intact.
    for gone in ["junk", "old", "escape", "old-fifo"] {
        assert!(
            fs::symlink_metadata(b.join(gone)).is_err(),
            "{gone} removed"
        );
    }
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"must survive");
    assert_eq!(
        fs::read(outside.join("dir/also-precious")).unwrap(),
        b"must survive too"
    );
    assert!(!xattrs(&b).contains_key(std::ffi::OsStr::new("user.stale-root")));
}

#[test]
fn full_sync_over_noise() {
    full_sync(noise("cluster secret"));
}

#[test]
fn full_sync_over_plaintext() {
    full_sync(Security::Plaintext);
}

#[test]
fn refused_sync_leaves_the_target_untouched() {
    let (_b_dir, b) = tempdir("tandem-sync-b");
    let (_o_dir, outside) = tempdir("tandem-sync-outside");
    junk_tree(&b, &outside);
    let before = snapshot_with(&b, true, &|_| false);
    let security = noise("s");
    let (listener, addr) = listen();
    let secondary = spawn_secondary(
        addr,
        security.clone(),
        b.clone(),
        exclusions(),
        Arc::default(),
    );
    let mut conn = accept(&listener, &security);
    expect_request(&mut conn);
    conn.send(&Record::SyncRefused {
        reason: "not the primary".into(),
    })
    .unwrap();
    let (_conn, r) = secondary.join().unwrap();
    match r {
        Err(SyncError::Refused(reason)) => assert_eq!(reason, "not the primary"),
        other => panic!("{other:?}"),
    }
    let after = snapshot_with(&b, true, &|_| false);
    assert!(differences(&before, &after).is_empty());
}

#[test]
fn secondary_failure_is_reported_to_the_primary() {
    // The secondary excludes what the primary sends: it refuses the entry, and the primary hears
    // its errno.
    let (_a_dir, a) = tempdir("tandem-sync-a");
    let (_b_dir, b) = tempdir("tandem-sync-b");
    fs::create_dir(a.join("d")).unwrap();
    fs::write(a.join("d/f.log"), b"x").unwrap();
    let security = Security::Plaintext;
    let (listener, addr) = listen();
    let secondary = spawn_secondary(
        addr,
        security.clone(),
        b.clone(),
        Exclusions::new(&["**/*.log"]).unwrap(),
        Arc::default(),
    );
    let mut conn = accept(&listener, &security);
    expect_request(&mut conn);
    let root = open_root(&a);
    let err = fullsync::send_tree(root.as_fd(), &Exclusions::default(), 1, &mut conn).unwrap_err();
    let (_conn, r) = secondary.join().unwrap();
    let secondary_err = r.unwrap_err();
    eprintln!("primary: {err}; secondary: {secondary_err}");
    assert!(
        matches!(secondary_err, SyncError::Protocol(_)),
        "{secondary_err:?}"
    );
    assert!(matches!(err, SyncError::Remote(libc::EPROTO)), "{err:?}");
}

#[test]
fn connection_records_and_timeouts() {
    let security = noise("k");
    let (listener, addr) = listen();
    let dialer = {
        let security = security.clone();
        std::thread::spawn(move || {
            let mut c = Connection::dial(addr, &security).unwrap();
            c.send(&Record::SyncRequest {
                module: "m".into(),
                dir: 7,
            })
            .unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let r = c.recv().unwrap();
            (c, r)
        })
    };
    let mut c = accept(&listener, &security);
    assert!(c.peer_addr().ip().is_loopback());
    assert_eq!(
        c.recv().unwrap(),
        Record::SyncRequest {
            module: "m".into(),
            dir: 7
        }
    );
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = Instant::now();
    assert!(matches!(c.recv(), Err(TransportError::RecvTimeout(_))));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Still usable after a timeout.
    c.send(&Record::SyncRefused {
        reason: "no".into(),
    })
    .unwrap();
    let (d, r) = dialer.join().unwrap();
    assert_eq!(
        r,
        Record::SyncRefused {
            reason: "no".into()
        }
    );
    drop(d);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(matches!(c.recv(), Err(TransportError::Closed)));
}

#[test]
fn a_blocked_sync_is_aborted_from_another_thread() {
    let security = Security::Plaintext;
    let (listener, addr) = listen();
    let (_b_dir, b) = tempdir("tandem-sync-b");
    fs::write(b.join("kept"), b"untouched").unwrap();
    let (tx, rx) = mpsc::channel();
    let secondary = std::thread::spawn(move || {
        let mut conn = Connection::dial(addr, &security).unwrap();
        tx.send(conn.abort_handle().unwrap()).unwrap();
        let root = open_root(&b);
        let r = fullsync::receive_tree(root.as_fd(), &Exclusions::default(), &mut conn);
        (r, b)
    });
    // The primary accepts and never answers.
    let _conn = accept(&listener, &Security::Plaintext);
    let abort = rx.recv().unwrap();
    abort.abort();
    let (r, b) = secondary.join().unwrap();
    assert!(
        matches!(r, Err(SyncError::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert_eq!(fs::read(b.join("kept")).unwrap(), b"untouched");
}

#[test]
fn a_connection_without_the_magic_is_refused() {
    let (listener, addr) = listen();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        transport::read_magic(&mut s)
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut s, b"TNDMCTRL").unwrap();
    let r = h.join().unwrap();
    assert!(matches!(r, Err(TransportError::Mismatch(_))), "{r:?}");
}

// ------------------------------------------------------------------ the stream after the sync

/// The mount's replicator, swapped when the replication stream starts (as the daemon does).
struct Switch(RwLock<Arc<dyn Replicator>>);

impl Switch {
    fn set(&self, r: Arc<dyn Replicator>) {
        *self.0.write().unwrap() = r;
    }
    fn get(&self) -> Arc<dyn Replicator> {
        self.0.read().unwrap().clone()
    }
}

impl Replicator for Switch {
    fn submit(&self, mutation: &Mutation<'_>, done: Completion) {
        self.get().submit(mutation, done);
    }
    fn applied(&self, seq: u64, outcome: &Outcome) {
        self.get().applied(seq, outcome);
    }
    fn forget(&self, id: FileId) {
        self.get().forget(id);
    }
}

#[test]
fn replication_continues_after_full_sync_on_the_same_connection() {
    let seed = seed();
    let total_ops = env_u64("REPLICA_OPS").unwrap_or(4_000);
    eprintln!("REPLICA_SEED={seed} REPLICA_OPS={total_ops}");
    watchdog(seed, 300);
    let (_a_dir, a) = tempdir("tandem-sync-a");
    let (_b_dir, b) = tempdir("tandem-sync-b");
    let (_o_dir, outside) = tempdir("tandem-sync-outside");
    populate(&a);
    junk_tree(&b, &outside);

    // The primary runs alone for a while: the stream will not start at seq 1.
    let switch = Arc::new(Switch(RwLock::new(Arc::new(LocalOnly))));
    let options = MountOptions {
        mode: Mode::Primary,
        threads: 4,
        ..MountOptions::default()
    };
    let mut guard = MountGuard(Some(
        Mount::mount_in_place(&a, options, switch.clone()).expect("mount"),
    ));
    fs::write(a.join("alone"), b"written while alone").unwrap();
    fs::create_dir(a.join("alone-dir")).unwrap();
    fs::rename(a.join("f0"), a.join("alone-dir/f0-moved")).unwrap();

    // The secondary dials and asks; the primary freezes its mount, sends, starts the stream.
    let security = noise("cluster");
    let (listener, addr) = listen();
    let secondary = spawn_secondary(
        addr,
        security.clone(),
        b.clone(),
        Exclusions::default(),
        Arc::default(),
    );
    let mut conn = accept(&listener, &security);
    expect_request(&mut conn);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (lost_tx, lost) = mpsc::channel();
    let rep = {
        let mount = guard.0.as_ref().unwrap();
        let frozen = mount.freeze();
        let next_seq = frozen.next_seq();
        assert!(next_seq > 3, "mutations happened before: {next_seq}");
        let stats = fullsync::send_tree(
            mount.backing_dir(),
            &Exclusions::default(),
            next_seq,
            &mut conn,
        )
        .unwrap();
        eprintln!("synchronised at seq {next_seq}: {stats:?}");
        let options = NetOptions::new(security.clone());
        let rep = Arc::new(
            NetReplicator::start(conn, next_seq, options, move |l: &Lost| {
                let _ = lost_tx.send(l.clone());
            })
            .unwrap(),
        );
        assert_eq!(rep.first_seq(), next_seq);
        switch.set(rep.clone());
        drop(frozen);
        rep
    };
    let (conn_b, received) = secondary.join().unwrap();
    let (_, next_seq) = received.unwrap();
    assert_eq!(next_seq, rep.first_seq());
    let mut receiver = Receiver::start(conn_b, Applier::open(&b).unwrap(), next_seq).unwrap();

    // Writes after the synchronisation reach the secondary.
    fs::write(a.join("after"), b"written after the sync").unwrap();
    File::open(a.join("after")).unwrap().sync_all().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rep.stats().in_flight != 0 || !b.join("after").exists() {
        assert!(
            Instant::now() < deadline,
            "not replicated: {:?}",
            rep.stats()
        );
        std::thread::yield_now();
    }
    assert_eq!(
        fs::read(b.join("after")).unwrap(),
        b"written after the sync"
    );
    let (counts, ran) = run_ops(&a, seed, total_ops, 4);
    let mount_stats = guard.0.as_ref().unwrap().stats();
    guard.0.take().unwrap().unmount().expect("unmount");
    let net = rep.stats();
    rep.close();
    let report = receiver.wait();
    eprintln!(
        "{total_ops} operations in {ran:.1?}; mount {mount_stats:?}; net {net:?}; receiver {report:?}"
    );
    assert!(lost.try_recv().is_err(), "no loss reported");
    assert_eq!(rep.state(), ReplicationState::Replicating);
    assert_eq!(net.in_flight, 0, "every mutation acknowledged");
    assert_eq!(report.error, None);
    assert_eq!(report.waiting, 0);
    assert!(
        receiver.divergences().is_empty(),
        "{:#?}",
        receiver.divergences()
    );
    assert_eq!(mount_stats.replication_errors, 0);
    assert_all_kinds(&counts, seed);
    assert_identical(&a, &b, seed);
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"must survive");
}
