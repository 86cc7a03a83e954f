//! Services end to end (issue 5): three node processes on 127.0.x.y with real runc containers.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(90);
const LOOP: &str = "while true; do echo tick from $(hostname); sleep 0.5; done";

/// One manager and two workers, all with the test image.
fn three_nodes(net: u8) -> Cluster {
    let mut c = Cluster::init(net, &["--heartbeat-timeout", "3s"]);
    c.join("w1", "worker");
    c.join("w2", "worker");
    c.import("bb:1", LOOP);
    c
}

fn per_node(running: &[(String, String)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, n) in running {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn s10_replicas_spread_survive_a_dead_worker_and_stale_tasks_stop() {
    let mut c = three_nodes(21);
    // Containers are supervised by the small flotilla-shim built beside flotilla.
    for n in c.node_ls().unwrap() {
        let shim = n["description"]["engine"]["runtime"]["shim"].as_str();
        assert!(
            shim.is_some_and(|s| s.ends_with("/flotilla-shim")),
            "shim command reported: {shim:?}"
        );
    }
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "6",
        "bb:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let running = c.running("web");
    assert_eq!(running.len(), 6);
    let spread = per_node(&running);
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(
        spread.values().all(|n| *n == 2),
        "2/2/2 expected: {spread:?}"
    );

    // kill -9 a worker: its tasks are replaced on the others.
    let w1 = c.node_id("w1");
    c.nodes[1].kill9();
    let on_others = wait_for("6 running on the other nodes", LONG, || {
        let r = c.running("web");
        (r.len() == 6 && r.iter().all(|(_, n)| *n != w1)).then_some(r)
    });
    assert_eq!(per_node(&on_others).len(), 2);
    let stale: Vec<String> = c
        .tasks("web")
        .iter()
        .filter(|t| t["node_id"] == w1.as_str() && t["desired_state"] != "running")
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stale.len(), 2, "the dead worker's tasks are replaced");
    // Its containers kept running meanwhile (the shims are independent of the agent).
    let w1_containers = c.nodes[1].dir.join("runtime/containers");
    for id in &stale {
        assert!(
            w1_containers.join(id).exists(),
            "container {id} still there while its node is cut off"
        );
    }
    // The worker returns: its stale tasks are stopped and cleaned up.
    c.nodes[1].restart();
    wait_for(
        "stale containers on the returned worker are gone",
        LONG,
        || {
            stale
                .iter()
                .all(|id| !w1_containers.join(id).exists())
                .then_some(())
        },
    );
    assert_eq!(c.running("web").len(), 6);
    let o = c.run(&["service", "rm", "web"]);
    assert!(o.status.success());
    wait_for("all tasks removed", LONG, || {
        c.tasks_all().is_empty().then_some(())
    });
}

#[test]
fn s20_drain_global_and_unsatisfiable_constraints() {
    let mut c = three_nodes(22);
    let o = c.run(&[
        "service", "create", "--name", "g", "--mode", "global", "bb:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(per_node(&c.running("g")).len(), 3);
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "r",
        "--replicas",
        "3",
        "bb:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Drain w2: its replicated and global tasks leave it.
    let w2 = c.node_id("w2");
    let o = c.run(&["node", "update", "--availability", "drain", "w2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("w2 drained", LONG, || {
        let r = c.running("r");
        let g = c.running("g");
        (r.len() == 3
            && r.iter().all(|(_, n)| *n != w2)
            && g.len() == 2
            && g.iter().all(|(_, n)| *n != w2))
        .then_some(())
    });
    c.run(&["node", "update", "--availability", "active", "w2"]);

    // A joining node gets a global task.
    c.join("w3", "worker");
    let w3 = c.node_id("w3");
    wait_for("global task on the new node", LONG, || {
        let g = c.running("g");
        (g.len() == 4 && g.iter().any(|(_, n)| *n == w3)).then_some(())
    });

    // A constraint nobody meets: pending with the reason, and create reports it.
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "eu",
        "--constraint",
        "node.labels.zone==eu",
        "bb:1",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("no suitable node (constraint node.labels.zone==eu matched 0 of 4 nodes)"),
        "{err}"
    );
    let t = c.tasks("eu");
    assert_eq!(t[0]["status"]["state"], "pending");
    // Labelling a node makes it placeable.
    c.run(&["node", "update", "--label-add", "zone=eu", "w1"]);
    let w1 = c.node_id("w1");
    wait_for("constrained task placed on w1", LONG, || {
        let r = c.running("eu");
        (r.len() == 1 && r[0].1 == w1).then_some(())
    });
}

#[test]
fn s30_failed_health_check_rolls_back_and_start_first_keeps_capacity() {
    let c = three_nodes(23);
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "app",
        "--replicas",
        "3",
        "--update-failure-action",
        "rollback",
        "--update-monitor",
        "3s",
        "--update-order",
        "start-first",
        "--update-parallelism",
        "1",
        "--update-delay",
        "3s",
        "--stop-grace-period",
        "1s",
        "bb:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before: Vec<String> = c.running("app").into_iter().map(|(id, _)| id).collect();
    assert_eq!(before.len(), 3);

    // An update whose health check always fails → automatic rollback.
    let o = c.run(&[
        "service",
        "update",
        "--health-cmd",
        "false",
        "--health-interval",
        "300ms",
        "--health-retries",
        "1",
        "--health-timeout",
        "1s",
        "app",
    ]);
    assert!(
        !o.status.success(),
        "a failing update must not report success"
    );
    assert!(stderr(&o).contains("rolled back"), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(
        &c.run(&["service", "inspect", "app", "--format", "json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(s["update_status"]["state"], "rollback_completed", "{s:#}");
    assert!(s["spec"]["task_template"]["container"]["healthcheck"].is_null());
    assert!(!s["previous_spec"].is_null());
    // Tasks the failed update never touched are still the same containers.
    let after: Vec<String> = c.running("app").into_iter().map(|(id, _)| id).collect();
    assert_eq!(after.len(), 3);
    let untouched = before.iter().filter(|id| after.contains(id)).count();
    assert!(
        untouched >= 1,
        "some original tasks kept running: before {before:?} after {after:?}"
    );

    // A healthy start-first update: never fewer than 3 running.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let min_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let sock = c.nodes[0].socket();
    let watcher = {
        let stop = stop.clone();
        let min_seen = min_seen.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let o = cli(&sock, &["service", "ps", "app", "--format", "json"]);
                if let Ok(tasks) = serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout) {
                    let running = tasks
                        .iter()
                        .filter(|t| t["status"]["state"] == "running")
                        .count();
                    min_seen.fetch_min(running, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
    };
    // It also adds an exec health check that passes (run through the OCI runtime's `exec`).
    let o = c.run(&[
        "service",
        "update",
        "--env-add",
        "V=2",
        "--health-cmd",
        "test -e /proc/1/status",
        "--health-interval",
        "300ms",
        "--health-retries",
        "1",
        "--health-timeout",
        "5s",
        "app",
    ]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    watcher.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let min = min_seen.load(std::sync::atomic::Ordering::SeqCst);
    assert!(min >= 3, "start-first dropped to {min} running tasks");
    let tasks = c.tasks("app");
    let current = tasks
        .iter()
        .filter(|t| t["desired_state"] == "running")
        .filter(|t| {
            t["spec"]["container"]["env"]
                .as_array()
                .is_some_and(|e| e.iter().any(|v| v == "V=2"))
        })
        .count();
    assert_eq!(current, 3);
    wait_for(
        "the passing exec health check marks every task healthy",
        LONG,
        || {
            let healthy = c
                .tasks("app")
                .iter()
                .filter(|t| t["desired_state"] == "running")
                .filter(|t| t["status"]["health"] == "healthy")
                .count();
            (healthy == 3).then_some(())
        },
    );
}

#[test]
fn s40_restart_limits_scaling_and_jobs() {
    let c = three_nodes(24);
    // on-failure with 2 attempts: the first task and 2 restarts, then nothing.
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "crash",
        "--detach",
        "--restart-condition",
        "on-failure",
        "--restart-max-attempts",
        "2",
        "--restart-delay",
        "100ms",
        "bb:1",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let failed = wait_for("3 failed tasks in slot 1", LONG, || {
        let t = c.tasks("crash");
        let failed = t
            .iter()
            .filter(|t| t["status"]["state"] == "failed")
            .count();
        (failed == 3).then_some(t)
    });
    assert!(failed.iter().all(|t| t["status"]["exit_code"] == 3));
    // And it stays at 3: the orchestrator marks the slot as given up (desired `complete`).
    let t = wait_for("the slot given up", LONG, || {
        let t = c.tasks("crash");
        t.iter()
            .any(|t| t["status"]["state"] == "failed" && t["desired_state"] == "complete")
            .then_some(t)
    });
    assert_eq!(
        t.iter()
            .filter(|t| t["status"]["state"] == "failed")
            .count(),
        3
    );
    assert!(t.iter().all(|t| t["status"]["state"] != "running"));
    let ps = stdout(&c.run(&["service", "ps", "crash"]));
    assert!(ps.contains("non-zero exit (3)"), "{ps}");

    // Scale to 0 and back.
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "s",
        "--replicas",
        "2",
        "bb:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = c.run(&["service", "scale", "s=0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("0 running", LONG, || {
        c.running("s").is_empty().then_some(())
    });
    let o = c.run(&["service", "scale", "s=3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(c.running("s").len(), 3);
    // A mistyped count is refused before it reaches the store (it would exhaust the leader's
    // memory), and the service keeps its replicas.
    let o = c.run(&["service", "scale", "s=100000000"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--replicas 100000000 is more than one service may have (100000)"),
        "{}",
        stderr(&o)
    );
    let o = c.run(&["service", "inspect", "s", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("inspect json");
    assert_eq!(v["spec"]["mode"]["replicated"]["replicas"], 3, "{v}");
    assert_eq!(c.running("s").len(), 3);
    // As in Swarm, a scale is a change like any other: rollback undoes it.
    assert_eq!(
        v["previous_spec"]["mode"]["replicated"]["replicas"], 0,
        "{v}"
    );
    let o = c.run(&["service", "rollback", "s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("0 running after the rollback", LONG, || {
        c.running("s").is_empty().then_some(())
    });

    // A replicated job: 6 completions, at most 2 at once.
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "job",
        "--mode",
        "replicated-job",
        "--replicas",
        "6",
        "--max-concurrent",
        "2",
        "--detach",
        "bb:1",
        "sh",
        "-c",
        "sleep 0.5; echo done",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut max_running = 0;
    wait_for("6 completions", LONG, || {
        let t = c.tasks("job");
        let running = t
            .iter()
            .filter(|t| t["status"]["state"] == "running")
            .count();
        max_running = max_running.max(running);
        let done = t
            .iter()
            .filter(|t| t["status"]["state"] == "complete")
            .count();
        (done == 6).then_some(())
    });
    assert!(max_running <= 2, "at most 2 at once, saw {max_running}");
    // Nothing else starts once the job is done.
    let t = wait_for("every job task ended", LONG, || {
        let t = c.tasks("job");
        t.iter()
            .all(|t| {
                let st = t["status"]["state"].as_str().unwrap_or("");
                matches!(
                    st,
                    "complete" | "failed" | "shutdown" | "rejected" | "orphaned"
                )
            })
            .then_some(t)
    });
    assert_eq!(
        t.iter()
            .filter(|t| t["status"]["state"] == "complete")
            .count(),
        6
    );
}

#[test]
fn s50_service_logs_follow_across_nodes() {
    let c = three_nodes(25);
    let o = c.run(&[
        "service",
        "create",
        "--name",
        "talk",
        "--replicas",
        "3",
        "bb:1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut follow = std::process::Command::new(BIN)
        .args([
            "--host",
            &c.nodes[0].socket(),
            "service",
            "logs",
            "-f",
            "talk",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    let names = ["m1", "w1", "w2"];
    wait_for("lines from all three nodes", LONG, || {
        let l = lines.lock().unwrap();
        names
            .iter()
            .all(|n| l.iter().any(|x| x.contains(&format!("@{n} | tick from"))))
            .then_some(())
    });
    // Kill one task's container process: its replacement's output shows up too.
    let (victim, _) = c.running("talk")[0].clone();
    let o = c.run(&["service", "update", "--force", "--detach", "talk"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("the old task replaced", LONG, || {
        let r = c.running("talk");
        (r.len() == 3 && r.iter().all(|(id, _)| *id != victim)).then_some(())
    });
    let newest: Vec<String> = c
        .running("talk")
        .into_iter()
        .map(|(id, _)| id[..12].to_string())
        .collect();
    wait_for("lines from the replacement tasks", LONG, || {
        let l = lines.lock().unwrap();
        newest
            .iter()
            .all(|id| l.iter().any(|x| x.contains(id.as_str())))
            .then_some(())
    });
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = reader.join();
    // Lines are prefixed name.slot.taskid@node.
    let l = lines.lock().unwrap();
    assert!(
        l.iter().all(|x| x.starts_with("talk.")),
        "{:?}",
        &l[..3.min(l.len())]
    );
}
