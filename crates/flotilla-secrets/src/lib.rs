//! # flotilla-secrets: sealing data at rest
//!
//! AEAD sealing of the values a manager writes to disk, with a two-level key hierarchy. Data
//! keys seal with AES-256-GCM (ring; AES-NI and carry-less multiply where the CPU has them,
//! about 3 times faster than ChaCha20-Poly1305 on the KB-sized values the store seals, one per
//! object, event and log entry); the key-encrypting key wraps data keys with
//! XChaCha20-Poly1305 (HChaCha20 from RustCrypto's `chacha20`, then ring's ChaCha20-Poly1305:
//! the same bytes as RustCrypto's `XChaCha20Poly1305`, a test checks it).
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
//! ## Envelopes
//! ```text
//! v2: "\xF1SEALED" | '2' | key id (u32 BE) | salt (16 B) | nonce (12 B) | ciphertext | tag (16 B)
//! v1: "\xF1SEALED" | '1' | key id (u32 BE) | nonce (24 B) | ciphertext | tag (16 B)
//! ```
//! v2 (what data keys seal): AES-256-GCM under the subkey HKDF-SHA256-Expand(data key,
//! `"flotilla-aes256gcm-v2\0"` + salt), with a random 96-bit nonce. Each keyring draws a fresh
//! random salt when it first seals (so on every start of a manager) and again after 2^30
//! seals, so no subkey seals more than 2^30 values: the chance of a repeated nonce stays below
//! 2^-37 per subkey. v1 (XChaCha20-Poly1305, 192-bit random nonce) is what the KEK wraps data
//! keys with, and what data keys sealed with before v2; both open.
//!
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
mod unlock;

pub use envelope::{is_sealed, ENVELOPE_OVERHEAD, HEADER_LEN, MAGIC};
pub use error::SecretsError;
pub use files::{write_private_atomic, KeyDir, DEK_FILE, KEK_FILE, KEK_NEXT_FILE};
pub use keys::{Kek, Keyring, KEY_LEN};
pub use unlock::{
    has_kek_file, open_or_lock, unwrap_to_kek_file, wrap_with_unlock_key, KeyState, LockedKeys,
    UnlockError, UnlockKey, UNLOCK_KEY_PREFIX,
};

#[cfg(test)]
mod tests;
