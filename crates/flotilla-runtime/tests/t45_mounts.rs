//! Volume and tmpfs mounts with real runc: copy-up of the image's content into an empty
//! volume (owners as the container sees them, a non-empty volume left alone, hostile symlinks
//! in the image resolved inside the rootfs), tmpfs size and mode, container root writing
//! into a volume dir owned by the mapped root, and refused destinations.
mod common;
use common::{run_to_exit, Env};
use flotilla_runtime::testing::{busybox_rootfs, spec};
use flotilla_runtime::{BindMount, ImageConfigInput, RuntimeDriver, RuntimeError, TmpfsMount};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mapped root of the default range.
const ROOT: u32 = 100_000;

/// The busybox image plus `/data` (owned by 1000:1000 inside the container) and hostile
/// symlinks: `/evil -> /etc`, `/up -> ../../../../../../../../..<marker>`,
/// `/abs -> <marker>` (a host path).
fn import_volume_image(env: &Env, marker: &Path) -> String {
    let src = env.root.join("image-src");
    busybox_rootfs(&src).expect("rootfs");
    let data = src.join("data");
    fs::create_dir_all(data.join("sub")).expect("mkdir");
    fs::write(data.join("hello"), "from-image\n").expect("write");
    fs::write(data.join("sub/deep"), "deep\n").expect("write");
    fs::write(src.join("etc/image-only"), "image\n").expect("write");
    symlink("hello", data.join("link")).expect("symlink");
    fs::set_permissions(data.join("hello"), fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o750)).expect("chmod");
    for p in [
        &data,
        &data.join("sub"),
        &data.join("sub/deep"),
        &data.join("hello"),
    ] {
        std::os::unix::fs::chown(p, Some(1000), Some(1000)).expect("chown");
    }
    std::os::unix::fs::lchown(data.join("link"), Some(1000), Some(1000)).expect("lchown");
    symlink("/etc", src.join("evil")).expect("symlink");
    let up = format!(
        "{}{}",
        "../".repeat(12),
        marker.display().to_string().trim_start_matches('/')
    );
    symlink(&up, src.join("up")).expect("symlink");
    symlink(marker, src.join("abs")).expect("symlink");
    let input = ImageConfigInput {
        cmd: Some(vec!["sh".into()]),
        ..Default::default()
    };
    let digest = env
        .runtime
        .images()
        .import_rootfs(&src, "volume-image:test", &input)
        .expect("import");
    fs::remove_dir_all(&src).expect("cleanup");
    digest
}

/// A volume dir laid out as `flotilla-volume` makes it: `<root>/vols/<name>/_data`, the way
/// to it 0710 root:<mapped root>, the data dir 0755 owned by the mapped root.
fn volume_dir(env: &Env, name: &str) -> PathBuf {
    let vols = env.root.join("vols");
    for d in [vols.clone(), vols.join(name)] {
        fs::create_dir_all(&d).expect("mkdir");
        std::os::unix::fs::chown(&d, Some(0), Some(ROOT)).expect("chown");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o710)).expect("chmod");
    }
    let data = vols.join(name).join("_data");
    fs::create_dir_all(&data).expect("mkdir");
    std::os::unix::fs::chown(&data, Some(ROOT), Some(ROOT)).expect("chown");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).expect("chmod");
    data
}

fn bind(src: &Path, dst: &str, copy_up: bool) -> BindMount {
    BindMount {
        src: src.to_path_buf(),
        dst: dst.into(),
        readonly: false,
        copy_up,
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t45_copy_up_fills_an_empty_volume_with_the_image_content() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("cpup");
    let rt = &env.runtime;
    let marker = env.root.join("host-marker");
    fs::create_dir_all(&marker).expect("marker");
    fs::write(marker.join("secret"), "host\n").expect("marker file");
    let image = import_volume_image(&env, &marker);

    let vol = volume_dir(&env, "data");
    let mut s = spec(
        &env.id("fill"),
        &image,
        &[
            "sh",
            "-c",
            "busybox stat -c '%u:%g %a' /data /data/hello /data/sub/deep; cat /data/hello; \
             busybox readlink /data/link; echo appended >> /data/hello",
        ],
    );
    s.mounts.push(bind(&vol, "/data", true));
    let (code, lines) = run_to_exit(rt, s).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(
        lines,
        [
            "1000:1000 750",
            "1000:1000 640",
            "1000:1000 644",
            "from-image",
            "hello"
        ],
        "the image's owners and modes, as the container sees them"
    );
    let m = fs::metadata(vol.join("hello")).expect("hello");
    assert_eq!(
        (m.uid(), m.gid()),
        (ROOT + 1000, ROOT + 1000),
        "host ids are shifted ids"
    );
    assert!(fs::symlink_metadata(vol.join("link"))
        .expect("link")
        .file_type()
        .is_symlink());

    // Not empty now: a second container does not copy again.
    let mut s = spec(&env.id("again"), &image, &["cat", "/data/hello"]);
    s.mounts.push(bind(&vol, "/data", true));
    let (code, lines) = run_to_exit(rt, s).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines, ["from-image", "appended"]);

    // A volume that already holds data is never overwritten.
    let kept = volume_dir(&env, "kept");
    fs::write(kept.join("mine"), "mine\n").expect("write");
    let mut s = spec(&env.id("kept"), &image, &["ls", "/data"]);
    s.mounts.push(bind(&kept, "/data", true));
    let (code, lines) = run_to_exit(rt, s).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines, ["mine"]);
    assert_eq!(names(&kept), BTreeSet::from(["mine".to_string()]));

    // Without copy_up an empty volume stays empty.
    let plain = volume_dir(&env, "plain");
    let mut s = spec(&env.id("plain"), &image, &["ls", "/data"]);
    s.mounts.push(bind(&plain, "/data", false));
    let (code, _) = run_to_exit(rt, s).await;
    assert_eq!(code, 0);
    assert!(names(&plain).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t46_hostile_image_symlinks_copy_nothing_from_the_host() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("cpuh");
    let rt = &env.runtime;
    let marker = env.root.join("host-marker");
    fs::create_dir_all(&marker).expect("marker");
    fs::write(marker.join("secret"), "host\n").expect("marker file");
    let image = import_volume_image(&env, &marker);

    // `/evil -> /etc`: resolved inside the rootfs, so the image's /etc is copied, and nothing
    // of the host's /etc (which has far more than passwd, group and image-only).
    let vol = volume_dir(&env, "evil");
    let mut s = spec(&env.id("evil"), &image, &["true"]);
    s.mounts.push(bind(&vol, "/evil", true));
    let (code, lines) = run_to_exit(rt, s).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(
        names(&vol),
        ["group", "image-only", "passwd"].map(String::from).into(),
        "only the image's /etc"
    );
    assert!(
        fs::read_to_string(vol.join("passwd"))
            .expect("passwd")
            .starts_with("root:x:0:0:root:/root:/bin/sh"),
        "the image's passwd"
    );

    // `/up -> ../../..<marker>` and `/abs -> <marker>`: no such path inside the rootfs.
    for (name, dst) in [("up", "/up"), ("abs", "/abs"), ("under", "/up/secret")] {
        let vol = volume_dir(&env, name);
        let mut s = spec(&env.id(name), &image, &["true"]);
        s.mounts.push(bind(&vol, dst, true));
        // runc may refuse to mount over a dangling symlink; either way nothing is copied.
        let _ = rt.create(s).await;
        let _ = rt.remove(&env.id(name), false).await;
        assert!(names(&vol).is_empty(), "{dst}: copied {:?}", names(&vol));
    }
    assert_eq!(names(&marker), BTreeSet::from(["secret".to_string()]));
    assert_eq!(
        fs::read_to_string(marker.join("secret")).expect("secret"),
        "host\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t47_tmpfs_size_and_mode_and_root_writes_into_volumes() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("tmpfs");
    let rt = &env.runtime;
    let vol = volume_dir(&env, "rw");
    let mut s = spec(
        &env.id("tmpfs"),
        &env.image,
        &[
            "sh",
            "-c",
            "busybox stat -c 'mode=%a owner=%u' /t; \
             dd if=/dev/zero of=/t/big bs=1024 count=2048 2>&1; echo dd=$?; \
             rm -f /t/big; echo small > /t/ok && echo tmpfs-writable; \
             grep ' /t ' /proc/mounts; \
             echo from-container > /vol/made && echo vol-writable",
        ],
    );
    s.tmpfs.push(TmpfsMount {
        dst: "/t".into(),
        size: Some(1 << 20),
        mode: Some(0o1770),
    });
    s.mounts.push(bind(&vol, "/vol", false));
    let (code, lines) = run_to_exit(rt, s).await;
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0], "mode=1770 owner=0", "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("No space left on device")),
        "writing 2 MB into a 1 MB tmpfs fails with ENOSPC: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("dd=") && l != "dd=0"),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "tmpfs-writable"), "{lines:?}");
    let mount = lines
        .iter()
        .find(|l| l.contains(" /t "))
        .expect("/t mounted");
    for opt in ["nosuid", "nodev", "noexec"] {
        assert!(mount.contains(opt), "{opt} in {mount}");
    }
    assert!(lines.iter().any(|l| l == "vol-writable"), "{lines:?}");
    let made = fs::metadata(vol.join("made")).expect("made");
    assert_eq!(
        (made.uid(), made.gid()),
        (ROOT, ROOT),
        "written as the mapped root"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t48_bad_destinations_are_refused() {
    if !common::can_run() {
        return;
    }
    let env = Env::new("mntbad");
    let rt = &env.runtime;
    let vol = volume_dir(&env, "v");
    let cases: Vec<(&str, Vec<BindMount>, Vec<TmpfsMount>, &str)> = vec![
        ("rel", vec![bind(&vol, "data", false)], vec![], "absolute"),
        (
            "dotdot",
            vec![bind(&vol, "/data/../etc", false)],
            vec![],
            "..",
        ),
        ("root", vec![bind(&vol, "/", true)], vec![], "root"),
        (
            "dup",
            vec![bind(&vol, "/data", false)],
            vec![TmpfsMount {
                dst: "/data/".into(),
                ..Default::default()
            }],
            "twice",
        ),
        (
            "tmpfs-root",
            vec![],
            vec![TmpfsMount {
                dst: "/.".into(),
                ..Default::default()
            }],
            "root",
        ),
    ];
    for (name, mounts, tmpfs, want) in cases {
        let mut s = spec(&env.id(name), &env.image, &["true"]);
        s.mounts = mounts;
        s.tmpfs = tmpfs;
        match rt.create(s).await {
            Err(RuntimeError::Invalid(m)) => assert!(m.contains(want), "{name}: {m}"),
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
        assert!(names(&vol).is_empty(), "{name}: nothing copied");
    }
}
