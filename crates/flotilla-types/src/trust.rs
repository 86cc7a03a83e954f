//! Image trust, as data: the keys whose signatures a cluster accepts and whether it enforces
//! them. Verification lives in `flotilla-registry` (`TrustCheck`), beside the signatures.

use serde::{Deserialize, Serialize};

/// A signature algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    Ed25519,
    EcdsaP256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256 => "ecdsa-p256",
        }
    }
}

/// A key the cluster trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// Key id (the signing key's id in `flotilla-registry`); checked against the PEM.
    pub id: String,
    pub algorithm: Algorithm,
    /// SubjectPublicKeyInfo `PUBLIC KEY` PEM.
    pub public_key_pem: String,
}

fn enforce_default() -> bool {
    true
}

/// The cluster's image trust policy. Fails closed: enforcement is on unless turned off
/// explicitly, and with no keys nothing runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustPolicy {
    /// Keys whose signatures are accepted.
    #[serde(default)]
    pub keys: Vec<TrustedKey>,
    /// When false, every image is accepted (verification is skipped). Default: true.
    #[serde(default = "enforce_default")]
    pub enforce: bool,
}

impl Default for TrustPolicy {
    /// Enforcing, with no trusted key yet.
    fn default() -> Self {
        TrustPolicy {
            keys: Vec::new(),
            enforce: true,
        }
    }
}
