//! Mount tests: run as root with /dev/fuse. Every test unmounts in a Drop guard.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tandem_fs::{LocalOnly, Mode, Mount, MountOptions, Op, SyncMode, Timestamp};

fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> std::io::Result<()> {
    let c = cstr(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid C string and array of two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mkfifo(p: &Path, mode: u32) -> std::io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFIFO | mode, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A tree with every kind of inode, hard links, xattrs and a sparse file.
fn populate(p: &Path) {
    fs::create_dir_all(p.join("dir/sub")).unwrap();
    fs::create_dir(p.join("empty")).unwrap();
    fs::write(p.join("dir/file.txt"), b"some text\n").unwrap();
    fs::write(p.join("dir/sub/deep"), vec![7u8; 300_000]).unwrap();
    fs::write(p.join("name with spaces é"), b"utf8").unwrap();
    symlink("dir/file.txt", p.join("rel-link")).unwrap();
    symlink("/nonexistent/target", p.join("dangling")).unwrap();
    fs::hard_link(p.join("dir/file.txt"), p.join("hard")).unwrap();
    lsetxattr(&p.join("dir/file.txt"), "user.colour", b"blue", 0).unwrap();
    lsetxattr(&p.join("dir"), "user.dirattr", b"\x00\x01binary", 0).unwrap();
    lsetxattr(&p.join("rel-link"), "trusted.onlink", b"x", 0).unwrap();
    mkfifo(&p.join("fifo"), 0o640).unwrap();
    let sparse = File::create(p.join("sparse")).unwrap();
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(b"tail", 10 << 20).unwrap();
    drop(sparse);
    fs::write(p.join("owned"), b"o").unwrap();
    std::os::unix::fs::chown(p.join("owned"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(p.join("owned"), fs::Permissions::from_mode(0o4751)).unwrap();
    utimens(
        &p.join("owned"),
        (1_000_000_000, 111_111_111),
        (1_200_000_000, 987_654_321),
    )
    .unwrap();
}

#[test]
fn existing_tree_is_served_identically_and_left_plain() {
    let mut before = None;
    let mut fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |p| {
        populate(p);
        before = Some(snapshot(p));
    });
    let before = before.unwrap();
    assert!(is_mount_point(&fx.path));
    let through = snapshot(&fx.path);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        through.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        assert_eq!(v, &through[k], "{}", k.display());
    }
    // Sparse file: the hole is visible through the mount.
    let ext = extents(&fx.p("sparse")).unwrap();
    assert_eq!(ext.len(), 2, "{ext:?}");
    assert!(ext[0].1 <= 1 << 20 && ext[1].0 >= 9 << 20, "{ext:?}");
    // Hard links are one inode through the mount too.
    assert_eq!(
        fs::metadata(fx.p("hard")).unwrap().ino(),
        fs::metadata(fx.p("dir/file.txt")).unwrap().ino()
    );

    // Write through the mount, then unmount: the plain directory holds exactly that.
    fs::write(fx.p("dir/new"), b"written through the mount").unwrap();
    fs::remove_file(fx.p("name with spaces é")).unwrap();
    let mut expected = snapshot(&fx.path);
    fx.unmount();
    assert!(!is_mount_point(&fx.path));
    let after = snapshot(&fx.path);
    // Directory mtimes were changed by the writes; compare everything else exactly.
    for e in expected.values_mut() {
        if e.kind == "dir" {
            e.mtime = (0, 0);
        }
    }
    let mut after2 = after.clone();
    for e in after2.values_mut() {
        if e.kind == "dir" {
            e.mtime = (0, 0);
        }
    }
    assert_eq!(expected, after2);
    assert_eq!(
        fs::read(fx.p("dir/new")).unwrap(),
        b"written through the mount"
    );
    assert!(!fx.p("name with spaces é").exists());
    // Nothing hidden was left behind.
    let mut names: Vec<_> = fs::read_dir(&fx.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut want: Vec<_> = before
        .keys()
        .filter(|k| k.components().count() == 1)
        .map(|k| k.as_os_str().to_owned())
        .filter(|n| n != "name with spaces é")
        .collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn refuses_to_mount_twice() {
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |_| {});
    let err = Mount::mount_in_place(&fx.path, MountOptions::default(), Arc::new(LocalOnly))
        .expect_err("second mount");
    assert!(
        matches!(err, tandem_fs::FsError::AlreadyMounted(_)),
        "{err}"
    );
}

#[test]
fn every_mutation_goes_through_the_replicator_once() {
    let rec = Arc::new(Recorder::default());
    let fx = Fixture::new(Mode::Primary, &["scratch", "**/*.tmp"], rec.clone(), |p| {
        fs::create_dir(p.join("d")).unwrap();
        fs::create_dir(p.join("scratch")).unwrap();
        fs::create_dir(p.join("e")).unwrap();
        fs::write(p.join("f"), b"0123456789").unwrap();
    });
    let root_id = rec.take();
    assert!(root_id.is_empty(), "mounting mutated nothing");
    let one = |what: &str| {
        let mut log = rec.take();
        assert_eq!(log.len(), 1, "{what}: {log:#?}");
        let m = log.remove(0);
        assert!(m.replicate, "{what}");
        m
    };

    // create + write
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(fx.p("new"))
        .unwrap();
    let m = one("create");
    match &m.op {
        Op::Create {
            entry, mode, owner, ..
        } => {
            assert_eq!(entry.name, OsStr::new("new"));
            assert_eq!(entry.path.as_deref(), Some(Path::new("new")));
            assert_eq!(entry.parent.nodeid, 1);
            assert_eq!(mode & 0o777, 0o644);
            assert_eq!((owner.uid, owner.gid), (0, 0));
        }
        other => panic!("{other:?}"),
    }
    f.write_all(b"abc").unwrap();
    let m = one("write");
    let new_id = match &m.op {
        Op::Write {
            node,
            offset,
            data,
            sync,
            ..
        } => {
            assert_eq!(
                (*offset, data.as_ref(), *sync),
                (0, &b"abc"[..], SyncMode::None)
            );
            assert_eq!(node.path.as_deref(), Some(Path::new("new")));
            assert_eq!(node.nodeid, fs::metadata(fx.p("new")).unwrap().ino());
            node.id
        }
        other => panic!("{other:?}"),
    };
    f.write_all_at(b"xyz", 10000).unwrap();
    assert!(matches!(one("pwrite").op, Op::Write { offset: 10000, .. }));
    // The outcome of the write carries the attributes after it.
    let (_, outcome) = rec.outcomes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(outcome.error, None);
    assert_eq!(outcome.written, Some(3));
    assert_eq!(outcome.attr.unwrap().size, 10003);
    assert_eq!(outcome.attr.unwrap().id, new_id);

    // truncate through the handle, then by path
    f.set_len(5000).unwrap();
    match one("ftruncate").op {
        Op::SetAttr {
            size,
            fh,
            mode,
            uid,
            ..
        } => {
            assert_eq!(size, Some(5000));
            assert!(fh.is_some());
            assert_eq!((mode, uid), (None, None));
        }
        other => panic!("{other:?}"),
    }
    let c = cstr(&fx.p("new"));
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 4096 * 3) }, 0);
    assert!(matches!(
        one("truncate").op,
        Op::SetAttr {
            size: Some(12288),
            ..
        }
    ));

    // fallocate: allocate, punch a hole, zero a range
    let g = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.p("new"))
        .unwrap();
    g.write_all_at(&[1u8; 12288], 0).unwrap();
    one("fill");
    fallocate(&g, 0, 0, 16384).unwrap();
    assert!(matches!(
        one("fallocate").op,
        Op::Fallocate {
            mode: 0,
            offset: 0,
            len: 16384,
            ..
        }
    ));
    fallocate(
        &g,
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
        4096,
        4096,
    )
    .unwrap();
    assert!(matches!(
        one("punch").op,
        Op::Fallocate {
            mode: 3,
            offset: 4096,
            len: 4096,
            ..
        }
    ));
    let mut buf = vec![9u8; 12288];
    g.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|b| *b == 1));
    assert!(buf[4096..8192].iter().all(|b| *b == 0));
    assert!(buf[8192..].iter().all(|b| *b == 1));
    // The hole is a real hole, seen through the mount and in the backing file.
    assert_eq!(extents(&fx.p("new")).unwrap()[0], (0, 4096));
    match fallocate(&g, libc::FALLOC_FL_ZERO_RANGE, 8192, 4096) {
        Ok(()) => {
            assert!(matches!(
                one("zero range").op,
                Op::Fallocate { mode: 0x10, .. }
            ));
            g.read_exact_at(&mut buf[..4096], 8192).unwrap();
            assert!(buf[..4096].iter().all(|b| *b == 0));
        }
        // Older kernels refuse ZERO_RANGE on FUSE before asking the filesystem.
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
            assert!(rec.take().is_empty());
        }
    }

    // fsync / fdatasync of a file and of a directory
    g.sync_all().unwrap();
    assert!(matches!(
        one("fsync").op,
        Op::Fsync {
            datasync: false,
            ..
        }
    ));
    g.sync_data().unwrap();
    assert!(matches!(
        one("fdatasync").op,
        Op::Fsync { datasync: true, .. }
    ));
    File::open(fx.p("d")).unwrap().sync_all().unwrap();
    match one("fsync dir").op {
        Op::Fsync { node, .. } => assert_eq!(node.path.as_deref(), Some(Path::new("d"))),
        other => panic!("{other:?}"),
    }
    drop((f, g));

    // O_SYNC and O_DSYNC writes carry their durability
    let s = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(fx.p("new"))
        .unwrap();
    s.write_all_at(b"s", 0).unwrap();
    assert!(matches!(
        one("O_SYNC").op,
        Op::Write {
            sync: SyncMode::Full,
            ..
        }
    ));
    let s = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(fx.p("new"))
        .unwrap();
    s.write_all_at(b"s", 0).unwrap();
    assert!(matches!(
        one("O_DSYNC").op,
        Op::Write {
            sync: SyncMode::Data,
            ..
        }
    ));
    drop(s);

    // chmod, chown, utimens with nanoseconds, utimens now
    fs::set_permissions(fx.p("new"), fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        one("chmod").op,
        Op::SetAttr {
            mode: Some(0o640),
            uid: None,
            ..
        }
    ));
    std::os::unix::fs::chown(fx.p("new"), Some(1000), Some(1001)).unwrap();
    assert!(matches!(
        one("chown").op,
        Op::SetAttr {
            uid: Some(1000),
            gid: Some(1001),
            ..
        }
    ));
    utimens(
        &fx.p("new"),
        (1_500_000_000, 123_456_789),
        (1_600_000_000, 987_654_321),
    )
    .unwrap();
    match one("utimens").op {
        Op::SetAttr { atime, mtime, .. } => {
            assert_eq!(
                atime,
                Some(Timestamp {
                    sec: 1_500_000_000,
                    nsec: 123_456_789
                })
            );
            assert_eq!(
                mtime,
                Some(Timestamp {
                    sec: 1_600_000_000,
                    nsec: 987_654_321
                })
            );
        }
        other => panic!("{other:?}"),
    }
    let md = fs::metadata(fx.p("new")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 987_654_321));
    assert_eq!((md.atime(), md.atime_nsec()), (1_500_000_000, 123_456_789));
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (1000, 1001, 0o640)
    );
    utimens(&fx.p("new"), (0, libc::UTIME_NOW), (0, libc::UTIME_NOW)).unwrap();
    match one("utimens now").op {
        // "now" is resolved once, so both nodes store the same instant.
        Op::SetAttr {
            atime: Some(a),
            mtime: Some(m),
            ..
        } => {
            assert_eq!(a, m);
            assert_eq!(fs::metadata(fx.p("new")).unwrap().mtime(), m.sec);
        }
        other => panic!("{other:?}"),
    }

    // mkdir, mknod, symlink, link
    fs::DirBuilder::new()
        .mode(0o750)
        .create(fx.p("d2"))
        .unwrap();
    match one("mkdir").op {
        Op::Mkdir { entry, mode, .. } => {
            assert_eq!(entry.path.as_deref(), Some(Path::new("d2")));
            assert_eq!(mode & 0o777, 0o750);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::metadata(fx.p("d2")).unwrap().mode() & 0o7777, 0o750);
    mkfifo(&fx.p("d2/p"), 0o600).unwrap();
    match one("mknod").op {
        Op::Mknod { entry, mode, .. } => {
            assert_eq!(entry.path.as_deref(), Some(Path::new("d2/p")));
            assert_eq!(mode & libc::S_IFMT, libc::S_IFIFO);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        fs::symlink_metadata(fx.p("d2/p"))
            .unwrap()
            .file_type()
            .is_fifo_like()
    );
    symlink("../f", fx.p("d2/l")).unwrap();
    match one("symlink").op {
        Op::Symlink { entry, target, .. } => {
            assert_eq!(entry.path.as_deref(), Some(Path::new("d2/l")));
            assert_eq!(target.as_ref(), Path::new("../f"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read(fx.p("d2/l")).unwrap(), b"0123456789");
    fs::hard_link(fx.p("new"), fx.p("d2/hard")).unwrap();
    match one("link").op {
        Op::Link { node, new } => {
            assert_eq!(node.id, new_id);
            assert_eq!(new.path.as_deref(), Some(Path::new("d2/hard")));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::metadata(fx.p("new")).unwrap().nlink(), 2);

    // rename: plain, NOREPLACE (fails), EXCHANGE
    rename2(&fx.p("d2/hard"), &fx.p("d2/hard2"), 0).unwrap();
    match one("rename").op {
        Op::Rename {
            from,
            to,
            flags,
            moved,
            replaced,
        } => {
            assert_eq!(from.path.as_deref(), Some(Path::new("d2/hard")));
            assert_eq!(to.path.as_deref(), Some(Path::new("d2/hard2")));
            assert_eq!((flags, moved, replaced), (0, Some(new_id), None));
        }
        other => panic!("{other:?}"),
    }
    // NOREPLACE onto an existing name is refused by the VFS before asking us: no mutation.
    let err = rename2(&fx.p("d2/hard2"), &fx.p("f"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert!(rec.take().is_empty());
    rename2(&fx.p("d2/hard2"), &fx.p("d2/hard3"), libc::RENAME_NOREPLACE).unwrap();
    assert!(matches!(
        one("rename noreplace").op,
        Op::Rename {
            flags: libc::RENAME_NOREPLACE,
            ..
        }
    ));
    rename2(&fx.p("d2/hard3"), &fx.p("d2/hard2"), 0).unwrap();
    one("rename back");
    // A mutation that fails locally is still submitted once, and its outcome carries the errno.
    let err = fs::remove_dir(fx.p("d2")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    let m = one("rmdir not empty");
    assert!(matches!(m.op, Op::Rmdir { .. }));
    let (seq, outcome) = rec.outcomes.lock().unwrap().last().cloned().unwrap();
    assert_eq!((seq, outcome.error), (m.seq, Some(libc::ENOTEMPTY)));
    rename2(&fx.p("f"), &fx.p("d2/hard2"), libc::RENAME_EXCHANGE).unwrap();
    assert!(matches!(
        one("exchange").op,
        Op::Rename {
            flags: libc::RENAME_EXCHANGE,
            replaced: Some(_),
            ..
        }
    ));
    assert_eq!(fs::read(fx.p("d2/hard2")).unwrap(), b"0123456789");
    assert_eq!(fs::metadata(fx.p("f")).unwrap().ino(), new_id.ino);
    // After the exchange the inode's known path follows it.
    fs::OpenOptions::new()
        .append(true)
        .open(fx.p("f"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    match one("append").op {
        Op::Write { node, .. } => assert_eq!(node.path.as_deref(), Some(Path::new("f"))),
        other => panic!("{other:?}"),
    }

    // xattrs, including a POSIX ACL
    lsetxattr(&fx.p("f"), "user.k", b"v", 0).unwrap();
    match one("setxattr").op {
        Op::SetXattr { name, value, .. } => {
            assert_eq!((&*name, &*value), (OsStr::new("user.k"), &b"v"[..]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        xattrs(&fx.p("f"))
            .get(OsStr::new("user.k"))
            .map(|v| v.as_slice()),
        Some(&b"v"[..])
    );
    lremovexattr(&fx.p("f"), "user.k").unwrap();
    assert!(matches!(one("removexattr").op, Op::RemoveXattr { .. }));
    // user::rw- user:1000:r-- group::r-- mask::r-- other::---
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    lsetxattr(&fx.p("f"), "system.posix_acl_access", &acl, 0).unwrap();
    let acl_ops = rec.take();
    assert!(
        !acl_ops.is_empty()
            && acl_ops.iter().all(|m| matches!(&m.op,
        Op::SetXattr { name, .. } if **name == *OsStr::new("system.posix_acl_access"))
                || matches!(m.op, Op::SetAttr { .. })),
        "{acl_ops:#?}"
    );
    assert_eq!(
        xattrs(&fx.p("f")).get(OsStr::new("system.posix_acl_access")),
        Some(&acl)
    );
    assert_eq!(fs::metadata(fx.p("f")).unwrap().mode() & 0o777, 0o640);

    // unlink, rmdir
    fs::remove_file(fx.p("d2/hard2")).unwrap();
    match one("unlink").op {
        Op::Unlink { entry, target } => {
            assert_eq!(entry.path.as_deref(), Some(Path::new("d2/hard2")));
            assert!(target.is_some());
        }
        other => panic!("{other:?}"),
    }
    fs::remove_dir(fx.p("e")).unwrap();
    assert!(matches!(one("rmdir").op, Op::Rmdir { .. }));

    // Excluded paths are served but flagged not to replicate.
    fs::write(fx.p("scratch/x"), b"local only").unwrap();
    let log = rec.take();
    assert_eq!(
        log.iter().map(|m| m.kind()).collect::<Vec<_>>(),
        ["create", "write"]
    );
    assert!(log.iter().all(|m| !m.replicate), "{log:#?}");
    fs::write(fx.p("d/a.tmp"), b"t").unwrap();
    let log = rec.take();
    assert!(log.iter().all(|m| !m.replicate), "{log:#?}");
    fs::rename(fx.p("d/a.tmp"), fx.p("d/a.dat")).unwrap();
    match one("rename out of exclusion").op {
        Op::Rename { from, to, .. } => assert!(from.excluded && !to.excluded),
        other => panic!("{other:?}"),
    }
    // Sequence numbers increase; every mutation got exactly one outcome.
    let outcomes = rec.outcomes.lock().unwrap();
    assert!(outcomes.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(fx.mount().stats().in_flight, 0);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn new_inodes_get_the_callers_owner_and_umask() {
    use std::os::unix::process::CommandExt;
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |p| {
        fs::set_permissions(p, fs::Permissions::from_mode(0o777)).unwrap();
        fs::create_dir(p.join("sgid")).unwrap();
        std::os::unix::fs::chown(p.join("sgid"), Some(0), Some(4242)).unwrap();
        fs::set_permissions(p.join("sgid"), fs::Permissions::from_mode(0o2777)).unwrap();
    });
    let script = format!(
        "umask 027; cd {} && echo x > f && mkdir d && ln -s f l && mkfifo p && echo y > sgid/g",
        fx.path.display()
    );
    let st = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .uid(1000)
        .gid(1000)
        .status()
        .unwrap();
    assert!(st.success());
    let check = |name: &str, mode: u32, gid: u32| {
        let md = fs::symlink_metadata(fx.p(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (1000, gid), "{name}");
        if mode != 0 {
            assert_eq!(md.mode() & 0o7777, mode, "{name}");
        }
    };
    check("f", 0o640, 1000);
    check("d", 0o750, 1000);
    check("l", 0, 1000);
    check("p", 0o640, 1000);
    check("sgid/g", 0o640, 4242);
}

#[test]
fn default_acl_wins_over_umask() {
    // A directory with a default ACL: new files get it, the umask does not apply.
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |p| {
        fs::create_dir(p.join("acl")).unwrap();
        // default: user::rwx group::rwx other::rwx
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm) in [(1u16, 7u16), (4, 7), (0x20, 7)] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        lsetxattr(&p.join("acl"), "system.posix_acl_default", &acl, 0).unwrap();
    });
    // In a child process: the umask is process-wide and other tests may run in this one.
    let st = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "umask 077; cd {} && mkdir acl/sub plain",
            fx.path.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(fs::metadata(fx.p("acl/sub")).unwrap().mode() & 0o777, 0o777);
    assert_eq!(fs::metadata(fx.p("plain")).unwrap().mode() & 0o777, 0o700);
}

/// Every mutating call must fail with EROFS.
fn assert_all_mutations_fail(fx: &Fixture, errno: i32) {
    let e = |r: std::io::Result<()>, what: &str| {
        assert_eq!(errno_of(r), errno, "{what}");
    };
    e(
        OpenOptions::new().write(true).open(fx.p("a")).map(drop),
        "open O_WRONLY",
    );
    e(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(fx.p("a"))
            .map(drop),
        "open O_RDWR",
    );
    e(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(fx.p("a"))
            .map(drop),
        "open O_TRUNC",
    );
    e(File::create(fx.p("newfile")).map(drop), "creat");
    e(fs::create_dir(fx.p("newdir")), "mkdir");
    e(mkfifo(&fx.p("newfifo"), 0o644), "mknod");
    e(symlink("a", fx.p("newlink")), "symlink");
    e(fs::hard_link(fx.p("a"), fx.p("newhard")), "link");
    e(fs::remove_file(fx.p("a")), "unlink");
    e(fs::remove_dir(fx.p("sub")), "rmdir");
    e(fs::rename(fx.p("a"), fx.p("b")), "rename");
    e(
        rename2(&fx.p("a"), &fx.p("sub"), libc::RENAME_EXCHANGE),
        "exchange",
    );
    e(
        fs::set_permissions(fx.p("a"), fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    e(
        std::os::unix::fs::chown(fx.p("a"), Some(1), Some(1)),
        "chown",
    );
    e(utimens(&fx.p("a"), (1, 0), (1, 0)), "utimens");
    let c = cstr(&fx.p("a"));
    // SAFETY: valid C string.
    let r = unsafe { libc::truncate(c.as_ptr(), 0) };
    assert_eq!((r, last_errno()), (-1, errno), "truncate");
    e(lsetxattr(&fx.p("a"), "user.x", b"1", 0), "setxattr");
    e(lremovexattr(&fx.p("a"), "user.keep"), "removexattr");
}

#[test]
fn secondary_is_read_only_and_sees_the_applier() {
    let rec = Arc::new(Recorder::default());
    let fx = Fixture::new(Mode::Secondary, &[], rec.clone(), |p| {
        fs::write(p.join("a"), b"version 1").unwrap();
        lsetxattr(&p.join("a"), "user.keep", b"k", 0).unwrap();
        fs::create_dir(p.join("sub")).unwrap();
        symlink("a", p.join("link")).unwrap();
    });
    assert_all_mutations_fail(&fx, libc::EROFS);
    assert!(rec.take().is_empty(), "nothing reached the replicator");

    // Reads work.
    assert_eq!(fs::read(fx.p("a")).unwrap(), b"version 1");
    assert_eq!(fs::read_link(fx.p("link")).unwrap(), Path::new("a"));
    assert_eq!(
        xattrs(&fx.p("a")).get(OsStr::new("user.keep")).unwrap(),
        b"k"
    );
    let mut names: Vec<_> = fs::read_dir(&fx.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "link", "sub"]);
    let mut held = File::open(fx.p("a")).unwrap();
    // fsync of a reader is harmless on the secondary.
    held.sync_all().unwrap();

    // The applier writes through the backing handle; local readers see it at once.
    let backing = fx.mount().backing_dir().as_raw_fd();
    let at = |name: &str, flags: i32| {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid dir fd and C string.
        let fd = unsafe { libc::openat(backing, c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
        assert!(
            fd >= 0,
            "openat {name}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just opened and is owned here.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    };
    at("a", libc::O_WRONLY)
        .write_all_at(b"VERSION 2 longer", 0)
        .unwrap();
    assert_eq!(fs::read(fx.p("a")).unwrap(), b"VERSION 2 longer");
    let mut s = String::new();
    held.seek(SeekFrom::Start(0)).unwrap();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(
        s, "VERSION 2 longer",
        "an already open reader sees the new data"
    );
    assert_eq!(fs::metadata(fx.p("a")).unwrap().len(), 16);
    at("created", libc::O_WRONLY | libc::O_CREAT)
        .write_all(b"new file")
        .unwrap();
    assert_eq!(fs::read(fx.p("created")).unwrap(), b"new file");
    let c1 = std::ffi::CString::new("created").unwrap();
    let c2 = std::ffi::CString::new("renamed").unwrap();
    // SAFETY: valid dir fds and C strings.
    let r = unsafe { libc::renameat(backing, c1.as_ptr(), backing, c2.as_ptr()) };
    assert_eq!(r, 0);
    assert!(!fx.p("created").exists());
    assert_eq!(fs::read(fx.p("renamed")).unwrap(), b"new file");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fchmodat(backing, c2.as_ptr(), 0o600, 0) }, 0);
    assert_eq!(fs::metadata(fx.p("renamed")).unwrap().mode() & 0o777, 0o600);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::unlinkat(backing, c2.as_ptr(), 0) }, 0);
    assert!(!fx.p("renamed").exists());
}

#[test]
fn switching_modes_without_unmounting() {
    let rec = Arc::new(Recorder::default());
    let fx = Fixture::new(Mode::Secondary, &[], rec.clone(), |p| {
        fs::write(p.join("a"), b"v1").unwrap();
        fs::create_dir(p.join("sub")).unwrap();
    });
    // A reader opened on the secondary (passthrough) stays open across the failover.
    let reader = File::open(fx.p("a")).unwrap();
    assert_eq!(errno_of(fs::write(fx.p("b"), b"x")), libc::EROFS);

    fx.mount().set_mode(Mode::Primary);
    assert_eq!(fx.mount().mode(), Mode::Primary);
    // A writer on an inode with a passthrough reader is forced to passthrough + direct I/O:
    // its writes still go through the replicator, and the reader sees them.
    let w = OpenOptions::new().write(true).open(fx.p("a")).unwrap();
    w.write_all_at(b"v2", 0).unwrap();
    assert_eq!(rec.kinds(), ["write"]);
    let mut buf = [0u8; 2];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"v2");
    drop((w, reader));
    rec.take();
    fs::write(fx.p("b"), b"x").unwrap();
    assert_eq!(rec.kinds(), ["create", "write"]);

    // Fenced: the same mutations fail, open files stay readable.
    let keep = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.p("b"))
        .unwrap();
    fx.mount().set_mode(Mode::Fenced);
    assert_eq!(errno_of(keep.write_all_at(b"y", 0)), libc::EROFS);
    assert_eq!(errno_of(fs::create_dir(fx.p("d"))), libc::EROFS);
    assert_eq!(errno_of(keep.sync_all()), libc::EROFS);
    let mut s = [0u8; 1];
    keep.read_exact_at(&mut s, 0).unwrap();
    assert_eq!(&s, b"x");
    fx.mount().set_mode(Mode::Primary);
    keep.write_all_at(b"y", 0).unwrap();
    drop(keep);

    // And back to secondary (a demotion).
    fx.mount().set_mode(Mode::Secondary);
    assert_all_mutations_fail(&fx, libc::EROFS);
    assert_eq!(fs::read(fx.p("b")).unwrap(), b"y");
}

/// Completes each mutation from another thread after a delay, optionally with an error.
struct Delayed {
    delay: Duration,
    fail: bool,
}

impl tandem_fs::Replicator for Delayed {
    fn submit(&self, m: &tandem_fs::Mutation<'_>, done: tandem_fs::Completion) {
        let delay = self.delay;
        let fail = self.fail && m.kind() == "write";
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            done.complete(if fail {
                Err(tandem_fs::ReplicationError::Failed("peer said no".into()))
            } else {
                Ok(())
            });
        });
    }
}

#[test]
fn asynchronous_completion_holds_the_call() {
    let delay = Duration::from_millis(300);
    let fx = Fixture::new(
        Mode::Primary,
        &[],
        Arc::new(Delayed { delay, fail: false }),
        |p| {
            fs::write(p.join("x"), b"").unwrap();
            fs::write(p.join("y"), b"").unwrap();
        },
    );
    let f = OpenOptions::new().write(true).open(fx.p("x")).unwrap();
    let t = Instant::now();
    f.write_all_at(&[5u8; 4096], 0).unwrap();
    assert!(
        t.elapsed() >= delay,
        "write returned after {:?}",
        t.elapsed()
    );
    // Two writers on different files are in flight at the same time.
    let t = Instant::now();
    let threads: Vec<_> = ["x", "y"]
        .into_iter()
        .map(|n| {
            let p = fx.p(n);
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(&[1u8; 1024], 0).unwrap();
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let el = t.elapsed();
    // Each thread: open (no mutation) + one write = one delay; serialised would be two.
    assert!(
        el >= delay && el < delay * 2 - Duration::from_millis(50),
        "{el:?}"
    );
}

#[test]
fn replication_error_fails_the_call_but_keeps_the_local_write() {
    let fx = Fixture::new(
        Mode::Primary,
        &[],
        Arc::new(Delayed {
            delay: Duration::from_millis(20),
            fail: true,
        }),
        |p| fs::write(p.join("x"), b"old!").unwrap(),
    );
    let f = OpenOptions::new().write(true).open(fx.p("x")).unwrap();
    let err = f.write_all_at(b"new!", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Documented: the local apply is not undone.
    assert_eq!(fs::read(fx.p("x")).unwrap(), b"new!");
    assert_eq!(fx.mount().stats().replication_errors, 1);
}

#[test]
fn dropped_completion_is_an_error_not_a_hang() {
    struct Forgetful;
    impl tandem_fs::Replicator for Forgetful {
        fn submit(&self, _m: &tandem_fs::Mutation<'_>, done: tandem_fs::Completion) {
            drop(done);
        }
    }
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(Forgetful), |_| {});
    let err = fs::create_dir(fx.p("d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // The directory exists locally; the kernel was told the call failed and looks it up anew.
    assert!(fx.p("d").is_dir());
}

#[test]
fn busy_unmount_detaches_and_fences_what_is_left_open() {
    let mut fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |p| {
        fs::write(p.join("held"), b"data").unwrap();
    });
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.p("held"))
        .unwrap();
    let t = Instant::now();
    fx.unmount();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(!is_mount_point(&fx.path));
    assert_eq!(errno_of(held.write_all_at(b"late", 0)), libc::EIO);
    drop(held);
    assert_eq!(fs::read(fx.p("held")).unwrap(), b"data");
}

/// `sqlite3` with a busy timeout, as SQLite's documentation says an application with
/// concurrent connections should set: a connection that finds the database locked (the
/// first one to open a WAL database recovers its index under an exclusive lock) waits
/// instead of failing with `SQLITE_BUSY`.
fn sqlite3(db: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("sqlite3");
    command.args(["-cmd", ".timeout 10000"]).arg(db);
    command
}

#[test]
fn sqlite_wal_mode() {
    let out = std::process::Command::new("sqlite3")
        .arg("-version")
        .output()
        .expect("sqlite3 (scripts/install-deps.sh installs the sqlite3 package)");
    assert!(out.status.success());
    let mut fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |_| {});
    let db = fx.p("test.db");
    let sql = |script: &str| {
        let out = sqlite3(&db).arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(sql("PRAGMA journal_mode=WAL;").trim(), "wal");
    sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);");
    for batch in 0..20 {
        sql(&format!(
            "BEGIN; {} COMMIT;",
            (0..50)
                .map(|i| format!(
                    "INSERT INTO t(v) VALUES('row {batch}-{i} {}');",
                    "x".repeat(200)
                ))
                .collect::<String>()
        ));
    }
    // A reader and a writer at once (the -shm file is mmapped by both).
    let mut child = sqlite3(&db)
        .arg("BEGIN; SELECT count(*) FROM t; SELECT count(*) FROM t; COMMIT;")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sql("INSERT INTO t(v) VALUES('concurrent');");
    assert!(child.wait().unwrap().success());
    let mut first = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut first)
        .unwrap();
    assert_eq!(sql("SELECT count(*) FROM t;").trim(), "1001");
    assert_eq!(sql("PRAGMA integrity_check;").trim(), "ok");
    assert!(fx.p("test.db-wal").exists() || fx.p("test.db").exists());
    fx.unmount();
    // The plain directory holds a consistent database.
    assert_eq!(sql("SELECT count(*) FROM t;").trim(), "1001");
    assert_eq!(sql("PRAGMA integrity_check;").trim(), "ok");
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn fsx_random_operations_match_a_model() {
    let seed = std::env::var("FSX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a4d_e3c1_u64);
    let ops: usize = std::env::var("FSX_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |_| {});
    let path = fx.p("fsx");
    let mut rng = Rng(seed | 1);
    let mut model: Vec<u8> = Vec::new();
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap()
    };
    let mut f = open();
    const MAX: u64 = 1 << 20;
    const BLK: u64 = 4096;
    for i in 0..ops {
        let what = rng.below(100);
        let ctx = format!("seed {seed:#x} op {i}");
        match what {
            0..=39 => {
                let off = rng.below(MAX);
                let len = 1 + rng.below(64 * 1024);
                let byte = (rng.next() & 0xff) as u8;
                let data: Vec<u8> = (0..len).map(|k| byte.wrapping_add(k as u8)).collect();
                f.write_all_at(&data, off).unwrap();
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            40..=54 => {
                let size = rng.below(MAX);
                f.set_len(size).unwrap();
                model.resize(size as usize, 0);
            }
            55..=69 => {
                // Punch a hole (block aligned sometimes, unaligned other times).
                let mut off = rng.below(MAX);
                let mut len = 1 + rng.below(128 * 1024);
                if rng.below(2) == 0 {
                    off -= off % BLK;
                    len = len.div_ceil(BLK) * BLK;
                }
                fallocate(
                    &f,
                    libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
                    off,
                    len,
                )
                .unwrap();
                let end = ((off + len) as usize).min(model.len());
                if (off as usize) < end {
                    model[off as usize..end].fill(0);
                }
            }
            70..=74 => {
                let off = rng.below(MAX);
                let len = 1 + rng.below(64 * 1024);
                match fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len) {
                    Ok(()) => {
                        let end = (off + len) as usize;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].fill(0);
                    }
                    Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{ctx}"),
                }
            }
            75..=77 => {
                drop(f);
                f = open();
            }
            _ => {
                let off = rng.below(model.len() as u64 + 100);
                let len = rng.below(128 * 1024) as usize;
                let mut buf = vec![0xAAu8; len];
                let mut got = 0;
                while got < len {
                    let n = f.read_at(&mut buf[got..], off + got as u64).unwrap();
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                let lo = (off as usize).min(model.len());
                let hi = (off as usize + len).min(model.len());
                assert_eq!(got, hi - lo, "{ctx}: short read");
                assert!(
                    buf[..got] == model[lo..hi],
                    "{ctx}: data differs at read {off}+{len}"
                );
            }
        }
        assert_eq!(
            f.metadata().unwrap().len(),
            model.len() as u64,
            "{ctx}: size"
        );
    }
    drop(f);
    assert!(
        fs::read(&path).unwrap() == model,
        "final contents through the mount"
    );
    fx.unmount();
    assert!(
        fs::read(&path).unwrap() == model,
        "final contents of the plain file"
    );
}

/// Run by `watchdog_removes_the_mount_of_a_killed_process` in a child process.
#[test]
#[ignore = "helper: run by another test in a child process"]
fn watchdog_child() {
    let Ok(dir) = std::env::var("TANDEM_FS_CHILD_DIR") else {
        return;
    };
    let m = Mount::mount_in_place(
        Path::new(&dir),
        MountOptions::default(),
        Arc::new(LocalOnly),
    )
    .unwrap();
    fs::write(
        Path::new(&dir).join("from-child"),
        b"written before the kill",
    )
    .unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    drop(m);
}

#[test]
fn watchdog_removes_the_mount_of_a_killed_process() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().canonicalize().unwrap();
    fs::write(path.join("before"), b"b").unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "watchdog_child",
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env("TANDEM_FS_CHILD_DIR", &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains("READY") {
        assert!(Instant::now() < deadline, "child never got ready: {seen}");
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "child exited: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(is_mount_point(&path));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mount_point(&path) {
        assert!(Instant::now() < deadline, "the dead mount is still there");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read(path.join("before")).unwrap(), b"b");
    assert_eq!(
        fs::read(path.join("from-child")).unwrap(),
        b"written before the kill"
    );
}

/// pjdfstest (the Rust rewrite: `cargo install pjdfstest`) on the mount: every test that passes
/// on the underlying directory passes through the mount. Runs when a `pjdfstest` binary is on
/// PATH (or named by `PJDFSTEST`); skipped with a message otherwise.
#[test]
fn pjdfstest_matches_the_underlying_filesystem() {
    let bin = std::env::var_os("PJDFSTEST")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("pjdfstest"))
                    .find(|p| p.is_file())
            })
        });
    let bin =
        bin.expect("no pjdfstest binary (scripts/install-deps.sh installs it; or set PJDFSTEST)");
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("pjdfstest.toml");
    // Users known to Debian: the suite switches to them for permission tests.
    fs::write(
        &cfg,
        "[features]\nposix_fallocate = {}\nutime_now = {}\nutimensat = {}\nrename_ctime = {}\n\
         [settings]\nnaptime = 0.01\nallow_remount = false\nexpected_failures = []\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    )
    .unwrap();
    let run = |dir: &Path| -> BTreeMap<String, String> {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new(&bin)
            .arg("-c")
            .arg(&cfg)
            .arg("-p")
            .arg(dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("Summary:"),
            "pjdfstest did not finish: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .filter(|l| !l.starts_with(char::is_whitespace))
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let name = words.next()?;
                let status = words.last()?;
                ["ok", "failed", "skipped"]
                    .contains(&status)
                    .then(|| (name.to_owned(), status.to_owned()))
            })
            .collect()
    };
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let plain_dir = work.path().join("plain");
    fs::create_dir(&plain_dir).unwrap();
    let plain = run(&plain_dir);
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |p| {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    });
    let mounted = run(&fx.path);
    assert!(plain.len() > 300, "{} results", plain.len());
    // glibc knows no LINK_MAX for FUSE (pathconf): the suite skips that one test on any FUSE mount.
    let allowed_skips = ["link::link_count_max"];
    let mut regressions = Vec::new();
    for (name, status) in &plain {
        let got = mounted.get(name).map(String::as_str).unwrap_or("missing");
        if status == "ok"
            && got != "ok"
            && !(got == "skipped" && allowed_skips.contains(&name.as_str()))
        {
            regressions.push(format!("{name}: {got}"));
        }
    }
    assert!(
        regressions.is_empty(),
        "pass on the plain directory, not on the mount: {regressions:#?}"
    );
    eprintln!(
        "pjdfstest: {} ok through the mount, {} ok on the plain directory",
        mounted.values().filter(|s| *s == "ok").count(),
        plain.values().filter(|s| *s == "ok").count()
    );
}

#[test]
fn unprivileged_writes_and_truncates_clear_set_id_bits() {
    use std::os::unix::process::CommandExt;
    let rec = Arc::new(Recorder::default());
    let fx = Fixture::new(Mode::Primary, &[], rec.clone(), |p| {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["w", "t", "root"] {
            fs::write(p.join(name), b"x").unwrap();
            std::os::unix::fs::chown(p.join(name), Some(1000), Some(1000)).unwrap();
            fs::set_permissions(p.join(name), fs::Permissions::from_mode(0o6775)).unwrap();
        }
    });
    let as_user = |cmd: String| {
        let st = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .uid(1000)
            .gid(1000)
            .status()
            .unwrap();
        assert!(st.success(), "{cmd}");
    };
    as_user(format!("printf y >> {}", fx.p("w").display()));
    assert_eq!(fs::metadata(fx.p("w")).unwrap().mode() & 0o7777, 0o775);
    let log = rec.take();
    assert!(
        matches!(log.as_slice(), [m] if matches!(m.op, Op::Write { kill_suidgid: true, .. })),
        "{log:#?}"
    );
    as_user(format!("truncate -s 0 {}", fx.p("t").display()));
    assert_eq!(fs::metadata(fx.p("t")).unwrap().mode() & 0o7777, 0o775);
    // The kernel clears the bits as an explicit mode change: replicated like any setattr.
    assert!(rec.take().iter().any(|m| matches!(
        m.op,
        Op::SetAttr {
            mode: Some(0o775),
            ..
        }
    )));
    // Root keeps them (CAP_FSETID).
    OpenOptions::new()
        .append(true)
        .open(fx.p("root"))
        .unwrap()
        .write_all(b"r")
        .unwrap();
    assert_eq!(fs::metadata(fx.p("root")).unwrap().mode() & 0o7777, 0o6775);
}

#[test]
fn shared_mmap_writes_reach_the_replicator_at_msync() {
    let rec = Arc::new(Recorder::default());
    let fx = Fixture::new(Mode::Primary, &[], rec.clone(), |p| {
        fs::write(p.join("m"), vec![0u8; 8192]).unwrap();
    });
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.p("m"))
        .unwrap();
    // SAFETY: a fresh shared mapping of 8 KiB of an open file; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: within the 8 KiB mapping.
    unsafe { std::ptr::copy_nonoverlapping(b"mapped!".as_ptr(), ptr.cast::<u8>().add(4096), 7) };
    // SAFETY: the mapping made above.
    assert_eq!(unsafe { libc::msync(ptr, 8192, libc::MS_SYNC) }, 0);
    let log = rec.take();
    assert!(
        log.iter().any(|m| matches!(&m.op, Op::Write { offset: 4096, data, .. } if data.starts_with(b"mapped!"))),
        "{:?}",
        log.iter().map(|m| m.kind()).collect::<Vec<_>>()
    );
    // SAFETY: the mapping made above, not used after.
    unsafe { libc::munmap(ptr, 8192) };
    drop(f);
    let data = fs::read(fx.dir.path().join("m")).unwrap();
    assert_eq!(&data[4096..4103], b"mapped!");
}

#[test]
fn writes_to_an_unlinked_open_file_have_no_path() {
    let rec = Arc::new(Recorder::default());
    let fx = Fixture::new(Mode::Primary, &[], rec.clone(), |p| {
        fs::write(p.join("tmp"), b"").unwrap();
        fs::write(p.join("two"), b"").unwrap();
        fs::hard_link(p.join("two"), p.join("two-b")).unwrap();
    });
    let f = OpenOptions::new().write(true).open(fx.p("tmp")).unwrap();
    f.write_all_at(b"1", 0).unwrap();
    fs::remove_file(fx.p("tmp")).unwrap();
    f.write_all_at(b"2", 1).unwrap();
    let log = rec.take();
    let paths: Vec<_> = log
        .iter()
        .filter_map(|m| match &m.op {
            Op::Write { node, .. } => Some(node.path.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(paths, [Some(PathBuf::from("tmp")), None]);
    // A hard link keeps one identity under two names; the path is the last one used.
    let a = fs::metadata(fx.p("two")).unwrap().ino();
    let b = fs::metadata(fx.p("two-b")).unwrap().ino();
    assert_eq!(a, b);
    OpenOptions::new()
        .write(true)
        .open(fx.p("two-b"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    match &rec.take()[..] {
        [m] => match &m.op {
            Op::Write { node, .. } => {
                assert_eq!(node.nodeid, a);
                assert_eq!(node.path.as_deref(), Some(Path::new("two-b")));
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:#?}"),
    }
}

/// Completes from a pool of threads after a pseudo-random short delay, so that many mutations
/// are in flight at once and complete out of order.
struct Jittery {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<(Instant, tandem_fs::Completion)>>,
    count: std::sync::atomic::AtomicU64,
}

impl Jittery {
    fn new() -> Arc<Jittery> {
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, tandem_fs::Completion)>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..3 {
            let rx = rx.clone();
            std::thread::spawn(move || {
                loop {
                    let Ok((due, done)) = rx.lock().unwrap().recv() else {
                        return;
                    };
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    done.complete(Ok(()));
                }
            });
        }
        Arc::new(Jittery {
            tx: std::sync::Mutex::new(tx),
            count: Default::default(),
        })
    }
}

impl tandem_fs::Replicator for Jittery {
    fn submit(&self, _m: &tandem_fs::Mutation<'_>, done: tandem_fs::Completion) {
        let n = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let due = Instant::now() + Duration::from_micros(n * 7919 % 2000);
        self.tx.lock().unwrap().send((due, done)).unwrap();
    }
}

#[test]
fn concurrent_mixed_operations_neither_deadlock_nor_leak() {
    let rep = Jittery::new();
    let fx = Fixture::new(Mode::Primary, &[], rep.clone(), |p| {
        fs::create_dir(p.join("shared")).unwrap();
    });
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let root = fx.path.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9 ^ ((t + 1) * 0x1234_5678));
                let mine = root.join(format!("t{t}"));
                fs::create_dir(&mine).unwrap();
                let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                for i in 0..300 {
                    let name = format!("f{}", rng.below(8));
                    let path = mine.join(&name);
                    match rng.below(10) {
                        0..=3 => {
                            let data = format!("{t}-{i}").into_bytes();
                            fs::write(&path, &data).unwrap();
                            model.insert(name, data);
                        }
                        4 => {
                            if model.remove(&name).is_some() {
                                fs::remove_file(&path).unwrap();
                            }
                        }
                        5 => {
                            let other = format!("f{}", rng.below(8));
                            if let Some(data) = model.remove(&name) {
                                fs::rename(&path, mine.join(&other)).unwrap();
                                model.insert(other, data);
                            }
                        }
                        6 => {
                            // Contended namespace operations in a shared directory.
                            let p = root.join("shared").join(format!("s{}", rng.below(4)));
                            let _ = fs::write(&p, b"s");
                            let _ = fs::remove_file(&p);
                        }
                        7 => {
                            if model.contains_key(&name) {
                                File::open(&path).unwrap().sync_all().unwrap();
                            }
                        }
                        _ => {
                            if let Some(data) = model.get(&name) {
                                assert_eq!(&fs::read(&path).unwrap(), data);
                            }
                        }
                    }
                }
                for (name, data) in &model {
                    assert_eq!(&fs::read(mine.join(name)).unwrap(), data);
                }
                let mut on_disk: Vec<String> = fs::read_dir(&mine)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                on_disk.sort();
                assert_eq!(on_disk, model.keys().cloned().collect::<Vec<_>>());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = fx.mount().stats();
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    assert!(stats.mutations > 1000, "{stats:?}");
    // Releases reach the filesystem asynchronously after close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fx.mount().stats().open_files != 0 {
        assert!(Instant::now() < deadline, "{:?}", fx.mount().stats());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exclusion_survives_unlink_and_follows_renames() {
    let rec = Arc::new(Recorder::default());
    let fx = Fixture::new(Mode::Primary, &["cache"], rec.clone(), |p| {
        fs::create_dir(p.join("cache")).unwrap();
        fs::create_dir(p.join("data")).unwrap();
    });
    // Unlinked while open in an excluded directory: still not replicated.
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fx.p("cache/t"))
        .unwrap();
    fs::remove_file(fx.p("cache/t")).unwrap();
    rec.take();
    f.write_all_at(b"scratch", 0).unwrap();
    let log = rec.take();
    assert!(matches!(log.as_slice(), [m] if !m.replicate), "{log:#?}");
    // Moved into a replicated directory: replicated from then on.
    let g = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fx.p("cache/keep"))
        .unwrap();
    fs::rename(fx.p("cache/keep"), fx.p("data/keep")).unwrap();
    rec.take();
    g.write_all_at(b"kept", 0).unwrap();
    let log = rec.take();
    assert!(matches!(log.as_slice(), [m] if m.replicate), "{log:#?}");
    // A whole directory renamed into the excluded one: its files follow.
    fs::create_dir(fx.p("data/sub")).unwrap();
    let h = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fx.p("data/sub/x"))
        .unwrap();
    fs::rename(fx.p("data/sub"), fx.p("cache/sub")).unwrap();
    rec.take();
    h.write_all_at(b"x", 0).unwrap();
    let log = rec.take();
    assert!(matches!(log.as_slice(), [m] if !m.replicate), "{log:#?}");
}

/// A directory of 20,000 entries (many kernel reads): listed whole, with attributes (readdirplus),
/// and resumed from a position (`telldir`/`seekdir`) as the backing directory gives it; the
/// mount holds no copy of the listing (each read comes from the backing directory).
#[test]
fn large_directories_are_listed_whole_and_resumable() {
    const N: usize = 20_000;
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |dir| {
        fs::create_dir(dir.join("big")).unwrap();
        for i in 0..N {
            File::create(dir.join("big").join(format!("entry-{i}"))).unwrap();
        }
    });
    let big = fx.p("big");
    let mut names: Vec<String> = fs::read_dir(&big)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            assert!(e.metadata().unwrap().is_file());
            e.file_name().into_string().unwrap()
        })
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..N).map(|i| format!("entry-{i}")).collect();
    want.sort();
    assert_eq!(names, want);

    // telldir/seekdir through the mount: the rest read again from a saved position is the same.
    let path = std::ffi::CString::new(big.as_os_str().as_encoded_bytes()).unwrap();
    let read_name = |d: *mut libc::DIR| -> Option<String> {
        // SAFETY: `d` is an open directory stream; readdir returns null at the end or a pointer
        // to an entry valid until the next call on `d`, read at once.
        let entry = unsafe { libc::readdir(d) };
        (!entry.is_null()).then(|| {
            // SAFETY: `d_name` of a returned entry is a NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
    };
    // SAFETY: a valid NUL-terminated path.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!d.is_null());
    for _ in 0..N / 2 {
        read_name(d).unwrap();
    }
    // SAFETY: `d` is open.
    let position = unsafe { libc::telldir(d) };
    let rest: Vec<String> = std::iter::from_fn(|| read_name(d)).collect();
    // SAFETY: `d` is open and `position` came from telldir on it.
    unsafe { libc::seekdir(d, position) };
    let again: Vec<String> = std::iter::from_fn(|| read_name(d)).collect();
    // SAFETY: `d` is open; not used afterwards.
    unsafe { libc::closedir(d) };
    assert!(
        rest.len() > N / 2 - 10,
        "{} entries after the middle",
        rest.len()
    );
    assert_eq!(rest, again);
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn the_primary_cache_follows_every_change_made_through_the_mount() {
    // On the primary the kernel keeps names, attributes and listings (long timeouts,
    // FOPEN_CACHE_DIR): each change through the mount must still show at once.
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |_| {});
    fs::create_dir(fx.p("d")).unwrap();
    assert_eq!(sorted_names(&fx.p("d")), Vec::<String>::new());
    fs::write(fx.p("d/a"), b"1").unwrap();
    assert_eq!(sorted_names(&fx.p("d")), ["a"]);
    fs::write(fx.p("d/b"), b"22").unwrap();
    assert_eq!(sorted_names(&fx.p("d")), ["a", "b"]);
    fs::rename(fx.p("d/a"), fx.p("d/c")).unwrap();
    assert_eq!(sorted_names(&fx.p("d")), ["b", "c"]);
    fs::hard_link(fx.p("d/b"), fx.p("d/e")).unwrap();
    assert_eq!(fs::metadata(fx.p("d/b")).unwrap().nlink(), 2);
    fs::remove_file(fx.p("d/e")).unwrap();
    assert_eq!(fs::metadata(fx.p("d/b")).unwrap().nlink(), 1);
    assert_eq!(sorted_names(&fx.p("d")), ["b", "c"]);
    OpenOptions::new()
        .append(true)
        .open(fx.p("d/b"))
        .unwrap()
        .write_all(b"333")
        .unwrap();
    assert_eq!(fs::metadata(fx.p("d/b")).unwrap().len(), 5);
    fs::set_permissions(fx.p("d/b"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(fx.p("d/b")).unwrap().mode() & 0o777, 0o600);
    fs::remove_file(fx.p("d/c")).unwrap();
    assert!(!fx.p("d/c").exists());
    assert_eq!(sorted_names(&fx.p("d")), ["b"]);
    // A listing of entries the kernel knows starts with one entry with attributes and goes on
    // without (see `readdirplus`): still whole, the first time and from the kernel's cache.
    fs::create_dir(fx.p("many")).unwrap();
    let want: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
    for name in &want {
        fs::write(fx.p("many").join(name), name).unwrap();
    }
    assert_eq!(sorted_names(&fx.p("many")), want);
    assert_eq!(sorted_names(&fx.p("many")), want);
    for entry in fs::read_dir(fx.p("many")).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.metadata().unwrap().len(), 4, "{entry:?}");
    }
    // A listing started before a change may or may not show it; one started after does.
    let mut open = fs::read_dir(fx.p("d")).unwrap();
    fs::write(fx.p("d/f"), b"").unwrap();
    let _ = open.next();
    assert_eq!(sorted_names(&fx.p("d")), ["b", "f"]);
}

#[test]
fn demotion_drops_what_the_kernel_cached_as_primary() {
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |_| {});
    fs::write(fx.p("gone"), b"1").unwrap();
    fs::write(fx.p("moved"), b"2").unwrap();
    fs::write(fx.p("linked"), b"3").unwrap();
    fs::hard_link(fx.p("linked"), fx.p("alias")).unwrap();
    fs::create_dir(fx.p("dir")).unwrap();
    fs::write(fx.p("dir/inner"), b"4").unwrap();
    // The kernel now holds names, attributes and listings with the primary's long timeouts.
    for name in ["gone", "moved", "linked", "alias", "dir/inner"] {
        fs::metadata(fx.p(name)).unwrap();
    }
    assert_eq!(
        sorted_names(&fx.path),
        ["alias", "dir", "gone", "linked", "moved"]
    );
    assert_eq!(sorted_names(&fx.p("dir")), ["inner"]);

    fx.mount().set_mode(Mode::Secondary);
    // The applier changes the tree behind the kernel's back.
    let b = PathBuf::from(format!(
        "/proc/self/fd/{}",
        fx.mount().backing_dir().as_raw_fd()
    ));
    fs::remove_file(b.join("gone")).unwrap();
    fs::rename(b.join("moved"), b.join("renamed")).unwrap();
    fs::remove_file(b.join("alias")).unwrap();
    fs::write(b.join("linked"), b"longer content").unwrap();
    fs::remove_file(b.join("dir/inner")).unwrap();
    fs::write(b.join("dir/new"), b"5").unwrap();

    // The caches are dropped by a thread of the mount: poll for the secondary's true view.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = (
            sorted_names(&fx.path),
            sorted_names(&fx.p("dir")),
            fx.p("gone").exists(),
            fx.p("alias").exists(),
            fx.p("dir/inner").exists(),
            fs::metadata(fx.p("linked"))
                .map(|m| (m.len(), m.nlink()))
                .ok(),
        );
        let want = (
            vec!["dir".to_string(), "linked".into(), "renamed".into()],
            vec!["new".to_string()],
            false,
            false,
            false,
            Some((14, 1)),
        );
        if view == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary still shows what the primary cached: {view:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read(fx.p("renamed")).unwrap(), b"2");
    assert_eq!(fs::read(fx.p("dir/new")).unwrap(), b"5");
}

/// Waits (polling, with a deadline) until the mount kept `n` listings read ahead in all.
fn wait_read_ahead(fx: &Fixture, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.mount().stats().listings_read_ahead < n {
        assert!(Instant::now() < deadline, "{:?}", fx.mount().stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The subdirectories of `dir` in the order its listing gives them.
fn subdirs_in_listing_order(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect()
}

#[test]
fn a_tree_walk_uses_listings_read_ahead_and_sees_every_change_made_before_an_opening() {
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |_| {});
    fs::create_dir(fx.p("t")).unwrap();
    let files: Vec<String> = (0..50).map(|i| format!("f{i:02}")).collect();
    for d in 0..6 {
        fs::create_dir(fx.p(&format!("t/s{d}"))).unwrap();
        for f in &files {
            fs::write(fx.p(&format!("t/s{d}/{f}")), b"").unwrap();
        }
    }
    // A walk: each subdirectory listed in the parent's order; the next one is read ahead
    // while this one is listed, and its opening finds it.
    let order = subdirs_in_listing_order(&fx.p("t"));
    assert_eq!(order.len(), 6);
    for (i, d) in order.iter().enumerate() {
        assert_eq!(sorted_names(&fx.p("t").join(d)), files, "{d}");
        if i + 1 < order.len() {
            wait_read_ahead(&fx, i + 1);
        }
    }
    let stats = fx.mount().stats();
    assert_eq!(stats.listings_ahead_used, 5, "{stats:?}");

    // A change between the read ahead and the opening: the listing shows it.
    fs::create_dir(fx.p("u")).unwrap();
    for d in 0..3 {
        fs::create_dir(fx.p(&format!("u/s{d}"))).unwrap();
        for f in &files {
            fs::write(fx.p(&format!("u/s{d}/{f}")), b"").unwrap();
        }
    }
    let order = subdirs_in_listing_order(&fx.p("u"));
    let before = fx.mount().stats().listings_read_ahead;
    assert_eq!(sorted_names(&fx.p("u").join(&order[0])), files);
    wait_read_ahead(&fx, before + 1);
    let next = fx.p("u").join(&order[1]);
    fs::write(next.join("new"), b"").unwrap();
    fs::rename(next.join("f00"), next.join("g00")).unwrap();
    fs::remove_file(next.join("f01")).unwrap();
    let mut want: Vec<String> = files[2..].to_vec();
    want.extend(["g00".to_string(), "new".to_string()]);
    want.sort();
    assert_eq!(sorted_names(&next), want);
    let stats = fx.mount().stats();
    assert_eq!(
        stats.listings_ahead_used, 5,
        "not used after a change: {stats:?}"
    );
}

#[test]
fn the_secondary_reads_no_listing_ahead() {
    // The applier changes the secondary's tree behind the mount: a listing read ahead could
    // miss a change, and nothing bumps the epoch for it. What was read ahead as primary goes.
    let fx = Fixture::new(Mode::Primary, &[], Arc::new(LocalOnly), |_| {});
    fs::create_dir(fx.p("t")).unwrap();
    for d in 0..4 {
        fs::create_dir(fx.p(&format!("t/s{d}"))).unwrap();
        fs::write(fx.p(&format!("t/s{d}/f")), b"").unwrap();
    }
    let order = subdirs_in_listing_order(&fx.p("t"));
    assert_eq!(sorted_names(&fx.p("t").join(&order[0])), ["f"]);
    wait_read_ahead(&fx, 1);
    fx.mount().set_mode(Mode::Secondary);
    let b = PathBuf::from(format!(
        "/proc/self/fd/{}",
        fx.mount().backing_dir().as_raw_fd()
    ));
    fs::write(b.join("t").join(&order[1]).join("behind"), b"").unwrap();
    assert_eq!(sorted_names(&fx.p("t").join(&order[1])), ["behind", "f"]);
    for d in &order[2..] {
        assert_eq!(sorted_names(&fx.p("t").join(d)), ["f"]);
    }
    let stats = fx.mount().stats();
    assert_eq!(stats.listings_ahead_used, 0, "{stats:?}");
    assert_eq!(stats.listings_read_ahead, 1, "{stats:?}");
}
