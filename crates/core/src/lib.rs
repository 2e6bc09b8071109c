//! The pure decision core of tandem.
#![forbid(unsafe_code)]

mod io;
mod settings;
mod time;

pub use io::*;
pub use settings::*;
pub use tandem_proto::{Claim, ModuleSnapshot, NodeSnapshot, State};
pub use time::Time;
