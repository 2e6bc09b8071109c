//! I/O workloads of the replication benchmark (run by `bench/replication.sh`); prints one JSON
//! line with the figures.
//!
//! ```text
//! io_bench seq     [--mib N]     [--parallel K] DIR...   sequential 1 MiB writes, then fsync
//! io_bench fsync4k [--seconds S] [--parallel K] DIR...   4 KiB write + fsync, queue depth 1
//! ```
//!
//! One stream (thread) per directory, started together; `--parallel K` only checks that K
//! directories were given (the benchmark's "two-copy limit": the same data written twice at once).
//! Every stream writes a new file of its own (`O_CREAT | O_EXCL`), removed afterwards (untimed).
//! The data is pseudo-random (nothing to gain from compression or zero detection).
//!
//! - `seq`: `--mib` (default 1024) `pwrite` calls of 1 MiB at successive offsets, then one `fsync`;
//!   the time counts both. `mb_per_s` is the throughput of *one copy*: bytes of one stream over the
//!   time until the last stream has finished its fsync (MB = 10^6 bytes).
//! - `fsync4k`: for `--seconds` (default 10), `pwrite` of 4 KiB at successive offsets of a file
//!   opened `O_WRONLY`, each followed by `fsync`. The file is *not* preallocated: it grows with
//!   every write, as a database log being appended to, so each fsync also commits the new size.
//!   One operation = write + fsync; `iops` is per stream (the mean over the streams), `p50_us` and
//!   `p99_us` are latencies of the operations of all streams together.
//!
//! Needs nothing but the directories; runs as any user who may create files there.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

const USAGE: &str = "usage: io_bench seq [--mib N] [--parallel K] DIR...\n       \
                     io_bench fsync4k [--seconds S] [--parallel K] DIR...";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Seq,
    Fsync4k,
}

#[derive(Debug)]
struct Args {
    workload: Workload,
    mib: u64,
    seconds: f64,
    dirs: Vec<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let workload = match args.next().as_deref() {
        Some("seq") => Workload::Seq,
        Some("fsync4k") => Workload::Fsync4k,
        _ => bail!("{USAGE}"),
    };
    let mut parsed = Args {
        workload,
        mib: 1024,
        seconds: 10.0,
        dirs: Vec::new(),
    };
    let mut parallel = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--mib" => parsed.mib = value("--mib")?.parse().context("--mib")?,
            "--seconds" => parsed.seconds = value("--seconds")?.parse().context("--seconds")?,
            "--parallel" => {
                parallel = Some(
                    value("--parallel")?
                        .parse::<usize>()
                        .context("--parallel")?,
                );
            }
            flag if flag.starts_with("--") => bail!("unknown option {flag}\n{USAGE}"),
            dir => parsed.dirs.push(PathBuf::from(dir)),
        }
    }
    let expected = parallel.unwrap_or(1);
    if parsed.dirs.len() != expected {
        bail!(
            "{expected} director{} expected, {} given\n{USAGE}",
            if expected == 1 { "y" } else { "ies" },
            parsed.dirs.len()
        );
    }
    if parsed.mib == 0 || !parsed.seconds.is_finite() || parsed.seconds <= 0.0 {
        bail!("--mib and --seconds must be positive");
    }
    Ok(parsed)
}

/// Pseudo-random bytes (xorshift64*), different for every seed.
/// Page size for buffer alignment.
const PAGE: usize = 4096;

/// A buffer of `len` pattern bytes that starts on a page boundary, as `dd` and databases use
/// for large writes. With an unaligned buffer a 1 MiB write spans 257 pages, and the kernel's
/// FUSE direct I/O (at most 256 pages per request by default) splits it into two requests:
/// the benchmark would measure that split rather than 1 MiB writes.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, seed: u64) -> Aligned {
        let mut storage = vec![0u8; len + PAGE];
        let start = storage.as_ptr().align_offset(PAGE).min(PAGE);
        storage[start..start + len].copy_from_slice(&pattern(len, seed));
        Aligned {
            storage,
            start,
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A new file of this process in `dir`, removed when dropped.
struct Scratch {
    path: PathBuf,
    file: File,
}

impl Scratch {
    fn create(dir: &Path, workload: &str, stream: usize) -> Result<Scratch> {
        let path = dir.join(format!(
            ".io_bench-{workload}-{}-{stream}",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Scratch { path, file })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("io_bench: cannot remove {}: {e}", self.path.display());
        }
    }
}

struct SeqStream {
    start: Instant,
    fsync_start: Instant,
    end: Instant,
}

fn seq_stream(
    scratch: &Scratch,
    mib: u64,
    stream: usize,
    barrier: &Barrier,
) -> std::io::Result<SeqStream> {
    let buffer = Aligned::new(MIB, stream as u64 + 1);
    barrier.wait();
    let start = Instant::now();
    for index in 0..mib {
        scratch
            .file
            .write_all_at(buffer.bytes(), index * MIB as u64)?;
    }
    let fsync_start = Instant::now();
    scratch.file.sync_all()?;
    Ok(SeqStream {
        start,
        fsync_start,
        end: Instant::now(),
    })
}

struct FsyncStream {
    start: Instant,
    end: Instant,
    /// Per operation: (write, fsync).
    ops: Vec<(Duration, Duration)>,
}

fn fsync_stream(
    scratch: &Scratch,
    seconds: f64,
    stream: usize,
    barrier: &Barrier,
) -> std::io::Result<FsyncStream> {
    let buffer = Aligned::new(BLOCK, stream as u64 + 1);
    let mut ops = Vec::with_capacity(100_000);
    barrier.wait();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut offset = 0u64;
    loop {
        let before = Instant::now();
        scratch.file.write_all_at(buffer.bytes(), offset)?;
        let written = Instant::now();
        scratch.file.sync_all()?;
        let synced = Instant::now();
        ops.push((written - before, synced - written));
        offset += BLOCK as u64;
        if synced >= deadline {
            return Ok(FsyncStream {
                start,
                end: synced,
                ops,
            });
        }
    }
}

/// Runs `work` on one thread per scratch file, all released together by a barrier.
fn run_streams<T: Send + 'static>(
    scratches: Vec<Scratch>,
    work: impl Fn(&Scratch, usize, &Barrier) -> std::io::Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let barrier = Arc::new(Barrier::new(scratches.len()));
    let work = Arc::new(work);
    let handles: Vec<_> = scratches
        .into_iter()
        .enumerate()
        .map(|(stream, scratch)| {
            let barrier = Arc::clone(&barrier);
            let work = Arc::clone(&work);
            std::thread::spawn(move || {
                let result = work(&scratch, stream, &barrier)
                    .with_context(|| format!("I/O error on {}", scratch.path.display()));
                drop(scratch);
                result
            })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        match handle.join() {
            Ok(result) => results.push(result?),
            Err(_) => bail!("a stream thread panicked"),
        }
    }
    Ok(results)
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    micros(sorted[rank - 1])
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn seq(args: &Args, scratches: Vec<Scratch>) -> Result<Value> {
    let mib = args.mib;
    let streams = run_streams(scratches, move |scratch, stream, barrier| {
        seq_stream(scratch, mib, stream, barrier)
    })?;
    let bytes = (mib as usize * MIB) as f64;
    let (Some(first), Some(last)) = (
        streams.iter().map(|s| s.start).min(),
        streams.iter().map(|s| s.end).max(),
    ) else {
        bail!("no stream ran");
    };
    let seconds = (last - first).as_secs_f64();
    let detail: Vec<Value> = streams
        .iter()
        .zip(&args.dirs)
        .map(|(s, dir)| {
            let total = (s.end - s.start).as_secs_f64();
            json!({
                "dir": dir,
                "seconds": round(total, 3),
                "write_seconds": round((s.fsync_start - s.start).as_secs_f64(), 3),
                "fsync_seconds": round((s.end - s.fsync_start).as_secs_f64(), 3),
                "mb_per_s": round(bytes / total / 1e6, 1),
            })
        })
        .collect();
    Ok(json!({
        "workload": "seq",
        "streams": streams.len(),
        "mib": mib,
        "block_bytes": MIB,
        "seconds": round(seconds, 3),
        "mb_per_s": round(bytes / seconds / 1e6, 1),
        "aggregate_mb_per_s": round(bytes * streams.len() as f64 / seconds / 1e6, 1),
        "per_stream": detail,
    }))
}

fn fsync4k(args: &Args, scratches: Vec<Scratch>) -> Result<Value> {
    let seconds = args.seconds;
    let streams = run_streams(scratches, move |scratch, stream, barrier| {
        fsync_stream(scratch, seconds, stream, barrier)
    })?;
    let mut all: Vec<Duration> = Vec::new();
    let mut writes: Vec<Duration> = Vec::new();
    let mut fsyncs: Vec<Duration> = Vec::new();
    let mut detail = Vec::new();
    let mut iops_sum = 0.0;
    for (stream, dir) in streams.iter().zip(&args.dirs) {
        let elapsed = (stream.end - stream.start).as_secs_f64();
        let iops = stream.ops.len() as f64 / elapsed;
        iops_sum += iops;
        let mut own: Vec<Duration> = stream.ops.iter().map(|(w, f)| *w + *f).collect();
        own.sort_unstable();
        detail.push(json!({
            "dir": dir,
            "ops": stream.ops.len(),
            "seconds": round(elapsed, 3),
            "iops": round(iops, 1),
            "p50_us": round(percentile(&own, 0.50), 1),
            "p99_us": round(percentile(&own, 0.99), 1),
        }));
        all.extend(own);
        writes.extend(stream.ops.iter().map(|(w, _)| *w));
        fsyncs.extend(stream.ops.iter().map(|(_, f)| *f));
    }
    all.sort_unstable();
    writes.sort_unstable();
    fsyncs.sort_unstable();
    let mean = all.iter().map(|d| micros(*d)).sum::<f64>() / all.len().max(1) as f64;
    Ok(json!({
        "workload": "fsync4k",
        "streams": streams.len(),
        "block_bytes": BLOCK,
        "preallocated": false,
        "seconds": seconds,
        "ops": all.len(),
        "iops": round(iops_sum / streams.len().max(1) as f64, 1),
        "total_iops": round(iops_sum, 1),
        "p50_us": round(percentile(&all, 0.50), 1),
        "p99_us": round(percentile(&all, 0.99), 1),
        "mean_us": round(mean, 1),
        "max_us": round(all.last().copied().map(micros).unwrap_or(0.0), 1),
        "write_p50_us": round(percentile(&writes, 0.50), 1),
        "fsync_p50_us": round(percentile(&fsyncs, 0.50), 1),
        "per_stream": detail,
    }))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let name = match args.workload {
        Workload::Seq => "seq",
        Workload::Fsync4k => "fsync4k",
    };
    let scratches = args
        .dirs
        .iter()
        .enumerate()
        .map(|(stream, dir)| Scratch::create(dir, name, stream))
        .collect::<Result<Vec<_>>>()?;
    let figures = match args.workload {
        Workload::Seq => seq(&args, scratches)?,
        Workload::Fsync4k => fsync4k(&args, scratches)?,
    };
    println!("{figures}");
    Ok(())
}
