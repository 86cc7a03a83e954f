//! `flotilla network create|ls|inspect|rm`, and the `--network`/`--network-add`/`--network-rm`
//! flags of `service create|update`.

use hyper::Method;

use flotilla_api::Client;
use flotilla_types::{Network, NetworkAttachment, NetworkCreate};

use crate::client::{enc, get};
use crate::output::{add_row, print_json, print_table, table};
use crate::{CliError, Format, NetworkCmd, SpecFlags};

/// `POST /v1/networks`: the network as created (its range filled in).
pub async fn network_create(client: &Client, req: &NetworkCreate) -> Result<Network, CliError> {
    Ok(client.post_json("/v1/networks", req).await?)
}

/// `GET /v1/networks`: every network, by name, with the services attached.
pub async fn network_list(client: &Client) -> Result<Vec<Network>, CliError> {
    get(client, "/v1/networks").await
}

/// `GET /v1/networks/{name}` (a name, id or unique id prefix).
pub async fn network_inspect(client: &Client, name: &str) -> Result<Network, CliError> {
    get(client, &format!("/v1/networks/{}", enc(name))).await
}

/// `DELETE /v1/networks/{name}`.
pub async fn network_remove(client: &Client, name: &str) -> Result<(), CliError> {
    client
        .request(Method::DELETE, &format!("/v1/networks/{}", enc(name)), None)
        .await?;
    Ok(())
}

/// Whether `--opt` asks for encryption (`encrypted`, `encrypted=true|false`; the last wins).
fn encrypted_opt(opts: &[String]) -> Result<bool, CliError> {
    let mut on = false;
    for o in opts {
        on = match o.split_once('=') {
            None if o == "encrypted" => true,
            Some(("encrypted", "true" | "")) => true,
            Some(("encrypted", "false")) => false,
            Some(("encrypted", v)) => {
                return Err(CliError::usage(format!(
                    "--opt encrypted={v}: the value must be true or false"
                )))
            }
            _ => {
                return Err(CliError::usage(format!(
                    "unknown network option {o:?}: the only one is `encrypted`"
                )))
            }
        };
    }
    Ok(on)
}

pub async fn run(client: &Client, cmd: NetworkCmd) -> Result<(), CliError> {
    match cmd {
        NetworkCmd::Create {
            name,
            driver,
            subnet,
            internal,
            attachable,
            opt,
            label,
        } => {
            let req = NetworkCreate {
                name,
                driver,
                subnet,
                internal,
                attachable,
                encrypted: encrypted_opt(&opt)?,
                labels: crate::storage::labels(&label)?,
            };
            let n = network_create(client, &req).await?;
            println!("{}", n.name);
            Ok(())
        }
        NetworkCmd::Ls(f) => {
            let all = network_list(client).await?;
            if f.format == Format::Json {
                return print_json(&all);
            }
            print_table(&ls_table(&all));
            Ok(())
        }
        NetworkCmd::Inspect { names, format: _ } => {
            let mut out = Vec::with_capacity(names.len());
            for n in &names {
                out.push(network_inspect(client, n).await?);
            }
            print_json(&out)
        }
        NetworkCmd::Rm { names } => {
            for n in names {
                network_remove(client, &n).await?;
                println!("{n}");
            }
            Ok(())
        }
    }
}

/// `network ls` as printed (every cell escaped by `add_row`).
fn ls_table(all: &[Network]) -> comfy_table::Table {
    let mut t = table(&["ID", "NAME", "DRIVER", "SUBNET", "INTERNAL", "SERVICES"]);
    for n in all {
        add_row(
            &mut t,
            vec![
                n.id.chars().take(12).collect(),
                n.name.clone(),
                n.driver.clone(),
                n.subnet.clone(),
                n.internal.to_string(),
                if n.used_by.is_empty() {
                    "-".to_string()
                } else {
                    n.used_by.join(", ")
                },
            ],
        );
    }
    t
}

/// Parses `--network`: `NAME`, or Docker's long form `name=NAME[,alias=ALIAS]...`.
pub fn parse_network(s: &str) -> Result<NetworkAttachment, String> {
    const FORMS: &str = "give NAME or name=NAME[,alias=ALIAS]";
    if s.trim().is_empty() {
        return Err(format!("empty: {FORMS}"));
    }
    if !s.contains('=') && !s.contains(',') {
        return Ok(NetworkAttachment {
            target: s.to_string(),
            aliases: Vec::new(),
        });
    }
    let mut target: Option<String> = None;
    let mut aliases = Vec::new();
    for part in s.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("{part:?} is not KEY=VALUE: {FORMS}"));
        };
        match k {
            "name" | "target" => {
                if v.is_empty() {
                    return Err(format!("{k}= needs a network name: {FORMS}"));
                }
                if target.is_some() {
                    return Err("the network is named twice: give one name= per --network".into());
                }
                target = Some(v.to_string());
            }
            "alias" => {
                if v.is_empty() {
                    return Err("alias= needs a name".into());
                }
                aliases.push(v.to_string());
            }
            _ => {
                return Err(format!(
                    "unknown key {k:?}: the keys are name and alias (e.g. name=backend,alias=db)"
                ))
            }
        }
    }
    let target = target.ok_or_else(|| format!("no name= given: {FORMS}"))?;
    Ok(NetworkAttachment { target, aliases })
}

/// `--network[-add]`/`--network-rm`: removes, then adds; an added network the service is
/// already attached to keeps its place and takes the new aliases.
pub fn apply_network_flags(
    f: &SpecFlags,
    networks: &mut Vec<NetworkAttachment>,
) -> Result<(), CliError> {
    for n in &f.network_rm {
        let before = networks.len();
        networks.retain(|a| &a.target != n);
        if networks.len() == before {
            return Err(CliError::usage(format!(
                "--network-rm {n}: the service is not attached to that network"
            )));
        }
    }
    let mut added: Vec<String> = Vec::new();
    for s in &f.network {
        let a = parse_network(s).map_err(|e| CliError::usage(format!("--network {s:?}: {e}")))?;
        if added.contains(&a.target) {
            return Err(CliError::usage(format!(
                "--network {}: given twice; give each network once, with all its aliases",
                a.target
            )));
        }
        added.push(a.target.clone());
        match networks.iter_mut().find(|x| x.target == a.target) {
            Some(x) => *x = a,
            None => networks.push(a),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command, ServiceCmd};
    use clap::Parser;

    fn att(target: &str, aliases: &[&str]) -> NetworkAttachment {
        NetworkAttachment {
            target: target.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// The networks `service create|update … FLAGS` leaves on a spec holding `current`.
    fn networks(
        sub: &str,
        flags: &[&str],
        current: &[NetworkAttachment],
    ) -> Result<Vec<NetworkAttachment>, String> {
        let mut argv = vec!["flotilla", "service", sub];
        if sub == "create" {
            argv.extend(["--name", "x"]);
        }
        argv.extend_from_slice(flags);
        argv.push(if sub == "create" { "img" } else { "svc" });
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Service(cmd) = cli.command else {
            return Err("not a service command".into());
        };
        let f = match *cmd {
            ServiceCmd::Create(a) => a.flags,
            ServiceCmd::Update(a) => a.flags,
            _ => return Err("not create or update".into()),
        };
        let mut list = current.to_vec();
        apply_network_flags(&f, &mut list).map_err(|e| e.to_string())?;
        Ok(list)
    }

    #[test]
    fn short_and_long_network_forms() {
        assert_eq!(parse_network("backend"), Ok(att("backend", &[])));
        assert_eq!(
            parse_network("name=backend,alias=db,alias=pg"),
            Ok(att("backend", &["db", "pg"]))
        );
        assert_eq!(
            parse_network("alias=db,target=backend"),
            Ok(att("backend", &["db"]))
        );
        // The server checks names and aliases; the parser keeps them as given.
        assert_eq!(parse_network("Back.End"), Ok(att("Back.End", &[])));
    }

    #[test]
    fn bad_network_specs_say_what_is_wrong() {
        for (bad, says) in [
            ("", "empty"),
            ("  ", "empty"),
            ("name=", "name= needs a network name"),
            ("target=", "target= needs a network name"),
            ("foo=bar", "unknown key \"foo\""),
            ("name=a,foo=bar", "unknown key"),
            ("name=a,driver-opt=x=y", "unknown key \"driver-opt\""),
            ("name=a,alias=", "alias= needs a name"),
            ("alias=db", "no name= given"),
            ("name=a,name=b", "named twice"),
            ("a,b", "\"a\" is not KEY=VALUE"),
            ("name=a,", "\"\" is not KEY=VALUE"),
            (",", "is not KEY=VALUE"),
        ] {
            let e = parse_network(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn network_flags_reach_the_spec() {
        assert_eq!(
            networks(
                "create",
                &["--network", "front", "--network", "name=back,alias=db"],
                &[]
            ),
            Ok(vec![att("front", &[]), att("back", &["db"])])
        );
        let current = [att("front", &[]), att("back", &["db"])];
        // Docker's update flags: a re-added network keeps its place, with its new aliases.
        assert_eq!(
            networks(
                "update",
                &[
                    "--network-add",
                    "name=back,alias=pg",
                    "--network-add",
                    "extra",
                    "--network-rm",
                    "front"
                ],
                &current
            ),
            Ok(vec![att("back", &["pg"]), att("extra", &[])])
        );
        for (sub, flags, says) in [
            (
                "create",
                &["--network", "a", "--network", "a"][..],
                "given twice",
            ),
            ("create", &["--network", "name="][..], "--network \"name=\""),
            ("create", &["--network", "foo=bar"][..], "unknown key"),
            ("create", &["--network", ""][..], "empty"),
            ("update", &["--network-rm", "nope"][..], "not attached"),
        ] {
            let e = networks(sub, flags, &current).expect_err(&format!("{flags:?}"));
            assert!(e.contains(says), "{flags:?}: {e}");
        }
    }

    #[test]
    fn network_commands_parse() {
        let cli = Cli::try_parse_from([
            "flotilla",
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.200.64.0/20",
            "--internal",
            "--attachable",
            "--label",
            "team=a",
            "backend",
        ])
        .expect("create");
        let Command::Network(NetworkCmd::Create {
            name,
            driver,
            subnet,
            internal,
            attachable,
            opt,
            label,
        }) = cli.command
        else {
            panic!("not network create");
        };
        assert!(opt.is_empty());
        assert!(encrypted_opt(&["encrypted".into()]).expect("on"));
        assert!(encrypted_opt(&["encrypted=true".into()]).expect("on"));
        assert!(!encrypted_opt(&["encrypted".into(), "encrypted=false".into()]).expect("off"));
        for bad in ["encrypted=yes", "mtu=1400", "", "=x"] {
            let e = encrypted_opt(&[bad.into()]).expect_err(bad).to_string();
            assert!(e.contains("encrypted"), "{bad}: {e}");
        }
        assert_eq!(name, "backend");
        assert_eq!(driver.as_deref(), Some("overlay"));
        assert_eq!(subnet.as_deref(), Some("10.200.64.0/20"));
        assert!(internal && attachable);
        assert_eq!(label, ["team=a"]);
        for argv in [
            &["flotilla", "network", "rm"][..],
            &["flotilla", "network", "inspect"][..],
            &["flotilla", "network", "create"][..],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn ls_escapes_what_it_prints() {
        let n = Network {
            name: "back".into(),
            id: "abcdefghijklmnopqrstuvwxy".into(),
            driver: "overlay".into(),
            subnet: "10.200.240.0/20".into(),
            used_by: vec!["web\u{1b}[2J".into(), "db".into()],
            ..Default::default()
        };
        let out = crate::output::render_table(&ls_table(&[n]));
        assert!(out.contains("abcdefghijkl "), "{out}");
        assert!(out.contains("10.200.240.0/20"), "{out}");
        assert!(!out.contains('\u{1b}'), "{out}");
        assert!(out.contains("db"), "{out}");
    }
}
