//! A node's live TLS material. Certificates renew in place: the listener asks for the
//! current server configuration on every connection and new outgoing connections use the
//! current client configuration, so a renewal needs no restart.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use flotilla_pki::Identity;

use crate::{Client, Endpoint};

/// Why node TLS material could not be loaded or swapped in.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Pki(#[from] flotilla_pki::PkiError),
}

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

fn build(ca_pem: String, cert_pem: String, key_pem: String) -> Result<Material, TlsError> {
    let identity = flotilla_pki::parse_identity_pem(&cert_pem)?;
    let server = flotilla_pki::server_config(&ca_pem, &cert_pem, &key_pem)?;
    let me = Some((cert_pem.as_str(), key_pem.as_str()));
    let client = flotilla_pki::client_config_for(&ca_pem, me, Some(flotilla_pki::Role::Manager))?;
    let client_any = flotilla_pki::client_config(&ca_pem, me)?;
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
    /// Reads the CA certificate, the node certificate and its key (PEM files).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsState, TlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let m = build(read(ca)?, read(cert)?, read(key)?)?;
        Ok(TlsState {
            inner: RwLock::new(Arc::new(m)),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Checks new node material (a renewal) without installing it.
    pub fn check(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        build(ca_pem.into(), cert_pem.into(), key_pem.into()).map(|_| ())
    }

    /// Swaps new node material in (the caller saved it to disk first): new connections use it,
    /// and pooled clients are dropped.
    pub fn replace(&self, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let m = build(ca_pem.into(), cert_pem.into(), key_pem.into())?;
        self.swap(m);
        Ok(())
    }

    fn swap(&self, m: Material) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(m);
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn current(&self) -> Arc<Material> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
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
    /// registry puller); it accepts only manager certificates.
    pub fn client_config_h1(&self) -> Arc<rustls::ClientConfig> {
        let mut cfg = (*self.current().client).clone();
        cfg.alpn_protocols.clear();
        Arc::new(cfg)
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
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
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
