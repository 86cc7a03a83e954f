//! Key material: the key-encrypting key and the keyring of data keys.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use ring::rand::SecureRandom;
use zeroize::{Zeroize, Zeroizing};

use crate::envelope::{self, Cipher, Gcm};
use crate::error::SecretsError;

/// Length of every key (KEK and DEK), in bytes.
pub const KEY_LEN: usize = 32;

const KEK_TEXT_PREFIX: &str = "flotilla-kek-v1:";
const DEK_FILE_MAGIC: &[u8; 8] = b"FLTDEKS1";
/// Most data keys a data-key file may hold (a rotation adds one).
const MAX_DEKS: usize = 1024;
/// Envelope key id used for values sealed by the KEK (data keys start at 1).
const KEK_ENVELOPE_ID: u32 = 0;

/// A key from the operating system's random generator.
fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, SecretsError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    ring::rand::SystemRandom::new()
        .fill(&mut *key)
        .map_err(|_| SecretsError::Random("getrandom failed".to_string()))?;
    Ok(key)
}

/// Constant-time equality of two keys.
fn key_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The key-encrypting key ("unlock key"): wraps the data keys. Zeroized on drop.
pub struct Kek {
    cipher: Cipher,
}

impl Kek {
    /// A fresh random KEK.
    pub fn generate() -> Result<Kek, SecretsError> {
        Ok(Kek::from_key(random_key()?))
    }

    /// A KEK from raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Kek {
        Kek::from_key(Zeroizing::new(bytes))
    }

    fn from_key(key: Zeroizing<[u8; KEY_LEN]>) -> Kek {
        Kek {
            cipher: Cipher::new(key),
        }
    }

    /// The text form stored in the `kek` file: `flotilla-kek-v1:<64 hex digits>`.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut s = String::with_capacity(KEK_TEXT_PREFIX.len() + 2 * KEY_LEN);
        s.push_str(KEK_TEXT_PREFIX);
        let mut hex = Zeroizing::new(hex::encode(self.cipher.key()));
        s.push_str(&hex);
        hex.zeroize();
        Zeroizing::new(s)
    }

    /// Parses [`Kek::to_text`]'s form (surrounding whitespace allowed).
    pub fn from_text(text: &str) -> Result<Kek, String> {
        let body = text.trim().strip_prefix(KEK_TEXT_PREFIX).ok_or_else(|| {
            format!("not an unlock key (expected {KEK_TEXT_PREFIX}<64 hex digits>)")
        })?;
        if body.len() != 2 * KEY_LEN {
            return Err(format!(
                "unlock key has {} hex digits, expected {}",
                body.len(),
                2 * KEY_LEN
            ));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(body, &mut *key)
            .map_err(|e| format!("unlock key is not hexadecimal: {e}"))?;
        Ok(Kek::from_key(key))
    }

    fn wrap(&self, id: u32, dek: &[u8; KEY_LEN]) -> Result<Vec<u8>, SecretsError> {
        self.cipher.seal(KEK_ENVELOPE_ID, dek, &dek_aad(id))
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(..)")
    }
}

fn dek_aad(id: u32) -> Vec<u8> {
    let mut aad = b"flotilla-dek\0".to_vec();
    aad.extend_from_slice(&id.to_be_bytes());
    aad
}

/// One data key (zeroized on drop): seals v2 envelopes (AES-256-GCM under its subkeys), opens
/// those and v1 ones (XChaCha20-Poly1305 under the key itself).
struct DataKey {
    cipher: Cipher,
    gcm: Gcm,
}

impl DataKey {
    fn new(key: Zeroizing<[u8; KEY_LEN]>) -> DataKey {
        DataKey {
            cipher: Cipher::new(key),
            gcm: Gcm::new(),
        }
    }

    fn seal(&self, id: u32, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        self.gcm.seal(self.cipher.key(), id, plaintext, aad)
    }

    fn open(&self, parsed: &envelope::Parsed<'_>, aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        match parsed.version {
            envelope::VERSION_1 => self.cipher.open(parsed, aad),
            _ => self.gcm.open(self.cipher.key(), parsed, aad),
        }
    }
}

/// The data keys (DEKs) of one manager, by id: the newest (highest id) seals, all open.
/// Shared (`Arc`) between the store and the key files; [`KeyDir::rotate_dek`] adds a key to
/// a keyring in use.
///
/// [`KeyDir::rotate_dek`]: crate::KeyDir::rotate_dek
pub struct Keyring {
    keys: RwLock<BTreeMap<u32, Arc<DataKey>>>,
}

impl Keyring {
    /// A keyring with one fresh random data key (id 1).
    pub fn generate() -> Result<Keyring, SecretsError> {
        let key = DataKey::new(random_key()?);
        Ok(Keyring {
            keys: RwLock::new(BTreeMap::from([(1, Arc::new(key))])),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<DataKey>>> {
        // A panic while holding the lock cannot leave the map half-updated (one insert).
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the key that seals.
    pub fn active_key_id(&self) -> u32 {
        self.read().keys().next_back().copied().unwrap_or(0)
    }

    /// Ids of every key held, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.read().keys().copied().collect()
    }

    /// Seals `plaintext` with the newest data key, bound to `aad` (pass what identifies the
    /// value's place: [`Keyring::open`] needs the same bytes).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let (id, key) = {
            let keys = self.read();
            let Some((id, key)) = keys.iter().next_back() else {
                return Err(SecretsError::UnknownKey(0));
            };
            (*id, key.clone())
        };
        key.seal(id, plaintext, aad)
    }

    /// Like [`Keyring::seal`] without copying: `buf` holds [`HEADER_LEN`] bytes of room (any
    /// content) followed by the plaintext, and becomes the sealed value. Reserve
    /// [`ENVELOPE_OVERHEAD`] bytes more than the plaintext to spare a reallocation.
    ///
    /// [`HEADER_LEN`]: crate::HEADER_LEN
    /// [`ENVELOPE_OVERHEAD`]: crate::ENVELOPE_OVERHEAD
    pub fn seal_in_place(&self, buf: &mut Vec<u8>, aad: &[u8]) -> Result<(), SecretsError> {
        // Under the read lock: a rotation waits for the seals under way (microseconds).
        let keys = self.read();
        let Some((id, key)) = keys.iter().next_back() else {
            return Err(SecretsError::UnknownKey(0));
        };
        key.gcm.seal_in_place(key.cipher.key(), *id, buf, aad)
    }

    /// Opens a value sealed by [`Keyring::seal`] with the same `aad`. Errors (never panics)
    /// on anything else: plain or truncated input, an unknown key id, a flipped bit, another
    /// `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let parsed = envelope::parse(sealed)?;
        let key = self
            .read()
            .get(&parsed.key_id)
            .cloned()
            .ok_or(SecretsError::UnknownKey(parsed.key_id))?;
        key.open(&parsed, aad)
    }

    /// Like [`Keyring::open`], but passes a plain (never sealed) value through unchanged: for
    /// reading stores written before encryption at rest.
    pub fn open_or_plain<'a>(
        &self,
        bytes: &'a [u8],
        aad: &[u8],
    ) -> Result<Cow<'a, [u8]>, SecretsError> {
        if envelope::is_sealed(bytes) {
            self.open(bytes, aad).map(Cow::Owned)
        } else {
            Ok(Cow::Borrowed(bytes))
        }
    }

    /// Adds a fresh data key, which seals from now on; returns its id. Persist the keyring
    /// ([`Keyring::wrap`]) before sealing with it: [`KeyDir::rotate_dek`] does both in order.
    ///
    /// [`KeyDir::rotate_dek`]: crate::KeyDir::rotate_dek
    pub(crate) fn add_key(&self, id: u32, key: Zeroizing<[u8; KEY_LEN]>) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.insert(id, Arc::new(DataKey::new(key)));
    }

    /// A keyring holding `key` as id 1 whose subkeys seal at most `limit` values (tests).
    #[cfg(test)]
    pub(crate) fn for_test(key: [u8; KEY_LEN], limit: u64) -> Keyring {
        let key = DataKey {
            cipher: Cipher::new(Zeroizing::new(key)),
            gcm: Gcm::with_limit(limit),
        };
        Keyring {
            keys: RwLock::new(BTreeMap::from([(1, Arc::new(key))])),
        }
    }

    /// Seals with the newest key as the v1 envelope did (XChaCha20-Poly1305; tests).
    #[cfg(test)]
    pub(crate) fn seal_v1(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let keys = self.read();
        let (id, key) = keys.iter().next_back().ok_or(SecretsError::UnknownKey(0))?;
        key.cipher.seal(*id, plaintext, aad)
    }

    /// The salt of the newest key's sealing subkey (tests).
    #[cfg(test)]
    pub(crate) fn sealing_salt(&self) -> Option<[u8; envelope::SALT_LEN]> {
        self.read()
            .values()
            .next_back()
            .and_then(|k| k.gcm.sealing_salt())
    }

    /// The data-key file's bytes with `extra` (a key about to be added) included.
    pub(crate) fn wrap_with(
        &self,
        kek: &Kek,
        extra: Option<(u32, &[u8; KEY_LEN])>,
    ) -> Result<Vec<u8>, SecretsError> {
        let keys = self.read();
        let mut entries: Vec<(u32, &[u8; KEY_LEN])> =
            keys.iter().map(|(id, k)| (*id, k.cipher.key())).collect();
        if let Some(extra) = extra {
            entries.push(extra);
        }
        let count = u32::try_from(entries.len()).map_err(|_| SecretsError::Seal(entries.len()))?;
        let mut out = Vec::new();
        out.extend_from_slice(DEK_FILE_MAGIC);
        out.extend_from_slice(&count.to_be_bytes());
        for (id, key) in entries {
            let wrapped = kek.wrap(id, key)?;
            let len =
                u32::try_from(wrapped.len()).map_err(|_| SecretsError::Seal(wrapped.len()))?;
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&wrapped);
        }
        Ok(out)
    }

    /// The data-key file's bytes: every key wrapped by `kek`.
    pub fn wrap(&self, kek: &Kek) -> Result<Vec<u8>, SecretsError> {
        self.wrap_with(kek, None)
    }

    /// Reads a data-key file's bytes (from [`Keyring::wrap`]). A KEK that does not open it
    /// yields `Err(None)`; a malformed file `Err(Some(reason))`.
    pub fn unwrap(bytes: &[u8], kek: &Kek) -> Result<Keyring, Option<String>> {
        let mut r = bytes;
        let mut take = |n: usize| -> Result<&[u8], Option<String>> {
            if r.len() < n {
                return Err(Some("data-key file is truncated".to_string()));
            }
            let (head, rest) = r.split_at(n);
            r = rest;
            Ok(head)
        };
        let be32 = |b: &[u8]| {
            let mut a = [0u8; 4];
            a.copy_from_slice(b);
            u32::from_be_bytes(a)
        };
        if take(DEK_FILE_MAGIC.len())? != DEK_FILE_MAGIC {
            return Err(Some("not a flotilla data-key file (bad magic)".to_string()));
        }
        let count = usize::try_from(be32(take(4)?)).unwrap_or(usize::MAX);
        if count == 0 || count > MAX_DEKS {
            return Err(Some(format!(
                "data-key file claims {count} keys (expected 1 to {MAX_DEKS})"
            )));
        }
        let mut keys = BTreeMap::new();
        for _ in 0..count {
            let id = be32(take(4)?);
            let len = usize::try_from(be32(take(4)?)).unwrap_or(usize::MAX);
            if len != KEY_LEN + envelope::V1_OVERHEAD {
                return Err(Some(format!(
                    "data key {id} has a wrapped length of {len} bytes"
                )));
            }
            let wrapped = take(len)?;
            if id == KEK_ENVELOPE_ID || keys.contains_key(&id) {
                return Err(Some(format!("data key id {id} is reserved or repeated")));
            }
            let parsed = envelope::parse(wrapped).map_err(|e| Some(e.to_string()))?;
            let mut plain =
                Zeroizing::new(kek.cipher.open(&parsed, &dek_aad(id)).map_err(|_| None)?);
            if plain.len() != KEY_LEN {
                return Err(Some(format!("data key {id} is {} bytes", plain.len())));
            }
            let mut key = Zeroizing::new([0u8; KEY_LEN]);
            key.copy_from_slice(&plain);
            plain.zeroize();
            keys.insert(id, Arc::new(DataKey::new(key)));
        }
        if !r.is_empty() {
            return Err(Some("data-key file has trailing bytes".to_string()));
        }
        Ok(Keyring {
            keys: RwLock::new(keys),
        })
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids())
            .field("active", &self.active_key_id())
            .finish()
    }
}

/// Same key ids holding the same keys (compared in constant time).
impl PartialEq for Keyring {
    fn eq(&self, other: &Keyring) -> bool {
        if std::ptr::eq(self, other) {
            return true;
        }
        let (a, b) = (self.read(), other.read());
        a.len() == b.len()
            && a.iter()
                .zip(b.iter())
                .all(|((ia, ka), (ib, kb))| ia == ib && key_eq(ka.cipher.key(), kb.cipher.key()))
    }
}

impl Eq for Keyring {}

/// A new random key for [`KeyDir::rotate_dek`](crate::KeyDir::rotate_dek).
pub(crate) fn new_data_key() -> Result<Zeroizing<[u8; KEY_LEN]>, SecretsError> {
    random_key()
}
