//! Garbage collection keeps what is referenced, removes the rest.

mod common;

use common::*;
use flotilla_registry::{
    attach_signature, collect_garbage, collect_garbage_with, pull, push, signatures_for, GcOptions,
    SigningKey,
};
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn gc_removes_only_unreferenced_blobs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, reg, s) = (
        store(dir.path(), "a")?,
        store(dir.path(), "reg")?,
        store(dir.path(), "s")?,
    );
    let client = serve(reg.clone()).await?;
    // In `s`: a tagged signed image, an image pulled by digest (untagged, kept by a task),
    // another pulled by digest that nothing keeps, and an orphan blob.
    let tagged = small_image(&s, "tagged:1", "t")?;
    let key = SigningKey::generate()?;
    attach_signature(&s, "tagged", &key.sign(&tagged)?)?;
    let kept = small_image(&a, "kept:1", "k")?;
    let gone = small_image(&a, "gone:1", "g")?;
    attach_signature(&a, "gone", &key.sign(&gone)?)?;
    push(&client, &a, "kept:1", |_| {}).await?;
    push(&client, &a, "gone:1", |_| {}).await?;
    pull(&client, &s, &format!("kept@{kept}"), |_| {}).await?;
    pull(&client, &s, &format!("gone@{gone}"), |_| {}).await?;
    assert_eq!(signatures_for(&s, &gone)?.len(), 1);
    let (orphan, _) = s.put_blob_bytes(b"nobody references me")?;
    let keep: HashSet<String> = [kept.clone()].into();

    // The unkept untagged image leaves the index, but fresh blobs are spared by default
    // (a push may be in flight).
    let r = collect_garbage(&s, &keep)?;
    assert_eq!(r.removed_images, vec![gone.clone()]);
    assert_eq!(
        r.removed_artifacts.len(),
        1,
        "the signature of the removed image: {r:?}"
    );
    assert!(r.removed_blobs.is_empty(), "{r:?}");
    assert!(s.has_blob(&orphan) && s.has_blob(&gone));

    let r = collect_garbage_with(
        &s,
        &keep,
        &GcOptions {
            min_age: Duration::ZERO,
            ..Default::default()
        },
    )?;
    assert!(r.removed_images.is_empty());
    assert!(r.removed_blobs.contains(&orphan));
    assert!(r.removed_blobs.contains(&gone));
    assert!(r.freed_bytes > 0);
    assert!(!s.has_blob(&orphan));
    assert!(!s.has_blob(&gone));
    for d in [&tagged, &kept] {
        let m = s.manifest(d)?;
        assert!(s.has_blob(m.config().digest().as_ref()));
        for l in m.layers() {
            assert!(s.has_blob(l.digest().as_ref()), "layer of {d} kept");
        }
    }
    assert_eq!(s.resolve("tagged:1")?, tagged);
    assert_eq!(s.resolve(&kept)?, kept);
    assert_eq!(
        signatures_for(&s, &tagged)?.len(),
        1,
        "signature of a kept image stays"
    );
    assert!(signatures_for(&s, &gone)?.is_empty());

    // Idempotent; then dropping the keep set removes the untagged image too.
    let r = collect_garbage_with(
        &s,
        &keep,
        &GcOptions {
            min_age: Duration::ZERO,
            ..Default::default()
        },
    )?;
    assert!(
        r.removed_blobs.is_empty() && r.removed_images.is_empty(),
        "{r:?}"
    );
    let r = collect_garbage_with(
        &s,
        &HashSet::new(),
        &GcOptions {
            min_age: Duration::ZERO,
            ..Default::default()
        },
    )?;
    assert_eq!(r.removed_images, vec![kept.clone()]);
    assert_eq!(s.list()?.len(), 1);

    // A node that only runs images drops tagged ones it does not keep, too.
    let r = collect_garbage_with(
        &s,
        &HashSet::new(),
        &GcOptions {
            min_age: Duration::ZERO,
            keep_tagged: false,
        },
    )?;
    assert_eq!(r.removed_images, vec![tagged.clone()]);
    assert!(s.list()?.is_empty());
    assert!(!s.has_blob(&tagged));
    Ok(())
}
