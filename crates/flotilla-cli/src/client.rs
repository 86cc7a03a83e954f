use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;

use flotilla_api::{Client, Endpoint};
use flotilla_types::{ClusterInfo, EventMessage, JoinTokens, Node, NodeUpdate};

use crate::output::{add_row, ago, escape, json_safe, print_json, print_table, table};
use crate::{
    CliError, ClusterCmd, Command, EventsArgs, Format, NodeCmd, NodeUpdateArgs, DEFAULT_DATA_DIR,
};

/// Builds the API client from `--host` / `--tls-dir`.
pub fn connect(host: Option<&str>, tls_dir: Option<&Path>) -> Result<Client, CliError> {
    let host = host
        .map(str::to_string)
        .unwrap_or_else(|| format!("unix://{DEFAULT_DATA_DIR}/api.sock"));
    if let Some(path) = host.strip_prefix("unix://") {
        let p = PathBuf::from(path);
        if !p.exists() {
            return Err(CliError::new(format!(
                "no node API socket at {path}: is `flotilla node run` running with that data dir? Point at one with --host unix:///DATA_DIR/api.sock"
            )));
        }
        return Ok(Client::new(Endpoint::Unix(p)));
    }
    if let Some(addr) = host.strip_prefix("https://") {
        let dir = tls_dir.ok_or_else(|| {
            CliError::usage(format!(
                "--host {host} needs --tls-dir DIR with ca.pem, cert.pem and key.pem (the admin bundle in the first manager's DATA_DIR/admin)"
            ))
        })?;
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| {
                CliError::usage(format!(
                    "--tls-dir {}: cannot read {name}: {e}",
                    dir.display()
                ))
            })
        };
        let (ca, cert, key) = (read("ca.pem")?, read("cert.pem")?, read("key.pem")?);
        let tls = flotilla_pki::client_config(&ca, Some((&cert, &key)))
            .map_err(|e| CliError::usage(format!("--tls-dir {}: {e}", dir.display())))?;
        return Ok(Client::new(Endpoint::Https {
            addr: addr.trim_end_matches('/').to_string(),
            tls,
        }));
    }
    Err(CliError::usage(format!(
        "--host {host:?} is not understood: use unix:///path/api.sock or https://IP:PORT"
    )))
}

/// Runs a client subcommand against the API.
pub async fn run_client(
    host: Option<&str>,
    tls_dir: Option<&Path>,
    command: Command,
) -> Result<(), CliError> {
    let client = connect(host, tls_dir)?;
    match command {
        Command::Node(cmd) => node(&client, cmd).await,
        Command::Cluster(cmd) => cluster(&client, cmd).await,
        Command::Events(args) => events(&client, args).await,
        Command::Service(cmd) => crate::service::run(&client, *cmd).await,
        Command::Image(cmd) => crate::image::run(&client, host, tls_dir, cmd).await,
        Command::Trust(cmd) => crate::trust::run(&client, cmd).await,
        Command::Secret(cmd) => {
            crate::storage::files(&client, flotilla_types::FileKind::Secret, cmd).await
        }
        Command::Config(cmd) => {
            crate::storage::files(&client, flotilla_types::FileKind::Config, cmd).await
        }
        Command::Volume(cmd) => crate::storage::volumes(&client, cmd).await,
        Command::Network(cmd) => crate::network::run(&client, cmd).await,
        Command::Dev(_) => Err(CliError::usage("`dev` is handled by the binary")),
        Command::Shim(_) => Err(CliError::usage("shim is started by the agent, not by hand")),
    }
}

fn warn_if_stale(resp: &flotilla_api::Response) {
    if resp
        .headers
        .get("x-flotilla-stale")
        .is_some_and(|v| v == "true")
    {
        eprintln!("WARNING: no leader could confirm this answer (quorum lost?): it may be stale");
    }
}

pub async fn get<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: &str,
) -> Result<T, CliError> {
    let resp = client.request(Method::GET, path, None).await?;
    warn_if_stale(&resp);
    serde_json::from_slice(&resp.body)
        .map_err(|e| CliError::new(format!("unexpected answer from the node: {e}")))
}

/// `node ls` as printed: names, addresses and the rest escaped (nodes report them).
pub(crate) fn node_table(nodes: &[Node]) -> comfy_table::Table {
    let mut t = table(&[
        "ID",
        "NAME",
        "STATUS",
        "AVAILABILITY",
        "MANAGER STATUS",
        "ADDRESS",
    ]);
    for n in nodes {
        add_row(&mut t, node_row(n));
    }
    t
}

fn node_row(n: &Node) -> Vec<String> {
    let manager = match &n.manager_status {
        Some(m) if m.leader => "Leader".to_string(),
        Some(m) if m.reachability == "reachable" => "Reachable".to_string(),
        Some(m) if m.reachability == "unreachable" => "Unreachable".to_string(),
        Some(_) => "Manager".to_string(),
        None => String::new(),
    };
    vec![
        n.id.clone(),
        n.spec.name.clone(),
        n.status.state.as_str().to_string(),
        n.spec.availability.as_str().to_string(),
        manager,
        n.status.addr.clone(),
    ]
}

/// `node inspect` as printed; every string the node or an operator set is escaped.
pub(crate) fn node_details(n: &Node) -> String {
    use std::fmt::Write as _;
    let e = |s: &str| escape(s).into_owned();
    let mut o = String::new();
    let _ = writeln!(o, "ID:            {}", e(&n.id));
    let _ = writeln!(o, "Name:          {}", e(&n.spec.name));
    let _ = writeln!(o, "Role:          {}", n.spec.role.as_str());
    let _ = writeln!(o, "Availability:  {}", n.spec.availability.as_str());
    let _ = writeln!(
        o,
        "Status:        {} {}",
        n.status.state.as_str(),
        e(&n.status.message)
    );
    let _ = writeln!(o, "Address:       {}", e(&n.status.addr));
    let _ = writeln!(o, "Version:       {}", n.meta.version);
    if !n.spec.labels.is_empty() {
        let _ = writeln!(o, "Labels:");
        for (k, v) in &n.spec.labels {
            let _ = writeln!(o, "  {}={}", e(k), e(v));
        }
    }
    if let Some(m) = &n.manager_status {
        let _ = writeln!(
            o,
            "Manager:       raft id {} at {}, {}{}",
            m.raft_id,
            e(&m.addr),
            e(&m.reachability),
            if m.leader { ", leader" } else { "" }
        );
    }
    let d = &n.description;
    let _ = writeln!(o, "Hostname:      {}", e(&d.hostname));
    let _ = writeln!(o, "Platform:      {}/{}", e(&d.os), e(&d.arch));
    let _ = writeln!(
        o,
        "Resources:     {} CPUs, {} MiB",
        d.resources.nano_cpus / 1_000_000_000,
        d.resources.memory_bytes / (1024 * 1024)
    );
    for (k, v) in &d.engine {
        // `v` is JSON: its strings are escaped by serde, except DEL, C1 and bidi controls.
        let _ = writeln!(o, "Engine {}: {}", e(k), json_safe(&v.to_string()));
    }
    let _ = writeln!(o, "Updated:       {}", ago(n.meta.updated_at));
    o
}

pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn node(client: &Client, cmd: NodeCmd) -> Result<(), CliError> {
    match cmd {
        NodeCmd::Run(_) | NodeCmd::Cleanup { .. } => Err(CliError::usage("handled by the binary")),
        NodeCmd::Ls(f) => {
            let nodes: Vec<Node> = get(client, "/v1/nodes").await?;
            if f.format == Format::Json {
                return print_json(&nodes);
            }
            print_table(&node_table(&nodes));
            Ok(())
        }
        NodeCmd::Inspect { node, format } => {
            let nodes: Vec<Node> = get(client, &format!("/v1/nodes/{}", enc(&node))).await?;
            if format.format == Format::Json {
                return print_json(&nodes);
            }
            for n in &nodes {
                print!("{}", node_details(n));
            }
            Ok(())
        }
        NodeCmd::Update(args) => node_update(client, args).await,
        NodeCmd::Promote { nodes } => {
            for n in nodes {
                let _: serde_json::Value = client
                    .post_json(&format!("/v1/nodes/{}/promote", enc(&n)), &())
                    .await?;
                println!("Node {n} promoted to a manager in the cluster.");
            }
            Ok(())
        }
        NodeCmd::Demote { nodes } => {
            for n in nodes {
                let _: serde_json::Value = client
                    .post_json(&format!("/v1/nodes/{}/demote", enc(&n)), &())
                    .await?;
                println!("Manager {n} demoted in the cluster.");
            }
            Ok(())
        }
        NodeCmd::Rm { nodes, force } => {
            for n in nodes {
                client
                    .request(
                        Method::DELETE,
                        &format!("/v1/nodes/{}?force={force}", enc(&n)),
                        None,
                    )
                    .await?;
                println!("{n}");
            }
            Ok(())
        }
    }
}

async fn node_update(client: &Client, args: NodeUpdateArgs) -> Result<(), CliError> {
    let mut upd = NodeUpdate::default();
    for kv in &args.label_add {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        if k.is_empty() {
            return Err(CliError::usage(format!(
                "--label-add {kv:?}: expected KEY=VALUE"
            )));
        }
        upd.label_add.insert(k.to_string(), v.to_string());
    }
    upd.label_rm = args.label_rm.clone();
    if let Some(a) = &args.availability {
        upd.availability = Some(a.parse().map_err(CliError::usage)?);
    }
    if upd == NodeUpdate::default() {
        return Err(CliError::usage(
            "nothing to update: give --availability, --label-add or --label-rm",
        ));
    }
    let _: Node = client
        .post_json(&format!("/v1/nodes/{}", enc(&args.node)), &upd)
        .await?;
    println!("{}", args.node);
    Ok(())
}

/// The unlock key with how to use it (as `docker swarm update --autolock` prints it).
fn print_unlock_key(key: &str, rotated: bool) {
    if !rotated {
        println!("Autolock is on.");
    }
    println!("To unlock a manager after it restarts, run `flotilla cluster unlock` against it and give this key:\n");
    println!("    {}\n", escape(key));
    println!("Keep it in a password manager: without it a restarted manager cannot open its data.");
}

/// The unlock key from standard input (a prompt first when it is a terminal); at most one
/// short line is read.
fn read_unlock_key() -> Result<String, CliError> {
    use std::io::{BufRead, IsTerminal, Read, Write};
    /// Terminal echo off while the key is typed (`stty`, as the crate has no unsafe code),
    /// back on when dropped.
    struct NoEcho(bool);
    impl NoEcho {
        fn stty(arg: &str) -> bool {
            std::process::Command::new("stty")
                .arg(arg)
                .stdin(std::process::Stdio::inherit())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        }
    }
    impl Drop for NoEcho {
        fn drop(&mut self) {
            if self.0 {
                NoEcho::stty("echo");
                eprintln!();
            }
        }
    }
    let stdin = std::io::stdin();
    let mut _echo = NoEcho(false);
    if stdin.is_terminal() {
        eprint!("Unlock key: ");
        let _ = std::io::stderr().flush();
        _echo = NoEcho(NoEcho::stty("-echo"));
    }
    let mut line = String::new();
    stdin.lock().take(4096).read_line(&mut line).map_err(|e| {
        CliError::new(format!(
            "cannot read the unlock key from standard input: {e}"
        ))
    })?;
    if line.trim().is_empty() {
        return Err(CliError::usage(
            "no unlock key: give it on standard input, e.g. `flotilla cluster unlock < keyfile`",
        ));
    }
    Ok(line)
}

async fn cluster(client: &Client, cmd: ClusterCmd) -> Result<(), CliError> {
    match cmd {
        ClusterCmd::Info(f) => {
            let info: ClusterInfo = get(client, "/v1/cluster").await?;
            if f.format == Format::Json {
                return print_json(&info);
            }
            let e = |s: &str| escape(s).into_owned();
            println!("Cluster ID:     {}", e(&info.cluster_id));
            println!("CA fingerprint: {}", info.ca_fingerprint);
            match &info.leader {
                Some(l) => println!(
                    "Leader:         {} ({}) at {}",
                    e(&l.name),
                    e(&l.node_id),
                    e(&l.addr)
                ),
                None => println!("Leader:         none (no quorum?)"),
            }
            println!(
                "Raft:           term {}, commit index {}, applied {}, this manager is {}",
                info.raft.term, info.raft.commit_index, info.raft.applied_index, info.raft.state
            );
            println!("Managers:");
            let mut t = table(&[
                "NODE ID",
                "NAME",
                "ADDRESS",
                "RAFT ID",
                "ROLE",
                "REACHABILITY",
            ]);
            for m in &info.managers {
                add_row(
                    &mut t,
                    vec![
                        m.node_id.clone(),
                        m.name.clone(),
                        m.addr.clone(),
                        m.raft_id.to_string(),
                        if m.leader {
                            "leader".into()
                        } else if m.voter {
                            "voter".into()
                        } else {
                            "learner".to_string()
                        },
                        m.reachability.clone(),
                    ],
                );
            }
            print_table(&t);
            if !info.settings.is_empty() {
                println!("Settings:");
                for (k, v) in &info.settings {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Array(a) => a
                            .iter()
                            .map(|x| x.as_str().map(str::to_string).unwrap_or(x.to_string()))
                            .collect::<Vec<_>>()
                            .join(", "),
                        other => other.to_string(),
                    };
                    println!("  {}: {}", e(k), e(&v));
                }
            }
            Ok(())
        }
        ClusterCmd::Update {
            signature_enforcement,
            bind_allow,
            autolock,
        } => {
            if signature_enforcement.is_none() && bind_allow.is_empty() && autolock.is_none() {
                return Err(CliError::usage(
                    "nothing to update: give --signature-enforcement on|off, --bind-allow DIR or --autolock true|false",
                ));
            }
            let mut body = serde_json::Map::new();
            if let Some(on) = &signature_enforcement {
                body.insert("signature_enforcement".into(), (on == "on").into());
            }
            if !bind_allow.is_empty() {
                let dirs: Vec<&String> = bind_allow.iter().filter(|d| !d.is_empty()).collect();
                body.insert("bind_allow".into(), serde_json::json!(dirs));
            }
            if let Some(on) = autolock {
                body.insert("autolock".into(), on.into());
            }
            let settings: serde_json::Value = client
                .send_json(
                    Method::PUT,
                    "/v1/cluster/settings",
                    &serde_json::Value::Object(body),
                )
                .await?;
            match (autolock, settings["unlock_key"].as_str()) {
                (Some(true), Some(key)) => print_unlock_key(key, false),
                (Some(true), None) => println!(
                    "Autolock is already on: `flotilla cluster unlock-key` shows the unlock key."
                ),
                (Some(false), _) => {
                    println!(
                        "Autolock is off: managers keep their key files beside their data again."
                    );
                    println!("A manager that is down now still needs the last unlock key once when it restarts.");
                }
                (None, _) => {}
            }
            if let Some(on) = signature_enforcement {
                println!("Image signature enforcement is {on}.");
                if on == "off" {
                    eprintln!("WARNING: agents now run images whatever their signatures");
                }
            }
            if !bind_allow.is_empty() {
                let dirs: Vec<&String> = bind_allow.iter().filter(|d| !d.is_empty()).collect();
                if dirs.is_empty() {
                    println!("Services may bind-mount no host directory.");
                } else {
                    println!(
                        "Services may bind-mount host directories under: {}",
                        dirs.iter()
                            .map(|d| d.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(())
        }
        ClusterCmd::Unlock => {
            let key = read_unlock_key()?;
            // Opening the store after the key is accepted can take a while on a large one.
            let out: serde_json::Value = client
                .clone()
                .with_timeout(Duration::from_secs(150))
                .post_json(
                    "/v1/cluster/unlock",
                    &serde_json::json!({ "key": key.trim() }),
                )
                .await?;
            if out["starting"] == true {
                println!("Manager unlocked; it is still opening its data.");
            } else {
                println!("Manager unlocked.");
            }
            Ok(())
        }
        ClusterCmd::UnlockKey { rotate, quiet } => {
            let out: serde_json::Value = if rotate {
                client
                    .post_json("/v1/cluster/unlock-key/rotate", &())
                    .await?
            } else {
                get(client, "/v1/cluster/unlock-key").await?
            };
            let key = out["unlock_key"]
                .as_str()
                .ok_or_else(|| CliError::new("the manager answered without an unlock key"))?;
            if quiet {
                println!("{}", escape(key));
            } else {
                if rotate {
                    println!("Rotated the unlock key. Each manager re-wraps its data keys with the new key within a second; a manager that is down now still needs the old key once, so keep it until every manager has been up.\n");
                }
                print_unlock_key(key, rotate);
            }
            Ok(())
        }
        ClusterCmd::JoinToken {
            role,
            rotate,
            quiet,
        } => {
            let tokens: JoinTokens = if rotate {
                client
                    .post_json(&format!("/v1/cluster/join-tokens/rotate?role={role}"), &())
                    .await?
            } else {
                get(client, "/v1/cluster/join-tokens").await?
            };
            let token = if role == "manager" {
                tokens.manager
            } else {
                tokens.worker
            };
            if quiet {
                println!("{token}");
            } else {
                if rotate {
                    println!("Rotated the {role} join token; the old one no longer works.");
                }
                println!("To add a {role} to this cluster, run on the new node:\n");
                println!(
                    "    flotilla node run --data-dir DIR --listen IP:PORT --join MANAGER_IP:PORT --token {token}\n"
                );
            }
            Ok(())
        }
    }
}

async fn events(client: &Client, args: EventsArgs) -> Result<(), CliError> {
    let mut types = Vec::new();
    for f in &args.filter {
        match f.split_once('=') {
            Some(("type", v)) => types.push(v.to_string()),
            _ => {
                return Err(CliError::usage(format!(
                    "--filter {f:?}: only type=KIND is supported (node, service, task, …)"
                )))
            }
        }
    }
    let mut query: BTreeMap<&str, String> = BTreeMap::new();
    if let Some(s) = args.since {
        query.insert("since", s.to_string());
    }
    if !types.is_empty() {
        query.insert("type", types.join(","));
    }
    let qs: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    let path = if qs.is_empty() {
        "/v1/events".to_string()
    } else {
        format!("/v1/events?{}", qs.join("&"))
    };
    let mut seen = 0usize;
    let limit = args.limit;
    let format = args.format;
    let mut failure: Option<String> = None;
    let client = client
        .clone()
        .with_timeout(Duration::from_secs(u64::MAX / 4));
    client
        .stream_lines(&path, |line| {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
                    failure = Some(err.to_string());
                    return false;
                }
            }
            match format {
                Format::Json => println!("{}", json_safe(&String::from_utf8_lossy(line))),
                Format::Table => match serde_json::from_slice::<EventMessage>(line) {
                    Ok(ev) => {
                        let name = ev
                            .object
                            .as_ref()
                            .and_then(|o| {
                                o.pointer("/spec/name")
                                    .or_else(|| o.get("name"))
                                    .and_then(|n| n.as_str())
                            })
                            .unwrap_or("");
                        println!(
                            "{:>8} {} {} {} {}",
                            ev.revision,
                            escape(&ev.kind),
                            escape(&ev.action),
                            escape(&ev.id),
                            escape(name)
                        );
                    }
                    Err(_) => println!("{}", escape(&String::from_utf8_lossy(line))),
                },
            }
            seen += 1;
            limit.is_none_or(|l| seen < l)
        })
        .await?;
    if let Some(f) = failure {
        return Err(CliError::new(f));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::render_table;

    const PWNED: &str = "\u{1b}]0;pwned\u{7}";

    fn node() -> Node {
        serde_json::from_value(serde_json::json!({
            "id": "n1", "version": 1,
            "spec": {"name": format!("w{PWNED}"), "role": "worker", "availability": "active",
                     "labels": {"k": PWNED}},
            "description": {"hostname": format!("h{PWNED}"), "os": "linux\u{9b}2J",
                            "arch": "x86_64", "resources": {},
                            "engine": {"runc": format!("1.2{PWNED}\u{9b}")}},
            "status": {"state": "down", "message": PWNED, "addr": format!("127.0.0.2:4440{PWNED}")}
        }))
        .expect("node")
    }

    #[test]
    fn node_ls_and_inspect_escape_what_nodes_reported() {
        let ls = render_table(&node_table(&[node()]));
        assert!(!ls.contains('\u{1b}') && !ls.contains('\u{7}'), "{ls:?}");
        assert!(ls.contains("w\\x1b]0;pwned\\x07"), "{ls}");
        assert!(ls.contains("127.0.0.2:4440\\x1b]0;pwned\\x07"), "{ls}");
        let inspect = node_details(&node());
        assert!(
            !inspect
                .chars()
                .any(|c| c != '\n' && (c.is_control() || c == '\u{9b}')),
            "{inspect:?}"
        );
        assert!(
            inspect.contains("Hostname:      h\\x1b]0;pwned\\x07"),
            "{inspect}"
        );
        assert!(inspect.contains("k=\\x1b]0;pwned\\x07"), "{inspect}");
        assert!(inspect.contains("linux\\u{9b}2J"), "{inspect}");
    }
}
