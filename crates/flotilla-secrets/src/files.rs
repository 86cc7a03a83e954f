//! The key directory: `kek` (the unlock key) and `dek` (the wrapped data keys).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use crate::error::SecretsError;
use crate::keys::{new_data_key, Kek, Keyring};

/// The unlock key's file name in a [`KeyDir`].
pub const KEK_FILE: &str = "kek";
/// The wrapped data keys' file name in a [`KeyDir`].
pub const DEK_FILE: &str = "dek";
/// The next unlock key, present only while [`KeyDir::rotate_kek`] runs (or after it crashed).
pub const KEK_NEXT_FILE: &str = "kek.next";

/// Largest key file read (the data-key file holds at most 1024 keys of 92 bytes).
const MAX_KEY_FILE: u64 = 128 * 1024;

/// Writes `bytes` to `path` atomically with mode 0600: a new temporary file beside it
/// (`O_EXCL`), fsync, rename over `path`, fsync of the directory.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), SecretsError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| SecretsError::BadKeyFile {
            path: path.to_path_buf(),
            reason: "not a file path".to_string(),
        })?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // A leftover of a crashed write (the directory is private, so it is ours).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(SecretsError::io("remove", &tmp, e))
        }
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| SecretsError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| SecretsError::io("write", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| SecretsError::io("rename into place", path, e))?;
    sync_dir(path)
}

pub(crate) fn sync_dir(path: &Path) -> Result<(), SecretsError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SecretsError::io("sync", dir, e))
}

fn private_dir(dir: &Path) -> Result<(), SecretsError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| SecretsError::io("create", parent, e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        r => r.map_err(|e| SecretsError::io("create", dir, e))?,
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| SecretsError::io("chmod", dir, e))
}

/// Reads a key file (making it 0600 if it was more open); `None` if it does not exist.
pub(crate) fn read_private(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, SecretsError> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SecretsError::io("open", path, e)),
    };
    let meta = f
        .metadata()
        .map_err(|e| SecretsError::io("stat", path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| SecretsError::io("chmod", path, e))?;
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(SecretsError::BadKeyFile {
            path: path.to_path_buf(),
            reason: format!("{} bytes is too large for a key file", meta.len()),
        });
    }
    let mut buf = Zeroizing::new(Vec::new());
    f.take(MAX_KEY_FILE)
        .read_to_end(&mut buf)
        .map_err(|e| SecretsError::io("read", path, e))?;
    Ok(Some(buf))
}

pub(crate) fn read_kek(path: &Path) -> Result<Option<Kek>, SecretsError> {
    let Some(bytes) = read_private(path)? else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| SecretsError::BadKeyFile {
        path: path.to_path_buf(),
        reason: "the unlock key is not text".to_string(),
    })?;
    Kek::from_text(text)
        .map(Some)
        .map_err(|reason| SecretsError::BadKeyFile {
            path: path.to_path_buf(),
            reason,
        })
}

fn remove_if_exists(path: &Path) -> Result<(), SecretsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(SecretsError::io("remove", path, e))
        }
        _ => Ok(()),
    }
}

/// A manager's keys on disk, loaded: the unlock key, and the keyring it unwrapped.
pub struct KeyDir {
    dir: PathBuf,
    kek: Kek,
    keyring: Arc<Keyring>,
    created: bool,
    /// Serializes rotations.
    rotation: Mutex<()>,
}

impl std::fmt::Debug for KeyDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDir")
            .field("dir", &self.dir)
            .field("keyring", &self.keyring)
            .finish()
    }
}

impl KeyDir {
    /// Loads the keys in `dir`, first creating the directory (0700) and whichever key is
    /// missing (0600): a fresh unlock key and data key, or only a data key if the unlock key
    /// exists (a creation that crashed half-way). A data-key file without an unlock key is an
    /// error, as is an unlock key that does not open it ([`SecretsError::WrongKek`]).
    pub fn load_or_create(dir: &Path) -> Result<KeyDir, SecretsError> {
        Self::load_inner(dir, true)
    }

    /// Loads the keys in `dir`; both files must exist.
    pub fn load(dir: &Path) -> Result<KeyDir, SecretsError> {
        Self::load_inner(dir, false)
    }

    fn load_inner(dir: &Path, create: bool) -> Result<KeyDir, SecretsError> {
        if create {
            private_dir(dir)?;
        }
        let kek_path = dir.join(KEK_FILE);
        let dek_path = dir.join(DEK_FILE);
        let next_path = dir.join(KEK_NEXT_FILE);
        let dek_bytes = read_private(&dek_path)?;
        let mut created = false;
        let kek = match (read_kek(&kek_path)?, &dek_bytes) {
            (Some(kek), _) => kek,
            (None, Some(_)) => {
                return Err(SecretsError::BadKeyFile {
                    path: kek_path,
                    reason: format!(
                        "missing, but {} exists: restore this manager's unlock key",
                        dek_path.display()
                    ),
                })
            }
            (None, None) if create => {
                let kek = Kek::generate()?;
                write_private_atomic(&kek_path, kek.to_text().as_bytes())?;
                remove_if_exists(&next_path)?;
                created = true;
                kek
            }
            (None, None) => {
                return Err(SecretsError::BadKeyFile {
                    path: kek_path,
                    reason: "missing".to_string(),
                })
            }
        };
        let (kek, keyring) = match dek_bytes {
            None if create => {
                let keyring = Keyring::generate()?;
                write_private_atomic(&dek_path, &keyring.wrap(&kek)?)?;
                created = true;
                (kek, keyring)
            }
            None => {
                return Err(SecretsError::BadKeyFile {
                    path: dek_path,
                    reason: "missing".to_string(),
                })
            }
            Some(bytes) => match Keyring::unwrap(&bytes, &kek) {
                Ok(keyring) => {
                    // A KEK rotation that stopped before it rewrote the data-key file.
                    remove_if_exists(&next_path)?;
                    (kek, keyring)
                }
                Err(Some(reason)) => {
                    return Err(SecretsError::BadKeyFile {
                        path: dek_path,
                        reason,
                    })
                }
                Err(None) => {
                    // A KEK rotation that stopped after it rewrote the data-key file: finish it.
                    let next = read_kek(&next_path)?;
                    match next.map(|n| (Keyring::unwrap(&bytes, &n), n)) {
                        Some((Ok(keyring), next)) => {
                            std::fs::rename(&next_path, &kek_path)
                                .map_err(|e| SecretsError::io("rename", &next_path, e))?;
                            sync_dir(&kek_path)?;
                            (next, keyring)
                        }
                        _ => {
                            return Err(SecretsError::WrongKek {
                                path: dek_path,
                                kek: kek_path,
                            })
                        }
                    }
                }
            },
        };
        Ok(KeyDir {
            dir: dir.to_path_buf(),
            kek,
            keyring: Arc::new(keyring),
            created,
            rotation: Mutex::new(()),
        })
    }

    /// The directory holding the key files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True if this load created a key (a new manager, or one from before encryption at rest).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The data keys, to hand to the store. Shared: [`KeyDir::rotate_dek`] updates it in place.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.clone()
    }

    /// Replaces the unlock key and re-wraps the data keys with it; the data is not touched.
    /// Crash-safe: the new key is written to `kek.next` first, then the data-key file, then
    /// `kek.next` is renamed over `kek`; a load in between finishes or drops the rotation.
    pub fn rotate_kek(&mut self) -> Result<(), SecretsError> {
        let next = Kek::generate()?;
        let next_path = self.dir.join(KEK_NEXT_FILE);
        let kek_path = self.dir.join(KEK_FILE);
        write_private_atomic(&next_path, next.to_text().as_bytes())?;
        write_private_atomic(&self.dir.join(DEK_FILE), &self.keyring.wrap(&next)?)?;
        std::fs::rename(&next_path, &kek_path)
            .map_err(|e| SecretsError::io("rename", &next_path, e))?;
        sync_dir(&kek_path)?;
        self.kek = next;
        Ok(())
    }

    /// Adds a new data key, which seals every value written from now on (older keys still
    /// open what they sealed). The data-key file is rewritten before the key is used, so no
    /// value is ever sealed with a key that is not on disk. Returns the new key's id.
    pub fn rotate_dek(&self) -> Result<u32, SecretsError> {
        let _guard = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.keyring.active_key_id().checked_add(1).ok_or_else(|| {
            SecretsError::BadKeyFile {
                path: self.dir.join(DEK_FILE),
                reason: "no data key id left".to_string(),
            }
        })?;
        let key = new_data_key()?;
        let bytes = self.keyring.wrap_with(&self.kek, Some((id, &key)))?;
        write_private_atomic(&self.dir.join(DEK_FILE), &bytes)?;
        self.keyring.add_key(id, key);
        Ok(id)
    }
}
