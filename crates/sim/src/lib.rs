//! Deterministic simulation of a two-node tandem cluster.
//!
//! Two real [`tandem_core::Node`]s run against a simulated world; every random decision comes
//! from one seed, so any run replays exactly.
//!
//! **Simulated:**
//! - time: an event queue ordered by time, ties broken by scheduling order ([`clock`]); each core
//!   gets its `Tick` exactly at `poll_timeout()` unless frozen;
//! - the network ([`network`]): one or two heartbeat networks (per-packet random delay, loss,
//!   duplication, hence reordering; the real replay window of `tandem-proto` on reception) and
//!   the peer channel (ordered stream); per-direction configuration gives partitions, one-way
//!   partitions and single bad networks;
//! - the adapters ([`host`]): scripts take random time, may fail or hang past their timeout (then
//!   they end `TimedOut`), `forcestop` kills them; VIP requests take time, run one after the
//!   other per node, acquisition may fail; data synchronisation takes time and may fail;
//!   `SetWritable` and the VIP are tracked as ghost state for the invariants;
//! - crashes (power loss: the core, its scripts, the VIP and the writable mount are gone, only
//!   the records of `Persist` effects stay) and restarts (a new core with a larger incarnation);
//! - freezes (`SIGSTOP`): the node handles nothing for a while, then its backlog in order;
//! - the VIP interface link going down and up;
//! - operator commands, drawn at random ([`faults`]) or scripted by tests.
//!
//! **Not simulated:** replication and the data itself (synchronisation is a step that takes time;
//! "up to date" is checked on the core's claims, not on data), a witness, several modules per
//! node, a daemon crash that leaves the application, the VIP or the writable mount behind (a
//! crash is a power loss), clock drift (both nodes share the simulated clock), script output.
//!
//! The invariants are in [`invariants`]; [`scenario`] runs one seed: a safety phase with faults,
//! then a liveness phase without faults that must converge to PRIM/SECOND.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod faults;
pub mod host;
pub mod invariants;
pub mod network;
pub mod rng;
pub mod scenario;
pub mod trace;
pub mod world;

pub use host::{AdapterTiming, ScriptRule, ScriptTiming};
pub use invariants::Violation;
pub use network::LinkConf;
pub use rng::Rng;
pub use scenario::{RunOptions, SeedFailure, SeedReport, run_seed};
pub use trace::{Kind, TraceConfig};
pub use world::{Op, World, WorldConfig};
