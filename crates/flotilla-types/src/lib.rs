//! flotilla-types (placeholder until its owner fills it in).
