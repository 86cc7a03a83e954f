//! flotilla-shim (placeholder until its owner fills it in).
