//! Placement constraints (`node.labels.zone==eu`, `node.role!=manager`, …) and spread
//! preferences (`spread=node.labels.zone`), parsed once and matched against nodes.
//!
//! Matching follows Swarm: values compare case-insensitively; a `!=` constraint on a label the
//! node does not have matches, a `==` one does not.

use std::fmt;

use flotilla_types::Node;

/// Why a constraint or preference string could not be parsed. The text is shown to users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    #[error("invalid constraint {0:?}: expected KEY==VALUE or KEY!=VALUE")]
    Syntax(String),
    #[error(
        "invalid constraint {0:?}: unknown key, use node.id, node.hostname, node.role, \
         node.labels.<name>, node.platform.os or node.platform.arch"
    )]
    UnknownKey(String),
    #[error("invalid constraint {0:?}: the value must not be empty")]
    EmptyValue(String),
    #[error("invalid constraint {0:?}: node.role must be manager or worker")]
    BadRole(String),
    #[error("invalid placement preference {0:?}: expected spread=node.labels.<name>")]
    Preference(String),
}

/// What a constraint looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintKey {
    Id,
    Hostname,
    Role,
    Label(String),
    Os,
    Arch,
}

/// One parsed constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub key: ConstraintKey,
    /// `true` for `==`, `false` for `!=`.
    pub equal: bool,
    pub value: String,
    /// The text as the user wrote it (trimmed), for messages.
    pub text: String,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Constraint {
    /// Parses `KEY==VALUE` or `KEY!=VALUE` (spaces around the operator are allowed).
    pub fn parse(s: &str) -> Result<Constraint, ConstraintError> {
        let text = s.trim();
        let (lhs, rhs, equal) = if let Some((l, r)) = text.split_once("!=") {
            (l, r, false)
        } else if let Some((l, r)) = text.split_once("==") {
            (l, r, true)
        } else {
            return Err(ConstraintError::Syntax(text.to_string()));
        };
        let lhs = lhs.trim();
        let value = rhs.trim();
        if lhs.is_empty() || value.contains("==") || value.contains("!=") {
            return Err(ConstraintError::Syntax(text.to_string()));
        }
        if value.is_empty() {
            return Err(ConstraintError::EmptyValue(text.to_string()));
        }
        let key = match lhs.to_ascii_lowercase().as_str() {
            "node.id" => ConstraintKey::Id,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" => {
                if !value.eq_ignore_ascii_case("manager") && !value.eq_ignore_ascii_case("worker") {
                    return Err(ConstraintError::BadRole(text.to_string()));
                }
                ConstraintKey::Role
            }
            "node.platform.os" => ConstraintKey::Os,
            "node.platform.arch" => ConstraintKey::Arch,
            _ => match lhs.strip_prefix("node.labels.") {
                Some(name) if !name.is_empty() => ConstraintKey::Label(name.to_string()),
                _ => return Err(ConstraintError::UnknownKey(text.to_string())),
            },
        };
        Ok(Constraint {
            key,
            equal,
            value: value.to_string(),
            text: text.to_string(),
        })
    }

    /// Whether `node` satisfies this constraint.
    pub fn matches(&self, node: &Node) -> bool {
        let actual: Option<&str> = match &self.key {
            ConstraintKey::Id => Some(&node.id),
            ConstraintKey::Hostname => Some(&node.description.hostname),
            ConstraintKey::Role => Some(node.spec.role.as_str()),
            ConstraintKey::Label(name) => node.spec.labels.get(name).map(String::as_str),
            ConstraintKey::Os => Some(&node.description.os),
            ConstraintKey::Arch => Some(&node.description.arch),
        };
        let same = actual.is_some_and(|a| a.eq_ignore_ascii_case(&self.value));
        same == self.equal
    }
}

/// Parses every constraint of a placement; the first error wins.
pub fn parse_constraints(list: &[String]) -> Result<Vec<Constraint>, ConstraintError> {
    list.iter().map(|c| Constraint::parse(c)).collect()
}

/// Whether `node` satisfies all `constraints`.
pub fn matches_all(constraints: &[Constraint], node: &Node) -> bool {
    constraints.iter().all(|c| c.matches(node))
}

/// A spread preference: distribute tasks evenly over the values of one node label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpreadPreference {
    /// The node label name (`zone` for `spread=node.labels.zone`).
    pub label: String,
}

impl SpreadPreference {
    /// Parses `spread=node.labels.NAME` (also accepts a bare `node.labels.NAME`).
    pub fn parse(s: &str) -> Result<SpreadPreference, ConstraintError> {
        let text = s.trim();
        let body = match text.split_once('=') {
            Some((kind, rest)) if kind.trim().eq_ignore_ascii_case("spread") => rest.trim(),
            Some(_) => return Err(ConstraintError::Preference(text.to_string())),
            None => text,
        };
        match body.strip_prefix("node.labels.") {
            Some(name) if !name.is_empty() => Ok(SpreadPreference {
                label: name.to_string(),
            }),
            _ => Err(ConstraintError::Preference(text.to_string())),
        }
    }

    /// The node's value for this preference; nodes without the label share the value `""`.
    pub fn value<'n>(&self, node: &'n Node) -> &'n str {
        node.spec.labels.get(&self.label).map_or("", String::as_str)
    }
}

/// Parses every preference of a placement; the first error wins.
pub fn parse_preferences(list: &[String]) -> Result<Vec<SpreadPreference>, ConstraintError> {
    list.iter().map(|p| SpreadPreference::parse(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::node;

    #[test]
    fn parses_all_keys_and_operators() {
        let c = Constraint::parse("node.labels.zone==eu").unwrap();
        assert_eq!(c.key, ConstraintKey::Label("zone".into()));
        assert!(c.equal);
        assert_eq!(c.value, "eu");
        let c = Constraint::parse(" node.role != manager ").unwrap();
        assert_eq!(c.key, ConstraintKey::Role);
        assert!(!c.equal);
        assert_eq!(c.text, "node.role != manager");
        assert_eq!(
            Constraint::parse("node.id==abc").unwrap().key,
            ConstraintKey::Id
        );
        assert_eq!(
            Constraint::parse("node.hostname==h1").unwrap().key,
            ConstraintKey::Hostname
        );
        assert_eq!(
            Constraint::parse("node.platform.os==linux").unwrap().key,
            ConstraintKey::Os
        );
        assert_eq!(
            Constraint::parse("node.platform.arch!=arm64").unwrap().key,
            ConstraintKey::Arch
        );
    }

    #[test]
    fn rejects_bad_syntax() {
        assert!(matches!(
            Constraint::parse("node.labels.zone=eu"),
            Err(ConstraintError::Syntax(_))
        ));
        assert!(matches!(
            Constraint::parse("==eu"),
            Err(ConstraintError::Syntax(_))
        ));
        assert!(matches!(
            Constraint::parse("node.labels.zone==a==b"),
            Err(ConstraintError::Syntax(_))
        ));
        assert!(matches!(
            Constraint::parse("node.labels.zone=="),
            Err(ConstraintError::EmptyValue(_))
        ));
        assert!(matches!(
            Constraint::parse("node.color==red"),
            Err(ConstraintError::UnknownKey(_))
        ));
        assert!(matches!(
            Constraint::parse("node.labels.==x"),
            Err(ConstraintError::UnknownKey(_))
        ));
        assert!(matches!(
            Constraint::parse("node.role==boss"),
            Err(ConstraintError::BadRole(_))
        ));
        let msg = Constraint::parse("zone=eu").unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid constraint \"zone=eu\": expected KEY==VALUE or KEY!=VALUE"
        );
    }

    #[test]
    fn matches_nodes() {
        let mut n = node("n1");
        n.spec.labels.insert("zone".into(), "EU".into());
        let m = |s: &str| Constraint::parse(s).unwrap().matches(&n);
        assert!(m("node.labels.zone==eu"), "case-insensitive like swarm");
        assert!(!m("node.labels.zone!=eu"));
        assert!(!m("node.labels.disk==ssd"), "missing label never equals");
        assert!(m("node.labels.disk!=ssd"), "missing label is not-equal");
        assert!(m("node.id==n1"));
        assert!(m("node.hostname==host-n1"));
        assert!(m("node.role==worker"));
        assert!(m("node.role!=manager"));
        assert!(m("node.platform.os==linux"));
        let all = parse_constraints(&["node.role==worker".into(), "node.labels.zone==us".into()])
            .unwrap();
        assert!(!matches_all(&all, &n));
        assert!(parse_constraints(&["node.role==worker".into(), "bad".into()]).is_err());
    }

    #[test]
    fn preferences() {
        let p = SpreadPreference::parse("spread=node.labels.zone").unwrap();
        assert_eq!(p.label, "zone");
        assert_eq!(
            SpreadPreference::parse("node.labels.rack").unwrap().label,
            "rack"
        );
        assert!(SpreadPreference::parse("spread=node.role").is_err());
        assert!(SpreadPreference::parse("pack=node.labels.zone").is_err());
        let mut n = node("n1");
        assert_eq!(p.value(&n), "");
        n.spec.labels.insert("zone".into(), "a".into());
        assert_eq!(p.value(&n), "a");
    }
}
