//! The node's live TLS material. Certificates renew in place: the listener asks for the
//! current server configuration on every connection and new outgoing connections use the
//! current client configuration, so a renewal needs no restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use flotilla_api::{Client, Endpoint};
use flotilla_pki::Identity;

use crate::disk::{write_atomic, Paths};
use crate::NodeError;

struct Material {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    identity: Identity,
    server: Arc<rustls::ServerConfig>,
    /// Connects only to managers (agents, Raft, forwarding, the registry).
    client: Arc<rustls::ClientConfig>,
    /// Connects to any node of the cluster (log fan-out to the node running a task).
    client_any: Arc<rustls::ClientConfig>,
}

pub struct TlsState {
    inner: RwLock<Arc<Material>>,
    /// One pooled client per peer address (reset on renewal).
    peers: Mutex<HashMap<String, Client>>,
}

fn pki(e: flotilla_pki::PkiError) -> NodeError {
    NodeError::Tls(e.to_string())
}

fn build(ca_pem: String, cert_pem: String, key_pem: String) -> Result<Material, NodeError> {
    let identity = flotilla_pki::parse_identity_pem(&cert_pem).map_err(pki)?;
    let server = flotilla_pki::server_config(&ca_pem, &cert_pem, &key_pem).map_err(pki)?;
    let me = Some((cert_pem.as_str(), key_pem.as_str()));
    let client = flotilla_pki::client_config_for(&ca_pem, me, Some(flotilla_pki::Role::Manager))
        .map_err(pki)?;
    let client_any = flotilla_pki::client_config(&ca_pem, me).map_err(pki)?;
    Ok(Material {
        ca_pem,
        cert_pem,
        key_pem,
        identity,
        server,
        client,
        client_any,
    })
}

impl TlsState {
    pub fn load(paths: &Paths) -> Result<TlsState, NodeError> {
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(&p)
                .map_err(|e| NodeError::Io(format!("reading {}: {e}", p.display())))
        };
        let m = build(
            read(paths.ca_cert())?,
            read(paths.node_cert())?,
            read(paths.node_key())?,
        )?;
        Ok(TlsState {
            inner: RwLock::new(Arc::new(m)),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Saves new node material to disk, then swaps it in.
    pub fn install(
        &self,
        paths: &Paths,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), NodeError> {
        let m = build(ca_pem.into(), cert_pem.into(), key_pem.into())?;
        let io = |e: std::io::Error| NodeError::Io(format!("saving certificates: {e}"));
        write_atomic(&paths.node_key(), key_pem.as_bytes(), 0o600).map_err(io)?;
        write_atomic(&paths.node_cert(), cert_pem.as_bytes(), 0o644).map_err(io)?;
        write_atomic(&paths.ca_cert(), ca_pem.as_bytes(), 0o644).map_err(io)?;
        self.swap(m);
        Ok(())
    }

    fn swap(&self, m: Material) {
        if let Ok(mut g) = self.inner.write() {
            *g = Arc::new(m);
        }
        if let Ok(mut peers) = self.peers.lock() {
            peers.clear();
        }
    }

    fn current(&self) -> Arc<Material> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current().server.clone()
    }

    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    pub fn ca_pem(&self) -> String {
        self.current().ca_pem.clone()
    }

    pub fn cert_pem(&self) -> String {
        self.current().cert_pem.clone()
    }

    pub fn key_pem(&self) -> String {
        self.current().key_pem.clone()
    }

    /// The node's client configuration without ALPN (for HTTP/1.1 clients such as the
    /// registry puller).
    pub fn client_config_h1(&self) -> Arc<rustls::ClientConfig> {
        let mut cfg = (*self.current().client).clone();
        cfg.alpn_protocols.clear();
        Arc::new(cfg)
    }

    /// A registry client for the manager at `addr` (which must present a manager certificate).
    pub fn registry(&self, addr: &str) -> Option<flotilla_registry::RegistryClient> {
        flotilla_registry::RegistryClient::with_tls(
            &format!("https://{addr}"),
            self.client_config_h1(),
        )
        .and_then(|c| c.with_server_name(flotilla_pki::SERVER_NAME))
        .ok()
    }

    /// A client for the node at `addr` whatever its role (not pooled: log fan-out only).
    pub fn node(&self, addr: &str) -> Client {
        Client::new(Endpoint::Https {
            addr: addr.to_string(),
            tls: self.current().client_any.clone(),
        })
    }

    /// A pooled mTLS client for the manager at `addr`: the server must present a manager
    /// certificate of this cluster.
    pub fn peer(&self, addr: &str) -> Client {
        let client_cfg = self.current().client.clone();
        let mut peers = match self.peers.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        peers
            .entry(addr.to_string())
            .or_insert_with(|| {
                Client::new(Endpoint::Https {
                    addr: addr.to_string(),
                    tls: client_cfg,
                })
            })
            .clone()
    }
}
