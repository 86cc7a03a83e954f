//! `flotilla image …`: images in the content store of the node the CLI talks to.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::Method;

use flotilla_api::Client;
use flotilla_registry::{ImageRef, Progress, RegistryClient, SigningKey};

use crate::client::{enc, get};
use crate::output::{add_row, print_json, print_table, table};
use crate::{CliError, Format, ImageCmd, SignArgs, DEFAULT_DATA_DIR};

/// File name of the admin's signing key in an admin bundle (written by `node run --init`).
pub use flotilla_registry::SIGNING_KEY_FILE;

/// The data directory behind a `unix://DIR/api.sock` host (the default host included).
fn data_dir_of(host: Option<&str>) -> Option<PathBuf> {
    let host = host
        .map(str::to_string)
        .unwrap_or_else(|| format!("unix://{DEFAULT_DATA_DIR}/api.sock"));
    let sock = PathBuf::from(host.strip_prefix("unix://")?);
    sock.parent().map(Path::to_path_buf)
}

/// The admin bundle to use: `--tls-dir`, else DATA_DIR/admin of a unix-socket host.
fn admin_dir(host: Option<&str>, tls_dir: Option<&Path>) -> Option<PathBuf> {
    tls_dir
        .map(Path::to_path_buf)
        .or_else(|| data_dir_of(host).map(|d| d.join("admin")))
}

/// The signing key: `--sign-key`, else `signing-key.pem` in the admin bundle.
pub fn find_signing_key(
    host: Option<&str>,
    tls_dir: Option<&Path>,
    explicit: Option<&Path>,
) -> Result<SigningKey, CliError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => admin_dir(host, tls_dir)
            .map(|d| d.join(SIGNING_KEY_FILE))
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                CliError::usage(
                    "no signing key found: pass --sign-key FILE (the admin bundle's signing-key.pem, \
                     DATA_DIR/admin of the first manager), or --tls-dir with the admin bundle, or --no-sign",
                )
            })?,
    };
    SigningKey::load(&path).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

fn repository_of(name: &str) -> String {
    ImageRef::parse(name)
        .map(|r| r.name)
        .unwrap_or_else(|_| "images".to_string())
}

/// Signs the manifest `digest` with `key` and attaches the signature to the image in the
/// store of the node `client` talks to (tagged `sha256-<hex>.sig` in `repository`).
pub async fn sign_image(
    client: &Client,
    key: &SigningKey,
    repository: &str,
    digest: &str,
) -> Result<(), CliError> {
    let sig = key
        .sign(digest)
        .map_err(|e| CliError::new(format!("signing {digest}: {e}")))?;
    let _: serde_json::Value = client
        .post_json(
            "/v1/images/signatures",
            &serde_json::json!({ "repository": repository, "signature": sig }),
        )
        .await?;
    Ok(())
}

/// The key to sign with, unless `--no-sign`.
fn signer(
    host: Option<&str>,
    tls_dir: Option<&Path>,
    sign: &SignArgs,
) -> Result<Option<SigningKey>, CliError> {
    if sign.no_sign {
        return Ok(None);
    }
    find_signing_key(host, tls_dir, sign.sign_key.as_deref()).map(Some)
}

/// A `/v2/` client for the node the CLI talks to, authenticated with the admin bundle.
fn registry_client(host: Option<&str>, tls_dir: Option<&Path>) -> Result<RegistryClient, CliError> {
    let dir = admin_dir(host, tls_dir).ok_or_else(|| {
        CliError::usage("the registry needs the admin bundle: pass --tls-dir DIR (DATA_DIR/admin of the first manager)")
    })?;
    let addr = match host.and_then(|h| h.strip_prefix("https://")) {
        Some(a) => a.trim_end_matches('/').to_string(),
        None => {
            let data =
                data_dir_of(host).ok_or_else(|| CliError::usage("--host is not understood"))?;
            let p = data.join("node.json");
            let v: serde_json::Value = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| {
                    CliError::usage(format!(
                        "cannot read the node's address from {}: use --host https://MANAGER:PORT --tls-dir ADMIN_BUNDLE",
                        p.display()
                    ))
                })?;
            v["addr"].as_str().unwrap_or_default().to_string()
        }
    };
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| {
            CliError::usage(format!(
                "{}: cannot read {name}: {e} (the registry needs the admin bundle: --tls-dir DIR)",
                dir.display()
            ))
        })
    };
    let (ca, cert, key) = (read("ca.pem")?, read("cert.pem")?, read("key.pem")?);
    let cfg = flotilla_pki::client_config(&ca, Some((&cert, &key)))
        .map_err(|e| CliError::usage(format!("{}: {e}", dir.display())))?;
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols.clear();
    RegistryClient::with_tls(&format!("https://{addr}"), Arc::new(cfg))
        .and_then(|c| c.with_server_name(flotilla_pki::SERVER_NAME))
        .map_err(|e| CliError::usage(format!("registry at {addr}: {e}")))
}

/// `DIR[:TAG]` (a colon followed by something that is not a path).
fn split_layout(arg: &str) -> (PathBuf, Option<String>) {
    match arg.rsplit_once(':') {
        Some((d, t)) if !d.is_empty() && !t.is_empty() && !t.contains('/') => {
            (PathBuf::from(d), Some(t.to_string()))
        }
        _ => (PathBuf::from(arg), None),
    }
}

/// Byte counts of a transfer, and a progress bar on a terminal.
struct Transfer {
    bar: Option<indicatif::ProgressBar>,
    moved: u64,
    present: u64,
}

impl Transfer {
    fn new(label: &str) -> Transfer {
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(label.to_string());
            b
        });
        Transfer {
            bar,
            moved: 0,
            present: 0,
        }
    }

    fn on(&mut self, p: Progress) {
        match p {
            Progress::BlobPresent { size, .. } => {
                self.present += size;
                if let Some(b) = &self.bar {
                    b.inc_length(size);
                    b.inc(size);
                }
            }
            Progress::BlobStarted { size, .. } => {
                if let Some(b) = &self.bar {
                    b.inc_length(size);
                }
            }
            Progress::BlobDone { size, .. } => {
                self.moved += size;
                if let Some(b) = &self.bar {
                    b.inc(size);
                }
            }
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A progress bar of the archive's upload (nothing when stdout is not a terminal); once the
/// bytes are sent it says the manager is unpacking.
fn upload_bar(what: &str, bytes: usize) -> Option<indicatif::ProgressBar> {
    std::io::stdout().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(bytes as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_message(what.to_string());
        b
    })
}

/// POSTs an archive with an upload bar.
async fn post_archive(
    client: &flotilla_api::Client,
    path: &str,
    body: Vec<u8>,
    what: &str,
) -> Result<flotilla_api::client::Response, CliError> {
    let bar = upload_bar(what, body.len());
    let total = body.len() as u64;
    let b = bar.clone();
    let progress: flotilla_api::upload::Progress = std::sync::Arc::new(move |n| {
        if let Some(b) = &b {
            b.inc(n);
            if b.position() >= total {
                b.set_message("unpacking on the manager");
            }
        }
    });
    let resp = client
        .request_with_progress(Method::POST, path, body, progress)
        .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(resp?)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn tar_dir(dir: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", dir)
        .map_err(|e| CliError::new(format!("reading {}: {e}", dir.display())))?;
    b.into_inner()
        .map_err(|e| CliError::new(format!("packing {}: {e}", dir.display())))
}

pub async fn run(
    client: &Client,
    host: Option<&str>,
    tls_dir: Option<&Path>,
    cmd: ImageCmd,
) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Import {
            src,
            name,
            cmd,
            entrypoint,
            env,
            workdir,
            user,
            sign,
        } => {
            let key = signer(host, tls_dir, &sign)?;
            let body = if src.is_dir() {
                tar_dir(&src)?
            } else {
                std::fs::read(&src).map_err(|e| {
                    CliError::usage(format!(
                        "{}: {e}; give a directory or a tar file",
                        src.display()
                    ))
                })?
            };
            let cmd = cmd.map(|c| {
                if c.len() == 1 && c[0].contains(' ') {
                    vec!["/bin/sh".to_string(), "-c".to_string(), c[0].clone()]
                } else {
                    c
                }
            });
            let config = serde_json::json!({
                "cmd": cmd, "entrypoint": entrypoint, "env": env, "workdir": workdir, "user": user,
            });
            let path = format!(
                "/v1/images/import?name={}&config={}",
                enc(&name),
                enc(&config.to_string())
            );
            let client = client
                .clone()
                .with_timeout(std::time::Duration::from_secs(600));
            let resp = post_archive(&client, &path, body, "importing").await?;
            let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
            let digest = v["digest"].as_str().unwrap_or("");
            if let Some(k) = &key {
                sign_image(&client, k, &repository_of(&name), digest).await?;
            }
            println!("{} {}", v["name"].as_str().unwrap_or(&name), digest);
            Ok(())
        }
        ImageCmd::Load { file, sign } => {
            let key = signer(host, tls_dir, &sign)?;
            let body = std::fs::read(&file)
                .map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
            let client = client
                .clone()
                .with_timeout(std::time::Duration::from_secs(600));
            let resp = post_archive(&client, "/v1/images/load", body, "loading").await?;
            let v: Vec<serde_json::Value> = serde_json::from_slice(&resp.body).unwrap_or_default();
            for i in v {
                if let (Some(k), Some(d)) = (&key, i["digest"].as_str()) {
                    let name = i["name"].as_str().unwrap_or("");
                    sign_image(&client, k, &repository_of(name), d).await?;
                }
                println!(
                    "Loaded image: {} {}",
                    i["name"].as_str().unwrap_or(""),
                    i["digest"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        ImageCmd::Ls(f) => {
            let images: Vec<serde_json::Value> = get(client, "/v1/images").await?;
            if f.format == Format::Json {
                return print_json(&images);
            }
            let mut t = table(&["REFERENCE", "DIGEST", "LAYERS", "SIZE"]);
            for i in &images {
                let refs: Vec<String> = i["refs"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| r.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let digest = i["digest"].as_str().unwrap_or("");
                add_row(
                    &mut t,
                    vec![
                        if refs.is_empty() {
                            "<none>".to_string()
                        } else {
                            refs.join(", ")
                        },
                        digest.chars().take(19).collect(),
                        i["layers"].to_string(),
                        format!(
                            "{:.1} MiB",
                            i["size"].as_u64().unwrap_or(0) as f64 / 1048576.0
                        ),
                    ],
                );
            }
            print_table(&t);
            Ok(())
        }
        ImageCmd::Inspect { image, format: _ } => {
            let v: serde_json::Value = get(client, &format!("/v1/images/{}", enc(&image))).await?;
            print_json(&v)
        }
        ImageCmd::Sign { image, key } => {
            let key = SigningKey::load(&key)
                .map_err(|e| CliError::usage(format!("--key {}: {e}", key.display())))?;
            let v: serde_json::Value = get(client, &format!("/v1/images/{}", enc(&image))).await?;
            let digest = v["summary"]["digest"].as_str().ok_or_else(|| {
                CliError::new(format!("unexpected answer inspecting {image}: no digest"))
            })?;
            sign_image(client, &key, &repository_of(&image), digest).await?;
            println!("Signed {image} ({digest}) with key {}", key.key_id());
            Ok(())
        }
        ImageCmd::Push { src, dest, sign } => {
            let key = signer(host, tls_dir, &sign)?;
            let (dir, tag) = split_layout(&src);
            let target = ImageRef::parse(&dest).map_err(|e| {
                CliError::usage(format!("{dest:?}: {e}; give NAME[:TAG], e.g. web:1"))
            })?;
            let reg = registry_client(host, tls_dir)?;
            let mut t = Transfer::new(&format!("pushing {target}"));
            let res =
                flotilla_registry::push_layout(&reg, &dir, tag.as_deref(), &dest, |p| t.on(p))
                    .await;
            t.finish();
            let digest = res.map_err(|e| CliError::new(format!("push {src} → {dest}: {e}")))?;
            if let Some(k) = &key {
                sign_image(client, k, &target.name, &digest).await?;
            }
            println!(
                "{target} {digest} ({} sent, {} already there{})",
                mib(t.moved),
                mib(t.present),
                if key.is_some() { ", signed" } else { "" }
            );
            Ok(())
        }
        ImageCmd::Pull { src, dest } => {
            let (dir, tag) = split_layout(&dest);
            let reg = registry_client(host, tls_dir)?;
            let mut t = Transfer::new(&format!("pulling {src}"));
            let res =
                flotilla_registry::pull_layout(&reg, &src, &dir, tag.as_deref(), |p| t.on(p)).await;
            t.finish();
            let digest = res.map_err(|e| CliError::new(format!("pull {src} → {dest}: {e}")))?;
            println!(
                "{src} {digest} → {} ({} received, {} already there)",
                dir.display(),
                mib(t.moved),
                mib(t.present)
            );
            Ok(())
        }
        ImageCmd::Prune { grace } => {
            humantime::parse_duration(&grace)
                .map_err(|e| CliError::usage(format!("--grace {grace:?}: {e} (e.g. 0s, 10m)")))?;
            let r: serde_json::Value = client
                .post_json(&format!("/v1/images/prune?grace={}", enc(&grace)), &())
                .await?;
            let n = |k: &str| r[k].as_array().map(|a| a.len()).unwrap_or(0);
            println!(
                "Removed {} images, {} signatures/artifacts, {} blobs ({} freed), {} unpacked layers",
                n("removed_images"),
                n("removed_artifacts"),
                n("removed_blobs"),
                mib(r["freed_bytes"].as_u64().unwrap_or(0)),
                r["removed_layers"].as_u64().unwrap_or(0)
            );
            Ok(())
        }
        ImageCmd::Rm { images } => {
            for i in images {
                client
                    .request(Method::DELETE, &format!("/v1/images/{}", enc(&i)), None)
                    .await?;
                println!("Deleted: {i}");
            }
            Ok(())
        }
    }
}
