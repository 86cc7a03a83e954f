//! Test-only binary for the runtime's integration tests.
//!
//! - `flotilla-runtime-test shim <shim args…>` — the shim, as `flotilla shim` runs it;
//! - `flotilla-runtime-test agent <root> <id> <image> <cmd…>` — a tiny agent: creates and
//!   starts one container, prints `started <pid>`, then idles until killed (the kill -9
//!   re-adoption test).

#![forbid(unsafe_code)]

use flotilla_runtime::{spec::ContainerSpec, Runtime, RuntimeConfig, RuntimeDriver};
use std::ffi::OsString;
use std::io::Write;

fn main() {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: flotilla-runtime-test shim|agent …");
        std::process::exit(2);
    }
    let mode = args.remove(0);
    match mode.to_str() {
        Some("shim") => std::process::exit(flotilla_shim::run(args)),
        Some("agent") => std::process::exit(agent(args)),
        _ => {
            eprintln!("unknown mode");
            std::process::exit(2);
        }
    }
}

fn agent(args: Vec<OsString>) -> i32 {
    let s: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if s.len() < 4 {
        eprintln!("usage: agent <root> <id> <image> <cmd…>");
        return 2;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("current_exe: {e}");
            return 1;
        }
    };
    let cfg = RuntimeConfig::new(&s[0], exe, vec!["shim".into()]);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokio: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let runtime = match Runtime::new(cfg) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("runtime: {e}");
                return 1;
            }
        };
        let spec = ContainerSpec {
            id: s[1].clone(),
            image: s[2].clone(),
            args: Some(s[3..].to_vec()),
            ..Default::default()
        };
        let started = async {
            runtime.create(spec).await?;
            runtime.start(&s[1]).await?;
            runtime.state(&s[1]).await
        };
        match started.await {
            Ok(st) => {
                println!("started {}", st.pid);
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                println!("error {e}");
                return 1;
            }
        }
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
    })
}
