//! The agent's side of the dispatcher: the streams it follows (assignments, network map),
//! the status reports it sends, and calls to the first manager that answers. Managers are
//! tried in turn, this node's own address first on a manager.

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::sync::{mpsc, watch};

use flotilla_types::{Assignments, StatusReport};

use crate::executor::Executor;
use crate::net::NodeNet;
use crate::{AgentCtx, AgentError};

/// Managers to try, own address first on a manager.
pub fn targets(ctx: &AgentCtx) -> Vec<String> {
    let ident = ctx.node.identity();
    let mut out = Vec::new();
    if ctx.on_manager() {
        out.push(ident.addr.clone());
    }
    for m in ident.managers {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// Calls `path` on the first manager that answers (the manager forwards to the leader).
pub async fn call_managers<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    ctx: &AgentCtx,
    path: &str,
    body: &B,
) -> Result<T, AgentError> {
    let mut last = String::from("no manager known");
    for addr in targets(ctx) {
        let client = ctx.tls.peer(&addr).with_timeout(Duration::from_secs(10));
        match client.send_json(Method::POST, path, body).await {
            Ok(v) => return Ok(v),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(AgentError::NoManager { last })
}

/// Follows the assignment stream from the managers, reconnecting as needed.
pub async fn assignment_loop(ctx: Arc<AgentCtx>, exec: Arc<Executor>, stop: watch::Receiver<bool>) {
    let path = format!("/v1/nodes/{}/assignments", ctx.node.identity().node_id);
    follow::<Assignments, _, _>(ctx, path, stop, move |set| {
        let exec = exec.clone();
        async move { exec.apply(set).await }
    })
    .await
}

/// Follows the network map stream and programs this node's networking from it.
pub async fn network_loop(ctx: Arc<AgentCtx>, net: Arc<NodeNet>, stop: watch::Receiver<bool>) {
    let path = format!("/v1/nodes/{}/network", ctx.node.identity().node_id);
    let seen = ctx.clone();
    follow::<flotilla_types::NetworkMap, _, _>(ctx, path, stop, move |map| {
        let managers = map.nodes.iter().filter(|n| n.manager).map(|n| n.id.clone());
        *seen
            .known_managers
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(managers.collect());
        let net = net.clone();
        async move { net.apply_map(&map).await }
    })
    .await
}

/// Follows a newline-delimited JSON stream of a manager (trying each in turn, with backoff),
/// handing every message to `on`. Managers resend at least every 5 s; 12 s of silence means a
/// dead session.
async fn follow<T, F, Fut>(ctx: Arc<AgentCtx>, path: String, mut stop: watch::Receiver<bool>, on: F)
where
    T: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        for addr in targets(&ctx) {
            let client = ctx.tls.peer(&addr);
            let (tx, mut rx) = mpsc::unbounded_channel::<T>();
            let stream =
                client.stream_lines(&path, move |line| match serde_json::from_slice::<T>(line) {
                    Ok(a) => tx.send(a).is_ok(),
                    Err(_) => true,
                });
            tokio::pin!(stream);
            loop {
                tokio::select! {
                    _ = flotilla_api::server::stopped(&mut stop) => return,
                    res = &mut stream => {
                        if let Err(e) = res {
                            tracing::debug!(manager = %addr, path = %path, error = %e, "stream ended");
                        }
                        break;
                    }
                    Some(item) = rx.recv() => {
                        backoff = Duration::from_millis(100);
                        on(item).await;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(12)) => {
                        tracing::warn!(manager = %addr, path = %path, "stream went silent; reconnecting");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = flotilla_api::server::stopped(&mut stop) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Sends status reports to the managers in batches, keeping the newest per task and retrying
/// until a manager accepts them.
pub async fn report_loop(
    ctx: Arc<AgentCtx>,
    mut rx: mpsc::UnboundedReceiver<StatusReport>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<StatusReport> = Vec::new();
    loop {
        if pending.is_empty() {
            tokio::select! {
                _ = flotilla_api::server::stopped(&mut stop) => return,
                r = rx.recv() => match r {
                    Some(r) => pending.push(r),
                    None => return,
                },
            }
        }
        // Gather what else is queued right now; only the newest status per task is sent
        // (the store applies a batch atomically, one write per task).
        while let Ok(r) = rx.try_recv() {
            pending.push(r);
        }
        let mut newest: Vec<StatusReport> = Vec::with_capacity(pending.len());
        for r in pending.drain(..) {
            match newest.iter_mut().find(|n| n.task_id == r.task_id) {
                Some(n) => *n = r,
                None => newest.push(r),
            }
        }
        pending = newest;
        let node_id = ctx.node.identity().node_id;
        let path = format!("/v1/nodes/{node_id}/tasks");
        let body = match serde_json::to_vec(&pending) {
            Ok(b) => b,
            Err(_) => {
                pending.clear();
                continue;
            }
        };
        let mut sent = false;
        for addr in targets(&ctx) {
            let client = ctx.tls.peer(&addr).with_timeout(Duration::from_secs(10));
            match client
                .request(Method::POST, &path, Some(body.clone()))
                .await
            {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) if e.status() == Some(409) => {
                    // Raced with the orchestrator: resend shortly.
                    tracing::debug!(error = %e, "status report raced; resending");
                    break;
                }
                Err(e) => tracing::debug!(manager = %addr, error = %e, "status report failed"),
            }
        }
        if sent {
            pending.clear();
        } else {
            tokio::select! {
                _ = flotilla_api::server::stopped(&mut stop) => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}
