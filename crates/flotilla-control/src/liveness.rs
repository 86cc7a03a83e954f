//! Node liveness: a node whose agent stopped heartbeating is marked `down`, which makes the
//! orchestrator treat its tasks as lost.
//!
//! The leader keeps each node's last heartbeat in memory (like swarmkit's dispatcher; only
//! state changes are written to Raft), as milliseconds on a monotonic clock the caller owns.
//! A newly elected leader has heard from no one yet, so it judges nobody until a whole timeout
//! has passed since it took office.

use std::collections::HashMap;

use flotilla_types::{Node, NodeState};

/// The nodes to mark `down` at `now`: `ready` or `unknown` nodes not heard from within
/// `timeout_ms` (never heard from counts as silent). Empty while `now` is within `timeout_ms`
/// of `leader_since` (all times on the caller's monotonic clock, in milliseconds).
pub fn nodes_down<'a>(
    nodes: &'a [Node],
    last_seen: &HashMap<String, u64>,
    now: u64,
    leader_since: u64,
    timeout_ms: u64,
) -> Vec<&'a Node> {
    if now.saturating_sub(leader_since) < timeout_ms {
        return Vec::new();
    }
    nodes
        .iter()
        .filter(|n| matches!(n.status.state, NodeState::Ready | NodeState::Unknown))
        .filter(|n| {
            last_seen
                .get(&n.id)
                .is_none_or(|seen| now.saturating_sub(*seen) >= timeout_ms)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::node;

    #[test]
    fn silent_nodes_go_down_after_the_timeout_and_the_leader_grace() {
        let a = node("a");
        let b = node("b");
        let mut c = node("c");
        c.status.state = NodeState::Down;
        let nodes = vec![a, b, c];
        let seen: HashMap<String, u64> = [("a".to_string(), 10_000)].into();
        // A new leader (since 9 s) judges no one before 12 s.
        assert!(nodes_down(&nodes, &seen, 11_999, 9_000, 3_000).is_empty());
        // b was never heard from; a was heard 2 s ago; c is down already.
        let ids = |v: Vec<&Node>| v.into_iter().map(|n| n.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(nodes_down(&nodes, &seen, 12_000, 9_000, 3_000)), ["b"]);
        // Exactly one timeout after its last heartbeat, a goes too.
        assert_eq!(
            ids(nodes_down(&nodes, &seen, 13_000, 9_000, 3_000)),
            ["a", "b"]
        );
    }
}
