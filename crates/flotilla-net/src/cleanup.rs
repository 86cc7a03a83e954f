//! Finding and removing what a node left behind (`flotilla node cleanup`, leak tests).

use std::path::PathBuf;

use crate::{link, nat, netns, Error, Net, Result};

/// What belongs to a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Links whose name starts with one of these (each at least 3 chars, so a typo cannot
    /// match `eth0` or `lo`).
    pub link_prefixes: Vec<String>,
    /// Run dir holding the node's namespace files.
    pub netns_dir: Option<PathBuf>,
    /// iptables chain tags (see [`crate::nat`]).
    pub iptables_tags: Vec<String>,
}

impl Owned {
    fn validate(&self) -> Result<()> {
        for p in &self.link_prefixes {
            if p.len() < 3 {
                return Err(Error::Invalid(format!(
                    "link prefix {p:?} is too short (3 chars at least)"
                )));
            }
        }
        Ok(())
    }
}

async fn owned_links(net: &Net, o: &Owned) -> Result<Vec<String>> {
    Ok(link::names(net)
        .await?
        .into_iter()
        .filter(|n| o.link_prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect())
}

/// What [`remove_all`] would remove, as `link <name>`, `netns <path>` and
/// `iptables <table>/<chain>`; empty when the node left nothing behind.
pub async fn leftovers(net: &Net, o: &Owned) -> Result<Vec<String>> {
    o.validate()?;
    let mut out: Vec<String> = owned_links(net, o)
        .await?
        .into_iter()
        .map(|n| format!("link {n}"))
        .collect();
    if let Some(dir) = &o.netns_dir {
        out.extend(
            netns::list(dir)?
                .into_iter()
                .map(|p| format!("netns {}", p.display())),
        );
    }
    for tag in &o.iptables_tags {
        out.extend(
            nat::chains(net, tag)
                .await?
                .into_iter()
                .map(|c| format!("iptables {c}")),
        );
    }
    Ok(out)
}

/// Removes the node's links, namespace files and iptables chains; returns what it removed
/// (same form as [`leftovers`]). Links go first: a veth whose peer's namespace is
/// being destroyed disappears on its own a moment later, which would make the result racy.
pub async fn remove_all(net: &Net, o: &Owned) -> Result<Vec<String>> {
    o.validate()?;
    let mut out = Vec::new();
    for n in owned_links(net, o).await? {
        if link::delete(net, &n).await? {
            out.push(format!("link {n}"));
        }
    }
    if let Some(dir) = &o.netns_dir {
        for p in netns::list(dir)? {
            netns::remove(&p)?;
            out.push(format!("netns {}", p.display()));
        }
    }
    for tag in &o.iptables_tags {
        for c in nat::chains(net, tag).await? {
            out.push(format!("iptables {c}"));
        }
        nat::teardown(net, tag).await?;
    }
    tracing::info!(removed = out.len(), "network cleanup done");
    Ok(out)
}
