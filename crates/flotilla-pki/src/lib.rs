//! flotilla-pki (placeholder until its owner fills it in).
