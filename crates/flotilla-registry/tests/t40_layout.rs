//! OCI image-layout directories: registry → layout → registry, verified, only missing blobs move.

mod common;

use common::*;
use flotilla_registry::{layout_manifest, pull_layout, push_layout, sha256_digest};

#[tokio::test]
async fn layout_round_trip_moves_only_missing_blobs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (store(dir.path(), "src")?, store(dir.path(), "dst")?);
    let d1 = busybox(&src, "app:1", "echo one")?;
    let d2 = same_layer(&src, &d1, "app:2", "echo two")?;
    let (from, to) = (serve(src.clone()).await?, serve(dst.clone()).await?);
    let layout = dir.path().join("layout");

    let mut c = Counter::default();
    assert_eq!(
        pull_layout(&from, "app:1", &layout, Some("v1"), |p| c.record(p)).await?,
        d1
    );
    assert_eq!(c.done.len(), 2, "config + layer: {c:?}");
    assert_eq!(layout_manifest(&layout, Some("v1"))?.0, d1);
    assert_eq!(layout_manifest(&layout, None)?.0, d1, "the only image");
    // A second image sharing the layer: only its config moves; both tags in index.json.
    let mut c = Counter::default();
    pull_layout(&from, "app:2", &layout, Some("v2"), |p| c.record(p)).await?;
    assert_eq!((c.done.len(), c.present.len()), (1, 1), "{c:?}");
    assert_eq!(layout_manifest(&layout, Some("v2"))?.0, d2);
    assert!(
        layout_manifest(&layout, None).is_err(),
        "two images: name one"
    );
    assert!(layout_manifest(&layout, Some("nope")).is_err());

    let mut c = Counter::default();
    assert_eq!(
        push_layout(&to, &layout, Some("v1"), "copy:1", |p| c.record(p)).await?,
        d1
    );
    assert_eq!(c.done.len(), 2);
    assert_eq!(dst.resolve("copy:1")?, d1);
    let mut c = Counter::default();
    push_layout(&to, &layout, Some("v2"), "copy:2", |p| c.record(p)).await?;
    assert_eq!((c.done.len(), c.present.len()), (1, 1), "{c:?}");

    // A corrupt layout blob is refused before anything is sent.
    let m = dst.manifest(&d1)?;
    let cfg = m.config().digest().to_string();
    let p = layout
        .join("blobs/sha256")
        .join(cfg.trim_start_matches("sha256:"));
    std::fs::write(&p, b"tampered")?;
    assert_ne!(sha256_digest(&std::fs::read(&p)?), cfg);
    let fresh = serve(store(dir.path(), "fresh")?).await?;
    assert!(push_layout(&fresh, &layout, Some("v1"), "x:1", |_| {})
        .await
        .is_err());
    Ok(())
}

/// A tag pushed to one registry (an image and its signature) is served by another that has it
/// as its peer: resolved there, fetched by digest and verified, never recorded locally.
#[tokio::test]
async fn tags_and_signatures_pushed_to_a_peer_are_served() -> TestResult {
    use flotilla_registry::{
        attach_signature, pull, push, router, signatures_for, RegistryClient, RegistryState,
        SigningKey,
    };
    let dir = tempfile::tempdir()?;
    let (src, r1, r2, dst) = (
        store(dir.path(), "src")?,
        store(dir.path(), "r1")?,
        store(dir.path(), "r2")?,
        store(dir.path(), "dst")?,
    );
    let d = busybox(&src, "app:1", "echo one")?;
    let key = SigningKey::generate()?;
    attach_signature(&src, "app", &key.sign(&d)?)?;
    let c1 = serve(r1.clone()).await?;
    push(&c1, &src, "app:1", |_| {}).await?;

    let state = RegistryState::new(r2.clone())?.with_peer(std::sync::Arc::new(c1.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(state)).await;
    });
    let c2 = RegistryClient::new(&format!("http://{addr}"))?;
    assert_eq!(pull(&c2, &dst, "app:1", |_| {}).await?, d);
    let sigs = signatures_for(&dst, &d)?;
    assert_eq!(sigs.len(), 1, "the signature came through the peer");
    assert!(
        r2.resolve("app:1").is_err(),
        "the tag is not recorded on the registry that only relayed it"
    );
    assert!(
        c2.get_manifest("app", "2").await?.is_none(),
        "unknown tags stay unknown"
    );
    Ok(())
}
