//! Who may call what: every route a node serves, with the [`Access`] it needs, in one typed
//! table ([`ROUTES`]), a small matcher for it ([`lookup`]) and the decision ([`check`]).
//!
//! The table lists the routes of the node itself (`flotilla-node`), of its agent
//! (`flotilla_agent::router`), of its manager (`flotilla_manager::api::router`) and of the
//! registry (`/v2`). Templates are written as axum's: `{name}` is one non-empty segment,
//! `{*name}` the (non-empty) rest of the path. Authorization runs before routing, so it matches
//! the raw request path itself; a path no template matches needs an admin (the router then
//! answers 404 to the admin, and an anonymous caller learns only that it needs a certificate).
//!
//! Access is a property of the path: a request for a served path with a method the route does
//! not serve is checked against that path's access (and the router answers 405 past it), so
//! every entry for one template carries the same access (the tests hold the table to that).

use axum::http::Method;
use flotilla_pki::Role;

use crate::{ApiError, Caller};

/// What a route needs of its caller (after [`Caller`] resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, anonymous callers included (ping, the CA and the join itself).
    Anyone,
    /// The node named by the path's `{id}` (manager or worker certificate), or an admin.
    OwnNode,
    /// Any node of the cluster (manager or worker certificate), or an admin.
    AnyNode,
    /// A manager node (a manager certificate the cluster still counts as a manager), or an
    /// admin.
    Manager,
    /// Raft RPCs: only the certificate of a current Raft peer of this node in this cluster,
    /// decided on the transport's peer alone (no admin, no forwarding).
    RaftPeer,
    /// The registry: admins may use every method, nodes only `GET` and `HEAD`.
    Registry,
    /// Admins only (the local socket or an admin certificate).
    Admin,
}

/// One route the node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The method the route serves; `None` for any.
    pub method: Option<Method>,
    /// The axum path template, e.g. `/v1/nodes/{id}/heartbeat` or `/v1/images/{*ref}`.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

const fn route(method: Method, path: &'static str, access: Access) -> Route {
    Route {
        method: Some(method),
        path,
        access,
    }
}

const fn any(path: &'static str, access: Access) -> Route {
    Route {
        method: None,
        path,
        access,
    }
}

/// Every route a node serves, and who may call it. A manager serves all of them; a worker
/// answers the manager's with where to go instead (past this same check).
pub const ROUTES: &[Route] = &[
    // The node's own (flotilla-node).
    route(Method::GET, "/v1/ping", Access::Anyone),
    route(Method::GET, "/v1/join/ca", Access::Anyone),
    // A locked manager's unlock (autolock): the admin, over the local socket or mTLS (the
    // node's certificates are not sealed, so TLS works while the store is locked).
    route(Method::POST, "/v1/cluster/unlock", Access::Admin),
    // The manager's, behind its leader gate (flotilla-manager).
    route(Method::POST, "/v1/join", Access::Anyone),
    route(Method::GET, "/v1/nodes", Access::Admin),
    route(Method::GET, "/v1/nodes/{id}", Access::Admin),
    route(Method::POST, "/v1/nodes/{id}", Access::Admin),
    route(Method::DELETE, "/v1/nodes/{id}", Access::Admin),
    route(Method::POST, "/v1/nodes/{id}/promote", Access::Admin),
    route(Method::POST, "/v1/nodes/{id}/demote", Access::Admin),
    route(Method::POST, "/v1/nodes/{id}/heartbeat", Access::OwnNode),
    route(Method::POST, "/v1/nodes/{id}/renew", Access::OwnNode),
    route(Method::POST, "/v1/nodes/{id}/tasks", Access::OwnNode),
    route(Method::GET, "/v1/cluster", Access::Admin),
    route(Method::GET, "/v1/cluster/join-tokens", Access::Admin),
    route(
        Method::POST,
        "/v1/cluster/join-tokens/rotate",
        Access::Admin,
    ),
    route(Method::POST, "/v1/cluster/managers", Access::AnyNode),
    route(Method::PUT, "/v1/cluster/settings", Access::Admin),
    route(Method::GET, "/v1/cluster/unlock-key", Access::Admin),
    route(Method::POST, "/v1/cluster/unlock-key/rotate", Access::Admin),
    route(Method::GET, "/v1/trust/keys", Access::Admin),
    route(Method::POST, "/v1/trust/keys", Access::Admin),
    route(Method::DELETE, "/v1/trust/keys/{id}", Access::Admin),
    route(Method::GET, "/v1/services", Access::Admin),
    route(Method::POST, "/v1/services", Access::Admin),
    route(Method::GET, "/v1/services/{id}", Access::Admin),
    route(Method::DELETE, "/v1/services/{id}", Access::Admin),
    route(Method::POST, "/v1/services/{id}/update", Access::Admin),
    route(Method::POST, "/v1/services/{id}/rollback", Access::Admin),
    route(Method::GET, "/v1/tasks", Access::Admin),
    route(
        Method::GET,
        "/v1/nodes/{id}/tasks/{task}/files",
        Access::OwnNode,
    ),
    route(Method::GET, "/v1/secrets", Access::Admin),
    route(Method::POST, "/v1/secrets", Access::Admin),
    route(Method::GET, "/v1/secrets/{id}", Access::Admin),
    route(Method::DELETE, "/v1/secrets/{id}", Access::Admin),
    route(Method::GET, "/v1/configs", Access::Admin),
    route(Method::POST, "/v1/configs", Access::Admin),
    route(Method::GET, "/v1/configs/{id}", Access::Admin),
    route(Method::DELETE, "/v1/configs/{id}", Access::Admin),
    route(Method::GET, "/v1/volumes", Access::Admin),
    route(Method::POST, "/v1/volumes", Access::Admin),
    route(Method::POST, "/v1/volumes/prune", Access::Admin),
    route(Method::GET, "/v1/volumes/{name}", Access::Admin),
    route(Method::DELETE, "/v1/volumes/{name}", Access::Admin),
    route(Method::GET, "/v1/volumes/{name}/export", Access::Admin),
    route(Method::POST, "/v1/volumes/{name}/import", Access::Admin),
    route(Method::POST, "/v1/volumes/{name}/move", Access::Admin),
    route(Method::GET, "/v1/networks", Access::Admin),
    route(Method::POST, "/v1/networks", Access::Admin),
    route(Method::GET, "/v1/networks/{name}", Access::Admin),
    route(Method::DELETE, "/v1/networks/{name}", Access::Admin),
    // The manager's, answered by any manager (flotilla-manager).
    route(Method::GET, "/v1/events", Access::Admin),
    route(Method::GET, "/v1/nodes/{id}/assignments", Access::OwnNode),
    route(Method::GET, "/v1/nodes/{id}/network", Access::OwnNode),
    route(Method::GET, "/v1/services/{id}/logs", Access::Admin),
    route(Method::POST, "/internal/raft/{kind}", Access::RaftPeer),
    // The registry, on managers (flotilla-registry).
    route(Method::GET, "/v2", Access::Registry),
    route(Method::GET, "/v2/", Access::Registry),
    any("/v2/{*rest}", Access::Registry),
    // The agent's, on every node (flotilla-agent); the fixed image paths before the wildcard.
    route(Method::GET, "/v1/tasks/{id}/logs", Access::Manager),
    route(Method::GET, "/v1/agent/volumes", Access::Manager),
    route(Method::DELETE, "/v1/agent/volumes/{name}", Access::Manager),
    route(
        Method::GET,
        "/v1/agent/volumes/{name}/export",
        Access::Manager,
    ),
    route(
        Method::POST,
        "/v1/agent/volumes/{name}/import",
        Access::Manager,
    ),
    route(
        Method::GET,
        "/v1/agent/volumes/{name}/tree",
        Access::Manager,
    ),
    route(Method::GET, "/v1/images", Access::Admin),
    route(Method::POST, "/v1/images/import", Access::Admin),
    route(Method::POST, "/v1/images/load", Access::Admin),
    route(Method::POST, "/v1/images/signatures", Access::Admin),
    route(Method::POST, "/v1/images/prune", Access::Admin),
    route(Method::GET, "/v1/images/{*ref}", Access::Admin),
    route(Method::DELETE, "/v1/images/{*ref}", Access::Admin),
];

/// The values a template's parameters took in one path (borrowed from the path).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params<'a> {
    values: Vec<(&'static str, &'a str)>,
}

impl<'a> Params<'a> {
    /// The value of parameter `name` (`id` for `{id}`, `rest` for `{*rest}`).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

/// The route for `method` on `path`, with the template's parameters. When the path is served
/// but not for this method, the first route of that path for another method (same access: the
/// router answers 405 once the caller is authorized). `None`: no route serves the path.
pub fn lookup<'p>(method: &Method, path: &'p str) -> Option<(&'static Route, Params<'p>)> {
    let mut other_method = None;
    for route in ROUTES {
        let Some(params) = match_template(route.path, path) else {
            continue;
        };
        if route.method.as_ref().is_none_or(|m| m == method) {
            return Some((route, params));
        }
        if other_method.is_none() {
            other_method = Some((route, params));
        }
    }
    other_method
}

/// Matches `path` against an axum-style `template`, segment by segment: a literal segment
/// matches itself (empty ones included, so `/v2/` is not `/v2`), `{name}` one non-empty
/// segment other than `.` and `..`, `{*name}` (last) the non-empty rest of the path.
pub fn match_template<'p>(template: &'static str, path: &'p str) -> Option<Params<'p>> {
    let mut rest = Some(path.strip_prefix('/')?);
    let mut params = Params::default();
    for segment in template.strip_prefix('/')?.split('/') {
        if let Some(name) = segment.strip_prefix("{*").and_then(|s| s.strip_suffix('}')) {
            // A catch-all takes everything left, which must not be nothing.
            let value = rest.filter(|r| !r.is_empty())?;
            params.values.push((name, value));
            return Some(params);
        }
        let (here, next) = match rest?.split_once('/') {
            Some((here, next)) => (here, Some(next)),
            None => (rest?, None),
        };
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if matches!(here, "" | "." | "..") {
                return None;
            }
            params.values.push((name, here));
        } else if segment != here {
            return None;
        }
        rest = next;
    }
    // The template is used up: so must the path be.
    rest.is_none().then_some(params)
}

/// The 401 for an anonymous caller of anything but [`Access::Anyone`].
pub const CERT_REQUIRED: &str = "a client certificate is required: pass --tls-dir with the admin bundle (DATA_DIR/admin of the first manager)";
/// The 401 for a registry request the caller may not make.
pub const REGISTRY_CERT_REQUIRED: &str = "the registry needs a client certificate: the admin bundle to push (skopeo --dest-cert-dir DATA_DIR/admin), a node certificate to pull";
/// The 403 for a Raft RPC from anyone but a current Raft peer.
pub const RAFT_PEERS_ONLY: &str =
    "raft rpcs need the certificate of a current manager of this cluster";

/// Whether `caller` may make a request needing `access`; `params` are the matched route's,
/// `method` and `path` the request's. For [`Access::RaftPeer`] the caller must already be the
/// Raft peer's (a manager node: see `authz`); anyone else gets the Raft refusal.
pub fn check(
    caller: &Caller,
    access: Access,
    params: &Params<'_>,
    method: &Method,
    path: &str,
) -> Result<(), ApiError> {
    match (access, caller) {
        (Access::RaftPeer, Caller::Node { role, .. }) if *role == Role::Manager => Ok(()),
        (Access::RaftPeer, _) => Err(ApiError::forbidden(RAFT_PEERS_ONLY)),
        // The registry: admins push and pull; nodes only pull.
        (Access::Registry, Caller::Admin) => Ok(()),
        (Access::Registry, Caller::Node { .. })
            if matches!(*method, Method::GET | Method::HEAD) =>
        {
            Ok(())
        }
        (Access::Registry, _) => Err(ApiError::unauthorized(REGISTRY_CERT_REQUIRED)),
        (Access::Anyone, _) | (_, Caller::Admin) => Ok(()),
        (_, Caller::Anonymous) => Err(ApiError::unauthorized(CERT_REQUIRED)),
        (access, Caller::Node { id, role }) => {
            let allowed = match access {
                Access::OwnNode => params.get("id") == Some(id.as_str()),
                Access::AnyNode => true,
                Access::Manager => *role == Role::Manager,
                _ => false,
            };
            if allowed {
                Ok(())
            } else {
                Err(ApiError::forbidden(format!(
                    "node certificates may not call {path}; use an admin bundle"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of<'p>(template: &'static str, path: &'p str) -> Option<Option<&'p str>> {
        match_template(template, path).map(|p| p.get("id"))
    }

    #[test]
    fn literal_templates_match_only_themselves() {
        assert_eq!(id_of("/v1/ping", "/v1/ping"), Some(None));
        assert_eq!(id_of("/v1/ping", "/v1/pin"), None);
        assert_eq!(id_of("/v1/ping", "/v1/ping/x"), None);
        assert_eq!(id_of("/v1/ping", "/v1"), None);
        assert_eq!(id_of("/v1/ping", "v1/ping"), None);
        assert_eq!(id_of("/v1/ping", ""), None);
        assert_eq!(id_of("/v1/ping", "/"), None);
    }

    #[test]
    fn trailing_slashes_are_significant() {
        assert_eq!(id_of("/v1/ping", "/v1/ping/"), None);
        assert_eq!(id_of("/v2", "/v2/"), None);
        assert_eq!(id_of("/v2/", "/v2/"), Some(None));
        assert_eq!(id_of("/v2/", "/v2"), None);
        assert_eq!(id_of("/v1/nodes/{id}", "/v1/nodes/n1/"), None);
    }

    #[test]
    fn a_parameter_is_one_proper_segment() {
        assert_eq!(
            id_of("/v1/nodes/{id}/heartbeat", "/v1/nodes/n1/heartbeat"),
            Some(Some("n1"))
        );
        assert_eq!(id_of("/v1/nodes/{id}", "/v1/nodes/n1"), Some(Some("n1")));
        assert_eq!(
            id_of("/v1/nodes/{id}/heartbeat", "/v1/nodes//heartbeat"),
            None
        );
        assert_eq!(
            id_of("/v1/nodes/{id}/heartbeat", "/v1/nodes/a/b/heartbeat"),
            None
        );
        assert_eq!(
            id_of("/v1/nodes/{id}/heartbeat", "/v1/nodes/../heartbeat"),
            None
        );
        assert_eq!(
            id_of("/v1/nodes/{id}/heartbeat", "/v1/nodes/./heartbeat"),
            None
        );
        assert_eq!(id_of("/v1/nodes/{id}", "/v1/nodes/"), None);
        assert_eq!(id_of("/v1/nodes/{id}", "/v1/nodes"), None);
        // Raw, as the router sees it: no decoding, no normalization.
        assert_eq!(
            id_of("/v1/nodes/{id}", "/v1/nodes/a%2Fb"),
            Some(Some("a%2Fb"))
        );
        let p = match_template("/internal/raft/{kind}", "/internal/raft/vote");
        assert_eq!(p.and_then(|p| p.get("kind")), Some("vote"));
    }

    #[test]
    fn empty_segments_match_no_literal() {
        assert_eq!(id_of("/v1/ping", "//v1/ping"), None);
        assert_eq!(id_of("/v1/ping", "/v1//ping"), None);
        assert_eq!(id_of("/v1/join/ca", "/v1/join//ca"), None);
    }

    #[test]
    fn a_wildcard_takes_the_non_empty_rest() {
        let rest = |path| match_template("/v2/{*rest}", path).and_then(|p| p.get("rest"));
        assert_eq!(rest("/v2/x"), Some("x"));
        assert_eq!(
            rest("/v2/library/alpine/manifests/3"),
            Some("library/alpine/manifests/3")
        );
        assert_eq!(rest("/v2/x/"), Some("x/"));
        assert_eq!(rest("/v2//x"), Some("/x"));
        assert_eq!(rest("/v2/../v1/nodes"), Some("../v1/nodes"));
        assert_eq!(rest("/v2/"), None);
        assert_eq!(rest("/v2"), None);
        assert_eq!(rest("/v2x/y"), None);
        let r = match_template("/v1/images/{*ref}", "/v1/images/docker.io/library/a:1");
        assert_eq!(r.and_then(|p| p.get("ref")), Some("docker.io/library/a:1"));
    }

    #[test]
    fn lookup_prefers_the_method_and_falls_back_to_the_path() {
        let (route, params) = lookup(&Method::POST, "/v1/nodes/n1/heartbeat").expect("a route");
        assert_eq!(route.path, "/v1/nodes/{id}/heartbeat");
        assert_eq!(params.get("id"), Some("n1"));
        // The path's route for another method: the router answers 405 past the check.
        let (route, _) = lookup(&Method::GET, "/v1/nodes/n1/heartbeat").expect("a route");
        assert_eq!(route.path, "/v1/nodes/{id}/heartbeat");
        let (route, _) = lookup(&Method::DELETE, "/v1/nodes/n1").expect("a route");
        assert_eq!(route.method, Some(Method::DELETE));
        // Fixed paths before the wildcard beside them.
        let (route, _) = lookup(&Method::POST, "/v1/images/import").expect("a route");
        assert_eq!(route.path, "/v1/images/import");
        let (route, _) = lookup(&Method::GET, "/v1/images/import").expect("a route");
        assert_eq!(route.path, "/v1/images/{*ref}");
        let (route, _) = lookup(&Method::PATCH, "/v2/x/blobs/uploads/1").expect("a route");
        assert_eq!(route.access, Access::Registry);
        assert!(lookup(&Method::GET, "/v1/nope").is_none());
        assert!(lookup(&Method::GET, "/v1/ping/").is_none());
        assert!(lookup(&Method::POST, "/internal/raft/a/b").is_none());
    }

    /// A template with sample values for its parameters.
    fn sample(template: &str) -> String {
        template
            .split('/')
            .map(|s| {
                if s.starts_with("{*") {
                    "some/thing"
                } else if s.starts_with('{') {
                    "x1"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn the_table_is_well_formed() {
        let methods = [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ];
        for (i, route) in ROUTES.iter().enumerate() {
            // Every entry is reachable: its own sample finds it.
            let path = sample(route.path);
            let method = route.method.clone().unwrap_or(Method::GET);
            let (found, _) = lookup(&method, &path).expect("a route");
            assert_eq!(found, route, "{path}");
            // Access is a property of the path, whatever the method.
            for m in &methods {
                let (found, _) = lookup(m, &path).expect("a route");
                assert_eq!(found.access, route.access, "{m} {path}");
            }
            // No entry listed twice.
            assert!(
                !ROUTES[..i]
                    .iter()
                    .any(|r| r.path == route.path && r.method == route.method),
                "{:?} {} listed twice",
                route.method,
                route.path
            );
            // The node's own routes name the node.
            if route.access == Access::OwnNode {
                assert!(route.path.contains("{id}"), "{}", route.path);
            }
        }
    }
}
