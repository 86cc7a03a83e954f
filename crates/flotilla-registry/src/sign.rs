//! Image signatures and the cluster trust policy.
//!
//! A signature signs a small JSON payload naming the manifest digest:
//! `{"critical":{"image":{"docker-manifest-digest":"sha256:…"},"type":"flotilla signature"},"key_id":"…"}`.
//! Signatures of an image are stored as one OCI artifact manifest (artifact type
//! [`SIGNATURE_ARTIFACT_TYPE`], `subject` = the image) whose layers are the payloads, with the
//! signature bytes, key id and algorithm in each layer's annotations. It is tagged
//! `sha256-<hex>.sig` in the image's repository (cosign's convention) and listed by the
//! referrers API, so pull and push carry it along with the image.
//!
//! Keys: ed25519 (default) or ECDSA P-256, private keys as PKCS#8 PEM, public keys as
//! SubjectPublicKeyInfo PEM; a key id is the first 16 hex chars of sha256(SPKI DER).

use crate::digest::{check_digest, sha256_digest, signature_tag};
use crate::error::{IoContext, RegistryError, Result};
use crate::manifest::{Descriptor, Manifest, OCI_EMPTY, OCI_MANIFEST};
use crate::meta::Meta;
use flotilla_runtime::ImageStore;
pub use flotilla_types::{Algorithm, TrustPolicy, TrustedKey};

/// The admin's image signing key (PKCS#8 PEM) in the admin bundle, and its public half.
pub const SIGNING_KEY_FILE: &str = "signing-key.pem";
pub const SIGNING_PUB_FILE: &str = "signing-key.pub.pem";
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair as _};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Artifact type of signature manifests.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.flotilla.signature.v1+json";
/// Media type of a signature payload layer.
pub const SIGNATURE_PAYLOAD_TYPE: &str = "application/vnd.dev.flotilla.signature.payload.v1+json";
const ANN_SIGNATURE: &str = "dev.flotilla.signature";
const ANN_KEY_ID: &str = "dev.flotilla.key-id";
const ANN_ALGORITHM: &str = "dev.flotilla.algorithm";
const PAYLOAD_TYPE: &str = "flotilla signature";

const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

fn parse_algorithm(s: &str) -> Option<Algorithm> {
    match s {
        "ed25519" => Some(Algorithm::Ed25519),
        "ecdsa-p256" => Some(Algorithm::EcdsaP256),
        _ => None,
    }
}

fn key_err(m: impl Into<String>) -> RegistryError {
    RegistryError::Key(m.into())
}

fn spki(alg: Algorithm, raw: &[u8]) -> Vec<u8> {
    let prefix = match alg {
        Algorithm::Ed25519 => ED25519_SPKI_PREFIX,
        Algorithm::EcdsaP256 => P256_SPKI_PREFIX,
    };
    [prefix, raw].concat()
}

fn key_id_of(spki_der: &[u8]) -> String {
    sha256_digest(spki_der)["sha256:".len()..][..16].to_string()
}

enum Pair {
    Ed(sig::Ed25519KeyPair),
    Ec(sig::EcdsaKeyPair),
}

/// A private signing key.
pub struct SigningKey {
    alg: Algorithm,
    pkcs8: Vec<u8>,
    pair: Pair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.alg)
            .field("key_id", &self.key_id())
            .finish()
    }
}

impl SigningKey {
    /// A new ed25519 key.
    pub fn generate() -> Result<SigningKey> {
        Self::generate_with(Algorithm::Ed25519)
    }

    /// A new key of the given algorithm.
    pub fn generate_with(alg: Algorithm) -> Result<SigningKey> {
        let rng = SystemRandom::new();
        let doc = match alg {
            Algorithm::Ed25519 => sig::Ed25519KeyPair::generate_pkcs8(&rng),
            Algorithm::EcdsaP256 => {
                sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            }
        }
        .map_err(|_| key_err("key generation failed: no system randomness"))?;
        Self::from_pkcs8_der(doc.as_ref())
    }

    /// Loads a PKCS#8 DER key (ed25519 or P-256).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<SigningKey> {
        if let Ok(k) = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Ok(SigningKey {
                alg: Algorithm::Ed25519,
                pkcs8: der.to_vec(),
                pair: Pair::Ed(k),
            });
        }
        let rng = SystemRandom::new();
        match sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng) {
            Ok(k) => Ok(SigningKey {
                alg: Algorithm::EcdsaP256,
                pkcs8: der.to_vec(),
                pair: Pair::Ec(k),
            }),
            Err(_) => Err(key_err(
                "not an ed25519 or ECDSA P-256 PKCS#8 private key (generate one with `flotilla trust keygen FILE`)",
            )),
        }
    }

    /// Loads a `PRIVATE KEY` PEM.
    pub fn from_pem(text: &str) -> Result<SigningKey> {
        let p = pem::parse(text).map_err(|e| key_err(format!("bad PEM: {e}")))?;
        if p.tag() != "PRIVATE KEY" {
            return Err(key_err(format!(
                "PEM holds a {}, expected a PKCS#8 PRIVATE KEY",
                p.tag()
            )));
        }
        Self::from_pkcs8_der(p.contents())
    }

    /// The key as `PRIVATE KEY` PEM (PKCS#8).
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PRIVATE KEY", self.pkcs8.clone()))
    }

    /// Writes the PEM with mode 0600.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .ctx(|| format!("create {}", path.display()))?;
        f.write_all(self.to_pem().as_bytes())
            .ctx(|| format!("write {}", path.display()))
    }

    /// Reads a PEM key file.
    pub fn load(path: &Path) -> Result<SigningKey> {
        let t = std::fs::read_to_string(path).ctx(|| format!("read {}", path.display()))?;
        Self::from_pem(&t)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    fn raw_public(&self) -> &[u8] {
        match &self.pair {
            Pair::Ed(k) => k.public_key().as_ref(),
            Pair::Ec(k) => k.public_key().as_ref(),
        }
    }

    /// The public key as SubjectPublicKeyInfo `PUBLIC KEY` PEM.
    pub fn public_key_pem(&self) -> String {
        pem::encode(&pem::Pem::new(
            "PUBLIC KEY",
            spki(self.alg, self.raw_public()),
        ))
    }

    /// First 16 hex chars of sha256 of the public key (SPKI DER).
    pub fn key_id(&self) -> String {
        key_id_of(&spki(self.alg, self.raw_public()))
    }

    /// The public half, ready for a [`TrustPolicy`].
    pub fn trusted_key(&self) -> TrustedKey {
        TrustedKey {
            id: self.key_id(),
            algorithm: self.alg,
            public_key_pem: self.public_key_pem(),
        }
    }

    /// Signs a manifest digest.
    pub fn sign(&self, manifest_digest: &str) -> Result<Signature> {
        check_digest(manifest_digest)?;
        let key_id = self.key_id();
        let payload = serde_json::to_vec(&Payload {
            critical: Critical {
                image: PayloadImage {
                    docker_manifest_digest: manifest_digest.to_string(),
                },
                typ: PAYLOAD_TYPE.to_string(),
            },
            key_id: key_id.clone(),
        })
        .map_err(|e| key_err(format!("encode payload: {e}")))?;
        let signature = match &self.pair {
            Pair::Ed(k) => k.sign(&payload).as_ref().to_vec(),
            Pair::Ec(k) => k
                .sign(&SystemRandom::new(), &payload)
                .map_err(|_| key_err("ecdsa signing failed"))?
                .as_ref()
                .to_vec(),
        };
        Ok(Signature {
            payload,
            signature,
            key_id,
            algorithm: self.alg,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Payload {
    critical: Critical,
    key_id: String,
}

#[derive(Serialize, Deserialize)]
struct Critical {
    image: PayloadImage,
    #[serde(rename = "type")]
    typ: String,
}

#[derive(Serialize, Deserialize)]
struct PayloadImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// A signature over a payload naming a manifest digest. Serialized (e.g. in API bodies)
/// with `payload` and `signature` as hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signed JSON payload.
    #[serde(with = "hex_bytes")]
    pub payload: Vec<u8>,
    /// Raw signature bytes (ed25519: 64 bytes; ECDSA: ASN.1 DER).
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
    pub key_id: String,
    pub algorithm: Algorithm,
}

impl Signature {
    /// The manifest digest the payload names.
    pub fn manifest_digest(&self) -> Result<String> {
        let p: Payload = serde_json::from_slice(&self.payload)
            .map_err(|e| key_err(format!("signature payload is not valid: {e}")))?;
        if p.critical.typ != PAYLOAD_TYPE {
            return Err(key_err(format!(
                "signature payload type is {:?}, expected {PAYLOAD_TYPE:?}",
                p.critical.typ
            )));
        }
        Ok(p.critical.image.docker_manifest_digest)
    }
}

/// Reading and checking trusted keys (the type itself is plain data in `flotilla-types`).
pub trait TrustedKeyExt: Sized {
    /// Reads a `PUBLIC KEY` PEM, detecting the algorithm and computing the id.
    fn from_public_key_pem(text: &str) -> Result<Self>;
}

impl TrustedKeyExt for TrustedKey {
    fn from_public_key_pem(text: &str) -> Result<TrustedKey> {
        let (alg, _, id) = parse_public(text)?;
        Ok(TrustedKey {
            id,
            algorithm: alg,
            public_key_pem: text.to_string(),
        })
    }
}

/// Checks `s` with the trusted key `k`.
fn verify_with(k: &TrustedKey, s: &Signature) -> std::result::Result<(), String> {
    {
        let (alg, raw, id) = parse_public(&k.public_key_pem).map_err(|e| e.to_string())?;
        if id != k.id || alg != k.algorithm {
            return Err(format!(
                "trusted key {} does not match its public key (id {id}, {})",
                k.id,
                alg.as_str()
            ));
        }
        let ring_alg: &dyn sig::VerificationAlgorithm = match alg {
            Algorithm::Ed25519 => &sig::ED25519,
            Algorithm::EcdsaP256 => &sig::ECDSA_P256_SHA256_ASN1,
        };
        sig::UnparsedPublicKey::new(ring_alg, raw)
            .verify(&s.payload, &s.signature)
            .map_err(|_| format!("signature by key {} does not verify", k.id))
    }
}

fn parse_public(text: &str) -> Result<(Algorithm, Vec<u8>, String)> {
    let p = pem::parse(text).map_err(|e| key_err(format!("bad public key PEM: {e}")))?;
    if p.tag() != "PUBLIC KEY" {
        return Err(key_err(format!(
            "PEM holds a {}, expected a PUBLIC KEY",
            p.tag()
        )));
    }
    let der = p.contents();
    let (alg, raw) = if let Some(r) = der
        .strip_prefix(ED25519_SPKI_PREFIX)
        .filter(|r| r.len() == 32)
    {
        (Algorithm::Ed25519, r)
    } else if let Some(r) = der.strip_prefix(P256_SPKI_PREFIX).filter(|r| r.len() == 65) {
        (Algorithm::EcdsaP256, r)
    } else {
        return Err(key_err(
            "unsupported public key: use ed25519 or ECDSA P-256",
        ));
    };
    Ok((alg, raw.to_vec(), key_id_of(der)))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let t = String::deserialize(d)?;
        hex::decode(t).map_err(serde::de::Error::custom)
    }
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// No valid signature by a trusted key (details in `reasons`).
    #[error("image {reference} is not signed by a trusted key")]
    NotTrusted {
        reference: String,
        /// What was wrong with each signature found (empty: none found).
        reasons: Vec<String>,
    },
}

/// Verification under a [`TrustPolicy`] (the policy itself is plain data in `flotilla-types`).
pub trait TrustCheck {
    /// Checks signatures of `manifest_digest`; `reference` names the image in the error.
    fn verify_signatures(
        &self,
        reference: &str,
        manifest_digest: &str,
        signatures: &[Signature],
    ) -> std::result::Result<(), TrustError>;

    /// Checks the signatures the store holds for `manifest_digest` (attached locally or
    /// brought by [`pull`](crate::pull)). Fails closed: a lookup error refuses the image.
    fn verify(
        &self,
        store: &ImageStore,
        reference: &str,
        manifest_digest: &str,
    ) -> std::result::Result<(), TrustError>;
}

impl TrustCheck for TrustPolicy {
    fn verify_signatures(
        &self,
        reference: &str,
        manifest_digest: &str,
        signatures: &[Signature],
    ) -> std::result::Result<(), TrustError> {
        if !self.enforce {
            return Ok(());
        }
        let mut reasons = Vec::new();
        for s in signatures {
            match s.manifest_digest() {
                Ok(d) if d == manifest_digest => {}
                Ok(d) => {
                    reasons.push(format!("signature by {} is for {d}", s.key_id));
                    continue;
                }
                Err(e) => {
                    reasons.push(e.to_string());
                    continue;
                }
            }
            let Some(k) = self
                .keys
                .iter()
                .find(|k| k.id == s.key_id && k.algorithm == s.algorithm)
            else {
                reasons.push(format!("key {} is not trusted", s.key_id));
                continue;
            };
            match verify_with(k, s) {
                Ok(()) => {
                    tracing::debug!(%reference, digest = %manifest_digest, key = %k.id, "image signature verified");
                    return Ok(());
                }
                Err(e) => reasons.push(e),
            }
        }
        if signatures.is_empty() {
            reasons.push("no signature found".into());
        }
        tracing::warn!(%reference, digest = %manifest_digest, ?reasons, "image refused by the trust policy");
        Err(TrustError::NotTrusted {
            reference: reference.to_string(),
            reasons,
        })
    }

    fn verify(
        &self,
        store: &ImageStore,
        reference: &str,
        manifest_digest: &str,
    ) -> std::result::Result<(), TrustError> {
        if !self.enforce {
            return Ok(());
        }
        match signatures_for(store, manifest_digest) {
            Ok(sigs) => self.verify_signatures(reference, manifest_digest, &sigs),
            Err(e) => Err(TrustError::NotTrusted {
                reference: reference.to_string(),
                reasons: vec![format!("reading signatures failed: {e}")],
            }),
        }
    }
}

fn layer_of(s: &Signature) -> Descriptor {
    let mut ann = BTreeMap::new();
    ann.insert(ANN_SIGNATURE.to_string(), hex::encode(&s.signature));
    ann.insert(ANN_KEY_ID.to_string(), s.key_id.clone());
    ann.insert(ANN_ALGORITHM.to_string(), s.algorithm.as_str().to_string());
    Descriptor {
        media_type: SIGNATURE_PAYLOAD_TYPE.to_string(),
        digest: sha256_digest(&s.payload),
        size: s.payload.len() as u64,
        artifact_type: None,
        annotations: Some(ann),
        platform: None,
    }
}

/// Attaches a signature to an image in the store (the image's manifest must be present),
/// merging it into the image's signature artifact tagged `sha256-<hex>.sig` in `repository`.
/// Returns the signature artifact's manifest digest.
pub fn attach_signature(store: &ImageStore, repository: &str, s: &Signature) -> Result<String> {
    crate::digest::check_name(repository)?;
    let meta = Meta::open(store)?;
    let subject = s.manifest_digest()?;
    let sbytes = meta.read_blob(store, &subject)?.ok_or_else(|| {
        RegistryError::Invalid(format!(
            "image {subject} is not in the store: pull or load it before signing"
        ))
    })?;
    let sm = Manifest::parse(&sbytes, None)?;
    let tag = signature_tag(&subject);
    let previous = meta
        .load()?
        .tags
        .get(repository)
        .and_then(|t| t.get(&tag))
        .cloned();
    let mut layers = Vec::new();
    if let Some(p) = &previous {
        if let Some(b) = meta.read_blob(store, p)? {
            layers = Manifest::parse(&b, None)?.layers.unwrap_or_default();
        }
    }
    let layer = layer_of(s);
    if !layers.contains(&layer) {
        layers.push(layer);
    }
    store.put_blob(None, &s.payload[..])?;
    let (cfg, cfg_size) = store.put_blob_bytes(b"{}")?;
    let m = Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_string()),
        artifact_type: Some(SIGNATURE_ARTIFACT_TYPE.to_string()),
        config: Some(Descriptor {
            media_type: OCI_EMPTY.to_string(),
            digest: cfg,
            size: cfg_size,
            artifact_type: None,
            annotations: None,
            platform: None,
        }),
        layers: Some(layers),
        manifests: None,
        subject: Some(Descriptor {
            media_type: sm.content_type().to_string(),
            digest: subject.clone(),
            size: sbytes.len() as u64,
            artifact_type: None,
            annotations: None,
            platform: None,
        }),
        annotations: None,
    };
    let bytes = serde_json::to_vec(&m)
        .map_err(|e| RegistryError::Invalid(format!("encode signature manifest: {e}")))?;
    let (digest, size) = store.put_blob_bytes(&bytes)?;
    meta.record_artifact(store, &digest, &m, size, Some((repository, &tag)))?;
    if let Some(p) = previous.filter(|p| *p != digest) {
        meta.update(|f| f.artifacts.remove(&p))?;
        meta.unpin(&p)?;
    }
    tracing::info!(image = %subject, key = %s.key_id, signature = %digest, "signature attached");
    Ok(digest)
}

/// Every signature the store holds for a manifest digest.
pub fn signatures_for(store: &ImageStore, manifest_digest: &str) -> Result<Vec<Signature>> {
    let meta = Meta::open(store)?;
    let mut out: Vec<Signature> = Vec::new();
    for (d, a) in meta.referrers(manifest_digest)? {
        if a.artifact_type.as_deref() != Some(SIGNATURE_ARTIFACT_TYPE) {
            continue;
        }
        let Some(b) = meta.read_blob(store, &d)? else {
            continue;
        };
        let m = Manifest::parse(&b, None)?;
        for l in m.layers.iter().flatten() {
            let ann = l.annotations.clone().unwrap_or_default();
            let (Some(sig_hex), Some(key_id), Some(alg)) = (
                ann.get(ANN_SIGNATURE),
                ann.get(ANN_KEY_ID),
                ann.get(ANN_ALGORITHM).and_then(|a| parse_algorithm(a)),
            ) else {
                continue;
            };
            let (Ok(signature), Some(payload)) =
                (hex::decode(sig_hex), meta.read_blob(store, &l.digest)?)
            else {
                continue;
            };
            let s = Signature {
                payload,
                signature,
                key_id: key_id.clone(),
                algorithm: alg,
            };
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    Ok(out)
}
