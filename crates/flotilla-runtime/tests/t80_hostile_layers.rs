//! Hostile layers and archives: nothing in an image may touch, read or create anything outside
//! the directory it is unpacked into (security review 2026-12-04, findings 1, 9 and 13).
//!
//! Every attack runs against victim files in a sibling scratch dir (`victim/`), named by
//! absolute path or reached through `..`, and checks that the victims are exactly as before:
//! names, types, contents, modes, owners, link counts and the overlay opaque xattr. Needs root
//! (chown, mknod, trusted.* xattrs), as the runtime does.

use flotilla_runtime::image::layer::{read_in_root, unpack_layer};
use flotilla_runtime::{IdRange, ImageStore, RuntimeError};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use tar::EntryType;

// ---- tar building: raw headers, so names like `../x` go in as they are ----

/// One tar entry: raw name bytes, type, link name, data, mode, uid.
struct E {
    name: Vec<u8>,
    kind: EntryType,
    link: Vec<u8>,
    data: Vec<u8>,
    mode: u32,
    uid: u64,
}

fn file(name: &str, data: &[u8]) -> E {
    E {
        name: name.as_bytes().to_vec(),
        kind: EntryType::Regular,
        link: Vec::new(),
        data: data.to_vec(),
        mode: 0o644,
        uid: 0,
    }
}

fn dir(name: &str) -> E {
    E {
        kind: EntryType::Directory,
        mode: 0o755,
        ..file(name, b"")
    }
}

fn symlink(name: &str, target: &str) -> E {
    E {
        kind: EntryType::Symlink,
        link: target.as_bytes().to_vec(),
        mode: 0o777,
        ..file(name, b"")
    }
}

fn hardlink(name: &str, source: &str) -> E {
    E {
        kind: EntryType::Link,
        link: source.as_bytes().to_vec(),
        ..file(name, b"")
    }
}

fn special(name: &str, kind: EntryType) -> E {
    E {
        kind,
        ..file(name, b"")
    }
}

/// A tar of `entries`, names and link names written into the header bytes unchecked
/// (`Header::set_path` refuses `..`). Names longer than 100 bytes go through the builder's
/// GNU long-name support.
fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.uid);
        h.set_mtime(1_700_000_000);
        if e.kind == EntryType::Char || e.kind == EntryType::Block {
            h.set_device_major(8).expect("major");
            h.set_device_minor(0).expect("minor");
        }
        assert!(e.link.len() <= 100, "test link names fit the header");
        h.as_old_mut().linkname[..e.link.len()].copy_from_slice(&e.link);
        if e.name.len() <= 100 {
            h.as_old_mut().name[..e.name.len()].copy_from_slice(&e.name);
            h.set_cksum();
            b.append(&h, &e.data[..]).expect("append");
        } else {
            let name = Path::new(std::ffi::OsStr::from_bytes(&e.name));
            b.append_data(&mut h, name, &e.data[..]).expect("append");
        }
    }
    b.into_inner().expect("tar")
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

// ---- the scratch dir: layer/ to unpack into, victim/ beside it ----

struct Scratch {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    layer: PathBuf,
    victim: PathBuf,
}

impl Scratch {
    /// `victim/` holds `shadow`, `dir/file`, `dir/sub/deep`, `etc/passwd`, a symlink and an
    /// empty directory.
    fn new() -> Scratch {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().to_path_buf();
        let layer = base.join("layer");
        let victim = base.join("victim");
        fs::create_dir(&layer).expect("mkdir layer");
        fs::create_dir_all(victim.join("dir/sub")).expect("mkdir victim");
        fs::create_dir_all(victim.join("etc")).expect("mkdir victim/etc");
        fs::create_dir_all(victim.join("empty")).expect("mkdir victim/empty");
        fs::write(victim.join("shadow"), b"root:SECRET-HASH:19000::::::\n").expect("write");
        fs::write(victim.join("dir/file"), b"keep me\n").expect("write");
        fs::write(victim.join("dir/sub/deep"), b"deep\n").expect("write");
        fs::write(victim.join("etc/passwd"), b"host:x:0:0::/:/bin/sh\n").expect("write");
        std::os::unix::fs::symlink("../shadow", victim.join("dir/link")).expect("symlink");
        Scratch {
            _tmp: tmp,
            base,
            layer,
            victim,
        }
    }

    fn v(&self, rel: &str) -> String {
        self.victim.join(rel).display().to_string()
    }

    fn unpack(&self, entries: &[E]) -> Result<String, RuntimeError> {
        unpack_layer(&tar_of(entries)[..], &self.layer, Some(IdRange::default()))
    }
}

/// Everything observable about a tree, by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let p = root.join(rel);
        let m = fs::symlink_metadata(&p).expect("lstat");
        let ft = m.file_type();
        let what = if ft.is_dir() {
            format!("dir opaque={}", has_opaque(&p))
        } else if ft.is_symlink() {
            format!("symlink {:?}", fs::read_link(&p).expect("readlink"))
        } else if ft.is_file() {
            format!("file {:?}", fs::read(&p).expect("read"))
        } else {
            format!("special rdev={}", m.rdev())
        };
        out.insert(
            rel.to_path_buf(),
            format!(
                "{what} mode={:o} uid={} gid={} nlink={}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink()
            ),
        );
        if ft.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .expect("readdir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn has_opaque(p: &Path) -> bool {
    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
    let mut buf = [0u8; 8];
    // SAFETY: both strings are NUL-terminated; `buf` is writable for its stated length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n > 0
}

/// Runs `attack` on a fresh scratch dir and checks the victim tree did not change.
/// Returns the unpack result and the scratch dir for further checks.
fn attack(build: impl FnOnce(&Scratch) -> Vec<E>) -> (Result<String, RuntimeError>, Scratch) {
    let s = Scratch::new();
    let before = snapshot(&s.base.join("victim"));
    let entries = build(&s);
    let res = s.unpack(&entries);
    let after = snapshot(&s.victim);
    assert_eq!(before, after, "the victim tree is untouched ({res:?})");
    // Nothing new beside the layer and the victim either.
    let mut top: Vec<_> = fs::read_dir(&s.base)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    top.sort();
    assert_eq!(top, ["layer", "victim"], "nothing created beside the layer");
    (res, s)
}

fn refused(res: &Result<String, RuntimeError>, what: &str) {
    match res {
        Err(RuntimeError::BadArchive(m)) => assert!(
            m.contains(what),
            "the error names the problem ({what}): {m}"
        ),
        other => panic!("expected a bad-archive error about {what}, got {other:?}"),
    }
}

/// Runs `f` on a thread and fails if it has not returned within `secs` (a hang is the bug).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("finished in time, without hanging")
}

// ---- (a)–(h): layers ----

#[test]
fn t80_a_whiteout_through_a_symlink_cannot_replace_a_host_file() {
    // The review's proof of concept: `x -> /`, then `x/VICTIM_PARENT/.wh.VICTIM`.
    let (res, _) = attack(|s| vec![symlink("x", &s.v("")), file("x/dir/.wh.file", b"")]);
    refused(&res, "not a directory");
    let (res, _) = attack(|s| vec![symlink("x", &s.v("dir")), file("x/.wh.file", b"")]);
    refused(&res, "not a directory");
    // A whiteout of a directory through the symlink (the old code removed it recursively).
    let (res, _) = attack(|s| vec![symlink("x", &s.v("")), file("x/.wh.dir", b"")]);
    refused(&res, "not a directory");
    // A whiteout of the symlink itself replaces the symlink, inside the layer.
    let (res, s) = attack(|s| vec![symlink("x", &s.v("dir")), file(".wh.x", b"")]);
    res.expect("a whiteout named like the symlink is harmless");
    let m = fs::symlink_metadata(s.layer.join("x")).expect("whiteout");
    assert!(m.file_type().is_char_device() && m.rdev() == 0);
}

#[test]
fn t80_b_a_file_through_a_symlink_cannot_replace_a_host_directory() {
    // `x -> <base>`, then a regular file `x/victim`: the old code removed victim/ recursively.
    let (res, _) = attack(|s| {
        vec![
            symlink("x", &s.base.display().to_string()),
            file("x/victim", b"pwned"),
        ]
    });
    refused(&res, "not a directory");
    // The same with a relative symlink climbing out of the layer.
    let (res, _) = attack(|_| vec![symlink("x", ".."), file("x/victim", b"pwned")]);
    refused(&res, "not a directory");
    // And a symlink or a directory replacing it.
    let (res, _) = attack(|_| vec![symlink("x", ".."), symlink("x/victim", "/")]);
    refused(&res, "not a directory");
    let (res, _) = attack(|_| vec![symlink("x", ".."), dir("x/victim/dir/")]);
    refused(&res, "not a directory");
}

#[test]
fn t80_c_an_opaque_marker_through_a_symlink_is_refused() {
    // The old code set the xattr on victim/dir through the symlink.
    let (res, _) = attack(|s| vec![symlink("x", &s.v("")), file("x/dir/.wh..wh..opq", b"")]);
    refused(&res, "not a directory");
    // On the symlink itself: refused too (it is no directory of the layer).
    let (res, _) = attack(|s| vec![symlink("x", &s.v("")), file("x/.wh..wh..opq", b"")]);
    refused(&res, "not a directory");
}

#[test]
fn t80_d_hard_links_cannot_reach_a_host_file() {
    // By absolute path: taken relative to the layer root, where there is no such file.
    let (res, _) = attack(|s| vec![hardlink("h", &s.v("shadow"))]);
    refused(&res, "is not in the layer");
    // Through `..`.
    let (res, _) = attack(|_| vec![hardlink("h", "../victim/shadow")]);
    refused(&res, "escapes the root");
    // Through a symlinked directory inside the layer.
    let (res, _) = attack(|s| vec![symlink("x", &s.v("")), hardlink("h", "x/shadow")]);
    refused(&res, "not a directory");
    let (res, _) = attack(|_| vec![symlink("x", ".."), hardlink("h", "x/victim/shadow")]);
    refused(&res, "not a directory");
}

#[test]
fn t80_e_dot_dot_and_absolute_paths_stay_inside() {
    // `.wh...` at the root is a whiteout of `..`: the old code removed the layer's parent
    // directory recursively (here the scratch dir with the victims).
    let (res, _) = attack(|_| vec![file(".wh...", b"")]);
    refused(&res, "whiteout of . or ..");
    let (res, _) = attack(|_| vec![file("../../escape", b"out")]);
    refused(&res, "escapes the root");
    let (res, _) = attack(|_| vec![file("a/../../escape", b"out")]);
    refused(&res, "escapes the root");
    // `.wh...` would be a whiteout of `..`, and `.wh..` one of `.`.
    let (res, _) = attack(|_| vec![dir("a/"), file("a/.wh...", b"")]);
    refused(&res, "whiteout of . or ..");
    let (res, _) = attack(|_| vec![dir("a/"), file("a/.wh..", b"")]);
    refused(&res, "whiteout of . or ..");
    // Absolute paths are taken relative to the layer root, as tar does.
    let (res, s) = attack(|s| vec![file("/abs", b"in"), file(&s.v("planted"), b"in")]);
    res.expect("absolute paths unpack inside");
    assert_eq!(fs::read(s.layer.join("abs")).expect("abs"), b"in");
    let inside = s.layer.join(s.victim.strip_prefix("/").expect("absolute"));
    assert_eq!(fs::read(inside.join("planted")).expect("planted"), b"in");
}

#[test]
fn t80_f_a_file_through_a_symlinked_parent_is_not_created_outside() {
    let (res, _) = attack(|s| vec![symlink("x", &s.v("dir")), file("x/new", b"pwned")]);
    refused(&res, "not a directory");
    let (res, _) = attack(|s| vec![symlink("x", &s.v("dir")), file("x/file", b"pwned")]);
    refused(&res, "not a directory");
    // A FIFO, a symlink and a hard link through it likewise.
    let (res, _) = attack(|s| {
        vec![
            symlink("x", &s.v("dir")),
            special("x/fifo", EntryType::Fifo),
        ]
    });
    refused(&res, "not a directory");
    let (res, _) = attack(|s| {
        vec![
            file("f", b"f"),
            symlink("x", &s.v("dir")),
            hardlink("x/h", "f"),
        ]
    });
    refused(&res, "not a directory");
    // A directory entry replaces the symlink (as tar does) and stays inside.
    let (res, s) = attack(|s| vec![symlink("x", &s.v("dir")), dir("x/"), file("x/new", b"in")]);
    res.expect("a directory replacing a symlink is fine");
    assert_eq!(fs::read(s.layer.join("x/new")).expect("new"), b"in");
}

#[test]
fn t80_g_a_hard_link_to_a_symlink_is_not_followed() {
    // `s -> victim/shadow`, `h` hard link to `s`, then regular files written over both.
    let (res, s) = attack(|s| {
        vec![
            symlink("s", &s.v("shadow")),
            hardlink("h", "s"),
            file("h", b"pwned-h"),
            file("s", b"pwned-s"),
        ]
    });
    res.expect("a hard link to a symlink links the symlink");
    assert_eq!(fs::read(s.layer.join("h")).expect("h"), b"pwned-h");
    assert_eq!(fs::read(s.layer.join("s")).expect("s"), b"pwned-s");
    // Left as they are, the link is a second name of the symlink, not of its target.
    let (res, s) = attack(|s| vec![symlink("s", &s.v("shadow")), hardlink("h", "s")]);
    res.expect("unpack");
    let m = fs::symlink_metadata(s.layer.join("h")).expect("h");
    assert!(m.file_type().is_symlink() && m.nlink() == 2);
    // Writing below it is refused.
    let (res, _) = attack(|s| {
        vec![
            symlink("s", &s.v("dir")),
            hardlink("h", "s"),
            file("h/file", b"pwned"),
        ]
    });
    refused(&res, "not a directory");
}

#[test]
fn t80_h_device_nodes_are_skipped() {
    let (res, s) = attack(|_| {
        vec![
            dir("dev/"),
            special("dev/sda", EntryType::Block),
            special("dev/mem", EntryType::Char),
            special("dev/fifo", EntryType::Fifo),
        ]
    });
    res.expect("devices are skipped, not refused");
    assert!(fs::symlink_metadata(s.layer.join("dev/sda")).is_err());
    assert!(fs::symlink_metadata(s.layer.join("dev/mem")).is_err());
    let m = fs::symlink_metadata(s.layer.join("dev/fifo")).expect("fifo");
    assert!(m.file_type().is_fifo());
    assert_eq!(m.uid(), 100_000);
}

// ---- a realistic layer ----

#[test]
fn t80_a_realistic_layer_unpacks_to_the_expected_tree() {
    let long = format!("usr/share/{}/leaf", "long-directory-name-".repeat(8));
    let entries = vec![
        dir("./"),
        dir("bin/"),
        E {
            mode: 0o755,
            ..file("bin/busybox", b"\x7fELF busybox")
        },
        symlink("bin/sh", "busybox"),
        E {
            mode: 0o4755,
            ..file("usr/bin/passwd", b"passwd")
        },
        hardlink("usr/bin/chsh", "usr/bin/passwd"),
        hardlink("/usr/bin/chfn", "/usr/bin/passwd"),
        symlink("etc/alternatives/editor", "/usr/bin/vi"),
        symlink("lib", "usr/lib"),
        file("etc/.wh.gone", b""),
        dir("var/cache/"),
        file("var/cache/.wh..wh..opq", b""),
        file("var/cache/keep", b"kept"),
        // A file replacing a directory (with contents) of the same layer…
        dir("opt/thing/"),
        file("opt/thing/inner", b"inner"),
        file("opt/thing", b"now a file"),
        // …and a directory replacing a file.
        file("srv/data", b"was a file"),
        dir("srv/data/"),
        file("srv/data/x", b"x"),
        special("run/fifo", EntryType::Fifo),
        E {
            mode: 0o700,
            uid: 1000,
            ..dir("home/user/")
        },
        E {
            uid: 1000,
            ..file("home/user/.profile", b"PS1=$")
        },
        file(&long, b"long"),
        // A later entry overwrites an earlier file.
        file("etc/hostname", b"first"),
        file("etc/hostname", b"second"),
    ];
    let (res, s) = attack(|_| entries);
    let digest = res.expect("unpack");
    assert!(digest.starts_with("sha256:"));
    let l = &s.layer;
    let meta = |p: &str| fs::symlink_metadata(l.join(p)).expect(p);
    assert_eq!(
        fs::read(l.join("bin/busybox")).expect("busybox"),
        b"\x7fELF busybox"
    );
    assert_eq!(meta("bin/busybox").mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read_link(l.join("bin/sh")).expect("sh"),
        Path::new("busybox")
    );
    assert_eq!(meta("bin/sh").uid(), 100_000, "symlinks are chowned too");
    let passwd = meta("usr/bin/passwd");
    assert_eq!(passwd.mode() & 0o7777, 0o4755, "set-uid survives the chown");
    assert_eq!((passwd.uid(), passwd.gid()), (100_000, 100_000));
    assert_eq!(passwd.nlink(), 3, "two hard links to it");
    assert_eq!(meta("usr/bin/chsh").ino(), passwd.ino());
    assert_eq!(meta("usr/bin/chsh").mode() & 0o7777, 0o4755);
    assert_eq!(meta("usr/bin/chfn").ino(), passwd.ino());
    assert_eq!(
        fs::read_link(l.join("etc/alternatives/editor")).expect("editor"),
        Path::new("/usr/bin/vi"),
        "absolute symlink targets are stored as they are"
    );
    assert_eq!(
        fs::read_link(l.join("lib")).expect("lib"),
        Path::new("usr/lib")
    );
    let wh = meta("etc/gone");
    assert!(wh.file_type().is_char_device());
    assert_eq!((wh.rdev(), wh.uid(), wh.gid()), (0, 100_000, 100_000));
    assert!(has_opaque(&l.join("var/cache")));
    assert!(!has_opaque(&l.join("var")));
    assert_eq!(fs::read(l.join("var/cache/keep")).expect("keep"), b"kept");
    assert!(meta("opt/thing").is_file());
    assert_eq!(fs::read(l.join("opt/thing")).expect("thing"), b"now a file");
    assert!(meta("srv/data").is_dir());
    assert_eq!(fs::read(l.join("srv/data/x")).expect("x"), b"x");
    assert!(meta("run/fifo").file_type().is_fifo());
    let home = meta("home/user");
    assert_eq!((home.uid(), home.mode() & 0o7777), (101_000, 0o700));
    assert_eq!(meta("home/user/.profile").uid(), 101_000);
    // Implied parents: 0755, container root's.
    let usr = meta("usr/bin");
    assert_eq!((usr.uid(), usr.mode() & 0o7777), (100_000, 0o755));
    assert_eq!(fs::read(l.join(&long)).expect("long"), b"long");
    assert_eq!(
        fs::read(l.join("etc/hostname")).expect("hostname"),
        b"second"
    );
    assert_eq!(
        meta("").uid(),
        100_000,
        "the layer root is container root's"
    );
    assert_eq!(meta("bin/busybox").mtime(), 1_700_000_000);
    assert_eq!(meta("bin/sh").mtime(), 1_700_000_000);
}

#[test]
fn t80_the_digest_covers_the_whole_stream() {
    let data = tar_of(&[file("a", b"a")]);
    let s = Scratch::new();
    let got = unpack_layer(&data[..], &s.layer, None).expect("unpack");
    assert_eq!(got, sha(&data));
    // Trailing padding after the end-of-archive blocks counts too.
    let mut padded = data.clone();
    padded.extend_from_slice(&[0u8; 4096]);
    let s = Scratch::new();
    let got = unpack_layer(&padded[..], &s.layer, None).expect("unpack");
    assert_eq!(got, sha(&padded));
}

// ---- (i): image archives ----

fn docker_save(members: &[E]) -> Vec<u8> {
    tar_of(members)
}

fn docker_manifest(config: &str, layers: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!([
        {"Config": config, "RepoTags": ["leak:1"], "Layers": layers}
    ]))
    .expect("json")
}

fn image_config(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .expect("json")
}

/// Loads `archive` into a fresh store beside the victims; returns the result and the store's
/// blob names.
type Loaded = Result<Vec<(String, String)>, RuntimeError>;

fn load(s: &Scratch, archive: &[u8]) -> (Loaded, Vec<String>) {
    let path = s.base.join("in.tar");
    fs::write(&path, archive).expect("write archive");
    let store_dir = s.base.join("store");
    let store = ImageStore::open(&store_dir).expect("store");
    let res = store.load_archive(&path);
    let mut blobs: Vec<String> = fs::read_dir(store_dir.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    blobs.sort();
    (res, blobs)
}

#[test]
fn t80_i_a_docker_save_archive_cannot_import_a_host_file() {
    let s = Scratch::new();
    let before = snapshot(&s.victim);
    let secret = fs::read(s.victim.join("shadow")).expect("shadow");
    let cfg = image_config(&[sha(&secret)]);
    let archive = docker_save(&[
        file("manifest.json", &docker_manifest("c.json", &["l.tar"])),
        file("c.json", &cfg),
        symlink("l.tar", &s.v("shadow")),
    ]);
    let (res, blobs) = load(&s, &archive);
    assert!(
        matches!(&res, Err(RuntimeError::BadArchive(m)) if m.contains("l.tar is missing")),
        "{res:?}"
    );
    assert!(
        !blobs.contains(&sha(&secret)[7..].to_string()),
        "the host file was not copied into the store"
    );
    // The config and manifest.json themselves through symlinks: not read either.
    let archive = docker_save(&[
        symlink("manifest.json", &s.v("etc/passwd")),
        file("c.json", &cfg),
    ]);
    let (res, _) = load(&s, &archive);
    assert!(matches!(&res, Err(RuntimeError::BadArchive(_))), "{res:?}");
    // A layer path through a symlinked directory, and by `..`.
    let archive = docker_save(&[
        file("manifest.json", &docker_manifest("c.json", &["d/shadow"])),
        file("c.json", &cfg),
        symlink("d", &s.v("")),
    ]);
    let (res, _) = load(&s, &archive);
    assert!(matches!(&res, Err(RuntimeError::BadArchive(_))), "{res:?}");
    let archive = docker_save(&[
        file(
            "manifest.json",
            &docker_manifest("c.json", &["../victim/shadow"]),
        ),
        file("c.json", &cfg),
    ]);
    let (res, _) = load(&s, &archive);
    assert!(matches!(&res, Err(RuntimeError::BadArchive(_))), "{res:?}");
    assert_eq!(before, snapshot(&s.victim));
}

#[test]
fn t80_i_an_oci_archive_cannot_import_a_host_file() {
    // A blob named by the digest of the host file, symlinked to it: the digest would verify.
    let s = Scratch::new();
    let secret = fs::read(s.victim.join("shadow")).expect("shadow");
    let cfg = image_config(&[sha(&secret)]);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&cfg), "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&secret), "size": secret.len()}]
    }))
    .expect("json");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest),
            "size": manifest.len(), "annotations": {"io.containerd.image.name": "leak:1"}}]
    }))
    .expect("json");
    let blob = |d: &str| format!("blobs/sha256/{}", &d[7..]);
    let archive = tar_of(&[
        file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        file("index.json", &index),
        dir("blobs/"),
        dir("blobs/sha256/"),
        file(&blob(&sha(&cfg)), &cfg),
        file(&blob(&sha(&manifest)), &manifest),
        symlink(&blob(&sha(&secret)), &s.v("shadow")),
    ]);
    let (res, blobs) = load(&s, &archive);
    assert!(matches!(&res, Err(RuntimeError::BadArchive(_))), "{res:?}");
    assert!(!blobs.contains(&sha(&secret)[7..].to_string()));
}

#[test]
fn t80_i_a_symlink_to_dev_zero_does_not_hang_the_loader() {
    let s = Scratch::new();
    let cfg = image_config(&[sha(b"")]);
    let archive = docker_save(&[
        file("manifest.json", &docker_manifest("c.json", &["l.tar"])),
        file("c.json", &cfg),
        symlink("l.tar", "/dev/zero"),
    ]);
    let path = s.base.join("zero.tar");
    fs::write(&path, &archive).expect("write");
    let store_dir = s.base.join("store");
    let res = within(60, move || {
        let store = ImageStore::open(&store_dir).expect("store");
        store.load_archive(&path).map(|_| ())
    });
    assert!(matches!(&res, Err(RuntimeError::BadArchive(_))), "{res:?}");
    // The config through /dev/zero too.
    let archive = docker_save(&[
        file("manifest.json", &docker_manifest("c.json", &[])),
        symlink("c.json", "/dev/zero"),
    ]);
    let path = s.base.join("zero2.tar");
    fs::write(&path, &archive).expect("write");
    let store_dir = s.base.join("store");
    let res = within(60, move || {
        let store = ImageStore::open(&store_dir).expect("store");
        store.load_archive(&path).map(|_| ())
    });
    assert!(matches!(&res, Err(RuntimeError::BadArchive(_))), "{res:?}");
}

#[test]
fn t80_i_symlinks_inside_a_docker_save_archive_still_work() {
    // Older `docker save` links a repeated layer to the first copy: `l2/layer.tar ->
    // ../l1/layer.tar`. Such links resolve inside the archive.
    let s = Scratch::new();
    let layer = tar_of(&[file("hello", b"hi")]);
    let cfg = image_config(&[sha(&layer), sha(&layer)]);
    let archive = docker_save(&[
        file(
            "manifest.json",
            &docker_manifest("c.json", &["l1/layer.tar", "l2/layer.tar"]),
        ),
        file("c.json", &cfg),
        dir("l1/"),
        file("l1/layer.tar", &layer),
        dir("l2/"),
        symlink("l2/layer.tar", "../l1/layer.tar"),
    ]);
    let (res, blobs) = load(&s, &archive);
    let loaded = res.expect("load");
    assert_eq!(loaded[0].0, "leak:1");
    assert!(blobs.contains(&sha(&layer)[7..].to_string()));
}

// ---- (j): the image's /etc/passwd, read by the agent ----

fn rootfs_with(s: &Scratch, passwd: impl FnOnce(&Path)) -> PathBuf {
    let root = s.layer.clone();
    fs::create_dir_all(root.join("etc")).expect("mkdir etc");
    fs::create_dir_all(root.join("usr/share")).expect("mkdir usr");
    passwd(&root);
    root
}

#[test]
fn t80_j_an_image_passwd_symlink_cannot_reach_the_host() {
    const MAX: u64 = 1 << 20;
    let s = Scratch::new();
    let host_passwd = s.v("etc/passwd");
    // etc/passwd -> /dev/zero: nothing (no /dev/zero inside the rootfs), at once.
    let root = rootfs_with(&s, |r| {
        std::os::unix::fs::symlink("/dev/zero", r.join("etc/passwd")).expect("symlink");
    });
    let r2 = root.clone();
    let got = within(30, move || read_in_root(&r2, Path::new("etc/passwd"), MAX));
    assert!(matches!(got, Ok(None)), "{got:?}");
    let err = flotilla_runtime::spec::resolve_user("nobody", "", "").expect_err("no such user");
    assert!(err.to_string().contains("not found"), "{err}");
    // etc/passwd -> <host passwd>: resolved inside the rootfs, where it does not exist.
    fs::remove_file(root.join("etc/passwd")).expect("rm");
    std::os::unix::fs::symlink(&host_passwd, root.join("etc/passwd")).expect("symlink");
    let got = read_in_root(&root, Path::new("etc/passwd"), MAX).expect("read");
    assert_eq!(got, None, "the host's file is not read");
    // `..` climbing out stops at the rootfs.
    fs::remove_file(root.join("etc/passwd")).expect("rm");
    std::os::unix::fs::symlink("../../victim/etc/passwd", root.join("etc/passwd"))
        .expect("symlink");
    assert_eq!(
        read_in_root(&root, Path::new("etc/passwd"), MAX).expect("read"),
        None
    );
    // An absolute symlink to a file inside the image is followed inside it.
    fs::write(
        root.join("usr/share/passwd"),
        b"app:x:1000:1000::/:/bin/sh\n",
    )
    .expect("write");
    fs::remove_file(root.join("etc/passwd")).expect("rm");
    std::os::unix::fs::symlink("/usr/share/passwd", root.join("etc/passwd")).expect("symlink");
    let got = read_in_root(&root, Path::new("etc/passwd"), MAX)
        .expect("read")
        .expect("found");
    let passwd = String::from_utf8(got).expect("utf8");
    assert_eq!(
        flotilla_runtime::spec::resolve_user("app", &passwd, "").expect("app"),
        (1000, 1000)
    );
}

#[test]
fn t80_j_an_image_passwd_that_is_a_fifo_or_huge_is_refused_at_once() {
    const MAX: u64 = 1 << 20;
    let s = Scratch::new();
    let root = rootfs_with(&s, |r| {
        let c = CString::new(r.join("etc/group").as_os_str().as_bytes()).expect("path");
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
        fs::write(r.join("etc/passwd"), vec![b'a'; (MAX + 1) as usize]).expect("write");
    });
    let r2 = root.clone();
    let got = within(30, move || read_in_root(&r2, Path::new("etc/group"), MAX));
    assert!(
        matches!(&got, Err(RuntimeError::BadArchive(m)) if m.contains("not a regular file")),
        "{got:?}"
    );
    let got = read_in_root(&root, Path::new("etc/passwd"), MAX);
    assert!(
        matches!(&got, Err(RuntimeError::BadArchive(m)) if m.contains("larger than")),
        "{got:?}"
    );
    // A directory is not read either; a missing file is simply absent.
    assert!(read_in_root(&root, Path::new("usr"), MAX).is_err());
    assert_eq!(
        read_in_root(&root, Path::new("etc/shadow"), MAX).expect("read"),
        None
    );
}

// ---- property: random layers never touch the outside ----

mod property {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Kind {
        Dir,
        File(u8),
        /// Symlink to one of a few targets; `Outside*` are resolved at run time.
        Symlink(Target),
        Hardlink(Vec<&'static str>),
        Fifo,
    }

    /// Symlink targets. Only the scratch dir is reachable through them (no `/`, no `../..`),
    /// so that a regression cannot damage the host running the tests.
    #[derive(Clone, Debug)]
    enum Target {
        /// The sibling `outside/` by absolute path.
        OutsideDir,
        /// `outside/sentinel` by absolute path.
        OutsideFile,
        /// `..`: the scratch dir, from the layer root.
        Up,
        Rel(&'static str),
    }

    fn name() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            3 => Just("a"),
            4 => Just("x"),
            1 => Just("outside"),
            2 => Just(".wh.a"),
            1 => Just(".wh.x"),
            2 => Just(".wh..wh..opq"),
            1 => Just(".."),
        ]
    }

    fn path() -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(name(), 1..=3)
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            4 => Just(Target::OutsideDir),
            1 => Just(Target::OutsideFile),
            2 => Just(Target::Up),
            1 => Just(Target::Rel("a")),
            1 => Just(Target::Rel("x/a")),
            2 => Just(Target::Rel("../outside")),
        ]
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            2 => Just(Kind::Dir),
            3 => any::<u8>().prop_map(Kind::File),
            4 => target().prop_map(Kind::Symlink),
            1 => path().prop_map(Kind::Hardlink),
            1 => Just(Kind::Fifo),
        ]
    }

    /// Random entries, half the time after a symlink out of the layer planted at `x` or `a`
    /// (so that the entries after it often try to go through it).
    fn entries() -> impl Strategy<Value = Vec<(Vec<&'static str>, Kind)>> {
        let planted = prop_oneof![
            Just(None),
            prop::sample::select(vec!["x", "a"])
                .prop_flat_map(|n| target().prop_map(move |t| Some((vec![n], Kind::Symlink(t))))),
        ];
        (planted, prop::collection::vec((path(), kind()), 1..12)).prop_map(|(p, mut rest)| {
            if let Some(p) = p {
                rest.insert(0, p);
            }
            rest
        })
    }

    fn build(outside: &Path, spec: &[(Vec<&'static str>, Kind)]) -> Vec<E> {
        spec.iter()
            .map(|(p, k)| {
                let name = p.join("/");
                match k {
                    Kind::Dir => dir(&format!("{name}/")),
                    Kind::File(b) => file(&name, &[*b; 3]),
                    Kind::Symlink(t) => {
                        let t = match t {
                            Target::OutsideDir => outside.display().to_string(),
                            Target::OutsideFile => outside.join("sentinel").display().to_string(),
                            Target::Up => "..".into(),
                            Target::Rel(r) => (*r).into(),
                        };
                        symlink(&name, &t)
                    }
                    Kind::Hardlink(src) => hardlink(&name, &src.join("/")),
                    Kind::Fifo => special(&name, EntryType::Fifo),
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 128,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn t80_random_layers_never_touch_the_outside(spec in entries()) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let layer = tmp.path().join("layer");
            let outside = tmp.path().join("outside");
            fs::create_dir(&layer).expect("mkdir");
            fs::create_dir_all(outside.join("a/x")).expect("mkdir");
            fs::write(outside.join("sentinel"), b"sentinel").expect("write");
            fs::write(outside.join("a/x/b"), b"deep").expect("write");
            fs::write(outside.join("x"), b"x").expect("write");
            std::os::unix::fs::symlink("sentinel", outside.join("b")).expect("symlink");
            let before = snapshot(tmp.path().join("outside").as_path());
            let entries = build(&outside, &spec);
            // Ok or a clean error; a panic fails the property.
            let _ = unpack_layer(&tar_of(&entries)[..], &layer, Some(IdRange::default()));
            prop_assert_eq!(&before, &snapshot(&outside));
            let mut top: Vec<_> = fs::read_dir(tmp.path())
                .expect("readdir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            top.sort();
            prop_assert_eq!(top, ["layer", "outside"]);
        }
    }
}
