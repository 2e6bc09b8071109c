//! The daemon's descriptor limit: raised to the hard limit at start, so that a daemon started
//! with a low soft limit (1,024 is what a service gets unless its unit sets `LimitNOFILE`) has
//! room for its connections, mounts and caches. Correctness does not depend on it: the mounts
//! and the applier keep a bounded number of descriptors whatever the number of files. The
//! scripts, and the application they start, get the soft limit the daemon was started with.

use std::io;

/// The descriptor limits before and after [`raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Nofile {
    /// The soft limit the daemon was started with (what scripts get).
    pub(crate) original: u64,
    /// The soft limit now.
    pub(crate) soft: u64,
    /// The hard limit.
    pub(crate) hard: u64,
}

fn get() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Raises the soft `RLIMIT_NOFILE` of this process to its hard limit.
pub(crate) fn raise() -> io::Result<Nofile> {
    let before = get()?;
    if before.rlim_cur < before.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: before.rlim_max,
            rlim_max: before.rlim_max,
        };
        // SAFETY: setrlimit reads one valid `rlimit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let now = get()?;
    Ok(Nofile {
        original: before.rlim_cur,
        soft: now.rlim_cur,
        hard: now.rlim_max,
    })
}

impl Nofile {
    /// One line for the module log.
    pub(crate) fn describe(&self) -> String {
        if self.soft == self.original {
            format!("descriptor limit {} (hard {})", self.soft, self.hard)
        } else {
            format!(
                "descriptor limit raised from {} to {} (the hard limit); scripts get {}",
                self.original, self.soft, self.original
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_to_the_hard_one() {
        let before = get().expect("getrlimit");
        let nofile = raise().expect("raise");
        assert_eq!(nofile.original, before.rlim_cur);
        assert_eq!(
            (nofile.soft, nofile.hard),
            (before.rlim_max, before.rlim_max)
        );
        assert!(nofile.describe().contains(&nofile.soft.to_string()));
    }
}
