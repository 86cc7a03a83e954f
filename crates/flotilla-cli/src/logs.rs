//! `flotilla service logs`.

use std::io::Write;

use flotilla_api::Client;

use crate::client::enc;
use crate::{CliError, ServiceLogsArgs};

#[derive(serde::Deserialize)]
struct Line {
    task_id: String,
    service: String,
    slot: Option<u64>,
    node: String,
    ts: String,
    #[allow(dead_code)]
    stream: String,
    line: String,
}

pub async fn service_logs(client: &Client, a: ServiceLogsArgs) -> Result<(), CliError> {
    let mut path = format!("/v1/services/{}/logs?follow={}", enc(&a.target), a.follow);
    if let Some(n) = a.tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(s) = &a.since {
        path.push_str(&format!("&since={}", enc(s)));
    }
    let client = client
        .clone()
        .with_timeout(std::time::Duration::from_secs(u64::MAX / 4));
    let stdout = std::io::stdout();
    client
        .stream_lines(&path, |raw| {
            let Ok(l) = serde_json::from_slice::<Line>(raw) else {
                return true;
            };
            let short: String = l.task_id.chars().take(12).collect();
            let name = match l.slot {
                Some(s) => format!("{}.{s}.{short}@{}", l.service, l.node),
                None => format!("{}.{short}@{}", l.service, l.node),
            };
            // The prefix comes from the node (its name) and the cluster: escaped. The line is
            // the container's output: raw, as `docker logs` prints it.
            let name = crate::output::escape(&name);
            let mut out = stdout.lock();
            let res = if a.timestamps {
                writeln!(out, "{name} | {} {}", crate::output::escape(&l.ts), l.line)
            } else {
                writeln!(out, "{name} | {}", l.line)
            };
            let _ = out.flush();
            res.is_ok()
        })
        .await?;
    Ok(())
}
