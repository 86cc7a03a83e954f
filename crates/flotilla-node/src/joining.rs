//! The joining node's side of `--join`: pin the CA, then trade a CSR for a certificate.

use std::time::Duration;

use flotilla_api::{Client, Endpoint};
use flotilla_pki::JoinToken;
use flotilla_types::{JoinRequest, JoinResponse};

use crate::disk::{write_atomic, write_identity, NodeIdentity, Paths};
use crate::{NodeConfig, NodeError};

/// Joins the cluster of the manager at `manager` with a join token: pins the CA the token
/// names, trades a CSR for a certificate, and records the new identity.
pub async fn join_cluster(
    cfg: &NodeConfig,
    paths: &Paths,
    manager: &str,
    token: &str,
    name: String,
    description: flotilla_types::NodeDescription,
) -> Result<NodeIdentity, NodeError> {
    let token = JoinToken::parse(token).map_err(|e| NodeError::Join(e.to_string()))?;
    let (ca_pem, fp) = pinned_ca(manager, &token).await?;
    // From now on the manager must prove it holds a manager certificate from that CA (a
    // worker of the cluster could otherwise collect the secret).
    let tls = flotilla_pki::client_config_for(&ca_pem, None, Some(flotilla_pki::Role::Manager))
        .map_err(NodeError::pki("the pinned CA"))?;
    let client = Client::new(Endpoint::Https {
        addr: manager.to_string(),
        tls,
    })
    .with_timeout(Duration::from_secs(30));
    let (key_pem, csr_pem) =
        flotilla_pki::new_key_and_csr().map_err(NodeError::pki("making the node key"))?;
    let resp: JoinResponse = client
        .post_json(
            "/v1/join",
            &JoinRequest {
                token: token.to_string(),
                csr_pem,
                name: name.clone(),
                addr: cfg.advertise_addr(),
                description,
            },
        )
        .await
        .map_err(|e| NodeError::Join(format!("join refused: {e}")))?;
    if flotilla_pki::fingerprint_pem(&resp.ca_pem).ok().as_deref() != Some(fp.as_str()) {
        return Err(NodeError::Join(
            "the manager answered with a different CA".into(),
        ));
    }
    let identity = save(cfg, paths, manager, name, resp, &key_pem)?;
    Ok(identity)
}

/// Fetches the CA certificate over TLS without trusting anything yet (nothing secret is
/// sent), and checks it against the fingerprint the token pins. Returns it and its
/// fingerprint.
async fn pinned_ca(manager: &str, token: &JoinToken) -> Result<(String, String), NodeError> {
    let probe_tls =
        flotilla_pki::pinning_probe_config().map_err(NodeError::pki("the probe's TLS config"))?;
    let probe = Client::new(Endpoint::Https {
        addr: manager.to_string(),
        tls: probe_tls,
    })
    .with_timeout(Duration::from_secs(10));
    let ca: serde_json::Value =
        probe
            .get_json("/v1/join/ca")
            .await
            .map_err(|source| NodeError::Unreachable {
                manager: manager.to_string(),
                source,
            })?;
    let ca_pem = ca
        .get("ca_pem")
        .and_then(|v| v.as_str())
        .ok_or_else(|| NodeError::Join(format!("{manager} did not return a CA certificate")))?
        .to_string();
    let fp = flotilla_pki::fingerprint_pem(&ca_pem).map_err(|e| NodeError::Join(e.to_string()))?;
    if fp != token.ca_fingerprint {
        return Err(NodeError::Join(format!(
            "CA fingerprint mismatch: the manager at {manager} presents CA {} but the join token pins {}; refusing to join (wrong cluster, or someone in the middle)",
            &fp[..16],
            &token.ca_fingerprint[..16]
        )));
    }
    Ok((ca_pem, fp))
}

/// Saves the certificates and the identity the cluster gave this node.
fn save(
    cfg: &NodeConfig,
    paths: &Paths,
    manager: &str,
    name: String,
    resp: JoinResponse,
    key_pem: &str,
) -> Result<NodeIdentity, NodeError> {
    let io = || NodeError::io("saving certificates");
    write_atomic(&paths.ca_cert(), resp.ca_pem.as_bytes(), 0o644).map_err(io())?;
    write_atomic(&paths.node_key(), key_pem.as_bytes(), 0o600).map_err(io())?;
    write_atomic(&paths.node_cert(), resp.cert_pem.as_bytes(), 0o644).map_err(io())?;
    let mut managers = resp.managers.clone();
    if managers.is_empty() {
        managers.push(manager.to_string());
    }
    let identity = NodeIdentity {
        cluster_id: resp.cluster_id,
        node_id: resp.node_id,
        name,
        role: resp.role,
        raft_id: resp.raft_id,
        addr: cfg.advertise_addr(),
        managers,
    };
    write_identity(paths, &identity).map_err(NodeError::io("writing node.json"))?;
    Ok(identity)
}
