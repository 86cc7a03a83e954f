//! `flotilla`: one binary, several modes. This file only parses arguments, sets up tracing
//! and hands over to the libraries: the node daemon (`node run`), the per-container shim
//! (`shim`), or the API client (everything else).
#![forbid(unsafe_code)]

mod dev;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use flotilla_cli::{Cli, Command, NodeCmd, RunArgs};
use flotilla_node::{NodeConfig, StartMode};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn node_config(args: &RunArgs) -> anyhow::Result<NodeConfig> {
    let mode = if args.init {
        StartMode::Init
    } else if let (Some(m), Some(t)) = (&args.join, &args.token) {
        StartMode::Join {
            manager: m.clone(),
            token: t.clone(),
        }
    } else if args.force_new_cluster {
        StartMode::ForceNewCluster
    } else {
        StartMode::Resume
    };
    let mut cfg = NodeConfig::new(args.data_dir.clone(), args.listen, mode);
    cfg.advertise = args.advertise;
    cfg.name = args.name.clone();
    cfg.cert_lifetime = args.cert_lifetime;
    cfg.heartbeat_timeout = args.heartbeat_timeout;
    cfg.heartbeat_period = (args.heartbeat_timeout / 6).max(std::time::Duration::from_millis(100));
    let (min, max) = args
        .election_timeout
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .context("--election-timeout takes MIN-MAX in milliseconds, e.g. 250-500")?;
    cfg.raft_election_min_ms = min;
    cfg.raft_election_max_ms = max;
    cfg.raft_heartbeat_ms = (min / 3).max(20);
    cfg.task_history = args.task_history_limit as usize;
    cfg.runtime_bin = args.runtime.clone();
    cfg.network.address_pool = args.address_pool.clone();
    cfg.network.subnet_prefix = args.subnet_size;
    cfg.network.vip_pool = args.vip_pool.clone();
    cfg.network.vxlan_port = args.vxlan_port;
    cfg.network.outbound_nat = !args.no_outbound_nat;
    cfg.task_networking = args.network == "bridge";
    cfg.dns_upstreams = flotilla_node::dns_upstreams(&args.dns).map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// SIGTERM or SIGINT. Both are caught from the call on (inside a runtime), not from the
/// first poll: a Ctrl-C during start-up stops the process once it is up instead of being lost
/// (a background job of a script starts with SIGINT ignored, so nothing else would see it).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let streams = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match streams {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}

async fn run_node(args: RunArgs) -> anyhow::Result<()> {
    let mut cfg = node_config(&args)?;
    let mut engine = std::collections::BTreeMap::new();
    engine.insert(
        "flotilla_version".to_string(),
        serde_json::Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    // One signal watcher for the whole process: a role change restarts the node's internals
    // in-process, and a later SIGTERM must still stop them.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    loop {
        let mut rx = stop_rx.clone();
        let stopped = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        match flotilla_node::run(cfg.clone(), engine.clone(), stopped).await? {
            flotilla_node::RunOutcome::Stopped => return Ok(()),
            flotilla_node::RunOutcome::RoleChanged => {
                tracing::info!("restarting in the node's new role");
                cfg.mode = StartMode::Resume;
            }
        }
    }
}

fn main() -> ExitCode {
    // The shim path skips building the whole command-line parser: it is on every container's
    // start path, and its arguments are produced by the agent, not typed by a person.
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|a| a == "shim") {
        return ExitCode::from(flotilla_shim::run(argv.collect()).clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    if let Command::Shim(args) = cli.command {
        // The shim is a small single-threaded supervisor: no tokio runtime here.
        return ExitCode::from(flotilla_shim::run(args.args).clamp(0, 255) as u8);
    }
    if !matches!(
        cli.command,
        Command::Node(NodeCmd::Run(_)) | Command::Dev(_)
    ) {
        // A client command piped into `head` should end quietly, as Unix tools do, instead
        // of failing on EPIPE (the daemon keeps Rust's default of ignoring SIGPIPE).
        flotilla_shim::default_sigpipe();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Node(NodeCmd::Run(args)) => {
            init_tracing();
            match rt.block_on(run_node(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Node(NodeCmd::Cleanup {
            data_dir,
            dry_run: true,
        }) => match rt.block_on(flotilla_node::leftovers(&data_dir)) {
            Ok(list) if list.is_empty() => {
                println!("nothing left behind");
                ExitCode::SUCCESS
            }
            Ok(list) => {
                for l in list {
                    println!("{l}");
                }
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Node(NodeCmd::Cleanup { data_dir, .. }) => {
            init_tracing();
            match rt.block_on(flotilla_node::cleanup(&data_dir)) {
                Ok(n) => {
                    println!("removed {n} containers");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Dev(args) => {
            init_tracing();
            let shutdown = {
                let _in_runtime = rt.enter();
                shutdown_signal()
            };
            match rt.block_on(dev::run(args, shutdown)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        command => {
            let res = rt.block_on(flotilla_cli::run_client(
                cli.host.as_deref(),
                cli.tls_dir.as_deref(),
                command,
            ));
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", e.message);
                    ExitCode::from(e.code.clamp(1, 255) as u8)
                }
            }
        }
    }
}
