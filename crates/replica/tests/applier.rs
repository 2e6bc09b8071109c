//! Applier tests on a plain temporary directory (run as root: chown, mknod, trusted xattrs).
#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tandem_fs::{
    Attr, EntryRef, FileId, Mutation, NodeRef, Op, Outcome, Owner, SyncMode, Timestamp,
};
use tandem_replica::{Applier, wire};

struct Fx {
    dir: tempfile::TempDir,
    applier: Applier,
    seq: u64,
}

const ROOT: FileId = FileId { dev: 1, ino: 1 };

fn id(ino: u64) -> FileId {
    FileId { dev: 1, ino }
}

fn node(id: FileId, path: Option<&str>) -> NodeRef {
    NodeRef {
        nodeid: id.ino,
        generation: 0,
        id,
        path: path.map(PathBuf::from),
    }
}

fn root() -> NodeRef {
    node(ROOT, Some(""))
}

fn entry(parent: NodeRef, name: &str) -> EntryRef<'static> {
    let path = parent.path.as_ref().map(|p| p.join(name));
    EntryRef {
        parent,
        name: Cow::Owned(OsString::from(name)),
        path,
        excluded: false,
    }
}

fn ts(sec: i64, nsec: u32) -> Timestamp {
    Timestamp { sec, nsec }
}

fn attr(id: FileId, atime: Timestamp, mtime: Timestamp) -> Attr {
    Attr {
        id,
        mode: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        blocks: 0,
        atime,
        mtime,
        ctime: mtime,
    }
}

fn ok_outcome(attr: Option<Attr>, written: Option<u64>) -> Outcome {
    Outcome {
        error: None,
        attr,
        written,
        dirs: Vec::new(),
    }
}

const OWNER: Owner = Owner { uid: 0, gid: 0 };

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::Builder::new()
            .prefix("tandem-applier")
            .tempdir()
            .unwrap();
        let applier = Applier::open(dir.path()).unwrap();
        Fx {
            dir,
            applier,
            seq: 0,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Applies `op` through the wire format (encode, decode), as the secondary would.
    fn apply(&mut self, op: Op<'_>) -> (u64, Result<(), i32>) {
        self.seq += 1;
        let m = Mutation {
            seq: self.seq,
            replicate: true,
            op,
        };
        let frame = wire::to_frame(&wire::Record::Mutation(m)).unwrap();
        let wire::Record::Mutation(m) = wire::decode_frame(&frame).unwrap() else {
            panic!("not a mutation");
        };
        (self.seq, self.applier.apply(&m))
    }

    /// Applies `op` and the primary's success outcome with times `t` for `target`.
    fn ok(&mut self, op: Op<'_>, target: FileId, t: Timestamp) {
        let written = match &op {
            Op::Write { data, .. } => Some(data.len() as u64),
            _ => None,
        };
        let kind = op.kind();
        let (seq, r) = self.apply(op);
        assert_eq!(r, Ok(()), "{kind}");
        self.applier
            .apply_outcome(seq, &ok_outcome(Some(attr(target, t, t)), written))
            .unwrap();
    }

    fn create(&mut self, parent: NodeRef, name: &str, target: FileId) {
        self.ok(
            Op::Create {
                entry: entry(parent, name),
                mode: libc::S_IFREG | 0o644,
                umask: 0o022,
                flags: libc::O_RDWR,
                owner: OWNER,
            },
            target,
            ts(1000, 1),
        );
    }

    fn write(&mut self, target: NodeRef, offset: u64, data: &[u8], sync: SyncMode) {
        let t = ts(2000, 123_456_789);
        let id = target.id;
        self.ok(
            Op::Write {
                node: target,
                fh: 1,
                offset,
                data: Cow::Borrowed(data),
                sync,
                kill_suidgid: false,
            },
            id,
            t,
        );
    }
}

fn mtime(p: &Path) -> (i64, i64) {
    let md = fs::symlink_metadata(p).unwrap();
    (md.mtime(), md.mtime_nsec())
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and buffer of the given length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

#[test]
fn create_write_truncate_and_times() {
    let mut fx = Fx::new();
    let f = id(10);
    fx.create(root(), "file", f);
    assert_eq!(mtime(&fx.p("file")), (1000, 1));
    assert_eq!(
        fs::metadata(fx.p("file")).unwrap().mode() & 0o7777,
        0o644,
        "umask applied"
    );
    // By identity only (no path): the table knows the new file from the outcome.
    fx.write(node(f, None), 5, b"hello", SyncMode::None);
    fx.write(node(f, None), 0, b"01234", SyncMode::Data);
    fx.write(node(f, None), 10, b"!", SyncMode::Full);
    assert_eq!(fs::read(fx.p("file")).unwrap(), b"01234hello!");
    assert_eq!(mtime(&fx.p("file")), (2000, 123_456_789));

    // Truncate, chmod, chown, utimens with nanoseconds, in one setattr.
    let (_, r) = fx.apply(Op::SetAttr {
        node: node(f, None),
        fh: None,
        mode: Some(0o4640),
        uid: Some(1234),
        gid: Some(5678),
        size: Some(3),
        atime: Some(ts(5, 6)),
        mtime: Some(ts(1_600_000_000, 999_999_999)),
    });
    assert_eq!(r, Ok(()));
    let md = fs::metadata(fx.p("file")).unwrap();
    assert_eq!(md.len(), 3);
    assert_eq!(md.mode() & 0o7777, 0o4640);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!((md.atime(), md.atime_nsec()), (5, 6));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 999_999_999));
}

#[test]
fn older_outcomes_do_not_overwrite_newer_times() {
    let mut fx = Fx::new();
    let f = id(10);
    fx.create(root(), "file", f);
    let w = |data: &'static [u8]| Op::Write {
        node: node(f, None),
        fh: 1,
        offset: 0,
        data: Cow::Borrowed(data),
        sync: SyncMode::None,
        kill_suidgid: false,
    };
    let (s1, _) = fx.apply(w(b"a"));
    let (s2, _) = fx.apply(w(b"b"));
    let o = |t| ok_outcome(Some(attr(f, t, t)), Some(1));
    fx.applier.apply_outcome(s2, &o(ts(20, 0))).unwrap();
    fx.applier.apply_outcome(s1, &o(ts(10, 0))).unwrap();
    assert_eq!(mtime(&fx.p("file")), (20, 0));
}

#[test]
fn namespace_operations() {
    let mut fx = Fx::new();
    let d = id(2);
    fx.ok(
        Op::Mkdir {
            entry: entry(root(), "d"),
            mode: 0o2777,
            umask: 0o022,
            owner: Owner { uid: 7, gid: 8 },
        },
        d,
        ts(3, 3),
    );
    let md = fs::metadata(fx.p("d")).unwrap();
    assert!(md.is_dir());
    // mkdir(2) drops the set-group-ID bit of the mode (as on the primary).
    assert_eq!(md.mode() & 0o7777, 0o755);
    assert_eq!((md.uid(), md.gid()), (7, 8));
    assert_eq!(mtime(&fx.p("d")), (3, 3));

    // The parent by identity only.
    let dn = node(d, None);
    fx.ok(
        Op::Mknod {
            entry: entry(dn.clone(), "fifo"),
            mode: libc::S_IFIFO | 0o666,
            umask: 0o022,
            rdev: 0,
            owner: OWNER,
        },
        id(3),
        ts(4, 4),
    );
    let md = fs::symlink_metadata(fx.p("d/fifo")).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o777, 0o644);
    // A character device: FUSE's 32-bit encoding of 1:3.
    fx.ok(
        Op::Mknod {
            entry: entry(root(), "null"),
            mode: libc::S_IFCHR | 0o600,
            umask: 0,
            rdev: (1 << 8) | 3,
            owner: OWNER,
        },
        id(4),
        ts(4, 4),
    );
    assert_eq!(
        fs::symlink_metadata(fx.p("null")).unwrap().rdev(),
        libc::makedev(1, 3)
    );
    fx.ok(
        Op::Symlink {
            entry: entry(dn.clone(), "link"),
            target: Cow::Borrowed(Path::new("../nowhere")),
            owner: Owner { uid: 9, gid: 9 },
        },
        id(5),
        ts(6, 7),
    );
    assert_eq!(
        fs::read_link(fx.p("d/link")).unwrap(),
        Path::new("../nowhere")
    );
    assert_eq!(mtime(&fx.p("d/link")), (6, 7));
    assert_eq!(fs::symlink_metadata(fx.p("d/link")).unwrap().uid(), 9);

    // Hard link of a file known by identity.
    let f = id(6);
    fx.create(dn.clone(), "f", f);
    fx.ok(
        Op::Link {
            node: node(f, None),
            new: entry(root(), "hard"),
        },
        f,
        ts(8, 8),
    );
    assert_eq!(
        fs::metadata(fx.p("hard")).unwrap().ino(),
        fs::metadata(fx.p("d/f")).unwrap().ino()
    );

    // Rename with NOREPLACE onto an existing name fails, EXCHANGE swaps.
    let (_, r) = fx.apply(Op::Rename {
        from: entry(dn.clone(), "f"),
        to: entry(root(), "hard"),
        flags: libc::RENAME_NOREPLACE,
        moved: Some(f),
        replaced: Some(f),
    });
    assert_eq!(r, Err(libc::EEXIST));
    let (_, r) = fx.apply(Op::Rename {
        from: entry(dn.clone(), "fifo"),
        to: entry(dn.clone(), "link"),
        flags: libc::RENAME_EXCHANGE,
        moved: Some(id(3)),
        replaced: Some(id(5)),
    });
    assert_eq!(r, Ok(()));
    assert!(
        fs::symlink_metadata(fx.p("d/link"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(fs::symlink_metadata(fx.p("d/fifo")).unwrap().is_symlink());
    // Plain rename over an existing file.
    let (_, r) = fx.apply(Op::Rename {
        from: entry(root(), "hard"),
        to: entry(root(), "null"),
        flags: 0,
        moved: Some(f),
        replaced: Some(id(4)),
    });
    assert_eq!(r, Ok(()));
    assert!(fs::metadata(fx.p("null")).unwrap().is_file());

    // Unlink and rmdir.
    for name in ["fifo", "link", "f"] {
        let (_, r) = fx.apply(Op::Unlink {
            entry: entry(dn.clone(), name),
            target: None,
        });
        assert_eq!(r, Ok(()), "{name}");
    }
    let (_, r) = fx.apply(Op::Rmdir {
        entry: entry(root(), "d"),
        target: Some(d),
    });
    assert_eq!(r, Ok(()));
    assert!(!fx.p("d").exists());
    let (_, r) = fx.apply(Op::Rmdir {
        entry: entry(root(), "d"),
        target: Some(d),
    });
    assert_eq!(r, Err(libc::ENOENT));
}

#[test]
fn file_unlinked_while_open_stays_reachable() {
    let mut fx = Fx::new();
    // A file that existed before (never seen by the applier): the unlink keeps its handle.
    fs::write(fx.p("old"), b"0123456789").unwrap();
    let f = id(77);
    let (_, r) = fx.apply(Op::Unlink {
        entry: entry(root(), "old"),
        target: Some(f),
    });
    assert_eq!(r, Ok(()));
    assert!(!fx.p("old").exists());
    fx.write(node(f, None), 2, b"ab", SyncMode::None);
    let (_, r) = fx.apply(Op::Fsync {
        node: node(f, None),
        fh: 1,
        datasync: false,
    });
    assert_eq!(r, Ok(()));
    // Re-link it under a new name (the primary can do that through /proc).
    let (_, r) = fx.apply(Op::Link {
        node: node(f, None),
        new: entry(root(), "back"),
    });
    // linkat of an unlinked file fails (ENOENT) on both nodes alike.
    assert_eq!(r, Err(libc::ENOENT));
    assert_eq!(fx.applier.table_len(), 2, "root and the unlinked file");
    fx.applier.forget(f);
    assert_eq!(fx.applier.table_len(), 1);
    let (_, r) = fx.apply(Op::Fsync {
        node: node(f, None),
        fh: 1,
        datasync: false,
    });
    assert_eq!(r, Err(libc::ESTALE), "forgotten and no path");
}

#[test]
fn sparse_files_xattrs_acls_and_fsync() {
    let mut fx = Fx::new();
    let f = id(10);
    fx.create(root(), "sparse", f);
    let n = || node(id(10), Some("sparse"));
    fx.write(n(), 0, &vec![1u8; 1 << 20], SyncMode::None);
    let (_, r) = fx.apply(Op::Fallocate {
        node: n(),
        fh: 1,
        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset: 4096,
        len: 512 << 10,
    });
    assert_eq!(r, Ok(()));
    let (_, r) = fx.apply(Op::Fallocate {
        node: n(),
        fh: 1,
        mode: libc::FALLOC_FL_ZERO_RANGE,
        offset: 1 << 20,
        len: 8192,
    });
    assert_eq!(r, Ok(()));
    let data = fs::read(fx.p("sparse")).unwrap();
    assert_eq!(data.len(), (1 << 20) + 8192);
    assert!(data[4096..4096 + (512 << 10)].iter().all(|b| *b == 0));
    assert_eq!(data[0], 1);
    assert!(fs::metadata(fx.p("sparse")).unwrap().blocks() * 512 < 1 << 20);

    let (_, r) = fx.apply(Op::SetXattr {
        node: n(),
        name: Cow::Borrowed("user.k".as_ref()),
        value: Cow::Borrowed(b"v\0binary"),
        flags: 0,
    });
    assert_eq!(r, Ok(()));
    assert_eq!(xattr(&fx.p("sparse"), "user.k").unwrap(), b"v\0binary");
    let (_, r) = fx.apply(Op::SetXattr {
        node: n(),
        name: Cow::Borrowed("user.k".as_ref()),
        value: Cow::Borrowed(b"x"),
        flags: libc::XATTR_CREATE,
    });
    assert_eq!(r, Err(libc::EEXIST));
    let (_, r) = fx.apply(Op::RemoveXattr {
        node: n(),
        name: Cow::Borrowed("user.k".as_ref()),
    });
    assert_eq!(r, Ok(()));
    assert_eq!(xattr(&fx.p("sparse"), "user.k"), None);

    // A POSIX ACL: user::rw- user:1000:r-- group::r-- mask::r-- other::---.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, uid) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&uid.to_le_bytes());
    }
    let (_, r) = fx.apply(Op::SetXattr {
        node: n(),
        name: Cow::Borrowed("system.posix_acl_access".as_ref()),
        value: Cow::Borrowed(&acl),
        flags: 0,
    });
    assert_eq!(r, Ok(()));
    assert_eq!(
        xattr(&fx.p("sparse"), "system.posix_acl_access").unwrap(),
        acl
    );
    assert_eq!(fs::metadata(fx.p("sparse")).unwrap().mode() & 0o777, 0o640);

    // trusted.* on a symlink (through its parent and name).
    std::os::unix::fs::symlink("sparse", fx.p("sl")).unwrap();
    let (_, r) = fx.apply(Op::SetXattr {
        node: node(id(11), Some("sl")),
        name: Cow::Borrowed("trusted.t".as_ref()),
        value: Cow::Borrowed(b"on-link"),
        flags: 0,
    });
    assert_eq!(r, Ok(()));
    assert_eq!(xattr(&fx.p("sl"), "trusted.t").unwrap(), b"on-link");
    assert_eq!(xattr(&fx.p("sparse"), "trusted.t"), None);

    // fsync of a file and of a directory (syncfs).
    for (target, datasync) in [(n(), true), (n(), false), (root(), false)] {
        let (_, r) = fx.apply(Op::Fsync {
            node: target,
            fh: 1,
            datasync,
        });
        assert_eq!(r, Ok(()));
    }
}

#[test]
fn divergences_are_reported() {
    let mut fx = Fx::new();
    // The primary created the file, this node cannot (the parent is missing here).
    let (seq, r) = fx.apply(Op::Create {
        entry: entry(node(id(2), Some("missing")), "f"),
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        flags: 0,
        owner: OWNER,
    });
    assert_eq!(r, Err(libc::ENOENT));
    let d = fx
        .applier
        .apply_outcome(
            seq,
            &ok_outcome(Some(attr(id(3), ts(1, 1), ts(1, 1))), None),
        )
        .unwrap_err();
    assert_eq!((d.seq, d.kind), (seq, "create"));
    assert_eq!((d.primary, d.secondary), (None, Some(libc::ENOENT)));
    assert_eq!(d.paths, vec![PathBuf::from("missing/f")]);

    // Both failed alike: no divergence.
    let (seq, r) = fx.apply(Op::Unlink {
        entry: entry(root(), "nothing"),
        target: None,
    });
    assert_eq!(r, Err(libc::ENOENT));
    fx.applier
        .apply_outcome(
            seq,
            &Outcome {
                error: Some(libc::ENOENT),
                attr: None,
                written: None,
                dirs: Vec::new(),
            },
        )
        .unwrap();

    // The primary failed, this node succeeded.
    let (seq, r) = fx.apply(Op::Mkdir {
        entry: entry(root(), "d"),
        mode: 0o755,
        umask: 0,
        owner: OWNER,
    });
    assert_eq!(r, Ok(()));
    let d = fx
        .applier
        .apply_outcome(
            seq,
            &Outcome {
                error: Some(libc::ENOSPC),
                attr: None,
                written: None,
                dirs: Vec::new(),
            },
        )
        .unwrap_err();
    assert_eq!((d.primary, d.secondary), (Some(libc::ENOSPC), None));

    // A short write on the primary.
    let f = id(9);
    fx.create(root(), "f", f);
    let (seq, r) = fx.apply(Op::Write {
        node: node(f, None),
        fh: 1,
        offset: 0,
        data: Cow::Borrowed(b"abcdef"),
        sync: SyncMode::None,
        kill_suidgid: false,
    });
    assert_eq!(r, Ok(()));
    let d = fx
        .applier
        .apply_outcome(seq, &ok_outcome(None, Some(3)))
        .unwrap_err();
    assert_eq!(d.ids, vec![f]);
    assert!(d.detail.unwrap().contains("3 bytes"));
    // An outcome of an unknown mutation is ignored.
    fx.applier
        .apply_outcome(999, &ok_outcome(None, None))
        .unwrap();
}

#[test]
fn names_and_paths_cannot_escape_or_follow_symlinks() {
    let mut fx = Fx::new();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), fx.p("escape")).unwrap();
    fs::create_dir(fx.p("real")).unwrap();
    for name in ["..", ".", "a/b", "", "x\0y"] {
        let (_, r) = fx.apply(Op::Mkdir {
            entry: entry(root(), name),
            mode: 0o755,
            umask: 0,
            owner: OWNER,
        });
        assert_eq!(r, Err(libc::EINVAL), "{name:?}");
    }
    // A parent path through a symlink, or above the root.
    for parent in ["escape", "real/../..", "/etc", "escape/sub"] {
        let (_, r) = fx.apply(Op::Create {
            entry: entry(node(id(50), Some(parent)), "f"),
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            flags: 0,
            owner: OWNER,
        });
        assert!(r.is_err(), "{parent}");
    }
    // Writing to a symlink's path does not write its target.
    fs::write(fx.p("real/target"), b"keep").unwrap();
    std::os::unix::fs::symlink("real/target", fx.p("sl")).unwrap();
    let (_, r) = fx.apply(Op::Write {
        node: node(id(60), Some("sl")),
        fh: 1,
        offset: 0,
        data: Cow::Borrowed(b"XXXX"),
        sync: SyncMode::None,
        kill_suidgid: false,
    });
    assert_eq!(r, Err(libc::EINVAL));
    assert_eq!(fs::read(fx.p("real/target")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn excluded_source_of_a_rename_is_a_divergence() {
    let mut fx = Fx::new();
    let (seq, r) = fx.apply(Op::Rename {
        from: EntryRef {
            excluded: true,
            ..entry(root(), "tmp")
        },
        to: entry(root(), "kept"),
        flags: 0,
        moved: None,
        replaced: None,
    });
    assert_eq!(r, Err(libc::EXDEV));
    assert!(
        fx.applier
            .apply_outcome(seq, &ok_outcome(None, None))
            .is_err()
    );
}
