//! Store configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::types::NodeId;

/// Configuration of one store instance (one manager). Call [`StoreConfig::validate`] once at
/// startup; [`crate::Store::open`] calls it too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// This manager's Raft node id. Unique in the cluster and stable across restarts.
    pub node_id: NodeId,
    /// Directory holding the store files: `raft-log.redb` (Raft log, vote, committed index) and
    /// `state.redb` (applied objects, change events, current snapshot). Created if missing.
    pub data_dir: PathBuf,
    /// Leader heartbeat interval in milliseconds. Default 75. In openraft 0.9 this is also the
    /// deadline of every AppendEntries RPC (transfer plus follower fsync), so raise it on slow
    /// disks or links.
    pub heartbeat_ms: u64,
    /// Minimum election timeout in milliseconds. Must be greater than `heartbeat_ms`.
    /// Default 250.
    pub election_min_ms: u64,
    /// Maximum election timeout in milliseconds (exclusive). Must be greater than
    /// `election_min_ms`. Default 500. Failover takes roughly `max + U[min, max)`.
    pub election_max_ms: u64,
    /// Build a snapshot (and then purge the log) every this many applied entries. Default 1000.
    pub snapshot_every: u64,
    /// How many log entries to keep behind a snapshot when purging, so slightly lagging
    /// followers catch up from the log rather than by snapshot. Default 500.
    pub logs_to_keep: u64,
    /// Deadline for a write (and for a linearizable read barrier) to be committed. On expiry
    /// the call fails with [`StoreError::Timeout`] rather than hanging. Default 3 s.
    #[serde(with = "duration_ms")]
    pub write_timeout: Duration,
    /// Deadline for membership changes (adding a learner waits until it has caught up, which
    /// may need a snapshot transfer). Default 60 s.
    #[serde(with = "duration_ms")]
    pub membership_timeout: Duration,
    /// How many change events to keep on disk for `watch(from_revision)`. Default 50 000.
    pub event_retention: u64,
    /// Largest batch [`crate::Store::write`] accepts, by [`crate::Batch::approx_size`].
    /// Default 1 MiB, which keeps every Raft RPC body under ~2 MB (axum's default body limit)
    /// and a single entry well within the AppendEntries deadline (`heartbeat_ms`). If you raise
    /// it, raise the body limit of the transport's Raft routes too.
    pub max_batch_bytes: usize,
    /// Encryption at rest: with a keyring, every value written to `raft-log.redb` and
    /// `state.redb` (log entries, objects, events, the snapshot, Raft metadata) is sealed with
    /// its newest data key, and opening the store seals in place whatever older plain values
    /// the files hold. `None` (the default) writes plain values and refuses sealed ones. Not
    /// serialized: the daemon loads the keys from their own files. See `at_rest.rs`.
    #[serde(skip)]
    pub at_rest: Option<Arc<flotilla_secrets::Keyring>>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            node_id: 0,
            data_dir: PathBuf::from("."),
            heartbeat_ms: 75,
            election_min_ms: 250,
            election_max_ms: 500,
            snapshot_every: 1000,
            logs_to_keep: 500,
            write_timeout: Duration::from_secs(3),
            membership_timeout: Duration::from_secs(60),
            event_retention: 50_000,
            max_batch_bytes: 1024 * 1024,
            at_rest: None,
        }
    }
}

impl StoreConfig {
    /// Checks the values; returns [`StoreError::InvalidConfig`] naming the field to fix.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |msg: String| Err(StoreError::InvalidConfig(msg));
        if self.heartbeat_ms == 0 {
            return bad("heartbeat_ms must be greater than 0".into());
        }
        if self.election_min_ms <= self.heartbeat_ms {
            return bad(format!(
                "election_min_ms ({}) must be greater than heartbeat_ms ({})",
                self.election_min_ms, self.heartbeat_ms
            ));
        }
        if self.election_max_ms <= self.election_min_ms {
            return bad(format!(
                "election_max_ms ({}) must be greater than election_min_ms ({})",
                self.election_max_ms, self.election_min_ms
            ));
        }
        if self.snapshot_every == 0 {
            return bad("snapshot_every must be at least 1".into());
        }
        if self.write_timeout.is_zero() {
            return bad("write_timeout must be greater than 0".into());
        }
        if self.membership_timeout.is_zero() {
            return bad("membership_timeout must be greater than 0".into());
        }
        if self.event_retention == 0 {
            return bad("event_retention must be at least 1".into());
        }
        if self.max_batch_bytes < 1024 {
            return bad("max_batch_bytes must be at least 1024".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir must not be empty".into());
        }
        Ok(())
    }
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_values_are_named() {
        StoreConfig::default().validate().expect("default valid");
        let cfg = StoreConfig {
            election_min_ms: 50,
            ..Default::default()
        };
        let err = cfg.validate().expect_err("invalid");
        assert!(err.to_string().contains("election_min_ms"), "{err}");
        let cfg = StoreConfig {
            event_retention: 0,
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }
}
