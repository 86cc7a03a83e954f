//! Health checks end to end (issue 18, point 6): a task with a health check counts as up only
//! once healthy, it becomes healthy fast (first probe at once, then every start interval), and
//! `service create` waits for that, or fails naming the check's output. Real node process, real
//! runc containers, the userspace routing mesh on the node's own address.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// httpd that starts listening only a second after the task's process starts.
const SLOW_WEB: &str =
    "sleep 1; mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www";

/// One HTTP/1.0 GET; the body, or why it failed.
fn get(addr: &str, path: &str) -> Result<String, String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    if !buf.starts_with("HTTP/1.") || buf.get(9..12) != Some("200") {
        return Err(format!("bad response: {:?}", buf.lines().next()));
    }
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(body.trim().to_string())
}

/// The service's `running_tasks` as `service ls` reports it.
fn running_tasks(c: &Cluster, name: &str) -> u64 {
    let o = c.run(&["service", "ls", "--format", "json"]);
    assert!(o.status.success(), "service ls: {}", stderr(&o));
    let all: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    all.iter()
        .find(|s| s["spec"]["name"] == name)
        .and_then(|s| s["service_status"]["running_tasks"].as_u64())
        .unwrap_or(0)
}

#[test]
fn h10_create_waits_until_healthy_and_a_failing_check_is_reported() {
    let c = Cluster::init(62, &[]);
    c.import("bb:1", "sleep 3600");

    // The default probe schedule: nothing but the TCP check itself.
    let t0 = Instant::now();
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "2",
        "-p",
        "18062:80",
        "--health-tcp",
        "80",
        "bb:1",
        "sh",
        "-c",
        SLOW_WEB,
    ]);
    let took = t0.elapsed();
    assert!(o.status.success(), "create web: {}", stderr(&o));
    assert!(stderr(&o).contains("converged"), "{}", stderr(&o));
    // Converged means reachable: the very first requests through the published port work.
    let addr = format!("{}:18062", c.nodes[0].ip());
    for i in 0..10 {
        if let Err(e) = get(&addr, "/") {
            panic!(
                "request {i} right after converged failed: {e}\n{}",
                stderr(&o)
            );
        }
    }
    // Healthy within about a second of listening, not after the 30 s default interval.
    assert!(
        took < Duration::from_secs(10),
        "create took {took:?}\n{}",
        stderr(&o)
    );
    let tasks: Vec<serde_json::Value> = c
        .tasks("web")
        .into_iter()
        .filter(|t| t["desired_state"] == "running")
        .collect();
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
    for t in &tasks {
        assert_eq!(t["status"]["state"], "running", "{t:#}");
        assert_eq!(t["status"]["health"], "healthy", "{t:#}");
    }
    assert_eq!(running_tasks(&c, "web"), 2);
    eprintln!("create → converged (2 replicas, healthy): {took:?}");

    // A check that never passes: create fails at its timeout, with the check's output, and
    // the task never counts as running.
    let t0 = Instant::now();
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "bad",
        "--health-cmd",
        "echo not ready yet; exit 1",
        "--timeout",
        "6s",
        "bb:1",
    ]);
    let took = t0.elapsed();
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "a never-healthy service converged: {err}"
    );
    assert!(err.contains("did not converge within 6s"), "{err}");
    assert!(err.contains("health check failed: not ready yet"), "{err}");
    assert!(!err.contains("verify: service bad converged"), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(running_tasks(&c, "bad"), 0);
    let t = c
        .tasks("bad")
        .into_iter()
        .max_by_key(|t| t["status"]["timestamp"].as_u64().unwrap_or(0))
        .unwrap();
    assert!(
        t["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not ready yet")),
        "{t:#}"
    );
}
