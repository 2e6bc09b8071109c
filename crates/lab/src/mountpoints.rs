//! Mount points that labs create on the machine's file system for [`crate::Lab::bind`].
//!
//! A bind target such as `/srv/tandem-demo/data` needs its directories on the machine's
//! file system, which every lab shares; and removing a directory detaches the mounts on it
//! in every mount namespace, other labs' included. So the directories labs made are listed
//! in `<root>/locks/mount-points`, each lab records those on its own targets' paths, and a
//! teardown removes one only when no other lab binds on or below it: the last lab to use a
//! mount point removes it. Creation and removal take the same `flock`.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::alloc;
use crate::sys::{self, FlockGuard};

fn registry_path(root: &Path) -> PathBuf {
    alloc::locks_dir(root).join("mount-points")
}

/// Serialises creation and removal of mount points across labs and processes.
pub(crate) fn lock(root: &Path) -> Result<FlockGuard> {
    let dir = alloc::locks_dir(root);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    sys::flock_exclusive(&dir.join(".mount-points"))
}

/// The directories labs made (under [`lock`]).
pub(crate) fn made_by_labs(root: &Path) -> BTreeSet<PathBuf> {
    fs::read_to_string(registry_path(root))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn write(root: &Path, dirs: &BTreeSet<PathBuf>) -> Result<()> {
    let path = registry_path(root);
    let tmp = path.with_extension("tmp");
    let mut text = String::new();
    for d in dirs {
        text.push_str(&d.to_string_lossy());
        text.push('\n');
    }
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

/// The directories of `target` (it included) that a lab made or that do not exist yet,
/// deepest first: those [`crate::Lab::bind`] records as its own. `exists` is asked in
/// the host's view.
pub(crate) fn to_claim(
    target: &Path,
    made: &BTreeSet<PathBuf>,
    exists: impl Fn(&Path) -> bool,
) -> Vec<PathBuf> {
    target
        .ancestors()
        .take_while(|dir| !exists(dir) || made.contains(*dir))
        .map(Path::to_owned)
        .collect()
}

/// Adds `dirs` to the list (under [`lock`]).
pub(crate) fn register(root: &Path, dirs: &[PathBuf]) -> Result<()> {
    let mut made = made_by_labs(root);
    let before = made.len();
    made.extend(dirs.iter().cloned());
    if made.len() == before {
        return Ok(());
    }
    write(root, &made)
}

/// Removes the directories `dirs` of lab `name` that no other lab binds on or below and
/// that are empty, deepest first; returns what failed.
pub(crate) fn release(
    root: &Path,
    name: &str,
    dirs: &[PathBuf],
    others_targets: impl FnOnce() -> Vec<PathBuf>,
) -> Vec<String> {
    if dirs.is_empty() {
        return Vec::new();
    }
    let _guard = match lock(root) {
        Ok(guard) => guard,
        Err(e) => return vec![format!("{e:#}")],
    };
    let mut dirs = dirs.to_vec();
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    dirs.dedup();
    let used = others_targets();
    let mut errors = Vec::new();
    let mut made = made_by_labs(root);
    for d in dirs {
        if let Some(t) = used.iter().find(|t| t.starts_with(&d)) {
            eprintln!(
                "tandem-lab: `{name}` leaves {} (another lab binds on {})",
                d.display(),
                t.display()
            );
            continue;
        }
        match fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                eprintln!("tandem-lab: leaving {} (not empty)", d.display());
            }
            Err(e) => errors.push(format!("removing {}: {e}", d.display())),
        }
        if !d.exists() {
            made.remove(&d);
        }
    }
    if let Err(e) = write(root, &made) {
        errors.push(format!("{e:#}"));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_missing_and_lab_made_directories_only() {
        let made: BTreeSet<PathBuf> = [PathBuf::from("/srv/t")].into();
        let exists = |p: &Path| ["/", "/srv", "/srv/t"].contains(&p.to_str().unwrap_or(""));
        assert_eq!(
            to_claim(Path::new("/srv/t/data"), &made, exists),
            [PathBuf::from("/srv/t/data"), PathBuf::from("/srv/t")]
        );
        assert!(to_claim(Path::new("/srv"), &made, exists).is_empty());
    }
}
