//! The daemon's durable state: per-module records and the incarnation counter.
//!
//! Each record is a small file replaced atomically (write to a temporary file, fsync, rename,
//! fsync the directory), so a crash leaves either the old or the new record.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

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
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (and creates) the state directory.
    pub fn open(root: &Path) -> Result<StateDir> {
        fs::create_dir_all(root.join("modules"))
            .with_context(|| format!("cannot create the state directory {}", root.display()))?;
        Ok(StateDir {
            root: root.to_owned(),
        })
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
        write_atomically(&self.record_path(module), text.as_bytes())
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

    #[test]
    fn corrupt_record_is_an_error_not_a_fresh_node() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        fs::write(dir.path().join("modules/demo.json"), "garbage").unwrap();
        assert!(state.load("demo").is_err());
    }
}
