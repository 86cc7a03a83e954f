//! Image loading: docker save archives, OCI layouts and archives, whiteouts, many layers,
//! and space freed on removal.
mod common;
use common::{run_to_exit, Env};
use flotilla_runtime::testing::spec;
use flotilla_runtime::{RuntimeDriver, RuntimeError};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::Path;

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar with regular files (and empty whiteout markers).
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

fn busybox_layer() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    flotilla_runtime::testing::busybox_rootfs(dir.path()).expect("rootfs");
    fs::create_dir_all(dir.path().join("data")).expect("mkdir");
    fs::write(dir.path().join("data/a"), "a").expect("write");
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir.path()).expect("tar");
    b.into_inner().expect("tar")
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh", "-c", "echo default-cmd"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .expect("json")
}

fn tar_dir(dir: &Path, out: &Path) {
    let f = fs::File::create(out).expect("create");
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", dir).expect("tar");
    b.finish().expect("finish");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gz");
    e.finish().expect("gz")
}

/// Writes an OCI layout with the given layer tars (gzipping the odd ones).
fn oci_layout(dir: &Path, layers: &[Vec<u8>], name: &str) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("mkdir");
    let put = |data: &[u8]| -> String {
        let d = sha(data);
        fs::write(blobs.join(&d[7..]), data).expect("blob");
        d
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        diff_ids.push(sha(l));
        let (data, mt) = if i % 2 == 1 {
            (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (l.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        descs.push(json!({"mediaType": mt, "digest": put(&data), "size": data.len()}));
    }
    let cfg = config_json(&diff_ids);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&cfg), "size": cfg.len()},
        "layers": descs
    }))
    .expect("json");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest),
            "size": manifest.len(), "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "v1"}}]
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index");
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_docker_save_archive_with_whiteouts() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("dsave");
    let rt = &env.runtime;
    let l1 = busybox_layer();
    let l2 = tar_of(&[
        ("hello.txt", b"hi\n"),
        ("etc/.wh.group", b""),
        ("data/.wh..wh..opq", b""),
        ("data/b", b"b"),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("l1")).expect("mkdir");
    fs::create_dir_all(src.join("l2")).expect("mkdir");
    fs::write(src.join("l1/layer.tar"), &l1).expect("write");
    fs::write(src.join("l2/layer.tar"), &l2).expect("write");
    let cfg = config_json(&[sha(&l1), sha(&l2)]);
    let cfg_name = format!("{}.json", &sha(&cfg)[7..]);
    fs::write(src.join(&cfg_name), &cfg).expect("write");
    let manifest = json!([{"Config": cfg_name, "RepoTags": ["multi:v1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]);
    fs::write(
        src.join("manifest.json"),
        serde_json::to_vec(&manifest).expect("json"),
    )
    .expect("write");
    let archive = dir.path().join("save.tar");
    tar_dir(&src, &archive);

    let loaded = rt
        .images()
        .load_archive(&archive)
        .expect("load docker save");
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].0, "multi:v1");
    let digest = rt.images().resolve("multi:v1").expect("resolve");
    let mut s = spec(
        &env.id("wh"),
        "multi:v1",
        &[
            "sh",
            "-c",
            "cat /hello.txt; ls /data; test -e /etc/group || echo no-group",
        ],
    );
    s.args = Some(s.args.take().unwrap_or_default());
    let (code, lines) = run_to_exit(rt, s).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(
        lines,
        ["hi", "b", "no-group"],
        "whiteout and opaque dir applied"
    );
    // The image's own cmd is used when the task sets none.
    let mut s = spec(&env.id("cmd"), &digest, &[]);
    s.args = None;
    let (_, lines) = run_to_exit(rt, s).await;
    assert_eq!(lines, ["default-cmd"]);

    // In use → refused; after removing the containers → blobs and layers freed.
    assert!(matches!(
        rt.remove_image("multi:v1"),
        Err(RuntimeError::ImageInUse { .. })
    ));
    for c in rt.list().await.expect("list") {
        rt.remove(&c.id, false).await.expect("remove");
    }
    rt.remove_image("multi:v1").expect("remove image");
    let layers: Vec<_> = fs::read_dir(env.root.join("images/layers"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    for l in [&l1, &l2] {
        let hex = sha(l)[7..].to_string();
        assert!(
            !layers.iter().any(|n| n.to_string_lossy().starts_with(&hex)),
            "layer freed: {layers:?}"
        );
    }
    assert!(rt
        .images()
        .list()
        .expect("list")
        .iter()
        .all(|i| i.digest != digest));
    assert!(rt.images().resolve("multi:v1").is_err());
    assert!(!rt.images().has_blob(&sha(&l2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t51_oci_layout_and_archive() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("oci");
    let rt = &env.runtime;
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    oci_layout(
        &layout,
        &[busybox_layer(), tar_of(&[("msg", b"from-oci\n")])],
        "oci:v1",
    );
    let loaded = rt.images().load_archive(&layout).expect("load layout dir");
    assert_eq!(loaded[0].0, "oci:v1");
    let (code, lines) = run_to_exit(rt, spec(&env.id("dir"), "oci:v1", &["cat", "/msg"])).await;
    assert_eq!((code, lines), (0, vec!["from-oci".to_string()]));
    // The same layout as a gzipped tar archive, under another name.
    let layout2 = dir.path().join("layout2");
    oci_layout(
        &layout2,
        &[busybox_layer(), tar_of(&[("msg", b"from-archive\n")])],
        "oci:v2",
    );
    let tarball = dir.path().join("oci.tar");
    tar_dir(&layout2, &tarball);
    let gz = dir.path().join("oci.tar.gz");
    fs::write(&gz, gzip(&fs::read(&tarball).expect("read"))).expect("write");
    rt.images().load_archive(&gz).expect("load oci archive");
    let (code, lines) = run_to_exit(rt, spec(&env.id("tar"), "oci:v2", &["cat", "/msg"])).await;
    assert_eq!((code, lines), (0, vec!["from-archive".to_string()]));
    // A corrupted blob is refused.
    let layout3 = dir.path().join("layout3");
    oci_layout(&layout3, &[tar_of(&[("x", b"1")])], "bad:v1");
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(layout3.join("index.json")).expect("read")).expect("json");
    let mdigest = idx["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let m: serde_json::Value = serde_json::from_slice(
        &fs::read(layout3.join("blobs/sha256").join(&mdigest[7..])).expect("read"),
    )
    .expect("json");
    let ld = m["layers"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    fs::write(layout3.join("blobs/sha256").join(&ld[7..]), b"tampered").expect("write");
    assert!(matches!(
        rt.images().load_archive(&layout3),
        Err(RuntimeError::DigestMismatch { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t52_many_layers_exceed_the_mount_option_limit() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("layers");
    let rt = &env.runtime;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut layers = vec![busybox_layer()];
    for i in 0..120 {
        let name = format!("layer-{i:03}");
        layers.push(tar_of(&[(name.as_str(), name.as_bytes())]));
    }
    oci_layout(dir.path(), &layers, "many:v1");
    rt.images().load_archive(dir.path()).expect("load");
    let (code, lines) = run_to_exit(
        rt,
        spec(
            &env.id("many"),
            "many:v1",
            &["sh", "-c", "ls / | grep -c layer-"],
        ),
    )
    .await;
    assert_eq!(
        (code, lines),
        (0, vec!["120".to_string()]),
        "all 121 layers visible"
    );
}
