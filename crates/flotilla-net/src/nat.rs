//! Per-node iptables chains, identified by a caller-given tag: outbound NAT and the network
//! boundary of the node's task subnet.
//!
//! * `FLT-<tag>-POST` in `nat`, jumped to first from `POSTROUTING`: traffic leaving by the
//!   bridge or the overlay device, or going to the cluster pool, is left alone; the rest from
//!   the node subnet is masqueraded (when outbound NAT is on).
//! * `FLT-<tag>-FWD` in `filter`, jumped to first from `FORWARD`: tasks may open connections
//!   anywhere (from the bridge); peers may reach the cluster pool over the overlay device;
//!   anything else going into the bridge or the cluster pool must belong to a connection a
//!   task opened (conntrack `RELATED,ESTABLISHED`) and is dropped otherwise. So a LAN host
//!   that routes the pool through a node reaches no task port; published ports are served
//!   by the userspace mesh, whose connections to tasks start on the host (`OUTPUT`).
//! * `FLT-<tag>-IN` in `filter`, jumped to first from `INPUT`, guards the host against the
//!   task networks and the underlay:
//!   - UDP to the VXLAN port goes through `FLT-<tag>-NODE`: sources given to [`set_nodes`]
//!     return, everything else is dropped (no frame injection from the underlay);
//!   - the VIP pool is reachable from the node itself (`lo`), the bridge and the trusted
//!     interfaces only;
//!   - the node's DNS responder (which forwards names outside the cluster) only from the
//!     bridge and the node itself;
//!   - from the bridge: replies, ICMP, DNS to the node's responder and the VIP pool; then
//!     `FLT-<tag>-PUB`, which lets the published ports given to [`set_published`] through
//!     and drops the rest (the API, Raft, ssh, … of the node are not reachable from tasks);
//!   - from the overlay device: replies and ICMP only.
//!
//! * `FLT-<tag>-VIP` in `nat`, jumped to from `PREROUTING` for packets coming in by the
//!   bridge (with a VIP pool): the kernel side of the VIPs, set by [`set_vips`]. A new
//!   connection (TCP, UDP, or anything else) to a VIP is destination-NATed to one of its
//!   service's tasks, picked at random (`statistic`), on any port; the ports the userspace
//!   mesh serves on that VIP return first and reach the mesh's listener. Conntrack keeps
//!   every established connection on its task, so a task leaving the list is drained.
//!   `FLT-<tag>-POST` masquerades such a connection when it goes back out of the bridge it
//!   came from (client and task on the same bridge), so that the reply passes the node.
//!
//! * `FLT-<tag>-ISO` in `filter`, jumped to first from `FLT-<tag>-FWD`, and `FLT-<tag>-NETS`
//!   in `nat`, jumped to first from `FLT-<tag>-POST`: the user-defined networks, set by
//!   [`set_networks`]. A task reaches only tasks of a network it is on: a routed packet between
//!   two ranges of the cluster pool passes only when both ends lie in one network's range (or
//!   both in the default network), a bridge accepts only its own block as source, and an
//!   internal network's packets go nowhere outside its range. `NETS` masquerades a local
//!   block's hairpin VIP connections and its traffic out of the cluster (outbound NAT, not for
//!   internal networks).
//!
//! `FLT-<tag>-IN` and its two sub-chains only ever drop: what they let through goes on to the
//! host's own `INPUT` rules. `FLT-<tag>-NODE` and `FLT-<tag>-PUB` are converged entry by
//! entry (no flush), so a change of the node list never opens a window.
//!
//! Only these chains and the four jump rules are ever touched; nothing else is flushed.
//! Commands run in the namespace of the given [`Net`].

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;

use ipnet::Ipv4Net;

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
    /// The cluster pool: traffic to it is never masqueraded, and only tasks, peers over the
    /// overlay and the trusted interfaces may open connections into it.
    pub cluster_pool: Option<Ipv4Net>,
    /// Masquerade traffic from the subnet going anywhere else.
    pub outbound_nat: bool,
    /// Interfaces trusted like the bridge (iptables names; a trailing `+` matches a prefix):
    /// the bridges and overlay devices of other nodes sharing this network namespace (tests,
    /// `dev`), e.g. `fltbr+` and `fltvx+`. Their traffic may open connections into the
    /// subnet and reach the VIP pool.
    pub trusted_ifaces: Vec<String>,
    /// UDP port of the overlay device. With `overlay`, only the addresses given to
    /// [`set_nodes`] may send to it.
    pub vxlan_port: Option<u16>,
    /// The node's DNS responder (UDP and TCP), which tasks may query.
    pub dns: Option<SocketAddrV4>,
    /// The VIP pool (local addresses the mesh listens on): reachable from tasks and the
    /// node, not from the underlay.
    pub vip_pool: Option<Ipv4Net>,
}

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4 {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl L4 {
    fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// Name of the nat chain for `tag`.
pub fn post_chain(tag: &str) -> String {
    format!("FLT-{tag}-POST")
}

/// Name of the forward filter chain for `tag`.
pub fn fwd_chain(tag: &str) -> String {
    format!("FLT-{tag}-FWD")
}

/// Name of the input filter chain for `tag`.
pub fn input_chain(tag: &str) -> String {
    format!("FLT-{tag}-IN")
}

/// Name of the chain holding the VXLAN allow-list for `tag` (see [`set_nodes`]).
pub fn nodes_chain(tag: &str) -> String {
    format!("FLT-{tag}-NODE")
}

/// Name of the chain holding the published ports tasks may reach on the host (see
/// [`set_published`]).
pub fn published_chain(tag: &str) -> String {
    format!("FLT-{tag}-PUB")
}

/// Name of the nat chain holding the VIPs' load balancing for `tag` (see [`set_vips`]).
pub fn vip_chain(tag: &str) -> String {
    format!("FLT-{tag}-VIP")
}

/// Name of the filter chain separating the user-defined networks (see [`set_networks`]).
pub fn iso_chain(tag: &str) -> String {
    format!("FLT-{tag}-ISO")
}

/// Name of the nat chain of the user-defined networks' local blocks (see [`set_networks`]).
pub fn nets_chain(tag: &str) -> String {
    format!("FLT-{tag}-NETS")
}

/// Every chain of `tag`, as (table, chain, parent jumping to it), parents before children
/// (a chain cannot be deleted while a rule jumps to it).
fn all_chains(tag: &str) -> [(&'static str, String, String); 8] {
    [
        ("nat", post_chain(tag), "POSTROUTING".into()),
        ("nat", nets_chain(tag), post_chain(tag)),
        ("nat", vip_chain(tag), "PREROUTING".into()),
        ("filter", fwd_chain(tag), "FORWARD".into()),
        ("filter", iso_chain(tag), fwd_chain(tag)),
        ("filter", input_chain(tag), "INPUT".into()),
        ("filter", nodes_chain(tag), input_chain(tag)),
        ("filter", published_chain(tag), input_chain(tag)),
    ]
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

/// An interface name as iptables takes it (`+` at the end matches a prefix). Stricter than
/// the kernel: rule text is split on whitespace and must not look like an option.
fn validate_iface(name: &str) -> Result<()> {
    let body = name.strip_suffix('+').unwrap_or(name);
    if body.is_empty()
        || name.len() > crate::link::IFNAMSIZ_MAX
        || !body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
        || body.starts_with('-')
    {
        return Err(Error::Invalid(format!(
            "interface {name:?} (1-15 chars of [A-Za-z0-9_.@-], not starting with '-', optional trailing '+')"
        )));
    }
    Ok(())
}

impl NatRules {
    fn validate(&self) -> Result<()> {
        validate_tag(&self.tag)?;
        validate_iface(&self.bridge)?;
        if let Some(o) = &self.overlay {
            validate_iface(o)?;
        }
        for t in &self.trusted_ifaces {
            validate_iface(t)?;
        }
        Ok(())
    }

    /// Rules of the nat chain, in `iptables -S` form.
    fn post_rules(&self) -> Vec<String> {
        let c = post_chain(&self.tag);
        let mut r = vec![format!("-A {c} -j {}", nets_chain(&self.tag))];
        if self.vip_pool.is_some() {
            // A VIP connection DNATed back out of the bridge it came from: without this, the
            // task would answer its client directly over the bridge, from its own address.
            let s = self.subnet.trunc();
            r.push(format!(
                "-A {c} -s {s} -d {s} -o {} -m conntrack --ctstate DNAT -j MASQUERADE",
                self.bridge
            ));
        }
        r.push(format!("-A {c} -o {} -j RETURN", self.bridge));
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

    /// Rules of the forward chain, in `iptables -S` form.
    fn fwd_rules(&self) -> Vec<String> {
        const EST: &str = "-m conntrack --ctstate RELATED,ESTABLISHED";
        let c = fwd_chain(&self.tag);
        let br = &self.bridge;
        let mut r = vec![
            format!("-A {c} -j {}", iso_chain(&self.tag)),
            format!("-A {c} -i {br} -j ACCEPT"),
        ];
        for t in &self.trusted_ifaces {
            r.push(format!("-A {c} -i {t} -j ACCEPT"));
        }
        if let Some(o) = &self.overlay {
            let to = self.cluster_pool.unwrap_or(self.subnet).trunc();
            r.push(format!("-A {c} -d {to} -i {o} -j ACCEPT"));
        }
        r.push(format!("-A {c} -o {br} {EST} -j ACCEPT"));
        r.push(format!("-A {c} -o {br} -j DROP"));
        if let Some(p) = &self.cluster_pool {
            let p = p.trunc();
            r.push(format!("-A {c} -d {p} {EST} -j ACCEPT"));
            r.push(format!("-A {c} -d {p} -j DROP"));
        }
        r
    }

    /// Rules of the input chain, in `iptables -S` form.
    fn input_rules(&self) -> Vec<String> {
        const EST: &str = "-m conntrack --ctstate RELATED,ESTABLISHED";
        let c = input_chain(&self.tag);
        let br = &self.bridge;
        let mut r = Vec::new();
        if let (Some(_), Some(port)) = (&self.overlay, self.vxlan_port) {
            let nodes = nodes_chain(&self.tag);
            r.push(format!("-A {c} -p udp -m udp --dport {port} -j {nodes}"));
        }
        if let Some(v) = &self.vip_pool {
            let v = v.trunc();
            r.push(format!("-A {c} -d {v} -i lo -j RETURN"));
            r.push(format!("-A {c} -d {v} -i {br} -j RETURN"));
            for t in &self.trusted_ifaces {
                r.push(format!("-A {c} -d {v} -i {t} -j RETURN"));
            }
            r.push(format!("-A {c} -d {v} -j DROP"));
        }
        r.push(format!("-A {c} -i {br} {EST} -j RETURN"));
        r.push(format!("-A {c} -i {br} -p icmp -j RETURN"));
        if let Some(d) = self.dns {
            let (ip, port) = (d.ip(), d.port());
            for p in ["udp", "tcp"] {
                r.push(format!(
                    "-A {c} -d {ip}/32 -i {br} -p {p} -m {p} --dport {port} -j RETURN"
                ));
            }
            // The responder forwards names outside the cluster: it must not be a resolver for
            // anyone else (a LAN host routing the task subnet through the node, the overlay).
            for p in ["udp", "tcp"] {
                r.push(format!(
                    "-A {c} -d {ip}/32 -i lo -p {p} -m {p} --dport {port} -j RETURN"
                ));
                r.push(format!(
                    "-A {c} -d {ip}/32 -p {p} -m {p} --dport {port} -j DROP"
                ));
            }
        }
        r.push(format!("-A {c} -i {br} -j {}", published_chain(&self.tag)));
        if let Some(o) = &self.overlay {
            r.push(format!("-A {c} -i {o} {EST} -j RETURN"));
            r.push(format!("-A {c} -i {o} -p icmp -j RETURN"));
            r.push(format!("-A {c} -i {o} -j DROP"));
        }
        r
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

/// Runs `iptables -t table` with the words of `rule` (`iptables -S` form, or its tail).
fn iptables_rule(table: &str, op: &[&str], rule: &str) -> Result<String> {
    let mut args = vec!["-t", table];
    args.extend_from_slice(op);
    args.extend(rule.split_whitespace());
    iptables(&args)
}

fn chain_exists(table: &str, chain: &str) -> bool {
    iptables(&["-t", table, "-S", chain]).is_ok()
}

/// The rules of `chain` in `iptables -S` form (`-A chain …`).
fn chain_rules(table: &str, chain: &str) -> Result<Vec<String>> {
    Ok(iptables(&["-t", table, "-S", chain])?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect())
}

/// Makes `chain` in `table` hold exactly `rules` and be jumped to first from `parent`.
fn ensure_chain(table: &str, parent: &str, chain: &str, rules: &[String]) -> Result<()> {
    if !chain_exists(table, chain) {
        iptables(&["-t", table, "-N", chain])?;
    }
    if chain_rules(table, chain)? != rules {
        iptables(&["-t", table, "-F", chain])?;
        for r in rules {
            iptables_rule(table, &[], r)?;
        }
    }
    if iptables(&["-t", table, "-C", parent, "-j", chain]).is_err() {
        iptables(&["-t", table, "-I", parent, "1", "-j", chain])?;
    }
    Ok(())
}

/// Converges `chain` (in `filter`) to "one `-j RETURN` rule per entry of `want`, then
/// `-j DROP`" entry by entry, without flushing: new entries are inserted at the top before
/// stale ones go, so nothing wanted is ever dropped on the way. `want` holds rule bodies
/// (`-s 10.0.0.1/32`) in `iptables -S` form. Creates the chain if needed.
fn sync_allow_list(chain: &str, want: &BTreeSet<String>) -> Result<()> {
    // A single `iptables -S` when nothing changed (this runs on every network map).
    let current = match chain_rules("filter", chain) {
        Ok(c) => c,
        Err(_) => {
            iptables(&["-t", "filter", "-N", chain])?;
            Vec::new()
        }
    };
    let head = format!("-A {chain} ");
    let drop = format!("-A {chain} -j DROP");
    let mut changed = false;
    let have: BTreeSet<String> = current
        .iter()
        .filter_map(|l| l.strip_prefix(&head)?.strip_suffix(" -j RETURN"))
        .map(str::to_string)
        .collect();
    for body in want.difference(&have) {
        iptables_rule("filter", &["-I", chain, "1"], &format!("{body} -j RETURN"))?;
        changed = true;
    }
    let keep: BTreeSet<String> = want
        .iter()
        .map(|b| format!("{head}{b} -j RETURN"))
        .collect();
    let mut drop_seen = false;
    for l in &current {
        if *l == drop && !drop_seen {
            drop_seen = true;
            continue;
        }
        if !keep.contains(l) {
            // Stale entries and anything foreign (a second DROP included).
            let spec = l.strip_prefix(&head).unwrap_or(l);
            iptables_rule("filter", &["-D", chain], spec)?;
            changed = true;
        }
    }
    // The DROP must close the chain (it does unless it was missing or a stray rule
    // followed it, which was just deleted).
    let closed = !changed && current.last() == Some(&drop);
    if !closed && chain_rules("filter", chain)?.last() != Some(&drop) {
        if drop_seen {
            iptables(&["-t", "filter", "-D", chain, "-j", "DROP"])?;
        }
        iptables(&["-t", "filter", "-A", chain, "-j", "DROP"])?;
    }
    Ok(())
}

/// Makes sure `chain` exists and ends in DROP, keeping its entries (for [`ensure`]: the
/// lists are set by [`set_nodes`] and [`set_published`]).
fn ensure_allow_list(chain: &str) -> Result<()> {
    let head = format!("-A {chain} ");
    let keep: BTreeSet<String> = chain_rules("filter", chain)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.strip_prefix(&head)?.strip_suffix(" -j RETURN"))
        .map(str::to_string)
        .collect();
    sync_allow_list(chain, &keep)
}

/// Removes every jump from `parent` to `chain`, then the chain; a missing parent or chain
/// is fine.
fn remove_chain(table: &str, parent: &str, chain: &str) -> Result<()> {
    // Delete every jump, with whatever matches it carries (`-i <bridge>` for the VIP chain).
    let head = format!("-A {parent} ");
    let tail = format!(" -j {chain}");
    for rule in chain_rules(table, parent).unwrap_or_default() {
        if let Some(spec) = rule.strip_prefix(&head) {
            if rule.ends_with(&tail) {
                iptables_rule(table, &["-D", parent], spec)?;
            }
        }
    }
    if chain_exists(table, chain) {
        iptables(&["-t", table, "-F", chain])?;
        iptables(&["-t", table, "-X", chain])?;
    }
    Ok(())
}

/// Installs (or converges) the node's chains and jump rules. Idempotent. The VXLAN
/// allow-list and the published ports keep their entries (an empty list drops all: call
/// [`set_nodes`] and [`set_published`] next).
pub async fn ensure(net: &Net, rules: &NatRules) -> Result<()> {
    rules.validate()?;
    let r = rules.clone();
    net.run(move || -> Result<()> {
        // The sub-chains first: their parents jump to them ([`set_networks`] fills them).
        ensure_exists("nat", &nets_chain(&r.tag))?;
        ensure_exists("filter", &iso_chain(&r.tag))?;
        ensure_chain("nat", "POSTROUTING", &post_chain(&r.tag), &r.post_rules())?;
        if r.vip_pool.is_some() {
            ensure_vip_jump(&vip_chain(&r.tag), &r.bridge)?;
        }
        ensure_chain("filter", "FORWARD", &fwd_chain(&r.tag), &r.fwd_rules())?;
        // The sub-chains first: the input chain jumps to them.
        ensure_allow_list(&nodes_chain(&r.tag))?;
        ensure_allow_list(&published_chain(&r.tag))?;
        ensure_chain("filter", "INPUT", &input_chain(&r.tag), &r.input_rules())?;
        Ok(())
    })
    .await??;
    tracing::debug!(tag = %rules.tag, "iptables chains ensured");
    Ok(())
}

/// Makes sure `chain` exists in `table` (keeping its rules).
fn ensure_exists(table: &str, chain: &str) -> Result<()> {
    if !chain_exists(table, chain) {
        iptables(&["-t", table, "-N", chain])?;
    }
    Ok(())
}

/// Makes sure the VIP chain exists (keeping its rules: [`set_vips`] sets them) and that
/// `PREROUTING` jumps to it, first, for packets coming in by `bridge`.
fn ensure_vip_jump(chain: &str, bridge: &str) -> Result<()> {
    if !chain_exists("nat", chain) {
        iptables(&["-t", "nat", "-N", chain])?;
    }
    let jump = ["-i", bridge, "-j", chain];
    let mut check = vec!["-t", "nat", "-C", "PREROUTING"];
    check.extend_from_slice(&jump);
    if iptables(&check).is_err() {
        let mut insert = vec!["-t", "nat", "-I", "PREROUTING", "1"];
        insert.extend_from_slice(&jump);
        iptables(&insert)?;
    }
    Ok(())
}

/// One VIP's load balancing in the kernel (see [`set_vips`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipBalance {
    /// The service's VIP.
    pub vip: Ipv4Addr,
    /// Ports of the VIP the userspace mesh serves (they are left to it).
    pub mesh_ports: Vec<(L4, u16)>,
    /// The service's tasks that may take new connections (running, healthy, wanted).
    pub backends: Vec<Ipv4Addr>,
    /// Only connections from this range (a user-defined network, with the tasks' addresses
    /// on it as `backends`); `None`: from anywhere.
    pub source: Option<Ipv4Net>,
}

/// The rules of the VIP chain for `vips`, in `iptables -S` form. A VIP without backends has
/// no rule: its connections reach the node, where nothing listens on the VIP but the mesh's
/// ports, and are refused at once (TCP reset, ICMP port unreachable).
fn vip_rules(tag: &str, vips: &[VipBalance]) -> Vec<String> {
    let c = vip_chain(tag);
    let mut r = Vec::new();
    for v in vips {
        if v.backends.is_empty() {
            continue;
        }
        let d = match v.source {
            Some(s) => format!("-s {} -d {}/32", s.trunc(), v.vip),
            None => format!("-d {}/32", v.vip),
        };
        let mut mesh = v.mesh_ports.clone();
        mesh.sort();
        mesh.dedup();
        for (p, port) in mesh {
            let p = p.name();
            r.push(format!("-A {c} {d} -p {p} -m {p} --dport {port} -j RETURN"));
        }
        let n = v.backends.len();
        for (i, b) in v.backends.iter().enumerate() {
            // Rule i takes 1/(n-i) of what the rules before it left: each task gets 1/n.
            if i + 1 < n {
                let p = 1.0 / (n - i) as f64;
                r.push(format!(
                    "-A {c} {d} -m statistic --mode random --probability {p:.11} -j DNAT --to-destination {b}"
                ));
            } else {
                r.push(format!("-A {c} {d} -j DNAT --to-destination {b}"));
            }
        }
    }
    r
}

/// Sets the VIPs' load balancing: every new connection from a task to a VIP, on any port and
/// protocol, goes to one of the VIP's backends (destination NAT, chosen at random), except on
/// the ports the mesh serves. The chain is replaced in one `iptables-restore` transaction, so
/// no packet sees half a list; established connections keep their task (conntrack). Call
/// after [`ensure`] (with a VIP pool) whenever the services or their tasks change.
pub async fn set_vips(net: &Net, tag: &str, vips: &[VipBalance]) -> Result<()> {
    validate_tag(tag)?;
    let chain = vip_chain(tag);
    let mut text = format!("*nat\n:{chain} - [0:0]\n");
    for r in vip_rules(tag, vips) {
        text.push_str(&r);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    let count = vips.len();
    net.run(move || restore(&text)).await??;
    tracing::debug!(tag, vips = count, "vip load balancing set");
    Ok(())
}

/// A user-defined network as [`set_networks`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRange {
    /// The network's whole range (inside the cluster pool).
    pub range: Ipv4Net,
    /// Nothing leaves the range.
    pub internal: bool,
    /// The block of the range holding the services' VIPs: a packet still addressed to it
    /// after the VIP chain (a VIP without tasks) is rejected.
    pub vips: Option<Ipv4Net>,
}

/// A user-defined network's block on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBlock {
    /// The bridge holding the block's gateway.
    pub bridge: String,
    /// The node's block of the network.
    pub block: Ipv4Net,
    /// Masquerade what leaves the cluster pool from the block.
    pub outbound_nat: bool,
}

/// What [`set_networks`] installs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Networks {
    /// The cluster pool (the default network's subnets and every network's range).
    pub pool: Option<Ipv4Net>,
    /// The node's default bridge and subnet (its tasks' only source addresses).
    pub default_bridge: Option<(String, Ipv4Net)>,
    /// Every user-defined network.
    pub networks: Vec<NetRange>,
    /// This node's blocks of them.
    pub local: Vec<LocalBlock>,
    /// The nodes' overlay addresses (each VXLAN device's, the network address of its node's
    /// subnet): the source of the mesh's connections to other nodes' tasks, let into every
    /// network. Tasks cannot use them (the default bridge drops its own node's as a source).
    pub vteps: Vec<Ipv4Addr>,
    /// The encrypted tunnel's device and, per encrypted network, its range and this node's
    /// gateway on it: the node's own connections into the range through the tunnel (the mesh)
    /// leave from that gateway, an address of this node's block the peers accept.
    pub tunnel: Option<(String, Vec<(Ipv4Net, Ipv4Addr)>)>,
}

impl Networks {
    fn validate(&self) -> Result<()> {
        if let Some((b, _)) = &self.default_bridge {
            validate_iface(b)?;
        }
        for l in &self.local {
            validate_iface(&l.bridge)?;
        }
        if let Some((t, _)) = &self.tunnel {
            validate_iface(t)?;
        }
        Ok(())
    }

    /// Rules of the filter chain `FLT-<tag>-ISO`, in `iptables -S` form.
    fn iso_rules(&self, tag: &str) -> Vec<String> {
        let c = iso_chain(tag);
        let mut r = Vec::new();
        // No spoofing: a bridge's packets come from its own block (and not from the node's
        // overlay address, the network address of its subnet).
        if let Some((b, s)) = &self.default_bridge {
            r.push(format!("-A {c} -i {b} -s {}/32 -j DROP", s.network()));
            r.push(format!("-A {c} -i {b} ! -s {} -j DROP", s.trunc()));
        }
        for l in &self.local {
            r.push(format!(
                "-A {c} -i {} ! -s {} -j DROP",
                l.bridge,
                l.block.trunc()
            ));
        }
        if self.networks.is_empty() {
            return r;
        }
        // Replies of what a task opened (outside, or the mesh's ports).
        r.push(format!(
            "-A {c} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
        ));
        for n in &self.networks {
            if let Some(v) = n.vips {
                r.push(format!(
                    "-A {c} -d {} -j REJECT --reject-with icmp-port-unreachable",
                    v.trunc()
                ));
            }
        }
        // The nodes themselves (the mesh's connections to other nodes' tasks).
        let mut vteps = self.vteps.clone();
        vteps.sort();
        vteps.dedup();
        for v in vteps {
            r.push(format!("-A {c} -s {v}/32 -j RETURN"));
        }
        for n in &self.networks {
            let x = n.range.trunc();
            r.push(format!("-A {c} -s {x} -d {x} -j RETURN"));
        }
        for n in &self.networks {
            r.push(format!("-A {c} -d {} -j DROP", n.range.trunc()));
        }
        for n in &self.networks {
            let x = n.range.trunc();
            if n.internal {
                r.push(format!("-A {c} -s {x} -j DROP"));
            } else if let Some(p) = &self.pool {
                r.push(format!("-A {c} -s {x} -d {} -j DROP", p.trunc()));
            }
        }
        r
    }

    /// Rules of the nat chain `FLT-<tag>-NETS`, in `iptables -S` form.
    fn nets_rules(&self, tag: &str) -> Vec<String> {
        let c = nets_chain(tag);
        let mut r = Vec::new();
        for l in &self.local {
            let b = l.block.trunc();
            r.push(format!(
                "-A {c} -s {b} -d {b} -o {} -m conntrack --ctstate DNAT -j MASQUERADE",
                l.bridge
            ));
        }
        if let Some((t, nets)) = &self.tunnel {
            for (range, gw) in nets {
                let x = range.trunc();
                r.push(format!(
                    "-A {c} -d {x} ! -s {x} -o {t} -j SNAT --to-source {gw}"
                ));
            }
        }
        if let Some(p) = &self.pool {
            for l in self.local.iter().filter(|l| l.outbound_nat) {
                r.push(format!(
                    "-A {c} -s {} ! -d {} -j MASQUERADE",
                    l.block.trunc(),
                    p.trunc()
                ));
            }
        }
        r
    }
}

/// Sets the user-defined networks' separation and this node's blocks (see the module doc):
/// both chains are replaced in one `iptables-restore` transaction. Call after [`ensure`]
/// whenever the networks or this node's blocks change.
pub async fn set_networks(net: &Net, tag: &str, n: &Networks) -> Result<()> {
    validate_tag(tag)?;
    n.validate()?;
    let mut text = format!("*filter\n:{} - [0:0]\n", iso_chain(tag));
    for r in n.iso_rules(tag) {
        text.push_str(&r);
        text.push('\n');
    }
    text.push_str(&format!("COMMIT\n*nat\n:{} - [0:0]\n", nets_chain(tag)));
    for r in n.nets_rules(tag) {
        text.push_str(&r);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    net.run(move || restore(&text)).await??;
    tracing::debug!(
        tag,
        networks = n.networks.len(),
        local = n.local.len(),
        "user-defined networks set"
    );
    Ok(())
}

/// Runs `iptables-restore --noflush` on `text`: only the chains it declares are flushed and
/// refilled, in one transaction.
fn restore(text: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("run iptables-restore", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| Error::io("write to iptables-restore", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("run iptables-restore", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Iptables {
            args: "-restore --noflush".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Sets the underlay addresses that may send to the VXLAN port (the cluster's nodes; this
/// node's own address may be included) and drops the rest. Converges entry by entry, no
/// flush; a no-op when nothing changed. Call after [`ensure`] and on every change of the
/// node list.
pub async fn set_nodes(net: &Net, tag: &str, nodes: &[Ipv4Addr]) -> Result<()> {
    validate_tag(tag)?;
    let chain = nodes_chain(tag);
    let want: BTreeSet<String> = nodes.iter().map(|a| format!("-s {a}/32")).collect();
    let count = want.len();
    net.run(move || sync_allow_list(&chain, &want)).await??;
    tracing::debug!(tag, nodes = count, "vxlan allow-list set");
    Ok(())
}

/// Sets the published ports tasks may reach on the host (any host address: the mesh
/// listens on them); every other host port stays closed to tasks. Converges entry by entry,
/// no flush. Call after [`ensure`] and whenever the published ports change.
pub async fn set_published(net: &Net, tag: &str, ports: &[(L4, u16)]) -> Result<()> {
    validate_tag(tag)?;
    let chain = published_chain(tag);
    let want: BTreeSet<String> = ports
        .iter()
        .map(|(p, port)| {
            let p = p.name();
            format!("-p {p} -m {p} --dport {port}")
        })
        .collect();
    net.run(move || sync_allow_list(&chain, &want)).await??;
    Ok(())
}

/// Removes the jump rules and chains of `tag`. Idempotent.
pub async fn teardown(net: &Net, tag: &str) -> Result<()> {
    validate_tag(tag)?;
    let tag = tag.to_string();
    net.run(move || -> Result<()> {
        for (table, chain, parent) in all_chains(&tag) {
            remove_chain(table, &parent, &chain)?;
        }
        Ok(())
    })
    .await?
}

/// The chains of `tag` that exist, as `table/chain`.
pub async fn chains(net: &Net, tag: &str) -> Result<Vec<String>> {
    validate_tag(tag)?;
    let tag = tag.to_string();
    net.run(move || {
        all_chains(&tag)
            .into_iter()
            .filter(|(table, chain, _)| chain_exists(table, chain))
            .map(|(table, chain, _)| format!("{table}/{chain}"))
            .collect()
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

/// Packets matched so far by each rule of `chain` in `table`, as (`iptables -S` rule,
/// packets), for tests and diagnostics (e.g. how many VXLAN packets were dropped).
pub async fn counters(net: &Net, table: &str, chain: &str) -> Result<Vec<(String, u64)>> {
    let (table, chain) = (table.to_string(), chain.to_string());
    net.run(move || -> Result<Vec<(String, u64)>> {
        // `-S -v` prints `-A chain <match> -c <packets> <bytes> -j <target>`.
        let text = iptables(&["-t", &table, "-S", &chain, "-v"])?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let mut rule = Vec::new();
                let mut packets = 0;
                let mut i = 0;
                while i < words.len() {
                    if words[i] == "-c" && i + 2 < words.len() {
                        packets = words[i + 1].parse().unwrap_or(0);
                        i += 3;
                    } else {
                        rule.push(words[i]);
                        i += 1;
                    }
                }
                (rule.join(" "), packets)
            })
            .collect())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NatRules {
        NatRules {
            tag: "n1".into(),
            subnet: "10.200.1.0/24".parse().expect("net"),
            bridge: "fltbr0".into(),
            overlay: Some("fltvx0".into()),
            cluster_pool: Some("10.200.0.0/16".parse().expect("net")),
            outbound_nat: true,
            trusted_ifaces: vec!["fltbr+".into()],
            vxlan_port: Some(4789),
            dns: Some("10.200.1.1:53".parse().expect("addr")),
            vip_pool: Some("10.199.0.0/16".parse().expect("net")),
        }
    }

    #[test]
    fn rule_text_and_tag_validation() {
        let r = sample();
        assert_eq!(
            r.post_rules(),
            vec![
                "-A FLT-n1-POST -j FLT-n1-NETS",
                "-A FLT-n1-POST -s 10.200.1.0/24 -d 10.200.1.0/24 -o fltbr0 -m conntrack --ctstate DNAT -j MASQUERADE",
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
        // the longest tag still gives valid chain names (28 chars at most)
        for (_, c, _) in all_chains("abcdefghij012345678") {
            assert!(c.len() <= 28, "{c}");
        }
    }

    #[test]
    fn vip_rules_split_new_connections_evenly_and_leave_the_mesh_ports() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        let vips = [
            VipBalance {
                vip: ip("10.199.0.2"),
                mesh_ports: vec![(L4::Udp, 53), (L4::Tcp, 80), (L4::Tcp, 80)],
                backends: vec![ip("10.200.1.3"), ip("10.200.2.3"), ip("10.200.1.4")],
                source: None,
            },
            VipBalance {
                vip: ip("10.199.0.3"),
                mesh_ports: vec![(L4::Tcp, 5432)],
                backends: vec![],
                source: None,
            },
            VipBalance {
                vip: ip("10.199.0.4"),
                mesh_ports: vec![],
                backends: vec![ip("10.200.2.9")],
                source: None,
            },
        ];
        assert_eq!(
            vip_rules("n1", &vips),
            vec![
                "-A FLT-n1-VIP -d 10.199.0.2/32 -p tcp -m tcp --dport 80 -j RETURN",
                "-A FLT-n1-VIP -d 10.199.0.2/32 -p udp -m udp --dport 53 -j RETURN",
                "-A FLT-n1-VIP -d 10.199.0.2/32 -m statistic --mode random --probability 0.33333333333 -j DNAT --to-destination 10.200.1.3",
                "-A FLT-n1-VIP -d 10.199.0.2/32 -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination 10.200.2.3",
                "-A FLT-n1-VIP -d 10.199.0.2/32 -j DNAT --to-destination 10.200.1.4",
                // no backends: no rule (the connection is refused on the node)
                "-A FLT-n1-VIP -d 10.199.0.4/32 -j DNAT --to-destination 10.200.2.9",
            ]
        );
        // no pool, no hairpin rule
        let r = NatRules {
            vip_pool: None,
            ..sample()
        };
        assert_eq!(r.post_rules()[1], "-A FLT-n1-POST -o fltbr0 -j RETURN");
    }

    #[test]
    fn networks_are_separated_and_their_blocks_masqueraded() {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("net");
        let n = Networks {
            pool: Some(net("10.200.0.0/16")),
            default_bridge: Some(("fltbrab".into(), net("10.200.1.0/24"))),
            networks: vec![
                NetRange {
                    range: net("10.200.240.0/20"),
                    internal: false,
                    vips: Some(net("10.200.255.0/24")),
                },
                NetRange {
                    range: net("10.200.224.0/20"),
                    internal: true,
                    vips: None,
                },
            ],
            local: vec![
                LocalBlock {
                    bridge: "fltbrab1".into(),
                    block: net("10.200.240.0/24"),
                    outbound_nat: true,
                },
                LocalBlock {
                    bridge: "fltbrab2".into(),
                    block: net("10.200.224.0/24"),
                    outbound_nat: false,
                },
            ],
            vteps: vec![
                "10.200.2.0".parse().expect("ip"),
                "10.200.1.0".parse().expect("ip"),
            ],
            tunnel: Some((
                "fltvxabe".into(),
                vec![(net("10.200.240.0/20"), "10.200.240.1".parse().expect("ip"))],
            )),
        };
        assert_eq!(
            n.iso_rules("n1"),
            vec![
                "-A FLT-n1-ISO -i fltbrab -s 10.200.1.0/32 -j DROP",
                "-A FLT-n1-ISO -i fltbrab ! -s 10.200.1.0/24 -j DROP",
                "-A FLT-n1-ISO -i fltbrab1 ! -s 10.200.240.0/24 -j DROP",
                "-A FLT-n1-ISO -i fltbrab2 ! -s 10.200.224.0/24 -j DROP",
                "-A FLT-n1-ISO -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                "-A FLT-n1-ISO -d 10.200.255.0/24 -j REJECT --reject-with icmp-port-unreachable",
                "-A FLT-n1-ISO -s 10.200.1.0/32 -j RETURN",
                "-A FLT-n1-ISO -s 10.200.2.0/32 -j RETURN",
                "-A FLT-n1-ISO -s 10.200.240.0/20 -d 10.200.240.0/20 -j RETURN",
                "-A FLT-n1-ISO -s 10.200.224.0/20 -d 10.200.224.0/20 -j RETURN",
                "-A FLT-n1-ISO -d 10.200.240.0/20 -j DROP",
                "-A FLT-n1-ISO -d 10.200.224.0/20 -j DROP",
                "-A FLT-n1-ISO -s 10.200.240.0/20 -d 10.200.0.0/16 -j DROP",
                "-A FLT-n1-ISO -s 10.200.224.0/20 -j DROP",
            ]
        );
        assert_eq!(
            n.nets_rules("n1"),
            vec![
                "-A FLT-n1-NETS -s 10.200.240.0/24 -d 10.200.240.0/24 -o fltbrab1 -m conntrack --ctstate DNAT -j MASQUERADE",
                "-A FLT-n1-NETS -s 10.200.224.0/24 -d 10.200.224.0/24 -o fltbrab2 -m conntrack --ctstate DNAT -j MASQUERADE",
                "-A FLT-n1-NETS -d 10.200.240.0/20 ! -s 10.200.240.0/20 -o fltvxabe -j SNAT --to-source 10.200.240.1",
                "-A FLT-n1-NETS -s 10.200.240.0/24 ! -d 10.200.0.0/16 -j MASQUERADE",
            ]
        );
        // No networks: only the default bridge's source check.
        let none = Networks {
            networks: vec![],
            local: vec![],
            tunnel: None,
            ..n.clone()
        };
        assert_eq!(
            none.iso_rules("n1"),
            vec![
                "-A FLT-n1-ISO -i fltbrab -s 10.200.1.0/32 -j DROP",
                "-A FLT-n1-ISO -i fltbrab ! -s 10.200.1.0/24 -j DROP"
            ]
        );
        assert!(none.nets_rules("n1").is_empty());
        // Hostile interface names never reach iptables.
        let bad = Networks {
            local: vec![LocalBlock {
                bridge: "-j ACCEPT".into(),
                block: net("10.200.240.0/24"),
                outbound_nat: true,
            }],
            ..n
        };
        assert!(bad.validate().is_err());
        // A VIP balanced for one network's sources only.
        let v = VipBalance {
            vip: "10.199.0.5".parse().expect("ip"),
            mesh_ports: vec![],
            backends: vec!["10.200.240.7".parse().expect("ip")],
            source: Some(net("10.200.240.0/20")),
        };
        assert_eq!(
            vip_rules("n1", &[v]),
            vec!["-A FLT-n1-VIP -s 10.200.240.0/20 -d 10.199.0.5/32 -j DNAT --to-destination 10.200.240.7"]
        );
    }

    #[test]
    fn forward_rules_drop_new_connections_from_outside() {
        assert_eq!(
            sample().fwd_rules(),
            vec![
                "-A FLT-n1-FWD -j FLT-n1-ISO",
                "-A FLT-n1-FWD -i fltbr0 -j ACCEPT",
                "-A FLT-n1-FWD -i fltbr+ -j ACCEPT",
                "-A FLT-n1-FWD -d 10.200.0.0/16 -i fltvx0 -j ACCEPT",
                "-A FLT-n1-FWD -o fltbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A FLT-n1-FWD -o fltbr0 -j DROP",
                "-A FLT-n1-FWD -d 10.200.0.0/16 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A FLT-n1-FWD -d 10.200.0.0/16 -j DROP",
            ]
        );
    }

    #[test]
    fn input_rules_guard_the_host() {
        assert_eq!(
            sample().input_rules(),
            vec![
                "-A FLT-n1-IN -p udp -m udp --dport 4789 -j FLT-n1-NODE",
                "-A FLT-n1-IN -d 10.199.0.0/16 -i lo -j RETURN",
                "-A FLT-n1-IN -d 10.199.0.0/16 -i fltbr0 -j RETURN",
                "-A FLT-n1-IN -d 10.199.0.0/16 -i fltbr+ -j RETURN",
                "-A FLT-n1-IN -d 10.199.0.0/16 -j DROP",
                "-A FLT-n1-IN -i fltbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                "-A FLT-n1-IN -i fltbr0 -p icmp -j RETURN",
                "-A FLT-n1-IN -d 10.200.1.1/32 -i fltbr0 -p udp -m udp --dport 53 -j RETURN",
                "-A FLT-n1-IN -d 10.200.1.1/32 -i fltbr0 -p tcp -m tcp --dport 53 -j RETURN",
                "-A FLT-n1-IN -d 10.200.1.1/32 -i lo -p udp -m udp --dport 53 -j RETURN",
                "-A FLT-n1-IN -d 10.200.1.1/32 -p udp -m udp --dport 53 -j DROP",
                "-A FLT-n1-IN -d 10.200.1.1/32 -i lo -p tcp -m tcp --dport 53 -j RETURN",
                "-A FLT-n1-IN -d 10.200.1.1/32 -p tcp -m tcp --dport 53 -j DROP",
                "-A FLT-n1-IN -i fltbr0 -j FLT-n1-PUB",
                "-A FLT-n1-IN -i fltvx0 -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                "-A FLT-n1-IN -i fltvx0 -p icmp -j RETURN",
                "-A FLT-n1-IN -i fltvx0 -j DROP",
            ]
        );
        // no overlay: no VXLAN filter, no overlay rules
        let r = NatRules {
            overlay: None,
            vip_pool: None,
            dns: None,
            ..sample()
        };
        assert_eq!(
            r.input_rules(),
            vec![
                "-A FLT-n1-IN -i fltbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                "-A FLT-n1-IN -i fltbr0 -p icmp -j RETURN",
                "-A FLT-n1-IN -i fltbr0 -j FLT-n1-PUB",
            ]
        );
    }

    #[test]
    fn interface_names_cannot_inject_options() {
        for bad in [
            "",
            "+",
            "-j",
            "a b",
            "br0 -j ACCEPT",
            "!br0",
            "abcdefghijklmnop",
        ] {
            assert!(validate_iface(bad).is_err(), "{bad:?}");
        }
        for good in ["fltbr0", "fltbr+", "eth0.100", "veth@x"] {
            assert!(validate_iface(good).is_ok(), "{good:?}");
        }
        let r = NatRules {
            trusted_ifaces: vec!["x -j ACCEPT".into()],
            ..sample()
        };
        assert!(r.validate().is_err());
    }
}
