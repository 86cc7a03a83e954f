//! User-defined networks as cluster objects: `flotilla network create|ls|inspect|rm`
//! (`/v1/networks`), and the check of a service's `--network` attachments on `service
//! create|update`.
//!
//! A network is keyed by its name and owns an IPv4 range inside the cluster's address pool
//! (`--subnet`, else the highest free /20 of the pool), apart from every other network's range
//! and every node's default subnet. Its per-node blocks are filled in later by the leader's
//! allocator; create writes none. Create, remove and the service checks run under the
//! manager's `names` lock, so a network cannot be removed between a service's check and its
//! write, and two creates never pick the same range.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ipnet::{IpNet, Ipv4Net};

use flotilla_store::{Batch, Op, Table};
use flotilla_types::{
    now_ms, Meta, Network, NetworkAttachment, NetworkCreate, Node, Service, ServiceSpec, Task,
};

use super::{json_ok, Caller, Ctx};
use crate::error::ManagerError;
use crate::manager::{encode, Manager, Stored};

impl Stored for Network {
    const TABLE: Table = Table::Networks;
    const KIND: &'static str = "network";
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

/// Names `network create` refuses: the cluster's own network and Docker's predefined ones.
pub const RESERVED_NAMES: &[&str] = &["default", "ingress", "host", "bridge", "none"];
/// The only driver.
pub const DRIVER: &str = "overlay";
/// Networks one service may join.
pub const MAX_NETWORKS_PER_SERVICE: usize = 8;
/// Aliases of one attachment.
pub const MAX_ALIASES: usize = 16;
/// The longest prefix `--subnet` takes (a /26: 64 addresses).
pub const MAX_SUBNET_PREFIX: u8 = 26;
/// The size of a range picked without `--subnet` (or two bits under the pool's, if longer).
pub const AUTO_PREFIX: u8 = 20;

/// At most 64 characters of a user's string, for messages.
fn clip(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(64).collect::<String>())
    }
}

/// [`flotilla_types::validate_name`], its message without the (possibly long) name again.
fn check_name(name: &str) -> Result<(), String> {
    use flotilla_types::IdError;
    flotilla_types::validate_name(name).map_err(|e| match e {
        IdError::Empty => "give a name".to_string(),
        IdError::TooLong(_) => "too long: at most 63 characters".to_string(),
        IdError::BadChar(_) => {
            "use letters, digits, '-', '_' or '.', starting with a letter or digit".to_string()
        }
    })
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A network's name: an object name, not one of [`RESERVED_NAMES`].
pub fn validate_network_name(name: &str) -> Result<(), String> {
    check_name(name).map_err(|e| format!("network name {:?}: {e}", clip(name)))?;
    if RESERVED_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "network name {name:?} is reserved ({}): pick another",
            RESERVED_NAMES.join(", ")
        ));
    }
    Ok(())
}

/// Checks `--subnet` against the pool and the ranges already taken (what holds each, its
/// range): IPv4, a network address, inside `pool`, prefix in `[pool prefix + 1, 26]`, and
/// overlapping nothing taken.
pub fn check_subnet(
    subnet: &str,
    pool: Ipv4Net,
    taken: &[(String, Ipv4Net)],
) -> Result<Ipv4Net, String> {
    let net = match subnet.trim().parse::<IpNet>() {
        Ok(IpNet::V4(n)) => n,
        Ok(IpNet::V6(_)) => {
            return Err(format!(
                "--subnet {}: networks are IPv4 only: give a range inside {pool}",
                clip(subnet)
            ))
        }
        Err(_) => {
            return Err(format!(
                "--subnet {:?} is not a CIDR range such as {}",
                clip(subnet),
                pick_subnet(pool, &[]).unwrap_or(pool)
            ))
        }
    };
    if net.trunc() != net {
        return Err(format!(
            "--subnet {net} has host bits set: use {}",
            net.trunc()
        ));
    }
    if !pool.contains(&net) {
        return Err(format!(
            "--subnet {net} is outside the cluster's address pool {pool}: give a range inside it"
        ));
    }
    let min = pool.prefix_len() + 1;
    if net.prefix_len() < min || net.prefix_len() > MAX_SUBNET_PREFIX {
        return Err(format!(
            "--subnet {net}: the prefix must be between /{min} and /{MAX_SUBNET_PREFIX} \
             (the address pool is {pool} and keeps room for the default network)"
        ));
    }
    if let Some((what, other)) = taken.iter().find(|(_, t)| overlaps(&net, t)) {
        return Err(format!(
            "--subnet {net} overlaps {what} ({other}): pick a range apart from it, or leave \
             --subnet out to get a free one"
        ));
    }
    Ok(net)
}

/// The prefix of a range picked without `--subnet`: a /20, or two bits under the pool's.
pub fn auto_prefix(pool: Ipv4Net) -> u8 {
    AUTO_PREFIX.max(pool.prefix_len().saturating_add(2))
}

/// The highest range of [`auto_prefix`] bits in `pool` that overlaps nothing in `taken`
/// (default subnets are handed out from the bottom of the pool, so networks grow down from
/// the top); `None` when none is free or the pool is too small.
pub fn pick_subnet(pool: Ipv4Net, taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    let prefix = auto_prefix(pool);
    if prefix > MAX_SUBNET_PREFIX {
        return None;
    }
    let base = u32::from(pool.network());
    let count: u64 = 1u64 << (prefix - pool.prefix_len());
    let step: u64 = 1u64 << (32 - prefix);
    (0..count).rev().find_map(|i| {
        let addr = u32::try_from(u64::from(base) + i * step).ok()?;
        let net = Ipv4Net::new(addr.into(), prefix).ok()?;
        (!taken.iter().any(|t| overlaps(&net, t))).then_some(net)
    })
}

/// Whether `s` is a DNS label as aliases must be: lowercase letters, digits and `-`, 1 to 63
/// characters, no `-` at either end.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The attachments of a service, without the store: at most
/// [`MAX_NETWORKS_PER_SERVICE`], each network once and a valid, unreserved name, each with at
/// most [`MAX_ALIASES`] distinct DNS-label aliases.
pub fn validate_attachments(atts: &[NetworkAttachment]) -> Result<(), String> {
    if atts.len() > MAX_NETWORKS_PER_SERVICE {
        return Err(format!(
            "a service joins at most {MAX_NETWORKS_PER_SERVICE} networks ({} given)",
            atts.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for a in atts {
        let t = a.target.as_str();
        if t.is_empty() {
            return Err("--network: give a network name".into());
        }
        if RESERVED_NAMES.contains(&t.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "network {t:?} is reserved: leave --network out to use the cluster's default \
                 network"
            ));
        }
        check_name(t).map_err(|e| format!("network {:?}: {e}", clip(t)))?;
        if !seen.insert(t) {
            return Err(format!(
                "network {t} is given twice: give each network once, with all its aliases"
            ));
        }
        if a.aliases.len() > MAX_ALIASES {
            return Err(format!(
                "network {t}: at most {MAX_ALIASES} aliases ({} given)",
                a.aliases.len()
            ));
        }
        let mut names = BTreeSet::new();
        for alias in &a.aliases {
            if !is_dns_label(alias) {
                return Err(format!(
                    "network {t}: alias {:?} is not a DNS label: use lowercase letters, digits \
                     and '-' (at most 63, no '-' at either end)",
                    clip(alias)
                ));
            }
            if !names.insert(alias.as_str()) {
                return Err(format!("network {t}: alias {alias} is given twice"));
            }
        }
    }
    Ok(())
}

/// Checks a service's `task_template.networks` on create and update: valid
/// ([`validate_attachments`]) and every network exists. Reads the store: call it from
/// blocking code, under the `names` lock.
pub fn check_attachments(mgr: &Manager, spec: &ServiceSpec) -> Result<(), ManagerError> {
    let atts = &spec.task_template.networks;
    validate_attachments(atts).map_err(ManagerError::bad_request)?;
    for a in atts {
        if mgr.get::<Network>(&a.target)?.is_none() {
            return Err(ManagerError::bad_request(format!(
                "network {t} not found: create it with `flotilla network create {t}`",
                t = a.target
            )));
        }
    }
    Ok(())
}

fn admin_only(caller: &Caller) -> Result<(), ManagerError> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ManagerError::forbidden("networks are for admins"))
    }
}

/// Network name → names of the services whose current spec attaches to it, sorted.
fn users(services: &[Service]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in services {
        for a in &s.spec.task_template.networks {
            out.entry(a.target.clone())
                .or_default()
                .push(s.spec.name.clone());
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

/// Finds a network by name, id or unique id prefix.
fn find(mgr: &Manager, key: &str) -> Result<Network, ManagerError> {
    if let Some(n) = mgr.get::<Network>(key)? {
        return Ok(n);
    }
    let all: Vec<Network> = mgr.list()?;
    if let Some(n) = all.iter().find(|n| n.id == key) {
        return Ok(n.clone());
    }
    let by_prefix: Vec<&Network> = if key.is_empty() {
        Vec::new()
    } else {
        all.iter().filter(|n| n.id.starts_with(key)).collect()
    };
    match by_prefix.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ManagerError::not_found(format!(
            "network {} not found: see `flotilla network ls`",
            clip(key)
        ))),
        _ => Err(ManagerError::conflict(format!(
            "network id prefix {:?} is ambiguous: give more characters",
            clip(key)
        ))),
    }
}

/// Every range a new network must stay apart from: the networks' and the nodes' subnets.
fn taken(networks: &[Network], nodes: &[Node]) -> Vec<(String, Ipv4Net)> {
    let nets = networks.iter().filter_map(|n| {
        let r = n.subnet.parse::<Ipv4Net>().ok()?;
        Some((format!("network {}", n.name), r))
    });
    let subnets = nodes.iter().filter_map(|n| {
        let r = n.network.as_ref()?.subnet.parse::<Ipv4Net>().ok()?;
        Some((format!("the subnet of node {}", n.id), r))
    });
    nets.chain(subnets).collect()
}

/// The network as it would be created, after checking the request on its own.
fn new_network(req: NetworkCreate) -> Result<Network, ManagerError> {
    validate_network_name(&req.name).map_err(ManagerError::bad_request)?;
    if let Some(d) = req.driver.as_deref().filter(|d| *d != DRIVER) {
        return Err(ManagerError::bad_request(format!(
            "driver {:?} is not supported: networks use the `{DRIVER}` driver (the only one)",
            clip(d)
        )));
    }
    if let Some(k) = req.labels.keys().find(|k| k.is_empty()) {
        return Err(ManagerError::bad_request(format!(
            "label {k:?}: a label needs a key (KEY=VALUE)"
        )));
    }
    let now = now_ms();
    Ok(Network {
        name: req.name,
        meta: Meta {
            version: 0,
            created_at: now,
            updated_at: now,
        },
        id: flotilla_types::new_id(),
        labels: req.labels,
        driver: DRIVER.into(),
        subnet: req.subnet.unwrap_or_default(),
        internal: req.internal,
        attachable: req.attachable,
        encrypted: req.encrypted,
        blocks: BTreeMap::new(),
        used_by: Vec::new(),
    })
}

/// `POST /v1/networks` (`flotilla network create`): 201 with the network; 400 for a bad
/// name, driver or range, 409 when the name exists or no range is free.
pub async fn create(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<NetworkCreate>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let given = req.subnet.is_some();
    let mut net = new_network(req)?;
    let _names = ctx.names.lock().await;
    let net = {
        ctx.blocking(move |m| {
            if m.get::<Network>(&net.name)?.is_some() {
                return Err(ManagerError::conflict(format!(
                    "a network named {n:?} exists: see `flotilla network inspect {n}`",
                    n = net.name
                )));
            }
            // Nodes name a network's bridge after its tag: no two networks may share one.
            let tag = flotilla_control::ipam::network_tag(&net.name);
            if let Some(other) = m
                .list::<Network>()?
                .into_iter()
                .find(|o| flotilla_control::ipam::network_tag(&o.name) == tag)
            {
                return Err(ManagerError::conflict(format!(
                    "network name {:?} would share its bridge tag ({tag}) with network {:?} on \
                     every node: choose another name",
                    net.name, other.name
                )));
            }
            let pool_text = m.cluster()?.network.address_pool;
            let pool: Ipv4Net = pool_text.parse().map_err(|e| {
                ManagerError::internal(format!("the cluster's address pool {pool_text:?}: {e}"))
            })?;
            let taken = taken(&m.list::<Network>()?, &m.list::<Node>()?);
            let range = if given {
                check_subnet(&net.subnet, pool, &taken).map_err(ManagerError::bad_request)?
            } else {
                let ranges: Vec<Ipv4Net> = taken.iter().map(|(_, r)| *r).collect();
                pick_subnet(pool, &ranges).ok_or_else(|| {
                    ManagerError::conflict(format!(
                        "no free /{} is left in the address pool {pool}: give a smaller range \
                         with --subnet, or remove unused networks",
                        auto_prefix(pool)
                    ))
                })?
            };
            net.subnet = range.to_string();
            Ok(net)
        })
        .await?
    };
    ctx.write(
        Batch::single(Op::create(Table::Networks, &net.name, encode(&net)?)),
        "network",
    )
    .await?;
    tracing::info!(network = %net.name, subnet = %net.subnet, "network created");
    ctx.kick();
    Ok((StatusCode::CREATED, Json(net)).into_response())
}

/// `GET /v1/networks`: every network by name, with the services using it.
pub async fn list(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let nets = ctx
        .blocking(|m| {
            let mut users = users(&m.list::<Service>()?);
            let mut nets: Vec<Network> = m.list()?;
            for n in &mut nets {
                n.used_by = users.remove(&n.name).unwrap_or_default();
            }
            nets.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(nets)
        })
        .await?;
    Ok(json_ok(&nets))
}

/// `GET /v1/networks/{name}` (name, id or unique id prefix): 404 when there is none.
pub async fn inspect(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let net = ctx
        .blocking(move |m| {
            let mut n = find(m, &key)?;
            n.used_by = users(&m.list::<Service>()?)
                .remove(&n.name)
                .unwrap_or_default();
            Ok(n)
        })
        .await?;
    Ok(json_ok(&net))
}

/// `DELETE /v1/networks/{name}`: 409 while a service is attached to it, or a task of one
/// that detached has not stopped yet.
pub async fn remove(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Result<Response, ManagerError> {
    admin_only(&caller)?;
    let _names = ctx.names.lock().await;
    let net = ctx
        .blocking(move |m| {
            let n = find(m, &key)?;
            let services: Vec<Service> = m.list()?;
            if let Some(users) = users(&services).remove(&n.name) {
                return Err(ManagerError::conflict(format!(
                    "network {name} is used by service(s) {}: remove them or detach them with \
                     `service update --network-rm {name}`",
                    users.join(", "),
                    name = n.name
                )));
            }
            let tasks: Vec<Task> = m.list()?;
            let live = tasks
                .iter()
                .filter(|t| !t.status.state.is_terminal())
                .filter(|t| t.spec.networks.iter().any(|a| a.target == n.name))
                .count();
            if live > 0 {
                return Err(ManagerError::conflict(format!(
                    "network {} still has {live} task(s) attached that have not stopped: retry \
                     once the services' updates are done",
                    n.name
                )));
            }
            Ok(n)
        })
        .await?;
    ctx.write(
        Batch::single(Op::delete(
            Table::Networks,
            &net.name,
            Some(net.meta.version),
        )),
        "network",
    )
    .await?;
    tracing::info!(network = %net.name, "network removed");
    ctx.kick();
    Ok(json_ok(&serde_json::json!({"removed": net.name})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    fn pool() -> Ipv4Net {
        net("10.200.0.0/16")
    }

    fn att(target: &str, aliases: &[&str]) -> NetworkAttachment {
        NetworkAttachment {
            target: target.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn auto_ranges_come_from_the_top_of_the_pool_and_skip_what_is_taken() {
        assert_eq!(pick_subnet(pool(), &[]), Some(net("10.200.240.0/20")));
        let taken = [net("10.200.240.0/20"), net("10.200.224.5/32")];
        assert_eq!(pick_subnet(pool(), &taken), Some(net("10.200.208.0/20")));
        // Node subnets inside the two top blocks, and a wider range over the next two.
        let taken = [
            net("10.200.250.0/24"),
            net("10.200.230.0/24"),
            net("10.200.192.0/19"),
        ];
        assert_eq!(pick_subnet(pool(), &taken), Some(net("10.200.176.0/20")));
        // A range that covers the whole pool leaves nothing.
        assert_eq!(pick_subnet(pool(), &[net("10.0.0.0/8")]), None);
        // A full pool: every /20 taken.
        let all: Vec<Ipv4Net> = pool().subnets(20).expect("subnets").collect();
        assert_eq!(pick_subnet(pool(), &all), None);
        // Small pools: two bits under the pool's prefix, never past /26.
        assert_eq!(auto_prefix(net("10.0.0.0/8")), 20);
        assert_eq!(auto_prefix(net("10.200.0.0/20")), 22);
        assert_eq!(
            pick_subnet(net("10.200.0.0/20"), &[]),
            Some(net("10.200.12.0/22"))
        );
        assert_eq!(
            pick_subnet(net("10.200.0.0/24"), &[]),
            Some(net("10.200.0.192/26"))
        );
        assert_eq!(pick_subnet(net("10.200.0.0/25"), &[]), None);
        assert_eq!(pick_subnet(net("10.200.0.0/32"), &[]), None);
        // Edges of the address space do not overflow.
        assert_eq!(
            pick_subnet(net("255.255.0.0/16"), &[]),
            Some(net("255.255.240.0/20"))
        );
        assert_eq!(
            pick_subnet(net("0.0.0.0/0"), &[]),
            Some(net("255.255.240.0/20"))
        );
    }

    #[test]
    fn given_ranges_must_fit_the_pool_and_stay_apart() {
        let taken = vec![
            ("network a".to_string(), net("10.200.64.0/20")),
            ("the subnet of node n1".to_string(), net("10.200.0.0/24")),
        ];
        assert_eq!(
            check_subnet("10.200.128.0/20", pool(), &taken),
            Ok(net("10.200.128.0/20"))
        );
        assert_eq!(
            check_subnet(" 10.200.1.0/26 ", pool(), &taken),
            Ok(net("10.200.1.0/26"))
        );
        for (bad, says) in [
            ("", "not a CIDR"),
            ("10.200.1.0", "not a CIDR"),
            ("10.200.1.0/33", "not a CIDR"),
            ("banana", "not a CIDR"),
            ("fd00::/64", "IPv4 only"),
            ("10.200.1.5/24", "use 10.200.1.0/24"),
            ("10.201.0.0/20", "outside the cluster's address pool"),
            ("10.0.0.0/8", "outside"),
            ("10.200.0.0/16", "between /17 and /26"),
            ("10.200.1.0/27", "between /17 and /26"),
            ("10.200.64.0/22", "overlaps network a"),
            ("10.200.0.0/17", "overlaps network a"),
            ("10.200.0.0/23", "node n1"),
        ] {
            let e = check_subnet(bad, pool(), &taken).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let long = "1".repeat(300);
        let e = check_subnet(&long, pool(), &taken).expect_err("long");
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn network_names_are_object_names_and_not_reserved() {
        for ok in ["backend", "front-end", "db_1", "a.b", "B2"] {
            validate_network_name(ok).expect(ok);
        }
        let long = "a".repeat(300);
        for bad in [
            "", "..", ".x", "-x", "a b", "a/b", "é", &long, "default", "ingress", "HOST", "bridge",
            "none",
        ] {
            let e = validate_network_name(bad).expect_err(bad);
            assert!(e.len() < 300, "{e}");
        }
    }

    #[test]
    fn attachments_refuse_hostile_input() {
        validate_attachments(&[]).expect("none");
        validate_attachments(&[att("backend", &["db", "db-1", "x9"]), att("front", &[])])
            .expect("valid");
        let long = "a".repeat(300);
        let label64 = "a".repeat(64);
        let nine: Vec<NetworkAttachment> = (0..9).map(|i| att(&format!("n{i}"), &[])).collect();
        let seventeen: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
        let seventeen: Vec<&str> = seventeen.iter().map(String::as_str).collect();
        for (atts, says) in [
            (vec![att("", &[])], "give a network name"),
            (vec![att("..", &[])], "starting with a letter"),
            (vec![att(&long, &[])], "network \""),
            (vec![att("né", &[])], "network \""),
            (vec![att("a\nb", &[])], "network \""),
            (vec![att("default", &[])], "reserved"),
            (vec![att("Ingress", &[])], "reserved"),
            (vec![att("a", &[]), att("a", &["x"])], "given twice"),
            (nine, "at most 8"),
            (vec![att("a", &seventeen)], "at most 16"),
            (vec![att("a", &[""])], "not a DNS label"),
            (vec![att("a", &["-db"])], "not a DNS label"),
            (vec![att("a", &["db-"])], "not a DNS label"),
            (vec![att("a", &["DB"])], "not a DNS label"),
            (vec![att("a", &["d.b"])], "not a DNS label"),
            (vec![att("a", &["d_b"])], "not a DNS label"),
            (vec![att("a", &["dé"])], "not a DNS label"),
            (vec![att("a", &[".."])], "not a DNS label"),
            (vec![att("a", &[&label64])], "not a DNS label"),
            (vec![att("a", &[&long])], "not a DNS label"),
            (vec![att("a", &["db", "db"])], "alias db is given twice"),
        ] {
            let e = validate_attachments(&atts).expect_err(says);
            assert!(e.contains(says), "{says}: {e}");
            assert!(e.len() < 300, "{e}");
        }
        assert!(is_dns_label(&"a".repeat(63)));
    }

    #[test]
    fn create_requests_are_checked_before_the_store() {
        let req = |f: &dyn Fn(&mut NetworkCreate)| {
            let mut r = NetworkCreate {
                name: "backend".into(),
                ..Default::default()
            };
            f(&mut r);
            new_network(r)
        };
        let n = req(&|r| {
            r.driver = Some("overlay".into());
            r.internal = true;
            r.labels.insert("team".into(), "a".into());
        })
        .expect("valid");
        assert_eq!((n.driver.as_str(), n.internal), ("overlay", true));
        assert_eq!(n.id.len(), 25);
        assert!(n.blocks.is_empty() && n.subnet.is_empty());
        for (f, says) in [
            (
                &(|r: &mut NetworkCreate| r.driver = Some("bridge".into()))
                    as &dyn Fn(&mut NetworkCreate),
                "`overlay` driver",
            ),
            (&|r| r.name = "none".into(), "reserved"),
            (&|r| r.name = String::new(), "network name"),
            (
                &|r| {
                    r.labels.insert(String::new(), "x".into());
                },
                "needs a key",
            ),
        ] {
            let e = req(f).expect_err(says).to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
        // The body refuses unknown fields.
        let e = serde_json::from_str::<NetworkCreate>(r#"{"name":"a","ipv6":true}"#)
            .expect_err("unknown field");
        assert!(e.to_string().contains("ipv6"), "{e}");
    }

    #[test]
    fn users_are_the_services_whose_current_spec_attaches() {
        let svc = |name: &str, nets: &[&str]| {
            let mut s: Service = serde_json::from_value(serde_json::json!({
                "id": name, "spec": {"name": name,
                    "task_template": {"container": {"image": "x"}},
                    "mode": {"replicated": {"replicas": 1}}},
                "spec_version": 1,
            }))
            .expect("service");
            s.spec.task_template.networks = nets.iter().map(|n| att(n, &[])).collect();
            s
        };
        let u = users(&[
            svc("web", &["front", "back"]),
            svc("db", &["back"]),
            svc("x", &[]),
        ]);
        assert_eq!(
            u.get("back"),
            Some(&vec!["db".to_string(), "web".to_string()])
        );
        assert_eq!(u.get("front"), Some(&vec!["web".to_string()]));
        assert_eq!(u.len(), 2);
    }
}

/// The routes against a real single manager: a Raft store of one voter, the cluster object
/// and a node written as the node would, the router with an admin caller.
#[cfg(test)]
mod api_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Method, Request};
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use flotilla_store::{Batch, Op, Store, StoreConfig, Table};

    use crate::api::Caller;
    use crate::manager::{ClusterObject, ManagerConfig, CLUSTER_KEY};
    use crate::Manager;

    async fn manager(dir: &std::path::Path) -> Arc<Manager> {
        let life = Duration::from_secs(3600);
        let ca = flotilla_pki::Ca::generate("c1", life).expect("ca");
        let (cert, key) = ca
            .issue("c1", "m1", flotilla_pki::Role::Manager, life)
            .expect("cert");
        for (f, pem) in [
            ("ca.pem", ca.cert_pem()),
            ("node.pem", &cert),
            ("node.key", &key),
        ] {
            std::fs::write(dir.join(f), pem).expect("pem");
        }
        let tls = Arc::new(
            flotilla_api::TlsState::load(
                &dir.join("ca.pem"),
                &dir.join("node.pem"),
                &dir.join("node.key"),
            )
            .expect("tls"),
        );
        let store = Store::open(
            StoreConfig {
                node_id: 1,
                data_dir: dir.join("raft"),
                heartbeat_ms: 50,
                election_min_ms: 150,
                election_max_ms: 300,
                ..Default::default()
            },
            Arc::new(crate::transport::HttpRaftTransport { tls: tls.clone() }),
        )
        .await
        .expect("store");
        store
            .initialize("127.0.0.1:1".into())
            .await
            .expect("initialize");
        let images =
            Arc::new(flotilla_registry::ImageStore::open(dir.join("images")).expect("images"));
        let config = ManagerConfig {
            node_id: "m1".into(),
            heartbeat_period: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            task_history: 5,
            write_timeout: Duration::from_secs(5),
            data_dir: dir.display().to_string(),
            listen: "127.0.0.1:1".into(),
        };
        let mgr = Arc::new(Manager::new(store, config, tls, images));
        let cluster = ClusterObject {
            cluster_id: "c1".into(),
            ca_cert_pem: ca.cert_pem().into(),
            ca_key_pem: ca.key_pem().into(),
            worker_secret: "w".into(),
            manager_secret: "m".into(),
            cert_lifetime_secs: 3600,
            created_at: 1,
            network: Default::default(),
            trust: Default::default(),
            bind_allow: Vec::new(),
            unlock_key: None,
            tunnel_keys: Vec::new(),
        };
        let node = json!({
            "id": "n1",
            "spec": {"name": "n1", "role": "manager", "availability": "active"},
            "description": {"hostname": "h", "os": "linux", "arch": "x86_64", "resources": {}},
            "status": {"state": "ready", "addr": "127.0.0.1:1"},
            "network": {"subnet": "10.200.0.0/24"},
        });
        mgr.write(
            Batch {
                ops: vec![
                    Op::upsert(
                        Table::Cluster,
                        CLUSTER_KEY,
                        serde_json::to_vec(&cluster).expect("json"),
                    ),
                    Op::upsert(Table::Nodes, "n1", node.to_string()),
                ],
            },
            "setup",
        )
        .await
        .expect("setup");
        mgr
    }

    async fn call(
        mgr: &Arc<Manager>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let app = super::super::router(mgr.clone())
            .layer(axum::Extension(Caller::Admin))
            .layer(axum::middleware::from_fn(
                flotilla_api::respond::json_errors,
            ));
        let mut req = Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .expect("request");
        let resp = app.oneshot(req).await.expect("answer");
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn message(v: &Value) -> &str {
        v["message"].as_str().unwrap_or("<no message>")
    }

    fn service(networks: Value) -> Value {
        json!({
            "name": "web",
            "task_template": {
                "container": {"image": format!("busybox@sha256:{}", "a".repeat(64))},
                "networks": networks,
            },
            "mode": {"replicated": {"replicas": 0}},
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn networks_are_created_listed_attached_and_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let mgr = manager(dir.path()).await;
        let post = |b: Value| call(&mgr, Method::POST, "/v1/networks", Some(b));

        // Without --subnet: the highest free /20 of the pool; no blocks yet.
        let (code, back) = post(json!({"name": "backend"})).await;
        assert_eq!(code, 201, "{back}");
        assert_eq!(back["subnet"], "10.200.240.0/20");
        assert_eq!(back["driver"], "overlay");
        assert_eq!(back["blocks"], json!({}));
        let id = back["id"].as_str().expect("id").to_string();
        assert_eq!(id.len(), 25);
        let (code, v) = post(json!({"name": "backend"})).await;
        assert_eq!(code, 409, "{v}");
        assert!(message(&v).contains("exists"), "{v}");
        // A name whose bridge tag `backend` has already.
        let tag = flotilla_control::ipam::network_tag("backend");
        let twin = (0..200_000)
            .map(|i| format!("n{i}"))
            .find(|n| flotilla_control::ipam::network_tag(n) == tag)
            .expect("a name with the same tag");
        let (code, v) = post(json!({ "name": twin })).await;
        assert_eq!(code, 409, "{v}");
        assert!(message(&v).contains("bridge tag"), "{v}");

        let (code, v) = post(json!({"name": "front", "subnet": "10.200.0.0/23"})).await;
        assert_eq!(code, 400, "{v}");
        assert!(message(&v).contains("node n1"), "{v}");
        let (code, v) = post(json!({"name": "front", "subnet": "10.200.240.0/24"})).await;
        assert_eq!(code, 400, "{v}");
        assert!(message(&v).contains("overlaps network backend"), "{v}");
        let (code, v) = post(json!({"name": "front", "subnet": "10.1.0.0/24"})).await;
        assert_eq!(code, 400, "{v}");
        assert!(message(&v).contains("address pool 10.200.0.0/16"), "{v}");
        let (code, front) =
            post(json!({"name": "front", "subnet": "10.200.64.0/20", "internal": true})).await;
        assert_eq!(code, 201, "{front}");
        assert_eq!(front["internal"], true);
        let (code, auto) = post(json!({"name": "auto", "labels": {"a": "b"}})).await;
        assert_eq!(code, 201, "{auto}");
        assert_eq!(auto["subnet"], "10.200.224.0/20");
        for (body, says) in [
            (json!({"name": "x", "driver": "bridge"}), "`overlay` driver"),
            (json!({"name": "ingress"}), "reserved"),
            (json!({"name": "a/b"}), "network name"),
            (json!({"name": "x", "subnet": "fd00::/64"}), "IPv4 only"),
        ] {
            let (code, v) = post(body.clone()).await;
            assert_eq!(code, 400, "{body}: {v}");
            assert!(message(&v).contains(says), "{body}: {v}");
        }
        let (code, v) = post(json!({"name": "x", "ipv6": true})).await;
        assert!((400..500).contains(&code), "{v}");
        assert!(message(&v).contains("ipv6"), "{v}");

        // A service names networks that exist, each once.
        let (code, v) = call(
            &mgr,
            Method::POST,
            "/v1/services",
            Some(service(json!([{"target": "nope"}]))),
        )
        .await;
        assert_eq!(code, 400, "{v}");
        assert_eq!(
            message(&v),
            "network nope not found: create it with `flotilla network create nope`"
        );
        let (code, v) = call(
            &mgr,
            Method::POST,
            "/v1/services",
            Some(service(
                json!([{"target": "backend"}, {"target": "backend"}]),
            )),
        )
        .await;
        assert_eq!(code, 400, "{v}");
        assert!(message(&v).contains("given twice"), "{v}");
        let (code, v) = call(
            &mgr,
            Method::POST,
            "/v1/services",
            Some(service(
                json!([{"target": "backend", "aliases": ["db"]}, {"target": "front"}]),
            )),
        )
        .await;
        assert_eq!(code, 201, "{v}");

        let (code, all) = call(&mgr, Method::GET, "/v1/networks", None).await;
        assert_eq!(code, 200, "{all}");
        let names: Vec<&str> = all
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|n| n["name"].as_str())
            .collect();
        assert_eq!(names, ["auto", "backend", "front"]);
        assert_eq!(all[1]["used_by"], json!(["web"]));
        assert_eq!(all[0].get("used_by"), None);
        let (code, v) = call(
            &mgr,
            Method::GET,
            &format!("/v1/networks/{}", &id[..8]),
            None,
        )
        .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            (v["name"].as_str(), &v["used_by"]),
            (Some("backend"), &json!(["web"]))
        );
        let (code, v) = call(&mgr, Method::GET, "/v1/networks/nope", None).await;
        assert_eq!(code, 404, "{v}");
        assert!(message(&v).contains("network nope not found"), "{v}");

        // Removal waits for the services to detach.
        let (code, v) = call(&mgr, Method::DELETE, "/v1/networks/backend", None).await;
        assert_eq!(code, 409, "{v}");
        assert_eq!(
            message(&v),
            "network backend is used by service(s) web: remove them or detach them with \
             `service update --network-rm backend`"
        );
        let (code, v) = call(
            &mgr,
            Method::POST,
            "/v1/services/web/update",
            Some(service(json!([{"target": "front"}]))),
        )
        .await;
        assert_eq!(code, 200, "{v}");
        let (code, v) = call(&mgr, Method::DELETE, "/v1/networks/backend", None).await;
        assert_eq!(code, 200, "{v}");
        let (code, _) = call(&mgr, Method::GET, "/v1/networks/backend", None).await;
        assert_eq!(code, 404);
        let (code, v) = call(&mgr, Method::DELETE, "/v1/networks/backend", None).await;
        assert_eq!(code, 404, "{v}");
        // Its range is free again.
        let (code, v) = post(json!({"name": "again"})).await;
        assert_eq!(code, 201, "{v}");
        assert_eq!(v["subnet"], "10.200.240.0/20");
        mgr.store.shutdown().await.expect("shutdown");
    }
}
