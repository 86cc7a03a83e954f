//! The sealed-value envelopes: header, nonce, ciphertext and tag.
//!
//! - v1, XChaCha20-Poly1305 ([`Cipher`]): what the KEK wraps data keys with, and what data keys
//!   sealed with before v2 (still opened).
//! - v2, AES-256-GCM ([`Gcm`]): what data keys seal with. The AES key is a subkey of the data
//!   key for a random 128-bit salt stored in the envelope, and each subkey seals at most
//!   [`SEALS_PER_SUBKEY`] values, so its random 96-bit nonces stay far from a repeat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use ring::hkdf;
use zeroize::{Zeroize, Zeroizing};

use crate::error::SecretsError;
use crate::keys::KEY_LEN;

/// First bytes of every sealed value; the byte after them is the format version.
pub const MAGIC: [u8; 7] = *b"\xF1SEALED";
/// XChaCha20-Poly1305 with a 24-byte nonce.
pub(crate) const VERSION_1: u8 = b'1';
/// AES-256-GCM under a salted subkey of the data key, 12-byte nonce.
pub(crate) const VERSION_2: u8 = b'2';
pub(crate) const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const V1_HEADER_LEN: usize = MAGIC.len() + 1 + 4 + NONCE_LEN;
/// Bytes a v1 envelope adds to its plaintext (header, key id, nonce, tag).
pub(crate) const V1_OVERHEAD: usize = V1_HEADER_LEN + TAG_LEN;
pub(crate) const SALT_LEN: usize = 16;
const GCM_NONCE_LEN: usize = 12;
const V2_HEADER_LEN: usize = MAGIC.len() + 1 + 4 + SALT_LEN + GCM_NONCE_LEN;
/// Bytes [`crate::Keyring::seal_in_place`] expects reserved at the start of its buffer (the
/// header it writes there).
pub const HEADER_LEN: usize = V2_HEADER_LEN;
/// Bytes [`crate::Keyring::seal`] adds to its plaintext (header, key id, salt, nonce, tag).
pub const ENVELOPE_OVERHEAD: usize = V2_HEADER_LEN + TAG_LEN;
/// Most values one AES-256-GCM subkey seals before a fresh salt replaces it. With random
/// 96-bit nonces the chance that two of them repeat is below 2^60 / 2^97 = 2^-37 per subkey
/// (NIST SP 800-38D allows 2^32 seals per key for random nonces).
pub(crate) const SEALS_PER_SUBKEY: u64 = 1 << 30;
/// HKDF info prefix of the v2 subkeys (followed by the salt).
const SUBKEY_INFO: &[u8] = b"flotilla-aes256gcm-v2\0";
/// Subkeys of older salts kept for opening (values written by earlier runs).
const OPEN_CACHE: usize = 8;

/// True if `bytes` start like a sealed value (any format version). Plain values written by
/// older stores never do (see the crate docs).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// The parts of an envelope, borrowed from it.
pub(crate) struct Parsed<'a> {
    pub(crate) version: u8,
    pub(crate) key_id: u32,
    /// v1: the 24-byte nonce; v2: the 16-byte salt then the 12-byte nonce.
    pub(crate) nonce: &'a [u8],
    pub(crate) body: &'a [u8],
}

/// Splits an envelope; checks only its framing, not the tag.
pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, SecretsError> {
    if !is_sealed(bytes) {
        return Err(SecretsError::NotSealed);
    }
    let version = bytes.get(MAGIC.len()).copied();
    let header_len = match version {
        Some(VERSION_1) => V1_HEADER_LEN,
        Some(VERSION_2) => V2_HEADER_LEN,
        Some(v) => return Err(SecretsError::UnknownVersion(v)),
        None => {
            return Err(SecretsError::Truncated {
                len: bytes.len(),
                min: V1_OVERHEAD.min(ENVELOPE_OVERHEAD),
            })
        }
    };
    let min = header_len + TAG_LEN;
    if bytes.len() < min {
        return Err(SecretsError::Truncated {
            len: bytes.len(),
            min,
        });
    }
    let (head, body) = bytes.split_at(header_len);
    let mut id = [0u8; 4];
    id.copy_from_slice(&head[MAGIC.len() + 1..MAGIC.len() + 5]);
    Ok(Parsed {
        version: head[MAGIC.len()],
        key_id: u32::from_be_bytes(id),
        nonce: &head[MAGIC.len() + 5..],
        body,
    })
}

/// Opens `body` (ciphertext and tag) in a copy.
fn open_body(
    key: &LessSafeKey,
    nonce: Nonce,
    aad: &[u8],
    body: &[u8],
) -> Result<Vec<u8>, SecretsError> {
    let mut buf = body.to_vec();
    let len = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| SecretsError::Authentication)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// XChaCha20-Poly1305 under one 256-bit key (the v1 envelope): HChaCha20 derives a subkey from
/// the key and the nonce's first 16 bytes, then ChaCha20-Poly1305 (IETF, ring's implementation)
/// seals under that subkey with the nonce `0u32 || nonce[16..24]` (draft-irtf-cfrg-xchacha;
/// byte-for-byte the output of RustCrypto's `XChaCha20Poly1305`, checked in the tests).
pub(crate) struct Cipher {
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl Cipher {
    pub(crate) fn new(key: Zeroizing<[u8; KEY_LEN]>) -> Cipher {
        Cipher { key }
    }

    pub(crate) fn key(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// ring's ChaCha20-Poly1305 key for `nonce`, and the 96-bit nonce to use with it.
    fn subkey(&self, nonce: &[u8; NONCE_LEN]) -> Result<(LessSafeKey, Nonce), SecretsError> {
        let mut input = [0u8; 16];
        input.copy_from_slice(&nonce[..16]);
        let mut sub =
            chacha20::hchacha::<chacha20::R20>(&chacha20::Key::from(*self.key), &input.into());
        let key =
            UnboundKey::new(&CHACHA20_POLY1305, sub.as_slice()).map_err(|_| SecretsError::Seal(0));
        sub.as_mut_slice().zeroize();
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&nonce[16..]);
        Ok((LessSafeKey::new(key?), Nonce::assume_unique_for_key(n)))
    }

    /// Seals `plaintext` (its id is `key_id`) with a fresh random nonce into a v1 envelope.
    pub(crate) fn seal(
        &self,
        key_id: u32,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        // ThreadRng: a CSPRNG seeded (and periodically reseeded) from the OS, without a system
        // call per value. 192-bit random nonces make a repeat negligible under one key.
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        self.seal_with_nonce(key_id, &nonce, plaintext, aad)
    }

    pub(crate) fn seal_with_nonce(
        &self,
        key_id: u32,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SecretsError> {
        let (key, n) = self.subkey(nonce)?;
        let mut out = Vec::with_capacity(V1_OVERHEAD + plaintext.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION_1);
        out.extend_from_slice(&key_id.to_be_bytes());
        out.extend_from_slice(nonce);
        out.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(n, Aad::from(aad), &mut out[V1_HEADER_LEN..])
            .map_err(|_| SecretsError::Seal(plaintext.len()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a parsed v1 envelope.
    pub(crate) fn open(&self, parsed: &Parsed<'_>, aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        if parsed.version != VERSION_1 {
            return Err(SecretsError::UnknownVersion(parsed.version));
        }
        let nonce: &[u8; NONCE_LEN] = parsed
            .nonce
            .try_into()
            .map_err(|_| SecretsError::Authentication)?;
        let (key, n) = self.subkey(nonce)?;
        open_body(&key, n, aad, parsed.body)
    }
}

/// One AES-256-GCM subkey of a data key.
struct Subkey {
    salt: [u8; SALT_LEN],
    key: LessSafeKey,
    /// Values sealed with it so far (sealing subkey only).
    seals: AtomicU64,
}

impl Subkey {
    /// HKDF-SHA256-Expand(PRK = the data key, info = label || salt): the data key is uniformly
    /// random, so it serves as the pseudorandom key as it is.
    fn derive(dek: &[u8; KEY_LEN], salt: [u8; SALT_LEN]) -> Result<Subkey, SecretsError> {
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, dek);
        let info = [SUBKEY_INFO, &salt[..]];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .map_err(|_| SecretsError::Seal(0))?;
        Ok(Subkey {
            salt,
            key: LessSafeKey::new(UnboundKey::from(okm)),
            seals: AtomicU64::new(0),
        })
    }
}

/// The v2 envelope: AES-256-GCM under subkeys of one data key (passed in by the caller, which
/// keeps it zeroized). Holds the subkey that seals (a fresh random salt per process, and again
/// after [`SEALS_PER_SUBKEY`] seals) and a few recent ones for opening. The envelope:
/// `MAGIC | '2' | key id (u32 BE) | salt (16 B) | nonce (12 B) | ciphertext | tag (16 B)`.
pub(crate) struct Gcm {
    sealing: RwLock<Option<Arc<Subkey>>>,
    opening: Mutex<Vec<Arc<Subkey>>>,
    limit: u64,
}

impl Gcm {
    pub(crate) fn new() -> Gcm {
        Gcm::with_limit(SEALS_PER_SUBKEY)
    }

    pub(crate) fn with_limit(limit: u64) -> Gcm {
        Gcm {
            sealing: RwLock::new(None),
            opening: Mutex::new(Vec::new()),
            limit,
        }
    }

    /// Calls `f` with the subkey to seal one more value with (counted), replaced by a fresh one
    /// once it has sealed `limit` values.
    fn with_sealing_subkey<R>(
        &self,
        dek: &[u8; KEY_LEN],
        f: impl FnOnce(&Subkey) -> R,
    ) -> Result<R, SecretsError> {
        // A panic while holding these locks cannot leave them inconsistent (one assignment).
        {
            let cur = self.sealing.read().unwrap_or_else(|p| p.into_inner());
            if let Some(sub) = cur.as_ref() {
                if sub.seals.fetch_add(1, Ordering::Relaxed) < self.limit {
                    return Ok(f(sub));
                }
            }
        }
        let sub = {
            let mut cur = self.sealing.write().unwrap_or_else(|p| p.into_inner());
            match cur.as_ref() {
                // Another thread replaced it meanwhile.
                Some(sub) if sub.seals.fetch_add(1, Ordering::Relaxed) < self.limit => sub.clone(),
                _ => {
                    let mut salt = [0u8; SALT_LEN];
                    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
                    let sub = Arc::new(Subkey::derive(dek, salt)?);
                    sub.seals.store(1, Ordering::Relaxed);
                    *cur = Some(sub.clone());
                    sub
                }
            }
        };
        Ok(f(&sub))
    }

    /// The subkey of `salt`: the sealing one, a cached one, or derived (and cached).
    fn opening_subkey(
        &self,
        dek: &[u8; KEY_LEN],
        salt: &[u8],
    ) -> Result<Arc<Subkey>, SecretsError> {
        {
            let cur = self.sealing.read().unwrap_or_else(|p| p.into_inner());
            if let Some(sub) = cur.as_ref().filter(|s| s.salt == salt) {
                return Ok(sub.clone());
            }
        }
        let mut cache = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = cache.iter().position(|s| s.salt == salt) {
            let sub = cache.remove(pos);
            cache.push(sub.clone());
            return Ok(sub);
        }
        let salt: [u8; SALT_LEN] = salt.try_into().map_err(|_| SecretsError::Authentication)?;
        let sub = Arc::new(Subkey::derive(dek, salt)?);
        if cache.len() >= OPEN_CACHE {
            cache.remove(0);
        }
        cache.push(sub.clone());
        Ok(sub)
    }

    /// Seals `plaintext` (data key `key_id`, whose bytes are `dek`) into a v2 envelope.
    pub(crate) fn seal(
        &self,
        dek: &[u8; KEY_LEN],
        key_id: u32,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SecretsError> {
        let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + plaintext.len());
        out.resize(HEADER_LEN, 0);
        out.extend_from_slice(plaintext);
        self.seal_in_place(dek, key_id, &mut out, aad)?;
        Ok(out)
    }

    /// Seals `buf[HEADER_LEN..]` in place into a v2 envelope: writes the header over
    /// `buf[..HEADER_LEN]`, encrypts the rest and appends the tag.
    pub(crate) fn seal_in_place(
        &self,
        dek: &[u8; KEY_LEN],
        key_id: u32,
        buf: &mut Vec<u8>,
        aad: &[u8],
    ) -> Result<(), SecretsError> {
        if buf.len() < HEADER_LEN {
            return Err(SecretsError::Seal(buf.len()));
        }
        self.with_sealing_subkey(dek, |sub| {
            let mut nonce = [0u8; GCM_NONCE_LEN];
            // ThreadRng: a CSPRNG seeded (and periodically reseeded) from the OS, without a
            // system call per value.
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
            let (head, body) = buf.split_at_mut(HEADER_LEN);
            let (magic, rest) = head.split_at_mut(MAGIC.len());
            magic.copy_from_slice(&MAGIC);
            let (version, rest) = rest.split_at_mut(1);
            version[0] = VERSION_2;
            let (id, rest) = rest.split_at_mut(4);
            id.copy_from_slice(&key_id.to_be_bytes());
            let (salt, n) = rest.split_at_mut(SALT_LEN);
            salt.copy_from_slice(&sub.salt);
            n.copy_from_slice(&nonce);
            let len = body.len();
            let tag = sub
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    body,
                )
                .map_err(|_| SecretsError::Seal(len))?;
            buf.extend_from_slice(tag.as_ref());
            Ok(())
        })?
    }

    /// Opens a parsed v2 envelope of the data key whose bytes are `dek`.
    pub(crate) fn open(
        &self,
        dek: &[u8; KEY_LEN],
        parsed: &Parsed<'_>,
        aad: &[u8],
    ) -> Result<Vec<u8>, SecretsError> {
        if parsed.version != VERSION_2 || parsed.nonce.len() != SALT_LEN + GCM_NONCE_LEN {
            return Err(SecretsError::UnknownVersion(parsed.version));
        }
        let (salt, nonce) = parsed.nonce.split_at(SALT_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretsError::Authentication)?;
        let sub = self.opening_subkey(dek, salt)?;
        open_body(&sub.key, nonce, aad, parsed.body)
    }

    /// The salt of the subkey that seals now (tests).
    #[cfg(test)]
    pub(crate) fn sealing_salt(&self) -> Option<[u8; SALT_LEN]> {
        self.sealing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.salt)
    }
}
