//! A ghost model of the replicated data, independent of the cores' claims, so that a core that
//! claims to be up to date when it is not is caught by invariant (e) of [`crate::invariants`].
//!
//! It models idealised synchronous replication (RPO 0), as the replication layer is meant to
//! provide it:
//!
//! - **Writes.** Application writes are numbered by one global counter and issued by the world
//!   at random times (every 50–300 ms of simulated time, from a random generator of their own so
//!   that the rest of a seed is not changed) on every node that is up, writable (its last
//!   `SetWritable` was `true`) and holds the primary role.
//! - **Mirror.** A secondary is a *mirror* of the primary once a data synchronisation of it
//!   completed successfully while the peer was up and held the primary role; it stays one while
//!   its module is in SECOND (ready or not: a scripts-only restart keeps the replication running,
//!   the mount stays), while it runs, and while that primary keeps the same epoch (the same role
//!   tenure), until a write cannot be mirrored to it.
//! - **PRIM.** How a write is acknowledged follows the writer's claim, which the core persists
//!   before it changes the way writes are acknowledged: `shared` in PRIM (and from the start of
//!   ALONE -> PRIM), `exclusive` in ALONE (from the start of PRIM -> ALONE, and in the transient
//!   states of a promotion, writable before ALONE is entered). With `shared`, a write is applied
//!   on both nodes and acknowledged if the peer is a mirror of it and the peer channel in the
//!   direction primary -> secondary is up at that instant; otherwise it is neither applied nor
//!   acknowledged (the real primary blocks it until it leaves PRIM for ALONE; the client gives
//!   up).
//! - **ALONE** (claim `exclusive`): the write is applied locally and acknowledged at once; it is mirrored too if the peer is a mirror
//!   and the channel is up (replication keeps running after a resynchronisation, before the
//!   primary has learnt of it and left ALONE). If the peer is a mirror but the channel is down,
//!   the change is recorded and reaches the mirror as soon as the channel is up again while it
//!   is still a mirror (the replication layer resynchronises recorded changes on reconnection);
//!   if the peer is no mirror, the change waits for the next full synchronisation.
//! - **Synchronisation.** When a `SyncData` step completes successfully, the secondary's data
//!   becomes a copy of the peer's if the peer is up and holds the primary role at that instant,
//!   and it becomes a mirror; otherwise nothing is copied. Acknowledged writes the secondary held
//!   and the copy lacks are *abandoned*: they were acknowledged by a node that served while the
//!   other one did (split brain, resolved by the policy) or that an operator overrode. So are
//!   those only a node holds when its core persists the claim `stale` (it gives its data up for
//!   the next resynchronisation; it does so only while the peer is, or was just seen, primary,
//!   and that peer's promotion was itself checked).
//! - **Crash.** The data is on disk: nothing held is lost; a crashed secondary is no mirror any
//!   more.
//! - **Knowledge.** `known[n][w]` is the highest write acknowledged by node `w` that node `n`'s
//!   core can know of: its own acknowledgements, and what the sender knew when it sent a snapshot
//!   (heartbeat or channel) that `n`'s core then handled (causal order). An acknowledged write a
//!   node cannot know of was acknowledged concurrently with its decisions (a partition without a
//!   witness): losing it is the split brain the design accepts. Knowledge is not forgotten by a
//!   crash (the information reached the node; a core that does not persist what it needs from it
//!   is at fault).
//! - A forced promotion (operator `prim`) abandons the acknowledged writes the promoted node
//!   lacks: the operator chose this node's data.
//! - A write acknowledged while the other node held the primary role too, or held by one node
//!   only when a core detects a split brain, is a *split-brain write*: both sides acknowledged writes the other lacks, and the policy (the later promotion
//!   steps down and keeps its data apart) or the operator chooses which side survives; the
//!   promotion check of (e) does not count them (the convergence check does, unless abandoned).

use std::collections::BTreeSet;
use std::time::Duration;

use tandem_core::Time;

use crate::rng::Rng;

/// The data of both nodes, and which writes were acknowledged.
#[derive(Clone, Debug)]
pub struct Data {
    rng: Rng,
    /// Writes issued so far (the last write number).
    pub writes: u64,
    /// `held[n]`: the writes node `n`'s data holds.
    pub held: [BTreeSet<u64>; 2],
    /// `mirror[n]`: node `n` mirrors the peer's role tenure of this epoch.
    pub mirror: [Option<u64>; 2],
    /// `pending[n]`: writes acknowledged alone by the peer that mirror `n` has not received yet
    /// (the channel was down).
    pub pending: [Vec<u64>; 2],
    /// `known[n][w]`: see the module documentation.
    pub known: [[u64; 2]; 2],
    /// `acked_by[w]`: the writes node `w` acknowledged, with the time, in order.
    pub acked_by: [Vec<(u64, Time)>; 2],
    /// Acknowledged writes lost by a policy decision or an operator (see the module documentation).
    pub abandoned: BTreeSet<u64>,
    /// Writes acknowledged while the other node held the primary role too (split brain): one side
    /// of the split brain loses its writes, the policy or the operator says which.
    pub split: BTreeSet<u64>,
    /// Highest acknowledged write.
    pub acked: u64,
    /// Writes that could not be acknowledged (a PRIM without a reachable mirror).
    pub blocked: u64,
}

/// The replication link from a writer to its peer at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The peer is no mirror of the writer's tenure.
    NoMirror,
    /// The peer is a mirror but the channel towards it is down.
    Down,
    /// The peer is a mirror and the channel is up.
    Up,
}

/// What became of one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFate {
    /// Acknowledged, held on the writer only.
    Local,
    /// Acknowledged, held on the writer, on its way to the mirror.
    Recorded,
    /// Acknowledged, held on both nodes.
    Mirrored,
    /// Not acknowledged (PRIM without a reachable mirror).
    Blocked,
}

impl Data {
    /// No data yet; writes drawn from `seed`.
    pub fn new(seed: u64) -> Data {
        Data {
            rng: Rng::new(seed ^ 0xDA7A_0000_0000_0003),
            writes: 0,
            held: [BTreeSet::new(), BTreeSet::new()],
            mirror: [None; 2],
            pending: [Vec::new(), Vec::new()],
            known: [[0; 2]; 2],
            acked_by: [Vec::new(), Vec::new()],
            abandoned: BTreeSet::new(),
            split: BTreeSet::new(),
            acked: 0,
            blocked: 0,
        }
    }

    /// Time to the next round of writes.
    pub fn next_gap(&mut self) -> Duration {
        self.rng.millis(50, 300)
    }

    /// The replication link from `node` to its peer is `link`: recorded changes reach the
    /// mirror when it is up; a peer that is no mirror any more drops them.
    pub fn link(&mut self, node: usize, link: Link) {
        let peer = 1 - (node & 1);
        match link {
            Link::NoMirror => {
                self.mirror[peer] = None;
                self.pending[peer].clear();
            }
            Link::Down => {}
            Link::Up => {
                let pending = std::mem::take(&mut self.pending[peer]);
                self.held[peer].extend(pending);
            }
        }
    }

    /// One write on `node`. `prim`: its module is in PRIM; `link`: the replication link to the
    /// peer (call [`Data::link`] first).
    /// `split`: the peer holds the primary role too.
    pub fn write(
        &mut self,
        node: usize,
        now: Time,
        prim: bool,
        link: Link,
        split: bool,
    ) -> WriteFate {
        let (node, peer) = (node & 1, 1 - (node & 1));
        self.writes += 1;
        let id = self.writes;
        if prim && link != Link::Up {
            self.blocked += 1;
            return WriteFate::Blocked;
        }
        self.held[node].insert(id);
        let fate = match link {
            Link::Up => {
                self.held[peer].insert(id);
                WriteFate::Mirrored
            }
            Link::Down => {
                self.pending[peer].push(id);
                WriteFate::Recorded
            }
            Link::NoMirror => {
                self.mirror[peer] = None;
                WriteFate::Local
            }
        };
        self.acked_by[node].push((id, now));
        if split {
            self.split.insert(id);
        }
        self.known[node][node] = id;
        self.acked = id;
        fate
    }

    /// A synchronisation of `node` completed successfully; `source` is `Some(epoch)` when the
    /// peer is up and holds the primary role (of that epoch) at this instant.
    pub fn synchronised(&mut self, node: usize, source: Option<u64>) {
        let (node, peer) = (node & 1, 1 - (node & 1));
        self.pending[node].clear();
        let Some(epoch) = source else {
            self.mirror[node] = None;
            return;
        };
        let copy = self.held[peer].clone();
        let lost: Vec<u64> = self.held[node].difference(&copy).copied().collect();
        for id in lost {
            if self.is_acked(id) {
                self.abandoned.insert(id);
            }
        }
        self.held[node] = copy;
        self.mirror[node] = Some(epoch);
    }

    /// `node`'s core handled a snapshot sent when its sender knew `known`.
    pub fn learn(&mut self, node: usize, known: [u64; 2]) {
        let mine = &mut self.known[node & 1];
        for (slot, value) in mine.iter_mut().zip(known) {
            *slot = (*slot).max(value);
        }
    }

    /// `node`'s core persisted the claim `stale`: it gives up the writes only its data holds (it
    /// does so only while the peer is, or was just seen, primary: those writes were acknowledged
    /// on the losing side of a split brain, the peer's promotion being checked by (e)).
    pub fn gave_up(&mut self, node: usize) {
        let (node, peer) = (node & 1, 1 - (node & 1));
        let lost: Vec<u64> = self.held[node]
            .difference(&self.held[peer])
            .copied()
            .filter(|id| self.is_acked(*id))
            .collect();
        self.abandoned.extend(lost);
    }

    /// A core detected a split brain: the acknowledged writes only one node holds are split-brain
    /// writes (the policy makes one side wait for the operator, who may choose either).
    pub fn split_brain(&mut self) {
        let divergent: Vec<u64> = self.held[0]
            .symmetric_difference(&self.held[1])
            .copied()
            .filter(|id| self.is_acked(*id))
            .collect();
        self.split.extend(divergent);
    }

    /// A node crashed.
    pub fn crashed(&mut self, node: usize) {
        self.mirror[node & 1] = None;
        self.pending[node & 1].clear();
    }

    fn is_acked(&self, id: u64) -> bool {
        self.acked_by
            .iter()
            .any(|acks| acks.binary_search_by_key(&id, |(ack, _)| *ack).is_ok())
    }

    /// Acknowledged writes, not abandoned, that `node` can know of (all of them with `None`) and
    /// its data lacks, with the node that acknowledged them and when; with `known`, split-brain
    /// writes do not count.
    pub fn missing(&self, node: usize, known: Option<[u64; 2]>) -> Vec<(u64, usize, Time)> {
        let node = node & 1;
        let mut missing = Vec::new();
        for (writer, acks) in self.acked_by.iter().enumerate() {
            let limit = known.map_or(u64::MAX, |known| known[writer]);
            for &(id, at) in acks.iter().take_while(|(id, _)| *id <= limit) {
                let exempt =
                    self.abandoned.contains(&id) || (known.is_some() && self.split.contains(&id));
                if !self.held[node].contains(&id) && !exempt {
                    missing.push((id, writer, at));
                }
            }
        }
        missing.sort_unstable();
        missing
    }

    /// An operator forced `node` primary: the acknowledged writes it lacks are given up.
    pub fn forced(&mut self, node: usize) {
        for (id, _, _) in self.missing(node, None) {
            self.abandoned.insert(id);
        }
    }
}
