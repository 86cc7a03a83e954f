//! This manager's encryption-at-rest keys: `<raft dir>/keys/kek` (the unlock key) and
//! `<raft dir>/keys/dek` (the data keys it wraps), both 0600 in a 0700 directory
//! (`flotilla-secrets` describes the formats).
//!
//! Loaded, or created on first start, before the store opens. A manager from before
//! encryption at rest has a raft dir without keys: they are created here and the store then
//! seals its files in place as it opens. The unlock key sits beside the data, which protects a
//! leaked disk or a backup of the data without the key directory, not a root user on the host.

use std::path::Path;
use std::sync::Arc;

use flotilla_store::flotilla_secrets::{KeyDir, Keyring, SecretsError};

use crate::error::NodeError;

/// The key directory's name inside the raft dir.
pub(crate) const KEYS_DIR: &str = "keys";

/// Loads (creating if missing) the keys in `<raft_dir>/keys` and returns the keyring to give
/// the store. A wrong or missing unlock key beside existing data keys is an error that says
/// which file to restore; nothing is overwritten.
pub(crate) fn load_or_create(raft_dir: &Path) -> Result<Arc<Keyring>, NodeError> {
    let dir = raft_dir.join(KEYS_DIR);
    let keys = KeyDir::load_or_create(&dir).map_err(|e| match e {
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
    })?;
    if keys.created() {
        tracing::info!(dir = %dir.display(), "created this manager's encryption-at-rest keys");
    }
    Ok(keys.keyring())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use flotilla_store::flotilla_secrets::{Kek, KeyDir, DEK_FILE, KEK_FILE};

    use super::*;

    #[test]
    fn keys_are_created_private_then_reloaded() {
        let tmp = tempfile::tempdir().expect("tmp");
        let raft = tmp.path().join("raft");
        let first = load_or_create(&raft).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&raft.join(KEYS_DIR)), 0o700);
        assert_eq!(mode(&raft.join(KEYS_DIR).join(KEK_FILE)), 0o600);
        assert_eq!(mode(&raft.join(KEYS_DIR).join(DEK_FILE)), 0o600);
        let again = load_or_create(&raft).expect("reload");
        assert_eq!(*first, *again);
        assert!(!KeyDir::load(&raft.join(KEYS_DIR)).expect("load").created());
    }

    #[test]
    fn a_wrong_unlock_key_stops_the_manager_with_a_clear_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let raft = tmp.path().join("raft");
        load_or_create(&raft).expect("create");
        let other = Kek::generate().expect("kek");
        std::fs::write(
            raft.join(KEYS_DIR).join(KEK_FILE),
            other.to_text().as_bytes(),
        )
        .expect("replace");
        let err = load_or_create(&raft).expect_err("wrong key").to_string();
        assert!(
            err.contains("the unlock key does not open this manager's data key"),
            "{err}"
        );
    }
}
