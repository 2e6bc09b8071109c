//! tandem-scripts: the adapters that run a module's user scripts and write its logs.
//!
//! * [`runner`]: [`ScriptRunner`] runs `prestart`, `start_prim`, `stop_prim`, ... each in its own
//!   process group, with a timeout (graceful `SIGTERM`, then `SIGKILL` to the whole group), output
//!   appended to the application log.
//! * [`log`]: [`ModuleLog`] (one line per event, `2026-11-26T00:41:07.123Z I message`) and
//!   [`AppLog`] (script output), both size-rotated.
//!
//! No cluster decision is taken here: the daemon decides which script runs when, with which
//! arguments and timeout, and what an outcome means.

pub mod log;
pub mod runner;

pub use log::{AppLog, Level, LogFollower, ModuleLog};
pub use runner::{ScriptEnv, ScriptOutcome, ScriptReport, ScriptRequest, ScriptRunner};
