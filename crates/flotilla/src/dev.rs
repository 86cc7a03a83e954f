//! `flotilla dev`: a single-node cluster in the foreground, with a demo service built from
//! Debian's busybox-static. Wiring only: the node is `flotilla_node::run`, everything else is
//! API calls over the node's unix socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::Method;

use flotilla_api::{Client, Endpoint};
use flotilla_cli::DevArgs;
use flotilla_node::{NodeConfig, StartMode};
use flotilla_types::{ContainerSpec, ServiceMode, ServiceSpec, Task, TaskSpec, TaskState};

const DEMO_IMAGE: &str = "busybox:demo";
const DEMO_SERVICE: &str = "demo";
const DEMO_PORT: u16 = 8080;

/// A minimal root filesystem: static busybox plus the applets the demo uses.
fn busybox_rootfs(dir: &Path) -> anyhow::Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("busybox not found: apt-get install busybox-static")?;
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::copy(&busybox, dir.join("bin/busybox"))?;
    for applet in [
        "sh", "echo", "sleep", "cat", "ls", "id", "hostname", "date", "httpd", "wget", "env", "ps",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

fn tar_dir(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)?;
    Ok(b.into_inner()?)
}

async fn wait_api(
    client: &Client,
    node: &tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if node.is_finished() {
            bail!("the node stopped during start-up (see the log above)");
        }
        if client.request(Method::GET, "/v1/nodes", None).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the node did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn deploy_demo(client: &Client, dir: &Path) -> anyhow::Result<()> {
    let have_image = client
        .request(Method::GET, &format!("/v1/images/{DEMO_IMAGE}"), None)
        .await
        .is_ok();
    if !have_image {
        let tmp = tempfile::tempdir()?;
        busybox_rootfs(tmp.path())?;
        // Serves its hostname on port 80 (busybox httpd in the background) and logs a line
        // every 2 s.
        let config = serde_json::json!({ "env": [], "cmd": ["/bin/sh", "-c", "echo started; mkdir -p /www; hostname > /www/index.html; httpd -p 80 -h /www; while true; do echo \"hello from $(hostname) at $(date)\"; sleep 2; done"] });
        let path = format!(
            "/v1/images/import?name={DEMO_IMAGE}&config={}",
            config
                .to_string()
                .bytes()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>()
        );
        let resp = client
            .request(Method::POST, &path, Some(tar_dir(tmp.path())?))
            .await
            .context("importing the demo image")?;
        // Signed with the admin key `--init` created, so the cluster's trust policy lets it run.
        let digest = serde_json::from_slice::<serde_json::Value>(&resp.body)?["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let key = flotilla_cli::find_signing_key(None, Some(&dir.join("admin")), None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        flotilla_cli::sign_image(client, &key, "busybox", &digest)
            .await
            .map_err(|e| anyhow::anyhow!("signing the demo image: {e}"))?;
    }
    let exists = client
        .request(Method::GET, &format!("/v1/services/{DEMO_SERVICE}"), None)
        .await
        .is_ok();
    if !exists {
        let spec = ServiceSpec {
            name: DEMO_SERVICE.into(),
            labels: Default::default(),
            task_template: TaskSpec {
                container: ContainerSpec {
                    image: DEMO_IMAGE.into(),
                    // The demo's shell loop ignores SIGTERM (it is PID 1): keep Ctrl-C quick.
                    stop_grace_period: Some(2_000_000_000),
                    ..Default::default()
                },
                ..Default::default()
            },
            mode: ServiceMode::Replicated { replicas: 3 },
            update_config: Default::default(),
            rollback_config: Default::default(),
            // The routing mesh: port 8080 of the node reaches the replicas' port 80.
            endpoint_spec: flotilla_types::EndpointSpec {
                mode: Default::default(),
                ports: vec![flotilla_types::PortConfig {
                    published: DEMO_PORT,
                    target: 80,
                    protocol: flotilla_types::Protocol::Tcp,
                    publish_mode: flotilla_types::PublishMode::Ingress,
                    proxy_protocol: None,
                }],
            },
        };
        let _: serde_json::Value = client.post_json("/v1/services", &spec).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let tasks: Vec<Task> = client
            .get_json(&format!("/v1/tasks?service={DEMO_SERVICE}"))
            .await?;
        let running = tasks
            .iter()
            .filter(|t| {
                t.status.state == TaskState::Running && t.desired_state == TaskState::Running
            })
            .count();
        if running >= 3 {
            return Ok(());
        }
        if let Some(t) = tasks.iter().find(|t| t.status.state == TaskState::Rejected) {
            bail!("demo task rejected: {}", t.status.message);
        }
        if Instant::now() > deadline {
            bail!("the demo service did not start within 120 s: see `flotilla service ps demo`");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes every service and waits until its containers are gone (so a temporary data dir
/// leaves nothing running behind).
async fn teardown(client: &Client) {
    let services: Vec<serde_json::Value> =
        client.get_json("/v1/services").await.unwrap_or_default();
    for s in &services {
        if let Some(id) = s["id"].as_str() {
            let _ = client
                .request(Method::DELETE, &format!("/v1/services/{id}"), None)
                .await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let tasks: Vec<serde_json::Value> = client.get_json("/v1/tasks").await.unwrap_or_default();
        if tasks.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(
    args: DevArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (dir, temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new().prefix("flotilla-dev-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mode = if dir.join("node.json").exists() {
        StartMode::Resume
    } else {
        StartMode::Init
    };
    let mut cfg = NodeConfig::new(dir.clone(), args.listen, mode);
    cfg.name = Some("dev".into());
    // Names outside the cluster resolve through the host's resolvers, as on `node run`.
    cfg.dns_upstreams = flotilla_node::dns_upstreams(&[]).map_err(anyhow::Error::msg)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let node_cfg = cfg.clone();
    let mut engine = std::collections::BTreeMap::new();
    engine.insert(
        "flotilla_version".to_string(),
        serde_json::Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    let node = tokio::spawn(async move {
        flotilla_node::run(node_cfg, engine, async {
            let _ = stop_rx.await;
        })
        .await
        .map(|_| ())
        .map_err(anyhow::Error::from)
    });
    let sock = dir.join("api.sock");
    let client = Client::new(Endpoint::Unix(sock.clone()));
    let started = async {
        wait_api(&client, &node).await?;
        if !args.no_demo {
            deploy_demo(&client, &dir).await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = started.await {
        let _ = stop_tx.send(());
        if let Ok(Err(node_err)) = node.await {
            return Err(node_err.context(e.to_string()));
        }
        return Err(e);
    }
    let host = format!("unix://{}", sock.display());
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| ".".into());
    println!(
        "\nFlotilla dev cluster is running (data dir {}).\n\nTry, in another shell:\n\
         \n    export PATH={bin_dir}:$PATH FLOTILLA_HOST={host}\
         \n    flotilla node ls\
         \n    flotilla service ls\
         \n    flotilla service ps demo\
         \n    flotilla service logs -f demo\
         \n    curl http://{}:{DEMO_PORT}/        # the routing mesh: a different replica each time\
         \n    flotilla service scale demo=5\
         \n    flotilla service update --env-add GREETING=hi demo\
         \n    flotilla events --filter type=task\
         \n\nRemote admin access: --host https://{} --tls-dir {}\n\nPress Ctrl-C to stop{}.",
        dir.display(),
        args.listen.ip(),
        args.listen,
        dir.join("admin").display(),
        if temp.is_some() {
            " (everything is removed)"
        } else {
            ""
        }
    );
    shutdown.await;
    eprintln!("stopping…");
    if temp.is_some() {
        teardown(&client).await;
    }
    let _ = stop_tx.send(());
    match node.await {
        Ok(r) => r?,
        Err(e) => bail!("node task failed: {e}"),
    }
    if temp.is_some() {
        // The node's bridge, NAT chains and overlay device go with the temporary data dir.
        if let Err(e) = flotilla_node::cleanup(&dir).await {
            eprintln!("cleanup: {e}");
        }
    }
    drop(temp);
    Ok(())
}
