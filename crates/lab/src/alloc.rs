//! Lab index allocation: one O_EXCL lock file per index under `<root>/locks/<idx>`.
//!
//! All allocation (including reclaiming leftovers of dead owners) happens under a
//! process-wide `flock` on `<root>/locks/.alloc`, so two allocators never race on the
//! same index or both clean the same leftovers.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::sys;

/// Indices handed out to labs that do not ask for a fixed one (`10.231.<idx>.0/24`).
pub(crate) const POOL: std::ops::RangeInclusive<u8> = 1..=250;

/// Contents of a lock file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LockInfo {
    /// Process that created the lab.
    pub pid: u32,
    /// Its start time (ticks after boot), to survive PID reuse.
    pub start: Option<u64>,
    /// Lab name (directory under the root).
    pub name: String,
    /// Set by `Lab::keep`: the lab outlives its creator and is never reclaimed while any
    /// of its namespaces exists.
    #[serde(default)]
    pub kept: bool,
}

pub(crate) fn locks_dir(root: &Path) -> PathBuf {
    root.join("locks")
}

pub(crate) fn lock_path(root: &Path, index: u8) -> PathBuf {
    locks_dir(root).join(index.to_string())
}

pub(crate) fn read_lock(path: &Path) -> Option<LockInfo> {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
}

fn write_lock(file: &mut fs::File, info: &LockInfo) -> io::Result<()> {
    let s = serde_json::to_string(info).map_err(io::Error::other)?;
    file.write_all(s.as_bytes())?;
    file.sync_all()
}

/// Callbacks the allocator needs from the lab layer.
pub(crate) trait Leftovers {
    /// True if any network namespace of lab `name` still exists.
    fn alive(&self, name: &str) -> bool;
    /// Removes whatever lab `name` left behind (processes, namespaces, links, dirs).
    fn clean(&self, name: &str);
}

fn owner_gone(info: &LockInfo, left: &dyn Leftovers) -> bool {
    if info.kept {
        !left.alive(&info.name)
    } else {
        !sys::is_live(info.pid, info.start)
    }
}

/// Takes an index for lab `name` (None = `tl<idx>`), or the fixed `index` if given.
/// Returns the index and the lab name.
pub(crate) fn acquire(
    root: &Path,
    name: Option<&str>,
    index: Option<u8>,
    left: &dyn Leftovers,
) -> Result<(u8, String)> {
    let dir = locks_dir(root);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _guard = sys::flock_exclusive(&dir.join(".alloc"))?;

    // A named lab must not exist twice (under another index).
    if let Some(name) = name {
        for entry in fs::read_dir(&dir)?.flatten() {
            let Some(idx) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u8>().ok())
            else {
                continue;
            };
            let Some(info) = read_lock(&entry.path()) else {
                continue;
            };
            if info.name == name && Some(idx) != index && !owner_gone(&info, left) {
                bail!(
                    "lab `{name}` already exists (index {idx}, owner pid {}{}); destroy it first",
                    info.pid,
                    if info.kept { ", kept" } else { "" }
                );
            }
        }
    }

    let candidates: Vec<u8> = match index {
        Some(i) => vec![i],
        None => POOL.collect(),
    };
    for idx in candidates {
        let lab_name = name.map_or_else(|| format!("tl{idx}"), str::to_owned);
        let path = lock_path(root, idx);
        let mut reclaimed = false;
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let me = std::process::id();
                    let info = LockInfo {
                        pid: me,
                        start: sys::proc_stat(me).map(|s| s.start),
                        name: lab_name.clone(),
                        kept: false,
                    };
                    if let Err(e) = write_lock(&mut f, &info) {
                        let _ = fs::remove_file(&path);
                        return Err(e).with_context(|| format!("writing {}", path.display()));
                    }
                    return Ok((idx, lab_name));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !reclaimed => {
                    let info = read_lock(&path);
                    let gone = info.as_ref().is_none_or(|i| owner_gone(i, left));
                    if !gone {
                        if let (Some(_), Some(info)) = (index, info) {
                            bail!(
                                "lab index {idx} is in use by lab `{}` (owner pid {}{})",
                                info.name,
                                info.pid,
                                if info.kept { ", kept" } else { "" }
                            );
                        }
                        break;
                    }
                    // Dead owner: clean what it left (named by the lock, or by the index
                    // for an unreadable lock of a pool lab), then take the index.
                    let old = info.map(|i| i.name).unwrap_or_else(|| lab_name.clone());
                    eprintln!("tandem-lab: reclaiming index {idx} from dead lab `{old}`");
                    left.clean(&old);
                    if old != lab_name {
                        left.clean(&lab_name);
                    }
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("removing {}", path.display()));
                        }
                    }
                    reclaimed = true;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
    }
    bail!(
        "no free lab index (all of {}..={} in use)",
        POOL.start(),
        POOL.end()
    )
}

/// Cleans every lab whose owner is gone (see [`acquire`]); returns their names.
pub(crate) fn reclaim_all(root: &Path, left: &dyn Leftovers) -> Result<Vec<String>> {
    let dir = locks_dir(root);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let _guard = sys::flock_exclusive(&dir.join(".alloc"))?;
    let mut cleaned = Vec::new();
    for entry in fs::read_dir(&dir)?.flatten() {
        let Some(idx) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u8>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let info = read_lock(&path);
        if info.as_ref().is_some_and(|i| !owner_gone(i, left)) {
            continue;
        }
        let name = info.map_or_else(|| format!("tl{idx}"), |i| i.name);
        left.clean(&name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        cleaned.push(name);
    }
    Ok(cleaned)
}

/// Marks the lock of `index` as kept (the lab outlives this process).
pub(crate) fn mark_kept(root: &Path, index: u8, name: &str) -> Result<()> {
    let dir = locks_dir(root);
    let _guard = sys::flock_exclusive(&dir.join(".alloc"))?;
    let path = lock_path(root, index);
    let mut info = read_lock(&path)
        .filter(|i| i.name == name)
        .with_context(|| format!("lock {} is not lab `{name}`'s", path.display()))?;
    info.kept = true;
    let tmp = dir.join(format!(".{index}.tmp"));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_lock(&mut f, &info)?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Removes the lock of `index` if it belongs to lab `name`.
pub(crate) fn release(root: &Path, index: u8, name: &str) -> Result<()> {
    let _guard = sys::flock_exclusive(&locks_dir(root).join(".alloc"))?;
    let path = lock_path(root, index);
    match read_lock(&path) {
        Some(info) if info.name != name => Ok(()),
        None if !path.exists() => Ok(()),
        _ => match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        },
    }
}
