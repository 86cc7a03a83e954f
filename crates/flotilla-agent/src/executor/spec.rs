//! A task's container spec for the runtime.

use flotilla_types::Task;

use crate::net::TaskNet;

/// Maps a task to the runtime's container spec.
pub fn container_spec(
    task: &Task,
    digest: &str,
    net: Option<&TaskNet>,
) -> flotilla_runtime::ContainerSpec {
    let c = &task.spec.container;
    let r = &task.spec.resources.limits;
    flotilla_runtime::ContainerSpec {
        id: task.id.clone(),
        image: digest.to_string(),
        entrypoint: c.command.clone(),
        args: if c.args.is_empty() {
            None
        } else {
            Some(c.args.clone())
        },
        env: c.env.clone(),
        workdir: c.workdir.clone(),
        user: c.user.clone(),
        hostname: Some(hostname_of(task)),
        mounts: net
            .map(|n| {
                vec![
                    flotilla_runtime::BindMount {
                        src: n.hosts.clone(),
                        dst: "/etc/hosts".into(),
                        readonly: true,
                        copy_up: false,
                    },
                    flotilla_runtime::BindMount {
                        src: n.resolv.clone(),
                        dst: "/etc/resolv.conf".into(),
                        readonly: true,
                        copy_up: false,
                    },
                ]
            })
            .unwrap_or_default(),
        tmpfs: Vec::new(),
        resources: flotilla_runtime::Resources {
            memory_bytes: (r.memory_bytes > 0).then_some(r.memory_bytes as i64),
            nano_cpus: (r.nano_cpus > 0).then_some(r.nano_cpus),
            pids_limit: Some(4096),
            ..Default::default()
        },
        security: Default::default(),
        labels: c.labels.clone(),
        stop_signal: c.stop_signal.clone(),
        init: c.init,
        tty: c.tty,
        shm_size: c.shm_size,
        // The runtime creates the namespace (see `NodeNet::prepare_task`).
        network_namespace: None,
    }
}

/// The container's hostname: the service's `--hostname`, else the first 12 characters of the
/// task id (as Docker's container id prefix).
pub fn hostname_of(task: &Task) -> String {
    task.spec
        .container
        .hostname
        .clone()
        .unwrap_or_else(|| task.id.chars().take(12).collect())
}
