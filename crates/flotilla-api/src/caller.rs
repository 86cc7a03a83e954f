//! Who a request acts for, after authentication: what the authorization policy and the
//! handlers decide on. A manager forwarding a request to the leader passes its caller along
//! in [`CALLER_HEADER`], which the leader believes only from a manager certificate.

use flotilla_pki::Role;

/// Who a request acts for, after authentication and (for forwarded requests) the
/// forwarding manager's word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Local socket or an admin certificate.
    Admin,
    Node {
        id: String,
        role: Role,
    },
    Anonymous,
}

impl Caller {
    pub fn header_value(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Node { id, role } => format!(
                "node:{}:{id}",
                if *role == Role::Manager {
                    "manager"
                } else {
                    "worker"
                }
            ),
            Caller::Anonymous => "anonymous".into(),
        }
    }
    pub fn from_header(v: &str) -> Caller {
        let parts: Vec<&str> = v.splitn(3, ':').collect();
        match parts.as_slice() {
            ["admin"] => Caller::Admin,
            ["node", "manager", id] => Caller::Node {
                id: id.to_string(),
                role: Role::Manager,
            },
            ["node", "worker", id] => Caller::Node {
                id: id.to_string(),
                role: Role::Worker,
            },
            _ => Caller::Anonymous,
        }
    }
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }
    /// The caller is the node `id` itself (or an admin).
    pub fn is_node_or_admin(&self, id: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Node { id: me, .. } => me == id,
            Caller::Anonymous => false,
        }
    }
}

pub const CALLER_HEADER: &str = "x-flotilla-caller";
