//! Digests, repository names and image references.

use crate::error::{ErrorCode, RegistryError, Result};
use sha2::{Digest as _, Sha256};

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Checks a `sha256:<64 lower-case hex>` digest; returns the hex part.
pub fn check_digest(d: &str) -> Result<&str> {
    let hex = d.strip_prefix("sha256:").ok_or_else(|| {
        RegistryError::dist(
            ErrorCode::DigestInvalid,
            format!("unsupported digest {d}: only sha256 is supported"),
        )
    })?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(RegistryError::dist(
            ErrorCode::DigestInvalid,
            format!("malformed digest {d}: expected sha256:<64 lower-case hex>"),
        ));
    }
    Ok(hex)
}

/// Whether a string looks like a digest reference (`<alg>:<hex>`).
pub(crate) fn is_digest_ref(r: &str) -> bool {
    r.contains(':')
}

/// Checks a repository name (`library/busybox`): path components of lower-case
/// alphanumerics separated by `.`, `_`, `__` or `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()
                    .first()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
                && c.as_bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
        });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::dist(
            ErrorCode::NameInvalid,
            format!("invalid repository name {name}: use lower-case path components like library/busybox"),
        ))
    }
}

/// Checks a tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`).
pub fn check_tag(tag: &str) -> Result<()> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::dist(
            ErrorCode::ManifestInvalid,
            format!("invalid tag {tag}: use letters, digits, '.', '_' and '-'"),
        ))
    }
}

/// A parsed `name[:tag][@sha256:…]` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// Repository name, e.g. `library/busybox`.
    pub name: String,
    /// Tag; `latest` when neither a tag nor a digest is given.
    pub tag: Option<String>,
    /// Pinned manifest digest.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `name[:tag][@sha256:…]`.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let bad = || RegistryError::InvalidReference(s.to_string());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                check_digest(d).map_err(|_| bad())?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (rest, None),
        };
        check_name(name).map_err(|_| bad())?;
        if let Some(t) = &tag {
            check_tag(t).map_err(|_| bad())?;
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(ImageRef {
            name: name.to_string(),
            tag,
            digest,
        })
    }

    /// The reference to ask a registry for: the digest when pinned, else the tag.
    pub fn remote_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `name:tag`, when tagged.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name))
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The tag under which signatures of `digest` are stored (`sha256-<hex>.sig`).
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// The manifest digest of a pinned `name:tag@sha256:…` (or a bare digest).
pub fn digest_of(image: &str) -> Option<&str> {
    if image.starts_with("sha256:") {
        return Some(image);
    }
    image.find("@sha256:").map(|i| &image[i + 1..])
}

/// Digests of the images of tasks that have not ended.
pub fn task_images<'a>(
    tasks: impl IntoIterator<Item = &'a flotilla_types::Task>,
) -> std::collections::HashSet<String> {
    tasks
        .into_iter()
        .filter(|t| !t.status.state.is_terminal())
        .filter_map(|t| digest_of(&t.spec.container.image).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_of_pinned_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(digest_of(&format!("web:1@{d}")), Some(d.as_str()));
        assert_eq!(digest_of(&d), Some(d.as_str()));
        assert_eq!(digest_of("web:1"), None);
    }

    #[test]
    fn parses_references() -> Result<()> {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            ImageRef::parse("library/busybox")?,
            ImageRef {
                name: "library/busybox".into(),
                tag: Some("latest".into()),
                digest: None
            }
        );
        let r = ImageRef::parse(&format!("busybox:1.36@{d}"))?;
        assert_eq!(r.tag.as_deref(), Some("1.36"));
        assert_eq!(r.remote_reference(), d);
        let r = ImageRef::parse(&format!("busybox@{d}"))?;
        assert_eq!(r.tag, None);
        assert!(ImageRef::parse("Busybox").is_err());
        assert!(ImageRef::parse("busybox@sha256:abc").is_err());
        assert!(check_name("a/b-c/d.e_f").is_ok());
        assert!(check_name("a//b").is_err());
        assert!(check_name("../x").is_err());
        assert_eq!(signature_tag(&d), format!("sha256-{}.sig", "a".repeat(64)));
        Ok(())
    }
}
