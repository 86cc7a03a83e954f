use rand::Rng;

use crate::PkiError;

/// `FLT1-<sha256 of the CA certificate, hex>-<secret>`. The fingerprint lets a joining node
/// verify the cluster it talks to before it sends the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: String,
    pub secret: String,
}

const SECRET_LEN: usize = 32;

impl JoinToken {
    pub fn new(ca_fingerprint: &str) -> JoinToken {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut rng = rand::rng();
        let secret = (0..SECRET_LEN)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        JoinToken {
            ca_fingerprint: ca_fingerprint.to_string(),
            secret,
        }
    }

    pub fn parse(s: &str) -> Result<JoinToken, PkiError> {
        let s = s.trim();
        let mut parts = s.splitn(3, '-');
        let (Some(prefix), Some(fp), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(PkiError::MalformedToken(
                "expected three '-' separated parts".into(),
            ));
        };
        if prefix != "FLT1" {
            return Err(PkiError::MalformedToken(format!(
                "unknown prefix {prefix:?}"
            )));
        }
        if fp.len() != 64 || !fp.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(PkiError::MalformedToken(
                "the CA fingerprint is not 64 hex characters".into(),
            ));
        }
        if secret.len() != SECRET_LEN || !secret.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(PkiError::MalformedToken(format!(
                "the secret is not {SECRET_LEN} letters and digits"
            )));
        }
        Ok(JoinToken {
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FLT1-{}-{}", self.ca_fingerprint, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let fp = "ab".repeat(32);
        let t = JoinToken::new(&fp);
        let s = t.to_string();
        assert!(s.starts_with("FLT1-"));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert!(JoinToken::parse("nonsense").is_err());
        assert!(JoinToken::parse(&format!("FLT2-{fp}-{}", t.secret)).is_err());
        assert!(JoinToken::parse(&format!("FLT1-abc-{}", t.secret)).is_err());
        assert!(JoinToken::parse(&format!("FLT1-{fp}-short")).is_err());
        let msg = JoinToken::parse("x").unwrap_err().to_string();
        assert!(msg.contains("malformed join token"), "{msg}");
    }
}
