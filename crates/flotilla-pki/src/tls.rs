use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{PkiError, Role};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Tls(e.to_string())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| PkiError::BadPem {
        what,
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            what,
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem {
        what: "private key",
        detail: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut store = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        store.add(c).map_err(tls_err)?;
    }
    Ok(Arc::new(store))
}

/// TLS for a node's listen address: presents the node certificate; verifies client
/// certificates against the cluster CA when offered. Client certificates are optional at the
/// TLS layer so that joining nodes (which have none yet) can reach the join endpoint; every
/// other endpoint requires a verified identity (enforced by the HTTP layer).
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "node certificate")?, key(key_pem)?)
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side: trusts only the cluster CA (server name [`crate::SERVER_NAME`]) and presents
/// `identity` (cert PEM, key PEM) when given. Any certificate of the cluster is accepted as
/// the server: for connections to whichever node (log fan-out, an operator's CLI).
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, PkiError> {
    client_config_for(ca_pem, identity, None)
}

/// [`client_config`], and the server must also prove `server_role` (its certificate's OU and
/// SPIFFE URI, see [`crate::parse_identity`]). Agents, joining nodes and Raft peers talk only
/// to managers: with `Some(Role::Manager)` a worker's certificate, valid as it is for the
/// cluster CA, cannot pose as one (to collect a join secret, serve assignments and a trust
/// policy, or receive Raft entries).
pub fn client_config_for(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    server_role: Option<Role>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let roots = roots(ca_pem)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let builder = match server_role {
        None => builder.with_root_certificates(roots),
        Some(role) => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(tls_err)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(RoleVerifier { inner, role }))
        }
    };
    let mut cfg = match identity {
        Some((cert, k)) => builder
            .with_client_auth_cert(certs(cert, "client certificate")?, key(k)?)
            .map_err(tls_err)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The cluster CA's verdict first (chain, validity, server name), then the role.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<WebPkiServerVerifier>,
    role: Role,
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match crate::parse_identity(end_entity.as_ref()) {
            Ok(id) if id.role == self.role => Ok(verified),
            Ok(id) => Err(rustls::Error::General(format!(
                "the server's certificate is for {}, which is a {:?}, not a {:?}",
                id.spiffe_uri(),
                id.role,
                self.role
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "the server's certificate: {e}"
            ))),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// For the first step of a join only: accepts any server certificate so the joining node can
/// fetch the CA certificate, which it then checks against the fingerprint in its token before
/// it trusts it or sends any secret. Nothing secret ever travels over this configuration.
pub fn pinning_probe_config() -> Result<Arc<ClientConfig>, PkiError> {
    #[derive(Debug)]
    struct AcceptAny(Arc<CryptoProvider>);
    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let p = provider();
    let mut cfg = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(p)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;
    use rustls::{ClientConnection, ServerConnection};
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);

    /// Runs a TLS handshake in memory; the error of whichever side gave up first.
    fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<(), String> {
        let name = ServerName::try_from(crate::SERVER_NAME).map_err(|e| e.to_string())?;
        let mut c = ClientConnection::new(client, name).map_err(|e| e.to_string())?;
        let mut s = ServerConnection::new(server).map_err(|e| e.to_string())?;
        for _ in 0..20 {
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
            let mut buf = Vec::new();
            c.write_tls(&mut buf).map_err(|e| e.to_string())?;
            s.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).map_err(|e| e.to_string())?;
            c.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            c.process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn only_a_manager_certificate_passes_for_a_manager_only_client() -> Result<(), PkiError> {
        let ca = Ca::generate("c1", DAY)?;
        let (wc, wk) = ca.issue("c1", "w1", Role::Worker, DAY)?;
        let (mc, mk) = ca.issue("c1", "m1", Role::Manager, DAY)?;
        let (ac, ak) = ca.issue("c1", "a1", Role::Admin, DAY)?;
        let (nc, nk) = ca.issue("c1", "n2", Role::Worker, DAY)?;
        let to_manager = client_config_for(ca.cert_pem(), Some((&nc, &nk)), Some(Role::Manager))?;
        let to_any = client_config(ca.cert_pem(), Some((&nc, &nk)))?;

        let worker_server = server_config(ca.cert_pem(), &wc, &wk)?;
        let e = handshake(to_manager.clone(), worker_server.clone())
            .expect_err("a worker posing as a manager");
        assert!(e.contains("which is a Worker, not a Manager"), "{e}");
        handshake(to_any.clone(), worker_server).map_err(PkiError::Tls)?;

        handshake(to_manager.clone(), server_config(ca.cert_pem(), &mc, &mk)?)
            .map_err(PkiError::Tls)?;
        // An admin bundle is not a node (and carries no server name).
        assert!(handshake(to_manager.clone(), server_config(ca.cert_pem(), &ac, &ak)?).is_err());

        // Another cluster's manager fails on the chain, before any role is read.
        let other = Ca::generate("c2", DAY)?;
        let (oc, ok) = other.issue("c2", "m9", Role::Manager, DAY)?;
        assert!(handshake(to_manager, server_config(other.cert_pem(), &oc, &ok)?).is_err());
        Ok(())
    }
}
