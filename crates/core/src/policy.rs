//! Pure policy functions: who should be primary, who loses a split brain.
//!
//! "May I take over?" is answered here from the core's inputs only, so that later inputs (a
//! witness grant, replication health, checkers) become more arguments of these functions.

use tandem_proto::{Claim, ModuleSnapshot};

use crate::settings::DefaultPrimary;

/// What a module's decision may look at.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Context<'a> {
    /// The node has been up for at least one heartbeat timeout: a silent peer is really absent.
    pub startup_over: bool,
    pub local_name: &'a str,
    pub peer_name: &'a str,
    /// The peer's module, if the peer is alive and runs it (not STOP).
    pub peer: Option<&'a ModuleSnapshot>,
    /// The peer's module, if the peer is alive and the module is stopped there.
    pub peer_stopped: Option<&'a ModuleSnapshot>,
    /// The peer's module in the newest snapshot received from it (this incarnation), whatever
    /// its state and even if the peer is no longer heard: its last known claim.
    pub peer_last: Option<&'a ModuleSnapshot>,
    pub peer_incarnation: Option<u64>,
    /// Heartbeats arrive from the peer (its module may still be stopped).
    pub peer_alive: bool,
    /// The node has run for one timeout since boot or since a pause: the peer's snapshot is
    /// not a leftover of a time this node did not see (its grants may be used).
    pub peer_view_settled: bool,
    pub my_incarnation: u64,
    pub peer_max_epoch: u64,
    /// Highest data generation the peer ever showed for this module.
    pub peer_max_generation: u64,
}

/// Which of two running nodes should be primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preference {
    /// This node.
    Local,
    /// The peer.
    Peer,
    /// Neither may be chosen automatically; the reason says what the operator must decide.
    Neither(String),
}

fn rank(claim: Claim) -> u8 {
    match claim {
        Claim::Fresh => 0,
        Claim::Stale => 1,
        Claim::Shared => 2,
        Claim::Exclusive => 3,
    }
}

/// The side facts of one node used to choose the primary.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Node name.
    pub name: &'a str,
    /// Data claim.
    pub claim: Claim,
    /// Was primary last.
    pub last_primary: bool,
}

/// Chooses the primary among two running nodes, from their claims and the policy. Symmetric: both
/// nodes compute the same answer from the same facts.
pub fn prefer(local: Candidate<'_>, peer: Candidate<'_>, policy: &DefaultPrimary) -> Preference {
    let (local_rank, peer_rank) = (rank(local.claim), rank(peer.claim));
    if local.claim == Claim::Exclusive && peer.claim == Claim::Exclusive {
        return Preference::Neither(
            "both nodes hold writes the other lacks (split brain): choose the node whose data to \
             keep with `tandem prim` on it"
                .into(),
        );
    }
    if local_rank.max(peer_rank) >= 2 && local_rank != peer_rank {
        return if local_rank > peer_rank {
            Preference::Local
        } else {
            Preference::Peer
        };
    }
    let by_name = |name: &str| {
        if name == local.name {
            Some(Preference::Local)
        } else if name == peer.name {
            Some(Preference::Peer)
        } else {
            None
        }
    };
    if local_rank < 2 {
        // Neither node is up to date.
        if let (Claim::Fresh, Claim::Fresh, DefaultPrimary::Node(name)) =
            (local.claim, peer.claim, policy)
            && let Some(preference) = by_name(name)
        {
            return preference;
        }
        return Preference::Neither(
            "neither node is known to have up-to-date data: run `tandem prim` on the node whose \
             data to keep"
                .into(),
        );
    }
    // Both hold the same data.
    match policy {
        DefaultPrimary::Node(name) => {
            if let Some(preference) = by_name(name) {
                return preference;
            }
        }
        DefaultPrimary::Last | DefaultPrimary::None => {
            if local.last_primary != peer.last_primary {
                return if local.last_primary {
                    Preference::Local
                } else {
                    Preference::Peer
                };
            }
        }
    }
    if local.name < peer.name {
        Preference::Local
    } else {
        Preference::Peer
    }
}

/// Whether the local node is the one that must step down when both nodes are primary while
/// connected: the later promotion (higher epoch) loses, as SafeKit sacrifices the node that took
/// over; ties go against the greater name.
pub fn loses_split_brain(local: (u64, &str), peer: (u64, &str)) -> bool {
    (local.0, local.1) > (peer.0, peer.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str, claim: Claim, last_primary: bool) -> Candidate<'_> {
        Candidate {
            name,
            claim,
            last_primary,
        }
    }

    #[test]
    fn fresher_claim_wins() {
        let policy = DefaultPrimary::None;
        for (stronger, weaker) in [
            (Claim::Exclusive, Claim::Shared),
            (Claim::Exclusive, Claim::Stale),
            (Claim::Shared, Claim::Stale),
            (Claim::Shared, Claim::Fresh),
        ] {
            assert_eq!(
                prefer(
                    candidate("b", stronger, false),
                    candidate("a", weaker, true),
                    &policy
                ),
                Preference::Local
            );
            assert_eq!(
                prefer(
                    candidate("a", weaker, true),
                    candidate("b", stronger, false),
                    &policy
                ),
                Preference::Peer
            );
        }
    }

    #[test]
    fn both_exclusive_or_both_stale_needs_the_operator() {
        let policy = DefaultPrimary::Node("a".into());
        for claim in [Claim::Exclusive, Claim::Stale] {
            assert!(matches!(
                prefer(
                    candidate("a", claim, false),
                    candidate("b", claim, false),
                    &policy
                ),
                Preference::Neither(_)
            ));
        }
        assert!(matches!(
            prefer(
                candidate("a", Claim::Fresh, false),
                candidate("b", Claim::Fresh, false),
                &DefaultPrimary::None
            ),
            Preference::Neither(_)
        ));
    }

    #[test]
    fn first_start_follows_default_primary() {
        let policy = DefaultPrimary::Node("b".into());
        assert_eq!(
            prefer(
                candidate("a", Claim::Fresh, false),
                candidate("b", Claim::Fresh, false),
                &policy
            ),
            Preference::Peer
        );
    }

    #[test]
    fn equal_data_follows_policy_then_last_primary_then_name() {
        let shared = Claim::Shared;
        assert_eq!(
            prefer(
                candidate("a", shared, true),
                candidate("b", shared, false),
                &DefaultPrimary::Node("b".into())
            ),
            Preference::Peer
        );
        assert_eq!(
            prefer(
                candidate("a", shared, false),
                candidate("b", shared, true),
                &DefaultPrimary::Last
            ),
            Preference::Peer
        );
        assert_eq!(
            prefer(
                candidate("b", shared, false),
                candidate("a", shared, false),
                &DefaultPrimary::None
            ),
            Preference::Peer
        );
    }

    #[test]
    fn preference_is_symmetric() {
        let claims = [Claim::Fresh, Claim::Stale, Claim::Shared, Claim::Exclusive];
        let policies = [
            DefaultPrimary::None,
            DefaultPrimary::Last,
            DefaultPrimary::Node("a".into()),
        ];
        for &left in &claims {
            for &right in &claims {
                for left_last in [false, true] {
                    for right_last in [false, true] {
                        for policy in &policies {
                            let from_a = prefer(
                                candidate("a", left, left_last),
                                candidate("b", right, right_last),
                                policy,
                            );
                            let from_b = prefer(
                                candidate("b", right, right_last),
                                candidate("a", left, left_last),
                                policy,
                            );
                            let mirrored = match from_b {
                                Preference::Local => Preference::Peer,
                                Preference::Peer => Preference::Local,
                                neither => neither,
                            };
                            assert_eq!(from_a, mirrored);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn split_brain_loser_is_the_later_promotion() {
        assert!(loses_split_brain((5, "a"), (4, "b")));
        assert!(!loses_split_brain((4, "b"), (5, "a")));
        assert!(loses_split_brain((4, "b"), (4, "a")));
        assert!(!loses_split_brain((4, "a"), (4, "b")));
    }
}
