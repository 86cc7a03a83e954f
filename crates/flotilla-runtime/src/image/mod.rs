//! The node's content store: sha256-addressed blobs, a `name:tag` index, unpacked layers.
//!
//! Layout under `<root>/images`:
//! - `blobs/sha256/<hex>` — manifests, configs and layer tarballs, verified on write;
//! - `index.json` — `{"refs": {"name:tag": "sha256:<manifest>"}, "untagged": [...]}`;
//! - `layers/<diffid-hex>` or `layers/<diffid-hex>.u<host-start>` — each layer unpacked once
//!   (ownership shifted into a user-namespace range when the suffix is present) and shared
//!   read-only by every container's overlay;
//! - `tmp/` — staging for atomic renames.

pub mod layer;

use crate::config::IdRange;
use crate::error::{IoContext, Result, RuntimeError};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, ImageConfiguration, ImageConfigurationBuilder,
    ImageIndex, ImageManifest, ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Image config fields set when importing a root filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfigInput {
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// `STOPSIGNAL`: a signal name or number.
    pub stop_signal: Option<String>,
}

/// One image in `list()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// Manifest digest.
    pub digest: String,
    /// `name:tag` references pointing at it.
    pub refs: Vec<String>,
    /// Sum of the layer blob sizes.
    pub size: u64,
    pub layers: usize,
}

/// `inspect()` output.
#[derive(Clone, Debug, Serialize)]
pub struct ImageInspect {
    pub summary: ImageSummary,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    refs: BTreeMap<String, String>,
    #[serde(default)]
    untagged: BTreeSet<String>,
}

const GZIP_TAR: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Normalises an image reference: `busybox` → `busybox:latest`; digests pass through.
pub fn normalize_ref(r: &str) -> String {
    if r.starts_with("sha256:") {
        return r.to_string();
    }
    let name_part = r.rsplit('/').next().unwrap_or(r);
    if name_part.contains(':') || r.contains('@') {
        r.to_string()
    } else {
        format!("{r}:latest")
    }
}

fn valid_digest(d: &str) -> Result<&str> {
    let hex = d.strip_prefix("sha256:").ok_or_else(|| {
        RuntimeError::Invalid(format!("unsupported digest {d}: only sha256 is supported"))
    })?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(RuntimeError::Invalid(format!("malformed digest {d}")));
    }
    Ok(hex)
}

fn oci_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::BadArchive(e.to_string())
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Creates a new file of the store, mode 0600 (set on the descriptor, whatever the umask).
pub(crate) fn create_private(p: &Path) -> Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .ctx(|| format!("create {}", p.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod {}", p.display()))?;
    Ok(f)
}

/// Largest JSON document (index, manifest, config) read from an image archive.
const MAX_ARCHIVE_JSON: u64 = 32 << 20;

/// Where `load_dir` reads an image layout or `docker save` tree from.
enum Layout {
    /// A directory the caller vouches for: its symlinks are followed.
    Trusted(PathBuf),
    /// An unpacked archive: read through [`layer::ConfinedDir`] (symlinks resolved inside it,
    /// regular files only, JSON documents size-capped).
    Archive(layer::ConfinedDir),
}

impl Layout {
    fn path(&self) -> &Path {
        match self {
            Layout::Trusted(p) => p,
            Layout::Archive(c) => c.path(),
        }
    }

    fn is_file(&self, rel: &str) -> Result<bool> {
        match self {
            Layout::Trusted(p) => Ok(p.join(rel).is_file()),
            Layout::Archive(c) => match c.open_file(Path::new(rel)) {
                Ok(f) => Ok(f.is_some()),
                Err(RuntimeError::BadArchive(_)) => Ok(false),
                Err(e) => Err(e),
            },
        }
    }

    /// Whether `rel` (one component) is a directory; a symlink is not followed in an archive.
    fn is_dir(&self, rel: &str) -> bool {
        match self {
            Layout::Trusted(p) => p.join(rel).is_dir(),
            Layout::Archive(c) => {
                fs::symlink_metadata(c.path().join(rel)).is_ok_and(|m| m.is_dir())
            }
        }
    }

    fn open(&self, rel: &Path) -> Result<File> {
        match self {
            Layout::Trusted(p) => {
                let p = p.join(rel);
                File::open(&p).ctx(|| format!("open {}", p.display()))
            }
            Layout::Archive(c) => c.open_file(rel)?.ok_or_else(|| {
                RuntimeError::BadArchive(format!("{} is missing from the archive", rel.display()))
            }),
        }
    }

    fn read(&self, rel: impl AsRef<Path>) -> Result<Vec<u8>> {
        let rel = rel.as_ref();
        match self {
            Layout::Trusted(p) => {
                let p = p.join(rel);
                fs::read(&p).ctx(|| format!("read {}", p.display()))
            }
            Layout::Archive(c) => c.read(rel, MAX_ARCHIVE_JSON)?.ok_or_else(|| {
                RuntimeError::BadArchive(format!("{} is missing from the archive", rel.display()))
            }),
        }
    }
}

/// The content store.
pub struct ImageStore {
    root: PathBuf,
    lock: Mutex<()>,
}

impl ImageStore {
    /// Opens (creating) the store under `root` (e.g. `<runtime-root>/images`).
    ///
    /// Every directory is made 0700 and every file the store writes is 0600: images may hold
    /// secrets, and unpacked layers hold set-uid files owned by a user-namespace root, which
    /// no local user may run. (Overlayfs reads layers with the mounting root's credentials.)
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore> {
        use std::os::unix::fs::PermissionsExt;
        let root = root.into();
        for d in ["", "blobs", "blobs/sha256", "layers", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).ctx(|| format!("create {}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
                .ctx(|| format!("chmod {}", p.display()))?;
        }
        // Leftovers of an interrupted import.
        if let Ok(rd) = fs::read_dir(root.join("tmp")) {
            for e in rd.flatten() {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
        Ok(ImageStore {
            root,
            lock: Mutex::new(()),
        })
    }

    /// Root directory of the store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_path(&self, tag: &str) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{tag}-{}-{n}", std::process::id()))
    }

    /// Where a blob lives (whether or not it exists).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(valid_digest(digest)?))
    }

    /// Whether the store holds a blob.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Reads a whole blob.
    pub fn get_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => RuntimeError::ImageNotFound(format!("blob {digest}")),
            _ => RuntimeError::Io {
                context: format!("read {}", p.display()),
                source: e,
            },
        })
    }

    /// Stores a blob, verifying it against `expected` when given. Returns `(digest, size)`.
    pub fn put_blob(&self, expected: Option<&str>, reader: impl Read) -> Result<(String, u64)> {
        if let Some(e) = expected {
            valid_digest(e)?;
            if self.has_blob(e) {
                // Already present (and verified when written); consume nothing.
                let size = fs::metadata(self.blob_path(e)?)
                    .map(|m| m.len())
                    .unwrap_or(0);
                return Ok((e.to_string(), size));
            }
        }
        let tmp = self.tmp_path("blob");
        let mut r = layer::HashingReader::new(reader);
        {
            let mut f = create_private(&tmp)?;
            io::copy(&mut r, &mut f).ctx(|| "write blob".into())?;
            f.sync_all().ctx(|| "sync blob".into())?;
        }
        let (digest, size) = r.finish();
        if let Some(e) = expected {
            if e != digest {
                let _ = fs::remove_file(&tmp);
                return Err(RuntimeError::DigestMismatch {
                    expected: e.into(),
                    actual: digest,
                });
            }
        }
        let dst = self.blob_path(&digest)?;
        fs::rename(&tmp, &dst).ctx(|| format!("store blob {digest}"))?;
        Ok((digest, size))
    }

    /// Stores bytes as a blob.
    pub fn put_blob_bytes(&self, data: &[u8]) -> Result<(String, u64)> {
        self.put_blob(None, data)
    }

    fn read_index(&self) -> Result<Index> {
        let p = self.root.join("index.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| RuntimeError::Json {
                path: p,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(RuntimeError::Io {
                context: format!("read {}", p.display()),
                source: e,
            }),
        }
    }

    fn write_index(&self, idx: &Index) -> Result<()> {
        let p = self.root.join("index.json");
        let tmp = self.tmp_path("index");
        let data = serde_json::to_vec_pretty(idx).map_err(|e| RuntimeError::Json {
            path: p.clone(),
            message: e.to_string(),
        })?;
        create_private(&tmp)?
            .write_all(&data)
            .ctx(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &p).ctx(|| format!("write {}", p.display()))
    }

    fn tag(&self, reference: Option<&str>, digest: &str) -> Result<()> {
        let _g = self
            .lock
            .lock()
            .map_err(|_| RuntimeError::Invalid("image store lock poisoned".into()))?;
        let mut idx = self.read_index()?;
        match reference {
            Some(r) => {
                idx.refs.insert(normalize_ref(r), digest.to_string());
                idx.untagged.remove(digest);
            }
            None => {
                if !idx.refs.values().any(|d| d == digest) {
                    idx.untagged.insert(digest.to_string());
                }
            }
        }
        self.write_index(&idx)
    }

    /// Resolves `name[:tag]` or a manifest digest (or a unique digest prefix of ≥ 12 hex chars).
    pub fn resolve(&self, reference: &str) -> Result<String> {
        let idx = self.read_index()?;
        if reference.starts_with("sha256:") && reference.len() == 71 {
            if self.has_blob(reference)
                && (idx.refs.values().any(|d| d == reference) || idx.untagged.contains(reference))
            {
                return Ok(reference.to_string());
            }
            return Err(RuntimeError::ImageNotFound(reference.into()));
        }
        if let Some(d) = idx.refs.get(&normalize_ref(reference)) {
            return Ok(d.clone());
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.len() >= 12 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let all: BTreeSet<&String> = idx.refs.values().chain(idx.untagged.iter()).collect();
            let hits: Vec<&&String> = all.iter().filter(|d| d[7..].starts_with(prefix)).collect();
            if hits.len() == 1 {
                return Ok((*hits[0]).clone());
            }
        }
        Err(RuntimeError::ImageNotFound(reference.into()))
    }

    /// The manifest stored under a digest.
    pub fn manifest(&self, digest: &str) -> Result<ImageManifest> {
        let b = self.get_blob(digest)?;
        serde_json::from_slice(&b)
            .map_err(|e| RuntimeError::BadArchive(format!("manifest {digest}: {e}")))
    }

    /// The image config of a manifest.
    pub fn config(&self, manifest_digest: &str) -> Result<ImageConfiguration> {
        let m = self.manifest(manifest_digest)?;
        let cd = m.config().digest().to_string();
        let b = self.get_blob(&cd)?;
        serde_json::from_slice(&b)
            .map_err(|e| RuntimeError::BadArchive(format!("config {cd}: {e}")))
    }

    /// The image config's Docker `Healthcheck` object (`{"Test": [...], "Interval": ns, ...}`),
    /// which the OCI config type does not carry; `None` when the image has none.
    pub fn healthcheck(&self, manifest_digest: &str) -> Result<Option<serde_json::Value>> {
        self.config_field(manifest_digest, "/config/Healthcheck")
    }

    /// The image's `VOLUME` paths (untrusted: the caller checks each path).
    pub fn volumes(&self, manifest_digest: &str) -> Result<Vec<String>> {
        Ok(self
            .config_field(manifest_digest, "/config/Volumes")?
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
            .unwrap_or_default())
    }

    /// One field of the image's config JSON (a JSON pointer), `None` when absent or null.
    fn config_field(
        &self,
        manifest_digest: &str,
        pointer: &str,
    ) -> Result<Option<serde_json::Value>> {
        let m = self.manifest(manifest_digest)?;
        let cd = m.config().digest().to_string();
        let b = self.get_blob(&cd)?;
        let v: serde_json::Value = serde_json::from_slice(&b)
            .map_err(|e| RuntimeError::BadArchive(format!("config {cd}: {e}")))?;
        Ok(v.pointer(pointer).filter(|h| !h.is_null()).cloned())
    }

    fn summary(&self, idx: &Index, digest: &str) -> Result<ImageSummary> {
        let m = self.manifest(digest)?;
        Ok(ImageSummary {
            digest: digest.to_string(),
            refs: idx
                .refs
                .iter()
                .filter(|(_, d)| *d == digest)
                .map(|(r, _)| r.clone())
                .collect(),
            size: m.layers().iter().map(|l| l.size()).sum(),
            layers: m.layers().len(),
        })
    }

    /// Every image (tagged or not).
    pub fn list(&self) -> Result<Vec<ImageSummary>> {
        let idx = self.read_index()?;
        let digests: BTreeSet<&String> = idx.refs.values().chain(idx.untagged.iter()).collect();
        digests.into_iter().map(|d| self.summary(&idx, d)).collect()
    }

    /// Manifest, config and summary of one image.
    pub fn inspect(&self, reference: &str) -> Result<ImageInspect> {
        let d = self.resolve(reference)?;
        let idx = self.read_index()?;
        Ok(ImageInspect {
            summary: self.summary(&idx, &d)?,
            manifest: self.manifest(&d)?,
            config: self.config(&d)?,
        })
    }

    /// Removes a reference (a tag, or a digest with all its tags); when no reference to the
    /// manifest remains, deletes every blob and unpacked layer no other image uses. The caller
    /// makes sure no container uses the image. Returns the manifest digests deleted.
    pub fn remove(&self, reference: &str) -> Result<Vec<String>> {
        let digest = self.resolve(reference)?;
        let _g = self
            .lock
            .lock()
            .map_err(|_| RuntimeError::Invalid("image store lock poisoned".into()))?;
        let mut idx = self.read_index()?;
        let by_digest =
            reference.starts_with("sha256:") || !idx.refs.contains_key(&normalize_ref(reference));
        if by_digest {
            idx.refs.retain(|_, d| *d != digest);
        } else {
            idx.refs.remove(&normalize_ref(reference));
        }
        let mut deleted = Vec::new();
        if !idx.refs.values().any(|d| *d == digest) {
            idx.untagged.remove(&digest);
            deleted.push(digest.clone());
        }
        self.write_index(&idx)?;
        if !deleted.is_empty() {
            self.gc(&idx)?;
        }
        Ok(deleted)
    }

    /// Deletes blobs and unpacked layers not reachable from the index.
    fn gc(&self, idx: &Index) -> Result<()> {
        let mut keep_blobs = HashSet::new();
        let mut keep_diffs = HashSet::new();
        for d in idx.refs.values().chain(idx.untagged.iter()) {
            keep_blobs.insert(d.clone());
            if let Ok(m) = self.manifest(d) {
                keep_blobs.insert(m.config().digest().to_string());
                for l in m.layers() {
                    keep_blobs.insert(l.digest().to_string());
                }
            }
            if let Ok(c) = self.config(d) {
                for id in c.rootfs().diff_ids() {
                    keep_diffs.insert(id.trim_start_matches("sha256:").to_string());
                }
            }
        }
        for e in fs::read_dir(self.root.join("blobs/sha256"))
            .ctx(|| "list blobs".into())?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep_blobs.contains(&format!("sha256:{name}")) {
                fs::remove_file(e.path()).ctx(|| format!("remove blob {name}"))?;
            }
        }
        for e in fs::read_dir(self.root.join("layers"))
            .ctx(|| "list layers".into())?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let diff = name.split('.').next().unwrap_or("");
            if !keep_diffs.contains(diff) {
                fs::remove_dir_all(e.path()).ctx(|| format!("remove layer {name}"))?;
            }
        }
        Ok(())
    }

    /// Writes an image (config + layer blobs already stored) and tags it.
    fn commit_image(
        &self,
        config: &ImageConfiguration,
        layers: Vec<Descriptor>,
        reference: Option<&str>,
    ) -> Result<String> {
        let cfg_bytes = serde_json::to_vec(config).map_err(oci_err)?;
        let (cfg_digest, cfg_size) = self.put_blob_bytes(&cfg_bytes)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                cfg_size,
                Digest::from_str(&cfg_digest).map_err(oci_err)?,
            ))
            .layers(layers)
            .build()
            .map_err(oci_err)?;
        let m_bytes = serde_json::to_vec(&manifest).map_err(oci_err)?;
        let (m_digest, _) = self.put_blob_bytes(&m_bytes)?;
        self.tag(reference, &m_digest)?;
        Ok(m_digest)
    }

    /// Imports a root filesystem (a directory, or a tar / tar.gz file) as a one-layer image named
    /// `name` with the given config. Returns the manifest digest.
    pub fn import_rootfs(
        &self,
        src: &Path,
        name: &str,
        input: &ImageConfigInput,
    ) -> Result<String> {
        let tmp = self.tmp_path("layer");
        if src.is_dir() {
            let f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            let mut b = tar::Builder::new(f);
            b.follow_symlinks(false);
            b.mode(tar::HeaderMode::Complete);
            b.append_dir_all(".", src)
                .ctx(|| format!("tar {}", src.display()))?;
            b.into_inner()
                .and_then(|mut f| f.flush())
                .ctx(|| "finish layer tar".into())?;
        } else {
            let f = File::open(src).ctx(|| format!("open {}", src.display()))?;
            let mut r = layer::decompressed(f)?;
            let mut out = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            io::copy(&mut r, &mut out).ctx(|| format!("read {}", src.display()))?;
        }
        let res = (|| {
            let f = File::open(&tmp).ctx(|| format!("open {}", tmp.display()))?;
            let (digest, size) = self.put_blob(None, f)?;
            let mut cb = ConfigBuilder::default().env(if input.env.is_empty() {
                vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                ]
            } else {
                input.env.clone()
            });
            if let Some(c) = &input.cmd {
                cb = cb.cmd(c.clone());
            }
            if let Some(e) = &input.entrypoint {
                cb = cb.entrypoint(e.clone());
            }
            if let Some(w) = &input.workdir {
                cb = cb.working_dir(w.clone());
            }
            if let Some(u) = &input.user {
                cb = cb.user(u.clone());
            }
            if let Some(sig) = &input.stop_signal {
                flotilla_types::parse_signal(sig).map_err(RuntimeError::Invalid)?;
                cb = cb.stop_signal(sig.clone());
            }
            let config = ImageConfigurationBuilder::default()
                .architecture(Arch::Amd64)
                .os(Os::Linux)
                .config(cb.build().map_err(oci_err)?)
                .rootfs(
                    RootFsBuilder::default()
                        .typ("layers")
                        .diff_ids(vec![digest.clone()])
                        .build()
                        .map_err(oci_err)?,
                )
                .build()
                .map_err(oci_err)?;
            let layer = Descriptor::new(
                MediaType::ImageLayer,
                size,
                Digest::from_str(&digest).map_err(oci_err)?,
            );
            self.commit_image(&config, vec![layer], Some(name))
        })();
        let _ = fs::remove_file(&tmp);
        res
    }

    /// Loads a `docker save` archive, an OCI image archive (tar or tar.gz) or an OCI image layout
    /// directory. Returns `(reference or digest, manifest digest)` for every image loaded.
    ///
    /// An archive is untrusted: its members are unpacked confined to a private temp dir (only
    /// directories, regular files and symlinks), and every file of it is then opened with its
    /// symlinks resolved inside that dir, regular files only, so no member can make the loader
    /// read a host file or a device. A directory is the caller's own: its symlinks are
    /// followed (the registry's tag layouts link into the store).
    pub fn load_archive(&self, path: &Path) -> Result<Vec<(String, String)>> {
        if path.is_dir() {
            return self.load_dir(&Layout::Trusted(path.to_path_buf()));
        }
        let tmp = self.tmp_path("archive");
        fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let res = (|| {
            let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
            let r = layer::decompressed(f)?;
            let mut ar = tar::Archive::new(r);
            let mut unpacker = layer::ArchiveUnpacker::new(&tmp)?;
            for entry in ar.entries().ctx(|| "read archive".into())? {
                // The tar reader's message quotes the bytes it could not parse, which for a
                // file that is no archive at all is the start of that file (text or binary
                // noise): left out. The path is often a server-side upload, also left out.
                let mut e = entry.map_err(|_| {
                    RuntimeError::BadArchive(
                        "not a docker save or OCI image archive (tar or tar.gz): its entries cannot be read"
                            .into(),
                    )
                })?;
                unpacker.unpack(&mut e)?;
            }
            self.load_dir(&Layout::Archive(layer::ConfinedDir::open(&tmp)?))
        })();
        let _ = fs::remove_dir_all(&tmp);
        res
    }

    fn load_dir(&self, dir: &Layout) -> Result<Vec<(String, String)>> {
        if dir.is_file("index.json")? && dir.is_dir("blobs") {
            self.load_oci_layout(dir)
        } else if dir.is_file("manifest.json")? {
            self.load_docker(dir)
        } else {
            Err(RuntimeError::BadArchive(format!(
                "{}: neither an OCI layout (index.json) nor a docker save archive (manifest.json)",
                dir.path().display()
            )))
        }
    }

    fn copy_blob(&self, layout: &Layout, desc: &Descriptor) -> Result<(String, u64)> {
        let d = desc.digest().to_string();
        let rel = Path::new("blobs/sha256").join(valid_digest(&d)?);
        if self.has_blob(&d) {
            // Already present (and verified when written): nothing to read.
            return self.put_blob(Some(&d), io::empty());
        }
        let f = layout.open(&rel)?;
        self.put_blob(Some(&d), f)
    }

    fn load_oci_layout(&self, dir: &Layout) -> Result<Vec<(String, String)>> {
        let text = dir.read("index.json")?;
        let index: ImageIndex = serde_json::from_slice(&text)
            .map_err(|e| RuntimeError::BadArchive(format!("index.json: {e}")))?;
        let mut out = Vec::new();
        for desc in index.manifests() {
            let ann = desc.annotations().clone().unwrap_or_default();
            let name = ann.get("io.containerd.image.name").cloned().or_else(|| {
                ann.get("org.opencontainers.image.ref.name")
                    .filter(|n| n.contains(':') || n.contains('/'))
                    .cloned()
            });
            let mut mdesc = desc.clone();
            if matches!(desc.media_type(), MediaType::ImageIndex)
                || desc.media_type().to_string().contains("manifest.list")
            {
                // Nested index: take the linux/amd64 manifest, or the first one.
                let rel = Path::new("blobs/sha256").join(valid_digest(desc.digest().as_ref())?);
                let nested: ImageIndex = serde_json::from_slice(&dir.read(&rel)?)
                    .map_err(|e| RuntimeError::BadArchive(format!("nested index: {e}")))?;
                let pick = nested
                    .manifests()
                    .iter()
                    .find(|m| {
                        m.platform().as_ref().is_some_and(|p| {
                            *p.architecture() == Arch::Amd64 && *p.os() == Os::Linux
                        })
                    })
                    .or_else(|| nested.manifests().first())
                    .ok_or_else(|| RuntimeError::BadArchive("empty nested index".into()))?;
                mdesc = pick.clone();
            }
            let (mdigest, _) = self.copy_blob(dir, &mdesc)?;
            let manifest = self.manifest(&mdigest)?;
            self.copy_blob(dir, manifest.config())?;
            for l in manifest.layers() {
                self.copy_blob(dir, l)?;
            }
            self.tag(name.as_deref(), &mdigest)?;
            out.push((name.unwrap_or_else(|| mdigest.clone()), mdigest));
        }
        Ok(out)
    }

    fn load_docker(&self, dir: &Layout) -> Result<Vec<(String, String)>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let text = dir.read("manifest.json")?;
        let entries: Vec<Entry> = serde_json::from_slice(&text)
            .map_err(|e| RuntimeError::BadArchive(format!("manifest.json: {e}")))?;
        let mut out = Vec::new();
        for e in entries {
            let inside = |rel: &str| -> Result<PathBuf> {
                layer::classify(Path::new(rel)).and_then(|k| match k {
                    layer::EntryKind::Normal(p) if !p.as_os_str().is_empty() => Ok(p),
                    _ => Err(RuntimeError::BadArchive(format!("bad path {rel}"))),
                })
            };
            let cfg_bytes = dir.read(&inside(&e.config)?)?;
            let config: ImageConfiguration = serde_json::from_slice(&cfg_bytes)
                .map_err(|err| RuntimeError::BadArchive(format!("config {}: {err}", e.config)))?;
            let mut layers = Vec::new();
            for l in &e.layers {
                let mut f = dir.open(&inside(l)?)?;
                let mut magic = [0u8; 2];
                let gz = f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
                f.seek(io::SeekFrom::Start(0)).ctx(|| format!("read {l}"))?;
                let (digest, size) = self.put_blob(None, f)?;
                let mt = if gz {
                    MediaType::Other(GZIP_TAR.into())
                } else {
                    MediaType::ImageLayer
                };
                layers.push(Descriptor::new(
                    mt,
                    size,
                    Digest::from_str(&digest).map_err(oci_err)?,
                ));
            }
            if layers.len() != config.rootfs().diff_ids().len() {
                return Err(RuntimeError::BadArchive(
                    "layer count differs from the config's diff_ids".into(),
                ));
            }
            let tags = e.repo_tags.unwrap_or_default();
            let digest = self.commit_image(&config, layers, tags.first().map(String::as_str))?;
            for t in tags.iter().skip(1) {
                self.tag(Some(t), &digest)?;
            }
            out.push((
                tags.first().cloned().unwrap_or_else(|| digest.clone()),
                digest,
            ));
        }
        Ok(out)
    }

    /// Unpacks (once) every layer of an image, ownership shifted by `shift`, and returns the
    /// layer directories top-most first (overlay `lowerdir` order). Each layer's diff id is
    /// verified while unpacking.
    pub fn unpacked_layers(
        &self,
        manifest_digest: &str,
        shift: Option<IdRange>,
    ) -> Result<Vec<PathBuf>> {
        let m = self.manifest(manifest_digest)?;
        let c = self.config(manifest_digest)?;
        let diff_ids = c.rootfs().diff_ids();
        if diff_ids.len() != m.layers().len() {
            return Err(RuntimeError::BadArchive(format!(
                "{manifest_digest}: layer count differs from diff_ids"
            )));
        }
        let mut dirs = Vec::new();
        for (desc, diff_id) in m.layers().iter().zip(diff_ids) {
            let hex = valid_digest(diff_id)?;
            let name = match shift {
                Some(r) => format!("{hex}.u{}-{}", r.host_start, r.size),
                None => hex.to_string(),
            };
            let dst = self.root.join("layers").join(&name);
            if !dst.is_dir() {
                let tmp = self.tmp_path("unpack");
                fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
                let res = (|| {
                    let f = File::open(self.blob_path(desc.digest().as_ref())?)
                        .ctx(|| format!("open layer {}", desc.digest()))?;
                    let got = layer::unpack_layer(layer::decompressed(f)?, &tmp, shift)?;
                    if got != *diff_id {
                        return Err(RuntimeError::DigestMismatch {
                            expected: diff_id.clone(),
                            actual: got,
                        });
                    }
                    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                        .ctx(|| "chmod layer".into())?;
                    match fs::rename(&tmp, &dst) {
                        Ok(()) => Ok(()),
                        Err(_) if dst.is_dir() => Ok(()), // unpacked concurrently
                        Err(e) => Err(RuntimeError::Io {
                            context: format!("store layer {name}"),
                            source: e,
                        }),
                    }
                })();
                if tmp.exists() {
                    let _ = fs::remove_dir_all(&tmp);
                }
                res?;
            }
            dirs.push(dst);
        }
        dirs.reverse();
        Ok(dirs)
    }

    /// The layer digests (sha256 of the tar) of an image, for callers that need them.
    pub fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_refs() {
        assert_eq!(normalize_ref("busybox"), "busybox:latest");
        assert_eq!(normalize_ref("busybox:1"), "busybox:1");
        assert_eq!(normalize_ref("localhost:5000/a"), "localhost:5000/a:latest");
        assert_eq!(normalize_ref("sha256:ab"), "sha256:ab");
    }

    #[test]
    fn a_file_that_is_no_archive_is_named_so_without_quoting_it() -> Result<()> {
        let dir = tempfile::tempdir().ctx(|| "tempdir".into())?;
        let s = ImageStore::open(dir.path().join("store"))?;
        let f = dir.path().join("passwd");
        fs::write(&f, "root:x:0:0:root:/root:/bin/bash\n".repeat(20)).ctx(|| "write".into())?;
        let e = s.load_archive(&f).expect_err("not an archive").to_string();
        assert!(e.contains("not a docker save or OCI image archive"), "{e}");
        assert!(!e.contains("root:x"), "{e}");
        Ok(())
    }

    #[test]
    fn put_blob_verifies() -> Result<()> {
        let dir = tempfile::tempdir().ctx(|| "tempdir".into())?;
        let s = ImageStore::open(dir.path())?;
        let (d, n) = s.put_blob_bytes(b"hello")?;
        assert_eq!(n, 5);
        assert_eq!(s.get_blob(&d)?, b"hello");
        let wrong = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            s.put_blob(Some(&wrong), &b"x"[..]),
            Err(RuntimeError::DigestMismatch { .. })
        ));
        assert!(!s.has_blob(&wrong));
        Ok(())
    }

    #[test]
    fn imports_a_gzipped_tar_rootfs() -> Result<()> {
        let dir = tempfile::tempdir().ctx(|| "tempdir".into())?;
        let tgz = dir.path().join("rootfs.tar.gz");
        {
            let f = File::create(&tgz).ctx(|| "create".into())?;
            let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            let mut b = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, "bin/app", &b"hi"[..])
                .ctx(|| "append".into())?;
            b.into_inner()
                .and_then(|gz| gz.finish())
                .ctx(|| "finish".into())?;
        }
        let s = ImageStore::open(dir.path().join("images"))?;
        let input = ImageConfigInput {
            entrypoint: Some(vec!["/bin/app".into()]),
            env: vec!["A=1".into()],
            workdir: Some("/srv".into()),
            user: Some("1000".into()),
            ..Default::default()
        };
        let d = s.import_rootfs(&tgz, "app:v2", &input)?;
        let c = s.config(&d)?;
        let cfg = c.config().clone().unwrap_or_default();
        assert_eq!(cfg.entrypoint().clone(), Some(vec!["/bin/app".to_string()]));
        assert_eq!(cfg.working_dir().clone(), Some("/srv".to_string()));
        assert_eq!(cfg.user().clone(), Some("1000".to_string()));
        let layers = s.unpacked_layers(&d, Some(IdRange::default()))?;
        let m = fs::metadata(layers[0].join("bin/app")).ctx(|| "stat".into())?;
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&m),
            100_000,
            "ownership shifted into the range"
        );
        assert_eq!(
            s.unpacked_layers(&d, Some(IdRange::default()))?,
            layers,
            "unpacked once, reused"
        );
        Ok(())
    }

    #[test]
    fn import_remove_frees_space() -> Result<()> {
        let dir = tempfile::tempdir().ctx(|| "tempdir".into())?;
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("bin")).ctx(|| "mkdir".into())?;
        fs::write(src.join("bin/x"), b"data").ctx(|| "write".into())?;
        let s = ImageStore::open(dir.path().join("images"))?;
        let input = ImageConfigInput {
            cmd: Some(vec!["/bin/x".into()]),
            ..Default::default()
        };
        let d = s.import_rootfs(&src, "t", &input)?;
        assert_eq!(s.resolve("t")?, d);
        assert_eq!(s.resolve("t:latest")?, d);
        assert_eq!(s.resolve(&d[..20])?, d);
        let c = s.config(&d)?;
        assert_eq!(
            c.config().as_ref().and_then(|c| c.cmd().clone()),
            Some(vec!["/bin/x".to_string()])
        );
        let layers = s.unpacked_layers(&d, None)?;
        assert_eq!(
            fs::read(layers[0].join("bin/x")).ctx(|| "read".into())?,
            b"data"
        );
        assert_eq!(s.list()?.len(), 1);
        s.remove("t")?;
        assert!(s.list()?.is_empty());
        let blobs = fs::read_dir(dir.path().join("images/blobs/sha256"))
            .ctx(|| "ls".into())?
            .count();
        let layers = fs::read_dir(dir.path().join("images/layers"))
            .ctx(|| "ls".into())?
            .count();
        assert_eq!((blobs, layers), (0, 0));
        Ok(())
    }
}
