//! flotilla-node (placeholder until its owner fills it in).
