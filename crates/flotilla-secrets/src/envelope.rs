//! The sealed-value envelope (v1): header, nonce, ciphertext and tag.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use zeroize::{Zeroize, Zeroizing};

use crate::error::SecretsError;
use crate::keys::KEY_LEN;

/// First bytes of every sealed value; the byte after them is the format version.
pub const MAGIC: [u8; 7] = *b"\xF1SEALED";
/// The only format version so far.
pub(crate) const VERSION_1: u8 = b'1';
pub(crate) const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 1 + 4 + NONCE_LEN;
/// Bytes a sealed value adds to its plaintext (header, key id, nonce, tag).
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// True if `bytes` start like a sealed value (any format version). Plain values written by
/// older stores never do (see the crate docs).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// The parts of an envelope, borrowed from it.
pub(crate) struct Parsed<'a> {
    pub(crate) key_id: u32,
    pub(crate) nonce: &'a [u8],
    pub(crate) body: &'a [u8],
}

/// Splits an envelope; checks only its framing, not the tag.
pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, SecretsError> {
    if !is_sealed(bytes) {
        return Err(SecretsError::NotSealed);
    }
    let version = bytes.get(MAGIC.len()).copied();
    match version {
        Some(VERSION_1) => {}
        Some(v) => return Err(SecretsError::UnknownVersion(v)),
        None => {
            return Err(SecretsError::Truncated {
                len: bytes.len(),
                min: ENVELOPE_OVERHEAD,
            })
        }
    }
    if bytes.len() < ENVELOPE_OVERHEAD {
        return Err(SecretsError::Truncated {
            len: bytes.len(),
            min: ENVELOPE_OVERHEAD,
        });
    }
    let (head, body) = bytes.split_at(HEADER_LEN);
    let mut id = [0u8; 4];
    id.copy_from_slice(&head[MAGIC.len() + 1..MAGIC.len() + 5]);
    Ok(Parsed {
        key_id: u32::from_be_bytes(id),
        nonce: &head[MAGIC.len() + 5..],
        body,
    })
}

/// XChaCha20-Poly1305 under one 256-bit key: HChaCha20 derives a subkey from the key and the
/// nonce's first 16 bytes, then ChaCha20-Poly1305 (IETF, ring's implementation) seals under that
/// subkey with the nonce `0u32 || nonce[16..24]` (draft-irtf-cfrg-xchacha; byte-for-byte the
/// output of RustCrypto's `XChaCha20Poly1305`, checked in the tests).
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

    /// Seals `plaintext` (its id is `key_id`) with a fresh random nonce into an envelope.
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
        let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + plaintext.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION_1);
        out.extend_from_slice(&key_id.to_be_bytes());
        out.extend_from_slice(nonce);
        out.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(n, Aad::from(aad), &mut out[HEADER_LEN..])
            .map_err(|_| SecretsError::Seal(plaintext.len()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a parsed envelope.
    pub(crate) fn open(&self, parsed: &Parsed<'_>, aad: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let nonce: &[u8; NONCE_LEN] = parsed
            .nonce
            .try_into()
            .map_err(|_| SecretsError::Authentication)?;
        let (key, n) = self.subkey(nonce)?;
        let mut buf = parsed.body.to_vec();
        let len = key
            .open_in_place(n, Aad::from(aad), &mut buf)
            .map_err(|_| SecretsError::Authentication)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}
