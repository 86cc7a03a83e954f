//! `flotilla-shim`: the per-container supervisor as a binary of its own.
//!
//! It runs exactly what `flotilla shim` runs ([`flotilla_shim::run`]), but a shim lives as long
//! as its container, one per container, so its memory is paid many times over: mapped on its
//! own, the shim touches a fraction of the pages the whole `flotilla` binary makes it touch
//! (relocated data, code spread over 30 MB). The agent uses this binary when it sits beside
//! `flotilla`, and `flotilla shim` otherwise.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(flotilla_shim::run(std::env::args_os().skip(1).collect()));
}
