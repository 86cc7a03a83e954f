//! Registry benchmark: one manager on loopback.
//!
//! - push and pull of a multi-layer image (default 200 MB in 4 layers of random,
//!   incompressible bytes) between an OCI layout directory and the manager's registry
//!   (`flotilla image push|pull` over mTLS), against `skopeo copy oci:A oci:B` between two
//!   local OCI layouts in the same run (the anchor: the same bytes, no network, no TLS);
//! - a second image sharing all layers but one: only the new layer moves (bytes shown).
//!
//! Run: `cargo build --release -p flotilla -p flotilla-bench && target/release/registry [MB] [layers]`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use flotilla_bench::*;

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn put_blob(layout: &Path, data: &[u8]) -> anyhow::Result<(String, usize)> {
    let d = sha(data);
    let p = layout.join("blobs/sha256").join(&d[7..]);
    if !p.exists() {
        std::fs::write(&p, data)?;
    }
    Ok((d, data.len()))
}

/// A tar holding one file of `size` random bytes (an uncompressed OCI layer).
fn random_layer(size: usize, name: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = vec![0u8; size];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut data)?;
    let mut b = tar::Builder::new(Vec::with_capacity(size + 4096));
    let mut h = tar::Header::new_gnu();
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, &data[..])?;
    Ok(b.into_inner()?)
}

/// Writes an image of `layers` into the layout and tags it in index.json.
fn write_image(layout: &Path, tag: &str, layers: &[Vec<u8>]) -> anyhow::Result<()> {
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (d, size) = put_blob(layout, l)?;
        diff_ids.push(d.clone());
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let (cd, cs) = put_blob(layout, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs },
        "layers": descs,
    });
    let mb = serde_json::to_vec(&manifest)?;
    let (md, ms) = put_blob(layout, &mb)?;
    let idx_path = layout.join("index.json");
    let mut idx: serde_json::Value = match std::fs::read(&idx_path) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(_) => serde_json::json!({ "schemaVersion": 2, "manifests": [] }),
    };
    let entries = idx["manifests"]
        .as_array_mut()
        .context("index.json manifests")?;
    entries.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }));
    std::fs::write(&idx_path, serde_json::to_vec(&idx)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let o = cmd.output()?;
    let el = t.elapsed();
    if !o.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok((el, String::from_utf8_lossy(&o.stdout).trim().to_string()))
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let total_mb: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let nlayers: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(4);
    let skopeo = Command::new("skopeo").arg("--version").output();
    if !matches!(&skopeo, Ok(o) if o.status.success()) {
        bail!("skopeo is needed for the anchor: apt-get install skopeo (scripts/setup.sh)");
    }
    let tmp = tempfile::tempdir()?;
    println!("machine: {}", machine());
    println!("flotilla: {}", flotilla_bin().display());
    println!("image: {total_mb} MB in {nlayers} layers of random bytes (uncompressed tar layers)");

    let layer_size = total_mb * 1_000_000 / nlayers;
    let mut layers = Vec::new();
    for i in 0..nlayers {
        layers.push(random_layer(layer_size, &format!("data{i}"))?);
    }
    let bytes: u64 = layers.iter().map(|l| l.len() as u64).sum();
    let a = tmp.path().join("A");
    write_image(&a, "v1", &layers)?;
    // v2 shares all layers but the last.
    let mut v2 = layers.clone();
    if let Some(last) = v2.last_mut() {
        *last = random_layer(layer_size, "data-new")?;
    }
    let new_bytes = v2.last().map(|l| l.len() as u64).unwrap_or(0);
    // The page cache stays warm for both sides: what is compared is the copy path.
    write_image(&a, "v2", &v2)?;

    let mut node = Node {
        name: "m1".into(),
        dir: tmp.path().join("m1"),
        addr: "127.0.101.1:4440".into(),
        child: None,
        extra: vec![],
    };
    node.spawn(&["--init"])?;
    let sock = node.socket();
    wait_for("m1", Duration::from_secs(30), || {
        cli(&sock, &["node", "ls"]).ok()
    })?;
    let host = format!("https://{}", node.addr);
    let admin = node.dir.join("admin");
    let flotilla = |args: &[&str]| {
        let mut c = Command::new(flotilla_bin());
        c.args(["--host", &host, "--tls-dir"])
            .arg(&admin)
            .args(args);
        c
    };

    // Anchor: skopeo between two local layouts.
    let c = tmp.path().join("C");
    let (t_skopeo, _) = run(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci:{}:v1", a.display()),
        &format!("oci:{}:v1", c.display()),
    ]))?;
    // Registry push and pull (fresh registry, fresh target layout).
    let (t_push, out_push) = run(&mut flotilla(&[
        "image",
        "push",
        "--no-sign",
        &format!("{}:v1", a.display()),
        "big:1",
    ]))?;
    let b = tmp.path().join("B");
    let (t_pull, out_pull) = run(&mut flotilla(&[
        "image",
        "pull",
        "big:1",
        &format!("{}:v1", b.display()),
    ]))?;
    // Second image: only the new layer moves.
    let (t_push2, out_push2) = run(&mut flotilla(&[
        "image",
        "push",
        "--no-sign",
        &format!("{}:v2", a.display()),
        "big:2",
    ]))?;
    let (t_pull2, out_pull2) = run(&mut flotilla(&[
        "image",
        "pull",
        "big:2",
        &format!("{}:v2", b.display()),
    ]))?;
    let (t_skopeo2, _) = run(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci:{}:v2", a.display()),
        &format!("oci:{}:v2", c.display()),
    ]))?;

    let anchor = mbps(bytes, t_skopeo);
    println!("\n| step | time | throughput | vs skopeo oci→oci |");
    println!("|---|---|---|---|");
    println!(
        "| skopeo copy oci:A oci:C (anchor, {:.0} MB) | {:.2} s | {:.0} MB/s | 1.00× |",
        bytes as f64 / 1e6,
        t_skopeo.as_secs_f64(),
        anchor
    );
    for (what, t) in [
        ("flotilla image push (mTLS)", t_push),
        ("flotilla image pull (mTLS)", t_pull),
    ] {
        println!(
            "| {what} | {:.2} s | {:.0} MB/s | {:.2}× |",
            t.as_secs_f64(),
            mbps(bytes, t),
            mbps(bytes, t) / anchor
        );
    }
    println!(
        "| second image, {:.0} MB new layer: push | {:.2} s | {} |  |",
        new_bytes as f64 / 1e6,
        t_push2.as_secs_f64(),
        out_push2
    );
    println!(
        "| second image: pull | {:.2} s | {} |  |",
        t_pull2.as_secs_f64(),
        out_pull2
    );
    println!(
        "| second image: skopeo oci→oci | {:.2} s |  |  |",
        t_skopeo2.as_secs_f64()
    );
    println!("\npush: {out_push}\npull: {out_pull}");
    Ok(())
}
