//! Push and pull between a registry and an OCI image-layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`), as `skopeo copy oci:DIR:TAG` reads and
//! writes them. Every blob is verified against its digest; blobs already on the other side
//! do not move.

use crate::client::RegistryClient;
use crate::digest::{check_digest, sha256_digest, ImageRef};
use crate::error::{ErrorCode, IoContext, RegistryError, Result};
use crate::manifest::{Manifest, ManifestKind, OCI_INDEX};
use crate::transfer::{push_tree, Progress, PushSource};
use std::path::{Path, PathBuf};

/// Annotation naming a manifest's tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    Ok(dir.join("blobs/sha256").join(check_digest(digest)?))
}

fn invalid(m: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(m.into())
}

fn read_index(dir: &Path) -> Result<serde_json::Value> {
    let p = dir.join("index.json");
    let b = std::fs::read(&p).ctx(|| {
        format!(
            "read {} (is {} an OCI image layout directory?)",
            p.display(),
            dir.display()
        )
    })?;
    serde_json::from_slice(&b).map_err(|e| invalid(format!("{}: {e}", p.display())))
}

/// The manifest descriptor of `tag` in a layout's `index.json` (the only one when `tag` is
/// `None`): `(digest, media type)`.
pub fn layout_manifest(dir: &Path, tag: Option<&str>) -> Result<(String, Option<String>)> {
    let idx = read_index(dir)?;
    let entries = idx["manifests"].as_array().cloned().unwrap_or_default();
    let named = |e: &serde_json::Value| e["annotations"][REF_NAME].as_str().map(str::to_string);
    let pick = match tag {
        Some(t) => entries.iter().find(|e| named(e).as_deref() == Some(t)),
        None if entries.len() == 1 => entries.first(),
        None => None,
    };
    let Some(e) = pick else {
        let tags: Vec<String> = entries.iter().filter_map(named).collect();
        return Err(invalid(match tag {
            Some(t) => format!(
                "{} has no image tagged {t:?} (tags: {})",
                dir.display(),
                tags.join(", ")
            ),
            None => format!(
                "{} holds {} images: name one as DIR:TAG (tags: {})",
                dir.display(),
                entries.len(),
                tags.join(", ")
            ),
        }));
    };
    let digest = e["digest"]
        .as_str()
        .ok_or_else(|| invalid("index.json entry without a digest"))?
        .to_string();
    check_digest(&digest)?;
    Ok((digest, e["mediaType"].as_str().map(str::to_string)))
}

fn read_verified(dir: &Path, digest: &str) -> Result<Vec<u8>> {
    let p = blob_path(dir, digest)?;
    let b = std::fs::read(&p).ctx(|| format!("read {}", p.display()))?;
    let got = sha256_digest(&b);
    if got != digest {
        return Err(RegistryError::dist(
            ErrorCode::DigestInvalid,
            format!("{} has digest {got} (the layout is corrupt)", p.display()),
        ));
    }
    Ok(b)
}

/// Pushes the image tagged `tag` in the layout `dir` to `target` (`name[:tag]`).
/// Returns the manifest digest.
pub async fn push_layout(
    client: &RegistryClient,
    dir: &Path,
    tag: Option<&str>,
    target: &str,
    mut progress: impl FnMut(Progress),
) -> Result<String> {
    let r = ImageRef::parse(target)?;
    let (digest, _) = layout_manifest(dir, tag)?;
    progress(Progress::Resolved {
        reference: r.to_string(),
        digest: digest.clone(),
    });
    let to = r.tag.clone().unwrap_or_else(|| digest.clone());
    push_tree(
        client,
        &LayoutSource(dir),
        &r.name,
        &digest,
        &to,
        &mut progress,
    )
    .await?;
    progress(Progress::Done {
        digest: digest.clone(),
    });
    Ok(digest)
}

/// An OCI layout directory as the source of a push.
struct LayoutSource<'a>(&'a Path);

impl PushSource for LayoutSource<'_> {
    fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        read_verified(self.0, digest)
    }

    fn blob_file(&self, digest: &str) -> Result<PathBuf> {
        let path = blob_path(self.0, digest)?;
        if !path.is_file() {
            return Err(invalid(format!(
                "{} lacks blob {digest} (the layout is incomplete)",
                self.0.display()
            )));
        }
        Ok(path)
    }
}

/// Pulls `reference` (`name[:tag][@digest]`) into the layout `dir` (created when missing),
/// recorded in `index.json` under `tag` (default: the reference's tag). For an image index,
/// the linux/amd64 image (else the first) is pulled. Returns the manifest digest.
pub async fn pull_layout(
    client: &RegistryClient,
    reference: &str,
    dir: &Path,
    tag: Option<&str>,
    mut progress: impl FnMut(Progress),
) -> Result<String> {
    let r = ImageRef::parse(reference)?;
    let unknown = || {
        RegistryError::dist(
            ErrorCode::ManifestUnknown,
            format!("image {r} is not in the registry (push it or check the name and tag)"),
        )
    };
    let mut f = client
        .get_manifest(&r.name, r.remote_reference())
        .await?
        .ok_or_else(unknown)?;
    let mut m = Manifest::parse(&f.bytes, f.content_type.as_deref())?;
    if m.kind() == ManifestKind::Index {
        let child = crate::transfer::pick_platform(&m)
            .ok_or_else(|| invalid(format!("image index {} lists no manifest", f.digest)))?;
        f = client
            .get_manifest(&r.name, &child)
            .await?
            .ok_or_else(unknown)?;
        m = Manifest::parse(&f.bytes, f.content_type.as_deref())?;
    }
    progress(Progress::Resolved {
        reference: r.to_string(),
        digest: f.digest.clone(),
    });
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).ctx(|| format!("create {}", blobs.display()))?;
    for b in m.blobs() {
        let dest = blob_path(dir, &b.digest)?;
        if std::fs::metadata(&dest).is_ok_and(|md| md.len() == b.size) {
            progress(Progress::BlobPresent {
                digest: b.digest.clone(),
                size: b.size,
            });
            continue;
        }
        progress(Progress::BlobStarted {
            digest: b.digest.clone(),
            size: b.size,
        });
        let tmp = blobs.join(format!(".{}.partial", check_digest(&b.digest)?));
        let res = client.download_blob(&r.name, &b.digest, &tmp).await;
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if n != b.size {
            let _ = std::fs::remove_file(&tmp);
            return Err(RegistryError::dist(
                ErrorCode::SizeInvalid,
                format!(
                    "blob {} has {n} bytes, the manifest says {}",
                    b.digest, b.size
                ),
            ));
        }
        std::fs::rename(&tmp, &dest).ctx(|| format!("write {}", dest.display()))?;
        progress(Progress::BlobDone {
            digest: b.digest.clone(),
            size: n,
        });
    }
    let mp = blob_path(dir, &f.digest)?;
    std::fs::write(&mp, &f.bytes).ctx(|| format!("write {}", mp.display()))?;
    let name = tag.map(str::to_string).or(r.tag.clone());
    write_index(dir, &f.digest, m.content_type(), f.bytes.len(), name)?;
    progress(Progress::Done {
        digest: f.digest.clone(),
    });
    Ok(f.digest)
}

/// Adds (or replaces, by tag) a manifest entry in `index.json` and writes `oci-layout`.
fn write_index(
    dir: &Path,
    digest: &str,
    media_type: &str,
    size: usize,
    tag: Option<String>,
) -> Result<()> {
    let mut idx = match read_index(dir) {
        Ok(v) => v,
        Err(_) => {
            serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] })
        }
    };
    let mut entries = idx["manifests"].as_array().cloned().unwrap_or_default();
    entries.retain(|e| match &tag {
        Some(t) => e["annotations"][REF_NAME].as_str() != Some(t.as_str()),
        None => e["digest"].as_str() != Some(digest),
    });
    let mut desc = serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size });
    if let Some(t) = tag {
        desc["annotations"] = serde_json::json!({ REF_NAME: t });
    }
    entries.push(desc);
    idx["manifests"] = serde_json::Value::Array(entries);
    let p = dir.join("index.json");
    let data = serde_json::to_vec(&idx).map_err(|e| invalid(format!("encode index: {e}")))?;
    std::fs::write(&p, data).ctx(|| format!("write {}", p.display()))?;
    let l = dir.join("oci-layout");
    std::fs::write(&l, r#"{"imageLayoutVersion":"1.0.0"}"#).ctx(|| format!("write {}", l.display()))
}
