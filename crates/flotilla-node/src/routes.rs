//! The node's HTTP surface: the routes of its roles merged into one router (the manager's only
//! on managers), the node's own routes (ping, the CA for joining nodes), and the middleware
//! every request goes through — authorization first, then `{"message"}` errors.
//!
//! A locked manager (autolock) serves [`locked_router`] instead until it is unlocked; the
//! listeners serve a [`Switch`], so the daemon swaps the full router in without closing them.

use std::sync::{Arc, RwLock};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tower::ServiceExt;

use flotilla_api::authz::{self, Members};
use flotilla_api::{json_ok, ApiError, Caller};
use flotilla_manager::Manager;

use crate::autolock::{LockedMembers, Unlocker, LOCKED_MESSAGE};
use crate::NodeCtx;

/// Largest unlock request body (a key is 73 characters).
const UNLOCK_BODY_LIMIT: usize = 4096;

/// The router the listeners serve, replaceable while they run (a locked manager's, then the
/// full one once unlocked).
#[derive(Clone, Default)]
pub(crate) struct Switch(Arc<RwLock<Router>>);

impl Switch {
    /// Serves `router` from the next request on.
    pub(crate) fn set(&self, router: Router) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = router;
    }

    fn current(&self) -> Router {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A router that hands every request to the current one.
    pub(crate) fn router(&self) -> Router {
        let switch = self.clone();
        Router::new().fallback(move |req: Request| {
            let current = switch.current();
            async move { current.oneshot(req).await.unwrap_or_else(|e| match e {}) }
        })
    }
}

/// What the node's own routes read.
#[derive(Clone)]
struct Own {
    node: Arc<NodeCtx>,
    manager: Option<Arc<Manager>>,
}

/// The node's router: the agent's routes, the manager's (on a manager), the node's own; every
/// request authorized against `members` (the manager's store on a manager, the agent's last
/// network map on a worker).
pub fn router(
    node: Arc<NodeCtx>,
    agent: Arc<flotilla_agent::AgentCtx>,
    manager: Option<Arc<Manager>>,
) -> Router {
    let members: Arc<dyn Members> = match &manager {
        Some(m) => m.clone(),
        None => agent.clone(),
    };
    let own = Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/join/ca", get(ca))
        .route("/v1/cluster/unlock", post(not_locked))
        .with_state(Own {
            node,
            manager: manager.clone(),
        });
    let mut app = own.merge(flotilla_agent::router(agent));
    app = match manager {
        Some(m) => app
            .merge(flotilla_manager::api::router(m))
            .fallback(|| async { ApiError::not_found("no such endpoint") }),
        // A worker answers every other API path with where to go instead.
        None => app.fallback(worker_fallback),
    };
    app.layer(middleware::from_fn_with_state(members, authz::authorize))
        .layer(middleware::from_fn(flotilla_api::respond::json_errors))
}

async fn worker_fallback(req: Request) -> Response {
    let path = req.uri().path();
    if path.starts_with("/v1/") || path.starts_with("/internal/") || path.starts_with("/v2") {
        flotilla_manager::api::worker_refusal().into_response()
    } else {
        ApiError::not_found("no such endpoint").into_response()
    }
}

/// `GET /v1/ping`: this node's own view (never forwarded), including its Raft progress on
/// managers, so callers can tell whether a restarted manager has caught up. An anonymous
/// caller learns only that the node answers: ids, role and Raft progress are for the cluster.
async fn ping(State(own): State<Own>, Extension(caller): Extension<Caller>) -> Response {
    if caller == Caller::Anonymous {
        return json_ok(&serde_json::json!({ "ok": true }));
    }
    let ident = own.node.identity();
    let raft = own.manager.as_ref().map(|m| {
        let st = m.store.status();
        serde_json::json!({
            "state": st.state,
            "term": st.term,
            "applied_index": st.applied,
            "commit_index": st.committed,
        })
    });
    json_ok(&serde_json::json!({
        "node_id": ident.node_id,
        "role": ident.role,
        "cluster_id": ident.cluster_id,
        "raft": raft,
    }))
}

/// `GET /v1/join/ca`: the public root certificate, for a joining node to check against its
/// token's fingerprint.
async fn ca(State(own): State<Own>) -> Response {
    json_ok(&serde_json::json!({ "ca_pem": own.node.tls.ca_pem() }))
}

/// `POST /v1/cluster/unlock` on a node that is not locked.
async fn not_locked() -> ApiError {
    ApiError::conflict("this node is not locked: only a manager restarted with autolock on waits for its unlock key")
}

/// What a locked manager's routes read.
#[derive(Clone)]
struct LockedState {
    /// Fixed while locked (no heartbeat or role change runs).
    identity: Arc<flotilla_types::NodeIdentity>,
    unlocker: Arc<Unlocker>,
}

/// A locked manager's router: `/v1/ping` and `POST /v1/cluster/unlock` (admins); every other
/// request a 503 that says how to unlock. Authorization runs first as on an unlocked node,
/// with the certificates' word for membership ([`LockedMembers`]).
pub(crate) fn locked_router(
    identity: flotilla_types::NodeIdentity,
    unlocker: Arc<Unlocker>,
) -> Router {
    let members: Arc<dyn Members> = Arc::new(LockedMembers {
        cluster_id: identity.cluster_id.clone(),
    });
    let identity = Arc::new(identity);
    Router::new()
        .route("/v1/ping", get(locked_ping))
        .route(
            "/v1/cluster/unlock",
            post(unlock).layer(DefaultBodyLimit::max(UNLOCK_BODY_LIMIT)),
        )
        .fallback(|| async { ApiError::unavailable(LOCKED_MESSAGE) })
        .with_state(LockedState { identity, unlocker })
        .layer(middleware::from_fn_with_state(members, authz::authorize))
        .layer(middleware::from_fn(flotilla_api::respond::json_errors))
}

/// `GET /v1/ping` on a locked manager: who it is, and that it is locked.
async fn locked_ping(
    State(st): State<LockedState>,
    Extension(caller): Extension<Caller>,
) -> Response {
    if caller == Caller::Anonymous {
        return json_ok(&serde_json::json!({ "ok": true, "locked": true }));
    }
    let ident = &st.identity;
    json_ok(&serde_json::json!({
        "node_id": ident.node_id,
        "role": ident.role,
        "cluster_id": ident.cluster_id,
        "locked": true,
        "raft": null,
    }))
}

/// The body of `POST /v1/cluster/unlock`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UnlockRequest {
    /// The unlock key, `FLTKEY-1-…`.
    key: String,
}

/// `POST /v1/cluster/unlock` on a locked manager (admins only): 200 once the store is open;
/// 400 for a malformed key, 401 for a wrong one (still locked).
async fn unlock(
    State(st): State<LockedState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<UnlockRequest>,
) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        return Err(ApiError::forbidden(
            "unlocking a manager is for admins: use the admin bundle",
        ));
    }
    let out = st.unlocker.unlock(&req.key).await?;
    Ok(json_ok(&out))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use flotilla_api::Peer;
    use flotilla_pki::{Identity, Role};
    use flotilla_store::flotilla_secrets::{self, KeyState, UnlockKey};
    use tokio::sync::oneshot;

    use super::*;
    use crate::autolock::Unlocked;

    fn identity() -> flotilla_types::NodeIdentity {
        flotilla_types::NodeIdentity {
            cluster_id: "c1".into(),
            node_id: "m1".into(),
            name: "m1".into(),
            role: flotilla_types::NodeRole::Manager,
            raft_id: 1,
            addr: "127.0.0.1:1".into(),
            managers: vec![],
        }
    }

    /// A locked key directory (autolock on, unlock key `key`), its router, and what the
    /// daemon receives on the right key (answered "store opened").
    fn locked(
        tmp: &tempfile::TempDir,
        key: &UnlockKey,
    ) -> (Router, oneshot::Receiver<Arc<flotilla_secrets::Keyring>>) {
        let dir = tmp.path().join("keys");
        let KeyState::Open { keyring, .. } = flotilla_secrets::open_or_lock(&dir).expect("open")
        else {
            panic!("new keys are open");
        };
        flotilla_secrets::wrap_with_unlock_key(&dir, &keyring, key).expect("autolock on");
        let KeyState::Locked(l) = flotilla_secrets::open_or_lock(&dir).expect("open") else {
            panic!("locked");
        };
        let (tx, rx) = oneshot::channel::<Unlocked>();
        let (got_tx, got_rx) = oneshot::channel();
        tokio::spawn(async move {
            if let Ok(u) = rx.await {
                let _ = u.done.send(Ok(()));
                let _ = got_tx.send(u.keyring);
            }
        });
        (
            locked_router(identity(), Arc::new(Unlocker::new(l, tx))),
            got_rx,
        )
    }

    fn admin() -> Peer {
        Peer::Local
    }

    fn worker() -> Peer {
        Peer::Verified(Identity {
            cluster_id: "c1".into(),
            node_id: "w1".into(),
            role: Role::Worker,
            not_before: 0,
            not_after: i64::MAX,
        })
    }

    async fn call(
        app: &Router,
        peer: Peer,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        req.extensions_mut().insert(peer);
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)));
        (status, v)
    }

    fn unlock_body(key: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "key": key })).expect("json")
    }

    #[tokio::test]
    async fn a_locked_manager_serves_ping_and_unlock_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let key = UnlockKey::generate().expect("key");
        let (app, _) = locked(&tmp, &key);
        let (st, v) = call(&app, admin(), Method::GET, "/v1/ping", vec![]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["locked"], true);
        assert_eq!(v["node_id"], "m1");
        for (m, p) in [
            (Method::GET, "/v1/services"),
            (Method::GET, "/v1/nodes"),
            (Method::GET, "/v1/cluster"),
            (Method::GET, "/v1/cluster/unlock-key"),
            (Method::PUT, "/v1/cluster/settings"),
            (Method::GET, "/v1/events"),
            (Method::GET, "/v1/images"),
            (Method::GET, "/v2/"),
            (Method::GET, "/v1/no/such/thing"),
        ] {
            let (st, v) = call(&app, admin(), m.clone(), p, vec![]).await;
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{m} {p}");
            let msg = v["message"].as_str().expect("message");
            assert!(
                msg.starts_with("this manager is locked: run `flotilla cluster unlock`"),
                "{msg}"
            );
        }
        // A worker's heartbeat and a peer's Raft RPC: locked too (they retry).
        let (st, _) = call(
            &app,
            worker(),
            Method::POST,
            "/v1/nodes/w1/heartbeat",
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        // Anonymous callers still need a certificate for what is not theirs.
        let (st, _) = call(&app, Peer::Anonymous, Method::GET, "/v1/services", vec![]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn hostile_unlock_requests_are_refused_and_leave_it_locked() {
        let tmp = tempfile::tempdir().expect("tmp");
        let key = UnlockKey::generate().expect("key");
        let (app, mut got) = locked(&tmp, &key);
        let wrong = UnlockKey::generate().expect("wrong");
        let huge = vec![b'a'; 8 << 20];
        let huge_key = unlock_body(&"F".repeat(3000));
        let cases: Vec<(&str, Peer, Vec<u8>, StatusCode)> = vec![
            ("empty body", admin(), vec![], StatusCode::BAD_REQUEST),
            (
                "not json",
                admin(),
                b"garbage".to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            ("no key", admin(), b"{}".to_vec(), StatusCode::BAD_REQUEST),
            (
                "unknown field",
                admin(),
                br#"{"key":"x","more":1}"#.to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                "key not a string",
                admin(),
                br#"{"key":42}"#.to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                "empty key",
                admin(),
                unlock_body(""),
                StatusCode::BAD_REQUEST,
            ),
            (
                "garbage key",
                admin(),
                unlock_body("SWMKEY-1-abc"),
                StatusCode::BAD_REQUEST,
            ),
            ("long key", admin(), huge_key, StatusCode::BAD_REQUEST),
            ("huge body", admin(), huge, StatusCode::PAYLOAD_TOO_LARGE),
            (
                "wrong key",
                admin(),
                unlock_body(&wrong.to_text()),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "worker",
                worker(),
                unlock_body(&key.to_text()),
                StatusCode::FORBIDDEN,
            ),
            (
                "anonymous",
                Peer::Anonymous,
                unlock_body(&key.to_text()),
                StatusCode::UNAUTHORIZED,
            ),
        ];
        for (what, peer, body, want) in cases {
            let (st, v) = call(&app, peer, Method::POST, "/v1/cluster/unlock", body).await;
            assert_eq!(st, want, "{what}: {v}");
            let msg = v["message"].as_str().expect("a message");
            assert!(!msg.is_empty(), "{what}");
            assert!(
                !msg.contains(&*wrong.to_text()),
                "{what}: the key is echoed"
            );
            assert!(got.try_recv().is_err(), "{what}: unlocked");
        }
        let (_, v) = call(
            &app,
            admin(),
            Method::POST,
            "/v1/cluster/unlock",
            unlock_body(&wrong.to_text()),
        )
        .await;
        assert!(
            v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("does not open"),
            "{v}"
        );
        // Still locked: the next request gets the 503.
        let (st, _) = call(&app, admin(), Method::GET, "/v1/services", vec![]).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        // The right key (with whitespace around it) unlocks, once.
        let body = unlock_body(&format!("  {}\n", *key.to_text()));
        let (st, v) = call(&app, admin(), Method::POST, "/v1/cluster/unlock", body).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["unlocked"], true);
        assert!(got.await.is_ok(), "the daemon got the keyring");
        let (st, _) = call(
            &app,
            admin(),
            Method::POST,
            "/v1/cluster/unlock",
            unlock_body(&key.to_text()),
        )
        .await;
        assert_eq!(st, StatusCode::CONFLICT);
    }
}
