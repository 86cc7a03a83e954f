//! Conformance of real applications: root filesystems built from Debian packages
//! (`scripts/build-app-images.sh`: nginx, redis, PostgreSQL, a Python HTTP server, and an app
//! that runs as a non-root user and writes its logs by opening `/dev/stdout`) run as services
//! from their image config alone. For each: it answers its protocol through the routing mesh
//! and through its service name from another task, its logs reach `service logs`, and it stops
//! within its grace period with its exit code recorded.
//!
//! A check that needs a feature another issue delivers is listed in [`EXPECTED_TO_FAIL`] with
//! that issue's title: it runs, and the test fails if it starts passing (turn it on then).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Checks that wait on another issue: (check name, the issue's title).
const EXPECTED_TO_FAIL: &[(&str, &str)] = &[];

/// One application under test.
struct App {
    /// Service name (also the image's name under `apps/`).
    name: &'static str,
    /// Published port → target port.
    publish: (u16, u16),
    /// A line that must appear in `service logs` once the app served one request.
    log_line: &'static str,
    /// Run with `--init` (tini as PID 1, forwarding the stop signal).
    init: bool,
}

const APPS: &[App] = &[
    App {
        name: "nginx",
        publish: (18080, 80),
        // The access log is a symlink to /dev/stdout, as in the official image.
        log_line: "\"GET /conformance HTTP/1.0\" 404",
        init: false,
    },
    App {
        name: "redis",
        publish: (16379, 6379),
        log_line: "Ready to accept connections",
        init: false,
    },
    App {
        name: "postgres",
        publish: (15432, 5432),
        log_line: "database system is ready to accept connections",
        init: false,
    },
    App {
        name: "python",
        publish: (18000, 8000),
        log_line: "\"GET /conformance HTTP/1.0\" 404",
        init: true,
    },
    App {
        name: "stdout-app",
        publish: (18081, 8080),
        log_line: "stdout-app request /conformance",
        init: false,
    },
];

/// Builds (or finds cached) the application images; their directory.
fn app_images() -> PathBuf {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-app-images.sh");
    let started = Instant::now();
    let o = Command::new(&script)
        .output()
        .expect("run build-app-images.sh");
    assert!(
        o.status.success(),
        "{} failed (it needs Debian's package mirror the first time, then its cache): {}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("app images ready after {:?}", started.elapsed());
    PathBuf::from(
        std::env::var("FLOTILLA_APPS_CACHE").unwrap_or_else(|_| "/var/cache/flotilla-apps".into()),
    )
}

/// One raw HTTP/1.0 GET: the status code and the whole response.
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {:?}", text.lines().next()))?;
    Ok((code, text))
}

/// RESP `PING` → `+PONG`.
fn redis_ping(addr: &str) -> Result<(), String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"*1\r\n$4\r\nPING\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
    (&buf == b"+PONG\r\n")
        .then_some(())
        .ok_or_else(|| format!("answer {:?}", String::from_utf8_lossy(&buf)))
}

/// PostgreSQL's `SSLRequest`: a server answers one byte, `N` (no TLS) or `S`.
fn postgres_answers(addr: &str) -> Result<(), String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(|e| e.to_string())?;
    matches!(&b, b"N" | b"S")
        .then_some(())
        .ok_or_else(|| format!("answer {b:?}"))
}

/// The app's protocol through the routing mesh on the node's published port.
fn through_mesh(app: &App, addr: &str) -> Result<(), String> {
    match app.name {
        "redis" => redis_ping(addr),
        "postgres" => postgres_answers(addr),
        _ => {
            let (code, text) = http_get(addr, "/")?;
            let want = format!("flotilla-conformance {}", app.name);
            if code == 200 && text.contains(&want) {
                // A request whose log line the app must write (404 for the file servers).
                http_get(addr, "/conformance").map(|_| ())
            } else {
                Err(format!("{code}, body without {want:?}: {text:.200}"))
            }
        }
    }
}

/// A client task's script reaching `app` by its service name on its target port.
fn by_name_client(app: &App, host: &str) -> (String, String) {
    let port = app.publish.1;
    match app.name {
        "redis" => (
            "apps/redis:1".into(),
            format!("redis-cli -h {host} -p {port} PING"),
        ),
        "postgres" => (
            "apps/postgres:1".into(),
            format!("psql -h {host} -p {port} -U postgres -tAc 'select 40+2'"),
        ),
        _ => (
            "conformance-client:1".into(),
            format!("wget -qO- http://{host}:{port}/"),
        ),
    }
}

/// What the by-name client prints when it reached the app.
fn by_name_answer(app: &App) -> String {
    match app.name {
        "redis" => "PONG".into(),
        "postgres" => "42".into(),
        other => format!("flotilla-conformance {other}"),
    }
}

/// Runs a one-shot client service with `script`; its logs once it printed CLIENT-DONE.
fn client_logs(c: &Cluster, name: &str, image: &str, script: &str) -> String {
    let full = format!("{script} 2>&1; echo CLIENT-DONE; sleep 3600");
    let o = c.run(&[
        "service",
        "create",
        "--name",
        name,
        "--detach",
        "--entrypoint",
        "",
        image,
        "sh",
        "-c",
        &full,
    ]);
    assert!(o.status.success(), "create {name}: {}", stderr(&o));
    let logs = wait_for(
        &format!("{name} to finish"),
        Duration::from_secs(90),
        || {
            let text = stdout(&c.run(&["service", "logs", name]));
            text.contains("CLIENT-DONE").then_some(text)
        },
    );
    let o = c.run(&["service", "rm", name]);
    assert!(o.status.success(), "rm {name}: {}", stderr(&o));
    logs
}

/// The one task of `service` once it runs, as JSON.
fn running_task(c: &Cluster, service: &str, within: Duration) -> serde_json::Value {
    wait_for(&format!("{service} running"), within, || {
        let ts = c.tasks(service);
        if let Some(t) = ts
            .iter()
            .find(|t| t["status"]["state"] == "failed" || t["status"]["state"] == "rejected")
        {
            panic!("{service} did not start: {}", t["status"]);
        }
        ts.into_iter()
            .find(|t| t["status"]["state"] == "running" && t["desired_state"] == "running")
    })
}

/// Records a check's outcome, honouring [`EXPECTED_TO_FAIL`].
fn record(failures: &mut Vec<String>, check: &str, res: Result<(), String>) {
    let xfail = EXPECTED_TO_FAIL.iter().find(|(c, _)| *c == check);
    match (res, xfail) {
        (Ok(()), None) => eprintln!("conformance: {check}: ok"),
        (Err(e), None) => failures.push(format!("{check}: {e}")),
        (Err(e), Some((_, issue))) => {
            eprintln!("conformance: {check}: fails as expected until {issue} ({e:.200})")
        }
        (Ok(()), Some((_, issue))) => failures.push(format!(
            "{check} passes now: remove it from EXPECTED_TO_FAIL ({issue})"
        )),
    }
}

#[test]
fn a10_real_applications_run_answer_log_and_stop_like_under_docker() {
    let images = app_images();
    let c = Cluster::init(60, &[]);
    c.import("conformance-client:1", "sh");
    let node = c.nodes[0].ip();
    let mut failures = Vec::new();

    for app in APPS {
        let file = images.join(format!("{}.oci.tar", app.name));
        let o = c.run(&["image", "load", file.to_str().unwrap()]);
        assert!(o.status.success(), "load {}: {}", app.name, stderr(&o));
        let publish = format!("{}:{}", app.publish.0, app.publish.1);
        let image = format!("apps/{}:1", app.name);
        // `image inspect` shows the config: exposed ports, labels, volumes, stop signal.
        let inspect = stdout(&c.run(&["image", "inspect", &image]));
        let v: serde_json::Value = serde_json::from_str(&inspect).unwrap_or_default();
        let port = format!("{}/tcp", app.publish.1);
        record(
            &mut failures,
            &format!("{} image inspect shows its exposed port", app.name),
            v["config"]["config"]["ExposedPorts"]
                .get(&port)
                .map(|_| ())
                .ok_or_else(|| format!("no {port}: {inspect:.400}")),
        );
        let mut args = vec![
            "service", "create", "--name", app.name, "--detach", "-p", &publish,
        ];
        if app.init {
            args.push("--init");
        }
        args.push(&image);
        let o = c.run(&args);
        assert!(o.status.success(), "create {}: {}", app.name, stderr(&o));
    }

    for app in APPS {
        running_task(&c, app.name, Duration::from_secs(120));
        let addr = format!("{node}:{}", app.publish.0);
        // Starting is not serving: wait (bounded) for the first good answer.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mesh = loop {
            let r = through_mesh(app, &addr);
            if r.is_ok() || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        record(
            &mut failures,
            &format!("{} through the mesh", app.name),
            mesh,
        );

        let (image, script) = by_name_client(app, app.name);
        let logs = client_logs(&c, &format!("{}-client", app.name), &image, &script);
        let want = by_name_answer(app);
        record(
            &mut failures,
            &format!("{} by name", app.name),
            logs.contains(&want)
                .then_some(())
                .ok_or_else(|| format!("no {want:?} in the client's output: {logs:.400}")),
        );

        let logged = wait_for_logs(&c, app.name, app.log_line);
        record(&mut failures, &format!("{} logs", app.name), logged);

        // redis and postgres carry a HEALTHCHECK in their image; the services set none.
        if matches!(app.name, "redis" | "postgres") {
            let deadline = Instant::now() + Duration::from_secs(60);
            let healthy = loop {
                let health = c
                    .tasks(app.name)
                    .into_iter()
                    .find(|t| t["desired_state"] == "running")
                    .map(|t| t["status"]["health"].clone());
                match health {
                    Some(h) if h == "healthy" => break Ok(()),
                    h if Instant::now() > deadline => break Err(format!("health {h:?}")),
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            record(
                &mut failures,
                &format!("{} healthy by its image's HEALTHCHECK", app.name),
                healthy,
            );
        }
    }

    let inspect = |image: &str| -> serde_json::Value {
        serde_json::from_str(&stdout(&c.run(&["image", "inspect", image]))).unwrap_or_default()
    };
    let (sa, pg) = (inspect("apps/stdout-app:1"), inspect("apps/postgres:1"));
    record(
        &mut failures,
        "image inspect shows labels, volumes and the stop signal",
        (sa["config"]["config"]["Labels"]["org.flotilla.conformance"] == "stdout-app"
            && pg["config"]["config"]["Volumes"]
                .get("/var/lib/postgresql/data")
                .is_some()
            && pg["config"]["config"]["StopSignal"] == "SIGINT")
            .then_some(())
            .ok_or_else(|| format!("{sa:.300} {pg:.300}")),
    );

    // A service without published ports, reached by its name on its port.
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "redis-unpublished",
        "--detach",
        "apps/redis:1",
    ]);
    assert!(
        o.status.success(),
        "create redis-unpublished: {}",
        stderr(&o)
    );
    running_task(&c, "redis-unpublished", Duration::from_secs(60));
    let logs = client_logs(
        &c,
        "redis-unpublished-client",
        "apps/redis:1",
        "redis-cli -h redis-unpublished -p 6379 PING",
    );
    record(
        &mut failures,
        "redis-unpublished by name",
        logs.contains("PONG")
            .then_some(())
            .ok_or_else(|| format!("{logs:.300}")),
    );

    // PostgreSQL on a named volume: a row written before `service update --force` is there
    // after it.
    let res = postgres_rows_survive_a_replacement(&c);
    record(
        &mut failures,
        "postgres rows survive a replacement on a named volume",
        res,
    );

    // Stopping: `service rm`; the stop signal of the image ends each app within the default
    // 10 s grace period (no SIGKILL: exit code 137), and the exit code is recorded in the
    // task's last update, which `flotilla events` shows (a removed service's tasks are deleted
    // once they have stopped, as in Swarm).
    let events = TaskEvents::follow(&c.nodes[0].socket());
    for app in APPS {
        let task = running_task(&c, app.name, Duration::from_secs(5));
        let id = task["id"].as_str().unwrap().to_string();
        let started = Instant::now();
        let o = c.run(&["service", "rm", app.name]);
        assert!(o.status.success(), "rm {}: {}", app.name, stderr(&o));
        let st = events.shutdown_of(&id, Duration::from_secs(30));
        let took = started.elapsed();
        let code = st.as_ref().and_then(|s| s["exit_code"].as_i64());
        record(
            &mut failures,
            &format!("{} stops cleanly", app.name),
            match code {
                Some(c) if c != 137 && took < Duration::from_secs(10) => {
                    eprintln!("conformance: {} stopped in {took:?} with {c}", app.name);
                    Ok(())
                }
                _ => Err(format!("exit code {code:?} after {took:?}: {st:?}")),
            },
        );
    }
    assert!(
        failures.is_empty(),
        "conformance failures:\n{}",
        failures.join("\n")
    );
}

/// Creates `pgvol` with a named volume at PGDATA, writes a row, replaces the task, reads it.
fn postgres_rows_survive_a_replacement(c: &Cluster) -> Result<(), String> {
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "pgvol",
        "--detach",
        "--mount",
        "type=volume,src=pgdata,dst=/var/lib/postgresql/data",
        "apps/postgres:1",
    ]);
    if !o.status.success() {
        return Err(format!("create: {}", stderr(&o).trim()));
    }
    let first = running_task(c, "pgvol", Duration::from_secs(60));
    let sql = |name: &str, q: &str| {
        let script = format!(
            "for i in $(seq 1 50); do pg_isready -q -h pgvol && break; sleep 0.2; done; \
             psql -h pgvol -U postgres -tAc \"{q}\""
        );
        client_logs(c, name, "apps/postgres:1", &script)
    };
    let wrote = sql(
        "pgvol-write",
        "create table t(x int); insert into t values (7); select sum(x) from t",
    );
    if !wrote.contains("| 7") {
        return Err(format!("the first write failed: {wrote:.300}"));
    }
    let o = c.run(&["service", "update", "--force", "pgvol"]);
    if !o.status.success() {
        return Err(format!("update --force: {}", stderr(&o).trim()));
    }
    wait_for("pgvol replaced", Duration::from_secs(60), || {
        running_task(c, "pgvol", Duration::from_secs(60))
            .get("id")
            .filter(|id| **id != first["id"])
            .map(|_| ())
    });
    let read = sql("pgvol-read", "select sum(x) from t");
    let _ = c.run(&["service", "rm", "pgvol"]);
    read.contains("| 7")
        .then_some(())
        .ok_or_else(|| format!("the row is gone after the replacement: {read:.300}"))
}

/// A `flotilla events --filter type=task` process whose lines a thread collects.
struct TaskEvents {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl TaskEvents {
    fn follow(socket: &str) -> TaskEvents {
        let mut child = Command::new(BIN)
            .args([
                "--host",
                socket,
                "events",
                "--filter",
                "type=task",
                "--format",
                "json",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("flotilla events");
        let out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        TaskEvents { child, lines }
    }

    /// The status of task `id` once an event shows it `shutdown` (bounded wait).
    fn shutdown_of(&self, id: &str, within: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let found = self.lines.lock().unwrap().iter().find_map(|e| {
                let st = &e["object"]["status"];
                (e["id"] == id && st["state"] == "shutdown").then(|| st.clone())
            });
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TaskEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `service logs` shows `line`.
fn wait_for_logs(c: &Cluster, service: &str, line: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = stdout(&c.run(&["service", "logs", service]));
        if text.contains(line) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no {line:?} in service logs: {:.600}", text));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a20_service_process_flags_reach_the_container() {
    let c = Cluster::init(61, &[]);
    c.import("flags:1", "sh");
    let script = "trap 'echo got-USR1; exit 0' USR1; echo host=$(hostname); \
                  test -t 1 && echo tty=yes; \
                  echo resolv=$(grep -E '^(search|options)' /etc/resolv.conf | tr '\\n' '|'); \
                  grep -c db-1 /etc/hosts | sed s/^/hosts=/; \
                  echo shm=$(df -k /dev/shm | tail -1 | awk '{print $2}'); \
                  echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline); \
                  while true; do sleep 0.1; done";
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "flags",
        "--detach",
        "--hostname",
        "db-1",
        "--stop-signal",
        "SIGUSR1",
        "--shm-size",
        "8m",
        "--init",
        "--tty",
        "--dns-search",
        "corp.example",
        "--dns-option",
        "ndots:2",
        "--dns-option",
        "timeout:1",
        "flags:1",
        "sh",
        "-c",
        script,
    ]);
    assert!(o.status.success(), "create: {}", stderr(&o));
    let task = running_task(&c, "flags", Duration::from_secs(60));
    let logs = wait_for("the flags output", Duration::from_secs(30), || {
        let t = stdout(&c.run(&["service", "logs", "flags"]));
        t.contains("pid1=").then_some(t)
    });
    for want in [
        "host=db-1",
        "tty=yes",
        "resolv=search corp.example flotilla|options ndots:2 timeout:1|",
        "hosts=1",
        "shm=8192",
        "pid1=/sbin/flotilla-init -- sh -c",
    ] {
        assert!(logs.contains(want), "{want} in {logs}");
    }
    let events = TaskEvents::follow(&c.nodes[0].socket());
    let o = c.run(&["service", "rm", "flags"]);
    assert!(o.status.success(), "rm: {}", stderr(&o));
    let st = events
        .shutdown_of(task["id"].as_str().unwrap(), Duration::from_secs(30))
        .expect("a shutdown event");
    assert_eq!(st["exit_code"], 0, "stopped by SIGUSR1 through tini: {st}");

    // Bad values are refused with the accepted forms, and nothing is created.
    for (flag, value, says) in [
        ("--stop-signal", "SIGNOPE", "SIGTERM"),
        ("--hostname", "bad_host!", "letters, digits"),
        ("--shm-size", "lots", "size"),
        ("--dns-search", "bad domain", "corp.example"),
        ("--dns-option", "ndots:x", "ndots:2"),
    ] {
        let o = c.run(&["service", "create", "--name", "bad", flag, value, "flags:1"]);
        assert!(!o.status.success(), "{flag} {value} accepted");
        assert!(stderr(&o).contains(says), "{flag} {value}: {}", stderr(&o));
    }
    let ls = stdout(&c.run(&["service", "ls", "--format", "json"]));
    assert!(!ls.contains("\"bad\""), "{ls}");
}
