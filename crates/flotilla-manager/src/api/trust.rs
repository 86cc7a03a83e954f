//! The cluster's image trust policy (in the replicated cluster object):
//! `GET|POST /v1/trust/keys`, `DELETE /v1/trust/keys/{id}`, and
//! `PUT /v1/cluster/settings` (`{"signature_enforcement": false}`).

use axum::extract::{Path, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde::Deserialize;

use flotilla_registry::{TrustPolicy, TrustedKey};

use super::{json_ok, Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::Manager;

fn admin_only(caller: &Caller) -> Result<(), ManagerError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ManagerError::forbidden(
            "the trust policy is for admins: use the admin bundle",
        ))
    }
}

/// Read-modify-write of the cluster object's trust policy.
async fn update_trust<T>(
    mgr: &Manager,
    f: impl FnOnce(&mut TrustPolicy) -> Result<T, ManagerError>,
) -> Result<T, ManagerError> {
    Ok(mgr.update_cluster(|c| f(&mut c.trust)).await?.0)
}

/// The settings shown in `cluster info`.
pub fn settings(
    c: &crate::manager::ClusterObject,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let trust = &c.trust;
    let mut m = std::collections::BTreeMap::new();
    m.insert(
        "bind_allow".to_string(),
        serde_json::Value::from(c.bind_allow.clone()),
    );
    m.insert(
        "autolock".to_string(),
        serde_json::Value::from(if c.unlock_key.is_some() { "on" } else { "off" }),
    );
    m.insert(
        "signature_enforcement".to_string(),
        serde_json::Value::from(if trust.enforce { "on" } else { "off" }),
    );
    m.insert(
        "trusted_keys".to_string(),
        serde_json::Value::from(trust.keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>()),
    );
    m
}

/// `GET /v1/trust/keys`
pub async fn list(State(ctx): State<Ctx>) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    Ok(json_ok(&mgr.cluster()?.trust.keys))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddKey {
    /// SubjectPublicKeyInfo `PUBLIC KEY` PEM (ed25519 or ECDSA P-256).
    pub public_key_pem: String,
}

/// `POST /v1/trust/keys` → the trusted key (with its id).
pub async fn add(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<AddKey>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let key =
        <TrustedKey as flotilla_registry::TrustedKeyExt>::from_public_key_pem(&req.public_key_pem)
            .map_err(|e| ManagerError::bad_request(e.to_string()))?;
    let mgr = &ctx;
    let k = key.clone();
    update_trust(mgr, move |t| {
        if t.keys.iter().any(|x| x.id == k.id) {
            return Err(ManagerError::conflict(format!(
                "key {} is already trusted",
                k.id
            )));
        }
        t.keys.push(k);
        Ok(())
    })
    .await?;
    tracing::info!(key = %key.id, algorithm = key.algorithm.as_str(), "image signing key trusted");
    Ok(json_ok(&key))
}

/// `DELETE /v1/trust/keys/{id}`
pub async fn remove(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let mgr = &ctx;
    let id2 = id.clone();
    update_trust(mgr, move |t| {
        let before = t.keys.len();
        t.keys.retain(|k| k.id != id2);
        if t.keys.len() == before {
            return Err(ManagerError::not_found(format!(
                "no trusted key {id2}: `flotilla trust ls --format json` shows the ids"
            )));
        }
        Ok(())
    })
    .await?;
    tracing::info!(key = %id, "image signing key no longer trusted");
    Ok(json_ok(&serde_json::json!({ "removed": id })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsUpdate {
    /// Whether agents refuse images without a valid signature by a trusted key.
    #[serde(default)]
    pub signature_enforcement: Option<bool>,
    /// Host directories services may bind-mount (replaces the list; empty allows none).
    #[serde(default)]
    pub bind_allow: Option<Vec<String>>,
    /// Autolock: managers' data keys wrapped by an unlock key instead of a key file.
    #[serde(default)]
    pub autolock: Option<bool>,
}

/// `PUT /v1/cluster/settings` → the settings as `cluster info` shows them.
pub async fn update_settings(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<SettingsUpdate>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    if req.signature_enforcement.is_none() && req.bind_allow.is_none() && req.autolock.is_none() {
        return Err(ManagerError::bad_request(
            "nothing to change: send {\"signature_enforcement\": true|false}, {\"bind_allow\": [\"/srv/data\"]} or {\"autolock\": true|false}",
        ));
    }
    if let Some(dirs) = &req.bind_allow {
        for d in dirs {
            super::storage::validate_bind_allow(d)?;
        }
    }
    let mgr = &ctx;
    let (new_key, c) = mgr
        .update_cluster(move |c| {
            if let Some(on) = req.signature_enforcement {
                c.trust.enforce = on;
            }
            if let Some(dirs) = req.bind_allow {
                c.bind_allow = dirs;
            }
            match req.autolock {
                Some(on) => super::autolock::apply(c, on),
                None => Ok(None),
            }
        })
        .await?;
    match req.signature_enforcement {
        Some(true) => tracing::info!("image signature enforcement turned on"),
        Some(false) => {
            tracing::warn!("image signature enforcement turned off: agents run unsigned images")
        }
        None => {}
    }
    match req.autolock {
        Some(true) => tracing::info!("autolock on: managers need the unlock key after a restart"),
        Some(false) => {
            tracing::warn!("autolock off: managers keep their key files beside the data")
        }
        None => {}
    }
    let mut out = settings(&c);
    // A new unlock key is shown once, to the admin who turned autolock on.
    if let Some(key) = new_key {
        out.insert("unlock_key".to_string(), serde_json::Value::from(key));
    }
    Ok(json_ok(&out))
}
