//! The tandem node agent: drives the pure core and carries out its effects with the adapters
//! (`tandem-net`, `tandem-vip`, `tandem-scripts`), persists its state and serves the control API.

mod api;
mod driver;
pub mod guard;
mod limits;
mod persist;
mod replication;

pub use driver::{DaemonOptions, run};
