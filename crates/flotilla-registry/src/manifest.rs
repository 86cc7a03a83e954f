//! A lenient model of OCI / docker v2 manifests and indexes, enough to find what they reference.

use crate::digest::check_digest;
use crate::error::{ErrorCode, RegistryError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Largest manifest accepted.
pub const MAX_MANIFEST: usize = 4 << 20;

/// The manifest media types a client accepts.
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

/// An image manifest, artifact manifest or image index.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// What a manifest describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestKind {
    /// A runnable image (image config + layers): recorded in the [`ImageStore`] index.
    ///
    /// [`ImageStore`]: flotilla_runtime::ImageStore
    Image,
    /// Anything else with config + layers (signatures, attestations…).
    Artifact,
    /// An image index / manifest list.
    Index,
}

fn invalid(msg: impl Into<String>) -> RegistryError {
    RegistryError::dist(ErrorCode::ManifestInvalid, msg)
}

impl Manifest {
    /// Parses and validates a manifest; `content_type` is the request's Content-Type, if any.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest> {
        let mut m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
        if m.schema_version != 2 {
            return Err(invalid(format!(
                "unsupported schemaVersion {}: push an OCI or docker v2 schema2 manifest",
                m.schema_version
            )));
        }
        let ct = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| c.starts_with("application/vnd."));
        if m.media_type.is_none() {
            m.media_type = ct.map(str::to_string);
        }
        if let (Some(a), Some(b)) = (&m.media_type, ct) {
            if a != b {
                return Err(invalid(format!(
                    "content type {b} differs from the manifest's mediaType {a}"
                )));
            }
        }
        match m.kind() {
            ManifestKind::Index => {
                if m.manifests.is_none() {
                    return Err(invalid("an index needs a manifests list"));
                }
            }
            _ => {
                if m.config.is_none() || m.layers.is_none() {
                    return Err(invalid("a manifest needs config and layers"));
                }
            }
        }
        for d in m.references().chain(m.subject.iter()) {
            check_digest(&d.digest)
                .map_err(|_| invalid(format!("descriptor digest {} is malformed", d.digest)))?;
        }
        Ok(m)
    }

    /// Image, artifact or index.
    pub fn kind(&self) -> ManifestKind {
        let mt = self.media_type.as_deref().unwrap_or("");
        if mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST || self.manifests.is_some() {
            return ManifestKind::Index;
        }
        let cfg = self.config.as_ref().map(|c| c.media_type.as_str());
        if self.artifact_type.is_none() && matches!(cfg, Some(OCI_CONFIG) | Some(DOCKER_CONFIG)) {
            ManifestKind::Image
        } else {
            ManifestKind::Artifact
        }
    }

    /// The media type to serve it with.
    pub fn content_type(&self) -> &str {
        self.media_type.as_deref().unwrap_or(match self.kind() {
            ManifestKind::Index => OCI_INDEX,
            _ => OCI_MANIFEST,
        })
    }

    /// Blobs (config, layers) referenced by a manifest.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter().flatten())
    }

    /// Child manifests of an index.
    pub fn children(&self) -> impl Iterator<Item = &Descriptor> {
        self.manifests.iter().flatten()
    }

    /// Everything a manifest references (not its subject).
    pub fn references(&self) -> impl Iterator<Item = &Descriptor> {
        self.blobs().chain(self.children())
    }

    /// The artifact type used by the referrers API.
    pub fn referrer_type(&self) -> Option<String> {
        self.artifact_type
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() -> Result<()> {
        let d = format!("sha256:{}", "b".repeat(64));
        let img = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{d}","size":1}},"layers":[]}}"#
        );
        assert_eq!(
            Manifest::parse(img.as_bytes(), None)?.kind(),
            ManifestKind::Image
        );
        let art = format!(
            r#"{{"schemaVersion":2,"artifactType":"x/y","config":{{"mediaType":"{OCI_EMPTY}","digest":"{d}","size":2}},"layers":[]}}"#
        );
        assert_eq!(
            Manifest::parse(art.as_bytes(), None)?.kind(),
            ManifestKind::Artifact
        );
        assert!(Manifest::parse(b"{", None).is_err());
        assert!(Manifest::parse(br#"{"schemaVersion":1}"#, None).is_err());
        Ok(())
    }
}
