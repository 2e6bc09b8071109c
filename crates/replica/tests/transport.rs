//! The replication stream between two "processes": a primary mount replicating through a
//! [`NetReplicator`] over loopback TCP to a [`Receiver`] applying to another directory.
//!
//! Needs root and /dev/fuse. `REPLICA_SEED` and `REPLICA_OPS` as in `replicas.rs`. The
//! benchmark is ignored by default:
//! `cargo test --release -p tandem-replica --test transport -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use tandem_fs::{LocalOnly, Mode, Mount, MountOptions, Replicator};
use tandem_replica::transport::PLAINTEXT_HELLO;
use tandem_replica::{
    Applier, Lost, NetOptions, NetReplicator, Receiver, ReplicationState, Security, TransportError,
};

fn noise(secret: &str) -> Security {
    Security::Noise {
        secret: secret.as_bytes().to_vec(),
    }
}

fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Starts a receiver on `b` (in a thread: it accepts one connection).
fn spawn_receiver(
    b: &Path,
    security: &Security,
) -> (SocketAddr, JoinHandle<Result<Receiver, TransportError>>) {
    let (listener, addr) = listen();
    let applier = Applier::open(b).unwrap();
    let security = security.clone();
    let h = std::thread::spawn(move || Receiver::accept(&listener, &security, applier));
    (addr, h)
}

fn connect(
    addr: SocketAddr,
    security: Security,
    timeout: Duration,
) -> (Result<NetReplicator, TransportError>, mpsc::Receiver<Lost>) {
    let (tx, rx) = mpsc::channel();
    let options = NetOptions {
        timeout,
        ..NetOptions::new(security)
    };
    let rep = NetReplicator::connect(addr, options, move |lost: &Lost| {
        let _ = tx.send(lost.clone());
    });
    (rep, rx)
}

fn mount(dir: &Path, rep: Arc<dyn Replicator>) -> MountGuard {
    let options = MountOptions {
        mode: Mode::Primary,
        threads: 4,
        ..MountOptions::default()
    };
    MountGuard(Some(
        Mount::mount_in_place(dir, options, rep).expect("mount"),
    ))
}

/// A replication stream from a mount of `a` to a receiver applying to `b`, connected and running.
struct Stream {
    rep: Arc<NetReplicator>,
    lost: mpsc::Receiver<Lost>,
    receiver: Receiver,
    guard: MountGuard,
}

fn stream(a: &Path, b: &Path, security: &Security, timeout: Duration) -> Stream {
    let (addr, receiver) = spawn_receiver(b, security);
    let (rep, lost) = connect(addr, security.clone(), timeout);
    let rep = Arc::new(rep.unwrap());
    let receiver = receiver.join().unwrap().unwrap();
    let guard = mount(a, rep.clone());
    Stream {
        rep,
        lost,
        receiver,
        guard,
    }
}

fn identical_through_tcp(security: Security, default_ops: u64) {
    let seed = seed();
    let total_ops = env_u64("REPLICA_OPS").unwrap_or(default_ops);
    eprintln!("REPLICA_SEED={seed} REPLICA_OPS={total_ops} security={security:?}");
    watchdog(seed, 300);
    let (_a_dir, _b_dir, a, b) = trees();
    let Stream {
        rep,
        lost,
        mut receiver,
        mut guard,
    } = stream(&a, &b, &security, Duration::from_secs(5));

    let (counts, ran) = run_ops(&a, seed, total_ops, 4);
    let mount_stats = guard.0.as_ref().unwrap().stats();
    guard.0.take().unwrap().unmount().expect("unmount");
    let net = rep.stats();
    rep.close();
    let report = receiver.wait();
    eprintln!(
        "{total_ops} operations in {ran:.1?} (seed {seed}); mount {mount_stats:?}; net {net:?} \
         (mean ack {} µs); receiver {report:?}",
        net.ack_micros / net.acks.max(1)
    );
    assert!(lost.try_recv().is_err(), "no loss reported");
    assert_eq!(rep.state(), ReplicationState::Replicating);
    assert_eq!(report.error, None, "clean end of stream");
    assert_eq!(report.waiting, 0);
    assert_eq!(net.in_flight, 0);
    let divergences = receiver.divergences();
    assert!(
        divergences.is_empty(),
        "seed {seed}: {} divergences, first: {:#?}",
        divergences.len(),
        &divergences[..divergences.len().min(5)]
    );
    assert_eq!(mount_stats.replication_errors, 0, "seed {seed}");
    assert_eq!(
        receiver.applier().pending_len(),
        0,
        "every outcome processed"
    );
    assert_all_kinds(&counts, seed);
    assert_identical(&a, &b, seed);
}

#[test]
fn replicas_identical_through_noise_tcp() {
    identical_through_tcp(noise("cluster secret"), 10_000);
}

#[test]
fn replicas_identical_through_plaintext_tcp() {
    identical_through_tcp(Security::Plaintext, 5_000);
}

#[test]
fn wrong_secret_or_mode_is_refused() {
    let (_a_dir, _b_dir, _a, b) = trees();
    let before = fs::read_dir(&b).unwrap().count();
    for (receiver_side, primary_side) in [
        (noise("right"), noise("wrong")),
        (noise("right"), Security::Plaintext),
        (Security::Plaintext, noise("right")),
    ] {
        let (addr, receiver) = spawn_receiver(&b, &receiver_side);
        let started = Instant::now();
        let (rep, _lost) = connect(addr, primary_side.clone(), Duration::from_secs(5));
        let err = rep.expect_err("the connection is refused");
        let recv_err = receiver.join().unwrap().expect_err("the receiver refuses");
        eprintln!(
            "{primary_side:?} -> {receiver_side:?}: primary: {err}; receiver: {recv_err} ({:?})",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        if matches!(primary_side, Security::Noise { .. })
            && matches!(receiver_side, Security::Noise { .. })
        {
            assert!(matches!(err, TransportError::RefusedByPeer), "{err:?}");
            assert!(matches!(recv_err, TransportError::Auth), "{recv_err:?}");
        }
    }
    assert_eq!(fs::read_dir(&b).unwrap().count(), before, "nothing applied");
}

/// Writes and fsyncs `data` at offset 0 of `path` in a thread; the result comes on the channel.
fn write_in_thread(path: &Path, data: &'static [u8]) -> mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let r = (|| {
            let f = fs::OpenOptions::new().write(true).open(&path)?;
            f.write_all_at(data, 0)?;
            f.sync_all()
        })();
        let _ = tx.send(r);
    });
    rx
}

#[test]
fn receiver_killed_mid_stream_holds_then_records_locally() {
    let (_a_dir, _b_dir, a, b) = trees();
    let security = noise("s");
    let (addr, receiver) = spawn_receiver(&b, &security);
    let timeout = Duration::from_secs(1);
    let (rep, lost) = connect(addr, security, timeout);
    let rep = Arc::new(rep.unwrap());
    let receiver = receiver.join().unwrap().unwrap();
    let mut guard = mount(&a, rep.clone());

    // Replicating: a write goes through.
    fs::write(a.join("held"), b"before").unwrap();
    File::open(a.join("held")).unwrap().sync_all().unwrap();
    // Mid-stream: a stream of writes, then the receiver goes away.
    let stop = Arc::new(AtomicBool::new(false));
    let streaming = {
        let a = a.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(a.join("d0/f1"))
                .unwrap();
            let mut ok = 0u64;
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed)
                    || f.write_all_at(&[i as u8; 4096], (i % 64) * 4096).is_err()
                {
                    break;
                }
                ok += 1;
            }
            ok
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let killed = Instant::now();
    drop(receiver);
    let report = lost.recv_timeout(timeout * 3).expect("loss reported");
    eprintln!("lost after {:?}: {report:?}", killed.elapsed());
    assert!(killed.elapsed() <= timeout + Duration::from_millis(500));
    assert_eq!(rep.state(), ReplicationState::Holding);

    // Holding: a new write does not return.
    let write = write_in_thread(&a.join("held"), b"after!");
    assert!(
        write.recv_timeout(Duration::from_millis(700)).is_err(),
        "the write is held"
    );
    assert!(!streaming.is_finished(), "the streaming writer is held too");

    rep.record_locally();
    write
        .recv_timeout(Duration::from_secs(5))
        .expect("released")
        .expect("completed with Ok");
    assert_eq!(rep.state(), ReplicationState::RecordingLocally);
    let recorded = rep.recorded();
    eprintln!("recorded locally: {} mutations", recorded.len());
    assert!(
        recorded.len() >= 2,
        "the held write and fsync: {recorded:?}"
    );
    // New writes complete at once and are recorded.
    fs::write(a.join("new"), b"x").unwrap();
    assert!(rep.recorded().len() > recorded.len());
    assert_eq!(fs::read(a.join("held")).unwrap(), b"after!");
    stop.store(true, Ordering::Relaxed);
    let n = streaming.join().unwrap();
    eprintln!("streaming writer: {n} writes");
    guard.0.take().unwrap().unmount().unwrap();
    assert!(lost.try_recv().is_err(), "loss reported once");
}

/// A receiver that completes the handshake, then never acks (an unresponsive secondary).
fn black_hole() -> (SocketAddr, JoinHandle<()>, mpsc::Sender<()>) {
    let (listener, addr) = listen();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        tandem_replica::transport::read_magic(&mut s).unwrap();
        let mut hello = vec![0u8; 4 + PLAINTEXT_HELLO.len()];
        s.read_exact(&mut hello).unwrap();
        let mut reply = (PLAINTEXT_HELLO.len() as u32).to_le_bytes().to_vec();
        reply.extend_from_slice(PLAINTEXT_HELLO);
        s.write_all(&reply).unwrap();
        // Keep the connection open, reading nothing, until told to stop.
        let _ = stop_rx.recv();
    });
    (addr, h, stop_tx)
}

#[test]
fn unresponsive_secondary_times_out_then_fail_all() {
    let (_a_dir, _b_dir, a, _b) = trees();
    let (addr, hole, stop) = black_hole();
    let timeout = Duration::from_millis(800);
    let (rep, lost) = connect(addr, Security::Plaintext, timeout);
    let rep = Arc::new(rep.unwrap());
    let mut guard = mount(&a, rep.clone());

    let started = Instant::now();
    let write = write_in_thread(&a.join("f0"), b"held");
    let report = lost.recv_timeout(timeout * 4).expect("loss reported");
    let after = started.elapsed();
    eprintln!("lost after {after:?}: {report:?}");
    assert!(after >= timeout && after < timeout * 2, "{after:?}");
    assert!(report.reason.contains("no ack"), "{report:?}");
    assert!(report.held >= 1);
    assert!(
        write.recv_timeout(Duration::from_millis(500)).is_err(),
        "held"
    );
    rep.fail_all();
    let r = write
        .recv_timeout(Duration::from_secs(5))
        .expect("released");
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(rep.state(), ReplicationState::Failed);
    assert!(rep.recorded().is_empty());
    guard.0.take().unwrap().unmount().ok();
    let _ = stop.send(());
    hole.join().unwrap();
}

#[test]
fn abort_declares_the_secondary_lost_and_bytes_in_flight_are_counted() {
    use std::borrow::Cow;
    use tandem_fs::{Completion, FileId, Mutation, NodeRef, Op, SyncMode};
    use tandem_replica::Connection;
    use tandem_replica::transport::read_magic;

    // A secondary that authenticates and never acks.
    let (listener, addr) = listen();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_magic(&mut s).unwrap();
        Connection::accept(s, &Security::Plaintext).unwrap()
    });
    let conn = Connection::dial(addr, &Security::Plaintext).unwrap();
    let _peer = peer.join().unwrap();
    let (tx, lost) = mpsc::channel();
    let options = NetOptions {
        timeout: Duration::from_secs(60),
        ..NetOptions::new(Security::Plaintext)
    };
    let rep = NetReplicator::start(conn, 10, options, move |l: &Lost| {
        let _ = tx.send(l.clone());
    })
    .unwrap();
    let write = |seq| Mutation {
        seq,
        replicate: true,
        op: Op::Write {
            node: NodeRef {
                nodeid: 2,
                generation: 0,
                id: FileId { dev: 1, ino: 2 },
                path: Some("f".into()),
            },
            fh: 1,
            offset: 0,
            data: Cow::Owned(vec![7; 5000]),
            sync: SyncMode::None,
            kill_suidgid: false,
        },
    };
    // Below the first seq: not sent, failed.
    rep.submit(&write(9), Completion::detached());
    assert_eq!(rep.stats().in_flight, 0);
    rep.submit(&write(10), Completion::detached());
    rep.submit(&write(11), Completion::detached());
    let stats = rep.stats();
    assert_eq!(stats.in_flight, 2);
    assert!(stats.in_flight_bytes > 10_000, "{stats:?}");
    rep.abort("the secondary asked for a new synchronisation");
    let report = lost.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        report.reason,
        "the secondary asked for a new synchronisation"
    );
    assert_eq!(report.held, 2);
    assert_eq!(rep.state(), ReplicationState::Holding);
    rep.fail_all();
    let stats = rep.stats();
    assert_eq!((stats.in_flight, stats.in_flight_bytes), (0, 0));
    assert!(lost.try_recv().is_err(), "reported once");
}

// ------------------------------------------------------------------------------------ benchmark

struct Figures {
    seq_mb_s: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Lets the writeback of the previous phase finish, so that it does not slow the next one.
fn settle() {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
}

fn measure(dir: &Path, seq_mib: usize, iops_for: Duration) -> Figures {
    // Page-aligned, as dd and databases write: an unaligned 1 MiB buffer spans 257 pages and
    // FUSE direct I/O splits it into two requests.
    let storage = vec![0x5au8; (1 << 20) + 4096];
    let at = storage.as_ptr().align_offset(4096).min(4096);
    let block = &storage[at..at + (1 << 20)];
    settle();
    let started = Instant::now();
    {
        let mut f = File::create(dir.join("seq")).unwrap();
        for _ in 0..seq_mib {
            f.write_all(block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let seq_mb_s = (seq_mib as f64 * 1.048_576) / started.elapsed().as_secs_f64();
    settle();
    let f = File::create(dir.join("iops")).unwrap();
    let small = [0xa5u8; 4096];
    let mut lat = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < iops_for {
        let t = Instant::now();
        f.write_all_at(&small, (i % 1024) * 4096).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
        i += 1;
    }
    let iops = i as f64 / started.elapsed().as_secs_f64();
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    Figures {
        seq_mb_s,
        iops,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

/// `BENCH_ROWS` (comma-separated row names, e.g. `Net plaintext`) limits the benchmark to those
/// rows; all of them by default.
fn bench_row_selected(name: &str) -> bool {
    std::env::var("BENCH_ROWS").map_or(true, |rows| rows.split(',').any(|r| r.trim() == name))
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release)"]
fn benchmark_net_replicator_vs_local_only() {
    let seq_mib = env_u64("BENCH_MIB").unwrap_or(256) as usize;
    let iops_for = Duration::from_secs(env_u64("BENCH_SECS").unwrap_or(3));
    let mut rows = Vec::new();
    for name in [
        "plain directory",
        "LocalOnly mount",
        "Net plaintext",
        "Net noise",
    ]
    .into_iter()
    .filter(|name| bench_row_selected(name))
    {
        let a_dir = tempfile::Builder::new()
            .prefix("tandem-bench-a")
            .tempdir()
            .unwrap();
        let b_dir = tempfile::Builder::new()
            .prefix("tandem-bench-b")
            .tempdir()
            .unwrap();
        let (a, b) = (a_dir.path().to_path_buf(), b_dir.path().to_path_buf());
        let figures = match name {
            "plain directory" => measure(&a, seq_mib, iops_for),
            "LocalOnly mount" => {
                let mut guard = mount(&a, Arc::new(LocalOnly));
                let f = measure(&a, seq_mib, iops_for);
                guard.0.take().unwrap().unmount().unwrap();
                f
            }
            _ => {
                let security = if name == "Net noise" {
                    noise("bench")
                } else {
                    Security::Plaintext
                };
                let Stream {
                    rep,
                    lost: _lost,
                    mut receiver,
                    mut guard,
                } = stream(&a, &b, &security, Duration::from_secs(5));
                let f = measure(&a, seq_mib, iops_for);
                guard.0.take().unwrap().unmount().unwrap();
                let net = rep.stats();
                rep.close();
                let report = receiver.wait();
                eprintln!(
                    "{name}: {} acks, mean ack {} µs, receiver {:?}",
                    net.acks,
                    net.ack_micros / net.acks.max(1),
                    report.stats
                );
                assert_eq!(
                    fs::metadata(b.join("seq")).unwrap().len(),
                    (seq_mib << 20) as u64
                );
                f
            }
        };
        rows.push((name, figures));
    }
    let Some(local) = rows
        .iter()
        .find(|(name, _)| *name == "LocalOnly mount")
        .or(rows.first())
        .map(|(_, f)| f)
    else {
        return;
    };
    eprintln!(
        "\nsequential {seq_mib} MiB in 1 MiB writes + fsync; 4 KiB write+fdatasync for {iops_for:?}"
    );
    eprintln!(
        "{:<18} {:>10} {:>8} {:>10} {:>8} {:>9} {:>9}",
        "", "seq MB/s", "ratio", "IOPS", "ratio", "p50 µs", "p99 µs"
    );
    for (name, f) in &rows {
        eprintln!(
            "{name:<18} {:>10.0} {:>7.0}% {:>10.0} {:>7.0}% {:>9.0} {:>9.0}",
            f.seq_mb_s,
            100.0 * f.seq_mb_s / local.seq_mb_s,
            f.iops,
            100.0 * f.iops / local.iops,
            f.p50_us,
            f.p99_us
        );
    }
    eprintln!("(ratios against the LocalOnly mount)");
}

/// A divergence (the secondary's result differs from the primary's) ends the stream: the
/// primary counts the secondary as lost (so the daemon starts a new generation and
/// resynchronises it) instead of going on with replicas that differ.
/// A failure of the secondary alone (here `EEXIST`, as a full disk there would give `ENOSPC`)
/// does not fail the application's call: the primary counts the secondary lost (its copy no
/// longer matches), holds the mutation, and completes it once it goes on alone.
#[test]
fn a_failure_of_the_secondary_alone_loses_it_and_the_call_succeeds() {
    let (_a_dir, _b_dir, a, b) = trees();
    // Only on the secondary: the primary's mkdir succeeds, the secondary's fails (EEXIST).
    fs::write(b.join("only-here"), b"x").unwrap();
    let security = noise("s");
    let Stream {
        rep,
        lost,
        mut receiver,
        mut guard,
    } = stream(&a, &b, &security, Duration::from_secs(5));
    let mkdir = {
        let path = a.join("only-here");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(fs::create_dir(path));
        });
        rx
    };
    let report = lost
        .recv_timeout(Duration::from_secs(10))
        .expect("the primary sees the secondary lost");
    eprintln!("lost: {report:?}");
    assert!(
        report.reason.contains("failed mkdir") && report.reason.contains("succeeded here"),
        "{report:?}"
    );
    assert_eq!(report.held, 1, "the mkdir is held");
    let ended = receiver.wait();
    eprintln!("secondary: {ended:?}");
    assert_eq!(rep.state(), ReplicationState::Holding);
    assert!(
        mkdir.recv_timeout(Duration::from_millis(300)).is_err(),
        "held until the primary goes on alone"
    );
    rep.record_locally();
    let result = mkdir
        .recv_timeout(Duration::from_secs(10))
        .expect("the mkdir returns once recorded");
    assert!(result.is_ok(), "the call succeeds: {result:?}");
    assert!(a.join("only-here").is_dir(), "applied on the primary");
    assert_eq!(rep.recorded().len(), 1);
    guard.0.take().unwrap().unmount().unwrap();
}

/// A mutation that fails on both nodes the same way gives the application the error and
/// leaves the stream as it was.
#[test]
fn the_same_failure_on_both_nodes_is_the_applications_error_and_replication_goes_on() {
    let (_a_dir, _b_dir, a, b) = trees();
    for root in [&a, &b] {
        fs::create_dir(root.join("full")).unwrap();
        fs::write(root.join("full/f"), b"x").unwrap();
    }
    let security = Security::Plaintext;
    let Stream {
        rep,
        lost,
        mut receiver,
        mut guard,
    } = stream(&a, &b, &security, Duration::from_secs(5));
    let err = fs::remove_dir(a.join("full")).expect_err("not empty");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "{err}");
    // Replication goes on.
    fs::write(a.join("after"), b"still replicated").unwrap();
    File::open(a.join("after")).unwrap().sync_all().unwrap();
    assert_eq!(rep.state(), ReplicationState::Replicating);
    assert_eq!(rep.stats().in_flight, 0);
    guard.0.take().unwrap().unmount().unwrap();
    rep.close();
    let report = receiver.wait();
    assert!(lost.try_recv().is_err(), "no loss");
    assert_eq!(report.error, None);
    assert!(receiver.divergences().is_empty());
    assert_eq!(fs::read(b.join("after")).unwrap(), b"still replicated");
}

/// Large writes are written on the secondary while their frames arrive (write-ahead), and the
/// result is the same file: several 1 MiB writes from a page-aligned buffer (one request
/// each), an unaligned one (split by the kernel), an `O_DSYNC` one and an overwrite in the
/// middle, over Noise and over plaintext.
#[test]
fn large_writes_are_written_ahead_and_identical() {
    for security in [noise("ahead"), Security::Plaintext] {
        let (_a_dir, _b_dir, a, b) = trees();
        let Stream {
            rep,
            lost,
            mut receiver,
            mut guard,
        } = stream(&a, &b, &security, Duration::from_secs(5));

        let mib = 1usize << 20;
        let storage: Vec<u8> = (0..4 * mib + 8192)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let at = storage.as_ptr().align_offset(4096).min(4096);
        {
            let mut f = File::create(a.join("big")).unwrap();
            for i in 0..3 {
                f.write_all(&storage[at + i * mib..at + (i + 1) * mib])
                    .unwrap();
            }
            // Unaligned, odd length.
            f.write_all(&storage[at + 17..at + 17 + mib + 333]).unwrap();
            f.sync_all().unwrap();
        }
        {
            let f = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .open(a.join("big"))
                .unwrap();
            f.write_all_at(&storage[at + 2 * mib..at + 3 * mib], 512 * 1024)
                .unwrap();
        }
        let ahead = receiver.stats().written_ahead;
        guard.0.take().unwrap().unmount().unwrap();
        rep.close();
        let report = receiver.wait();
        assert!(lost.try_recv().is_err(), "{security:?}: no loss");
        assert_eq!(report.error, None, "{security:?}");
        assert!(receiver.divergences().is_empty(), "{security:?}");
        assert!(
            ahead >= 2 * mib as u64,
            "{security:?}: large writes were written ahead ({ahead} bytes)"
        );
        let primary = fs::read(a.join("big")).unwrap();
        let secondary = fs::read(b.join("big")).unwrap();
        assert_eq!(primary.len(), 4 * mib + 333);
        assert!(primary == secondary, "{security:?}: the copies differ");
    }
}

/// Flush-behind on both nodes: a write to a file that was never synced stays in the page cache
/// (the kernel's delayed writeback), a write to a file synced recently is written back at once,
/// on the primary and on the secondary, without waiting for its `fsync`.
#[test]
fn writes_to_recently_synced_files_are_written_back_at_once_on_both_nodes() {
    use tandem_testkit::sys::{cachestat, wait_written_back};
    let (_a_dir, _b_dir, a, b) = trees();
    for dir in [&a, &b] {
        fs::write(dir.join("log"), b"").unwrap();
    }
    // The backing files, opened before the mount hides the primary's.
    let backing = [
        File::open(a.join("log")).unwrap(),
        File::open(b.join("log")).unwrap(),
    ];
    let Stream {
        rep,
        lost,
        mut receiver,
        mut guard,
    } = stream(&a, &b, &noise("behind"), Duration::from_secs(5));
    let f = fs::OpenOptions::new()
        .write(true)
        .open(a.join("log"))
        .unwrap();
    let chunk = vec![5u8; 256 << 10];

    f.write_all_at(&chunk, 0).unwrap();
    for (node, b) in ["primary", "secondary"].iter().zip(&backing) {
        assert!(
            cachestat(b).unwrap().dirty > 0,
            "{node}: a file never synced keeps the kernel's writeback"
        );
    }
    assert_eq!(receiver.stats().flushed_behind, 0);

    f.sync_data().unwrap();
    f.write_all_at(&chunk, 256 << 10).unwrap();
    for (node, b) in ["primary", "secondary"].iter().zip(&backing) {
        assert!(
            wait_written_back(b, Duration::from_secs(20)).unwrap(),
            "{node}: the write after a sync is written back without waiting for the next sync"
        );
    }
    assert_eq!(receiver.stats().flushed_behind, 1);

    drop(f);
    guard.0.take().unwrap().unmount().unwrap();
    rep.close();
    let report = receiver.wait();
    assert!(lost.try_recv().is_err());
    assert_eq!(report.error, None);
    assert!(receiver.divergences().is_empty());
    assert_eq!(fs::read(b.join("log")).unwrap().len(), 512 << 10);
}
