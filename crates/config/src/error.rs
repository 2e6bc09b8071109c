//! Errors of configuration loading, made to be read by a human.

use std::fmt;
use std::path::PathBuf;

/// One problem found in a configuration file, located precisely.
///
/// Displays as `FILE:LINE:COLUMN: KEY: MESSAGE`, for example
/// `/etc/tandem/tandem.toml:14:19: module[0].default_primary: unknown value "node3"; allowed:
/// "none", "last", "node1", "node2"`. TOML syntax errors have no key and display as
/// `FILE:LINE:COLUMN: MESSAGE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The configuration file.
    pub file: PathBuf,
    /// Line of the offending key or value, counted from 1.
    pub line: usize,
    /// Column of the offending key or value, in characters, counted from 1.
    pub column: usize,
    /// Path of the offending key, such as `module[0].vip[1].addr`; empty for syntax errors.
    pub key: String,
    /// What is wrong and, where a set exists, the allowed values.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a configuration could not be loaded or queried.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration: {error}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not a valid configuration: one diagnostic per problem, in file order.
    #[error("{}", join(diagnostics))]
    Invalid {
        /// Every problem found, sorted by position in the file. Never empty.
        diagnostics: Vec<Diagnostic>,
    },
    /// The module asked for does not exist, or none was named and there is not exactly one.
    #[error("{}: {message}", path.display())]
    Module {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong, with the configured module names.
        message: String,
    },
    /// The local node cannot be determined.
    #[error("{}: {message}", path.display())]
    LocalNode {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong, with the configured nodes and their addresses.
        message: String,
    },
}

impl ConfigError {
    /// The diagnostics of an [`ConfigError::Invalid`] error; empty for the other kinds.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Invalid { diagnostics } => diagnostics,
            _ => &[],
        }
    }
}

fn join(diagnostics: &[Diagnostic]) -> String {
    let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    lines.join("\n")
}
