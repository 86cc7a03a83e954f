//! Encryption at rest: how the store seals every value it writes to disk.
//!
//! With a keyring ([`crate::StoreConfig::at_rest`]) every value of every redb table, in both
//! files, is an envelope of [`flotilla_secrets`] (AES-256-GCM under the newest data key). The AAD binds a value to its place: the table's name, a NUL, and the value's key
//! (a log index or revision big-endian, an object id, a meta key), so a value copied or moved
//! to another place (another object, another log index, the other file) fails to open. Keys
//! stay plain: they are ids and indexes, which the store needs to range over.
//!
//! Raft RPC bodies and what openraft holds in memory stay plain: each manager seals with its
//! own keys when it persists (RPCs travel over mTLS).
//!
//! Opening with a keyring a store that holds plain values (one written before encryption at
//! rest, or opened without keys) rewrites each file into a new one with every value sealed
//! and renames it over the old one ([`upgrade_file`]), before Raft starts; the old plain file
//! is unlinked, not merely freed pages inside a live file. After that a plain value is refused
//! as corrupt, and a store opened without a keyring refuses sealed values.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use flotilla_secrets::{is_sealed, Keyring, ENVELOPE_OVERHEAD, HEADER_LEN};
use redb::{Database, Durability};

use crate::error::StoreError;

/// Seals and opens the store's values; plain pass-through without a keyring.
#[derive(Clone, Default)]
pub(crate) struct Sealer {
    keyring: Option<Arc<Keyring>>,
}

/// The AAD of the value at `key` in `table`.
fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(table.len() + 1 + key.len());
    out.extend_from_slice(table.as_bytes());
    out.push(0);
    out.extend_from_slice(key);
    out
}

/// Calls `f` with the AAD of the value at `key` in `table`, built on the stack when it is
/// short (table names and ids are).
fn with_aad<R>(table: &str, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    const STACK: usize = 128;
    let len = table.len() + 1 + key.len();
    if len > STACK {
        return f(&aad(table, key));
    }
    let mut buf = [0u8; STACK];
    buf[..table.len()].copy_from_slice(table.as_bytes());
    buf[table.len() + 1..len].copy_from_slice(key);
    f(&buf[..len])
}

impl Sealer {
    pub(crate) fn new(keyring: Option<Arc<Keyring>>) -> Sealer {
        Sealer { keyring }
    }

    pub(crate) fn is_keyed(&self) -> bool {
        self.keyring.is_some()
    }

    /// What to store for `plain` at (`table`, `key`).
    pub(crate) fn seal(&self, table: &str, key: &[u8], plain: Vec<u8>) -> Result<Vec<u8>, String> {
        match &self.keyring {
            None => Ok(plain),
            Some(k) => with_aad(table, key, |aad| k.seal(&plain, aad))
                .map_err(|e| format!("cannot seal the value at {table}/{}: {e}", show(key))),
        }
    }

    /// An empty buffer to write a value into for [`Sealer::seal_buf`], with room for
    /// `capacity` bytes of it: it starts with room for the envelope's header when keyed.
    pub(crate) fn buffer(&self, capacity: usize) -> Vec<u8> {
        match &self.keyring {
            None => Vec::with_capacity(capacity),
            Some(_) => {
                let mut buf = Vec::with_capacity(ENVELOPE_OVERHEAD + capacity);
                buf.resize(HEADER_LEN, 0);
                buf
            }
        }
    }

    /// What to store at (`table`, `key`) for the value written into `buf` after
    /// [`Sealer::buffer`]'s header room; sealed in place, without a copy.
    pub(crate) fn seal_buf(
        &self,
        table: &str,
        key: &[u8],
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        match &self.keyring {
            None => Ok(buf),
            Some(k) => with_aad(table, key, |aad| k.seal_in_place(&mut buf, aad))
                .map(|()| buf)
                .map_err(|e| format!("cannot seal the value at {table}/{}: {e}", show(key))),
        }
    }

    /// Like [`Sealer::seal`], without copying `plain` when there is no keyring.
    pub(crate) fn seal_borrowed<'a>(
        &self,
        table: &str,
        key: &[u8],
        plain: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, String> {
        match &self.keyring {
            None => Ok(Cow::Borrowed(plain)),
            Some(k) => with_aad(table, key, |aad| k.seal(plain, aad))
                .map(Cow::Owned)
                .map_err(|e| format!("cannot seal the value at {table}/{}: {e}", show(key))),
        }
    }

    /// The plain value stored at (`table`, `key`).
    pub(crate) fn open<'a>(
        &self,
        table: &str,
        key: &[u8],
        stored: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, String> {
        match (&self.keyring, is_sealed(stored)) {
            (Some(k), true) => with_aad(table, key, |aad| k.open(stored, aad))
                .map(Cow::Owned)
                .map_err(|e| format!("cannot open the value at {table}/{}: {e}", show(key))),
            (Some(_), false) => Err(format!(
                "the value at {table}/{} is not sealed although this store is encrypted at rest \
                 (tampered with, or written by another program)",
                show(key)
            )),
            (None, true) => Err(format!(
                "the value at {table}/{} is encrypted at rest: open the store with this \
                 manager's keys",
                show(key)
            )),
            (None, false) => Ok(Cow::Borrowed(stored)),
        }
    }
}

/// A key for error messages: text if it is, else hex-ish big-endian numbers.
fn show(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// Copies one file's tables from `src` into `dst` (the upgrade) in one durable transaction,
/// sealing plain values (values already sealed are copied as they are); returns how many it
/// sealed.
pub(crate) type CopyFn = fn(&Database, &Database, &Sealer) -> Result<u64, String>;
/// Counts the plain values of one file.
pub(crate) type CountFn = fn(&Database) -> Result<u64, String>;

/// Seals in place every plain value of the redb file at `path` (no-op without a keyring, if
/// the file does not exist, or if it holds no plain value): writes a new file beside it with
/// everything sealed, fsyncs it, renames it over `path` and fsyncs the directory. Crash-safe:
/// until the rename the old file is intact, and a leftover `*.sealing` file is discarded.
pub(crate) async fn upgrade_file(
    path: &Path,
    sealer: &Sealer,
    count: CountFn,
    copy: CopyFn,
) -> Result<(), StoreError> {
    let tmp = {
        let mut t = path.as_os_str().to_owned();
        t.push(".sealing");
        std::path::PathBuf::from(t)
    };
    let io = |what: &str, p: &Path, e: std::io::Error| {
        StoreError::Storage(format!("cannot {what} {}: {e}", p.display()))
    };
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &tmp, e)),
        _ => {}
    }
    if !sealer.is_keyed() || !path.exists() {
        return Ok(());
    }
    let src = crate::store::open_db(path).await?;
    let plain = count(&src).map_err(StoreError::Storage)?;
    if plain == 0 {
        return Ok(());
    }
    tracing::info!(file = %path.display(), plain_values = plain, "sealing a store written before encryption at rest");
    let dst = crate::store::open_db(&tmp).await?;
    let sealed = copy(&src, &dst, sealer).map_err(StoreError::Storage)?;
    drop(src);
    drop(dst);
    std::fs::rename(&tmp, path).map_err(|e| io("rename into place", path, e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync", dir, e))?;
    tracing::info!(file = %path.display(), sealed, "store file sealed at rest");
    Ok(())
}

/// Opens a write transaction that fsyncs on commit (for the upgrade copy).
pub(crate) fn durable_write(db: &Database) -> Result<redb::WriteTransaction, String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    Ok(txn)
}

/// Copies every row of one table from `src` to `dst`, sealing plain values; counts them.
/// `$key_bytes` maps a key (as redb hands it out) to the AAD key bytes.
macro_rules! copy_table {
    ($src:expr, $dst:expr, $def:expr, $name:expr, $sealer:expr, |$k:ident| $key_bytes:expr) => {{
        use redb::ReadableTable as _;
        let src_t = match $src.open_table($def) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.to_string()),
        };
        let mut dst_t = $dst.open_table($def).map_err(|e| e.to_string())?;
        let mut sealed = 0u64;
        if let Some(src_t) = src_t {
            for item in src_t.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                let $k = k.value();
                let value = v.value();
                let stored = if flotilla_secrets::is_sealed(value) {
                    value.to_vec()
                } else {
                    sealed += 1;
                    $sealer.seal($name, &$key_bytes, value.to_vec())?
                };
                dst_t
                    .insert($k, stored.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        sealed
    }};
}

/// Counts the plain values of one table (a missing table has none).
macro_rules! count_plain {
    ($txn:expr, $def:expr) => {{
        use redb::ReadableTable as _;
        match $txn.open_table($def) {
            Ok(t) => {
                let mut n = 0u64;
                for item in t.iter().map_err(|e| e.to_string())? {
                    let (_, v) = item.map_err(|e| e.to_string())?;
                    if !flotilla_secrets::is_sealed(v.value()) {
                        n += 1;
                    }
                }
                n
            }
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.to_string()),
        }
    }};
}

pub(crate) use {copy_table, count_plain};
