//! The runtime's files on the host, attacked by an unprivileged local user (uid 65534 through
//! `setpriv`): container records (env vars), bundle configs, the image index and blobs, and a
//! set-uid file of an unpacked layer are all out of reach, while a container (root mapped to
//! host uid 100000) still reaches its root filesystem and runs.
mod common;
use common::Env;
use flotilla_runtime::testing::spec;
use flotilla_runtime::{ImageConfigInput, RuntimeDriver};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `args` as uid/gid 65534 with no supplementary groups: an ordinary local user.
/// Through `env`: setpriv keeps root's capabilities until its own `execve`, so the program it
/// runs is looked up with CAP_DAC_OVERRIDE; `env` has none and looks it up as a user would.
fn as_local_user(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "env",
        ])
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs")
}

/// Asserts that the local user's attempt was refused by the file system.
fn refused(what: &str, args: &[&str]) {
    let o = as_local_user(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Permission denied"),
        "{what}: a local user ran `{}` and got status {:?}, stdout {:?}, stderr {err:?}",
        args.join(" "),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").mode() & 0o7777
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// An image whose layer holds a set-uid copy of busybox (owned by the container's root, so by
/// host uid 100000 once unpacked for the user namespace).
fn import_suid_image(env: &Env) -> String {
    let src = env.root.join("suid-src");
    flotilla_runtime::testing::busybox_rootfs(&src).expect("rootfs");
    std::fs::copy(src.join("bin/busybox"), src.join("bin/suid")).expect("copy");
    std::fs::set_permissions(src.join("bin/suid"), PermissionsExt::from_mode(0o4755))
        .expect("chmod");
    let input = ImageConfigInput {
        cmd: Some(vec!["sh".into()]),
        ..Default::default()
    };
    let digest = env
        .runtime
        .images()
        .import_rootfs(&src, "suid:test", &input)
        .expect("import");
    std::fs::remove_dir_all(&src).expect("remove source");
    digest
}

/// The unpacked (shifted) layer dirs of the store.
fn shifted_layers(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("images/layers"))
        .expect("layers")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".u100000-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t90_a_local_user_reads_no_record_image_or_bundle_and_runs_no_layer_setuid_file() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("files");
    let rt = &env.runtime;
    let image = import_suid_image(&env);
    let id = env.id("secret");
    let mut sp = spec(&id, &image, &["sh", "-c", "echo ready; sleep 100"]);
    sp.env = vec!["DB_PASSWORD=hunter2".into()];
    rt.create(sp).await.expect("create");
    rt.start(&id).await.expect("start");
    assert!(
        common::wait_line(rt, &id, "ready", 20).await,
        "the container runs with the private layout"
    );

    let record = env.root.join("containers").join(&id).join("meta.json");
    let info = rt.inspect(&id).expect("inspect");
    let config = info.bundle.join("config.json");
    let rootfs = info.bundle.join("rootfs");
    let index = env.root.join("images/index.json");
    let blob = rt
        .images()
        .manifest(&image)
        .expect("manifest")
        .layers()
        .first()
        .map(|d| {
            rt.images()
                .blob_path(d.digest().as_ref())
                .expect("blob path")
        })
        .expect("one layer");
    let layers = shifted_layers(&env.root);
    assert!(!layers.is_empty(), "the image was unpacked for the userns");
    let suid = layers
        .iter()
        .map(|l| l.join("bin/suid"))
        .find(|p| p.exists())
        .expect("the set-uid file in a layer");
    let md = std::fs::metadata(&suid).expect("stat suid");
    assert_eq!(
        (md.uid(), md.mode() & 0o7777),
        (100_000, 0o4755),
        "the layer keeps a set-uid file owned by the mapped root"
    );

    // The attacks.
    refused("the container record (env vars)", &["cat", s(&record)]);
    refused("the bundle config (env vars)", &["cat", s(&config)]);
    refused("the image index", &["cat", s(&index)]);
    refused("an image blob", &["cat", s(&blob)]);
    refused(
        "the list of blobs",
        &["ls", s(&env.root.join("images/blobs/sha256"))],
    );
    refused("the set-uid file of a layer", &[s(&suid), "id", "-u"]);
    refused(
        "a layer's files",
        &["cat", s(&layers[0].join("etc/passwd"))],
    );
    refused(
        "the container's merged root",
        &["cat", s(&rootfs.join("etc/passwd"))],
    );
    refused(
        "the container list",
        &["ls", s(&env.root.join("containers"))],
    );
    refused("the container's log", &["cat", s(&rt.log_path(&id))]);

    // The modes behind it.
    assert_eq!(mode(&record), 0o600, "meta.json");
    assert_eq!(mode(&config), 0o600, "bundle config.json");
    assert_eq!(mode(&index), 0o600, "index.json");
    assert_eq!(mode(&blob), 0o600, "blob");
    for d in [
        "containers",
        "logs",
        "images",
        "images/layers",
        "images/blobs",
    ] {
        assert_eq!(mode(&env.root.join(d)), 0o700, "{d}");
    }
    // Only the way to the rootfs lets the mapped root (gid 100000) through, and no one else.
    let state = env.root.join("state");
    for d in [
        env.root.clone(),
        state.clone(),
        state.join("containers"),
        state.join("containers").join(&id),
        info.bundle.clone(),
    ] {
        let m = std::fs::metadata(&d).expect("stat");
        assert_eq!(
            (m.mode() & 0o7777, m.gid()),
            (0o710, 100_000),
            "{} is 0710 root:100000",
            d.display()
        );
    }
    rt.remove(&id, false).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t91_an_old_wide_layout_is_closed_when_the_runtime_opens() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("reopen");
    // What an older version left: 0711/0755 dirs.
    for d in [
        "",
        "containers",
        "images",
        "images/layers",
        "images/blobs/sha256",
    ] {
        std::fs::set_permissions(env.root.join(d), PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    let rt = flotilla_runtime::Runtime::new(common::config(&env.root)).expect("reopen");
    for d in [
        "containers",
        "images",
        "images/layers",
        "images/blobs/sha256",
    ] {
        assert_eq!(mode(&env.root.join(d)), 0o700, "{d}");
    }
    refused(
        "the image index",
        &["cat", s(&env.root.join("images/index.json"))],
    );
    let (code, lines) = common::run_to_exit(
        &rt,
        spec(&env.id("echo"), &env.image, &["echo", "still runs"]),
    )
    .await;
    assert_eq!((code, lines), (0, vec!["still runs".to_string()]));
}
