//! This manager's encryption-at-rest keys: `<raft dir>/keys/kek` (the unlock key) and
//! `<raft dir>/keys/dek` (the data keys it wraps), both 0600 in a 0700 directory
//! (`flotilla-secrets` describes the formats).
//!
//! Loaded, or created on first start, before the store opens. A manager from before
//! encryption at rest has a raft dir without keys: they are created here and the store then
//! seals its files in place as it opens. The unlock key sits beside the data, which protects a
//! leaked disk or a backup of the data without the key directory, not a root user on the host.
//!
//! With autolock on (`autolock.rs`) the `kek` file is gone and the cluster's unlock key wraps
//! the data keys: [`open`] then finds the manager locked, and the daemon waits for
//! `flotilla cluster unlock` before it opens the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_store::flotilla_secrets::{self, KeyState, Keyring, LockedKeys, SecretsError};

use crate::error::NodeError;

/// The key directory's name inside the raft dir.
pub(crate) const KEYS_DIR: &str = "keys";

/// This manager's key directory, as found at start.
pub(crate) enum Keys {
    /// The data keys, opened by the `kek` file.
    Open(Arc<Keyring>),
    /// Autolocked: the data keys need the cluster's unlock key.
    Locked(LockedKeys),
}

/// The key directory of a manager whose raft dir is `raft_dir`.
pub(crate) fn dir(raft_dir: &Path) -> PathBuf {
    raft_dir.join(KEYS_DIR)
}

/// The node's error for a key-file failure.
pub(crate) fn key_error(e: SecretsError) -> NodeError {
    match e {
        SecretsError::Io {
            action,
            path,
            source,
        } => NodeError::Io {
            what: format!(
                "encryption-at-rest keys: cannot {action} {}",
                path.display()
            ),
            source,
        },
        other => NodeError::Config(format!("encryption-at-rest keys: {other}")),
    }
}

/// Opens (creating if missing) the keys in `<raft_dir>/keys`: the keyring to give the store,
/// or a locked key directory (autolock). A malformed key file is an error that says which
/// file; nothing is overwritten.
pub(crate) fn open(raft_dir: &Path) -> Result<Keys, NodeError> {
    let dir = dir(raft_dir);
    match flotilla_secrets::open_or_lock(&dir).map_err(key_error)? {
        KeyState::Open { keyring, created } => {
            if created {
                tracing::info!(dir = %dir.display(), "created this manager's encryption-at-rest keys");
            }
            Ok(Keys::Open(keyring))
        }
        KeyState::Locked(l) => Ok(Keys::Locked(l)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use flotilla_store::flotilla_secrets::{Kek, KeyDir, UnlockKey, DEK_FILE, KEK_FILE};

    use super::*;

    fn load_or_create(raft: &Path) -> Arc<Keyring> {
        match open(raft).expect("open") {
            Keys::Open(k) => k,
            Keys::Locked(_) => panic!("locked"),
        }
    }

    #[test]
    fn keys_are_created_private_then_reloaded() {
        let tmp = tempfile::tempdir().expect("tmp");
        let raft = tmp.path().join("raft");
        let first = load_or_create(&raft);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&raft.join(KEYS_DIR)), 0o700);
        assert_eq!(mode(&raft.join(KEYS_DIR).join(KEK_FILE)), 0o600);
        assert_eq!(mode(&raft.join(KEYS_DIR).join(DEK_FILE)), 0o600);
        let again = load_or_create(&raft);
        assert_eq!(*first, *again);
        assert!(!KeyDir::load(&raft.join(KEYS_DIR)).expect("load").created());
    }

    #[test]
    fn a_wrong_kek_file_locks_the_manager_and_is_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let raft = tmp.path().join("raft");
        let keyring = load_or_create(&raft);
        let other = Kek::generate().expect("kek");
        let kek = raft.join(KEYS_DIR).join(KEK_FILE);
        std::fs::write(&kek, other.to_text().as_bytes()).expect("replace");
        let Keys::Locked(locked) = open(&raft).expect("open") else {
            panic!("a kek file that opens nothing must not open the store");
        };
        let err = locked
            .unlock(&UnlockKey::generate().expect("key"))
            .expect_err("wrong key");
        assert!(err.to_string().contains("does not open"), "{err}");
        assert!(kek.exists(), "nothing is removed on a failed unlock");
        assert!(matches!(open(&raft).expect("open"), Keys::Locked(_)));
        drop(keyring);
    }

    #[test]
    fn a_malformed_kek_file_stops_the_manager_with_a_clear_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let raft = tmp.path().join("raft");
        load_or_create(&raft);
        std::fs::write(raft.join(KEYS_DIR).join(KEK_FILE), b"garbage").expect("replace");
        let err = open(&raft).err().expect("error").to_string();
        assert!(err.contains("encryption-at-rest keys"), "{err}");
    }
}
