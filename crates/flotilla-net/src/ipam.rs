//! Address management, free of I/O except [`TaskAddrs`]' own JSON file.
//!
//! * [`NodeSubnets`]: one subnet per node out of the cluster pool (leader side).
//! * [`VipPool`]: one /32 per service out of the VIP range (leader side).
//! * [`TaskAddrs`]: task addresses inside one node subnet (agent side), persisted so they
//!   survive an agent restart.
//!
//! The leader-side allocators live in `flotilla_control::ipam` (pure, no I/O) and are
//! re-exported here; their errors are [`IpamError`], which converts into [`Error`].

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use flotilla_control::ipam::{
    gateway_of, IpamError, NodeSubnets, VipPool, DEFAULT_NODE_PREFIX,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct TaskAddrsFile {
    subnet: Ipv4Net,
    /// Last address handed out; allocation continues after it so a freed address is not
    /// reused at once (stale ARP/conntrack entries).
    last: Option<Ipv4Addr>,
    tasks: BTreeMap<String, Ipv4Addr>,
}

/// Task addresses of one node subnet, persisted as JSON.
///
/// The gateway is the first host (`.1`); tasks get addresses from `.2` on, never the
/// network or broadcast address. Allocation is round-robin after the last address handed
/// out. Every change is written with tmp file + rename before it is returned (no fsync: the
/// file must survive an agent crash, which the page cache covers; after a reboot no task and
/// no namespace is left to conflict with, and a fsync per task start serialized them).
#[derive(Debug)]
pub struct TaskAddrs {
    path: PathBuf,
    state: TaskAddrsFile,
}

fn u(a: Ipv4Addr) -> u32 {
    u32::from(a)
}

impl TaskAddrs {
    /// Opens (or starts) the allocation file at `path` for `subnet` (at most /30).
    pub fn open(path: impl Into<PathBuf>, subnet: Ipv4Net) -> Result<Self> {
        let path = path.into();
        if subnet.prefix_len() > 30 {
            return Err(Error::Invalid(format!(
                "node subnet {subnet} is too small (needs /30 or wider)"
            )));
        }
        let subnet = subnet.trunc();
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let state: TaskAddrsFile =
                    serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if state.subnet != subnet {
                    return Err(Error::SubnetMismatch {
                        path,
                        found: state.subnet,
                        expected: subnet,
                    });
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TaskAddrsFile {
                subnet,
                last: None,
                tasks: BTreeMap::new(),
            },
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        Ok(Self { path, state })
    }

    /// The node subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.state.subnet
    }

    /// The gateway (bridge) address: the first host of the subnet.
    pub fn gateway(&self) -> Ipv4Addr {
        gateway_of(self.state.subnet)
    }

    /// The gateway with the subnet's prefix, as given to [`crate::bridge::ensure_bridge`].
    pub fn gateway_net(&self) -> Ipv4Net {
        // The prefix comes from a valid Ipv4Net, so this cannot fail.
        Ipv4Net::new(self.gateway(), self.state.subnet.prefix_len()).unwrap_or(self.state.subnet)
    }

    /// The address of `task_id`, if it has one.
    pub fn get(&self, task_id: &str) -> Option<Ipv4Addr> {
        self.state.tasks.get(task_id).copied()
    }

    /// All allocations, by task id.
    pub fn allocations(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> {
        self.state.tasks.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The address of `task_id`, allocating (and persisting) one if it has none.
    pub fn allocate(&mut self, task_id: &str) -> Result<Ipv4Addr> {
        if let Some(a) = self.get(task_id) {
            return Ok(a);
        }
        let net = self.state.subnet;
        let first = u(net.network()) + 2;
        let last = u(net.broadcast()) - 1;
        if first > last {
            return Err(Error::Exhausted(format!("task addresses of {net}")));
        }
        let used: HashSet<u32> = self.state.tasks.values().map(|a| u(*a)).collect();
        let start = match self.state.last {
            Some(l) if u(l) >= first && u(l) < last => u(l) + 1,
            _ => first,
        };
        let span = last - first + 1;
        let found = (0..span)
            .map(|i| first + (start - first + i) % span)
            .find(|c| !used.contains(c))
            .ok_or_else(|| Error::Exhausted(format!("task addresses of {net}")))?;
        let addr = Ipv4Addr::from(found);
        let mut next = self.state.clone();
        next.tasks.insert(task_id.to_string(), addr);
        next.last = Some(addr);
        self.persist(&next)?;
        self.state = next;
        Ok(addr)
    }

    /// Frees the address of `task_id`; returns whether it had one.
    pub fn release(&mut self, task_id: &str) -> Result<bool> {
        if !self.state.tasks.contains_key(task_id) {
            return Ok(false);
        }
        let mut next = self.state.clone();
        next.tasks.remove(task_id);
        self.persist(&next)?;
        self.state = next;
        Ok(true)
    }

    fn persist(&self, state: &TaskAddrsFile) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| Error::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        write_atomic(&self.path, &bytes)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("address file path {}", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let op = |what: &str| format!("{what} {}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(op("create"), e))?;
    f.write_all(bytes).map_err(|e| Error::io(op("write"), e))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn task_addrs_idempotent_persistent_and_never_reserved() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("addrs.json");
        let subnet = net("10.200.7.0/29"); // hosts .1-.6, tasks .2-.6
        let mut t = TaskAddrs::open(&path, subnet).expect("open");
        assert_eq!(t.gateway(), Ipv4Addr::new(10, 200, 7, 1));
        assert_eq!(t.gateway_net(), net("10.200.7.1/29"));
        let a = t.allocate("task-a").expect("a");
        assert_eq!(a, Ipv4Addr::new(10, 200, 7, 2));
        assert_eq!(t.allocate("task-a").expect("again"), a);
        let mut seen = vec![a];
        for i in 0..4 {
            seen.push(t.allocate(&format!("t{i}")).expect("alloc"));
        }
        assert!(matches!(
            t.allocate("one-too-many"),
            Err(Error::Exhausted(_))
        ));
        for s in &seen {
            let last = s.octets()[3];
            assert!((2..=6).contains(&last), "reserved address {s} handed out");
        }

        // survives a reopen
        drop(t);
        let mut t = TaskAddrs::open(&path, subnet).expect("reopen");
        assert_eq!(t.get("task-a"), Some(a));
        assert_eq!(t.allocations().count(), 5);
        assert!(t.release("task-a").expect("release"));
        assert!(!t.release("task-a").expect("release again"));
        drop(t);
        let mut t = TaskAddrs::open(&path, subnet).expect("reopen 2");
        assert_eq!(t.get("task-a"), None);
        // the freed address is the only one left
        assert_eq!(t.allocate("task-b").expect("b"), a);

        assert!(matches!(
            TaskAddrs::open(&path, net("10.200.8.0/24")),
            Err(Error::SubnetMismatch { .. })
        ));
        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(
            TaskAddrs::open(&path, subnet),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn task_addrs_round_robin() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("addrs.json");
        let mut t = TaskAddrs::open(&path, net("10.200.1.0/27")).expect("open");
        let a = t.allocate("a").expect("a");
        assert!(t.release("a").expect("rel"));
        let b = t.allocate("b").expect("b");
        assert_ne!(a, b, "freed address reused at once");
        for i in 0..28 {
            let x = t.allocate(&format!("x{i}")).expect("x");
            assert!(x.octets()[3] >= 2 && x.octets()[3] <= 30, "{x}");
        }
        assert!(matches!(t.allocate("full"), Err(Error::Exhausted(_))));
    }
}
