//! Node liveness: a node whose agent stopped heartbeating is marked `down`, which makes the
//! orchestrator treat its tasks as lost.

use flotilla_types::{Node, NodeState};

/// State changes due to missed heartbeats: every node that is `ready`, `unknown` or
/// `disconnected` and whose `status.last_heartbeat` is more than `heartbeat_timeout_ms` before
/// `now_ms` becomes `down`. Nodes already `down` are left alone (a heartbeat brings them back,
/// which is the dispatcher's job).
///
/// A newly elected leader should first give every node a grace period (set `last_heartbeat` to
/// the election time, as Swarm does), since it has not heard from anyone yet.
pub fn node_liveness(
    nodes: &[Node],
    now_ms: u64,
    heartbeat_timeout_ms: u64,
) -> Vec<(String, NodeState)> {
    nodes
        .iter()
        .filter(|n| n.status.state != NodeState::Down)
        .filter(|n| now_ms > n.status.last_heartbeat.saturating_add(heartbeat_timeout_ms))
        .map(|n| (n.id.clone(), NodeState::Down))
        .collect()
}

/// The earliest time at which [`node_liveness`] could report a change, so the driver knows when
/// to call it again (`None` when no node can expire).
pub fn next_liveness_check(nodes: &[Node], heartbeat_timeout_ms: u64) -> Option<u64> {
    nodes
        .iter()
        .filter(|n| n.status.state != NodeState::Down)
        .map(|n| {
            n.status
                .last_heartbeat
                .saturating_add(heartbeat_timeout_ms)
                .saturating_add(1)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::node;

    #[test]
    fn stale_ready_nodes_go_down() {
        let mut a = node("a");
        a.status.last_heartbeat = 1_000;
        let mut b = node("b");
        b.status.last_heartbeat = 9_000;
        let mut c = node("c");
        c.status.state = NodeState::Down;
        c.status.last_heartbeat = 0;
        let nodes = vec![a, b, c];
        assert!(
            node_liveness(&nodes, 6_000, 5_000).is_empty(),
            "exactly at the limit is alive"
        );
        assert_eq!(
            node_liveness(&nodes, 6_001, 5_000),
            vec![("a".to_string(), NodeState::Down)]
        );
        assert_eq!(next_liveness_check(&nodes, 5_000), Some(6_001));
        assert_eq!(node_liveness(&nodes, 20_000, 5_000).len(), 2);
    }
}
