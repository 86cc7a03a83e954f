//! Push to a registry served on loopback, pull into empty stores; digests verified end to end.

mod common;

use common::*;
use flotilla_registry::{pull, push, sha256_digest, ErrorCode, RegistryError, OCI_MANIFEST};

#[tokio::test]
async fn push_then_pull_into_an_empty_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, reg, b) = (
        store(dir.path(), "a")?,
        store(dir.path(), "reg")?,
        store(dir.path(), "b")?,
    );
    let client = serve(reg.clone()).await?;
    client.ping().await?;
    let d1 = busybox(&a, "library/busybox:1", "echo one")?;

    let mut c = Counter::default();
    assert_eq!(
        push(&client, &a, "library/busybox:1", |p| c.record(p)).await?,
        d1
    );
    assert_eq!(c.done.len(), 2, "config + layer uploaded: {c:?}");
    assert_eq!(reg.resolve("library/busybox:1")?, d1);
    assert_eq!(client.tags("library/busybox").await?, vec!["1".to_string()]);

    let mut c = Counter::default();
    assert_eq!(
        pull(&client, &b, "library/busybox:1", |p| c.record(p)).await?,
        d1
    );
    assert_eq!(c.done.len(), 2);
    assert_eq!(b.resolve("library/busybox:1")?, d1);
    let (ma, mb) = (a.manifest(&d1)?, b.manifest(&d1)?);
    assert_eq!(ma, mb);
    for l in mb.layers() {
        let blob = b.get_blob(l.digest().as_ref())?;
        assert_eq!(
            sha256_digest(&blob),
            l.digest().to_string(),
            "layer verified"
        );
    }
    assert_eq!(a.config(&d1)?, b.config(&d1)?);
    // The pulled image unpacks (diff ids verified by the runtime).
    let layers = b.unpacked_layers(&d1, None)?;
    assert!(layers[0].join("bin/busybox").is_file());

    // Pull by digest: nothing moves, recorded untagged.
    let c2 = store(dir.path(), "c")?;
    let d = pull(&client, &c2, &format!("library/busybox@{d1}"), |_| {}).await?;
    assert_eq!(d, d1);
    assert_eq!(c2.resolve(&d1)?, d1);
    assert!(c2.list()?[0].refs.is_empty());
    Ok(())
}

#[tokio::test]
async fn shared_layers_move_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, reg, b) = (
        store(dir.path(), "a")?,
        store(dir.path(), "reg")?,
        store(dir.path(), "b")?,
    );
    let client = serve(reg.clone()).await?.with_chunk_size(256 << 10);
    let d1 = busybox(&a, "app:1", "echo one")?;
    let d2 = same_layer(&a, &d1, "app:2", "echo two")?;
    assert_ne!(d1, d2);
    let layer = a.manifest(&d1)?.layers()[0].digest().to_string();
    assert_eq!(a.manifest(&d2)?.layers()[0].digest().to_string(), layer);
    assert!(
        a.manifest(&d1)?.layers()[0].size() > 256 << 10,
        "layer is pushed in chunks"
    );

    push(&client, &a, "app:1", |_| {}).await?;
    let mut c = Counter::default();
    push(&client, &a, "app:2", |p| c.record(p)).await?;
    assert_eq!(c.done.len(), 1, "only the new config moves: {c:?}");
    assert_eq!(c.present, vec![layer.clone()]);

    pull(&client, &b, "app:1", |_| {}).await?;
    let mut c = Counter::default();
    assert_eq!(pull(&client, &b, "app:2", |p| c.record(p)).await?, d2);
    assert_eq!(c.done.len(), 1, "only the new config moves: {c:?}");
    assert_eq!(c.present, vec![layer]);
    Ok(())
}

#[tokio::test]
async fn tampered_or_missing_blobs_fail_the_pull() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, reg) = (store(dir.path(), "a")?, store(dir.path(), "reg")?);
    let client = serve(reg.clone()).await?;
    let d = small_image(&a, "t:1", "original")?;
    push(&client, &a, "t:1", |_| {}).await?;
    let layer = reg.manifest(&d)?.layers()[0].digest().to_string();

    // Corrupt the registry's copy of the layer.
    let path = reg.blob_path(&layer)?;
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes)?;
    let b = store(dir.path(), "b")?;
    let err = pull(&client, &b, "t:1", |_| {})
        .await
        .err()
        .ok_or("pull succeeded")?;
    assert_eq!(err.code(), Some(ErrorCode::DigestInvalid), "{err}");
    assert!(!b.has_blob(&layer), "nothing unverified is stored");
    assert!(b.resolve("t:1").is_err());

    // Remove it instead.
    std::fs::remove_file(&path)?;
    let err = pull(&client, &b, "t:1", |_| {})
        .await
        .err()
        .ok_or("pull succeeded")?;
    assert_eq!(err.code(), Some(ErrorCode::BlobUnknown), "{err}");

    // Unknown image.
    let err = pull(&client, &b, "nope:1", |_| {})
        .await
        .err()
        .ok_or("pull succeeded")?;
    assert_eq!(err.code(), Some(ErrorCode::ManifestUnknown), "{err}");
    Ok(())
}

#[tokio::test]
async fn bad_manifest_is_rejected_with_manifest_invalid() -> TestResult {
    let dir = tempfile::tempdir()?;
    let client = serve(store(dir.path(), "reg")?).await?;
    let err = client
        .put_manifest(
            "x",
            "1",
            OCI_MANIFEST,
            bytes::Bytes::from_static(b"{\"schemaVersion\": 2,"),
        )
        .await
        .err()
        .ok_or("accepted")?;
    assert!(
        matches!(
            err,
            RegistryError::Distribution {
                code: ErrorCode::ManifestInvalid,
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn chunked_upload_resumes_through_the_client() -> TestResult {
    let dir = tempfile::tempdir()?;
    let reg = store(dir.path(), "reg")?;
    let client = serve(reg.clone()).await?;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let d = sha256_digest(&data);
    let loc = client.start_upload("r").await?;
    let loc = client
        .upload_chunk(&loc, 0, bytes::Bytes::copy_from_slice(&data[..4000]))
        .await?;
    // The client "crashes"; later it asks where the upload stands and continues.
    let (loc, offset) = client.upload_status(&loc).await?;
    assert_eq!(offset, 4000);
    let err = client
        .upload_chunk(&loc, 0, bytes::Bytes::copy_from_slice(&data[..10]))
        .await
        .err()
        .ok_or("overlapping chunk accepted")?;
    assert_eq!(err.code(), Some(ErrorCode::RangeInvalid));
    let loc = client
        .upload_chunk(&loc, offset, bytes::Bytes::copy_from_slice(&data[4000..]))
        .await?;
    client.finish_upload(&loc, &d, bytes::Bytes::new()).await?;
    assert_eq!(reg.get_blob(&d)?, data);
    // Mount into another repository.
    assert!(client.mount_blob("other/repo", &d, "r").await?);
    assert!(
        !client
            .mount_blob("other/repo", &sha256_digest(b"none"), "r")
            .await?
    );
    assert_eq!(client.blob_size("other/repo", &d).await?, Some(10_000));
    Ok(())
}
