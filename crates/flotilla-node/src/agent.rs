//! Loops every node runs: heartbeats to the leader (through any manager) and certificate
//! renewal before expiry.

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::sync::watch;

use flotilla_types::{Heartbeat, HeartbeatResponse, NodeDescription, RenewRequest, RenewResponse};

use crate::NodeCtx;

/// Facts about this host for `node inspect` and the scheduler.
pub fn describe_host(
    engine: std::collections::BTreeMap<String, serde_json::Value>,
) -> NodeDescription {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    NodeDescription {
        hostname,
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        resources: flotilla_types::Resources {
            nano_cpus: cpus * 1_000_000_000,
            memory_bytes: memory,
        },
        engine,
    }
}

/// Managers to try, own address first on a manager.
pub fn targets(ctx: &NodeCtx) -> Vec<String> {
    let ident = ctx.identity();
    let mut out = Vec::new();
    if ctx.manager.is_some() {
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
async fn call_managers<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    ctx: &NodeCtx,
    path: &str,
    body: &B,
) -> Result<T, String> {
    let mut last = String::from("no manager known");
    for addr in targets(ctx) {
        let client = ctx.tls.peer(&addr).with_timeout(Duration::from_secs(10));
        match client.send_json(Method::POST, path, body).await {
            Ok(v) => return Ok(v),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

pub async fn heartbeat_loop(
    ctx: Arc<NodeCtx>,
    description: NodeDescription,
    mut stop: watch::Receiver<bool>,
) {
    let mut period = ctx.cfg.heartbeat_period;
    let mut failures = 0u32;
    loop {
        let ident = ctx.identity();
        let hb = Heartbeat {
            addr: ident.addr.clone(),
            description: description.clone(),
        };
        let path = format!("/v1/nodes/{}/heartbeat", ident.node_id);
        match call_managers::<_, HeartbeatResponse>(&ctx, &path, &hb).await {
            Ok(resp) => {
                if failures > 0 {
                    tracing::info!("heartbeats reach the leader again");
                }
                failures = 0;
                ctx.set_managers(resp.managers);
                period = Duration::from_millis(resp.period_ms.clamp(100, 60_000));
                if resp.role != ident.role {
                    tracing::info!(
                        wanted = resp.role.as_str(),
                        current = ident.role.as_str(),
                        "the cluster changed this node's role; switching"
                    );
                    match switch_role(&ctx, resp.role).await {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(error = %e, "role switch failed; will retry"),
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, failures, "heartbeat failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = flotilla_api::server::stopped(&mut stop) => return,
        }
    }
}

/// Gets a certificate for the new role, records the role, and asks the daemon to restart its
/// internals in it.
async fn switch_role(ctx: &NodeCtx, role: flotilla_types::NodeRole) -> Result<(), String> {
    renew(ctx).await?;
    let got = ctx.tls.identity().role;
    let want = match role {
        flotilla_types::NodeRole::Manager => flotilla_pki::Role::Manager,
        flotilla_types::NodeRole::Worker => flotilla_pki::Role::Worker,
    };
    if got != want {
        return Err(format!(
            "renewed certificate has role {got:?}, expected {want:?}"
        ));
    }
    ctx.set_role(role).map_err(|e| e.to_string())?;
    ctx.role_changed.notify_one();
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Renews the node certificate once two thirds of its lifetime have passed.
pub async fn renewal_loop(ctx: Arc<NodeCtx>, mut stop: watch::Receiver<bool>) {
    loop {
        let id = ctx.tls.identity();
        let lifetime = (id.not_after - id.not_before).max(1) as u64;
        // Check often relative to the lifetime, but at least every minute.
        let check = Duration::from_millis((lifetime * 1000 / 30).clamp(200, 60_000));
        if flotilla_pki::needs_renewal(id.not_before, id.not_after, unix_now()) {
            match renew(&ctx).await {
                Ok(()) => {
                    let n = ctx.tls.identity();
                    tracing::info!(not_after = n.not_after, "node certificate renewed");
                }
                Err(e) => tracing::warn!(error = %e, "certificate renewal failed; will retry"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(check) => {}
            _ = flotilla_api::server::stopped(&mut stop) => return,
        }
    }
}

async fn renew(ctx: &NodeCtx) -> Result<(), String> {
    let (key_pem, csr_pem) = flotilla_pki::new_key_and_csr().map_err(|e| e.to_string())?;
    let path = format!("/v1/nodes/{}/renew", ctx.identity().node_id);
    let resp: RenewResponse = call_managers(ctx, &path, &RenewRequest { csr_pem }).await?;
    ctx.tls
        .install(&ctx.paths, &resp.ca_pem, &resp.cert_pem, &key_pem)
        .map_err(|e| e.to_string())
}
