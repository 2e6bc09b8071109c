//! The pure decision core of tandem.
#![forbid(unsafe_code)]

mod io;
mod module;
mod node;
mod policy;
mod settings;
mod status;
mod time;

pub use io::*;
pub use node::Node;
pub use policy::{Candidate, Preference, loses_split_brain, prefer};
pub use settings::*;
pub use status::{ModuleStatus, NodeStatus, PeerStatus, TransitionRecord};
pub use tandem_proto::{Claim, ModuleSnapshot, NodeSnapshot, State};
pub use time::Time;
