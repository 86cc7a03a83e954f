//! # flotilla-secrets: sealing data at rest
//!
//! AEAD sealing (XChaCha20-Poly1305, 24-byte random nonces) of the values a manager writes to
//! disk, with a two-level key hierarchy. XChaCha20-Poly1305 is built from HChaCha20
//! (RustCrypto's `chacha20`) and ring's ChaCha20-Poly1305 (draft-irtf-cfrg-xchacha): the same
//! bytes as RustCrypto's `XChaCha20Poly1305` (a test checks it), 3-4 times faster on small
//! values, which matters because the store seals every object, event and log entry.
//!
//! - **data keys** (DEKs, [`Keyring`]): seal and open values. The newest key seals; every key
//!   the keyring holds opens, so a data key can be rotated ([`KeyDir::rotate_dek`]) without
//!   re-encrypting what the older ones sealed.
//! - the **key-encrypting key** (KEK, [`Kek`], "the unlock key"): wraps the data keys in the
//!   data-key file. Rotating it ([`KeyDir::rotate_kek`]) re-wraps the data keys only.
//!
//! [`KeyDir`] keeps both in a directory: `kek` (the unlock key, text) and `dek` (the wrapped
//! data keys, binary), each 0600 in a 0700 directory, written atomically. By default the unlock
//! key sits beside the data: that protects a leaked disk or backup that lacks the key
//! directory, not a root user on the running host.
//!
//! ## Envelope (v1)
//! ```text
//! "\xF1SEALED" | '1' (format version) | key id (u32 BE) | nonce (24 B) | ciphertext | tag (16 B)
//! ```
//! The additional authenticated data (AAD) is not stored: the caller passes what binds the
//! value to its place (table and key, log index), so a value moved elsewhere fails to open.
//! [`is_sealed`] tells sealed values from the plain ones older stores hold: those are JSON
//! (`{`, `[`, `"` ...), flotilla's own binary formats, or a little-endian log index
//! (an index would need to be about 3.5·10^18 to start with these bytes).
//!
//! ## Files
//! - `kek`: `flotilla-kek-v1:<64 hex digits>\n`.
//! - `dek`: `"FLTDEKS1"`, u32 BE count (1..=1024), then per data key: u32 BE id, u32 BE length,
//!   the key sealed by the KEK (an envelope with key id 0, AAD `"flotilla-dek\0" + id BE`).
//! - `kek.next`: only during [`KeyDir::rotate_kek`]; resolved on the next load.
#![forbid(unsafe_code)]

mod envelope;
mod error;
mod files;
mod keys;

pub use envelope::{is_sealed, ENVELOPE_OVERHEAD, MAGIC};
pub use error::SecretsError;
pub use files::{write_private_atomic, KeyDir, DEK_FILE, KEK_FILE, KEK_NEXT_FILE};
pub use keys::{Kek, Keyring, KEY_LEN};

#[cfg(test)]
mod tests;
