//! The module log (one line per event) and the application log (user script output).
//!
//! Both are plain text files opened with `O_APPEND`, rotated by size: when a write would make the
//! file larger than `max_bytes`, `FILE.(keep-1)` is renamed to `FILE.keep`, ..., `FILE.1` to
//! `FILE.2`, `FILE` to `FILE.1`, and a fresh `FILE` is opened. At most `keep` rotated files are
//! kept (the oldest is overwritten by the rename).
//!
//! Every line is written with a single `write_all` on the `O_APPEND` descriptor, so lines are
//! never interleaved with the output of child processes that append to the same file, and a line
//! is in the kernel as soon as the call returns (no user-space buffering).

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Default size above which a log file is rotated: 10 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// Default number of rotated files kept (`FILE.1` ... `FILE.5`).
pub const DEFAULT_KEEP: usize = 5;

/// Permissions of newly created log files.
const LOG_MODE: u32 = 0o640;

/// Severity of a module log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// Normal event (`I`).
    Info,
    /// Something needs attention (`W`).
    Warn,
    /// Something failed (`E`).
    Error,
}

impl Level {
    /// The letter written in the log line: `I`, `W` or `E`.
    pub fn letter(self) -> char {
        match self {
            Level::Info => 'I',
            Level::Warn => 'W',
            Level::Error => 'E',
        }
    }

    /// The level written as `letter` in a log line, if any.
    pub fn from_letter(letter: char) -> Option<Level> {
        match letter {
            'I' => Some(Level::Info),
            'W' => Some(Level::Warn),
            'E' => Some(Level::Error),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// Formats `time` as a UTC timestamp with milliseconds: `2026-11-26T00:41:07.123Z`.
///
/// Times before 1970 are written as the epoch.
pub fn utc_timestamp(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    // u64 seconds / 86400 always fits in i64.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// The current time formatted by [`utc_timestamp`].
pub fn now_timestamp() -> String {
    utc_timestamp(SystemTime::now())
}

/// Proleptic Gregorian date of the day `days` after 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // day and month are in the small ranges noted above.
    (year, month as u32, day as u32)
}

/// Replaces line breaks and other control characters (except tab) with spaces, so that one
/// message is always one line.
fn one_line(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect()
}

/// The path of the `index`-th rotated file: `FILE.index`.
fn rotated_path(path: &Path, index: usize) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(LOG_MODE)
        .open(path)
}

/// A size-rotated, append-only text file shared by [`ModuleLog`] and [`AppLog`].
#[derive(Debug)]
struct Rotating {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    /// The open current file; `None` until first use or after an I/O error.
    file: Mutex<Option<File>>,
}

impl Rotating {
    fn new(path: PathBuf, max_bytes: u64, keep: usize) -> io::Result<Rotating> {
        let file = open_append(&path)?;
        Ok(Rotating {
            path,
            max_bytes,
            keep,
            file: Mutex::new(Some(file)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<File>> {
        // A panic while holding the lock leaves at worst a half-written line; keep logging.
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns the current file, opened if needed and rotated first if writing `incoming` more
    /// bytes would exceed `max_bytes` (a non-empty file is always rotated when it already
    /// exceeds the limit).
    fn current<'a>(&self, slot: &'a mut Option<File>, incoming: u64) -> io::Result<&'a mut File> {
        if let Some(file) = slot.as_ref() {
            let meta = file.metadata()?;
            let deleted = meta.nlink() == 0;
            let full = self.max_bytes > 0
                && meta.len() > 0
                && meta.len().saturating_add(incoming) > self.max_bytes;
            if deleted {
                *slot = None;
            } else if full {
                *slot = None;
                self.rotate()?;
            }
        }
        match slot {
            Some(file) => Ok(file),
            None => Ok(slot.insert(open_append(&self.path)?)),
        }
    }

    /// Shifts the rotated files and moves the current file to `FILE.1`.
    fn rotate(&self) -> io::Result<()> {
        if self.keep == 0 {
            return ignore_not_found(std::fs::remove_file(&self.path));
        }
        for index in (1..self.keep).rev() {
            let from = rotated_path(&self.path, index);
            ignore_not_found(std::fs::rename(&from, rotated_path(&self.path, index + 1)))?;
        }
        ignore_not_found(std::fs::rename(&self.path, rotated_path(&self.path, 1)))
    }

    /// Appends `line` (which must end with a newline) with one `write_all`.
    fn append(&self, line: &str) -> io::Result<()> {
        let mut slot = self.lock();
        let result = self
            .current(&mut slot, line.len() as u64)
            .and_then(|file| file.write_all(line.as_bytes()));
        if result.is_err() {
            // Reopen on the next write.
            *slot = None;
        }
        result
    }

    /// A new descriptor of the current file (same open file description, `O_APPEND`), rotated
    /// first if it already reached `max_bytes`.
    fn handle(&self) -> io::Result<File> {
        let mut slot = self.lock();
        let result = self.current(&mut slot, 1).and_then(|file| file.try_clone());
        if result.is_err() {
            *slot = None;
        }
        result
    }

    /// The last `n` lines, oldest first, from the current file and as many rotated files as
    /// needed.
    fn tail(&self, n: usize) -> io::Result<Vec<String>> {
        // Hold the lock so that no rotation happens while the files are read.
        let _guard = self.lock();
        let mut lines = Vec::new();
        for index in 0..=self.keep {
            if lines.len() >= n {
                break;
            }
            let path = if index == 0 {
                self.path.clone()
            } else {
                rotated_path(&self.path, index)
            };
            let mut older = match tail_file(&path, n - lines.len()) {
                Ok(older) => older,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            older.append(&mut lines);
            lines = older;
        }
        Ok(lines)
    }

    fn follow(&self) -> io::Result<LogFollower> {
        let _guard = self.lock();
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::End(0))?;
        let meta = file.metadata()?;
        Ok(LogFollower {
            path: self.path.clone(),
            keep: self.keep,
            ino: meta.ino(),
            dev: meta.dev(),
            file,
            partial: Vec::new(),
        })
    }
}

fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Reads the last `n` lines of the file at `path`, oldest first, reading backwards in chunks
/// (the file is not read whole). A last line without a final newline counts as a line.
fn tail_file(path: &Path, n: usize) -> io::Result<Vec<String>> {
    const CHUNK: u64 = 16 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if n == 0 || len == 0 {
        return Ok(Vec::new());
    }
    // Bytes from `start` to the end of the file, read so far.
    let mut buf: Vec<u8> = Vec::new();
    let mut start = len;
    loop {
        // Newlines in `buf`, not counting a final one at the very end of the file.
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let newlines = body.iter().filter(|&&b| b == b'\n').count();
        if newlines >= n || start == 0 {
            break;
        }
        let read_from = start.saturating_sub(CHUNK);
        // At most CHUNK bytes, which fits in usize.
        let mut chunk = vec![0; (start - read_from) as usize];
        file.seek(SeekFrom::Start(read_from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        start = read_from;
    }
    let text = String::from_utf8_lossy(&buf);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let mut lines: Vec<String> = text.rsplit('\n').take(n).map(str::to_owned).collect();
    // When the whole file was read and it is shorter than n lines, every piece is a line;
    // otherwise the first piece may be a partial line and is excluded by take(n).
    lines.reverse();
    Ok(lines)
}

/// Reads the lines appended to a log after it was created, across rotations (`tail -F`).
///
/// Call [`LogFollower::read_new`] periodically (for instance every 200 ms).
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    keep: usize,
    file: File,
    ino: u64,
    dev: u64,
    /// An incomplete last line, waiting for its newline.
    partial: Vec<u8>,
}

impl LogFollower {
    /// Complete lines appended since the previous call (the follower starts at the end of the
    /// file). If the log was rotated, the rest of the old file is returned first, then the
    /// rotated files newer than it (if it rotated more than once since the previous call), then
    /// the new file is followed from its beginning. Best effort: lines can be missed if the log
    /// rotates again while this reads it, or if more than `keep` rotations happened.
    pub fn read_new(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        self.drain(&mut lines)?;
        let rotated = match std::fs::metadata(&self.path) {
            Ok(meta) => meta.ino() != self.ino || meta.dev() != self.dev,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if rotated {
            // Lines written to the old file just before the rename.
            self.drain(&mut lines)?;
            self.flush_partial(&mut lines);
            // Rotated files newer than the old one, oldest first: those after it in the chain,
            // or the whole chain if it is no longer there.
            let newer = (1..=self.keep)
                .find(|&index| {
                    std::fs::metadata(rotated_path(&self.path, index))
                        .is_ok_and(|meta| meta.ino() == self.ino && meta.dev() == self.dev)
                })
                .unwrap_or(self.keep + 1);
            for index in (1..newer).rev() {
                match File::open(rotated_path(&self.path, index)) {
                    Ok(file) => {
                        self.file = file;
                        self.drain(&mut lines)?;
                        self.flush_partial(&mut lines);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            let file = File::open(&self.path)?;
            let meta = file.metadata()?;
            self.file = file;
            self.ino = meta.ino();
            self.dev = meta.dev();
            self.drain(&mut lines)?;
        }
        Ok(lines)
    }

    /// Returns an unterminated last line of a file that will not grow any more.
    fn flush_partial(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
    }

    fn drain(&mut self, lines: &mut Vec<String>) -> io::Result<()> {
        let mut data = Vec::new();
        self.file.read_to_end(&mut data)?;
        if data.is_empty() {
            return Ok(());
        }
        self.partial.extend_from_slice(&data);
        if let Some(last) = self.partial.iter().rposition(|&b| b == b'\n') {
            let rest = self.partial.split_off(last + 1);
            let complete = std::mem::replace(&mut self.partial, rest);
            let text = String::from_utf8_lossy(&complete[..complete.len() - 1]);
            lines.extend(text.split('\n').map(str::to_owned));
        }
        Ok(())
    }
}

/// The persistent module log: one line per event, `2026-11-26T00:41:07.123Z I <message>`.
///
/// Cheap to clone (clones share the file); usable from sync and async code (each write is a
/// short blocking `write(2)` under a mutex).
#[derive(Clone, Debug)]
pub struct ModuleLog {
    inner: Arc<Rotating>,
}

impl ModuleLog {
    /// Opens (creating it and its directory if needed) the log at `path`, rotated at
    /// [`DEFAULT_MAX_BYTES`], keeping [`DEFAULT_KEEP`] rotated files.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<ModuleLog> {
        ModuleLog::with_limits(path, DEFAULT_MAX_BYTES, DEFAULT_KEEP)
    }

    /// Opens the log at `path`, rotated when it would exceed `max_bytes` (0 = never), keeping
    /// `keep` rotated files (0 = the full file is deleted instead of rotated).
    pub fn with_limits(
        path: impl Into<PathBuf>,
        max_bytes: u64,
        keep: usize,
    ) -> io::Result<ModuleLog> {
        Ok(ModuleLog {
            inner: Arc::new(Rotating::new(path.into(), max_bytes, keep)?),
        })
    }

    /// The path of the current file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends one line `TIMESTAMP LEVEL message`. Line breaks and control characters in
    /// `message` are replaced with spaces.
    pub fn write(&self, level: Level, message: &str) -> io::Result<()> {
        let line = format!(
            "{} {} {}\n",
            now_timestamp(),
            level.letter(),
            one_line(message)
        );
        self.inner.append(&line)
    }

    /// [`ModuleLog::write`] at [`Level::Info`]; a failure is reported through `tracing`.
    pub fn info(&self, message: &str) {
        self.write_or_trace(Level::Info, message);
    }

    /// [`ModuleLog::write`] at [`Level::Warn`]; a failure is reported through `tracing`.
    pub fn warn(&self, message: &str) {
        self.write_or_trace(Level::Warn, message);
    }

    /// [`ModuleLog::write`] at [`Level::Error`]; a failure is reported through `tracing`.
    pub fn error(&self, message: &str) {
        self.write_or_trace(Level::Error, message);
    }

    fn write_or_trace(&self, level: Level, message: &str) {
        if let Err(e) = self.write(level, message) {
            tracing::warn!(path = %self.path().display(), "cannot write the module log: {e}");
        }
    }

    /// The last `n` lines, oldest first, reading rotated files when the current one is shorter.
    pub fn tail(&self, n: usize) -> io::Result<Vec<String>> {
        self.inner.tail(n)
    }

    /// Follows the lines written from now on (see [`LogFollower`]).
    pub fn follow(&self) -> io::Result<LogFollower> {
        self.inner.follow()
    }
}

/// The application log: the output of user scripts and of what they start, plus the runner's
/// header and footer lines. Same rotation as [`ModuleLog`].
///
/// Child processes get a descriptor of the file itself ([`AppLog::child_stdio`]), so their output
/// lines are not prefixed; the header and footer lines written around each script run are.
/// A background process that keeps its descriptor keeps writing to the file it got, even after
/// the log was rotated (it then writes to `FILE.1`, ...).
#[derive(Clone, Debug)]
pub struct AppLog {
    inner: Arc<Rotating>,
}

impl AppLog {
    /// Opens (creating it and its directory if needed) the log at `path`, rotated at
    /// [`DEFAULT_MAX_BYTES`], keeping [`DEFAULT_KEEP`] rotated files.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<AppLog> {
        AppLog::with_limits(path, DEFAULT_MAX_BYTES, DEFAULT_KEEP)
    }

    /// Opens the log at `path`, rotated when it would exceed `max_bytes` (0 = never), keeping
    /// `keep` rotated files.
    pub fn with_limits(
        path: impl Into<PathBuf>,
        max_bytes: u64,
        keep: usize,
    ) -> io::Result<AppLog> {
        Ok(AppLog {
            inner: Arc::new(Rotating::new(path.into(), max_bytes, keep)?),
        })
    }

    /// The path of the current file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends `TIMESTAMP text` as one line (control characters in `text` become spaces).
    pub fn write_line(&self, text: &str) -> io::Result<()> {
        self.inner
            .append(&format!("{} {}\n", now_timestamp(), one_line(text)))
    }

    /// A new `O_APPEND` descriptor of the current file, to give to a child process as its
    /// stdout or stderr. The file is rotated first if it already reached `max_bytes`.
    pub fn child_stdio(&self) -> io::Result<File> {
        self.inner.handle()
    }

    /// The last `n` lines, oldest first, reading rotated files when the current one is shorter.
    pub fn tail(&self, n: usize) -> io::Result<Vec<String>> {
        self.inner.tail(n)
    }

    /// Follows the lines written from now on (see [`LogFollower`]).
    pub fn follow(&self) -> io::Result<LogFollower> {
        self.inner.follow()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            utc_timestamp(at(1_795_660_867, 123)),
            "2026-11-26T02:41:07.123Z"
        );
        assert_eq!(
            utc_timestamp(at(951_782_400, 999)),
            "2000-02-29T00:00:00.999Z"
        );
        assert_eq!(
            utc_timestamp(at(4_107_542_399, 1)),
            "2100-02-28T23:59:59.001Z"
        );
        assert_eq!(
            utc_timestamp(at(4_107_542_400, 0)),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            utc_timestamp(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn module_log_line_format() {
        let dir = tempfile::tempdir().unwrap();
        let log = ModuleLog::open(dir.path().join("sub/module.log")).unwrap();
        log.write(Level::Info, "started").unwrap();
        log.warn("two\nlines");
        log.error("failed");
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for (line, (level, msg)) in
            lines
                .iter()
                .zip([("I", "started"), ("W", "two lines"), ("E", "failed")])
        {
            let (ts, rest) = line.split_once(' ').unwrap();
            assert_eq!(ts.len(), "2026-11-26T00:41:07.123Z".len(), "{line}");
            assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{line}");
            assert_eq!(rest, format!("{level} {msg}"));
        }
        assert_eq!(Level::from_letter('W'), Some(Level::Warn));
        assert_eq!(Level::from_letter('x'), None);
    }

    fn message_of(line: &str) -> &str {
        line.split_once(" I ").unwrap().1
    }

    #[test]
    fn rotation_keeps_n_files_and_tail_spans_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("module.log");
        // Each line is 24 (timestamp) + 3 + 8 ("line-NNN") + 1 = 36 bytes; 100 bytes hold 2.
        let log = ModuleLog::with_limits(&path, 100, 3).unwrap();
        for i in 0..20 {
            log.write(Level::Info, &format!("line-{i:03}")).unwrap();
        }
        // 20 lines, 2 per file: current + 3 rotated survive.
        for index in 1..=3 {
            let rotated = rotated_path(&path, index);
            let size = std::fs::metadata(&rotated).unwrap().len();
            assert!(size <= 100, "{} has {size} bytes", rotated.display());
        }
        assert!(!rotated_path(&path, 4).exists());
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        let read = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| message_of(l).to_owned())
                .collect()
        };
        assert_eq!(read(&path), ["line-018", "line-019"]);
        assert_eq!(read(&rotated_path(&path, 1)), ["line-016", "line-017"]);
        assert_eq!(read(&rotated_path(&path, 3)), ["line-012", "line-013"]);

        let tail: Vec<String> = log
            .tail(5)
            .unwrap()
            .iter()
            .map(|l| message_of(l).to_owned())
            .collect();
        assert_eq!(
            tail,
            ["line-015", "line-016", "line-017", "line-018", "line-019"]
        );
        // More than what is kept: everything that survives, in order.
        let all = log.tail(1000).unwrap();
        assert_eq!(all.len(), 8);
        assert_eq!(message_of(&all[0]), "line-012");
        assert_eq!(log.tail(1).unwrap().len(), 1);
        assert!(log.tail(0).unwrap().is_empty());
    }

    #[test]
    fn tail_of_large_file_reads_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let mut text = String::new();
        for i in 0..5000 {
            text.push_str(&format!("{i:05} {}\n", "x".repeat(i % 50)));
        }
        std::fs::write(&path, &text).unwrap();
        let lines = tail_file(&path, 1200).unwrap();
        assert_eq!(lines.len(), 1200);
        assert!(lines[0].starts_with("03800 "));
        assert!(lines[1199].starts_with("04999 "));
        // Without a final newline the last piece still counts.
        std::fs::write(&path, "a\nb\nc").unwrap();
        assert_eq!(tail_file(&path, 2).unwrap(), ["b", "c"]);
        assert_eq!(tail_file(&path, 10).unwrap(), ["a", "b", "c"]);
        std::fs::write(&path, "").unwrap();
        assert!(tail_file(&path, 3).unwrap().is_empty());
    }

    #[test]
    fn follow_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = ModuleLog::with_limits(dir.path().join("m.log"), 100, 2).unwrap();
        log.info("before-000");
        let mut follower = log.follow().unwrap();
        assert!(follower.read_new().unwrap().is_empty());
        let mut seen = Vec::new();
        for i in 1..=7 {
            log.info(&format!("after--{i:03}"));
            if i % 3 == 0 {
                seen.extend(follower.read_new().unwrap());
            }
        }
        seen.extend(follower.read_new().unwrap());
        let messages: Vec<&str> = seen.iter().map(|l| message_of(l)).collect();
        let expected: Vec<String> = (1..=7).map(|i| format!("after--{i:03}")).collect();
        assert_eq!(messages, expected);

        // More rotations than kept files between two calls: what survives, in order.
        for i in 8..=17 {
            log.info(&format!("after--{i:03}"));
        }
        let seen = follower.read_new().unwrap();
        let messages: Vec<&str> = seen.iter().map(|l| message_of(l)).collect();
        assert_eq!(
            messages,
            [
                "after--012",
                "after--013",
                "after--014",
                "after--015",
                "after--016",
                "after--017"
            ]
        );
    }

    #[test]
    fn app_log_child_stdio_appends_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let log = AppLog::with_limits(dir.path().join("app.log"), 64, 2).unwrap();
        log.write_line("[x] header").unwrap();
        let mut child = log.child_stdio().unwrap();
        child.write_all(&[b'o'; 80]).unwrap();
        child.write_all(b"\n").unwrap();
        drop(child);
        // Over the limit: the next handle goes to a fresh file.
        let mut child = log.child_stdio().unwrap();
        child.write_all(b"fresh\n").unwrap();
        assert_eq!(std::fs::read_to_string(log.path()).unwrap(), "fresh\n");
        let old = std::fs::read_to_string(rotated_path(log.path(), 1)).unwrap();
        assert!(old.contains("[x] header\n"));
        assert!(old.ends_with(&format!("{}\n", "o".repeat(80))));
        assert_eq!(log.tail(2).unwrap()[1], "fresh");
    }
}
