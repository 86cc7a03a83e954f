//! [`VolumeStore`]: the volumes of one node under one root directory.

use crate::delta::{FileState, Snapshot};
use crate::error::{from_unpack, io_err, Result, VolumeError};
use flotilla_runtime::dirfd::{Dir, Event, Kind};
use flotilla_runtime::IdRange;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// The naming rule, as error messages state it.
pub const NAME_RULE: &str =
    "use 1-128 characters from [A-Za-z0-9_.-], starting with a letter or digit";

/// The data dir inside a volume's dir.
const DATA: &str = "_data";
const META: &str = "meta.json";
/// A size-limited volume's file system image, loop-mounted on its data dir.
const IMAGE: &str = "disk.ext4";

/// The smallest size limit a volume takes.
pub const MIN_SIZE_LIMIT: u64 = 8 << 20;
/// The largest size limit a volume takes (the image is sparse: this is a cap, not space taken).
pub const MAX_SIZE_LIMIT: u64 = 16 << 40;

/// Checks a volume name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}` (Docker's rule with a length cap),
/// so it is one path component that is neither `.` nor `..` and holds no `/` or NUL.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidName {
            name: name.into(),
            rule: NAME_RULE,
        })
    }
}

/// A volume on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalVolume {
    pub name: String,
    /// The data dir (`<root>/<name>/_data`): what a container mounts.
    pub path: PathBuf,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub labels: BTreeMap<String, String>,
    /// Bytes the volume may hold at most (its own ext4 file system, loop-mounted on the data
    /// dir); `None`: as much as the node's disk has.
    pub size_limit: Option<u64>,
}

/// `meta.json`.
#[derive(Serialize, Deserialize)]
struct Meta {
    created_at: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size_limit: Option<u64>,
}

/// The volumes of one node, each a directory under `root` (see the crate docs for the layout).
/// Safe to share between threads.
pub struct VolumeStore {
    root: PathBuf,
    owner: Option<IdRange>,
    /// Serialises create and remove.
    lock: Mutex<()>,
    /// Volumes an import is writing.
    busy: Mutex<HashSet<String>>,
    /// What the first pass of a move read, by volume (for the final pass).
    snapshots: Mutex<HashMap<String, Snapshot>>,
    /// The clock a first pass dates what it read by (files changed within
    /// [`crate::delta::RACY`] of it are sent again); the system's, but for tests.
    clock: fn() -> std::time::SystemTime,
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Regular files written, and their bytes.
    pub files: u64,
    pub file_bytes: u64,
    /// Paths a delta deletes.
    pub deleted: u64,
}

/// What an import or a delta read: the stream's SHA-256 (hex) and length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub sha256: String,
    pub bytes: u64,
    /// Paths a delta deleted.
    pub deleted: u64,
}

/// [`VolumeStore::tree_digest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeDigest {
    /// Hex SHA-256 over the sorted entries.
    pub sha256: String,
    pub entries: u64,
    pub files: u64,
    /// Bytes of the regular files.
    pub bytes: u64,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn seq() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

impl VolumeStore {
    /// The store with another clock for dating what a first pass reads (tests: files written
    /// "long ago" without waiting).
    pub fn with_clock(mut self, clock: fn() -> std::time::SystemTime) -> VolumeStore {
        self.clock = clock;
        self
    }

    /// Opens (creating) the store at `root`. `owner` is the node's user-namespace range: a
    /// data dir belongs to container root (`owner.shift(0)`), and `root` and each volume's
    /// dir are 0710 with the group of that id, so a container's root can reach its volume's
    /// data dir and no other host user can. Leftovers of interrupted removals are deleted.
    pub fn open(root: PathBuf, owner: Option<IdRange>) -> Result<VolumeStore> {
        let store = VolumeStore {
            root,
            owner,
            lock: Mutex::new(()),
            busy: Mutex::new(HashSet::new()),
            snapshots: Mutex::new(HashMap::new()),
            clock: std::time::SystemTime::now,
        };
        store.traversal_dir(&store.root)?;
        let dir = store.root_dir()?;
        let names = dir
            .entries()
            .map_err(|e| store.io(format!("list {}", store.root.display()), e))?;
        for n in names {
            if n.as_encoded_bytes().starts_with(b".trash-") {
                let trash = store.root.join(&n);
                if let Err(e) = unmount_if_mounted(&trash) {
                    tracing::warn!(dir = ?n, error = %e, "cannot unmount a removed volume's file system");
                    continue;
                }
                if let Err(e) = dir.remove(&n) {
                    tracing::warn!(dir = ?n, error = %e, "cannot delete a removed volume's leftovers");
                }
            }
        }
        // Size-limited volumes are mounted again after the host restarted.
        for v in store.list()? {
            if v.size_limit.is_some() {
                if let Err(e) = store.mount_image(&store.root.join(&v.name)) {
                    tracing::warn!(volume = %v.name, error = %e, "cannot mount a size-limited volume");
                }
            }
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The user-namespace range volumes are owned in.
    pub fn owner(&self) -> Option<IdRange> {
        self.owner
    }

    /// Creates the volume `name` with `labels`; an existing volume is returned as it is.
    pub fn create(&self, name: &str, labels: BTreeMap<String, String>) -> Result<LocalVolume> {
        self.create_with(name, labels, None)
    }

    /// [`VolumeStore::create`] with an optional size limit in bytes
    /// ([`MIN_SIZE_LIMIT`]..=[`MAX_SIZE_LIMIT`]): the volume gets an ext4 file system of
    /// its own in a sparse image file, loop-mounted `nosuid,nodev` on its data dir, so a task
    /// that fills it gets `ENOSPC` and the node's disk keeps its space. An existing volume is
    /// returned as it is, whatever its limit.
    pub fn create_with(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        size_limit: Option<u64>,
    ) -> Result<LocalVolume> {
        validate_name(name)?;
        if let Some(size) = size_limit {
            validate_size_limit(size)?;
        }
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        match self.get(name) {
            Err(VolumeError::NotFound(_)) => {}
            other => return other,
        }
        // A dir without meta.json is an interrupted create: completed here.
        let vdir = self.root.join(name);
        self.traversal_dir(&vdir)?;
        let data = vdir.join(DATA);
        match fs::create_dir(&data) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(self.io(format!("create {}", data.display()), e)),
        }
        if let Some(size) = size_limit {
            if let Err(e) = self.make_image(&vdir, size) {
                let _ = unmount_if_mounted(&vdir);
                let _ = fs::remove_file(vdir.join(IMAGE));
                return Err(e);
            }
        }
        self.reset_data_root(&data)?;
        let meta = Meta {
            created_at: flotilla_runtime::now_rfc3339(),
            labels,
            size_limit,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| VolumeError::Corrupt {
            path: vdir.join(META),
            message: e.to_string(),
        })?;
        self.write_atomic(&vdir, META, &json)?;
        tracing::info!(volume = %name, "volume created");
        self.get(name)
    }

    /// The volume `name`.
    pub fn get(&self, name: &str) -> Result<LocalVolume> {
        validate_name(name)?;
        let vdir = self.root.join(name);
        let p = vdir.join(META);
        let raw = match fs::read(&p) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(name.into()))
            }
            Err(e) => return Err(self.io(format!("read {}", p.display()), e)),
        };
        let meta: Meta = serde_json::from_slice(&raw).map_err(|e| VolumeError::Corrupt {
            path: p.clone(),
            message: e.to_string(),
        })?;
        Ok(LocalVolume {
            name: name.into(),
            path: vdir.join(DATA),
            created_at: meta.created_at,
            labels: meta.labels,
            size_limit: meta.size_limit,
        })
    }

    /// Every volume, by name. A volume whose metadata cannot be read is left out (and logged).
    pub fn list(&self) -> Result<Vec<LocalVolume>> {
        let rd = fs::read_dir(&self.root)
            .map_err(|e| self.io(format!("list {}", self.root.display()), e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| self.io(format!("list {}", self.root.display()), e))?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            match self.get(&name) {
                Ok(v) => out.push(v),
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => tracing::warn!(volume = %name, error = %e, "volume left out of the list"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes the volume `name` and its data. Its dir is first renamed away (so it is gone
    /// for `get` and `list` at once), then deleted through descriptors: a symlink inside is
    /// removed itself, never followed. Whether a container still uses the volume is the
    /// caller's to check.
    pub fn remove(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        if self
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
        {
            return Err(VolumeError::Busy(name.into()));
        }
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let vdir = self.root.join(name);
        match fs::symlink_metadata(&vdir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(VolumeError::NotFound(name.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(name.into()))
            }
            Err(e) => return Err(self.io(format!("stat {}", vdir.display()), e)),
        }
        // A size-limited volume's file system goes first (refused while a container has it).
        unmount_if_mounted(&vdir)?;
        let root = self.root_dir()?;
        let trash = format!(".trash-{name}-{}-{}", std::process::id(), seq());
        root.rename(OsStr::new(name), OsStr::new(&trash))
            .map_err(|e| self.io(format!("move {} away", vdir.display()), e))?;
        root.remove(OsStr::new(&trash))
            .map_err(|e| self.io(format!("delete the data of volume {name}"), e))?;
        self.forget_snapshot(name);
        tracing::info!(volume = %name, "volume removed");
        Ok(())
    }

    /// Bytes the volume's data takes on disk (allocated blocks, as `du`): symlinks are not
    /// followed, a file with several hard links counts once.
    pub fn usage(&self, name: &str) -> Result<u64> {
        let v = self.get(name)?;
        let data = self.data_dir(&v)?;
        let st = data
            .stat()
            .map_err(|e| self.io(format!("stat {}", v.path.display()), e))?;
        let mut total = st.blocks.saturating_mul(512);
        let mut linked: HashSet<(u64, u64)> = HashSet::new();
        data.walk(|ev| {
            let st = match ev {
                Event::Enter { stat, .. } | Event::Entry { stat, .. } => stat,
                Event::Leave { .. } => return Ok(()),
            };
            if st.kind != Kind::Dir && st.nlink > 1 && !linked.insert((st.dev, st.ino)) {
                return Ok(());
            }
            total = total.saturating_add(st.blocks.saturating_mul(512));
            Ok(())
        })
        .map_err(|e| self.io(format!("measure volume {name}"), e))?;
        Ok(total)
    }

    /// Writes the volume's data as a tar stream: directories, regular files and symlinks
    /// (as links), with their modes, times and owners as the container sees them (shifted
    /// back out of the node's range; a host id outside it becomes 65534). Other entries
    /// (devices, FIFOs, sockets) are left out; hard links become copies. Files are read
    /// through descriptors opened without following symlinks; a file that changes size
    /// meanwhile is cut or zero-padded to the size it had when opened.
    pub fn export(&self, name: &str, writer: impl Write) -> Result<()> {
        let v = self.get(name)?;
        let data = self.data_dir(&v)?;
        let mut b = tar::Builder::new(writer);
        self.write_tar(&v, &data, &mut b, None)?;
        self.finish_tar(name, b)
    }

    /// The first pass of a move: [`export`](Self::export), with a [`Snapshot`] of what was
    /// read kept (in memory, one per volume) for [`export_changes`](Self::export_changes).
    /// Works while a container writes the volume.
    pub fn export_tracked(&self, name: &str, writer: impl Write) -> Result<ExportStats> {
        let v = self.get(name)?;
        let data = self.data_dir(&v)?;
        let mut b = tar::Builder::new(writer);
        let (snap, stats) = self.write_tar(&v, &data, &mut b, None)?;
        self.finish_tar(name, b)?;
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), snap);
        Ok(stats)
    }

    /// The final pass of a move, once nothing writes the volume: a delta stream (see
    /// [`crate::delta`]) with what changed since [`export_tracked`](Self::export_tracked):
    /// the paths gone, then a tar of the root, every directory and symlink, and the files
    /// whose stat changed. [`VolumeError::NoSnapshot`] without a first pass.
    pub fn export_changes(&self, name: &str, mut writer: impl Write) -> Result<ExportStats> {
        let v = self.get(name)?;
        let since = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::NoSnapshot(name.into()))?;
        let data = self.data_dir(&v)?;
        // What is there now (export leaves out devices, FIFOs and sockets: so does this).
        let mut now: HashSet<Vec<u8>> = HashSet::new();
        data.walk(|ev| {
            match ev {
                Event::Leave { .. } => {}
                Event::Enter { path, .. } => {
                    now.insert(path.as_os_str().as_bytes().to_vec());
                }
                Event::Entry { path, stat, .. } => {
                    if stat.kind != Kind::Other {
                        now.insert(path.as_os_str().as_bytes().to_vec());
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| self.io(format!("read volume {name}"), e))?;
        let mut deleted: Vec<Vec<u8>> = since
            .entries
            .keys()
            .filter(|p| !now.contains(*p))
            .cloned()
            .collect();
        // Parents before children: a removed directory takes its entries with it.
        deleted.sort();
        crate::delta::write_head(&mut writer, &deleted).map_err(|e| VolumeError::Io {
            context: format!("write the changes of volume {name}"),
            source: e,
        })?;
        let mut b = tar::Builder::new(writer);
        let (snap, mut stats) = self.write_tar(&v, &data, &mut b, Some(&since))?;
        self.finish_tar(name, b)?;
        stats.deleted = deleted.len() as u64;
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), snap);
        Ok(stats)
    }

    /// Whether a first pass of a move left a snapshot of `name` here.
    pub fn has_snapshot(&self, name: &str) -> bool {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    /// Forgets the first-pass snapshot of `name` (a move given up).
    pub fn forget_snapshot(&self, name: &str) {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    fn finish_tar<W: Write>(&self, name: &str, b: tar::Builder<W>) -> Result<()> {
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| VolumeError::Io {
                context: format!("write the archive of volume {name}"),
                source: e,
            })
    }

    /// Writes the tree of `v` into `b` (without the end of archive): everything, or with
    /// `since`, the root, directories, symlinks and the files changed since that snapshot.
    /// Returns the snapshot of what it saw.
    fn write_tar<W: Write>(
        &self,
        v: &LocalVolume,
        data: &Dir,
        b: &mut tar::Builder<W>,
        since: Option<&Snapshot>,
    ) -> Result<(Snapshot, ExportStats)> {
        let name = v.name.as_str();
        let unshift = |id: u32| match self.owner {
            Some(r) => r.unshift(id).unwrap_or(65_534),
            None => id,
        };
        let werr = |e: io::Error| VolumeError::Io {
            context: format!("write the archive of volume {name}"),
            source: e,
        };
        let mut snap = Snapshot::default();
        let mut stats = ExportStats::default();
        // The root entry (`./`) carries the data dir's owner and mode.
        let st = data
            .stat()
            .map_err(|e| self.io(format!("stat {}", v.path.display()), e))?;
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(st.mode);
        h.set_uid(u64::from(unshift(st.uid)));
        h.set_gid(u64::from(unshift(st.gid)));
        h.set_mtime(u64::try_from(st.mtime.secs).unwrap_or(0));
        h.set_size(0);
        h.as_old_mut().name[..2].copy_from_slice(b"./");
        h.set_cksum();
        b.append(&h, io::empty()).map_err(werr)?;
        // Write errors are told apart from read errors of the tree.
        let mut write_failed: Option<io::Error> = None;
        let res = data.walk(|ev| {
            let Some((parent, name, path, st)) = ev.reached() else {
                return Ok(());
            };
            let key = path.as_os_str().as_bytes();
            let mut h = tar::Header::new_gnu();
            h.set_mode(st.mode);
            h.set_uid(u64::from(unshift(st.uid)));
            h.set_gid(u64::from(unshift(st.gid)));
            h.set_mtime(u64::try_from(st.mtime.secs).unwrap_or(0));
            let wrote = match st.kind {
                Kind::Dir => {
                    snap.record_other(key);
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, path, io::empty())
                }
                Kind::Symlink => {
                    let target = parent.read_link(name)?;
                    snap.record_other(key);
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, path, Path::new(&target))
                }
                Kind::File => {
                    let f = match parent.open_file(name) {
                        Ok(f) => f,
                        Err(e) if skippable(&e) => {
                            tracing::debug!(entry = %path.display(), error = %e,
                                "export skips an entry replaced while reading");
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    };
                    // Stat before reading: a write after it changes ctime (and is sent by
                    // the final pass).
                    let meta = f.metadata()?;
                    let state = FileState::of(&meta);
                    let changed = since.is_none_or(|s| s.file_changed(key, &state));
                    snap.record_file(key, state, (self.clock)());
                    if !changed {
                        return Ok(());
                    }
                    let size = meta.len();
                    stats.files += 1;
                    stats.file_bytes += size;
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(size);
                    b.append_data(&mut h, path, Exact::new(f, size))
                }
                Kind::Other => {
                    tracing::debug!(entry = %path.display(), "export skips a device, FIFO or socket");
                    return Ok(());
                }
            };
            wrote.map_err(|e| {
                let msg = e.to_string();
                write_failed = Some(e);
                io::Error::other(msg)
            })
        });
        if let Some(e) = write_failed {
            return Err(werr(e));
        }
        res.map_err(|e| self.io(format!("read volume {name}"), e))?;
        Ok((snap, stats))
    }

    /// Applies a delta stream (as [`export_changes`](Self::export_changes) writes) to the
    /// existing volume `name`: the deletions first (each path checked, resolved without
    /// following a symlink; see [`crate::delta`]), then the tar through the confined
    /// unpacker, replacing what it names. Returns the SHA-256 and length of the whole
    /// stream. On failure the volume is left part-way: the caller drops it.
    pub fn apply_changes(&self, name: &str, reader: impl Read) -> Result<Received> {
        validate_name(name)?;
        let v = self.get(name)?;
        {
            let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
            if !busy.insert(name.to_string()) {
                return Err(VolumeError::Busy(name.into()));
            }
        }
        let res = (|| {
            let mut r = crate::delta::Hashing {
                inner: reader,
                hasher: sha2::Sha256::default(),
                count: 0,
            };
            let deleted = crate::delta::read_head(&mut r)?;
            let data = self.data_dir(&v)?;
            for p in &deleted {
                crate::delta::delete_in(&data, p)?;
            }
            flotilla_runtime::image::layer::unpack_volume(&mut r, &v.path, self.owner)
                .map_err(|e| from_unpack(&self.root, e))?;
            // Anything after the archive's end is hashed too (the sender hashed it).
            io::copy(&mut r, &mut io::sink()).map_err(|e| VolumeError::Io {
                context: "read the delta stream".into(),
                source: e,
            })?;
            Ok(Received {
                sha256: hex::encode(sha2::Digest::finalize(r.hasher)),
                bytes: r.count,
                deleted: deleted.len() as u64,
            })
        })();
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        res
    }

    /// A digest of the volume's tree without its contents: every entry export writes (path,
    /// kind, size, mode, owner as the container sees it, symlink target), sorted, hashed.
    /// Two nodes agree on it when a copy left no entry out, none behind and no attribute
    /// different (the data itself is checked by the hashes of the streams).
    pub fn tree_digest(&self, name: &str) -> Result<TreeDigest> {
        let v = self.get(name)?;
        let data = self.data_dir(&v)?;
        let unshift = |id: u32| match self.owner {
            Some(r) => r.unshift(id).unwrap_or(65_534),
            None => id,
        };
        let line =
            |path: &[u8], kind: u8, size: u64, st: &flotilla_runtime::dirfd::Stat, link: &[u8]| {
                let mut l = Vec::with_capacity(path.len() + link.len() + 48);
                l.extend_from_slice(path);
                l.push(0);
                l.push(kind);
                l.extend_from_slice(&size.to_be_bytes());
                l.extend_from_slice(&st.mode.to_be_bytes());
                l.extend_from_slice(&unshift(st.uid).to_be_bytes());
                l.extend_from_slice(&unshift(st.gid).to_be_bytes());
                l.extend_from_slice(link);
                l.push(0);
                l
            };
        let root = data
            .stat()
            .map_err(|e| self.io(format!("stat {}", v.path.display()), e))?;
        let mut lines = vec![line(b".", b'd', 0, &root, b"")];
        let mut out = TreeDigest::default();
        data.walk(|ev| {
            let Some((parent, name, path, st)) = ev.reached() else {
                return Ok(());
            };
            let key = path.as_os_str().as_bytes();
            match st.kind {
                Kind::Dir => lines.push(line(key, b'd', 0, st, b"")),
                Kind::File => {
                    out.files += 1;
                    out.bytes += st.size;
                    lines.push(line(key, b'f', st.size, st, b""))
                }
                Kind::Symlink => {
                    let target = parent.read_link(name)?;
                    lines.push(line(key, b'l', 0, st, target.as_bytes()))
                }
                Kind::Other => {}
            }
            out.entries += 1;
            Ok(())
        })
        .map_err(|e| self.io(format!("read volume {name}"), e))?;
        lines.sort();
        let mut h = sha2::Sha256::default();
        for l in &lines {
            sha2::Digest::update(&mut h, l);
        }
        out.sha256 = hex::encode(sha2::Digest::finalize(h));
        Ok(out)
    }

    /// Fills the volume `name` from a tar stream (as [`export`](Self::export) writes),
    /// creating the volume when missing; an existing one must be empty. Owners are shifted
    /// into the node's range. The archive is untrusted: it is unpacked through descriptors
    /// confined to the data dir (no `..` or absolute path, symlink or hard link leads out of
    /// it), and device nodes are refused. On failure the volume is removed again when this
    /// call created it, emptied otherwise.
    pub fn import(&self, name: &str, reader: impl Read) -> Result<LocalVolume> {
        self.import_hashed(name, reader).map(|(v, _)| v)
    }

    /// [`import`](Self::import), also returning the SHA-256 and length of the stream read
    /// (hashed as it is unpacked: the stream is read once).
    pub fn import_hashed(&self, name: &str, reader: impl Read) -> Result<(LocalVolume, Received)> {
        validate_name(name)?;
        let v = match self.get(name) {
            Ok(v) => Some(v),
            Err(VolumeError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        {
            let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
            if !busy.insert(name.to_string()) {
                return Err(VolumeError::Busy(name.into()));
            }
        }
        let res = self.import_locked(name, v, reader);
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        res
    }

    fn import_locked(
        &self,
        name: &str,
        existing: Option<LocalVolume>,
        reader: impl Read,
    ) -> Result<(LocalVolume, Received)> {
        let created = existing.is_none();
        let v = match existing {
            Some(v) => v,
            None => self.create(name, BTreeMap::new())?,
        };
        let data = self.data_dir(&v)?;
        let empty = data
            .is_empty()
            .map_err(|e| self.io(format!("list {}", v.path.display()), e))?;
        if !empty {
            return Err(VolumeError::NotEmpty(name.into()));
        }
        match flotilla_runtime::image::layer::unpack_volume(reader, &v.path, self.owner) {
            Ok((digest, bytes)) => {
                tracing::info!(volume = %name, bytes, "volume imported");
                let sha256 = digest
                    .strip_prefix("sha256:")
                    .unwrap_or(&digest)
                    .to_string();
                Ok((
                    v,
                    Received {
                        sha256,
                        bytes,
                        deleted: 0,
                    },
                ))
            }
            Err(e) => {
                let err = from_unpack(&self.root, e);
                tracing::warn!(volume = %name, error = %err, "volume import failed; undoing it");
                let undo = if created {
                    self.busy
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(name);
                    self.remove(name)
                } else {
                    data.clear()
                        .map_err(|e| self.io(format!("empty {}", v.path.display()), e))
                        .and_then(|()| self.reset_data_root(&v.path))
                };
                if let Err(u) = undo {
                    tracing::warn!(volume = %name, error = %u, "cannot undo a failed import");
                }
                Err(err)
            }
        }
    }

    fn io(&self, context: String, e: io::Error) -> VolumeError {
        io_err(&self.root, context, e)
    }

    fn root_dir(&self) -> Result<Dir> {
        Dir::open(&self.root).map_err(|e| self.io(format!("open {}", self.root.display()), e))
    }

    /// The volume's data dir, opened (it must not be a symlink: its parent is root's, so no
    /// container can have put one there).
    fn data_dir(&self, v: &LocalVolume) -> Result<Dir> {
        let vdir = self.root.join(&v.name);
        Dir::open(&vdir)
            .and_then(|d| d.open_dir(OsStr::new(DATA)))
            .map_err(|e| self.io(format!("open {}", v.path.display()), e))
    }

    /// Makes the volume's file system image (`size` bytes, sparse; root dir owned by container
    /// root) and mounts it on the data dir. Replaces an image left by an interrupted create.
    fn make_image(&self, vdir: &Path, size: u64) -> Result<()> {
        unmount_if_mounted(vdir)?;
        let image = vdir.join(IMAGE);
        let _ = fs::remove_file(&image);
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&image)
            .map_err(|e| self.io(format!("create {}", image.display()), e))?;
        f.set_len(size)
            .map_err(|e| self.io(format!("size {}", image.display()), e))?;
        drop(f);
        let id = self.mapped_root();
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-E"])
                .arg(format!("root_owner={id}:{id},lazy_itable_init=1,nodiscard"))
                .arg(&image),
            "make the volume's file system (mkfs.ext4, package e2fsprogs)",
        )?;
        self.mount_image(vdir)?;
        // An empty volume: mkfs's lost+found goes (the image's copy-up needs none).
        let lost = vdir.join(DATA).join("lost+found");
        match fs::remove_dir(&lost) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(format!("remove {}", lost.display()), e)),
        }
    }

    /// Mounts the volume's image on its data dir unless it is mounted already.
    fn mount_image(&self, vdir: &Path) -> Result<()> {
        if is_mounted(vdir) {
            return Ok(());
        }
        run(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
                .arg(vdir.join(IMAGE))
                .arg(vdir.join(DATA)),
            "mount the volume's file system",
        )
    }

    /// The host id container root maps to (0 without user namespaces).
    fn mapped_root(&self) -> u32 {
        self.owner.map_or(0, |r| r.shift(0))
    }

    /// A directory on the way to the data dirs: 0710 root:<mapped root's gid> (0700 without
    /// user namespaces).
    fn traversal_dir(&self, p: &Path) -> Result<()> {
        fs::create_dir_all(p).map_err(|e| self.io(format!("create {}", p.display()), e))?;
        let mode = match self.owner {
            Some(r) => {
                std::os::unix::fs::chown(p, Some(0), Some(r.shift(0)))
                    .map_err(|e| self.io(format!("chown {}", p.display()), e))?;
                0o710
            }
            None => {
                std::os::unix::fs::chown(p, Some(0), Some(0))
                    .map_err(|e| self.io(format!("chown {}", p.display()), e))?;
                0o700
            }
        };
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(|e| self.io(format!("chmod {}", p.display()), e))
    }

    /// A data dir as created: container root's, 0755.
    fn reset_data_root(&self, data: &Path) -> Result<()> {
        let id = self.mapped_root();
        let d = Dir::open(data).map_err(|e| self.io(format!("open {}", data.display()), e))?;
        flotilla_runtime::dirfd::set_owner(&d, id, id)
            .and_then(|()| flotilla_runtime::dirfd::set_mode(&d, 0o755))
            .map_err(|e| self.io(format!("chown {}", data.display()), e))
    }

    /// Writes `dir/name` (0600) through a temporary file and a rename, synced.
    fn write_atomic(&self, dir: &Path, name: &str, data: &[u8]) -> Result<()> {
        let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), seq()));
        let dst = dir.join(name);
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &dst)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io(format!("write {}", dst.display()), e)
        })
    }
}

/// An error meaning the entry changed between listing and opening it.
fn skippable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidInput
        || matches!(
            e.raw_os_error(),
            Some(libc::ELOOP | libc::ENOENT | libc::ENXIO | libc::ENOTDIR)
        )
}

/// Yields exactly `left` bytes of `inner`: cut when it grew, zero-padded when it shrank, so
/// the tar header's size stays true.
struct Exact<R> {
    inner: R,
    left: u64,
    eof: bool,
}

impl<R: Read> Exact<R> {
    fn new(inner: R, size: u64) -> Self {
        Exact {
            inner,
            left: size,
            eof: false,
        }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = if self.eof {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.eof = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Checks a size limit against [`MIN_SIZE_LIMIT`] and [`MAX_SIZE_LIMIT`].
pub fn validate_size_limit(size: u64) -> Result<()> {
    if (MIN_SIZE_LIMIT..=MAX_SIZE_LIMIT).contains(&size) {
        Ok(())
    } else {
        Err(VolumeError::InvalidSize(size))
    }
}

/// Whether `<vdir>/_data` is a mount point (another device than its parent).
fn is_mounted(vdir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        fs::symlink_metadata(vdir),
        fs::symlink_metadata(vdir.join(DATA)),
    ) {
        (Ok(parent), Ok(data)) => data.is_dir() && parent.dev() != data.dev(),
        _ => false,
    }
}

/// Unmounts `<vdir>/_data` when a file system is mounted there.
fn unmount_if_mounted(vdir: &Path) -> Result<()> {
    if !is_mounted(vdir) {
        return Ok(());
    }
    run(
        Command::new("umount").arg(vdir.join(DATA)),
        "unmount the volume's file system (is a container still using it?)",
    )
}

/// Runs `cmd`; its stderr becomes the error.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| VolumeError::Io {
        context: format!("{what}: run {:?}", cmd.get_program()),
        source: e,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VolumeError::Io {
            context: format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()),
            source: io::Error::other(format!(
                "{:?} exited with {}",
                cmd.get_program(),
                out.status
            )),
        })
    }
}

/// The data dirs of size-limited volumes under the store root `root` that have their file
/// system mounted (for `node cleanup --dry-run`).
pub fn mounted(root: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|vdir| is_mounted(vdir))
        .map(|vdir| vdir.join(DATA))
        .collect();
    out.sort();
    out
}

/// Unmounts every size-limited volume's file system under the store root `root` (for
/// `node cleanup`, with no container left; the data stays in the images and is mounted again
/// when the node starts). Returns the data dirs unmounted.
pub fn unmount_all(root: &Path) -> Result<Vec<PathBuf>> {
    let found = mounted(root);
    for data in &found {
        if let Some(vdir) = data.parent() {
            unmount_if_mounted(vdir)?;
        }
    }
    Ok(found)
}
