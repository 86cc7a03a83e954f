//! `GET /v1/events` (`flotilla events`): the store's changes as newline-delimited JSON, from
//! any manager's own applied log, optionally replayed from a revision and filtered by object
//! type. The cluster object and secret values never appear in it.

use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;

use flotilla_store::{Event, EventKind, StoreError, Table};
use flotilla_types::EventMessage;

use super::Ctx;
use crate::error::ManagerError;

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Replay events after this revision (default: only new ones).
    since: Option<u64>,
    /// Comma-separated object types: node, service, task, secret, config, volume, image,
    /// network.
    #[serde(rename = "type")]
    kind: Option<String>,
}

pub fn type_name(t: Table) -> &'static str {
    match t {
        Table::Nodes => "node",
        Table::Services => "service",
        Table::Tasks => "task",
        Table::Secrets => "secret",
        Table::Configs => "config",
        Table::Volumes => "volume",
        Table::Images => "image",
        Table::Cluster => "cluster",
        Table::Networks => "network",
    }
}

fn message(ev: &Event) -> Option<EventMessage> {
    // The cluster object holds the CA key and join secrets; secret values never leave.
    if ev.table == Table::Cluster {
        return None;
    }
    let object = match ev.table {
        Table::Secrets => None,
        _ => ev
            .value
            .as_ref()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok()),
    };
    Some(EventMessage {
        revision: ev.revision,
        kind: type_name(ev.table).to_string(),
        action: match ev.kind {
            EventKind::Created => "create",
            EventKind::Updated => "update",
            EventKind::Deleted => "remove",
        }
        .to_string(),
        id: ev.id.clone(),
        object,
    })
}

/// `GET /v1/events`: newline-delimited JSON of store changes, answered by any manager from its
/// own applied log (every manager applies the same sequence).
pub async fn events(
    State(ctx): State<Ctx>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ManagerError> {
    let mgr = &ctx;
    let types: Option<Vec<String>> = q
        .kind
        .as_deref()
        .map(|s| s.split(',').map(|t| t.trim().to_string()).collect());
    if let Some(ts) = &types {
        for t in ts {
            if !Table::ALL.iter().any(|tb| type_name(*tb) == t) || t == "cluster" {
                return Err(ManagerError::bad_request(format!(
                    "unknown event type {t:?}: use node, service, task, secret, config, volume, image or network"
                )));
            }
        }
    }
    let since = q.since.unwrap_or_else(|| mgr.store.revision());
    let mut watch = mgr.store.watch(since).map_err(|e| match e {
        StoreError::Compacted { oldest } => ManagerError::bad_request(format!(
            "events before revision {oldest} are no longer kept: use --since {oldest} or later"
        )),
        other => other.into(),
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    tokio::spawn(async move {
        while let Some(item) = watch.next().await {
            let line = match item {
                Ok(ev) => {
                    let Some(msg) = message(&ev) else { continue };
                    if let Some(ts) = &types {
                        if !ts.contains(&msg.kind) {
                            continue;
                        }
                    }
                    super::ndjson(&msg)
                }
                Err(e) => {
                    let _ = tx
                        .send(super::ndjson(&serde_json::json!({"error": e.to_string()})))
                        .await;
                    break;
                }
            };
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    Ok(super::stream_response(rx)?)
}
