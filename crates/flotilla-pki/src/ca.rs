use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::{PkiError, SERVER_NAME};

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
    /// An operator's client bundle: full API access, no node identity.
    Admin,
}

impl Role {
    fn ou(self) -> &'static str {
        match self {
            Role::Manager => "flotilla-manager",
            Role::Worker => "flotilla-worker",
            Role::Admin => "flotilla-admin",
        }
    }
    fn from_ou(ou: &str) -> Option<Role> {
        match ou {
            "flotilla-manager" => Some(Role::Manager),
            "flotilla-worker" => Some(Role::Worker),
            "flotilla-admin" => Some(Role::Admin),
            _ => None,
        }
    }
    fn path_kind(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            _ => "node",
        }
    }
}

/// The identity a verified certificate proves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub cluster_id: String,
    /// Node id (or the admin bundle's id).
    pub node_id: String,
    pub role: Role,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl Identity {
    pub fn spiffe_uri(&self) -> String {
        format!(
            "spiffe://{}/{}/{}",
            self.cluster_id,
            self.role.path_kind(),
            self.node_id
        )
    }
}

/// The cluster root CA. Only managers hold its key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    key: KeyPair,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn gen_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    // Tolerate small clock skew between nodes.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs().max(1) as i64);
}

impl Ca {
    /// A new self-signed ECDSA P-256 root for `cluster_id`, valid for `lifetime`.
    pub fn generate(cluster_id: &str, lifetime: Duration) -> Result<Ca, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("flotilla root CA {cluster_id}"));
        dn.push(DnType::OrganizationName, cluster_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, lifetime);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_der: cert.der().clone(),
            cert_pem,
            key_pem,
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadPem {
            what: "CA key",
            detail: e.to_string(),
        })?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::BadPem {
                what: "CA certificate",
                detail: e.to_string(),
            })?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            key,
            cert_der,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// SHA-256 of the DER certificate, lower-case hex: what join tokens pin.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.cert_der.as_ref()))
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(gen_err)
    }

    fn leaf_params(
        cluster_id: &str,
        node_id: &str,
        role: Role,
        lifetime: Duration,
    ) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        dn.push(DnType::OrganizationName, cluster_id);
        dn.push(DnType::OrganizationalUnitName, role.ou());
        params.distinguished_name = dn;
        let uri = format!("spiffe://{cluster_id}/{}/{node_id}", role.path_kind());
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(gen_err)?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if role != Role::Admin {
            params
                .subject_alt_names
                .push(SanType::DnsName(SERVER_NAME.try_into().map_err(gen_err)?));
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lifetime);
        Ok(params)
    }

    /// Signs the public key of `csr_pem` with an identity chosen here: whatever subject or
    /// names the request asks for are ignored.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        cluster_id: &str,
        node_id: &str,
        role: Role,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let params = Self::leaf_params(cluster_id, node_id, role, lifetime)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(gen_err)?;
        Ok(cert.pem())
    }

    /// A fresh key and certificate (for the first manager and the admin bundle).
    pub fn issue(
        &self,
        cluster_id: &str,
        node_id: &str,
        role: Role,
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let params = Self::leaf_params(cluster_id, node_id, role, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A node's own new key (PEM) and a CSR for it (PEM). The key never leaves the node.
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(gen_err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(gen_err)?))
}

/// SHA-256 (hex) of the first certificate in `pem`.
pub fn fingerprint_pem(pem: &str) -> Result<String, PkiError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem {
        what: "certificate",
        detail: e.to_string(),
    })?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

/// Reads the flotilla identity out of a certificate (already verified by TLS).
pub fn parse_identity(der: &[u8]) -> Result<Identity, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::NoIdentity(e.to_string()))?;
    let subject = cert.subject();
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| PkiError::NoIdentity("no OU".into()))?;
    let role = Role::from_ou(ou).ok_or_else(|| PkiError::NoIdentity(format!("OU {ou:?}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::NoIdentity(e.to_string()))?
        .ok_or_else(|| PkiError::NoIdentity("no subject alternative names".into()))?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .ok_or_else(|| PkiError::NoIdentity("no spiffe URI".into()))?;
    let rest = &uri["spiffe://".len()..];
    let parts: Vec<&str> = rest.split('/').collect();
    let [cluster_id, kind, node_id] = parts.as_slice() else {
        return Err(PkiError::NoIdentity(format!("unexpected URI {uri}")));
    };
    if *kind != role.path_kind() {
        return Err(PkiError::NoIdentity(format!(
            "URI {uri} does not match role {ou}"
        )));
    }
    Ok(Identity {
        cluster_id: cluster_id.to_string(),
        node_id: node_id.to_string(),
        role,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

pub fn parse_identity_pem(pem: &str) -> Result<Identity, PkiError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem {
        what: "certificate",
        detail: e.to_string(),
    })?;
    parse_identity(der.as_ref())
}

/// Renew once two thirds of the certificate's lifetime have passed (swarmkit renews in a
/// randomized window around half to three quarters; a fixed point keeps this testable).
pub fn needs_renewal(not_before: i64, not_after: i64, now: i64) -> bool {
    // `not_before` is back-dated by 5 minutes for clock skew; measure from the real issue time.
    let issued = (not_before + 300).min(not_after);
    let lifetime = (not_after - issued).max(1);
    now >= issued + lifetime * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_signing_sets_our_identity() {
        let ca = Ca::generate("c1", Duration::from_secs(3600)).unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let pem = ca
            .sign_csr(&csr, "c1", "n1", Role::Worker, Duration::from_secs(60))
            .unwrap();
        let id = parse_identity_pem(&pem).unwrap();
        assert_eq!(id.cluster_id, "c1");
        assert_eq!(id.node_id, "n1");
        assert_eq!(id.role, Role::Worker);
        assert_eq!(id.spiffe_uri(), "spiffe://c1/node/n1");
        assert!(id.not_after - id.not_before <= 60 + 300);
        assert_eq!(ca.fingerprint(), fingerprint_pem(ca.cert_pem()).unwrap());
        let ca2 = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(ca2.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn admin_identity() {
        let ca = Ca::generate("c1", Duration::from_secs(3600)).unwrap();
        let (cert, _key) = ca
            .issue("c1", "adm", Role::Admin, Duration::from_secs(3600))
            .unwrap();
        let id = parse_identity_pem(&cert).unwrap();
        assert_eq!(id.role, Role::Admin);
        assert_eq!(id.spiffe_uri(), "spiffe://c1/admin/adm");
    }

    #[test]
    fn bad_csr_is_refused() {
        let ca = Ca::generate("c1", Duration::from_secs(3600)).unwrap();
        assert!(matches!(
            ca.sign_csr("garbage", "c1", "n", Role::Worker, Duration::from_secs(1)),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn renewal_point() {
        // issued at 1000 (not_before back-dated to 700), expires 1900: renew from 1600.
        assert!(!needs_renewal(700, 1900, 1599));
        assert!(needs_renewal(700, 1900, 1600));
    }
}
