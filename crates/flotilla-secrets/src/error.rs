//! Errors of sealing and of the key files.

use std::path::PathBuf;

/// What went wrong while sealing, opening, or handling the key files.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// Shorter than the smallest possible envelope.
    #[error("sealed value is truncated ({len} bytes, an envelope has at least {min})")]
    Truncated { len: usize, min: usize },
    /// Does not start with the envelope's magic bytes.
    #[error("not a sealed value (no envelope header)")]
    NotSealed,
    /// An envelope of a format this build does not know (written by a newer flotilla).
    #[error(
        "sealed value uses envelope version {0}, which this flotilla does not know; upgrade it"
    )]
    UnknownVersion(u8),
    /// Sealed with a data key the keyring does not hold.
    #[error("sealed with data key {0}, which this keyring does not hold (was the data-key file replaced?)")]
    UnknownKey(u32),
    /// The tag did not verify: wrong key, corrupted bytes, or a value moved to another place.
    #[error("sealed value failed authentication: corrupted, or moved from another place")]
    Authentication,
    /// The KEK does not open the data-key file.
    #[error("the unlock key does not open this manager's data key ({path}); restore the matching {kek} file")]
    WrongKek { path: PathBuf, kek: PathBuf },
    /// A key file is malformed or inconsistent.
    #[error("{}: {reason}", path.display())]
    BadKeyFile { path: PathBuf, reason: String },
    /// File-system error on a key file.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The operating system's random generator failed.
    #[error("the system random generator failed: {0}")]
    Random(String),
    /// Encryption refused the input (it is larger than the cipher allows).
    #[error("cannot seal a value of {0} bytes")]
    Seal(usize),
}

impl SecretsError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        SecretsError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
