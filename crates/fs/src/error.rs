//! Errors of the mount API.

use std::io;
use std::path::PathBuf;

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The directory to mount over could not be used.
    #[error("{path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The directory is already the root of a tandem mount.
    #[error("{0}: already a tandem mount")]
    AlreadyMounted(PathBuf),
    /// An `exclude` glob is malformed.
    #[error("exclude glob {0:?}: {1}")]
    BadExclude(String, String),
    /// The FUSE mount failed (no `/dev/fuse`, not root, ...).
    #[error("mounting {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {path}: {source}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The FUSE session ended with an error.
    #[error("FUSE session: {0}")]
    Session(io::Error),
}
