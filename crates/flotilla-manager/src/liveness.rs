//! Node liveness on the leader: nodes whose heartbeats stopped are marked down (the decision
//! is `flotilla_control::nodes_down`; this loop feeds it the in-memory heartbeats and writes
//! the result).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use flotilla_store::{Batch, Op, Table};
use flotilla_types::{Node, NodeState};

use crate::manager::{encode, lock};
use crate::Manager;
use flotilla_types::now_ms;

/// Marks nodes whose heartbeats stopped as down. Heartbeats are kept in the leader's memory;
/// a new leader first grants every node a full timeout before judging it.
pub async fn liveness_loop(mgr: Arc<Manager>, mut stop: watch::Receiver<bool>) {
    let timeout = mgr.config.heartbeat_timeout;
    // The monotonic clock the pure decision reads, in ms since this loop started.
    let origin = Instant::now();
    let ms = |t: Instant| t.saturating_duration_since(origin).as_millis() as u64;
    let mut leader_since: Option<u64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(mgr.config.heartbeat_period) => {}
            _ = flotilla_api::server::stopped(&mut stop) => return,
        }
        let now = ms(Instant::now());
        if !mgr.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(|| {
            tracing::info!("became leader; node liveness grace period starts");
            now
        });
        let nodes: Vec<Node> = match mgr.list_blocking().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "listing nodes failed");
                continue;
            }
        };
        let last_seen: HashMap<String, u64> = lock(&mgr.heartbeats)
            .iter()
            .map(|(id, t)| (id.clone(), ms(*t)))
            .collect();
        let down = flotilla_control::nodes_down(
            &nodes,
            &last_seen,
            now,
            since,
            timeout.as_millis() as u64,
        );
        let mut batch = Batch::new();
        for n in down {
            let mut n = n.clone();
            let version = n.meta.version;
            n.status.state = NodeState::Down;
            n.status.message = format!("heartbeat missed for more than {timeout:?}");
            n.meta.updated_at = now_ms();
            tracing::warn!(node = %n.id, name = %n.spec.name, "node is down");
            if let Ok(v) = encode(&n) {
                batch.push(Op::update(Table::Nodes, &n.id, v, Some(version)));
            }
        }
        if !batch.is_empty() {
            if let Err(e) = mgr.store.write(batch).await {
                tracing::warn!(error = %e, "marking nodes down failed");
            }
        }
    }
}
