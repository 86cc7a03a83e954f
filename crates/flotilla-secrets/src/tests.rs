//! Round trips, rotation, key files, and hostile input.

use std::os::unix::fs::PermissionsExt;

use proptest::prelude::*;

use crate::*;

fn ring() -> Keyring {
    Keyring::generate().expect("keyring")
}

#[test]
fn seal_open_round_trip_with_fresh_nonces() {
    let k = ring();
    let a = k.seal(b"hello", b"table\0id").expect("seal");
    let b = k.seal(b"hello", b"table\0id").expect("seal");
    assert_ne!(a, b, "every seal draws a new nonce");
    assert!(is_sealed(&a));
    assert_eq!(a.len(), 5 + ENVELOPE_OVERHEAD);
    assert_eq!(k.open(&a, b"table\0id").expect("open"), b"hello");
    assert_eq!(k.open(&b, b"table\0id").expect("open"), b"hello");
    let empty = k.seal(b"", b"").expect("seal empty");
    assert_eq!(k.open(&empty, b"").expect("open empty"), b"");
}

#[test]
fn wrong_aad_or_other_keyring_is_refused() {
    let k = ring();
    let sealed = k.seal(b"secret", b"services\0a").expect("seal");
    assert!(matches!(
        k.open(&sealed, b"services\0b"),
        Err(SecretsError::Authentication)
    ));
    // Same key id (1), other key material.
    assert!(matches!(
        ring().open(&sealed, b"services\0a"),
        Err(SecretsError::Authentication)
    ));
}

#[test]
fn plain_values_of_older_stores_are_not_taken_for_envelopes() {
    let k = ring();
    for plain in [
        &br#"{"log_id":1}"#[..],
        b"FLTSNAP1....",
        b"",
        &31_787_761u64.to_le_bytes(),
        &u64::MAX.to_le_bytes(),
    ] {
        assert!(!is_sealed(plain));
        assert_eq!(k.open_or_plain(plain, b"x").expect("plain").as_ref(), plain);
        assert!(matches!(k.open(plain, b"x"), Err(SecretsError::NotSealed)));
    }
    // An object record starts with its version as a little-endian u64: no log index reaches
    // the value the magic would need.
    let mut as_index = [0u8; 8];
    as_index[..7].copy_from_slice(&MAGIC);
    as_index[7] = b'1';
    assert!(u64::from_le_bytes(as_index) > 1 << 60);
}

#[test]
fn truncated_flipped_and_relabelled_envelopes_fail_cleanly() {
    let k = ring();
    let sealed = k
        .seal(b"some value worth protecting", b"aad")
        .expect("seal");
    for len in 0..sealed.len() {
        assert!(
            k.open(&sealed[..len], b"aad").is_err(),
            "truncated to {len}"
        );
    }
    for i in 0..sealed.len() {
        for bit in 0..8 {
            let mut bad = sealed.clone();
            bad[i] ^= 1 << bit;
            assert!(k.open(&bad, b"aad").is_err(), "bit {bit} of byte {i}");
        }
    }
    // Unknown key id.
    let mut other_id = sealed.clone();
    other_id[8..12].copy_from_slice(&7u32.to_be_bytes());
    assert!(matches!(
        k.open(&other_id, b"aad"),
        Err(SecretsError::UnknownKey(7))
    ));
    // Unknown version.
    let mut v3 = sealed.clone();
    v3[7] = b'3';
    assert!(matches!(
        k.open(&v3, b"aad"),
        Err(SecretsError::UnknownVersion(b'3'))
    ));
    // The same bytes taken for the other known version.
    let mut v1 = sealed.clone();
    v1[7] = b'1';
    assert!(k.open(&v1, b"aad").is_err());
}

#[test]
fn key_dir_creates_private_files_and_reloads_the_same_keys() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("keys");
    let kd = KeyDir::load_or_create(&dir).expect("create");
    assert!(kd.created());
    let sealed = kd.keyring().seal(b"v", b"a").expect("seal");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEK_FILE)), 0o600);
    assert_eq!(mode(&dir.join(DEK_FILE)), 0o600);
    let kek_text = std::fs::read_to_string(dir.join(KEK_FILE)).expect("read kek");
    assert!(kek_text.starts_with("flotilla-kek-v1:"));
    drop(kd);

    let kd = KeyDir::load_or_create(&dir).expect("reload");
    assert!(!kd.created());
    assert_eq!(kd.keyring().open(&sealed, b"a").expect("open"), b"v");
    let kd2 = KeyDir::load(&dir).expect("load");
    assert_eq!(*kd.keyring(), *kd2.keyring());
    assert_ne!(*kd.keyring(), ring());
}

#[test]
fn a_wrong_unlock_key_is_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("keys");
    KeyDir::load_or_create(&dir).expect("create");
    let other = Kek::generate().expect("kek");
    std::fs::write(dir.join(KEK_FILE), other.to_text().as_bytes()).expect("replace kek");
    let err = KeyDir::load_or_create(&dir).expect_err("wrong kek");
    assert!(matches!(err, SecretsError::WrongKek { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("the unlock key does not open this manager's data key"),
        "{err}"
    );
    // A missing unlock key beside an existing data-key file is not silently replaced.
    std::fs::remove_file(dir.join(KEK_FILE)).expect("rm");
    let err = KeyDir::load_or_create(&dir).expect_err("missing kek");
    assert!(err.to_string().contains("restore"), "{err}");
    // Garbage in the unlock key file.
    std::fs::write(dir.join(KEK_FILE), "flotilla-kek-v1:zz").expect("write");
    assert!(matches!(
        KeyDir::load(&dir),
        Err(SecretsError::BadKeyFile { .. })
    ));
}

#[test]
fn rotate_dek_adds_a_sealing_key_and_old_values_still_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("keys");
    let kd = KeyDir::load_or_create(&dir).expect("create");
    let ring = kd.keyring();
    let old = ring.seal(b"old", b"a").expect("seal");
    assert_eq!(kd.rotate_dek().expect("rotate"), 2);
    assert_eq!(
        ring.active_key_id(),
        2,
        "the shared keyring sees the new key"
    );
    let new = ring.seal(b"new", b"a").expect("seal");
    assert_eq!(&new[8..12], &2u32.to_be_bytes());
    drop(kd);
    let kd = KeyDir::load(&dir).expect("reload");
    assert_eq!(kd.keyring().key_ids(), vec![1, 2]);
    assert_eq!(kd.keyring().open(&old, b"a").expect("old"), b"old");
    assert_eq!(kd.keyring().open(&new, b"a").expect("new"), b"new");
}

#[test]
fn rotate_kek_rewraps_and_survives_a_crash_at_each_step() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("keys");
    let mut kd = KeyDir::load_or_create(&dir).expect("create");
    let sealed = kd.keyring().seal(b"v", b"a").expect("seal");
    let old_kek = std::fs::read(dir.join(KEK_FILE)).expect("kek");
    let old_dek = std::fs::read(dir.join(DEK_FILE)).expect("dek");
    kd.rotate_kek().expect("rotate");
    let new_kek = std::fs::read(dir.join(KEK_FILE)).expect("kek");
    let new_dek = std::fs::read(dir.join(DEK_FILE)).expect("dek");
    assert_ne!(old_kek, new_kek);
    assert!(!dir.join(KEK_NEXT_FILE).exists());
    let kd = KeyDir::load(&dir).expect("reload");
    assert_eq!(kd.keyring().open(&sealed, b"a").expect("open"), b"v");
    drop(kd);

    // Crash after kek.next was written, before the data-key file: the old pair stands.
    std::fs::write(dir.join(KEK_FILE), &old_kek).expect("w");
    std::fs::write(dir.join(DEK_FILE), &old_dek).expect("w");
    std::fs::write(dir.join(KEK_NEXT_FILE), &new_kek).expect("w");
    let kd = KeyDir::load(&dir).expect("load");
    assert_eq!(kd.keyring().open(&sealed, b"a").expect("open"), b"v");
    assert!(!dir.join(KEK_NEXT_FILE).exists());
    assert_eq!(std::fs::read(dir.join(KEK_FILE)).expect("kek"), old_kek);

    // Crash after the data-key file was rewritten, before the rename: finished on load.
    std::fs::write(dir.join(DEK_FILE), &new_dek).expect("w");
    std::fs::write(dir.join(KEK_NEXT_FILE), &new_kek).expect("w");
    let kd = KeyDir::load(&dir).expect("load");
    assert_eq!(kd.keyring().open(&sealed, b"a").expect("open"), b"v");
    assert!(!dir.join(KEK_NEXT_FILE).exists());
    assert_eq!(std::fs::read(dir.join(KEK_FILE)).expect("kek"), new_kek);
}

#[test]
fn hostile_data_key_files_are_refused() {
    let kek = Kek::generate().expect("kek");
    let good = ring().wrap(&kek).expect("wrap");
    assert!(Keyring::unwrap(&good, &kek).is_ok());
    for len in 0..good.len() {
        assert!(Keyring::unwrap(&good[..len], &kek).is_err(), "len {len}");
    }
    // Huge count, huge length.
    let mut huge_count = good.clone();
    huge_count[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(Keyring::unwrap(&huge_count, &kek), Err(Some(_))));
    let mut huge_len = good.clone();
    huge_len[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(Keyring::unwrap(&huge_len, &kek), Err(Some(_))));
    // The wrapped key moved to another id: refused by its AAD.
    let mut moved = good.clone();
    moved[12..16].copy_from_slice(&5u32.to_be_bytes());
    assert!(Keyring::unwrap(&moved, &kek).is_err());
    let mut trailing = good;
    trailing.push(0);
    assert!(matches!(Keyring::unwrap(&trailing, &kek), Err(Some(_))));
}

#[test]
fn keys_do_not_show_in_debug_output() {
    let tmp = tempfile::tempdir().expect("tmp");
    let kd = KeyDir::load_or_create(&tmp.path().join("k")).expect("create");
    let text = std::fs::read_to_string(tmp.path().join("k").join(KEK_FILE)).expect("read");
    let hex = text.trim().trim_start_matches("flotilla-kek-v1:");
    let shown = format!("{kd:?} {:?}", Kek::generate().expect("kek"));
    assert!(!shown.contains(hex), "{shown}");
}

#[test]
fn output_is_rustcrypto_xchacha20poly1305() {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let key = [0x42u8; KEY_LEN];
    let nonce = [0x24u8; 24];
    let cipher = crate::envelope::Cipher::new(zeroize::Zeroizing::new(key));
    for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000, 70_000] {
        let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let ours = cipher
            .seal_with_nonce(9, &nonce, &msg, b"the aad")
            .expect("seal");
        let theirs = chacha20poly1305::XChaCha20Poly1305::new(&key.into())
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: &msg,
                    aad: b"the aad",
                },
            )
            .expect("reference");
        assert_eq!(
            &ours[crate::envelope::V1_OVERHEAD - 16..],
            theirs.as_slice(),
            "len {len}"
        );
    }
}

/// The v1 envelope of RustCrypto's XChaCha20-Poly1305 output under `key`, key id 1.
fn v1_envelope(key: &[u8; KEY_LEN], nonce: &[u8; 24], msg: &[u8], aad: &[u8]) -> Vec<u8> {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let sealed = chacha20poly1305::XChaCha20Poly1305::new(&(*key).into())
        .encrypt(&(*nonce).into(), Payload { msg, aad })
        .expect("reference");
    let mut out = MAGIC.to_vec();
    out.push(b'1');
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    out
}

#[test]
fn values_sealed_by_the_v1_construction_still_open() {
    let key = [0x5au8; KEY_LEN];
    let k = Keyring::for_test(key, 1 << 30);
    for len in [0usize, 1, 16, 1000, 70_000] {
        let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let old = v1_envelope(&key, &[0x11; 24], &msg, b"tasks\0t1");
        assert_eq!(
            k.open(&old, b"tasks\0t1").expect("open v1"),
            msg,
            "len {len}"
        );
        assert!(k.open(&old, b"tasks\0t2").is_err(), "moved v1 value");
        let mut bad = old.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(k.open(&bad, b"tasks\0t1").is_err(), "flipped v1 tag");
        let old = k.seal_v1(&msg, b"a").expect("seal v1");
        assert_eq!(old[7], b'1');
        assert_eq!(k.open(&old, b"a").expect("open v1"), msg);
    }
}

#[test]
fn new_values_are_aes_256_gcm_under_a_salted_subkey_of_the_data_key() {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let key = [0x77u8; KEY_LEN];
    let k = Keyring::for_test(key, 1 << 30);
    let msg = b"a value of some length, sealed at rest";
    let sealed = k.seal(msg, b"aad").expect("seal");
    assert_eq!(sealed.len(), msg.len() + ENVELOPE_OVERHEAD);
    assert_eq!(&sealed[..7], &MAGIC);
    assert_eq!(sealed[7], b'2');
    assert_eq!(&sealed[8..12], &1u32.to_be_bytes());
    // Open it with ring directly, from the documented construction.
    let (salt, rest) = sealed[12..].split_at(16);
    let (nonce, body) = rest.split_at(12);
    let prk = ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, &key);
    let info = [&b"flotilla-aes256gcm-v2\0"[..], salt];
    let okm = prk.expand(&info, &AES_256_GCM).expect("expand");
    let sub = LessSafeKey::new(UnboundKey::from(okm));
    let mut buf = body.to_vec();
    let plain = sub
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).expect("nonce"),
            Aad::from(b"aad"),
            &mut buf,
        )
        .expect("reference open");
    assert_eq!(plain, msg);
}

#[test]
fn a_subkey_seals_at_most_its_limit_and_older_subkeys_still_open() {
    let key = [0x33u8; KEY_LEN];
    let k = Keyring::for_test(key, 3);
    let mut sealed = Vec::new();
    let mut salts = Vec::new();
    for i in 0..40u32 {
        let v = k.seal(&i.to_be_bytes(), b"a").expect("seal");
        salts.push(v[12..28].to_vec());
        sealed.push(v);
        assert_eq!(k.sealing_salt().map(|s| s.to_vec()), salts.last().cloned());
    }
    for chunk in salts.chunks(3) {
        assert!(chunk.iter().all(|s| *s == chunk[0]), "3 seals per subkey");
    }
    let mut distinct = salts.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 14, "a fresh salt every 3 seals");
    // More subkeys than the open cache holds: the oldest are derived again.
    for (i, v) in (0..40u32).zip(&sealed) {
        assert_eq!(k.open(v, b"a").expect("open"), i.to_be_bytes());
    }
    // Another keyring with the same data key (a restarted manager): its own salt, and each
    // opens what the other sealed.
    let again = Keyring::for_test(key, 3);
    let v = again.seal(b"x", b"a").expect("seal");
    assert!(!salts.contains(&v[12..28].to_vec()));
    assert_eq!(k.open(&v, b"a").expect("open"), b"x");
    assert_eq!(
        again.open(&sealed[0], b"a").expect("open"),
        0u32.to_be_bytes()
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let k = ring();
        let _ = k.open(&bytes, b"aad");
        let _ = k.open_or_plain(&bytes, b"aad");
        let kek = Kek::generate().expect("kek");
        let _ = Keyring::unwrap(&bytes, &kek);
        for version in [b'1', b'2'] {
            let mut framed = MAGIC.to_vec();
            framed.push(version);
            framed.extend_from_slice(&bytes);
            prop_assert!(k.open(&framed, b"aad").is_err());
        }
    }

    #[test]
    fn any_corruption_of_a_sealed_value_is_detected(
        plain in proptest::collection::vec(any::<u8>(), 0..64),
        pos in any::<prop::sample::Index>(),
        mask in 1u8..,
    ) {
        let k = ring();
        let mut sealed = k.seal(&plain, b"aad").expect("seal");
        let i = pos.index(sealed.len());
        sealed[i] ^= mask;
        prop_assert!(k.open(&sealed, b"aad").is_err());
    }
}
