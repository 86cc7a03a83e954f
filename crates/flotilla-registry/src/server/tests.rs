//! Route tests with `tower::ServiceExt::oneshot`, no listener.

use super::*;
use crate::digest::sha256_digest;
use crate::manifest::{OCI_CONFIG, OCI_MANIFEST};
use crate::source::BlobSource;
use axum::http::{HeaderMap, Request};
use futures::future::BoxFuture;
use std::sync::Mutex;
use tower::ServiceExt;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
    st: RegistryState,
}

fn fixture() -> std::result::Result<Fixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(ImageStore::open(dir.path().join("images"))?);
    let st = RegistryState::new(store)?;
    Ok(Fixture {
        _dir: dir,
        app: router(st.clone()),
        st,
    })
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> std::result::Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error>> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = app.clone().oneshot(b.body(body)?).await?;
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await?;
    Ok((parts.status, parts.headers, bytes))
}

fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn hdr<'a>(h: &'a HeaderMap, k: &str) -> &'a str {
    h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn upload(
    app: &Router,
    name: &str,
    data: &[u8],
) -> std::result::Result<String, Box<dyn std::error::Error>> {
    let d = sha256_digest(data);
    let (s, _, b) = call(
        app,
        "POST",
        &format!("/v2/{name}/blobs/uploads/?digest={d}"),
        &[],
        Body::from(data.to_vec()),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    Ok(d)
}

/// A tiny (non-runnable) image: config + one layer blob, uploaded; returns the manifest.
async fn tiny_image(
    app: &Router,
    name: &str,
    layer: &[u8],
) -> std::result::Result<Vec<u8>, Box<dyn std::error::Error>> {
    let l = upload(app, name, layer).await?;
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [l] }
    }))?;
    let c = upload(app, name, &cfg).await?;
    Ok(serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": c, "size": cfg.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l, "size": layer.len() }]
    }))?)
}

#[tokio::test]
async fn base_endpoint_announces_the_api() -> TestResult {
    let f = fixture()?;
    for uri in ["/v2/", "/v2"] {
        let (s, h, _) = call(&f.app, "GET", uri, &[], Body::empty()).await?;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(hdr(&h, "docker-distribution-api-version"), "registry/2.0");
    }
    Ok(())
}

#[tokio::test]
async fn monolithic_upload_then_head_and_get() -> TestResult {
    let f = fixture()?;
    let d = upload(&f.app, "library/busybox", b"hello blob").await?;
    let (s, h, b) = call(
        &f.app,
        "HEAD",
        &format!("/v2/library/busybox/blobs/{d}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hdr(&h, "content-length"), "10");
    assert_eq!(hdr(&h, "docker-content-digest"), d);
    assert!(b.is_empty());
    let (s, _, b) = call(
        &f.app,
        "GET",
        &format!("/v2/library/busybox/blobs/{d}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"hello blob"[..]));
    assert!(f.st.store.has_blob(&d), "blobs are the store's own files");

    let missing = sha256_digest(b"nope");
    let (s, h, b) = call(
        &f.app,
        "GET",
        &format!("/v2/library/busybox/blobs/{missing}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&b), "BLOB_UNKNOWN");
    assert!(hdr(&h, "content-type").contains("json"));
    let (s, _, b) = call(
        &f.app,
        "GET",
        "/v2/library/busybox/blobs/sha256:xyz",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    let (s, _, b) = call(
        &f.app,
        "GET",
        &format!("/v2/Bad..Name/blobs/{d}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "NAME_INVALID")
    );
    Ok(())
}

#[tokio::test]
async fn tampered_upload_is_refused() -> TestResult {
    let f = fixture()?;
    let claimed = sha256_digest(b"the real content");
    let (s, _, b) = call(
        &f.app,
        "POST",
        &format!("/v2/x/blobs/uploads/?digest={claimed}"),
        &[],
        Body::from("tampered content"),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );
    assert!(!f.st.store.has_blob(&claimed));
    assert_eq!(
        std::fs::read_dir(f.st.uploads.as_path())?.count(),
        0,
        "no upload left behind"
    );
    Ok(())
}

#[tokio::test]
async fn chunked_upload_interrupted_and_resumed() -> TestResult {
    let f = fixture()?;
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let d = sha256_digest(&data);
    let (s, h, _) = call(
        &f.app,
        "POST",
        "/v2/library/busybox/blobs/uploads/",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::ACCEPTED);
    let loc = hdr(&h, "location").to_string();
    assert!(loc.starts_with("/v2/library/busybox/blobs/uploads/"));
    assert_eq!(loc.rsplit('/').next(), Some(hdr(&h, "docker-upload-uuid")));

    let (s, h, _) = call(
        &f.app,
        "PATCH",
        &loc,
        &[("content-range", "0-999")],
        Body::from(data[..1000].to_vec()),
    )
    .await?;
    assert_eq!((s, hdr(&h, "range")), (StatusCode::ACCEPTED, "0-999"));

    // The connection drops half-way through the second chunk.
    let partial = Bytes::copy_from_slice(&data[1000..1500]);
    let broken = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(partial),
        Err(std::io::Error::other("connection reset")),
    ]);
    let (s, _, _) = call(
        &f.app,
        "PATCH",
        &loc,
        &[("content-range", "1000-1999")],
        Body::from_stream(broken),
    )
    .await?;
    assert!(s.is_client_error(), "{s}");

    // Where are we? The failed chunk left nothing behind.
    let (s, h, _) = call(&f.app, "GET", &loc, &[], Body::empty()).await?;
    assert_eq!((s, hdr(&h, "range")), (StatusCode::NO_CONTENT, "0-999"));
    // A chunk at the wrong offset is refused.
    let (s, _, b) = call(
        &f.app,
        "PATCH",
        &loc,
        &[("content-range", "1500-1999")],
        Body::from(data[1500..2000].to_vec()),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID")
    );
    // Resume at 1000.
    let (s, h, _) = call(
        &f.app,
        "PATCH",
        &loc,
        &[("content-range", "1000-2499")],
        Body::from(data[1000..2500].to_vec()),
    )
    .await?;
    assert_eq!((s, hdr(&h, "range")), (StatusCode::ACCEPTED, "0-2499"));
    let loc = hdr(&h, "location").to_string();
    // Finish with the last bytes in the PUT.
    let (s, h, b) = call(
        &f.app,
        "PUT",
        &format!("{loc}?digest={d}"),
        &[],
        Body::from(data[2500..].to_vec()),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    assert_eq!(hdr(&h, "docker-content-digest"), d);
    assert_eq!(f.st.store.get_blob(&d)?, data);
    let (s, _, b) = call(&f.app, "GET", &loc, &[], Body::empty()).await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN")
    );
    // Upload ids are never paths.
    let (s, _, _) = call(
        &f.app,
        "GET",
        "/v2/x/blobs/uploads/..%2F..%2Fetc",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn manifests_by_tag_and_digest() -> TestResult {
    let f = fixture()?;
    let m = tiny_image(&f.app, "library/busybox", b"layer-1").await?;
    let d = sha256_digest(&m);
    let (s, h, b) = call(
        &f.app,
        "PUT",
        "/v2/library/busybox/manifests/1.36",
        &[("content-type", OCI_MANIFEST)],
        Body::from(m.clone()),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    assert_eq!(hdr(&h, "docker-content-digest"), d);
    assert_eq!(
        hdr(&h, "location"),
        format!("/v2/library/busybox/manifests/{d}")
    );
    // Recorded in the store index: the runtime sees the pushed image.
    assert_eq!(f.st.store.resolve("library/busybox:1.36")?, d);

    for r in ["1.36", d.as_str()] {
        let (s, h, b) = call(
            &f.app,
            "GET",
            &format!("/v2/library/busybox/manifests/{r}"),
            &[],
            Body::empty(),
        )
        .await?;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(&b[..], &m[..]);
        assert_eq!(hdr(&h, "content-type"), OCI_MANIFEST);
        assert_eq!(hdr(&h, "docker-content-digest"), d);
        let (s, h, b) = call(
            &f.app,
            "HEAD",
            &format!("/v2/library/busybox/manifests/{r}"),
            &[],
            Body::empty(),
        )
        .await?;
        assert_eq!(
            (s, hdr(&h, "content-length")),
            (StatusCode::OK, m.len().to_string().as_str())
        );
        assert!(b.is_empty());
    }
    // Same manifest under a second tag, and by digest.
    let (s, _, _) = call(
        &f.app,
        "PUT",
        "/v2/library/busybox/manifests/latest",
        &[("content-type", OCI_MANIFEST)],
        Body::from(m.clone()),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, _) = call(
        &f.app,
        "PUT",
        &format!("/v2/library/busybox/manifests/{d}"),
        &[],
        Body::from(m.clone()),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, b) = call(
        &f.app,
        "GET",
        "/v2/library/busybox/tags/list",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&b)?;
    assert_eq!(
        v,
        serde_json::json!({"name": "library/busybox", "tags": ["1.36", "latest"]})
    );
    let (_, h, b) = call(
        &f.app,
        "GET",
        "/v2/library/busybox/tags/list?n=1",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b)?["tags"],
        serde_json::json!(["1.36"])
    );
    assert!(hdr(&h, "link").contains("last=1.36"));
    let (s, _, b) = call(
        &f.app,
        "GET",
        "/v2/nothing/here/tags/list",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );

    // Delete a tag; the other still resolves.
    let (s, _, _) = call(
        &f.app,
        "DELETE",
        "/v2/library/busybox/manifests/1.36",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _, b) = call(
        &f.app,
        "GET",
        "/v2/library/busybox/manifests/1.36",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let (s, _, _) = call(
        &f.app,
        "GET",
        "/v2/library/busybox/manifests/latest",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn bad_manifests_are_refused() -> TestResult {
    let f = fixture()?;
    let (s, _, b) = call(
        &f.app,
        "PUT",
        "/v2/x/manifests/t",
        &[("content-type", OCI_MANIFEST)],
        Body::from("{not json"),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );
    let (s, _, b) = call(
        &f.app,
        "PUT",
        "/v2/x/manifests/t",
        &[],
        Body::from(r#"{"schemaVersion":1}"#),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );

    let m = tiny_image(&f.app, "x", b"layer").await?;
    let wrong = sha256_digest(b"other");
    let (s, _, b) = call(
        &f.app,
        "PUT",
        &format!("/v2/x/manifests/{wrong}"),
        &[],
        Body::from(m.clone()),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );

    let mut v: serde_json::Value = serde_json::from_slice(&m)?;
    let missing = sha256_digest(b"never uploaded");
    v["layers"][0]["digest"] = serde_json::json!(missing);
    let (s, _, b) = call(
        &f.app,
        "PUT",
        "/v2/x/manifests/t",
        &[],
        Body::from(serde_json::to_vec(&v)?),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    let detail: serde_json::Value = serde_json::from_slice(&b)?;
    assert_eq!(
        detail["errors"][0]["detail"]["digest"],
        serde_json::json!(missing)
    );
    let (s, _, b) = call(&f.app, "GET", "/v2/x/manifests/t", &[], Body::empty()).await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    // A config blob is not a manifest.
    let cfg = v["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (s, _, b) = call(
        &f.app,
        "GET",
        &format!("/v2/x/manifests/{cfg}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    Ok(())
}

#[tokio::test]
async fn cross_repository_mount() -> TestResult {
    let f = fixture()?;
    let d = upload(&f.app, "team/a", b"shared layer").await?;
    let (s, h, _) = call(
        &f.app,
        "POST",
        &format!("/v2/team/b/blobs/uploads/?mount={d}&from=team/a"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(hdr(&h, "location"), format!("/v2/team/b/blobs/{d}"));
    assert_eq!(hdr(&h, "docker-content-digest"), d);
    let unknown = sha256_digest(b"absent");
    let (s, h, _) = call(
        &f.app,
        "POST",
        &format!("/v2/team/b/blobs/uploads/?mount={unknown}&from=team/a"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::ACCEPTED, "falls back to a new upload");
    assert!(hdr(&h, "location").starts_with("/v2/team/b/blobs/uploads/"));
    Ok(())
}

/// A peer holding blobs in memory; counts fetches.
struct FakePeer {
    blobs: HashMap<String, Vec<u8>>,
    fetches: Mutex<usize>,
}

impl BlobSource for FakePeer {
    fn fetch<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<Option<BlobStream>>> {
        Box::pin(async move {
            if let Ok(mut n) = self.fetches.lock() {
                *n += 1;
            }
            Ok(self.blobs.get(digest).map(|b| {
                let b = Bytes::from(b.clone());
                futures::stream::iter(vec![Ok(b)]).boxed()
            }))
        })
    }
}

#[tokio::test]
async fn missing_blobs_come_from_a_peer_verified() -> TestResult {
    let dir = tempfile::tempdir()?;
    let good = b"peer blob".to_vec();
    let gd = sha256_digest(&good);
    let liar = sha256_digest(b"what it claims");
    let mut blobs = HashMap::new();
    blobs.insert(gd.clone(), good.clone());
    blobs.insert(liar.clone(), b"something else".to_vec());
    let peer = Arc::new(FakePeer {
        blobs,
        fetches: Mutex::new(0),
    });
    let store = Arc::new(ImageStore::open(dir.path())?);
    let st = RegistryState::new(store.clone())?.with_peer(peer.clone());
    let app = router(st);
    let (s, _, b) = call(
        &app,
        "GET",
        &format!("/v2/any/blobs/{gd}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!((s, &b[..]), (StatusCode::OK, &good[..]));
    assert!(store.has_blob(&gd), "kept after the peer fetch");
    let (s, _, _) = call(
        &app,
        "GET",
        &format!("/v2/any/blobs/{gd}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        *peer.fetches.lock().map_err(|_| "poisoned")?,
        1,
        "second read is local"
    );
    let (s, _, b) = call(
        &app,
        "GET",
        &format!("/v2/any/blobs/{liar}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
    assert!(!store.has_blob(&liar));
    // Peer-originated requests are not forwarded again.
    let other = sha256_digest(b"x");
    let (s, _, _) = call(
        &app,
        "GET",
        &format!("/v2/any/blobs/{other}"),
        &[(NO_PEER_HEADER, "1")],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(*peer.fetches.lock().map_err(|_| "poisoned")?, 2);
    Ok(())
}

#[tokio::test]
async fn referrers_list_signatures() -> TestResult {
    let f = fixture()?;
    let m = tiny_image(&f.app, "library/app", b"app layer").await?;
    let d = sha256_digest(&m);
    let (s, _, _) = call(
        &f.app,
        "PUT",
        "/v2/library/app/manifests/v1",
        &[],
        Body::from(m),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED);
    let key = crate::SigningKey::generate()?;
    let sig_digest = crate::attach_signature(&f.st.store, "library/app", &key.sign(&d)?)?;

    let (s, h, b) = call(
        &f.app,
        "GET",
        &format!("/v2/library/app/referrers/{d}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hdr(&h, "content-type"), crate::manifest::OCI_INDEX);
    let v: serde_json::Value = serde_json::from_slice(&b)?;
    assert_eq!(v["manifests"][0]["digest"], serde_json::json!(sig_digest));
    assert_eq!(
        v["manifests"][0]["artifactType"],
        serde_json::json!(crate::SIGNATURE_ARTIFACT_TYPE)
    );
    let (_, h, b) = call(
        &f.app,
        "GET",
        &format!("/v2/library/app/referrers/{d}?artifactType=application/x-other"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(hdr(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b)?["manifests"],
        serde_json::json!([])
    );

    // The cosign-style tag serves the same artifact, and tags/list shows it.
    let tag = crate::signature_tag(&d);
    let (s, h, _) = call(
        &f.app,
        "GET",
        &format!("/v2/library/app/manifests/{tag}"),
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        (s, hdr(&h, "docker-content-digest")),
        (StatusCode::OK, sig_digest.as_str())
    );
    let (_, _, b) = call(
        &f.app,
        "GET",
        "/v2/library/app/tags/list",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b)?["tags"],
        serde_json::json!([tag, "v1"])
    );
    // The artifact is not listed as an image.
    assert_eq!(f.st.store.list()?.len(), 1);
    Ok(())
}

#[test]
fn routes_parse_names_with_slashes() {
    assert_eq!(Route::parse("a/b/c/tags/list"), Some(Route::Tags("a/b/c")));
    assert_eq!(
        Route::parse("library/busybox/manifests/latest"),
        Some(Route::Manifest("library/busybox", "latest"))
    );
    assert_eq!(
        Route::parse("a/manifests/b/manifests/v1"),
        Some(Route::Manifest("a/manifests/b", "v1"))
    );
    assert_eq!(
        Route::parse("x/y/blobs/uploads/"),
        Some(Route::UploadStart("x/y"))
    );
    assert_eq!(
        Route::parse("x/blobs/uploads/abc"),
        Some(Route::Upload("x", "abc"))
    );
    assert_eq!(
        Route::parse("x/blobs/sha256:1"),
        Some(Route::Blob("x", "sha256:1"))
    );
    assert_eq!(Route::parse("x/unknown"), None);
    assert_eq!(
        parse_query("digest=sha256%3Aab&from=a%2Fb")["digest"],
        "sha256:ab"
    );
    assert_eq!(parse_query("digest=sha256%3Aab&from=a%2Fb")["from"], "a/b");
}

#[tokio::test]
async fn docker_schema2_manifests_are_images_too() -> TestResult {
    let f = fixture()?;
    let layer = upload(&f.app, "d/app", b"docker layer").await?;
    let cfg = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let c = upload(&f.app, "d/app", cfg).await?;
    let m = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::manifest::DOCKER_MANIFEST,
        "config": { "mediaType": crate::manifest::DOCKER_CONFIG, "digest": c, "size": cfg.len() },
        "layers": [{ "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer, "size": 12 }]
    }))?;
    let d = sha256_digest(&m);
    let (s, _, b) = call(
        &f.app,
        "PUT",
        "/v2/d/app/manifests/v2",
        &[("content-type", crate::manifest::DOCKER_MANIFEST)],
        Body::from(m),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    assert_eq!(f.st.store.resolve("d/app:v2")?, d);
    let (s, h, _) = call(&f.app, "GET", "/v2/d/app/manifests/v2", &[], Body::empty()).await?;
    assert_eq!(
        (s, hdr(&h, "content-type")),
        (StatusCode::OK, crate::manifest::DOCKER_MANIFEST)
    );
    // A content type that contradicts the body is refused.
    let (s, _, b) = call(
        &f.app,
        "PUT",
        "/v2/d/app/manifests/v3",
        &[("content-type", OCI_MANIFEST)],
        Body::from(f.st.store.get_blob(&d)?),
    )
    .await?;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );
    // Stale uploads are purged.
    let (s, _, _) = call(
        &f.app,
        "POST",
        "/v2/d/app/blobs/uploads/",
        &[],
        Body::empty(),
    )
    .await?;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(
        f.st.purge_stale_uploads(std::time::Duration::from_secs(3600))?,
        0
    );
    assert_eq!(f.st.purge_stale_uploads(std::time::Duration::ZERO)?, 1);
    Ok(())
}
