//! Public data types of the store: tables, objects, operations, events and status.
//!
//! Nothing here is openraft-typed; these are the types the daemon sees.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Identifier of a manager node in the Raft group.
pub type NodeId = u64;

/// A keyspace of the replicated state. Each table is one redb table in the state file and one
/// section of a snapshot.
///
/// To add a table: add a variant, add it to [`Table::ALL`] and to [`Table::as_str`]. Old data
/// files and snapshots stay readable (tables are stored and shipped by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Nodes,
    Services,
    Tasks,
    Secrets,
    Configs,
    Volumes,
    Images,
    Cluster,
    /// User-defined networks (`network create`), by name.
    Networks,
}

impl Table {
    /// Every table, in a stable order.
    pub const ALL: &'static [Table] = &[
        Table::Nodes,
        Table::Services,
        Table::Tasks,
        Table::Secrets,
        Table::Configs,
        Table::Volumes,
        Table::Images,
        Table::Cluster,
        Table::Networks,
    ];

    /// The lower-case name (also the serde name and the redb table name).
    pub fn as_str(&self) -> &'static str {
        match self {
            Table::Nodes => "nodes",
            Table::Services => "services",
            Table::Tasks => "tasks",
            Table::Secrets => "secrets",
            Table::Configs => "configs",
            Table::Volumes => "volumes",
            Table::Images => "images",
            Table::Cluster => "cluster",
            Table::Networks => "networks",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Table {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Table::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| StoreError::InvalidArgument(format!("unknown table {s:?}")))
    }
}

/// Which Raft RPC a transport call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RpcKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RpcKind {
    /// Suggested URL path segment: `"append"`, `"vote"` or `"snapshot"`.
    pub fn path(&self) -> &'static str {
        match self {
            RpcKind::AppendEntries => "append",
            RpcKind::Vote => "vote",
            RpcKind::InstallSnapshot => "snapshot",
        }
    }
}

impl fmt::Display for RpcKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

impl FromStr for RpcKind {
    type Err = StoreError;

    /// Accepts the [`RpcKind::path`] names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "append" => Ok(RpcKind::AppendEntries),
            "vote" => Ok(RpcKind::Vote),
            "snapshot" => Ok(RpcKind::InstallSnapshot),
            other => Err(StoreError::InvalidArgument(format!(
                "unknown raft rpc {other:?}; expected append, vote or snapshot"
            ))),
        }
    }
}

/// One stored object.
///
/// `value` is serialized as a JSON string when it is valid UTF-8 (the normal case: values are
/// JSON documents), otherwise as an array of numbers; both forms are accepted when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    pub id: String,
    /// Raft log index of the entry that last wrote this object.
    pub version: u64,
    /// Raft log index of the entry that created this object.
    pub created: u64,
    /// Opaque bytes (JSON by convention).
    #[serde(with = "crate::types::bytes_text")]
    pub value: Vec<u8>,
}

/// One mutation inside a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Fails with [`FailureKind::AlreadyExists`] if the object exists.
    Create {
        table: Table,
        id: String,
        #[serde(with = "crate::types::bytes_text")]
        value: Vec<u8>,
    },
    /// Fails with [`FailureKind::NotFound`] if absent, or [`FailureKind::VersionConflict`] if
    /// `expect_version` is set and differs from the current version.
    Update {
        table: Table,
        id: String,
        #[serde(with = "crate::types::bytes_text")]
        value: Vec<u8>,
        #[serde(default)]
        expect_version: Option<u64>,
    },
    /// Creates or replaces; never fails.
    Upsert {
        table: Table,
        id: String,
        #[serde(with = "crate::types::bytes_text")]
        value: Vec<u8>,
    },
    /// Fails if absent or if `expect_version` is set and differs.
    Delete {
        table: Table,
        id: String,
        #[serde(default)]
        expect_version: Option<u64>,
    },
}

impl Op {
    pub fn create(table: Table, id: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Create {
            table,
            id: id.into(),
            value: value.into(),
        }
    }

    pub fn update(
        table: Table,
        id: impl Into<String>,
        value: impl Into<Vec<u8>>,
        expect_version: Option<u64>,
    ) -> Op {
        Op::Update {
            table,
            id: id.into(),
            value: value.into(),
            expect_version,
        }
    }

    pub fn upsert(table: Table, id: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Upsert {
            table,
            id: id.into(),
            value: value.into(),
        }
    }

    pub fn delete(table: Table, id: impl Into<String>, expect_version: Option<u64>) -> Op {
        Op::Delete {
            table,
            id: id.into(),
            expect_version,
        }
    }

    /// The table this op touches.
    pub fn table(&self) -> Table {
        match self {
            Op::Create { table, .. }
            | Op::Update { table, .. }
            | Op::Upsert { table, .. }
            | Op::Delete { table, .. } => *table,
        }
    }

    /// Length of the value carried (0 for deletes).
    pub(crate) fn value_len(&self) -> usize {
        match self {
            Op::Create { value, .. } | Op::Update { value, .. } | Op::Upsert { value, .. } => {
                value.len()
            }
            Op::Delete { .. } => 0,
        }
    }

    /// The object id this op touches.
    pub fn id(&self) -> &str {
        match self {
            Op::Create { id, .. }
            | Op::Update { id, .. }
            | Op::Upsert { id, .. }
            | Op::Delete { id, .. } => id,
        }
    }
}

/// A set of ops written as ONE Raft entry. Atomic: every precondition is checked (in order,
/// each op seeing the effect of the ops before it) before anything is written; if one fails,
/// nothing is applied and [`WriteOutcome::result`] names the first failing op.
///
/// Size: one entry must reach a follower and be fsynced within `heartbeat_ms` (openraft 0.9's
/// AppendEntries deadline), so keep batches to about 1 MiB (a few thousand ops); batches over
/// `StoreConfig::max_batch_bytes` are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn single(op: Op) -> Batch {
        Batch { ops: vec![op] }
    }

    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Rough encoded size in bytes (ids and values plus per-op overhead).
    pub fn approx_size(&self) -> usize {
        64 + self
            .ops
            .iter()
            .map(|op| 48 + op.id().len() + op.value_len())
            .sum::<usize>()
    }
}

impl From<Vec<Op>> for Batch {
    fn from(ops: Vec<Op>) -> Self {
        Batch { ops }
    }
}

/// The result of a committed and applied [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOutcome {
    /// Raft log index of the entry (the new `version` of every object the batch wrote).
    pub revision: u64,
    /// `Err` if a precondition failed; then nothing of the batch was applied.
    pub result: Result<(), OpFailure>,
}

/// Why a batch was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("op {op_index} on {table}/{id} failed: {kind}")]
pub struct OpFailure {
    /// Index of the failing op in [`Batch::ops`].
    pub op_index: usize,
    pub table: Table,
    pub id: String,
    pub kind: FailureKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    AlreadyExists,
    NotFound,
    VersionConflict { current: u64, expected: u64 },
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::AlreadyExists => f.write_str("object already exists"),
            FailureKind::NotFound => f.write_str("object not found"),
            FailureKind::VersionConflict { current, expected } => write!(
                f,
                "version conflict: object is at version {current}, expected {expected}; re-read and retry"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Created,
    Updated,
    Deleted,
}

/// One change, produced by applying one op of a committed batch.
///
/// - `Created` / `Updated`: `value` is the new value, `version == revision`.
/// - `Deleted`: `value` is the last value before deletion and `version` its last version
///   (so consumers can see what was removed); the deletion itself happened at `revision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Raft log index of the entry that produced the event. Several events (one per op of a
    /// batch) may share a revision; they are delivered in op order.
    pub revision: u64,
    pub table: Table,
    pub id: String,
    pub kind: EventKind,
    #[serde(with = "crate::types::opt_bytes_text", default)]
    pub value: Option<Vec<u8>>,
    pub version: u64,
}

/// How recently a peer answered (leader) or was heard from (follower: the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerContact {
    pub id: NodeId,
    pub addr: String,
    /// Milliseconds since the last successful RPC; `None` = never.
    pub last_contact_ms: Option<u64>,
}

/// This node's part in the Raft group (openraft's server state), serialized as `"leader"`,
/// `"follower"`, `"candidate"`, `"learner"` or `"shutdown"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaftRole {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl RaftRole {
    /// Every role, in a stable order.
    pub const ALL: &'static [RaftRole] = &[
        RaftRole::Leader,
        RaftRole::Follower,
        RaftRole::Candidate,
        RaftRole::Learner,
        RaftRole::Shutdown,
    ];

    /// The lower-case name (also the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            RaftRole::Leader => "leader",
            RaftRole::Follower => "follower",
            RaftRole::Candidate => "candidate",
            RaftRole::Learner => "learner",
            RaftRole::Shutdown => "shutdown",
        }
    }

    pub fn is_leader(self) -> bool {
        self == RaftRole::Leader
    }
}

impl fmt::Display for RaftRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cheap, I/O-free view of this node's Raft state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    pub id: NodeId,
    pub state: RaftRole,
    pub term: u64,
    pub leader_id: Option<NodeId>,
    pub leader_addr: Option<String>,
    pub last_log_index: u64,
    /// Best known committed index (the last one this node persisted).
    pub committed: u64,
    pub applied: u64,
    pub voters: Vec<(NodeId, String)>,
    pub learners: Vec<(NodeId, String)>,
    /// Leader: every other member with the time since its last successful RPC.
    /// Others: just the leader, with the time since it was last heard from.
    pub peers: Vec<PeerContact>,
    /// Leader only: milliseconds since a quorum last acknowledged this leader. Openraft 0.9
    /// leaders do not step down when cut off, so a growing value means "quorum lost".
    #[serde(default)]
    pub quorum_ack_ms: Option<u64>,
}

impl RaftStatus {
    /// This node is the Raft leader (as far as it knows).
    pub fn is_leader(&self) -> bool {
        self.state.is_leader()
    }
}

/// serde for `Vec<u8>`: a string when UTF-8, else a sequence; accepts both.
pub(crate) mod bytes_text {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(v) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_seq(v.iter()),
        }
    }

    pub(crate) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or an array of bytes")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Vec<u8>, E> {
            Ok(v.into_bytes())
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(BytesVisitor)
    }
}

/// Like [`bytes_text`] for `Option<Vec<u8>>` (`null` = `None`).
pub(crate) mod opt_bytes_text {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => super::bytes_text::serialize(bytes, s),
            None => s.serialize_none(),
        }
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("null, a string or an array of bytes")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(super::bytes_text::BytesVisitor).map(Some)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(OptVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_round_trip() {
        for t in Table::ALL {
            assert_eq!(t.as_str().parse::<Table>().expect("parse"), *t);
            let json = serde_json::to_string(t).expect("json");
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
        assert!("bogus".parse::<Table>().is_err());
        for k in [
            RpcKind::AppendEntries,
            RpcKind::Vote,
            RpcKind::InstallSnapshot,
        ] {
            assert_eq!(k.path().parse::<RpcKind>().expect("parse"), k);
        }
    }

    #[test]
    fn raft_roles_serialize_as_before() {
        for r in RaftRole::ALL {
            let json = serde_json::to_string(r).expect("json");
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(r.to_string(), r.as_str());
            assert_eq!(serde_json::from_str::<RaftRole>(&json).expect("back"), *r);
        }
        let names: Vec<&str> = RaftRole::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            ["leader", "follower", "candidate", "learner", "shutdown"]
        );
        assert!(RaftRole::Leader.is_leader());
        assert!(!RaftRole::Follower.is_leader());
    }

    #[test]
    fn values_serialize_as_text_or_bytes() {
        let v = Versioned {
            id: "a".into(),
            version: 2,
            created: 1,
            value: br#"{"x":1}"#.to_vec(),
        };
        let json = serde_json::to_string(&v).expect("json");
        assert!(json.contains(r#""value":"{\"x\":1}""#), "{json}");
        assert_eq!(serde_json::from_str::<Versioned>(&json).expect("back"), v);

        let raw = Versioned {
            value: vec![0xff, 0, 1],
            ..v.clone()
        };
        let json = serde_json::to_string(&raw).expect("json");
        assert!(json.contains(r#""value":[255,0,1]"#), "{json}");
        assert_eq!(serde_json::from_str::<Versioned>(&json).expect("back"), raw);

        let op = Op::update(Table::Tasks, "t1", b"{}".to_vec(), Some(3));
        let json = serde_json::to_string(&op).expect("json");
        assert_eq!(serde_json::from_str::<Op>(&json).expect("back"), op);

        for value in [None, Some(b"hi".to_vec()), Some(vec![0xfe])] {
            let ev = Event {
                revision: 1,
                table: Table::Nodes,
                id: "n".into(),
                kind: EventKind::Deleted,
                value,
                version: 1,
            };
            let json = serde_json::to_string(&ev).expect("json");
            assert_eq!(serde_json::from_str::<Event>(&json).expect("back"), ev);
        }
    }
}
