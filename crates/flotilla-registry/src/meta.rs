//! Registry metadata kept beside the image store, under `<store-root>/registry/`.
//!
//! Runnable images live in the [`ImageStore`] index (`name:tag` → manifest digest) so the
//! runtime, `flotilla image ls` and the registry see one truth. Everything else a registry
//! holds — signatures and other OCI artifacts, image indexes — is recorded here:
//! - `meta.json`: artifact tags per repository and every artifact manifest with its subject
//!   (the referrers index) and the blobs it references;
//! - `pins/<hex>`: hard links to artifact blobs, so the store's own clean-up on
//!   `ImageStore::remove` (which deletes every blob its index does not reach) cannot lose
//!   them; reads fall back to the pin;
//! - `tmp/`: staging.

use crate::digest::check_digest;
use crate::error::{IoContext, RegistryError, Result};
use crate::manifest::Manifest;
use flotilla_runtime::{ImageStore, RuntimeError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Serialises read-modify-write of `meta.json` within the process.
static LOCK: Mutex<()> = Mutex::new(());
static SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Default, Serialize, Deserialize)]
pub(crate) struct MetaFile {
    /// repository → tag → manifest digest, for manifests that are not runnable images.
    #[serde(default)]
    pub tags: BTreeMap<String, BTreeMap<String, String>>,
    /// Artifact (and index) manifests by digest.
    #[serde(default)]
    pub artifacts: BTreeMap<String, ArtifactEntry>,
}

/// One artifact or index manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ArtifactEntry {
    pub media_type: String,
    pub size: u64,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Blobs and child manifests it references.
    #[serde(default)]
    pub references: Vec<String>,
}

/// Handle on `<store-root>/registry`.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    dir: PathBuf,
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

impl Meta {
    /// Opens (creating) the metadata directory of a store.
    pub fn open(store: &ImageStore) -> Result<Meta> {
        let dir = store.root().join("registry");
        for d in ["pins", "tmp"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).ctx(|| format!("create {}", p.display()))?;
        }
        Ok(Meta { dir })
    }

    /// Deletes staging leftovers (of a crash) older than an hour.
    pub fn clean_tmp(&self) {
        let now = std::time::SystemTime::now();
        let Ok(rd) = fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default().as_secs() > 3600)
                .unwrap_or(false);
            if old {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
    }

    /// A fresh staging path.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    pub fn load(&self) -> Result<MetaFile> {
        let p = self.dir.join("meta.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                RegistryError::Invalid(format!(
                    "{}: {e} (the registry metadata is corrupt; restore or delete it)",
                    p.display()
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(MetaFile::default()),
            Err(e) => Err(RegistryError::Io {
                context: format!("read {}", p.display()),
                source: e,
            }),
        }
    }

    fn save(&self, m: &MetaFile) -> Result<()> {
        let p = self.dir.join("meta.json");
        let tmp = self.tmp_path("meta");
        let data = serde_json::to_vec_pretty(m)
            .map_err(|e| RegistryError::Invalid(format!("encode registry metadata: {e}")))?;
        fs::write(&tmp, data).ctx(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &p).ctx(|| format!("write {}", p.display()))
    }

    /// Locked read-modify-write.
    pub fn update<T>(&self, f: impl FnOnce(&mut MetaFile) -> T) -> Result<T> {
        let _g = lock();
        let mut m = self.load()?;
        let out = f(&mut m);
        self.save(&m)?;
        Ok(out)
    }

    pub fn pin_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("pins").join(check_digest(digest)?))
    }

    /// The file holding a blob: the store's, else a pin.
    pub fn blob_file(&self, store: &ImageStore, digest: &str) -> Option<PathBuf> {
        if let Ok(p) = store.blob_path(digest) {
            if p.is_file() {
                return Some(p);
            }
        }
        self.pin_path(digest).ok().filter(|p| p.is_file())
    }

    pub fn has_blob(&self, store: &ImageStore, digest: &str) -> bool {
        self.blob_file(store, digest).is_some()
    }

    /// Reads a blob, `None` when absent.
    pub fn read_blob(&self, store: &ImageStore, digest: &str) -> Result<Option<Vec<u8>>> {
        match self.blob_file(store, digest) {
            Some(p) => match fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(RegistryError::Io {
                    context: format!("read {}", p.display()),
                    source: e,
                }),
            },
            None => Ok(None),
        }
    }

    /// Hard-links a stored blob into `pins/` (copying across file systems).
    fn pin(&self, store: &ImageStore, digest: &str) -> Result<()> {
        let pin = self.pin_path(digest)?;
        if pin.is_file() {
            return Ok(());
        }
        let src = store.blob_path(digest)?;
        if !src.is_file() {
            return Err(RegistryError::Store(RuntimeError::ImageNotFound(format!(
                "blob {digest}"
            ))));
        }
        let tmp = self.tmp_path("pin");
        if fs::hard_link(&src, &tmp).is_err() {
            fs::copy(&src, &tmp).ctx(|| format!("copy blob {digest}"))?;
        }
        fs::rename(&tmp, &pin).ctx(|| format!("pin blob {digest}"))
    }

    /// Records an artifact or index manifest (already stored as a blob), optionally tagged.
    pub fn record_artifact(
        &self,
        store: &ImageStore,
        digest: &str,
        m: &Manifest,
        size: u64,
        tag: Option<(&str, &str)>,
    ) -> Result<()> {
        let references: Vec<String> = m.references().map(|d| d.digest.clone()).collect();
        self.pin(store, digest)?;
        for r in m.blobs() {
            if store.has_blob(&r.digest) {
                self.pin(store, &r.digest)?;
            }
        }
        let entry = ArtifactEntry {
            media_type: m.content_type().to_string(),
            size,
            artifact_type: m.referrer_type(),
            subject: m.subject.as_ref().map(|s| s.digest.clone()),
            annotations: m.annotations.clone(),
            references,
        };
        self.update(|f| {
            f.artifacts.insert(digest.to_string(), entry);
            if let Some((repo, t)) = tag {
                f.tags
                    .entry(repo.to_string())
                    .or_default()
                    .insert(t.to_string(), digest.to_string());
            }
        })
    }

    /// Records a runnable image in the store index, tagged `reference` (`name:tag`) or
    /// untagged. Uses `ImageStore::load_archive` on a throw-away OCI layout whose blobs are
    /// symlinks to the store's own (already present, so nothing is copied).
    pub fn tag_image(
        &self,
        store: &ImageStore,
        reference: Option<&str>,
        digest: &str,
    ) -> Result<()> {
        let m = store.manifest(digest)?;
        let mut digests = vec![digest.to_string(), m.config().digest().to_string()];
        digests.extend(m.layers().iter().map(|l| l.digest().to_string()));
        let size = fs::metadata(store.blob_path(digest)?)
            .ctx(|| format!("stat {digest}"))?
            .len();
        let layout = self.tmp_path("tag");
        let res = (|| -> Result<()> {
            let blobs = layout.join("blobs/sha256");
            fs::create_dir_all(&blobs).ctx(|| format!("create {}", blobs.display()))?;
            for d in &digests {
                let link = blobs.join(check_digest(d)?);
                if !link.exists() {
                    std::os::unix::fs::symlink(store.blob_path(d)?, &link)
                        .ctx(|| format!("link {}", link.display()))?;
                }
            }
            let mut desc = serde_json::json!({
                "mediaType": crate::manifest::OCI_MANIFEST,
                "digest": digest,
                "size": size,
            });
            if let Some(r) = reference {
                desc["annotations"] = serde_json::json!({ "io.containerd.image.name": r });
            }
            let index = serde_json::json!({ "schemaVersion": 2, "manifests": [desc] });
            fs::write(layout.join("index.json"), index.to_string()).ctx(|| "write index".into())?;
            fs::write(
                layout.join("oci-layout"),
                r#"{"imageLayoutVersion":"1.0.0"}"#,
            )
            .ctx(|| "write oci-layout".into())?;
            store.load_archive(&layout)?;
            Ok(())
        })();
        let _ = fs::remove_dir_all(&layout);
        res?;
        if let Some((repo, tag)) = reference.and_then(|r| r.rsplit_once(':')) {
            self.update(|f| {
                if let Some(t) = f.tags.get_mut(repo) {
                    t.remove(tag);
                }
            })?;
        }
        Ok(())
    }

    /// The manifest a `repo:tag` points at: artifact tags first, then the store index.
    pub fn resolve_tag(&self, store: &ImageStore, repo: &str, tag: &str) -> Result<Option<String>> {
        if let Some(d) = self.load()?.tags.get(repo).and_then(|t| t.get(tag)) {
            return Ok(Some(d.clone()));
        }
        match store.resolve(&format!("{repo}:{tag}")) {
            Ok(d) => Ok(Some(d)),
            Err(RuntimeError::ImageNotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every tag of a repository, sorted.
    pub fn tags(&self, store: &ImageStore, repo: &str) -> Result<Vec<String>> {
        let mut out: BTreeSet<String> = self
            .load()?
            .tags
            .get(repo)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        for (r, t) in store_refs(store)? {
            if r == repo {
                out.insert(t);
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Artifacts whose subject is `digest`.
    pub fn referrers(&self, digest: &str) -> Result<Vec<(String, ArtifactEntry)>> {
        Ok(self
            .load()?
            .artifacts
            .into_iter()
            .filter(|(_, a)| a.subject.as_deref() == Some(digest))
            .collect())
    }

    /// Deletes a tag. Returns whether it existed.
    pub fn delete_tag(&self, store: &ImageStore, repo: &str, tag: &str) -> Result<bool> {
        let removed =
            self.update(|f| f.tags.get_mut(repo).and_then(|t| t.remove(tag)).is_some())?;
        if removed {
            return Ok(true);
        }
        let r = format!("{repo}:{tag}");
        if store_refs(store)?
            .iter()
            .any(|(n, t)| *n == repo && t == tag)
        {
            self.store_remove(store, &r)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Deletes a manifest and every tag pointing at it. Returns whether it existed.
    pub fn delete_manifest(&self, store: &ImageStore, digest: &str) -> Result<bool> {
        let was_artifact = self.update(|f| {
            for t in f.tags.values_mut() {
                t.retain(|_, d| d != digest);
            }
            f.tags.retain(|_, t| !t.is_empty());
            f.artifacts.remove(digest).is_some()
        })?;
        if was_artifact {
            let _ = fs::remove_file(self.pin_path(digest)?);
        }
        let in_store = store.resolve(digest).is_ok();
        if in_store {
            self.store_remove(store, digest)?;
        }
        Ok(was_artifact || in_store)
    }

    /// `ImageStore::remove` without its implicit clean-up of blobs: that clean-up deletes
    /// every blob the store index does not reach — blobs of a push in flight, of artifacts,
    /// of manifests kept by tasks. Every blob is hard-linked aside first and put back after;
    /// [`collect_garbage`](crate::collect_garbage) decides what really goes.
    pub fn store_remove(&self, store: &ImageStore, reference: &str) -> Result<Vec<String>> {
        let blobs = store.root().join("blobs/sha256");
        let hold = self.tmp_path("hold");
        fs::create_dir_all(&hold).ctx(|| format!("create {}", hold.display()))?;
        for (d, p) in list_blob_dir(&blobs)? {
            let hex = check_digest(&d)?;
            let _ = fs::hard_link(&p, hold.join(hex));
        }
        let res = store.remove(reference);
        for (d, p) in list_blob_dir(&hold)? {
            let dst = blobs.join(check_digest(&d)?);
            if !dst.exists() {
                fs::rename(&p, &dst).ctx(|| format!("restore blob {d}"))?;
            }
        }
        let _ = fs::remove_dir_all(&hold);
        Ok(res?)
    }

    /// Removes a pin (garbage collection).
    pub fn unpin(&self, digest: &str) -> Result<bool> {
        let p = self.pin_path(digest)?;
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RegistryError::Io {
                context: format!("remove {}", p.display()),
                source: e,
            }),
        }
    }

    /// Every pinned digest.
    pub fn pins(&self) -> Result<Vec<(String, PathBuf)>> {
        list_blob_dir(&self.dir.join("pins"))
    }
}

/// `(digest, path)` of every file in a `sha256` blob directory.
pub(crate) fn list_blob_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)
        .ctx(|| format!("list {}", dir.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let d = format!("sha256:{name}");
        if check_digest(&d).is_ok() {
            out.push((d, e.path()));
        }
    }
    Ok(out)
}

/// `(repository, tag)` of every tagged image in the store index.
pub(crate) fn store_refs(store: &ImageStore) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for s in store.list()? {
        for r in s.refs {
            if let Some((n, t)) = r.rsplit_once(':') {
                if !t.contains('/') {
                    out.push((n.to_string(), t.to_string()));
                }
            }
        }
    }
    Ok(out)
}
