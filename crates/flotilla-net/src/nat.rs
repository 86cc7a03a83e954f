//! Per-node iptables chains, identified by a caller-given tag.
//!
//! * `FLT-<tag>-POST` in `nat`, jumped to first from `POSTROUTING`: traffic leaving by the
//!   bridge or the overlay device, or going to the cluster pool, is left alone; the rest from
//!   the node subnet is masqueraded (when outbound NAT is on).
//! * `FLT-<tag>-FWD` in `filter`, jumped to first from `FORWARD`: accept everything into
//!   and out of the bridge (this covers bridge-to-bridge and overlay traffic).
//!
//! Only these chains and the two jump rules are ever touched; nothing else is flushed.
//! Commands run in the namespace of the given [`Net`].

use std::process::Command;

use ipnet::Ipv4Net;

use crate::link::validate_ifname;
use crate::{Error, Net, Result};

/// What [`ensure`] installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRules {
    /// Chain tag, `[A-Za-z0-9_]`, at most 19 chars (chain names are limited to 28).
    pub tag: String,
    /// The node subnet.
    pub subnet: Ipv4Net,
    /// The node bridge.
    pub bridge: String,
    /// The overlay device, if any.
    pub overlay: Option<String>,
    /// The cluster pool: traffic to it is never masqueraded.
    pub cluster_pool: Option<Ipv4Net>,
    /// Masquerade traffic from the subnet going anywhere else.
    pub outbound_nat: bool,
}

/// Name of the nat chain for `tag`.
pub fn post_chain(tag: &str) -> String {
    format!("FLT-{tag}-POST")
}

/// Name of the filter chain for `tag`.
pub fn fwd_chain(tag: &str) -> String {
    format!("FLT-{tag}-FWD")
}

fn validate_tag(tag: &str) -> Result<()> {
    if tag.is_empty()
        || tag.len() > 19
        || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(Error::Invalid(format!(
            "iptables tag {tag:?} (1-19 chars of [A-Za-z0-9_])"
        )));
    }
    Ok(())
}

impl NatRules {
    /// Rules of the nat chain, in `iptables -S` form.
    fn post_rules(&self) -> Vec<String> {
        let c = post_chain(&self.tag);
        let mut r = vec![format!("-A {c} -o {} -j RETURN", self.bridge)];
        if let Some(o) = &self.overlay {
            r.push(format!("-A {c} -o {o} -j RETURN"));
        }
        if let Some(p) = &self.cluster_pool {
            r.push(format!("-A {c} -d {} -j RETURN", p.trunc()));
        }
        if self.outbound_nat {
            r.push(format!("-A {c} -s {} -j MASQUERADE", self.subnet.trunc()));
        }
        r
    }

    /// Rules of the filter chain, in `iptables -S` form.
    fn fwd_rules(&self) -> Vec<String> {
        let c = fwd_chain(&self.tag);
        vec![
            format!("-A {c} -i {} -j ACCEPT", self.bridge),
            format!("-A {c} -o {} -j ACCEPT", self.bridge),
        ]
    }
}

/// Runs iptables with `args`; returns stdout, or the error with stderr.
fn iptables(args: &[&str]) -> Result<String> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| Error::io("run iptables", e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Iptables {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn chain_exists(table: &str, chain: &str) -> bool {
    iptables(&["-t", table, "-S", chain]).is_ok()
}

/// Makes `chain` in `table` hold exactly `rules` and be jumped to first from `parent`.
fn ensure_chain(table: &str, parent: &str, chain: &str, rules: &[String]) -> Result<()> {
    if !chain_exists(table, chain) {
        iptables(&["-t", table, "-N", chain])?;
    }
    let current: Vec<String> = iptables(&["-t", table, "-S", chain])?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect();
    if current != rules {
        iptables(&["-t", table, "-F", chain])?;
        for r in rules {
            let words: Vec<&str> = r.split_whitespace().collect();
            let mut args = vec!["-t", table];
            args.extend(words);
            iptables(&args)?;
        }
    }
    if iptables(&["-t", table, "-C", parent, "-j", chain]).is_err() {
        iptables(&["-t", table, "-I", parent, "1", "-j", chain])?;
    }
    Ok(())
}

fn remove_chain(table: &str, parent: &str, chain: &str) -> Result<()> {
    // Delete every jump (there should be one; loop in case of duplicates).
    for _ in 0..16 {
        if iptables(&["-t", table, "-D", parent, "-j", chain]).is_err() {
            break;
        }
    }
    if chain_exists(table, chain) {
        iptables(&["-t", table, "-F", chain])?;
        iptables(&["-t", table, "-X", chain])?;
    }
    Ok(())
}

/// Installs (or converges) the node's chains and jump rules. Idempotent.
pub async fn ensure(net: &Net, rules: &NatRules) -> Result<()> {
    validate_tag(&rules.tag)?;
    validate_ifname(&rules.bridge)?;
    if let Some(o) = &rules.overlay {
        validate_ifname(o)?;
    }
    let r = rules.clone();
    net.run(move || -> Result<()> {
        ensure_chain("nat", "POSTROUTING", &post_chain(&r.tag), &r.post_rules())?;
        ensure_chain("filter", "FORWARD", &fwd_chain(&r.tag), &r.fwd_rules())?;
        Ok(())
    })
    .await??;
    tracing::debug!(tag = %rules.tag, "iptables chains ensured");
    Ok(())
}

/// Removes the jump rules and chains of `tag`. Idempotent.
pub async fn teardown(net: &Net, tag: &str) -> Result<()> {
    validate_tag(tag)?;
    let tag = tag.to_string();
    net.run(move || -> Result<()> {
        remove_chain("nat", "POSTROUTING", &post_chain(&tag))?;
        remove_chain("filter", "FORWARD", &fwd_chain(&tag))?;
        Ok(())
    })
    .await?
}

/// The chains of `tag` that exist, as `table/chain`.
pub async fn chains(net: &Net, tag: &str) -> Result<Vec<String>> {
    validate_tag(tag)?;
    let tag = tag.to_string();
    net.run(move || {
        let mut out = Vec::new();
        for (table, chain) in [("nat", post_chain(&tag)), ("filter", fwd_chain(&tag))] {
            if chain_exists(table, &chain) {
                out.push(format!("{table}/{chain}"));
            }
        }
        out
    })
    .await
}

/// The rules of `table` (`iptables -S`) that mention the chains of `tag`, for tests and
/// diagnostics.
pub async fn rules(net: &Net, table: &str, tag: &str) -> Result<Vec<String>> {
    validate_tag(tag)?;
    let needle = format!("FLT-{tag}-");
    let table = table.to_string();
    net.run(move || -> Result<Vec<String>> {
        Ok(iptables(&["-t", &table, "-S"])?
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_text_and_tag_validation() {
        let r = NatRules {
            tag: "n1".into(),
            subnet: "10.200.1.0/24".parse().expect("net"),
            bridge: "fltbr0".into(),
            overlay: Some("fltvx0".into()),
            cluster_pool: Some("10.200.0.0/16".parse().expect("net")),
            outbound_nat: true,
        };
        assert_eq!(
            r.post_rules(),
            vec![
                "-A FLT-n1-POST -o fltbr0 -j RETURN",
                "-A FLT-n1-POST -o fltvx0 -j RETURN",
                "-A FLT-n1-POST -d 10.200.0.0/16 -j RETURN",
                "-A FLT-n1-POST -s 10.200.1.0/24 -j MASQUERADE",
            ]
        );
        assert!(validate_tag("abcdefghij0123456789").is_err());
        assert!(validate_tag("a-b").is_err());
        assert!(validate_tag("").is_err());
        assert!(validate_tag("node_1").is_ok());
    }
}
