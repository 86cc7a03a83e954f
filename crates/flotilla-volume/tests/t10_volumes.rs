//! The volume store on real files: layout and modes, usage, export/import round trips, and
//! hostile archives and trees. Needs root (it sets owners); skipped loudly otherwise.

use flotilla_runtime::IdRange;
use flotilla_volume::{validate_name, VolumeError, VolumeStore};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const RANGE: IdRange = IdRange {
    host_start: 100_000,
    size: 65_536,
};

fn is_root() -> bool {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        eprintln!("!!!!! SKIPPING volume test: needs root !!!!!");
    }
    root
}

/// A store in a temp dir, with a marker tree beside it that no operation may touch.
struct Scratch {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    store: VolumeStore,
    marker: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().to_path_buf();
        let marker = base.join("marker");
        fs::create_dir_all(marker.join("etc")).expect("marker");
        fs::write(marker.join("etc/passwd"), b"host passwd\n").expect("marker file");
        fs::write(marker.join("victim"), b"original\n").expect("victim");
        let store = VolumeStore::open(base.join("volumes"), Some(RANGE)).expect("open");
        Scratch {
            _tmp: tmp,
            base,
            store,
            marker,
        }
    }

    fn marker_untouched(&self, what: &str) {
        let snap = snapshot(&self.marker);
        let want: BTreeSet<&str> = ["etc", "etc/passwd", "victim"].into_iter().collect();
        let got: BTreeSet<&str> = snap.keys().map(|p| p.to_str().unwrap_or("?")).collect();
        assert_eq!(got, want, "{what}: marker tree changed");
        assert_eq!(
            fs::read(self.marker.join("victim")).expect("victim"),
            b"original\n",
            "{what}: victim rewritten"
        );
        assert_eq!(
            fs::read(self.marker.join("etc/passwd")).expect("passwd"),
            b"host passwd\n",
            "{what}: marker passwd rewritten"
        );
        let top: BTreeSet<String> = fs::read_dir(&self.base)
            .expect("list base")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let want_top: BTreeSet<String> = ["marker", "volumes"].map(String::from).into();
        assert_eq!(top, want_top, "{what}: something landed beside the store");
    }
}

/// Every entry beneath `root` (relative path → kind, mode, owner, content or link target),
/// never following a symlink.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(rd) = fs::read_dir(root.join(rel)) else {
            return;
        };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let desc = if m.file_type().is_symlink() {
                format!(
                    "link->{}",
                    fs::read_link(&p)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                )
            } else if m.is_dir() {
                "dir".to_string()
            } else if m.is_file() {
                format!(
                    "file:{}",
                    String::from_utf8_lossy(&fs::read(&p).unwrap_or_default())
                )
            } else {
                "special".to_string()
            };
            out.insert(
                r.clone(),
                format!(
                    "{desc} mode={:o} {}:{}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
            if m.is_dir() {
                walk(root, &r, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn chown(p: &Path, id: u32) {
    std::os::unix::fs::lchown(p, Some(id), Some(id)).expect("chown");
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---- Raw tar building: entries tar::Builder would refuse to write. ----

fn raw_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    let n = &mut h.as_old_mut().name;
    n.fill(0);
    n[..name.len()].copy_from_slice(name);
    h
}

#[derive(Clone)]
enum E {
    File(&'static str, &'static [u8]),
    Dir(&'static str),
    Symlink(&'static str, String),
    Hardlink(&'static str, String),
    Device(&'static str),
    /// A GNU long-name entry whose name holds a NUL byte, then a file.
    NulName(&'static [u8]),
    Raw(Vec<u8>, tar::EntryType, &'static [u8]),
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::File(n, d) => {
                let mut h = raw_header(n.as_bytes(), tar::EntryType::Regular, d.len() as u64);
                h.set_cksum();
                b.append(&h, *d).expect("append");
            }
            E::Dir(n) => {
                let mut h = raw_header(n.as_bytes(), tar::EntryType::Directory, 0);
                h.set_mode(0o755);
                h.set_cksum();
                b.append(&h, &[][..]).expect("append");
            }
            E::Symlink(n, t) | E::Hardlink(n, t) => {
                let kind = if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = raw_header(n.as_bytes(), kind, 0);
                h.set_link_name(t).expect("link name");
                h.set_cksum();
                b.append(&h, &[][..]).expect("append");
            }
            E::Device(n) => {
                let mut h = raw_header(n.as_bytes(), tar::EntryType::Char, 0);
                h.set_device_major(1).expect("major");
                h.set_device_minor(3).expect("minor");
                h.set_cksum();
                b.append(&h, &[][..]).expect("append");
            }
            E::NulName(name) => {
                let mut l = raw_header(b"././@LongLink", tar::EntryType::GNULongName, 0);
                let mut data = name.to_vec();
                data.push(0);
                l.set_size(data.len() as u64);
                l.set_cksum();
                b.append(&l, &data[..]).expect("append");
                let mut h = raw_header(b"placeholder", tar::EntryType::Regular, 4);
                h.set_cksum();
                b.append(&h, &b"evil"[..]).expect("append");
            }
            E::Raw(name, kind, d) => {
                let mut h = raw_header(name, *kind, d.len() as u64);
                h.set_cksum();
                b.append(&h, *d).expect("append");
            }
        }
    }
    b.into_inner().expect("finish")
}

#[test]
fn t10_create_list_get_remove_and_layout() {
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    let root = s.store.root().to_path_buf();
    let m = fs::metadata(&root).expect("root");
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), m.gid()),
        (0o710, 0, 100_000),
        "root 0710 root:<mapped root>"
    );
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), "db".to_string());
    let v = s.store.create("data-1", labels.clone()).expect("create");
    assert_eq!(v.path, root.join("data-1/_data"));
    assert_eq!(v.labels, labels);
    let d = fs::metadata(&v.path).expect("data");
    assert_eq!(
        (d.mode() & 0o7777, d.uid(), d.gid()),
        (0o755, 100_000, 100_000)
    );
    let vd = fs::metadata(root.join("data-1")).expect("vdir");
    assert_eq!(
        (vd.mode() & 0o7777, vd.uid(), vd.gid()),
        (0o710, 0, 100_000)
    );
    let meta = fs::metadata(root.join("data-1/meta.json")).expect("meta");
    assert_eq!(meta.mode() & 0o7777, 0o600);

    // Idempotent: the existing volume comes back, labels and all.
    let again = s
        .store
        .create("data-1", BTreeMap::new())
        .expect("create again");
    assert_eq!(again, v);
    assert_eq!(s.store.get("data-1").expect("get"), v);
    s.store.create("a", BTreeMap::new()).expect("create a");
    let names: Vec<String> = s
        .store
        .list()
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["a", "data-1"]);

    // An interrupted create (no meta.json) is not listed, and create completes it.
    fs::create_dir_all(root.join("half/_data")).expect("half");
    assert_eq!(s.store.list().expect("list").len(), 2);
    assert!(matches!(s.store.get("half"), Err(VolumeError::NotFound(_))));
    s.store.create("half", BTreeMap::new()).expect("complete");

    s.store.remove("data-1").expect("remove");
    assert!(!root.join("data-1").exists());
    let e = s.store.get("data-1").expect_err("gone");
    assert!(e.to_string().contains("flotilla volume ls"), "{e}");
    assert!(matches!(
        s.store.remove("data-1"),
        Err(VolumeError::NotFound(_))
    ));
    // Reopening keeps the volumes.
    let again = VolumeStore::open(root.clone(), Some(RANGE)).expect("reopen");
    assert_eq!(again.list().expect("list").len(), 2);
    s.marker_untouched("create/remove");
}

#[test]
fn t11_names_follow_the_rule() {
    for ok in ["a", "A1", "db_data.v2-x", &"x".repeat(128)] {
        assert!(validate_name(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        ".",
        "..",
        "-a",
        "_a",
        ".hidden",
        "a/b",
        "/a",
        "a\0b",
        "a b",
        "é",
        &"x".repeat(129),
    ] {
        let e = validate_name(bad).expect_err(bad);
        assert!(e.to_string().contains("[A-Za-z0-9_.-]"), "{e}");
    }
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    for bad in ["../marker", "..", "a/../../marker"] {
        assert!(matches!(
            s.store.create(bad, BTreeMap::new()),
            Err(VolumeError::InvalidName { .. })
        ));
        assert!(s.store.remove(bad).is_err());
    }
    s.marker_untouched("bad names");
}

#[test]
fn t12_usage_counts_blocks_once_and_follows_no_symlink() {
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    let v = s.store.create("u", BTreeMap::new()).expect("create");
    let empty = s.store.usage("u").expect("usage");
    fs::write(v.path.join("big"), vec![7u8; 1 << 20]).expect("write");
    fs::hard_link(v.path.join("big"), v.path.join("big-again")).expect("link");
    let big_outside = s.marker.join("huge");
    fs::write(&big_outside, vec![1u8; 4 << 20]).expect("outside");
    symlink(&big_outside, v.path.join("to-outside")).expect("symlink");
    symlink("/", v.path.join("to-root")).expect("symlink");
    let used = s.store.usage("u").expect("usage");
    let grown = used - empty;
    assert!(
        (1 << 20..2 << 20).contains(&grown),
        "one MiB counted once, the outside file not at all: {grown}"
    );
    fs::remove_file(&big_outside).expect("cleanup");
    assert!(matches!(
        s.store.usage("nope"),
        Err(VolumeError::NotFound(_))
    ));
}

#[test]
fn t13_export_import_round_trip_keeps_content_modes_links_and_owners() {
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    let v = s.store.create("src", BTreeMap::new()).expect("create");
    let p = &v.path;
    let long = format!("{}/{}", "d".repeat(90), "f".repeat(90));
    fs::create_dir_all(p.join("pg/base")).expect("mkdir");
    fs::create_dir_all(p.join(Path::new(&long).parent().expect("parent"))).expect("mkdir long");
    fs::write(p.join("pg/base/1"), b"rows\n").expect("write");
    fs::write(p.join("pg/empty"), b"").expect("write");
    fs::write(p.join("suid"), b"#!/bin/sh\n").expect("write");
    fs::write(p.join(&long), b"long name\n").expect("write");
    fs::write(p.join(".wh.not-a-whiteout"), b"literal\n").expect("write");
    symlink("base/1", p.join("pg/rel-link")).expect("symlink");
    symlink("/etc/passwd", p.join("abs-link")).expect("symlink");
    // What a container writes belongs to ids of the range: container root unless set.
    for (rel, _) in snapshot(p) {
        chown(&p.join(rel), 100_000);
    }
    for (rel, id) in [
        ("pg", 100_999),
        ("pg/base", 100_999),
        ("pg/base/1", 100_999),
    ] {
        chown(&p.join(rel), id);
    }
    chown(&p.join("pg/rel-link"), 101_000);
    chown(&p.join("suid"), 100_000);
    chmod(&p.join("pg"), 0o700);
    chmod(&p.join("pg/base/1"), 0o600);
    chmod(&p.join("suid"), 0o4755);
    // The data dir's own owner and mode travel too (a copy-up sets them from the image).
    chown(p, 100_999);
    chmod(p, 0o750);
    // A host id outside the range is exported as 65534.
    fs::write(p.join("host-owned"), b"x").expect("write");
    chown(&p.join("host-owned"), 0);

    let mut archive = Vec::new();
    s.store.export("src", &mut archive).expect("export");
    // The archive holds container ids.
    let mut ids = BTreeMap::new();
    for e in tar::Archive::new(&archive[..]).entries().expect("entries") {
        let e = e.expect("entry");
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        ids.insert(
            path,
            (
                e.header().uid().unwrap_or(0),
                e.header().mode().unwrap_or(0),
            ),
        );
    }
    assert_eq!(ids.get("./"), Some(&(999, 0o750)), "{ids:?}");
    assert_eq!(ids.get("pg/base/1"), Some(&(999, 0o600)));
    assert_eq!(ids.get("host-owned").map(|x| x.0), Some(65_534));

    let got = s.store.import("dst", &archive[..]).expect("import");
    let mut want = snapshot(p);
    // host-owned comes back as the overflow id shifted into the range.
    want.insert(
        PathBuf::from("host-owned"),
        format!("file:x mode=644 {0}:{0}", 100_000 + 65_534),
    );
    assert_eq!(snapshot(&got.path), want);
    let root_of = |p: &Path| {
        let m = fs::metadata(p).expect("root");
        (m.mode() & 0o7777, m.uid(), m.gid())
    };
    assert_eq!(root_of(&got.path), (0o750, 100_999, 100_999));
    assert_eq!(
        fs::read_link(got.path.join("abs-link")).expect("link"),
        Path::new("/etc/passwd"),
        "symlinks stay links, unresolved"
    );

    // Import only into an empty volume.
    let e = s.store.import("dst", &archive[..]).expect_err("not empty");
    assert!(matches!(e, VolumeError::NotEmpty(_)), "{e}");
    s.store.create("empty", BTreeMap::new()).expect("create");
    s.store
        .import("empty", &archive[..])
        .expect("into an empty volume");
    s.marker_untouched("round trip");
}

/// Imports `entries` into a new volume: returns the result and what ended up in it.
fn hostile(
    s: &Scratch,
    name: &str,
    archive: &[u8],
) -> (Result<(), VolumeError>, BTreeMap<PathBuf, String>) {
    let res = s.store.import(name, archive).map(|_| ());
    let inside = match s.store.get(name) {
        Ok(v) => snapshot(&v.path),
        Err(_) => BTreeMap::new(),
    };
    s.marker_untouched(name);
    (res, inside)
}

#[test]
fn t14_hostile_imports_stay_inside_the_data_dir() {
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    let marker = s.marker.display().to_string();
    let shadow_before = fs::metadata("/etc/shadow")
        .ok()
        .map(|m| (m.nlink(), m.len()));

    // `..` escapes: refused, and the new volume removed again.
    let (res, _) = hostile(
        &s,
        "dotdot",
        &tar_of(&[E::File("../../marker/victim", b"pwned")]),
    );
    assert!(matches!(res, Err(VolumeError::BadArchive(_))), "{res:?}");
    assert!(
        matches!(s.store.get("dotdot"), Err(VolumeError::NotFound(_))),
        "undone"
    );
    let (res, _) = hostile(
        &s,
        "dotdot2",
        &tar_of(&[E::Raw(
            b"a/../../victim".to_vec(),
            tar::EntryType::Regular,
            b"pwned",
        )]),
    );
    assert!(res.is_err(), "{res:?}");

    // Absolute names land inside the data dir.
    let abs: &'static str = Box::leak(format!("{marker}/victim").into_boxed_str());
    let (res, inside) = hostile(&s, "absolute", &tar_of(&[E::File(abs, b"pwned")]));
    assert!(res.is_ok(), "{res:?}");
    let rel = PathBuf::from(abs.trim_start_matches('/'));
    assert!(
        inside
            .get(&rel)
            .is_some_and(|d| d.starts_with("file:pwned")),
        "an absolute name is taken inside the data dir: {inside:?}"
    );
    let (res, _) = hostile(
        &s,
        "etc",
        &tar_of(&[E::File("/etc/flotilla-volume-test-x", b"pwned")]),
    );
    assert!(res.is_ok(), "{res:?}");
    assert!(!Path::new("/etc/flotilla-volume-test-x").exists());

    // A symlink to `/` (or to the marker), then a file through it: refused.
    for (n, target) in [
        ("link-root", "/".to_string()),
        ("link-marker", marker.clone()),
    ] {
        let (res, inside) = hostile(
            &s,
            n,
            &tar_of(&[
                E::Symlink("a", target),
                E::File("a/etc/passwd", b"pwned"),
                E::File("a/victim", b"pwned"),
            ]),
        );
        assert!(
            matches!(res, Err(VolumeError::BadArchive(_))),
            "{n}: {res:?}"
        );
        assert!(inside.is_empty(), "{n}: undone: {inside:?}");
    }
    // A relative symlink climbing out, then a directory and a file through it.
    let (res, _) = hostile(
        &s,
        "link-up",
        &tar_of(&[
            E::Symlink("up", "../../../marker".into()),
            E::Dir("up/etc"),
            E::File("up/etc/passwd", b"pwned"),
        ]),
    );
    assert!(res.is_err(), "{res:?}");

    // Hard links to host files: refused.
    for (n, src) in [
        ("hl-shadow", "/etc/shadow".to_string()),
        ("hl-marker", format!("{marker}/victim")),
        ("hl-up", "../../marker/victim".to_string()),
    ] {
        let (res, _) = hostile(&s, n, &tar_of(&[E::Hardlink("h", src)]));
        assert!(res.is_err(), "{n}: {res:?}");
    }
    assert_eq!(
        fs::metadata("/etc/shadow")
            .ok()
            .map(|m| (m.nlink(), m.len())),
        shadow_before,
        "/etc/shadow untouched"
    );

    // An absolute symlink, then a file written at its name: the link is replaced, not
    // followed.
    let (res, inside) = hostile(
        &s,
        "write-through",
        &tar_of(&[
            E::Symlink("s", format!("{marker}/victim")),
            E::File("s", b"pwned"),
        ]),
    );
    assert!(res.is_ok(), "{res:?}");
    assert!(
        inside
            .get(Path::new("s"))
            .is_some_and(|d| d.starts_with("file:pwned")),
        "{inside:?}"
    );

    // A device node: refused (no device is made).
    let (res, inside) = hostile(
        &s,
        "device",
        &tar_of(&[E::File("ok", b"x"), E::Device("null")]),
    );
    assert!(
        matches!(&res, Err(VolumeError::BadArchive(m)) if m.contains("device")),
        "{res:?}"
    );
    assert!(inside.is_empty(), "{inside:?}");

    // A NUL byte inside a (long) name: refused.
    let (res, _) = hostile(
        &s,
        "nul",
        &tar_of(&[E::NulName(b"a\0/../../marker/victim")]),
    );
    assert!(res.is_err(), "{res:?}");

    // 10 MB of garbage: a clear error, nothing left.
    let mut garbage = vec![0u8; 10 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let (res, inside) = hostile(&s, "garbage", &garbage);
    assert!(matches!(res, Err(VolumeError::BadArchive(_))), "{res:?}");
    assert!(inside.is_empty());
    assert!(matches!(
        s.store.get("garbage"),
        Err(VolumeError::NotFound(_))
    ));

    // A failed import into an existing empty volume empties it and keeps the volume.
    s.store.create("kept", BTreeMap::new()).expect("create");
    let (res, inside) = hostile(
        &s,
        "kept",
        &tar_of(&[
            E::File("fine", b"x"),
            E::Symlink("a", "/".into()),
            E::File("a/x", b"y"),
        ]),
    );
    assert!(res.is_err());
    assert!(inside.is_empty(), "{inside:?}");
    let v = s.store.get("kept").expect("still there");
    let m = fs::metadata(&v.path).expect("data");
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o755, 100_000));
}

#[test]
fn t15_remove_deletes_links_not_their_targets() {
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    let v = s.store.create("r", BTreeMap::new()).expect("create");
    symlink(&s.marker, v.path.join("to-marker")).expect("symlink");
    symlink(s.marker.join("victim"), v.path.join("to-victim")).expect("symlink");
    symlink("/", v.path.join("to-root")).expect("symlink");
    fs::create_dir_all(v.path.join("deep/er")).expect("mkdir");
    symlink(&s.marker, v.path.join("deep/er/again")).expect("symlink");
    chmod(&v.path.join("deep"), 0o000);
    let mut archive = Vec::new();
    s.store.export("r", &mut archive).expect("export");
    let names: BTreeSet<String> = tar::Archive::new(&archive[..])
        .entries()
        .expect("entries")
        .map(|e| String::from_utf8_lossy(&e.expect("entry").path_bytes()).into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("victim") && !n.starts_with("to-")),
        "export followed a link: {names:?}"
    );
    s.store.remove("r").expect("remove");
    assert!(!v.path.exists());
    s.marker_untouched("remove");
    let left: Vec<_> = fs::read_dir(s.store.root())
        .expect("list")
        .flatten()
        .collect();
    assert!(left.is_empty(), "nothing left in the store: {left:?}");
}

#[test]
fn t16_a_full_disk_is_a_clear_error() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("small");
    fs::create_dir(&mnt).expect("mkdir");
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("!!!!! SKIPPING full-disk test: cannot mount a tmpfs !!!!!");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let store = VolumeStore::open(mnt.join("volumes"), Some(RANGE)).expect("open");
    static BIG: [u8; 1 << 20] = [0x5a; 1 << 20];
    let archive = tar_of(&[E::File("big", &BIG)]);
    let e = store.import("full", &archive[..]).expect_err("disk full");
    assert!(matches!(e, VolumeError::NoSpace { .. }), "{e:?}");
    assert!(e.to_string().contains("no space left"), "{e}");
    assert!(
        store.list().expect("list").is_empty(),
        "failed import undone"
    );
}

#[test]
fn t17_a_size_limit_is_its_own_file_system() {
    use std::io::Write;
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    // Out of range: refused before anything is made.
    for bad in [0, (8 << 20) - 1, (16u64 << 40) + 1, u64::MAX] {
        let e = s
            .store
            .create_with("bad", BTreeMap::new(), Some(bad))
            .expect_err("out of range");
        assert!(matches!(e, VolumeError::InvalidSize(_)), "{e:?}");
        assert!(e.to_string().contains("8 MiB to 16 TiB"), "{e}");
    }
    assert!(s.store.list().expect("list").is_empty());

    let v = s
        .store
        .create_with("small", BTreeMap::new(), Some(8 << 20))
        .expect("create 8 MiB");
    assert_eq!(v.size_limit, Some(8 << 20));
    let vdir = v.path.parent().expect("volume dir").to_path_buf();
    let dev = |p: &Path| fs::metadata(p).expect("stat").dev();
    assert_ne!(dev(&v.path), dev(&vdir), "the data dir is a mount point");
    // Empty (no lost+found), container root's, 0755, like an unlimited volume.
    assert_eq!(fs::read_dir(&v.path).expect("list").count(), 0);
    let md = fs::metadata(&v.path).expect("stat data");
    assert_eq!((md.uid(), md.gid()), (100_000, 100_000));
    assert_eq!(md.permissions().mode() & 0o7777, 0o755);

    // Filling it: ENOSPC inside, the node's disk keeps its space.
    let mut f = fs::File::create(v.path.join("fill")).expect("create");
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&chunk).and_then(|()| f.sync_all()) {
            Ok(()) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(
            written <= 16 << 20,
            "wrote {written} bytes into an 8 MiB volume"
        );
    };
    drop(f);
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written >= 4 << 20, "most of the limit is usable: {written}");
    let used = s.store.usage("small").expect("usage");
    assert!(used <= 8 << 20, "usage {used}");

    // Unmounted behind the store's back (a host restart): mounted again on open, data kept.
    assert!(std::process::Command::new("umount")
        .arg(&v.path)
        .status()
        .expect("umount")
        .success());
    assert_eq!(dev(&v.path), dev(&vdir));
    let again = VolumeStore::open(s.base.join("volumes"), Some(RANGE)).expect("reopen");
    assert_ne!(dev(&v.path), dev(&vdir), "mounted again");
    assert!(v.path.join("fill").exists(), "data kept");
    assert_eq!(
        again.get("small").expect("get").size_limit,
        Some(8 << 20),
        "the limit is remembered"
    );

    // `node cleanup` unmounts (the data stays in the image), the next open mounts again.
    let root = s.base.join("volumes");
    assert_eq!(flotilla_volume::mounted(&root), vec![v.path.clone()]);
    assert_eq!(
        flotilla_volume::unmount_all(&root).expect("unmount all"),
        vec![v.path.clone()]
    );
    assert!(flotilla_volume::mounted(&root).is_empty());
    let again = VolumeStore::open(root.clone(), Some(RANGE)).expect("reopen");
    assert!(v.path.join("fill").exists(), "mounted again");

    // Remove: unmounted, then gone, nothing left.
    again.remove("small").expect("remove");
    assert!(!vdir.exists());
    let mounts = fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        !mounts.contains(vdir.to_str().expect("utf-8")),
        "no mount left: {mounts}"
    );
    s.marker_untouched("size limit");
}

/// Gives everything beneath `root` (not following symlinks) to host id `id`.
fn own_tree(root: &Path, id: u32) {
    for (rel, _) in snapshot(root) {
        chown(&root.join(rel), id);
    }
}

/// Asserts two snapshots are equal, naming only the entries that differ.
fn same_trees(a: &BTreeMap<PathBuf, String>, b: &BTreeMap<PathBuf, String>) {
    let short = |s: Option<&String>| s.map(|s| s.chars().take(120).collect::<String>());
    let diff: Vec<_> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), short(a.get(k)), short(b.get(k))))
        .collect();
    assert!(diff.is_empty(), "the trees differ: {diff:#?}");
}

/// A delta stream: `deleted` paths, then `archive` (a tar).
fn delta_of(deleted: &[&[u8]], archive: &[u8]) -> Vec<u8> {
    let list: Vec<u8> = deleted
        .iter()
        .flat_map(|p| p.iter().copied().chain([0u8]))
        .collect();
    let mut out = flotilla_volume::delta::MAGIC.to_vec();
    out.extend_from_slice(&(list.len() as u64).to_be_bytes());
    out.extend_from_slice(&list);
    out.extend_from_slice(archive);
    out
}

#[test]
fn t18_a_two_pass_copy_sends_only_changes_and_ends_equal() {
    if !is_root() {
        return;
    }
    let src = Scratch::new();
    let dst = Scratch::new();
    let v = src.store.create("db", BTreeMap::new()).expect("create");
    let d = &v.path;
    fs::create_dir_all(d.join("keep/deep")).expect("mkdir");
    fs::create_dir_all(d.join("gone/sub")).expect("mkdir");
    fs::write(d.join("keep/big"), vec![7u8; 300_000]).expect("write");
    fs::write(d.join("keep/deep/same"), b"same").expect("write");
    fs::write(d.join("log"), b"1\n2\n").expect("write");
    fs::write(d.join("gone/sub/x"), b"x").expect("write");
    fs::write(d.join("rewritten"), b"aaaa").expect("write");
    fs::write(d.join("to-link"), b"file").expect("write");
    symlink("/etc/passwd", d.join("abs-link")).expect("symlink");
    own_tree(d, RANGE.host_start);
    chown(&d.join("keep/big"), RANGE.host_start + 1000);

    // Pass 1: everything, with a snapshot kept.
    let mut first = Vec::new();
    let stats = src.store.export_tracked("db", &mut first).expect("pass 1");
    assert_eq!(stats.files, 6);
    let (_, got) = dst.store.import_hashed("db", &first[..]).expect("import");
    assert_eq!(got.bytes, first.len() as u64);
    // The racy rule: files written just now are sent again whatever their stat.
    let mut racy = Vec::new();
    let stats = src
        .store
        .export_changes("db", &mut racy)
        .expect("racy pass");
    assert_eq!(stats.files, 6, "every file was written just now: {stats:?}");
    // From here on the store dates what it reads past the window (as if the files were
    // written long before), and pass 1 is taken again.
    fn later() -> std::time::SystemTime {
        std::time::SystemTime::now()
            + flotilla_volume::delta::RACY
            + std::time::Duration::from_millis(100)
    }
    let late = VolumeStore::open(src.base.join("volumes"), Some(RANGE))
        .expect("reopen")
        .with_clock(later);
    let _ = dst.store.remove("db");
    let mut first = Vec::new();
    late.export_tracked("db", &mut first).expect("pass 1");
    dst.store.import_hashed("db", &first[..]).expect("import");

    // Changes after pass 1: an append, a same-size rewrite with the mtime put back, a new
    // file, a removed tree, a file replaced by a symlink, a mode change.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(d.join("log"))
        .expect("open");
    std::io::Write::write_all(&mut f, b"3\n").expect("append");
    drop(f);
    let old_mtime = fs::metadata(d.join("rewritten"))
        .expect("stat")
        .modified()
        .expect("mtime");
    fs::write(d.join("rewritten"), b"bbbb").expect("write");
    fs::File::options()
        .write(true)
        .open(d.join("rewritten"))
        .and_then(|f| f.set_modified(old_mtime))
        .expect("set mtime back");
    fs::write(d.join("keep/new"), b"new").expect("write");
    fs::remove_dir_all(d.join("gone")).expect("rm");
    fs::remove_file(d.join("to-link")).expect("rm");
    symlink("keep", d.join("to-link")).expect("symlink");
    chmod(&d.join("keep/deep/same"), 0o600);
    for p in ["keep/new", "to-link"] {
        chown(&d.join(p), RANGE.host_start);
    }

    let mut delta = Vec::new();
    let stats = late.export_changes("db", &mut delta).expect("pass 2");
    // log, rewritten, keep/new and the chmod'ed file; not keep/big.
    assert_eq!(stats.files, 4, "{stats:?}");
    assert_eq!(stats.deleted, 3, "gone, gone/sub, gone/sub/x: {stats:?}");
    assert!(stats.file_bytes < 100, "{stats:?}");
    let got = dst.store.apply_changes("db", &delta[..]).expect("apply");
    assert_eq!(got.bytes, delta.len() as u64);
    assert_eq!(got.deleted, 3);
    let dv = dst.store.get("db").expect("get");
    same_trees(&snapshot(&dv.path), &snapshot(d));
    assert_eq!(
        dst.store.tree_digest("db").expect("digest"),
        src.store.tree_digest("db").expect("digest")
    );
    assert_eq!(fs::read(dv.path.join("log")).expect("log"), b"1\n2\n3\n");
    // A second delta with nothing changed sends no file data.
    let mut again = Vec::new();
    late.export_changes("db", &mut again).expect("pass 3");
    let mut again = Vec::new();
    let stats = late.export_changes("db", &mut again).expect("pass 4");
    assert_eq!((stats.files, stats.deleted), (0, 0), "{stats:?}");
    // A tree digest sees a difference in attributes.
    chmod(&dv.path.join("log"), 0o611);
    assert_ne!(
        dst.store.tree_digest("db").expect("digest"),
        src.store.tree_digest("db").expect("digest")
    );
    // Without a first pass there is no delta.
    src.store.create("other", BTreeMap::new()).expect("create");
    assert!(matches!(
        src.store.export_changes("other", Vec::new()),
        Err(VolumeError::NoSnapshot(_))
    ));
    src.marker_untouched("src");
    dst.marker_untouched("dst");
}

#[test]
fn t19_hostile_deltas_stay_inside_the_data_dir() {
    if !is_root() {
        return;
    }
    let s = Scratch::new();
    let marker = s.marker.display().to_string();
    let v = s.store.create("db", BTreeMap::new()).expect("create");
    fs::write(v.path.join("keep"), b"keep").expect("write");
    symlink(&marker, v.path.join("out")).expect("symlink");
    fs::create_dir(v.path.join("dir")).expect("mkdir");
    let before = snapshot(&v.path);
    for (what, deleted) in [
        ("dotdot", &b"../../marker/victim"[..]),
        ("inner dotdot", b"dir/../../marker/victim"),
        ("absolute", b"/etc/passwd"),
        ("through a symlink", b"out/victim"),
        ("through a symlink, deeper", b"out/etc/passwd"),
        ("the root", b""),
        ("dot", b"."),
    ] {
        let res = s.store.apply_changes("db", &delta_of(&[deleted], &[])[..]);
        assert!(
            matches!(res, Err(VolumeError::BadArchive(_))),
            "{what}: {res:?}"
        );
        assert_eq!(snapshot(&v.path), before, "{what}: nothing deleted");
        s.marker_untouched(what);
    }
    // A refused path anywhere in the list: nothing is deleted, not even the good ones.
    let res = s
        .store
        .apply_changes("db", &delta_of(&[b"keep", b"../x"], &[])[..]);
    assert!(matches!(res, Err(VolumeError::BadArchive(_))), "{res:?}");
    assert!(v.path.join("keep").exists());
    // Deleting the symlink itself removes the link, never its target.
    let ok = s
        .store
        .apply_changes("db", &delta_of(&[b"out", b"missing/x"], &tar_of(&[]))[..]);
    assert!(ok.is_ok(), "{ok:?}");
    assert!(!v.path.join("out").exists() && s.marker.join("victim").exists());
    // The delta's archive is confined like an import's.
    for (what, entries) in [
        ("tar dotdot", vec![E::File("../../marker/victim", b"pwned")]),
        ("tar device", vec![E::Device("dev")]),
    ] {
        let res = s
            .store
            .apply_changes("db", &delta_of(&[], &tar_of(&entries))[..]);
        assert!(
            matches!(res, Err(VolumeError::BadArchive(_))),
            "{what}: {res:?}"
        );
        s.marker_untouched(what);
    }
    // An absolute name lands inside the volume, as tar does, never at the host path.
    let res = s.store.apply_changes(
        "db",
        &delta_of(&[], &tar_of(&[E::File("/etc/flotilla-t19", b"pwned")]))[..],
    );
    assert!(
        res.is_err() || v.path.join("etc/flotilla-t19").exists(),
        "{res:?}"
    );
    assert!(!Path::new("/etc/flotilla-t19").exists());
    s.marker_untouched("tar absolute");
    symlink(&marker, v.path.join("out2")).expect("symlink");
    let res = s.store.apply_changes(
        "db",
        &delta_of(&[], &tar_of(&[E::File("out2/victim", b"pwned")]))[..],
    );
    assert!(res.is_err(), "writing through a symlink: {res:?}");
    s.marker_untouched("tar through a symlink");
    // Not a delta at all.
    assert!(matches!(
        s.store
            .apply_changes("db", &tar_of(&[E::File("a", b"a")])[..]),
        Err(VolumeError::BadArchive(_))
    ));
}
