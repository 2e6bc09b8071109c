//! The daemon's durable state: per-module records and the incarnation counter.
//!
//! Each record is a small file replaced atomically (write to a temporary file, fsync, rename,
//! fsync the directory), so a crash leaves either the old or the new record.
//!
//! Persisting must work when the process is at its descriptor limit (a failed persist stops the
//! daemon): the modules directory stays open, and the next record's temporary file is opened
//! ahead (an anonymous `O_TMPFILE` file, given its name only when it is written), so a record
//! write needs no new descriptor. After each write the reserve is taken again at once (in the
//! slot the write just freed, unless another thread took it meanwhile: then the next write opens
//! its file on demand).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tandem_core::{Claim, Persisted};

#[derive(Serialize, Deserialize)]
struct RecordFile {
    claim: String,
    epoch: u64,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    peer_epoch: u64,
    #[serde(default)]
    peer_generation: u64,
    #[serde(default)]
    peer_exclusive: bool,
    #[serde(default)]
    held: bool,
    last_primary: bool,
}

fn claim_from(text: &str) -> Option<Claim> {
    [Claim::Fresh, Claim::Stale, Claim::Shared, Claim::Exclusive]
        .into_iter()
        .find(|claim| claim.as_str() == text)
}

/// Where the records live.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    /// `<root>/modules`, open for the `*at` calls and the fsync of a record write.
    modules: OwnedFd,
    /// The next record's temporary file, opened ahead (see the module documentation).
    reserve: Mutex<Option<OwnedFd>>,
}

impl StateDir {
    /// Opens (and creates) the state directory.
    pub fn open(root: &Path) -> Result<StateDir> {
        let modules = root.join("modules");
        fs::create_dir_all(&modules)
            .with_context(|| format!("cannot create the state directory {}", root.display()))?;
        let fd = rustix::fs::open(
            &modules,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", modules.display()))?;
        let state = StateDir {
            root: root.to_owned(),
            modules: fd,
            reserve: Mutex::new(None),
        };
        *state.reserve() = state.anonymous_file().ok();
        Ok(state)
    }

    fn reserve(&self) -> std::sync::MutexGuard<'_, Option<OwnedFd>> {
        // The slot holds a descriptor or nothing: consistent at every step.
        self.reserve.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new anonymous file in the modules directory (`O_TMPFILE`).
    fn anonymous_file(&self) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat(
            &self.modules,
            ".",
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?)
    }

    /// Writes `bytes` as the module file `name`, atomically and durably, through the reserved
    /// temporary file when there is one.
    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let reserved = self.reserve().take();
        let Some(file) = reserved.or_else(|| self.anonymous_file().ok()) else {
            // No O_TMPFILE here (or no descriptor left): a named temporary file.
            return write_atomically(&self.root.join("modules").join(name), bytes);
        };
        let temporary = format!("{name}.tmp");
        let context = || format!("cannot write the state record {name}");
        let mut writer = File::from(file);
        writer.write_all(bytes).with_context(context)?;
        writer.sync_all().with_context(context)?;
        match rustix::fs::unlinkat(&self.modules, temporary.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io::Error::from(e)).with_context(context),
        }
        rustix::fs::linkat(
            writer.as_fd(),
            "",
            &self.modules,
            temporary.as_str(),
            AtFlags::EMPTY_PATH,
        )
        .map_err(io::Error::from)
        .with_context(context)?;
        rustix::fs::renameat(
            &self.modules,
            OsStr::new(&temporary),
            &self.modules,
            OsStr::new(name),
        )
        .map_err(io::Error::from)
        .with_context(context)?;
        rustix::fs::fsync(&self.modules)
            .map_err(io::Error::from)
            .with_context(context)?;
        drop(writer);
        *self.reserve() = self.anonymous_file().ok();
        Ok(())
    }

    fn record_path(&self, module: &str) -> PathBuf {
        self.root.join("modules").join(format!("{module}.json"))
    }

    /// Reads a module's record; a missing file means a node with no history.
    pub fn load(&self, module: &str) -> Result<Persisted> {
        let path = self.record_path(module);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Persisted::default());
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let file: RecordFile = serde_json::from_str(&text)
            .with_context(|| format!("corrupt state record {}", path.display()))?;
        let claim = claim_from(&file.claim).with_context(|| {
            format!(
                "corrupt state record {}: unknown claim {:?}",
                path.display(),
                file.claim
            )
        })?;
        Ok(Persisted {
            claim,
            epoch: file.epoch,
            generation: file.generation,
            last_primary: file.last_primary,
            peer_epoch: file.peer_epoch,
            peer_generation: file.peer_generation,
            peer_exclusive: file.peer_exclusive,
            held: file.held,
        })
    }

    /// Durably replaces a module's record.
    pub fn store(&self, module: &str, record: &Persisted) -> Result<()> {
        let file = RecordFile {
            claim: record.claim.as_str().to_owned(),
            epoch: record.epoch,
            generation: record.generation,
            last_primary: record.last_primary,
            peer_epoch: record.peer_epoch,
            peer_generation: record.peer_generation,
            peer_exclusive: record.peer_exclusive,
            held: record.held,
        };
        let text = serde_json::to_string_pretty(&file).context("cannot encode a state record")?;
        self.write_record(&format!("{module}.json"), text.as_bytes())
    }

    /// The next incarnation: strictly greater than every earlier one of this node, persisted
    /// before use. Based on the wall clock so that it also increases if the state is lost.
    pub fn next_incarnation(&self) -> Result<u64> {
        let path = self.root.join("incarnation");
        let previous = fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let next = wall.max(previous.saturating_add(1));
        write_atomically(&path, next.to_string().as_bytes())?;
        Ok(next)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let directory = path
        .parent()
        .context("a state file has no parent directory")?;
    let temporary = path.with_extension("tmp");
    {
        let mut file = File::create(&temporary)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", temporary.display()))?;
    }
    fs::rename(&temporary, path).with_context(|| format!("cannot replace {}", path.display()))?;
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .with_context(|| format!("cannot sync {}", directory.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip_and_default_to_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load("demo").unwrap(), Persisted::default());
        let record = Persisted {
            claim: Claim::Exclusive,
            epoch: 7,
            generation: 9,
            peer_epoch: 8,
            peer_generation: 10,
            peer_exclusive: true,
            held: true,
            last_primary: true,
        };
        state.store("demo", &record).unwrap();
        assert_eq!(state.load("demo").unwrap(), record);
    }

    #[test]
    fn incarnations_strictly_increase() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let first = state.next_incarnation().unwrap();
        let second = state.next_incarnation().unwrap();
        assert!(second > first);
        fs::write(dir.path().join("incarnation"), (u64::MAX / 2).to_string()).unwrap();
        assert!(state.next_incarnation().unwrap() > u64::MAX / 2);
    }

    fn record(epoch: u64) -> Persisted {
        Persisted {
            claim: Claim::Exclusive,
            epoch,
            ..Persisted::default()
        }
    }

    /// Run by `records_are_stored_at_the_descriptor_limit` in a child process: uses up every
    /// descriptor this process may open, then stores records.
    #[test]
    #[ignore = "helper: run by another test in a child process"]
    fn store_at_the_descriptor_limit_child() {
        let dir = std::env::var("TANDEM_PERSIST_CHILD_DIR")
            .expect("run by records_are_stored_at_the_descriptor_limit");
        let state = StateDir::open(Path::new(&dir)).unwrap();
        state.store("demo", &record(1)).unwrap();
        let open = fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        let limit = libc::rlimit {
            rlim_cur: open + 16,
            rlim_max: open + 16,
        };
        // SAFETY: setrlimit reads one valid `rlimit`; this process is the test's child alone.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut fillers = Vec::new();
        let full = loop {
            match File::open("/dev/null") {
                Ok(file) => fillers.push(file),
                Err(e) => break e,
            }
        };
        assert_eq!(full.raw_os_error(), Some(libc::EMFILE), "{full}");
        for epoch in 2..=4 {
            state.store("demo", &record(epoch)).unwrap();
        }
        drop(fillers);
        assert_eq!(state.load("demo").unwrap(), record(4));
    }

    #[test]
    fn records_are_stored_at_the_descriptor_limit() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "persist::tests::store_at_the_descriptor_limit_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TANDEM_PERSIST_CHILD_DIR", dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load("demo").unwrap(), record(4));
        // No temporary file is left.
        let names: Vec<_> = fs::read_dir(dir.path().join("modules"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["demo.json"]);
    }

    #[test]
    fn corrupt_record_is_an_error_not_a_fresh_node() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        fs::write(dir.path().join("modules/demo.json"), "garbage").unwrap();
        assert!(state.load("demo").is_err());
    }
}
