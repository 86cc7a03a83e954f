//! Control loops that only the Raft leader runs.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use flotilla_store::{Batch, Op, Table};
use flotilla_types::{Node, NodeState};

use crate::manager::{encode, now_ms};
use crate::NodeCtx;

/// Marks nodes whose heartbeats stopped as down. Heartbeats are kept in the leader's memory;
/// a new leader first grants every node a full timeout before judging it.
pub async fn liveness_loop(ctx: Arc<NodeCtx>, mut stop: watch::Receiver<bool>) {
    let Some(mgr) = ctx.manager.clone() else {
        return;
    };
    let timeout = ctx.cfg.heartbeat_timeout;
    let mut was_leader = false;
    let mut leader_since = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ctx.cfg.heartbeat_period) => {}
            _ = flotilla_api::server::stopped(&mut stop) => return,
        }
        let leader = mgr.is_leader();
        if leader && !was_leader {
            leader_since = Instant::now();
            tracing::info!("became leader; node liveness grace period starts");
        }
        was_leader = leader;
        if !leader || leader_since.elapsed() < timeout {
            continue;
        }
        let nodes: Vec<Node> = match mgr.list() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e.message, "listing nodes failed");
                continue;
            }
        };
        let beats = match mgr.heartbeats.lock() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut batch = Batch::new();
        for mut n in nodes {
            if n.status.state != NodeState::Ready && n.status.state != NodeState::Unknown {
                continue;
            }
            let seen = beats
                .get(&n.id)
                .map(|t| t.elapsed() < timeout)
                .unwrap_or(false);
            if seen {
                continue;
            }
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
