//! Signing, trust policy, and signatures travelling with pushes and pulls.

mod common;

use common::*;
use flotilla_registry::{
    attach_signature, pull, push, signatures_for, Algorithm, SigningKey, TrustCheck, TrustPolicy,
    TrustedKey, TrustedKeyExt,
};

#[tokio::test]
async fn signatures_verify_and_travel_with_the_image() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, reg, b) = (
        store(dir.path(), "a")?,
        store(dir.path(), "reg")?,
        store(dir.path(), "b")?,
    );
    let client = serve(reg.clone()).await?;
    let d = small_image(&a, "signed/app:1", "payload")?;
    let key = SigningKey::generate()?;
    attach_signature(&a, "signed/app", &key.sign(&d)?)?;
    let policy = TrustPolicy {
        keys: vec![key.trusted_key()],
        enforce: true,
    };
    policy.verify(&a, "signed/app:1", &d)?;

    let mut c = Counter::default();
    push(&client, &a, "signed/app:1", |p| c.record(p)).await?;
    assert_eq!(c.signatures, 1);
    let mut c = Counter::default();
    assert_eq!(pull(&client, &b, "signed/app:1", |p| c.record(p)).await?, d);
    assert_eq!(c.signatures, 1, "pull fetched the signature");
    assert_eq!(signatures_for(&b, &d)?.len(), 1);
    policy.verify(&b, "signed/app:1", &d)?;
    // The signature artifact is not an image.
    assert_eq!(b.list()?.len(), 1);
    Ok(())
}

#[test]
fn trust_policy_refuses_unsigned_and_untrusted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = store(dir.path(), "s")?;
    let d = small_image(&s, "app:1", "x")?;
    let trusted = SigningKey::generate()?;
    let policy = TrustPolicy {
        keys: vec![trusted.trusted_key()],
        enforce: true,
    };
    let err = policy
        .verify(&s, "app:1", &d)
        .err()
        .ok_or("unsigned accepted")?;
    assert_eq!(
        err.to_string(),
        "image app:1 is not signed by a trusted key"
    );

    let stranger = SigningKey::generate_with(Algorithm::EcdsaP256)?;
    attach_signature(&s, "app", &stranger.sign(&d)?)?;
    let err = policy
        .verify(&s, "app:1", &d)
        .err()
        .ok_or("untrusted accepted")?;
    assert_eq!(
        err.to_string(),
        "image app:1 is not signed by a trusted key"
    );

    // A signature for another image does not count.
    let other = small_image(&s, "other:1", "y")?;
    let wrong = trusted.sign(&other)?;
    assert!(policy.verify_signatures("app:1", &d, &[wrong]).is_err());

    // Not enforced: anything goes.
    let relaxed = TrustPolicy {
        enforce: false,
        ..policy.clone()
    };
    relaxed.verify(&s, "app:1", &d)?;

    // Two signatures merge into one artifact; the trusted one is found.
    attach_signature(&s, "app", &trusted.sign(&d)?)?;
    assert_eq!(signatures_for(&s, &d)?.len(), 2);
    policy.verify(&s, "app:1", &d)?;
    // Trusting the P-256 key also works.
    let p256 = TrustPolicy {
        keys: vec![TrustedKey::from_public_key_pem(&stranger.public_key_pem())?],
        enforce: true,
    };
    p256.verify(&s, "app:1", &d)?;
    Ok(())
}

#[test]
fn keys_round_trip_through_pem_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    for alg in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
        let k = SigningKey::generate_with(alg)?;
        let p = dir.path().join(format!("{}.pem", alg.as_str()));
        k.save(&p)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p)?.permissions());
        assert_eq!(mode & 0o777, 0o600);
        let back = SigningKey::load(&p)?;
        assert_eq!(back.key_id(), k.key_id());
        assert_eq!(back.algorithm(), alg);
        assert_eq!(k.key_id().len(), 16);
        let t = TrustedKey::from_public_key_pem(&k.public_key_pem())?;
        assert_eq!(t, k.trusted_key());
        let d = format!("sha256:{}", "c".repeat(64));
        let sig = back.sign(&d)?;
        assert_eq!(sig.manifest_digest()?, d);
        let payload: serde_json::Value = serde_json::from_slice(&sig.payload)?;
        assert_eq!(payload["critical"]["type"], "flotilla signature");
        assert_eq!(
            payload["critical"]["image"]["docker-manifest-digest"],
            d.as_str()
        );
        assert_eq!(payload["key_id"], k.key_id().as_str());
        let policy = TrustPolicy {
            keys: vec![t],
            enforce: true,
        };
        policy.verify_signatures("x", &d, &[sig])?;
    }
    assert!(
        SigningKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .is_err()
    );
    Ok(())
}
