use flotilla_types::{
    Availability, FailureAction, NodeState, RestartCondition, ServiceMode, TaskState, UpdateOrder,
    UpdateState,
};

use crate::testutil::{node, Sim, SEC};
use crate::{reconcile_removed, Action};

fn replicated(n: u64) -> ServiceMode {
    ServiceMode::Replicated { replicas: n }
}

fn per_node(sim: &Sim) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = sim
        .nodes
        .iter()
        .map(|n| {
            let c = sim
                .running()
                .iter()
                .filter(|t| t.node_id.as_deref() == Some(n.id.as_str()))
                .count();
            (n.id.clone(), c)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn scale_up_creates_missing_slots_as_new_tasks() {
    let mut sim = Sim::new(replicated(3), &["a"]);
    let r = sim.reconcile();
    let created = Sim::creates(&r);
    assert_eq!(created.len(), 3);
    let mut slots: Vec<u64> = created.iter().filter_map(|t| t.slot).collect();
    slots.sort_unstable();
    assert_eq!(slots, vec![1, 2, 3]);
    for t in created {
        assert_eq!(t.status.state, TaskState::New);
        assert_eq!(t.desired_state, TaskState::Running);
        assert_eq!(t.spec_version, 1);
        assert_eq!(t.node_id, None, "the scheduler assigns replicated tasks");
        assert_eq!(t.service_id, "svc");
    }
    assert_eq!(r.wake_at, None);
    // Nothing more to do once they exist (even before they run).
    assert!(sim.reconcile().actions.is_empty());
    sim.settle(5);
    assert_eq!(sim.running_slots(), vec![1, 2, 3]);
    sim.svc.spec.mode = replicated(5);
    sim.settle(5);
    assert_eq!(sim.running_slots(), vec![1, 2, 3, 4, 5]);
}

#[test]
fn scale_down_stops_highest_slots_then_deletes_them() {
    let mut sim = Sim::new(replicated(5), &["a", "b"]);
    sim.settle(5);
    sim.svc.spec.mode = replicated(2);
    let r = sim.reconcile();
    let removed: Vec<&str> = r
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::UpdateTask(u) if u.desired_state == Some(TaskState::Remove) => {
                Some(u.task_id.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(removed.len(), 3);
    for id in &removed {
        assert!(sim.task(id).slot.is_some_and(|s| s > 2));
    }
    sim.agents();
    let r = sim.reconcile();
    let deleted = r
        .actions
        .iter()
        .filter(|a| matches!(a, Action::DeleteTask { .. }))
        .count();
    assert_eq!(deleted, 3);
    assert_eq!(sim.tasks.len(), 2);
    assert_eq!(sim.running_slots(), vec![1, 2]);
}

#[test]
fn scale_to_zero_and_back() {
    let mut sim = Sim::new(replicated(3), &["a"]);
    sim.settle(5);
    sim.svc.spec.mode = replicated(0);
    sim.settle(5);
    assert!(sim.tasks.is_empty());
    sim.svc.spec.mode = replicated(2);
    sim.settle(5);
    assert_eq!(sim.running_slots(), vec![1, 2]);
}

#[test]
fn six_replicas_over_three_nodes_land_two_each() {
    let mut sim = Sim::new(replicated(6), &["a", "b", "c"]);
    sim.settle(5);
    assert_eq!(
        per_node(&sim),
        vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]
    );
}

#[test]
fn node_down_tasks_are_orphaned_and_replaced_elsewhere() {
    let mut sim = Sim::new(replicated(6), &["a", "b", "c"]);
    sim.settle(5);
    sim.node_mut("b").status.state = NodeState::Down;
    let r = sim.reconcile();
    let orphaned: Vec<_> = sim
        .tasks
        .iter()
        .filter(|t| t.status.state == TaskState::Orphaned)
        .collect();
    assert_eq!(orphaned.len(), 2);
    assert!(orphaned
        .iter()
        .all(|t| t.desired_state == TaskState::Shutdown));
    assert_eq!(
        Sim::creates(&r).len(),
        2,
        "restart delay 0: replaced at once"
    );
    sim.settle(5);
    assert_eq!(
        per_node(&sim),
        vec![("a".into(), 3), ("b".into(), 0), ("c".into(), 3)]
    );
    assert_eq!(sim.running_slots(), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn lost_tasks_are_replaced_without_the_restart_delay() {
    let mut sim = Sim::new(replicated(1), &["a", "b"]);
    sim.svc.spec.task_template.restart_policy.delay = 5 * SEC;
    sim.settle(5);
    let node = sim.running()[0].node_id.clone().unwrap();
    sim.node_mut(&node).status.state = NodeState::Down;
    let r = sim.reconcile();
    // The delay is a crash-loop back-off; a node failure is not the task's fault.
    let created = Sim::creates(&r);
    assert_eq!(created.len(), 1);
    assert_eq!(r.wake_at, None);
    // A crash on a healthy node still waits for the delay.
    sim.settle(5);
    let id = sim.running()[0].id.clone();
    sim.now += 1_000;
    sim.end(&id, TaskState::Failed);
    let r = sim.reconcile();
    assert!(Sim::creates(&r).is_empty());
    assert_eq!(r.wake_at, Some(sim.now + 5_000));
}

#[test]
fn drained_node_tasks_move_elsewhere() {
    let mut sim = Sim::new(replicated(4), &["a", "b"]);
    sim.settle(5);
    sim.node_mut("a").spec.availability = Availability::Drain;
    let r = sim.reconcile();
    assert_eq!(
        Sim::creates(&r).len(),
        2,
        "replacements are created right away"
    );
    let shut: usize = r
        .actions
        .iter()
        .filter(
            |a| matches!(a, Action::UpdateTask(u) if u.desired_state == Some(TaskState::Shutdown)),
        )
        .count();
    assert_eq!(shut, 2);
    sim.settle(5);
    assert_eq!(per_node(&sim), vec![("a".into(), 0), ("b".into(), 4)]);
}

#[test]
fn node_label_change_breaking_constraints_moves_tasks() {
    let mut sim = Sim::new(replicated(2), &["a", "b"]);
    for n in &mut sim.nodes {
        n.spec.labels.insert("zone".into(), "eu".into());
    }
    sim.svc.spec.task_template.placement.constraints = vec!["node.labels.zone==eu".into()];
    sim.settle(5);
    sim.node_mut("a")
        .spec
        .labels
        .insert("zone".into(), "us".into());
    sim.settle(5);
    assert_eq!(per_node(&sim), vec![("a".into(), 0), ("b".into(), 2)]);
}

#[test]
fn global_one_task_per_node_and_a_node_joining() {
    let mut sim = Sim::new(ServiceMode::Global, &["a", "b"]);
    let r = sim.reconcile();
    let created = Sim::creates(&r);
    assert_eq!(created.len(), 2);
    let mut on: Vec<_> = created.iter().map(|t| t.node_id.clone().unwrap()).collect();
    on.sort();
    assert_eq!(on, vec!["a", "b"]);
    assert!(created.iter().all(|t| t.slot.is_none()));
    sim.settle(5);
    assert_eq!(sim.running().len(), 2);
    sim.nodes.push(node("c"));
    let r = sim.reconcile();
    assert_eq!(Sim::creates(&r).len(), 1);
    assert_eq!(Sim::creates(&r)[0].node_id.as_deref(), Some("c"));
    sim.settle(5);
    assert_eq!(
        per_node(&sim),
        vec![("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]
    );
}

#[test]
fn global_drain_pause_down_and_constraints() {
    let mut sim = Sim::new(ServiceMode::Global, &["a", "b", "c", "d"]);
    sim.node_mut("d").spec.role = flotilla_types::NodeRole::Manager;
    sim.svc.spec.task_template.placement.constraints = vec!["node.role==worker".into()];
    sim.settle(5);
    assert_eq!(
        per_node(&sim),
        vec![
            ("a".into(), 1),
            ("b".into(), 1),
            ("c".into(), 1),
            ("d".into(), 0)
        ]
    );
    // Drain a: its task stops and is not replaced anywhere.
    sim.node_mut("a").spec.availability = Availability::Drain;
    // Pause b: keeps running.
    sim.node_mut("b").spec.availability = Availability::Pause;
    // c goes down: orphaned, nothing created while it is down.
    sim.node_mut("c").status.state = NodeState::Down;
    let r = sim.reconcile();
    assert!(Sim::creates(&r).is_empty());
    sim.settle(5);
    assert_eq!(
        per_node(&sim),
        vec![
            ("a".into(), 0),
            ("b".into(), 1),
            ("c".into(), 0),
            ("d".into(), 0)
        ]
    );
    assert_eq!(
        sim.task(
            &sim.tasks
                .iter()
                .find(|t| t.node_id.as_deref() == Some("c"))
                .unwrap()
                .id
                .clone()
        )
        .status
        .state,
        TaskState::Orphaned
    );
    // c comes back, a is activated again.
    sim.node_mut("c").status.state = NodeState::Ready;
    sim.node_mut("a").spec.availability = Availability::Active;
    sim.settle(5);
    assert_eq!(
        per_node(&sim),
        vec![
            ("a".into(), 1),
            ("b".into(), 1),
            ("c".into(), 1),
            ("d".into(), 0)
        ]
    );
    // Removing a node from the cluster drops its tasks' history.
    sim.nodes.retain(|n| n.id != "a");
    sim.settle(5);
    assert!(sim.tasks.iter().all(|t| t.node_id.as_deref() != Some("a")));
}

#[test]
fn restart_on_failure_gives_up_after_max_attempts() {
    let mut sim = Sim::new(replicated(1), &["a"]);
    sim.svc.spec.task_template.restart_policy.condition = RestartCondition::OnFailure;
    sim.svc.spec.task_template.restart_policy.max_attempts = 3;
    sim.settle(5);
    let mut started = 1;
    for _ in 0..10 {
        let Some(id) = sim.running().first().map(|t| t.id.clone()) else {
            break;
        };
        sim.now += 1_000;
        sim.end(&id, TaskState::Failed);
        let r = sim.settle(5);
        started += Sim::creates(&r).len().min(1);
        let _ = r;
    }
    let total = sim.tasks.len();
    assert_eq!(total, 4, "1 original + 3 restarts");
    assert!(sim.running().is_empty());
    // The last one is marked as given up and nothing happens any more, even much later.
    let last = sim.tasks.iter().max_by_key(|t| t.meta.created_at).unwrap();
    assert_eq!(last.desired_state, TaskState::Complete);
    sim.now += 3_600_000;
    assert!(sim.reconcile().actions.is_empty());
    assert!(started >= 1);
    // A spec change revives the slot.
    sim.svc
        .spec
        .task_template
        .container
        .env
        .push("CHANGED=1".into());
    sim.svc.spec_version += 1;
    sim.settle(10);
    assert_eq!(sim.running_slots(), vec![1]);
}

#[test]
fn restart_window_only_counts_recent_failures() {
    let mut sim = Sim::new(replicated(1), &["a"]);
    let p = &mut sim.svc.spec.task_template.restart_policy;
    p.max_attempts = 1;
    p.window = 10 * SEC;
    sim.settle(5);
    for _ in 0..5 {
        let id = sim.running()[0].id.clone();
        sim.now += 20_000; // each failure is outside the previous one's window
        sim.end(&id, TaskState::Failed);
        sim.settle(5);
        assert_eq!(sim.running().len(), 1);
    }
    let id = sim.running()[0].id.clone();
    sim.now += 1_000; // quick failure: two within 10 s → give up
    sim.end(&id, TaskState::Failed);
    sim.settle(5);
    assert!(sim.running().is_empty());
}

#[test]
fn on_failure_does_not_restart_success_and_none_never_restarts() {
    let mut sim = Sim::new(replicated(2), &["a"]);
    sim.svc.spec.task_template.restart_policy.condition = RestartCondition::OnFailure;
    sim.settle(5);
    let ids: Vec<String> = sim.running().iter().map(|t| t.id.clone()).collect();
    sim.end(&ids[0], TaskState::Complete);
    sim.end(&ids[1], TaskState::Failed);
    sim.settle(5);
    assert_eq!(sim.running().len(), 1);
    assert_eq!(sim.task(&ids[0]).desired_state, TaskState::Complete);

    let mut sim = Sim::new(replicated(1), &["a"]);
    sim.svc.spec.task_template.restart_policy.condition = RestartCondition::None;
    sim.settle(5);
    let id = sim.running()[0].id.clone();
    sim.end(&id, TaskState::Failed);
    sim.settle(5);
    assert!(sim.running().is_empty());
    assert_eq!(sim.tasks.len(), 1);
}

#[test]
fn restart_delay_is_honoured_with_wake_at() {
    let mut sim = Sim::new(replicated(1), &["a"]);
    sim.svc.spec.task_template.restart_policy.delay = 5 * SEC;
    sim.settle(5);
    let id = sim.running()[0].id.clone();
    let ended = sim.now;
    sim.end(&id, TaskState::Failed);
    sim.now += 1_000;
    let r = sim.reconcile();
    assert!(r.actions.is_empty(), "{:?}", r.actions);
    assert_eq!(r.wake_at, Some(ended + 5_000));
    sim.now = ended + 4_999;
    assert!(Sim::creates(&sim.reconcile()).is_empty());
    sim.now = ended + 5_000;
    let r = sim.reconcile();
    assert_eq!(Sim::creates(&r).len(), 1);
    assert_eq!(Sim::creates(&r)[0].slot, Some(1));
    assert_eq!(sim.task(&id).desired_state, TaskState::Shutdown);
}

#[test]
fn history_is_pruned_per_slot() {
    let mut sim = Sim::new(replicated(2), &["a"]);
    sim.cfg.task_history = 3;
    sim.settle(5);
    for round in 0..10 {
        for id in sim
            .running()
            .iter()
            .map(|t| t.id.clone())
            .collect::<Vec<_>>()
        {
            sim.end(&id, TaskState::Failed);
        }
        sim.now += 1_000 + round;
        sim.settle(5);
    }
    for slot in [1, 2] {
        let ended = sim
            .tasks
            .iter()
            .filter(|t| t.slot == Some(slot) && t.status.state.is_terminal())
            .count();
        assert_eq!(ended, 3, "slot {slot}");
    }
    assert_eq!(sim.running_slots(), vec![1, 2]);
    // The newest ones are kept.
    let newest_ended = sim
        .tasks
        .iter()
        .filter(|t| t.status.state.is_terminal())
        .map(|t| t.status.timestamp)
        .max()
        .unwrap();
    assert_eq!(newest_ended, sim.now - 1_009);
}

#[test]
fn unhealthy_tasks_are_replaced() {
    let mut sim = Sim::new(replicated(1), &["a"]);
    sim.settle(5);
    let id = sim.running()[0].id.clone();
    sim.task_mut(&id).status.health = Some(flotilla_types::Health::Unhealthy);
    let r = sim.reconcile();
    assert_eq!(Sim::creates(&r).len(), 1);
    assert_eq!(sim.task(&id).desired_state, TaskState::Shutdown);
    sim.settle(5);
    assert_eq!(sim.running().len(), 1);
    assert_ne!(sim.running()[0].id, id);
}

#[test]
fn service_rm_stops_then_deletes_everything() {
    let mut sim = Sim::new(replicated(3), &["a"]);
    sim.settle(5);
    // One task never got assigned (no node fits it any more).
    let mut pending = sim.tasks[0].clone();
    pending.id = "pending".into();
    pending.node_id = None;
    pending.status.state = TaskState::Pending;
    sim.tasks.push(pending);
    let r = reconcile_removed(&sim.tasks, &sim.nodes, sim.now);
    assert_eq!(r.actions.len(), 4);
    sim.apply(&r.actions);
    assert!(sim
        .tasks
        .iter()
        .all(|t| t.desired_state == TaskState::Remove));
    assert_eq!(sim.task("pending").status.state, TaskState::Shutdown);
    sim.agents();
    let r = reconcile_removed(&sim.tasks, &sim.nodes, sim.now);
    sim.apply(&r.actions);
    assert!(sim.tasks.is_empty());
}

// ---- rolling updates ---------------------------------------------------------------------

fn bump_spec(sim: &mut Sim, image: &str) {
    sim.svc.previous_spec = Some(sim.svc.spec.clone());
    sim.svc.spec.task_template.container.image = image.into();
    sim.svc.spec_version += 1;
}

/// Stop-first, parallelism 1: replaces exactly one slot.
fn update_one_slot(sim: &mut Sim) {
    sim.reconcile(); // old asked to stop
    sim.agents();
    sim.reconcile(); // new created
    sim.schedule();
    sim.agents();
}

fn versions(sim: &Sim) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = sim
        .running()
        .iter()
        .map(|t| (t.slot.unwrap(), t.spec_version))
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn rolling_update_stop_first_one_at_a_time() {
    let mut sim = Sim::new(replicated(3), &["a", "b", "c"]);
    sim.settle(5);
    bump_spec(&mut sim, "nginx@sha256:2");
    // Step 1: status updating, slot 1 old task asked to stop, nothing created yet.
    let r = sim.reconcile();
    assert!(r
        .actions
        .iter()
        .any(|a| matches!(a, Action::SetUpdateStatus(u) if u.state == UpdateState::Updating)));
    assert!(Sim::creates(&r).is_empty());
    assert_eq!(versions(&sim), vec![(2, 1), (3, 1)]);
    // Not stopped yet → nothing more.
    assert!(sim.reconcile().actions.is_empty());
    sim.agents();
    // Stopped → new task for slot 1.
    let r = sim.reconcile();
    let c = Sim::creates(&r);
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].slot, c[0].spec_version), (Some(1), 2));
    // While it is not running, slot 2 waits (parallelism 1).
    assert!(sim.reconcile().actions.is_empty());
    sim.schedule();
    sim.agents();
    assert_eq!(versions(&sim), vec![(1, 2), (2, 1), (3, 1)]);
    // Running → next slot.
    sim.reconcile();
    assert_eq!(versions(&sim), vec![(1, 2), (3, 1)]);
    sim.settle(20);
    assert_eq!(versions(&sim), vec![(1, 2), (2, 2), (3, 2)]);
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::Completed
    );
}

#[test]
fn rolling_update_start_first_never_drops_below_replicas() {
    let mut sim = Sim::new(replicated(3), &["a", "b", "c"]);
    sim.svc.spec.update_config.order = UpdateOrder::StartFirst;
    sim.settle(5);
    bump_spec(&mut sim, "nginx@sha256:2");
    for _ in 0..30 {
        sim.reconcile();
        assert!(sim.running().len() >= 3, "dropped below replicas");
        assert!(sim.running().len() <= 4, "parallelism 1 allows one extra");
        sim.schedule();
        sim.agents();
        assert!(sim.running().len() >= 3, "dropped below replicas");
    }
    assert_eq!(versions(&sim), vec![(1, 2), (2, 2), (3, 2)]);
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::Completed
    );
}

#[test]
fn update_parallelism_delay_and_monitor() {
    let mut sim = Sim::new(replicated(4), &["a", "b"]);
    sim.settle(5);
    sim.svc.spec.update_config.parallelism = 2;
    sim.svc.spec.update_config.delay = 10 * SEC;
    sim.svc.spec.update_config.monitor = 30 * SEC;
    bump_spec(&mut sim, "nginx@sha256:2");
    let r = sim.reconcile();
    let stopped = r
        .actions
        .iter()
        .filter(
            |a| matches!(a, Action::UpdateTask(u) if u.desired_state == Some(TaskState::Shutdown)),
        )
        .count();
    assert_eq!(stopped, 2, "parallelism 2");
    sim.agents();
    sim.reconcile();
    sim.schedule();
    sim.agents();
    let t0 = sim.now;
    // Both new tasks run; the delay holds the next batch back.
    let r = sim.reconcile();
    assert!(r.actions.is_empty());
    assert_eq!(r.wake_at, Some(t0 + 10_000));
    sim.now = t0 + 10_000;
    sim.settle(10);
    let t1 = sim.now;
    assert_eq!(versions(&sim).iter().filter(|(_, v)| *v == 2).count(), 4);
    // All replaced, but the last batch is still monitored.
    let r = sim.reconcile();
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::Updating
    );
    assert_eq!(
        r.wake_at,
        Some(t1 + 10_000),
        "update delay after the last batch"
    );
    sim.now = t1 + 10_000;
    let r = sim.reconcile();
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::Updating
    );
    assert_eq!(
        r.wake_at,
        Some(t0 + 30_000),
        "monitor window of the first batch"
    );
    sim.now = t0 + 30_000;
    let r = sim.reconcile();
    assert_eq!(
        r.wake_at,
        Some(t1 + 30_000),
        "monitor window of the last batch"
    );
    sim.now = t1 + 30_000;
    sim.reconcile();
    let st = sim.svc.update_status.as_ref().unwrap();
    assert_eq!(st.state, UpdateState::Completed);
    assert_eq!(st.completed_at, Some(sim.now));
}

#[test]
fn failure_within_monitor_rolls_back() {
    let mut sim = Sim::new(replicated(3), &["a", "b", "c"]);
    sim.settle(5);
    sim.svc.spec.update_config.failure_action = FailureAction::Rollback;
    sim.svc.spec.update_config.monitor = 30 * SEC;
    bump_spec(&mut sim, "nginx@sha256:bad");
    update_one_slot(&mut sim);
    let new: Vec<String> = sim
        .running()
        .iter()
        .filter(|t| t.spec_version == 2)
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(new.len(), 1);
    sim.now += 2_000;
    sim.end(&new[0], TaskState::Failed);
    let r = sim.reconcile();
    assert!(
        r.actions
            .iter()
            .any(|a| matches!(a, Action::Rollback { .. })),
        "{:?}",
        r.actions
    );
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::RollbackStarted
    );
    assert_eq!(sim.svc.spec.task_template.container.image, "nginx@sha256:1");
    sim.settle(30);
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::RollbackCompleted
    );
    assert!(sim
        .running()
        .iter()
        .all(|t| t.spec.container.image == "nginx@sha256:1"));
    assert_eq!(sim.running().len(), 3);
}

#[test]
fn failure_with_pause_stops_the_update() {
    let mut sim = Sim::new(replicated(3), &["a", "b", "c"]);
    sim.settle(5);
    bump_spec(&mut sim, "nginx@sha256:bad");
    update_one_slot(&mut sim);
    let new = sim
        .running()
        .iter()
        .find(|t| t.spec_version == 2)
        .map(|t| t.id.clone())
        .unwrap();
    sim.end(&new, TaskState::Failed);
    sim.reconcile();
    let st = sim.svc.update_status.clone().unwrap();
    assert_eq!(st.state, UpdateState::Paused);
    assert!(st.message.contains(&new), "{}", st.message);
    sim.settle(20);
    // Slot 1 is restarted (restart policy), the others stay at the old version.
    assert_eq!(versions(&sim), vec![(1, 2), (2, 1), (3, 1)]);
}

#[test]
fn unhealthy_new_task_counts_as_update_failure() {
    let mut sim = Sim::new(replicated(2), &["a", "b"]);
    sim.settle(5);
    bump_spec(&mut sim, "nginx@sha256:bad");
    update_one_slot(&mut sim);
    let new = sim
        .running()
        .iter()
        .find(|t| t.spec_version == 2)
        .map(|t| t.id.clone())
        .unwrap();
    sim.task_mut(&new).status.health = Some(flotilla_types::Health::Unhealthy);
    sim.reconcile();
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::Paused
    );
}

// ---- jobs --------------------------------------------------------------------------------

#[test]
fn replicated_job_runs_to_completion_with_bounded_concurrency() {
    let mut sim = Sim::new(
        ServiceMode::ReplicatedJob {
            max_concurrent: 2,
            total_completions: 6,
        },
        &["a", "b", "c"],
    );
    let mut successes = 0;
    let mut failed_once = false;
    for _ in 0..40 {
        sim.reconcile();
        let live = sim
            .tasks
            .iter()
            .filter(|t| t.desired_state == TaskState::Running && !t.status.state.is_terminal())
            .count();
        assert!(live <= 2, "{live} tasks at once");
        sim.schedule();
        sim.agents();
        // Finish one running task per round; fail one once.
        if let Some(id) = sim.running().first().map(|t| t.id.clone()) {
            sim.now += 1_000;
            if !failed_once {
                failed_once = true;
                sim.end(&id, TaskState::Failed);
            } else {
                sim.end(&id, TaskState::Complete);
                successes += 1;
            }
        }
    }
    assert_eq!(successes, 6);
    let complete = sim
        .tasks
        .iter()
        .filter(|t| t.status.state == TaskState::Complete)
        .count();
    assert_eq!(complete, 6);
    assert!(sim.reconcile().actions.is_empty(), "job is done");
}

#[test]
fn job_restarts_follow_policy_and_new_iteration_reruns() {
    let mut sim = Sim::new(
        ServiceMode::ReplicatedJob {
            max_concurrent: 1,
            total_completions: 1,
        },
        &["a"],
    );
    sim.svc.spec.task_template.restart_policy.max_attempts = 1;
    sim.settle(5);
    let id = sim.running()[0].id.clone();
    sim.end(&id, TaskState::Failed);
    sim.settle(5);
    let id = sim.running()[0].id.clone();
    sim.end(&id, TaskState::Failed);
    sim.settle(5);
    assert!(sim.running().is_empty(), "gave up after 1 restart");
    assert_eq!(sim.tasks.len(), 2);
    // `service update --force` on a job: a new iteration.
    sim.svc.job_iteration += 1;
    sim.settle(5);
    assert_eq!(sim.running().len(), 1);
    assert_eq!(sim.running()[0].job_iteration, 1);
}

#[test]
fn global_job_runs_once_per_node() {
    let mut sim = Sim::new(ServiceMode::GlobalJob, &["a", "b"]);
    sim.settle(5);
    assert_eq!(sim.running().len(), 2);
    for id in sim
        .running()
        .iter()
        .map(|t| t.id.clone())
        .collect::<Vec<_>>()
    {
        sim.end(&id, TaskState::Complete);
    }
    assert!(sim.reconcile().actions.is_empty());
    sim.nodes.push(node("c"));
    let r = sim.reconcile();
    assert_eq!(Sim::creates(&r).len(), 1);
}

#[test]
fn tasks_of_other_services_are_ignored() {
    let mut sim = Sim::new(replicated(1), &["a"]);
    sim.settle(5);
    let mut other = sim.tasks[0].clone();
    other.id = "other".into();
    other.service_id = "other-svc".into();
    other.slot = Some(7);
    sim.tasks.push(other);
    assert!(sim.reconcile().actions.is_empty());
}

#[test]
fn global_rolling_update_replaces_per_node() {
    let mut sim = Sim::new(ServiceMode::Global, &["a", "b", "c"]);
    sim.settle(5);
    bump_spec(&mut sim, "nginx@sha256:2");
    let r = sim.reconcile();
    let stops = r
        .actions
        .iter()
        .filter(
            |a| matches!(a, Action::UpdateTask(u) if u.desired_state == Some(TaskState::Shutdown)),
        )
        .count();
    assert_eq!(stops, 1);
    sim.settle(30);
    let mut on: Vec<(String, u64)> = sim
        .running()
        .iter()
        .map(|t| (t.node_id.clone().unwrap(), t.spec_version))
        .collect();
    on.sort();
    assert_eq!(on, vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]);
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::Completed
    );
}

#[test]
fn failed_rollback_pauses() {
    let mut sim = Sim::new(replicated(2), &["a", "b"]);
    sim.settle(5);
    sim.svc.spec.update_config.failure_action = FailureAction::Rollback;
    bump_spec(&mut sim, "nginx@sha256:bad");
    update_one_slot(&mut sim);
    let new = sim
        .running()
        .iter()
        .find(|t| t.spec_version == 2)
        .map(|t| t.id.clone())
        .unwrap();
    sim.end(&new, TaskState::Failed);
    sim.reconcile();
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::RollbackStarted
    );
    // The rollback's own replacement fails too.
    update_one_slot(&mut sim);
    let back = sim
        .running()
        .iter()
        .find(|t| t.spec_version == 3)
        .map(|t| t.id.clone())
        .unwrap();
    sim.end(&back, TaskState::Failed);
    sim.reconcile();
    assert_eq!(
        sim.svc.update_status.as_ref().unwrap().state,
        UpdateState::RollbackPaused
    );
}

#[test]
fn failure_ratio_and_continue_tolerate_failures() {
    for (ratio, action) in [(0.5, FailureAction::Pause), (0.0, FailureAction::Continue)] {
        let mut sim = Sim::new(replicated(4), &["a", "b"]);
        sim.settle(5);
        sim.svc.spec.update_config.max_failure_ratio = ratio;
        sim.svc.spec.update_config.failure_action = action;
        bump_spec(&mut sim, "nginx@sha256:2");
        update_one_slot(&mut sim);
        let new = sim
            .running()
            .iter()
            .find(|t| t.spec_version == 2)
            .map(|t| t.id.clone())
            .unwrap();
        sim.end(&new, TaskState::Failed);
        sim.settle(40);
        assert_eq!(
            sim.svc.update_status.as_ref().unwrap().state,
            UpdateState::Completed,
            "{action:?}"
        );
        assert_eq!(versions(&sim).iter().filter(|(_, v)| *v == 2).count(), 4);
    }
}

#[test]
fn paused_update_makes_no_progress_until_resumed() {
    let mut sim = Sim::new(replicated(3), &["a"]);
    sim.settle(5);
    bump_spec(&mut sim, "nginx@sha256:2");
    sim.svc.update_status = Some(flotilla_types::UpdateStatus {
        state: UpdateState::Paused,
        started_at: sim.now,
        completed_at: None,
        message: String::new(),
    });
    sim.settle(10);
    assert_eq!(versions(&sim), vec![(1, 1), (2, 1), (3, 1)]);
    sim.svc.update_status = None;
    sim.settle(30);
    assert_eq!(versions(&sim), vec![(1, 2), (2, 2), (3, 2)]);
}

#[test]
fn stopping_a_never_assigned_task_finishes_it() {
    let mut sim = Sim::new(replicated(2), &["a"]);
    sim.node_mut("a").status.state = NodeState::Down;
    sim.settle(5);
    assert!(sim
        .tasks
        .iter()
        .all(|t| t.status.state == TaskState::Pending));
    sim.svc.spec.mode = replicated(1);
    sim.reconcile();
    let r = sim.reconcile();
    // Nobody runs it, so the orchestrator records the shutdown itself, then deletes it.
    assert!(r.actions.iter().any(|a| matches!(a, Action::UpdateTask(u)
        if u.status.as_ref().is_some_and(|s| s.state == TaskState::Shutdown))));
    sim.reconcile();
    assert_eq!(sim.tasks.len(), 1);
}

#[test]
fn deterministic_for_the_same_input() {
    let mut sim = Sim::new(replicated(5), &["a", "b"]);
    sim.settle(5);
    sim.node_mut("a").status.state = NodeState::Down;
    bump_spec(&mut sim, "nginx@sha256:2");
    let mut ids_a = (0..).map(|i| format!("x{i}"));
    let mut ids_b = (0..).map(|i| format!("x{i}"));
    let a = crate::reconcile_with_ids(
        &sim.svc,
        &sim.tasks,
        &sim.nodes,
        sim.now,
        &sim.cfg,
        &mut || ids_a.next().unwrap(),
    );
    let mut rev = sim.tasks.clone();
    rev.reverse();
    let b = crate::reconcile_with_ids(&sim.svc, &rev, &sim.nodes, sim.now, &sim.cfg, &mut || {
        ids_b.next().unwrap()
    });
    let norm = |r: &crate::Reconcile| {
        let mut v: Vec<String> = r.actions.iter().map(|a| format!("{a:?}")).collect();
        v.sort();
        v
    };
    assert_eq!(norm(&a), norm(&b));
    assert!(!a.actions.is_empty());
}

#[test]
fn job_tasks_on_drained_node_are_rerun_elsewhere() {
    let mut sim = Sim::new(
        ServiceMode::ReplicatedJob {
            max_concurrent: 2,
            total_completions: 2,
        },
        &["a", "b"],
    );
    sim.settle(5);
    sim.node_mut("a").spec.availability = Availability::Drain;
    sim.settle(5);
    assert_eq!(sim.running().len(), 2);
    assert!(sim
        .running()
        .iter()
        .all(|t| t.node_id.as_deref() == Some("b")));
}

#[test]
fn tasks_without_a_slot_are_cleaned_up() {
    let mut sim = Sim::new(replicated(1), &["a"]);
    sim.settle(5);
    let mut stray = sim.tasks[0].clone();
    stray.id = "stray".into();
    stray.slot = None;
    sim.tasks.push(stray);
    sim.settle(5);
    assert!(sim.tasks.iter().all(|t| t.id != "stray"));
    assert_eq!(sim.running_slots(), vec![1]);
}

#[test]
fn unexpected_shutdown_counts_as_failure_for_on_failure() {
    let mut sim = Sim::new(replicated(1), &["a"]);
    sim.svc.spec.task_template.restart_policy.condition = RestartCondition::OnFailure;
    sim.settle(5);
    let id = sim.running()[0].id.clone();
    sim.end(&id, TaskState::Shutdown); // desired still running: nobody asked for it
    sim.settle(5);
    assert_eq!(sim.running().len(), 1);
    assert_ne!(sim.running()[0].id, id);
}

#[test]
fn unknown_and_paused_nodes_keep_their_tasks() {
    let mut sim = Sim::new(replicated(2), &["a", "b"]);
    sim.settle(5);
    sim.node_mut("a").status.state = NodeState::Unknown;
    sim.node_mut("b").spec.availability = Availability::Pause;
    assert!(sim.reconcile().actions.is_empty());
    // Global: an unknown node is still eligible, a paused one gets nothing new.
    let mut sim = Sim::new(ServiceMode::Global, &["a", "b"]);
    sim.node_mut("a").status.state = NodeState::Unknown;
    sim.node_mut("b").spec.availability = Availability::Pause;
    let r = sim.reconcile();
    let created = Sim::creates(&r);
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].node_id.as_deref(), Some("a"));
}
