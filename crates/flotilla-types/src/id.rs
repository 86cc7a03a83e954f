//! Object ids (25-character base36, like Swarm's) and the names users give objects.

use rand::Rng;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A fresh 25-character base36 identifier, like Swarm's object ids (about 129 bits of entropy).
pub fn new_id() -> String {
    let mut rng = rand::rng();
    (0..25)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("name must not be empty")]
    Empty,
    #[error("name {0:?} is too long: at most 63 characters")]
    TooLong(String),
    #[error("name {0:?} is invalid: use letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadChar(String),
}

/// Names of nodes, services, secrets and configs: 1..=63 chars of `[A-Za-z0-9_.-]`, starting
/// with an alphanumeric (DNS-friendly, like Swarm's).
pub fn validate_name(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::Empty);
    }
    if name.len() > 63 {
        return Err(IdError::TooLong(name.to_string()));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(IdError::BadChar(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_25_base36_chars_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 25);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn names() {
        assert!(validate_name("web-1").is_ok());
        assert_eq!(validate_name(""), Err(IdError::Empty));
        assert!(matches!(validate_name("-x"), Err(IdError::BadChar(_))));
        assert!(matches!(validate_name("a b"), Err(IdError::BadChar(_))));
        assert!(matches!(
            validate_name(&"a".repeat(64)),
            Err(IdError::TooLong(_))
        ));
    }
}
