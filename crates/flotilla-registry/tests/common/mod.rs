//! Shared helpers: stores, busybox images, a registry served on a loopback port.
#![allow(dead_code)]

use flotilla_registry::{router, ImageStore, Progress, RegistryClient, RegistryState};
use flotilla_runtime::ImageConfigInput;
use std::path::Path;
use std::sync::Arc;

pub type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

pub fn store(dir: &Path, name: &str) -> TestResult<Arc<ImageStore>> {
    Ok(Arc::new(ImageStore::open(dir.join(name))?))
}

/// Imports the busybox rootfs under `name` with a given command (same layer, other config).
pub fn busybox(store: &ImageStore, name: &str, cmd: &str) -> TestResult<String> {
    let src = store
        .root()
        .join(format!("src-{}", name.replace(['/', ':'], "_")));
    let _ = std::fs::remove_dir_all(&src);
    flotilla_runtime::testing::busybox_rootfs(&src)?;
    let input = ImageConfigInput {
        cmd: Some(vec!["sh".into(), "-c".into(), cmd.into()]),
        ..Default::default()
    };
    let d = store.import_rootfs(&src, name, &input)?;
    std::fs::remove_dir_all(&src)?;
    Ok(d)
}

/// An image whose single layer holds one small file.
pub fn small_image(store: &ImageStore, name: &str, content: &str) -> TestResult<String> {
    let src = store
        .root()
        .join(format!("small-{}", name.replace(['/', ':'], "_")));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("file.txt"), content)?;
    let d = store.import_rootfs(&src, name, &ImageConfigInput::default())?;
    std::fs::remove_dir_all(&src)?;
    Ok(d)
}

/// Serves a registry over `store` on 127.0.0.1; returns a client for it.
pub async fn serve(store: Arc<ImageStore>) -> TestResult<RegistryClient> {
    let state = RegistryState::new(store)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(state)).await;
    });
    Ok(RegistryClient::new(&format!("http://{addr}"))?)
}

/// Counts transferred blobs.
#[derive(Default, Debug)]
pub struct Counter {
    pub done: Vec<String>,
    pub present: Vec<String>,
    pub signatures: usize,
}

impl Counter {
    pub fn record(&mut self, p: Progress) {
        match p {
            Progress::BlobDone { digest, .. } => self.done.push(digest),
            Progress::BlobPresent { digest, .. } => self.present.push(digest),
            Progress::Signature { .. } => self.signatures += 1,
            _ => {}
        }
    }
}

/// Another image over the same layer as `base` (its tar imported again), with another command.
pub fn same_layer(store: &ImageStore, base: &str, name: &str, cmd: &str) -> TestResult<String> {
    let layer = store.manifest(base)?.layers()[0].digest().to_string();
    let input = ImageConfigInput {
        cmd: Some(vec!["sh".into(), "-c".into(), cmd.into()]),
        ..Default::default()
    };
    Ok(store.import_rootfs(&store.blob_path(&layer)?, name, &input)?)
}
