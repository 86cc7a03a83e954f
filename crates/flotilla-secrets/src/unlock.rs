//! Autolock: the cluster's unlock key wraps a manager's data keys instead of the `kek` file.
//!
//! With autolock on, a manager's `dek` file is wrapped by the cluster's [`UnlockKey`] (the
//! key's 32 bytes are the KEK) and the `kek` file is removed, so a stopped manager's disk holds
//! nothing that opens its data: on restart it is **locked** ([`KeyState::Locked`]) until an
//! admin hands it the unlock key ([`LockedKeys::unlock`]).
//!
//! The transitions, each crash-safe (every file is written with [`write_private_atomic`]):
//! - **on** ([`wrap_with_unlock_key`]): write `dek` wrapped by the unlock key, then remove
//!   `kek` (and `kek.next`), then fsync the directory. A crash in between leaves a `kek` that
//!   no longer opens `dek`: [`open_or_lock`] reports the manager locked, and the unlock
//!   removes the stale file (the transition finishes). The same call re-wraps with a rotated
//!   unlock key (one atomic rename: either key opens, never neither).
//! - **off** ([`unwrap_to_kek_file`]): a fresh KEK to `kek.next`, then `dek` wrapped by it,
//!   then `kek.next` renamed to `kek`. A crash after the first step leaves `dek` still wrapped
//!   by the unlock key (locked; the unlock drops `kek.next`), after the second a `kek.next`
//!   that opens `dek` (finished by [`open_or_lock`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::error::SecretsError;
use crate::files::{
    read_kek, read_private, sync_dir, write_private_atomic, KeyDir, DEK_FILE, KEK_FILE,
    KEK_NEXT_FILE,
};
use crate::keys::{Kek, Keyring, KEY_LEN};

/// The text form's prefix: `FLTKEY-1-<64 hex digits>` (like Swarm's `SWMKEY-1-…`).
pub const UNLOCK_KEY_PREFIX: &str = "FLTKEY-1-";

/// Longest text [`UnlockKey::parse`] looks at (a key and some whitespace).
const MAX_KEY_TEXT: usize = 256;

/// Errors of unlocking a locked manager.
#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    /// Not an unlock key at all (empty, malformed, wrong length).
    #[error("not an unlock key: {0}")]
    Malformed(String),
    /// A well-formed key that does not open this manager's data keys.
    #[error("this unlock key does not open this manager's data keys: give the cluster's current unlock key (or, if it was rotated while this manager was down, the one before)")]
    WrongKey,
    /// The key files themselves failed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

/// The cluster's unlock key (autolock): 32 random bytes, used as the KEK of every manager's
/// data-key file. Zeroized on drop; `Debug` never shows it.
pub struct UnlockKey {
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl UnlockKey {
    /// A fresh random key.
    pub fn generate() -> Result<UnlockKey, SecretsError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        ring::rand::SystemRandom::new()
            .fill(&mut *key)
            .map_err(|_| SecretsError::Random("getrandom failed".to_string()))?;
        Ok(UnlockKey { key })
    }

    /// Parses the text form (surrounding whitespace allowed). Never echoes the input.
    pub fn parse(text: &str) -> Result<UnlockKey, UnlockError> {
        if text.len() > MAX_KEY_TEXT {
            return Err(UnlockError::Malformed(format!(
                "{} bytes is far longer than a key",
                text.len()
            )));
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(UnlockError::Malformed("the key is empty".to_string()));
        }
        let body = text.strip_prefix(UNLOCK_KEY_PREFIX).ok_or_else(|| {
            UnlockError::Malformed(format!(
                "expected {UNLOCK_KEY_PREFIX}<64 hex digits>, as `flotilla cluster unlock-key` prints it"
            ))
        })?;
        if body.len() != 2 * KEY_LEN {
            return Err(UnlockError::Malformed(format!(
                "{} characters after {UNLOCK_KEY_PREFIX}, expected {}",
                body.len(),
                2 * KEY_LEN
            )));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(body, &mut *key)
            .map_err(|_| UnlockError::Malformed("not hexadecimal after the prefix".to_string()))?;
        Ok(UnlockKey { key })
    }

    /// The text form, `FLTKEY-1-<64 hex digits>`.
    pub fn to_text(&self) -> Zeroizing<String> {
        let hex = Zeroizing::new(hex::encode(*self.key));
        let mut s = String::with_capacity(UNLOCK_KEY_PREFIX.len() + hex.len());
        s.push_str(UNLOCK_KEY_PREFIX);
        s.push_str(&hex);
        Zeroizing::new(s)
    }

    /// The KEK this key is.
    pub fn kek(&self) -> Kek {
        Kek::from_bytes(*self.key)
    }
}

impl Clone for UnlockKey {
    fn clone(&self) -> UnlockKey {
        UnlockKey {
            key: Zeroizing::new(*self.key),
        }
    }
}

/// Constant-time comparison.
impl PartialEq for UnlockKey {
    fn eq(&self, other: &UnlockKey) -> bool {
        self.key
            .iter()
            .zip(other.key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for UnlockKey {}

impl std::fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnlockKey(..)")
    }
}

/// A manager's key directory as [`open_or_lock`] found it.
#[derive(Debug)]
pub enum KeyState {
    /// The `kek` file opened the data keys (created if the directory was new: `created`).
    Open {
        keyring: Arc<Keyring>,
        created: bool,
    },
    /// The data keys are wrapped by the unlock key (autolock): see [`LockedKeys::unlock`].
    Locked(LockedKeys),
}

/// A locked key directory: a `dek` file and no `kek` that opens it.
#[derive(Debug, Clone)]
pub struct LockedKeys {
    dir: PathBuf,
}

impl LockedKeys {
    /// The key directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens the data keys with `key`. On success, finishes a transition a crash interrupted
    /// (removes a `kek` that does not open the data keys, and `kek.next`); the directory then
    /// holds only `dek`. A wrong key changes nothing.
    pub fn unlock(&self, key: &UnlockKey) -> Result<Arc<Keyring>, UnlockError> {
        let dek_path = self.dir.join(DEK_FILE);
        let bytes = read_private(&dek_path)?.ok_or_else(|| SecretsError::BadKeyFile {
            path: dek_path.clone(),
            reason: "missing".to_string(),
        })?;
        let keyring = match Keyring::unwrap(&bytes, &key.kek()) {
            Ok(k) => k,
            Err(None) => return Err(UnlockError::WrongKey),
            Err(Some(reason)) => {
                return Err(SecretsError::BadKeyFile {
                    path: dek_path,
                    reason,
                }
                .into())
            }
        };
        remove_if_exists(&self.dir.join(KEK_FILE))?;
        remove_if_exists(&self.dir.join(KEK_NEXT_FILE))?;
        sync_dir(&self.dir)?;
        Ok(Arc::new(keyring))
    }
}

/// Loads the keys in `dir` for a manager that may be autolocked: creates them as
/// [`KeyDir::load_or_create`] does when there is no `dek` file; opens them with the `kek` file
/// (finishing an interrupted [`unwrap_to_kek_file`]); else reports them locked — no `kek`
/// file, or one that opens neither `dek` nor is helped by `kek.next` (an interrupted
/// [`wrap_with_unlock_key`]). Malformed files are errors, as in [`KeyDir::load`].
pub fn open_or_lock(dir: &Path) -> Result<KeyState, SecretsError> {
    let dek_path = dir.join(DEK_FILE);
    let kek_path = dir.join(KEK_FILE);
    let next_path = dir.join(KEK_NEXT_FILE);
    if !exists(&dek_path)? {
        let keys = KeyDir::load_or_create(dir)?;
        return Ok(KeyState::Open {
            keyring: keys.keyring(),
            created: keys.created(),
        });
    }
    if !exists(&kek_path)? {
        // Autolocked, or an autolock-off that wrote `kek.next` (and maybe `dek`) but did not
        // rename it yet.
        let Some(next) = read_kek(&next_path)? else {
            return Ok(KeyState::Locked(LockedKeys {
                dir: dir.to_path_buf(),
            }));
        };
        let bytes = read_private(&dek_path)?.ok_or_else(|| SecretsError::BadKeyFile {
            path: dek_path.clone(),
            reason: "missing".to_string(),
        })?;
        match Keyring::unwrap(&bytes, &next) {
            Ok(_) => {
                std::fs::rename(&next_path, &kek_path)
                    .map_err(|e| SecretsError::io("rename", &next_path, e))?;
                sync_dir(dir)?;
            }
            Err(None) => {
                return Ok(KeyState::Locked(LockedKeys {
                    dir: dir.to_path_buf(),
                }))
            }
            Err(Some(reason)) => {
                return Err(SecretsError::BadKeyFile {
                    path: dek_path,
                    reason,
                })
            }
        }
    }
    match KeyDir::load(dir) {
        Ok(keys) => Ok(KeyState::Open {
            keyring: keys.keyring(),
            created: false,
        }),
        // A `kek` that opens nothing: autolock was being turned on when the process stopped.
        Err(SecretsError::WrongKek { .. }) => Ok(KeyState::Locked(LockedKeys {
            dir: dir.to_path_buf(),
        })),
        Err(e) => Err(e),
    }
}

/// Autolock on (or a rotated unlock key): `dek` rewritten wrapped by `key`, then the `kek`
/// file (and `kek.next`) removed, then the directory synced. See the module's documentation
/// for a crash in between.
pub fn wrap_with_unlock_key(
    dir: &Path,
    keyring: &Keyring,
    key: &UnlockKey,
) -> Result<(), SecretsError> {
    write_private_atomic(&dir.join(DEK_FILE), &keyring.wrap(&key.kek())?)?;
    remove_if_exists(&dir.join(KEK_FILE))?;
    remove_if_exists(&dir.join(KEK_NEXT_FILE))?;
    sync_dir(dir)
}

/// Autolock off: a fresh KEK written to `kek.next`, `dek` rewritten wrapped by it, then
/// `kek.next` renamed to `kek` and the directory synced.
pub fn unwrap_to_kek_file(dir: &Path, keyring: &Keyring) -> Result<(), SecretsError> {
    let kek = Kek::generate()?;
    let next_path = dir.join(KEK_NEXT_FILE);
    let kek_path = dir.join(KEK_FILE);
    write_private_atomic(&next_path, kek.to_text().as_bytes())?;
    write_private_atomic(&dir.join(DEK_FILE), &keyring.wrap(&kek)?)?;
    std::fs::rename(&next_path, &kek_path)
        .map_err(|e| SecretsError::io("rename", &next_path, e))?;
    sync_dir(dir)
}

/// Whether `dir` holds a `kek` file (autolock off, or not yet applied).
pub fn has_kek_file(dir: &Path) -> Result<bool, SecretsError> {
    exists(&dir.join(KEK_FILE))
}

fn exists(path: &Path) -> Result<bool, SecretsError> {
    path.try_exists()
        .map_err(|e| SecretsError::io("stat", path, e))
}

fn remove_if_exists(path: &Path) -> Result<(), SecretsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(SecretsError::io("remove", path, e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Arc<Keyring> {
        match open_or_lock(dir).expect("open") {
            KeyState::Open { keyring, .. } => keyring,
            KeyState::Locked(_) => panic!("locked"),
        }
    }

    fn locked(dir: &Path) -> LockedKeys {
        match open_or_lock(dir).expect("open") {
            KeyState::Locked(l) => l,
            KeyState::Open { .. } => panic!("not locked"),
        }
    }

    #[test]
    fn unlock_key_text_round_trips_and_hostile_text_is_refused() {
        let k = UnlockKey::generate().expect("key");
        let text = k.to_text();
        assert!(text.starts_with(UNLOCK_KEY_PREFIX));
        assert_eq!(text.len(), UNLOCK_KEY_PREFIX.len() + 64);
        let again = UnlockKey::parse(&format!("  {}\n", *text)).expect("parse");
        assert_eq!(k, again);
        assert_ne!(k, UnlockKey::generate().expect("other"));
        let long = "A".repeat(10_000);
        let nul = format!("{UNLOCK_KEY_PREFIX}{}", "\0".repeat(64));
        let short = format!("{UNLOCK_KEY_PREFIX}abcd");
        let non_hex = format!("{UNLOCK_KEY_PREFIX}{}", "zz".repeat(32));
        let multibyte = format!("{UNLOCK_KEY_PREFIX}{}", "é".repeat(32));
        let kek_text = Kek::generate().expect("kek").to_text();
        for bad in [
            "",
            "   \n",
            "garbage",
            long.as_str(),
            nul.as_str(),
            short.as_str(),
            non_hex.as_str(),
            multibyte.as_str(),
            kek_text.as_str(),
        ] {
            let err = UnlockKey::parse(bad).expect_err("refused");
            assert!(matches!(err, UnlockError::Malformed(_)), "{err}");
            // The message never repeats the input.
            assert!(bad.len() < 8 || !err.to_string().contains(bad), "{err}");
        }
        assert_eq!(format!("{k:?}"), "UnlockKey(..)");
    }

    #[test]
    fn autolock_on_removes_the_kek_and_only_the_unlock_key_opens() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        let keyring = open(&dir);
        let key = UnlockKey::generate().expect("key");
        wrap_with_unlock_key(&dir, &keyring, &key).expect("on");
        assert!(!has_kek_file(&dir).expect("stat"));
        let l = locked(&dir);
        let wrong = UnlockKey::generate().expect("wrong");
        assert!(matches!(l.unlock(&wrong), Err(UnlockError::WrongKey)));
        // Still locked after a wrong key.
        let l = locked(&dir);
        assert_eq!(*l.unlock(&key).expect("unlock"), *keyring);
        // Rotation: the new key opens, the old one no longer does.
        let next = UnlockKey::generate().expect("next");
        wrap_with_unlock_key(&dir, &keyring, &next).expect("rotate");
        assert!(matches!(
            locked(&dir).unlock(&key),
            Err(UnlockError::WrongKey)
        ));
        assert_eq!(*locked(&dir).unlock(&next).expect("unlock"), *keyring);
        // Off: a kek file again, open without a key.
        unwrap_to_kek_file(&dir, &keyring).expect("off");
        assert!(has_kek_file(&dir).expect("stat"));
        assert_eq!(*open(&dir), *keyring);
        assert!(!dir.join(KEK_NEXT_FILE).exists());
    }

    #[test]
    fn a_crash_between_writing_the_dek_and_removing_the_kek_leaves_it_locked_then_finishes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        let keyring = open(&dir);
        let key = UnlockKey::generate().expect("key");
        // The first step of `wrap_with_unlock_key` only: the old kek file stays.
        write_private_atomic(
            &dir.join(DEK_FILE),
            &keyring.wrap(&key.kek()).expect("wrap"),
        )
        .expect("dek");
        assert!(has_kek_file(&dir).expect("stat"));
        let l = locked(&dir);
        assert!(matches!(
            l.unlock(&UnlockKey::generate().expect("wrong")),
            Err(UnlockError::WrongKey)
        ));
        // A wrong key does not touch the stale kek file.
        assert!(has_kek_file(&dir).expect("stat"));
        assert_eq!(*l.unlock(&key).expect("unlock"), *keyring);
        // The unlock finished the transition: the stale kek file is gone.
        assert!(!has_kek_file(&dir).expect("stat"));
        assert_eq!(*locked(&dir).unlock(&key).expect("again"), *keyring);
    }

    #[test]
    fn a_crash_while_turning_autolock_off_is_finished_or_stays_locked() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        let keyring = open(&dir);
        let key = UnlockKey::generate().expect("key");
        wrap_with_unlock_key(&dir, &keyring, &key).expect("on");

        // Stopped after writing kek.next: the dek is still wrapped by the unlock key.
        let kek = Kek::generate().expect("kek");
        write_private_atomic(&dir.join(KEK_NEXT_FILE), kek.to_text().as_bytes()).expect("next");
        let l = locked(&dir);
        assert_eq!(*l.unlock(&key).expect("unlock"), *keyring);
        assert!(!dir.join(KEK_NEXT_FILE).exists(), "stale kek.next dropped");

        // Stopped after rewriting the dek: kek.next opens it, the load finishes the rename.
        write_private_atomic(&dir.join(KEK_NEXT_FILE), kek.to_text().as_bytes()).expect("next");
        write_private_atomic(&dir.join(DEK_FILE), &keyring.wrap(&kek).expect("wrap")).expect("dek");
        assert_eq!(*open(&dir), *keyring);
        assert!(has_kek_file(&dir).expect("stat"));
        assert!(!dir.join(KEK_NEXT_FILE).exists());
    }

    #[test]
    fn a_kek_file_that_is_not_a_key_is_an_error_not_a_lock() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        open(&dir);
        std::fs::write(dir.join(KEK_FILE), b"not a key").expect("write");
        assert!(open_or_lock(&dir).is_err());
    }

    #[test]
    fn a_malformed_dek_file_is_an_error_when_unlocking() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        let keyring = open(&dir);
        let key = UnlockKey::generate().expect("key");
        wrap_with_unlock_key(&dir, &keyring, &key).expect("on");
        std::fs::write(dir.join(DEK_FILE), b"FLTDEKS1garbage").expect("write");
        assert!(matches!(
            locked(&dir).unlock(&key),
            Err(UnlockError::Secrets(_))
        ));
    }
}
