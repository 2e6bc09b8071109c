//! Deterministic simulation of a two-node tandem cluster.
//!
//! Two real [`tandem_core::Node`]s run against a simulated world ([`World`]); every random
//! decision comes from one seed ([`rng`], SplitMix64), so any run replays exactly. The same
//! world serves three kinds of tests: the transcripts of the automaton and the property tests in
//! `crates/core/tests/`, and the many-seed runs of `crates/sim/tests/seeds.rs`
//! (`TANDEM_SIM_SEED=S cargo test -p tandem-sim --test seeds replay -- --nocapture` replays one
//! seed, printing every event).
//!
//! **Simulated:**
//! - time ([`clock`]): an event queue ordered by time, ties broken by scheduling order; each core
//!   gets its `Tick` exactly at `poll_timeout()` unless frozen;
//! - the network ([`network`]): one or two heartbeat networks (per-packet random delay, loss,
//!   duplication, hence reordering; the real replay window of `tandem-proto` on reception) and
//!   the peer channel (ordered stream); per-direction configuration gives partitions, one-way
//!   partitions and single bad networks; tests may also drop, duplicate or deliver early any
//!   message in flight;
//! - the node host and its adapters ([`host`]): scripts are often instant (absent) and otherwise
//!   take random time, may fail or hang past their timeout (then they end `TimedOut`), and
//!   `forcestop` kills them; VIP requests take time and run one after the other per node (an
//!   adapter requirement: an abandoned acquire must not end after the release that follows),
//!   acquisition may fail; data synchronisation takes time and may fail; `SetWritable` and the
//!   VIP are tracked as ghost state for the invariants;
//! - crashes (power loss: the core, its scripts, the VIP and the writable mount are gone, only
//!   the records of `Persist` effects stay) and restarts (a new core with a larger incarnation);
//! - freezes (`SIGSTOP`): the node handles nothing for a while, then its backlog in order;
//! - the VIP interface link going down and up;
//! - operator commands, drawn at random ([`faults`]) or scripted by tests;
//! - the replicated data ([`data`]), independent of the cores' claims: numbered application writes
//!   on the writable node every 50–300 ms, idealised synchronous replication to a secondary whose
//!   synchronisation completed (blocked, not acknowledged, when the claim is `shared` and the
//!   mirror is unreachable; acknowledged alone when it is `exclusive`), full copies by `SyncData`
//!   (a random synchronisation whose source is not primary and reachable at its end fails), and
//!   what each core can know of the acknowledged writes (causal order through snapshots);
//! - the health of the replication stream (`Input::ReplicationChanged`, see
//!   `World::update_replication`): the channel primary -> secondary stands for the stream; it is
//!   reported connected as soon as the peer is a mirror of the primary's tenure, the channel is up
//!   and no recorded write remains undelivered, and lost after a random detection delay of 1 ms
//!   up to the heartbeat timeout once the channel goes down or the peer stops being a mirror
//!   (leaves SECOND, crashes), at once when a write is acknowledged alone that the mirror has
//!   not received;
//!
//! **Not simulated:** the replication protocol itself (writes are instants, a resynchronisation is
//! a copy at the instant it ends, recorded changes reach a mirror at once when the channel comes
//! back; the replicator's acknowledgements, sequence numbers and timeouts are reduced to the
//! connected/lost reports above), a witness, several modules per node, a daemon
//! crash that leaves the application, the VIP or the writable mount behind (a crash is a power
//! loss), clock drift (both nodes' clocks advance at the same rate), script output.
//!
//! The invariants are in [`invariants`] and are checked by the world after every input a core
//! handles; [`scenario`] runs one seed: a safety phase with faults, then a liveness phase without
//! faults that must reach PRIM/SECOND ready; [`trace`] keeps the readable lines printed when a
//! seed fails.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod data;
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
pub use world::{Op, Stats, World, WorldConfig};
