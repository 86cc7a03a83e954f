//! `flotilla image …`: images in the content store of the node the CLI talks to.

use hyper::Method;

use flotilla_api::Client;

use crate::client::{enc, get};
use crate::output::{print_json, print_table, table};
use crate::{CliError, Format, ImageCmd};

fn tar_dir(dir: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", dir)
        .map_err(|e| CliError::new(format!("reading {}: {e}", dir.display())))?;
    b.into_inner()
        .map_err(|e| CliError::new(format!("packing {}: {e}", dir.display())))
}

pub async fn run(client: &Client, cmd: ImageCmd) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Import {
            src,
            name,
            cmd,
            entrypoint,
            env,
            workdir,
            user,
        } => {
            let body = if src.is_dir() {
                tar_dir(&src)?
            } else {
                std::fs::read(&src).map_err(|e| {
                    CliError::usage(format!(
                        "{}: {e}; give a directory or a tar file",
                        src.display()
                    ))
                })?
            };
            let cmd = cmd.map(|c| {
                if c.len() == 1 && c[0].contains(' ') {
                    vec!["/bin/sh".to_string(), "-c".to_string(), c[0].clone()]
                } else {
                    c
                }
            });
            let config = serde_json::json!({
                "cmd": cmd, "entrypoint": entrypoint, "env": env, "workdir": workdir, "user": user,
            });
            let path = format!(
                "/v1/images/import?name={}&config={}",
                enc(&name),
                enc(&config.to_string())
            );
            let client = client
                .clone()
                .with_timeout(std::time::Duration::from_secs(600));
            let resp = client.request(Method::POST, &path, Some(body)).await?;
            let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
            println!(
                "{} {}",
                v["name"].as_str().unwrap_or(&name),
                v["digest"].as_str().unwrap_or("")
            );
            Ok(())
        }
        ImageCmd::Load { file } => {
            let body = std::fs::read(&file)
                .map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
            let client = client
                .clone()
                .with_timeout(std::time::Duration::from_secs(600));
            let resp = client
                .request(Method::POST, "/v1/images/load", Some(body))
                .await?;
            let v: Vec<serde_json::Value> = serde_json::from_slice(&resp.body).unwrap_or_default();
            for i in v {
                println!(
                    "Loaded image: {} {}",
                    i["name"].as_str().unwrap_or(""),
                    i["digest"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        ImageCmd::Ls(f) => {
            let images: Vec<serde_json::Value> = get(client, "/v1/images").await?;
            if f.format == Format::Json {
                return print_json(&images);
            }
            let mut t = table(&["REFERENCE", "DIGEST", "LAYERS", "SIZE"]);
            for i in &images {
                let refs: Vec<String> = i["refs"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| r.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let digest = i["digest"].as_str().unwrap_or("");
                t.add_row(vec![
                    if refs.is_empty() {
                        "<none>".to_string()
                    } else {
                        refs.join(", ")
                    },
                    digest.chars().take(19).collect(),
                    i["layers"].to_string(),
                    format!(
                        "{:.1} MiB",
                        i["size"].as_u64().unwrap_or(0) as f64 / 1048576.0
                    ),
                ]);
            }
            print_table(&t);
            Ok(())
        }
        ImageCmd::Inspect { image, format: _ } => {
            let v: serde_json::Value = get(client, &format!("/v1/images/{}", enc(&image))).await?;
            print_json(&v)
        }
        ImageCmd::Rm { images } => {
            for i in images {
                client
                    .request(Method::DELETE, &format!("/v1/images/{}", enc(&i)), None)
                    .await?;
                println!("Deleted: {i}");
            }
            Ok(())
        }
    }
}
