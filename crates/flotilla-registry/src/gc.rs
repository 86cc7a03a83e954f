//! Garbage collection of the content store.
//!
//! Roots: every tagged image in the store index, the manifests the caller keeps (those of
//! services and tasks), and tagged artifacts without a subject. From them: their configs,
//! layers and child manifests, and — repeatedly — every artifact (signature) whose subject is
//! retained. Everything else goes: untagged images not kept (removed from the index), blobs,
//! pins, artifact records and unpacked layers. Blobs younger than [`GcOptions::min_age`] are
//! spared so a push in flight (blobs first, manifest last) is not cut short.

use crate::error::{IoContext, Result};
use crate::manifest::Manifest;
use crate::meta::{list_blob_dir, Meta};
use flotilla_runtime::ImageStore;
use serde::Serialize;
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

/// Tuning for [`collect_garbage_with`].
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Unreferenced blobs younger than this are kept (default 10 minutes).
    pub min_age: Duration,
    /// Whether tagged images are roots (a registry keeps what was pushed; default true).
    /// A node that only runs images sets it false: its images not in `keep` are removed,
    /// tagged or not.
    pub keep_tagged: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            min_age: Duration::from_secs(600),
            keep_tagged: true,
        }
    }
}

/// What a collection removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Untagged, unkept images dropped from the store index.
    pub removed_images: Vec<String>,
    /// Artifact manifests (e.g. signatures of removed images) forgotten.
    pub removed_artifacts: Vec<String>,
    /// Blobs deleted.
    pub removed_blobs: Vec<String>,
    /// Bytes freed by deleted blobs.
    pub freed_bytes: u64,
    /// Unpacked layer directories deleted.
    pub removed_layers: usize,
}

/// [`collect_garbage_with`] with default options.
pub fn collect_garbage(store: &ImageStore, keep: &HashSet<String>) -> Result<GcReport> {
    collect_garbage_with(store, keep, &GcOptions::default())
}

/// Removes what no tagged image, kept manifest (`keep`: manifest digests referenced by
/// services and tasks) or retained image's signature references.
pub fn collect_garbage_with(
    store: &ImageStore,
    keep: &HashSet<String>,
    opts: &GcOptions,
) -> Result<GcReport> {
    let meta = Meta::open(store)?;
    let mut report = GcReport::default();

    // 1. Images nobody keeps (untagged, or any with `keep_tagged` off) leave the index.
    let mut roots: BTreeSet<String> = keep.iter().cloned().collect();
    for s in store.list()? {
        if keep.contains(&s.digest) || (opts.keep_tagged && !s.refs.is_empty()) {
            roots.insert(s.digest);
        } else {
            // By digest: drops every tag too.
            meta.store_remove(store, &s.digest)?;
            report.removed_images.push(s.digest);
        }
    }
    let artifacts = meta.load()?;
    let tagged: HashSet<&String> = artifacts.tags.values().flat_map(|t| t.values()).collect();
    for (d, a) in &artifacts.artifacts {
        if a.subject.is_none() && tagged.contains(d) {
            roots.insert(d.clone());
        }
    }

    // 2. Mark.
    let mut manifests: HashSet<String> = HashSet::new();
    let mut blobs: HashSet<String> = HashSet::new();
    let mut diff_ids: HashSet<String> = HashSet::new();
    let mut work: Vec<String> = roots.into_iter().collect();
    loop {
        while let Some(d) = work.pop() {
            if !manifests.insert(d.clone()) {
                continue;
            }
            let Some(bytes) = meta.read_blob(store, &d)? else {
                continue;
            };
            let Ok(m) = Manifest::parse(&bytes, None) else {
                continue;
            };
            for b in m.blobs() {
                blobs.insert(b.digest.clone());
            }
            if let Some(c) = &m.config {
                if let Some(cb) = meta.read_blob(store, &c.digest)? {
                    diff_ids.extend(diff_ids_of(&cb));
                }
            }
            work.extend(m.children().map(|c| c.digest.clone()));
        }
        for (d, a) in &artifacts.artifacts {
            if !manifests.contains(d) && a.subject.as_ref().is_some_and(|s| manifests.contains(s)) {
                work.push(d.clone());
            }
        }
        if work.is_empty() {
            break;
        }
    }
    let live = |d: &str| manifests.contains(d) || blobs.contains(d);

    // 3. Sweep artifact records, then blobs and pins, then unpacked layers.
    let dead: Vec<String> = artifacts
        .artifacts
        .keys()
        .filter(|d| !live(d))
        .cloned()
        .collect();
    if !dead.is_empty() {
        meta.update(|f| {
            for d in &dead {
                f.artifacts.remove(d);
            }
            for t in f.tags.values_mut() {
                t.retain(|_, d| !dead.contains(d));
            }
            f.tags.retain(|_, t| !t.is_empty());
        })?;
        report.removed_artifacts = dead;
    }
    let now = SystemTime::now();
    let old_enough = |p: &std::path::Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default() >= opts.min_age)
            .unwrap_or(false)
    };
    let blob_dir = store.root().join("blobs/sha256");
    for (d, p) in list_blob_dir(&blob_dir)? {
        if live(&d) || !old_enough(&p) {
            continue;
        }
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
        report.freed_bytes += size;
        report.removed_blobs.push(d);
    }
    for (d, p) in meta.pins()? {
        if !live(&d) && old_enough(&p) {
            meta.unpin(&d)?;
            if !report.removed_blobs.contains(&d) {
                report.removed_blobs.push(d);
            }
        }
    }
    let layers = store.root().join("layers");
    for e in std::fs::read_dir(&layers)
        .ctx(|| format!("list {}", layers.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let diff = name.split('.').next().unwrap_or("");
        if !diff_ids.contains(diff) && old_enough(&e.path()) {
            std::fs::remove_dir_all(e.path()).ctx(|| format!("remove layer {name}"))?;
            report.removed_layers += 1;
        }
    }
    report.removed_blobs.sort();
    tracing::info!(
        images = report.removed_images.len(),
        artifacts = report.removed_artifacts.len(),
        blobs = report.removed_blobs.len(),
        freed = report.freed_bytes,
        layers = report.removed_layers,
        "image garbage collected"
    );
    Ok(report)
}

/// Hex diff ids of an image config.
fn diff_ids_of(config: &[u8]) -> Vec<String> {
    serde_json::from_slice::<serde_json::Value>(config)
        .ok()
        .and_then(|v| {
            v.get("rootfs")?.get("diff_ids")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str())
                    .map(|d| d.trim_start_matches("sha256:").to_string())
                    .collect()
            })
        })
        .unwrap_or_default()
}
