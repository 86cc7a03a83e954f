//! The node's files under its data directory:
//!
//! ```text
//! DIR/node.json        identity: cluster id, node id, role, raft id, name, known managers
//! DIR/tls/ca.pem       cluster root certificate
//! DIR/tls/node.pem     this node's certificate     DIR/tls/node.key  its key (0600)
//! DIR/tls/ca.key       root key (managers only, 0600)
//! DIR/raft/            the Raft log and state (managers only)
//! DIR/admin/           operator bundle written by --init: ca.pem, cert.pem, key.pem
//! DIR/api.sock         local API socket (root only)
//! DIR/runtime/         images, container records and writable layers, container logs
//! DIR/net/             task network settings and address allocations
//! DIR/run/             a tmpfs the node mounts: state that dies with the host (runtime
//!                      bundles and shim state, runc's root, shim sockets, network namespaces)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use flotilla_types::NodeRole;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub cluster_id: String,
    pub node_id: String,
    pub name: String,
    pub role: NodeRole,
    pub raft_id: u64,
    pub addr: String,
    /// Manager addresses this node knows (refreshed by heartbeats).
    #[serde(default)]
    pub managers: Vec<String>,
}

pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_path_buf(),
        }
    }
    pub fn identity(&self) -> PathBuf {
        self.dir.join("node.json")
    }
    pub fn tls(&self) -> PathBuf {
        self.dir.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls().join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.tls().join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.tls().join("node.pem")
    }
    pub fn node_key(&self) -> PathBuf {
        self.tls().join("node.key")
    }
    pub fn raft(&self) -> PathBuf {
        self.dir.join("raft")
    }
    pub fn admin(&self) -> PathBuf {
        self.dir.join("admin")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    /// The node's tmpfs for state that dies with the host.
    pub fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
}

/// Writes `data` to `path` atomically (temp file, fsync, rename) with the given mode.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

pub fn read_identity(paths: &Paths) -> std::io::Result<Option<NodeIdentity>> {
    match std::fs::read(paths.identity()) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn write_identity(paths: &Paths, id: &NodeIdentity) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(id)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    write_atomic(&paths.identity(), &data, 0o600)
}
