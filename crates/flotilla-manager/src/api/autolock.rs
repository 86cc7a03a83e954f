//! Autolock's cluster side (the unlock key in the replicated cluster object):
//! `PUT /v1/cluster/settings` with `{"autolock": true|false}` (through [`apply`]),
//! `GET /v1/cluster/unlock-key` and `POST /v1/cluster/unlock-key/rotate`, admins only.
//!
//! Each manager's node applies the key to its own key files when it sees it change
//! (`flotilla-node`'s `autolock.rs`); the unlock of a locked manager is the node's own route.

use axum::extract::State;
use axum::response::Response;
use axum::Extension;

use flotilla_store::flotilla_secrets::UnlockKey;

use super::{json_ok, Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::ClusterObject;

fn admin_only(caller: &Caller) -> Result<(), ManagerError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ManagerError::forbidden(
            "the unlock key is for admins: use the admin bundle",
        ))
    }
}

fn new_key_text() -> Result<String, ManagerError> {
    let key = UnlockKey::generate()
        .map_err(|e| ManagerError::internal(format!("generating an unlock key: {e}")))?;
    Ok(key.to_text().to_string())
}

/// Turns autolock on (a new unlock key, unless it is on already) or off, in the cluster
/// object `c` about to be written. Returns the key when this call generated it (to be shown
/// once).
pub fn apply(c: &mut ClusterObject, on: bool) -> Result<Option<String>, ManagerError> {
    match (on, &c.unlock_key) {
        (true, None) => {
            let key = new_key_text()?;
            c.unlock_key = Some(key.clone());
            Ok(Some(key))
        }
        (true, Some(_)) => Ok(None),
        (false, _) => {
            c.unlock_key = None;
            Ok(None)
        }
    }
}

fn autolock_off() -> ManagerError {
    ManagerError::not_found(
        "autolock is off, so there is no unlock key: turn it on with `flotilla cluster update --autolock true`",
    )
}

/// `GET /v1/cluster/unlock-key` → `{"unlock_key": "FLTKEY-1-…"}`.
pub async fn show(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let key = ctx.cluster()?.unlock_key.ok_or_else(autolock_off)?;
    Ok(json_ok(&serde_json::json!({ "unlock_key": key })))
}

/// `POST /v1/cluster/unlock-key/rotate` → the new key. Every manager re-wraps its data keys
/// with it as it applies the change; the old key stops opening a manager once it has.
pub async fn rotate(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let key = new_key_text()?;
    let k = key.clone();
    ctx.update_cluster(move |c| {
        if c.unlock_key.is_none() {
            return Err(autolock_off());
        }
        c.unlock_key = Some(k);
        Ok(())
    })
    .await?;
    tracing::info!("unlock key rotated");
    Ok(json_ok(&serde_json::json!({ "unlock_key": key })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterObject {
        ClusterObject {
            cluster_id: "c".into(),
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            worker_secret: String::new(),
            manager_secret: String::new(),
            cert_lifetime_secs: 1,
            created_at: 0,
            network: Default::default(),
            trust: Default::default(),
            bind_allow: Vec::new(),
            unlock_key: None,
            tunnel_keys: Vec::new(),
        }
    }

    #[test]
    fn enabling_makes_one_key_and_disabling_drops_it() {
        let mut c = cluster();
        let key = apply(&mut c, true).expect("on").expect("a new key");
        assert!(UnlockKey::parse(&key).is_ok());
        assert_eq!(c.unlock_key.as_deref(), Some(key.as_str()));
        // On again: the same key, not shown again.
        assert!(apply(&mut c, true).expect("on").is_none());
        assert_eq!(c.unlock_key.as_deref(), Some(key.as_str()));
        assert!(apply(&mut c, false).expect("off").is_none());
        assert!(c.unlock_key.is_none());
        // An old cluster object (no field) reads as autolock off.
        let mut v = serde_json::to_value(cluster()).expect("json");
        assert!(v.get("unlock_key").is_none());
        v.as_object_mut().expect("object").remove("unlock_key");
        let back: ClusterObject = serde_json::from_value(v).expect("decode");
        assert!(back.unlock_key.is_none());
    }
}
