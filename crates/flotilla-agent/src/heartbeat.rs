//! Heartbeats to the leader (through any manager), the role switch a heartbeat answer may
//! ask for, and certificate renewal before expiry; and the host facts ([`describe_host`]) the
//! node reads once, before the agent starts (they read `/proc` on the caller's thread).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use flotilla_types::{Heartbeat, HeartbeatResponse, NodeDescription, RenewRequest, RenewResponse};

use crate::upstream::call_managers;
use crate::{blocking, AgentCtx, AgentError};

/// The host's name (`None` when it cannot be read).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
}

/// Facts about this host for `node inspect` and the scheduler.
pub fn describe_host(
    engine: std::collections::BTreeMap<String, serde_json::Value>,
) -> NodeDescription {
    let hostname = hostname().unwrap_or_else(|| "unknown".into());
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

/// Sends a heartbeat every period (the managers set it), and switches role when the
/// answer says the cluster changed it.
pub async fn heartbeat_loop(
    ctx: Arc<AgentCtx>,
    description: NodeDescription,
    mut stop: watch::Receiver<bool>,
) {
    let mut period = ctx.config.heartbeat_period;
    let mut failures = 0u32;
    loop {
        let ident = ctx.node.identity();
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
                let node = ctx.node.clone();
                let _ = blocking(move || node.set_managers(resp.managers)).await;
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
async fn switch_role(ctx: &AgentCtx, role: flotilla_types::NodeRole) -> Result<(), AgentError> {
    renew(ctx).await?;
    let got = ctx.tls.identity().role;
    let want = match role {
        flotilla_types::NodeRole::Manager => flotilla_pki::Role::Manager,
        flotilla_types::NodeRole::Worker => flotilla_pki::Role::Worker,
    };
    if got != want {
        return Err(AgentError::WrongRole { got, want });
    }
    let node = ctx.node.clone();
    blocking(move || node.switch_role(role))
        .await
        .map_err(|_| AgentError::ShuttingDown)?
}

fn unix_now() -> i64 {
    (flotilla_types::now_ms() / 1000) as i64
}

/// Renews the node certificate once two thirds of its lifetime have passed.
pub async fn renewal_loop(ctx: Arc<AgentCtx>, mut stop: watch::Receiver<bool>) {
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

/// Asks a manager to sign a new key, saves the certificate, then swaps it in.
async fn renew(ctx: &AgentCtx) -> Result<(), AgentError> {
    let (key_pem, csr_pem) = flotilla_pki::new_key_and_csr()?;
    let path = format!("/v1/nodes/{}/renew", ctx.node.identity().node_id);
    let resp: RenewResponse = call_managers(ctx, &path, &RenewRequest { csr_pem }).await?;
    flotilla_api::TlsState::check(&resp.ca_pem, &resp.cert_pem, &key_pem)?;
    let (node, key) = (ctx.node.clone(), key_pem.clone());
    let (ca, cert) = (resp.ca_pem.clone(), resp.cert_pem.clone());
    blocking(move || node.save_certificates(&ca, &cert, &key))
        .await
        .map_err(|_| AgentError::ShuttingDown)??;
    ctx.tls.replace(&resp.ca_pem, &resp.cert_pem, &key_pem)?;
    Ok(())
}
