//! The policy table, route by route: a router built from [`ROUTES`] itself (a handler per
//! entry that answers 200 with the caller it was given), behind the real [`authorize`]
//! middleware and a fake [`Members`], called by every kind of peer. What each should get is
//! written out by hand below, independently of [`crate::policy::check`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::routing::{any, on, MethodFilter};
use axum::{middleware, Extension, Router};
use flotilla_pki::{Identity, Role};
use tower::ServiceExt;

use super::*;
use crate::policy::ROUTES;

/// Cluster `c1`: `m1` a manager (and Raft peer), `w1` a worker, `d1` a demoted manager (its
/// certificate still says manager); anyone else is not a member.
struct Fake;

impl Members for Fake {
    fn cluster_id(&self) -> String {
        "c1".into()
    }
    fn node_caller(&self, id: &str, cert_role: Role) -> Result<Caller, ApiError> {
        let store_role = match id {
            "m1" => Role::Manager,
            "w1" | "d1" => Role::Worker,
            _ => {
                return Err(ApiError::forbidden(format!(
                    "node {id} is not a member of this cluster"
                )))
            }
        };
        let role = if cert_role == Role::Manager && store_role == Role::Manager {
            Role::Manager
        } else {
            Role::Worker
        };
        Ok(Caller::Node {
            id: id.into(),
            role,
        })
    }
    fn raft_peer(&self, node_id: &str) -> bool {
        node_id == "m1"
    }
}

fn verified(cluster: &str, node: &str, role: Role) -> Peer {
    Peer::Verified(Identity {
        cluster_id: cluster.into(),
        node_id: node.into(),
        role,
        not_before: 0,
        not_after: i64::MAX,
    })
}

/// The kinds of caller, in the order of the expectation columns, each with its own node id
/// (what `{id}` becomes on the "own" pass).
fn callers() -> [(&'static str, Peer, &'static str); 8] {
    [
        ("anonymous", Peer::Anonymous, "m1"),
        ("local", Peer::Local, "m1"),
        ("admin", verified("c1", "adm", Role::Admin), "adm"),
        ("manager", verified("c1", "m1", Role::Manager), "m1"),
        ("worker", verified("c1", "w1", Role::Worker), "w1"),
        ("other cluster", verified("c2", "f1", Role::Manager), "f1"),
        ("demoted", verified("c1", "d1", Role::Manager), "d1"),
        ("removed", verified("c1", "r1", Role::Worker), "r1"),
    ]
}

/// One row: a method, a template, the statuses for the eight callers with `{id}` their own
/// id, and (for templates with `{id}`) with `{id}` another node's.
type Row = (Method, &'static str, [u16; 8], Option<[u16; 8]>);

#[rustfmt::skip]
fn expectations() -> Vec<Row> {
    use Method as M;
    vec![
        //                                               anon local admin mgr  wkr  c2   dem  rm
        (M::GET,    "/v1/ping",                        [200, 200, 200, 200, 200, 403, 200, 403], None),
        (M::GET,    "/v1/join/ca",                     [200, 200, 200, 200, 200, 403, 200, 403], None),
        (M::POST,   "/v1/join",                        [200, 200, 200, 200, 200, 403, 200, 403], None),
        (M::GET,    "/v1/nodes",                       [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/nodes/{id}",                  [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/nodes/{id}",                  [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::DELETE, "/v1/nodes/{id}",                  [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/nodes/{id}/promote",          [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/nodes/{id}/demote",           [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/nodes/{id}/heartbeat",        [401, 200, 200, 200, 200, 403, 200, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/nodes/{id}/renew",            [401, 200, 200, 200, 200, 403, 200, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/nodes/{id}/tasks",            [401, 200, 200, 200, 200, 403, 200, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/nodes/{id}/assignments",      [401, 200, 200, 200, 200, 403, 200, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/nodes/{id}/network",          [401, 200, 200, 200, 200, 403, 200, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/cluster",                     [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/cluster/join-tokens",         [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/cluster/join-tokens/rotate",  [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/cluster/managers",            [401, 200, 200, 200, 200, 403, 200, 403], None),
        (M::PUT,    "/v1/cluster/settings",            [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/cluster/unlock-key",          [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/cluster/unlock-key/rotate",   [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/cluster/unlock",              [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/trust/keys",                  [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/trust/keys",                  [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::DELETE, "/v1/trust/keys/{id}",             [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/services",                    [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/services",                    [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/services/{id}",               [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::DELETE, "/v1/services/{id}",               [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/services/{id}/update",        [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::POST,   "/v1/services/{id}/rollback",      [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/services/{id}/logs",          [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/tasks",                       [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/events",                      [401, 200, 200, 403, 403, 403, 403, 403], None),
        // A task's secrets and configs: its own node (the manager then checks the assignment).
        (M::GET,    "/v1/nodes/{id}/tasks/{task}/files", [401, 200, 200, 200, 200, 403, 200, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/secrets",                     [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/secrets",                     [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/secrets/{id}",                [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::DELETE, "/v1/secrets/{id}",                [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/configs",                     [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/configs",                     [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/configs/{id}",                [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::DELETE, "/v1/configs/{id}",                [401, 200, 200, 403, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 403, 403, 403, 403, 403])),
        (M::GET,    "/v1/volumes",                     [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/volumes",                     [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/volumes/prune",               [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/volumes/{name}",              [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::DELETE, "/v1/volumes/{name}",              [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/volumes/{name}/export",       [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/volumes/{name}/import",       [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/volumes/{name}/move",         [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/networks",                    [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/networks",                    [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/networks/{name}",             [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::DELETE, "/v1/networks/{name}",             [401, 200, 200, 403, 403, 403, 403, 403], None),
        // A node's volumes: managers (still managers) and admins.
        (M::GET,    "/v1/agent/volumes",               [401, 200, 200, 200, 403, 403, 403, 403], None),
        (M::DELETE, "/v1/agent/volumes/{name}",        [401, 200, 200, 200, 403, 403, 403, 403], None),
        (M::GET,    "/v1/agent/volumes/{name}/export", [401, 200, 200, 200, 403, 403, 403, 403], None),
        (M::POST,   "/v1/agent/volumes/{name}/import", [401, 200, 200, 200, 403, 403, 403, 403], None),
        (M::GET,    "/v1/agent/volumes/{name}/tree",   [401, 200, 200, 200, 403, 403, 403, 403], None),
        // Raft: only the peer's own certificate, not even an admin.
        (M::POST,   "/internal/raft/{kind}",           [403, 403, 403, 200, 403, 403, 403, 403], None),
        // The registry: admins everything, nodes pull only, anonymous nothing.
        (M::GET,    "/v2",                             [401, 200, 200, 200, 200, 403, 200, 403], None),
        (M::GET,    "/v2/",                            [401, 200, 200, 200, 200, 403, 200, 403], None),
        (M::HEAD,   "/v2/",                            [401, 200, 200, 200, 200, 403, 200, 403], None),
        (M::GET,    "/v2/{*rest}",                     [401, 200, 200, 200, 200, 403, 200, 403], None),
        (M::HEAD,   "/v2/{*rest}",                     [401, 200, 200, 200, 200, 403, 200, 403], None),
        (M::POST,   "/v2/{*rest}",                     [401, 200, 200, 401, 401, 403, 401, 403], None),
        (M::PUT,    "/v2/{*rest}",                     [401, 200, 200, 401, 401, 403, 401, 403], None),
        (M::PATCH,  "/v2/{*rest}",                     [401, 200, 200, 401, 401, 403, 401, 403], None),
        (M::DELETE, "/v2/{*rest}",                     [401, 200, 200, 401, 401, 403, 401, 403], None),
        // Task logs on any node: managers (still managers) and admins.
        (M::GET,    "/v1/tasks/{id}/logs",             [401, 200, 200, 200, 403, 403, 403, 403],
                                                  Some([401, 200, 200, 200, 403, 403, 403, 403])),
        (M::GET,    "/v1/images",                      [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/images/import",               [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/images/load",                 [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/images/signatures",           [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/images/prune",                [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::GET,    "/v1/images/{*ref}",               [401, 200, 200, 403, 403, 403, 403, 403], None),
        (M::DELETE, "/v1/images/{*ref}",               [401, 200, 200, 403, 403, 403, 403, 403], None),
        // A served path with another method: the path's access, then the router's 405.
        (M::POST,   "/v1/ping",                        [405, 405, 405, 405, 405, 403, 405, 403], None),
        (M::GET,    "/v1/join",                        [405, 405, 405, 405, 405, 403, 405, 403], None),
        (M::GET,    "/v1/nodes/{id}/heartbeat",        [401, 405, 405, 405, 405, 403, 405, 403],
                                                  Some([401, 405, 405, 403, 403, 403, 403, 403])),
        (M::GET,    "/internal/raft/{kind}",           [403, 403, 403, 405, 403, 403, 403, 403], None),
        (M::POST,   "/v2",                             [401, 405, 405, 401, 401, 403, 401, 403], None),
        (M::DELETE, "/v1/images/import",               [401, 405, 405, 403, 403, 403, 403, 403], None),
        (M::POST,   "/v1/tasks/{id}/logs",             [401, 405, 405, 405, 403, 403, 403, 403],
                                                  Some([401, 405, 405, 405, 403, 403, 403, 403])),
    ]
}

/// Answers 200 with who it was called for.
async fn echo(Extension(caller): Extension<Caller>) -> String {
    caller.header_value()
}

/// Every entry of [`ROUTES`] as a route, behind the real middleware.
fn app() -> Router {
    let mut router = Router::new();
    for route in ROUTES {
        let handler = match &route.method {
            Some(m) => on(MethodFilter::try_from(m.clone()).expect("a filter"), echo),
            None => any(echo),
        };
        router = router.route(route.path, handler);
    }
    let members: Arc<dyn Members> = Arc::new(Fake);
    router
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(members, authorize))
}

/// The template with `id` for `{id}` and sample values for the other parameters.
fn instantiate(template: &str, id: &str) -> String {
    template
        .replace("{id}", id)
        .replace("{kind}", "append")
        .replace("{task}", "t1")
        .replace("{name}", "data")
        .replace("{*rest}", "library/alpine/manifests/3")
        .replace("{*ref}", "docker.io/library/alpine:3")
}

async fn call(
    app: &Router,
    method: Method,
    path: &str,
    peer: Peer,
    forward: Option<&str>,
) -> (u16, String) {
    let mut req = Request::builder().method(method).uri(path).extension(peer);
    if let Some(f) = forward {
        req = req.header(CALLER_HEADER, f);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).expect("a request"))
        .await
        .expect("infallible");
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("a body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn every_route_for_every_caller() {
    let rows = expectations();
    // Every entry of the table has its expectations (and nothing is expected of a template
    // the table lacks).
    for route in ROUTES {
        assert!(
            rows.iter()
                .any(|(m, p, _, _)| *p == route.path
                    && route.method.as_ref().is_none_or(|rm| rm == m)),
            "no expectation for {:?} {}",
            route.method,
            route.path
        );
    }
    for (_, p, _, other) in &rows {
        assert!(
            ROUTES.iter().any(|r| r.path == *p),
            "{p} is not in the table"
        );
        assert_eq!(other.is_some(), p.contains("{id}"), "{p}");
    }

    let app = app();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (method, template, own, other) in &rows {
        for (i, (who, peer, own_id)) in callers().into_iter().enumerate() {
            let mut passes = vec![(instantiate(template, own_id), own[i])];
            if let Some(other) = other {
                passes.push((instantiate(template, "x9"), other[i]));
            }
            for (path, want) in passes {
                let (got, body) = call(&app, method.clone(), &path, peer.clone(), None).await;
                checked += 1;
                if got != want {
                    failures.push(format!(
                        "{who}: {method} {path}: {got}, want {want}: {body}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked > 400, "{checked}");
}

#[tokio::test]
async fn unknown_paths_need_an_admin() {
    let app = app();
    for path in [
        "/v1/nope",
        "/",
        "/v1/ping/",
        "/v1//ping",
        "/v1/join/ca/x",
        "/v2x",
        "/internal/raft/a/b",
    ] {
        for (i, (who, peer, _)) in callers().into_iter().enumerate() {
            let want = [401, 404, 404, 403, 403, 403, 403, 403][i];
            let (got, body) = call(&app, Method::GET, path, peer, None).await;
            assert_eq!(got, want, "{who}: GET {path}: {body}");
        }
    }
}

#[tokio::test]
async fn refusals_say_why() {
    let app = app();
    let cases = [
        (
            Peer::Anonymous,
            Method::GET,
            "/v1/nodes",
            "a client certificate is required: pass --tls-dir",
        ),
        (
            Peer::Anonymous,
            Method::GET,
            "/v2/",
            "the registry needs a client certificate",
        ),
        (
            verified("c1", "w1", Role::Worker),
            Method::PUT,
            "/v2/x/manifests/1",
            "the registry needs a client certificate",
        ),
        (
            verified("c1", "w1", Role::Worker),
            Method::POST,
            "/v1/nodes/m1/heartbeat",
            "node certificates may not call /v1/nodes/m1/heartbeat; use an admin bundle",
        ),
        (
            verified("c1", "d1", Role::Manager),
            Method::POST,
            "/internal/raft/vote",
            "raft rpcs need the certificate of a current manager of this cluster",
        ),
        (
            Peer::Local,
            Method::POST,
            "/internal/raft/vote",
            "current manager of this cluster",
        ),
        (
            verified("c2", "f1", Role::Manager),
            Method::GET,
            "/v1/ping",
            "certificate belongs to another cluster",
        ),
        (
            verified("c1", "r1", Role::Worker),
            Method::GET,
            "/v2/",
            "not a member of this cluster",
        ),
    ];
    for (peer, method, path, message) in cases {
        let (_, body) = call(&app, method.clone(), path, peer.clone(), None).await;
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        let got = body["message"].as_str().unwrap_or_default();
        assert!(got.contains(message), "{peer:?} {method} {path}: {got}");
    }
}

#[tokio::test]
async fn a_manager_forwards_for_its_caller() {
    let app = app();
    let m1 = verified("c1", "m1", Role::Manager);
    let w1 = verified("c1", "w1", Role::Worker);
    let d1 = verified("c1", "d1", Role::Manager);
    let cases = [
        // A manager speaks for an admin; a worker's or a demoted manager's word counts for
        // nothing (they act as themselves).
        (&m1, "admin", Method::GET, "/v1/cluster", 200, "admin"),
        (&w1, "admin", Method::GET, "/v1/cluster", 403, ""),
        (&d1, "admin", Method::GET, "/v1/cluster", 403, ""),
        (
            &w1,
            "admin",
            Method::POST,
            "/v1/nodes/w1/heartbeat",
            200,
            "node:worker:w1",
        ),
        // A forwarded node is the store's: as its own role, and only while a member.
        (
            &m1,
            "node:worker:w1",
            Method::POST,
            "/v1/nodes/w1/heartbeat",
            200,
            "node:worker:w1",
        ),
        (
            &m1,
            "node:worker:w1",
            Method::POST,
            "/v1/nodes/m1/heartbeat",
            403,
            "",
        ),
        (
            &m1,
            "node:manager:d1",
            Method::GET,
            "/v1/tasks/t1/logs",
            403,
            "",
        ),
        (
            &m1,
            "node:worker:r1",
            Method::POST,
            "/v1/nodes/r1/heartbeat",
            403,
            "",
        ),
        (&m1, "anonymous", Method::GET, "/v1/cluster", 401, ""),
        (&m1, "anonymous", Method::GET, "/v1/ping", 200, "anonymous"),
        (&m1, "garbage", Method::GET, "/v1/cluster", 401, ""),
        // Raft goes by the certificate alone.
        (
            &m1,
            "anonymous",
            Method::POST,
            "/internal/raft/vote",
            200,
            "node:manager:m1",
        ),
        (
            &w1,
            "node:manager:m1",
            Method::POST,
            "/internal/raft/vote",
            403,
            "",
        ),
    ];
    for (peer, forward, method, path, want, caller) in cases {
        let (got, body) = call(&app, method.clone(), path, peer.clone(), Some(forward)).await;
        assert_eq!(got, want, "{peer:?} for {forward}: {method} {path}: {body}");
        if want == 200 {
            assert_eq!(body, caller, "{peer:?} for {forward}: {method} {path}");
        }
    }
}
