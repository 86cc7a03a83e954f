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
